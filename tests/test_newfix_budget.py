"""FOUND_NEWCOMER 6 (NEWFIX): `lowmem budget --measure` says what it is measuring while it loads and steps a model: a
live bar in a terminal, one stderr line per measured configuration elsewhere (a log, a pipe, capsys)."""

import types

import pytest

import lowmem.memory.measure
from lowmem.cli_budget import measure_picks, measuring_progress


def test_one_line_per_pick_before_it_is_measured(monkeypatch, capsys):
    seen = []

    def measure(model, steps, **kw):
        seen.append(capsys.readouterr().err)  # what stderr held when this measurement began
        return types.SimpleNamespace(peak_allocated=None, measured={"total": 10}, losses=[1.0], at_peak={})

    monkeypatch.setattr(lowmem.memory.measure, "measure_memory", measure)
    settings = {"optimizer": "adamw", "batch_size": 2, "seq_len": 8, "dtype": "fp32", "quantization": None, "lora": None,
                "gradient_checkpointing": False, "layerwise": False, "optim_args": {}, "device": "cpu"}
    picks = [types.SimpleNamespace(settings={**settings, "optimizer": name}, components={}, total=5)
             for name in ("adamw", "adafactor")]
    out = measure_picks("tiny", picks, limit=100, steps=3)
    assert [r["fits"] for r in out] == [True, True]
    assert seen == ["lowmem budget: measuring #1/2 (adamw, batch 2, 3 steps on cpu) ...\n",
                    "lowmem budget: measuring #2/2 (adafactor, batch 2, 3 steps on cpu) ...\n"]


def test_a_terminal_gets_the_live_bar(monkeypatch, capsys):
    """In a terminal rich draws the bar (transient: it is gone when the measurements end), and no line is printed."""
    import rich.console

    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    with measuring_progress(2) as show:
        show(0, "adamw")
        show(1, "adafactor")
    assert "lowmem budget: measuring" not in capsys.readouterr().err


@pytest.mark.parametrize("total", [1, 3])
def test_lines_number_each_configuration(capsys, total):
    with measuring_progress(total) as show:
        for i in range(total):
            show(i, "x")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"lowmem budget: measuring #{i + 1}/{total} (x) ..." for i in range(total)]
