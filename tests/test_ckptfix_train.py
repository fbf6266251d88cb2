"""A run that starts from step 0 into an output_dir holding an earlier run's checkpoints moves them to
``earlier-run-K`` (intact, named in the warning) before writing its own (FOUND_RESUMEAUDIT 2)."""

from __future__ import annotations

import json

import pytest

from lowmem.train import load_recipe, run

SMALL = dict(train_size=16, eval_size=8, batch_size=4, logging_steps=2, track_memory=False, seed=0, optim="adamw")


@pytest.mark.slow  # three short runs, ~6 s
def test_a_new_run_moves_the_earlier_runs_checkpoints_aside_intact(tmp_path, capsys):
    run(load_recipe(None, output_dir=str(tmp_path), steps=2, save_steps=2, lr=3e-2, **SMALL))
    old = {f.name: f.read_bytes() for f in (tmp_path / "checkpoint-2").iterdir() if f.is_file()}
    capsys.readouterr()
    run(load_recipe(None, output_dir=str(tmp_path), steps=1, save_steps=1, **SMALL))
    out = capsys.readouterr().out
    assert "holds ['checkpoint-2'] from an earlier run" in out and "earlier-run-1" in out
    moved = tmp_path / "earlier-run-1" / "checkpoint-2"
    assert {f.name: f.read_bytes() for f in moved.iterdir() if f.is_file()} == old  # nothing of it lost
    assert not (tmp_path / "checkpoint-2").exists()  # --resume cannot take the earlier run's for this one's
    assert json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1
    run(load_recipe(None, output_dir=str(tmp_path), steps=1, save_steps=1, **SMALL))
    assert (tmp_path / "earlier-run-2" / "checkpoint-1").is_dir()  # the next free folder
