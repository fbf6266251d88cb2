"""FOUND_NEWFIX 1 (SMALLS): measure_memory(progress=...) is called as progress(step, steps) after each optimizer step, and
`lowmem budget --measure` shows those steps (a k/steps bar in a terminal, a short line per step elsewhere)."""

import pytest

from lowmem.memory.measure import measure_memory


@pytest.mark.parametrize("kw", [{}, {"gradient_accumulation_steps": 2}, {"layerwise": True}],
                         ids=["plain", "accumulation", "layerwise"])
def test_progress_is_called_once_per_optimizer_step(kw):
    seen = []
    measure_memory("tiny", steps=2, seq_len=8, device="cpu", progress=lambda k, n: seen.append((k, n)), **kw)
    assert seen == [(1, 2), (2, 2)]


def test_progress_must_be_callable():
    with pytest.raises(ValueError, match="progress must be a callable"):
        measure_memory("tiny", steps=1, seq_len=8, device="cpu", progress=3)


def test_a_terminal_bar_counts_the_steps(monkeypatch, capsys):
    """In a terminal the step callback drives a rich task (completed k of total steps), and no line is printed."""
    import rich.console
    import rich.progress

    from lowmem.cli_budget import measuring_progress

    seen = []
    real_update = rich.progress.Progress.update

    def update(self, task_id, **kw):
        seen.append((int(task_id), kw.get("total"), kw.get("completed")))
        return real_update(self, task_id, **kw)

    monkeypatch.setattr(rich.progress.Progress, "update", update)
    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    with measuring_progress(1) as show:
        step = show(0, "adamw")
        step(1, 3)
        step(3, 3)
    assert (1, 3, 1) in seen and (1, 3, 3) in seen
    assert "lowmem budget: measuring" not in capsys.readouterr().err
