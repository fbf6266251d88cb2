"""``lowmem budget MODEL --budget B --measure [--top K]`` (MEASUREPICK, session 13): the search's pick is run with its
own settings (``measure_memory`` on CPU here: live torch tensors, MemTracker) and its measured peak is checked against
the budget; a pick that measures over the budget is an error line and exit 1, never a silent pass.

A tiny Llama (h=64, 2 layers, vocab 512) written with ``save_pretrained``. The measurement is a tensor count (the
tracker's), not the process's RSS: seeded and machine-independent, so the table and the JSON of two runs agree.
"""

from __future__ import annotations

import json

import pytest

from lowmem.cli import main

SEQ = 64
CPU = ["--device", "cpu", "--dtype", "fp32", "--seq-len", str(SEQ)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("measurepick-llama")
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments ``measure_memory`` was really called with (the real function still runs)."""
    import lowmem.memory.measure as measure

    seen: list[dict] = []
    real = measure.measure_memory

    def spy(model, **kw):
        seen.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(measure, "measure_memory", spy)
    return seen


# a pick with settings that are not measure_memory's defaults: 8-bit states, layerwise stepping, checkpointing, batch 2
PICK = ["--optimizer", "adamw8bit", "--layerwise", "--gradient-checkpointing", "--batch-size", "2", "--top", "1"]


def test_the_pick_is_measured_with_its_own_settings_and_fits(llama_dir, capsys, calls):
    assert main(["budget", llama_dir, *CPU, *PICK, "--budget", "3MiB", "--measure", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    pick = out["candidates"][0]
    s = pick["settings"]
    assert (s["optimizer"], s["layerwise"], s["gradient_checkpointing"], s["batch_size"]) == ("adamw8bit", True, True, 2)
    assert len(calls) == 1  # --top 1: the top pick only
    (kw,) = calls
    expected = dict(optimizer=s["optimizer"], optim_args=s["optim_args"], batch_size=s["batch_size"], seq_len=s["seq_len"],
                    dtype=s["dtype"], quantization=s.get("quantization"), lora=s.get("lora"),
                    gradient_checkpointing=s["gradient_checkpointing"], layerwise=s["layerwise"], device=s["device"],
                    gradient_accumulation_steps=1)
    assert {k: kw[k] for k in expected} == expected == out["measured"][0]["settings"]
    (m,) = out["measured"]
    assert m["estimate"] == {**pick["components"], "total": pick["total"]}
    assert m["peak"] == m["measured"]["total"] and m["peak"] > 0  # CPU: the tracker's highest total of live tensors
    assert m["fits"] is True and m["margin"] == out["budget"] - m["peak"] >= 0
    assert "fits the budget" in m["verdict"] and f"{m['peak']:,} B" in m["verdict"]


def test_a_pick_that_measures_over_the_budget_is_an_error(llama_dir, capsys, monkeypatch):
    """The estimate forced low (every candidate's total 1 B): the search picks AdamW within 2200 KiB (its weights,
    gradients and states are 2,233,492 B, under it), the measurement's peak is above it: exit 1 and an error line
    saying by how much, in the table and in the JSON."""
    import lowmem.memory.search as search

    monkeypatch.setattr(search, "peak_total", lambda components, **kw: 1)
    argv = ["budget", llama_dir, *CPU, "--optimizer", "adamw", "--no-gradient-checkpointing", "--batch-size", "1",
            "--budget", "2200KiB", "--measure"]
    assert main([*argv, "--json", "--top", "1"]) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    (m,) = out["measured"]
    assert out["candidates"][0]["total"] == 1 and m["peak"] > out["budget"] == 2200 * 1024
    assert m["fits"] is False and m["margin"] == out["budget"] - m["peak"] < 0
    over = m["peak"] - out["budget"]
    assert "error: #1 does not fit the budget" in captured.err and f"({over:,} B) over" in captured.err, captured.err
    assert main(argv) == 1  # the table too (default: the top pick only)
    captured = capsys.readouterr()
    assert "error: #1 does not fit the budget" in captured.err and f"({over:,} B) over" in captured.err
    assert "measured peak" in captured.out and "does not fit" in captured.out


def test_the_table_says_what_the_json_says(llama_dir, capsys):
    """Two picks measured (``--top 2``): each component's estimated and measured bytes in the table are the JSON's."""
    from lowmem.memory.estimate import COMPONENTS
    from lowmem.memory.report import fmt_bytes

    argv = ["budget", llama_dir, *CPU, "--optimizer", "adamw", "--no-gradient-checkpointing", "--budget", "3MiB",
            "--measure", "--top", "2"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [m["rank"] for m in out["measured"]] == [1, 2]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for m in out["measured"]:
        block = text.split(f"measured #{m['rank']} (")[1].split("measured #")[0]
        for k in (*COMPONENTS, "total"):
            row = next(line.split() for line in block.splitlines() if line.strip().startswith(k + " "))
            assert (" ".join(row[1:3]), " ".join(row[3:5])) == (fmt_bytes(m["estimate"][k]), fmt_bytes(m["measured"][k])), row
        # the tracker's verdict; the process's RSS (FIXMEM21's "but the process's peak RSS ..." clause) is read afresh
        # in each of the two runs, near a 3 MiB budget on one side or the other of it (failed CI once at 0808652)
        assert m["verdict"].split("; but the process's peak RSS")[0] in block


def test_a_quantized_pick_the_device_cannot_build_is_said_not_passed(llama_dir, capsys, monkeypatch):
    """A 4-bit pick whose model bitsandbytes cannot build on the device: not measured, said on stderr and in the JSON
    (``fits: null``), not a verdict."""
    import lowmem.memory.measure as measure

    def fail(model, **kw):
        raise RuntimeError("no 4-bit kernels for this device")

    monkeypatch.setattr(measure, "measure_memory", fail)
    assert main(["budget", llama_dir, *CPU, "--optimizer", "adamw", "--lora-r", "16", "--quantization", "nf4", "--top", "1",
                 "--budget", "3MiB", "--measure", "--json"]) == 0
    captured = capsys.readouterr()
    (m,) = json.loads(captured.out)["measured"]
    assert m["fits"] is None and m["measured"] is None and m["settings"]["quantization"] == "nf4"
    assert "warning: #1 not measured: nf4 base weights" in captured.err and "no 4-bit kernels" in captured.err


@pytest.mark.parametrize("with_budget", [["--budget", "3MiB"], []], ids=["budget", "no-budget"])
def test_measuring_no_step_is_an_error_naming_steps(llama_dir, capsys, with_budget):
    """``--steps 0`` measured nothing (a peak of 0 B, which "fits" every budget): an error naming ``--steps``."""
    assert main(["budget", llama_dir, *CPU, "--optimizer", "adamw", "--no-gradient-checkpointing", "--top", "1", *with_budget,
                 "--measure", "--steps", "0", "--json"]) == 2
    assert "--steps 0: expected an integer >= 1" in capsys.readouterr().err


def test_on_cuda_the_allocator_peak_is_the_verdict(llama_dir, capsys, monkeypatch):
    """Where the measurement has CUDA's ``max_memory_allocated`` (the ground truth: the caching allocator's peak,
    above the tracker's live tensors), that is the peak checked against the budget, not the tracker's total. A
    stand-in measurement (no GPU here): tracker total 1 MiB under the budget, allocator peak 1 B over it."""
    from types import SimpleNamespace

    import lowmem.memory.measure as measure

    limit = 3 * 2**20
    fake = SimpleNamespace(measured={"total": limit - 2**20}, peak_allocated=limit + 1, losses=[])
    monkeypatch.setattr(measure, "measure_memory", lambda model, **kw: fake)
    assert main(["budget", llama_dir, *CPU, "--optimizer", "adamw", "--no-gradient-checkpointing", "--top", "1",
                 "--budget", "3MiB", "--measure", "--json"]) == 1
    captured = capsys.readouterr()
    (m,) = json.loads(captured.out)["measured"]
    assert (m["peak"], m["fits"], m["margin"]) == (limit + 1, False, -1)
    assert "(1 B) over" in captured.err and "max_memory_allocated" in m["notes"][0]
