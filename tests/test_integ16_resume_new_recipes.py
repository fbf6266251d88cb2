"""``lowmem train --resume`` mid-run with the newest engine recipes in the settings a user combines with them:
layerwise mode and ``dtype: bfloat16`` (the weights, the optimizer's state and its bf16 rounding all travel through
the checkpoint). The resumed run's weights equal the uninterrupted run's bit for bit. (The HF Trainer's resume of
every engine optimizer in float32: tests/test_trainer_hf.py::test_resume_from_checkpoint_matches_uninterrupted.)"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from lowmem.train import load_recipe, run

SMALL = dict(train_size=32, eval_size=8, batch_size=4, logging_steps=2, track_memory=False, seed=0, lr=1e-2, steps=4,
             save_steps=2)


@pytest.mark.slow  # two 4-step runs each (~3-6 s on the loaded 2-core machine)
@pytest.mark.parametrize("optim, extra", [
    ("racs", dict(layerwise=True, dtype="bfloat16")),
    ("sm3", dict(dtype="bfloat16", optim_args={"momentum": 0.9, "bf16_stochastic_round": True})),
    ("normuon", dict(layerwise=True)),
    ("alice", dict(layerwise=True, dtype="bfloat16", optim_args={"rank": 8, "update_proj_gap": 2})),
], ids=["racs-layerwise-bf16", "sm3-bf16-sr", "normuon-layerwise", "alice-layerwise-bf16-refresh"])
def test_resume_mid_run_is_bit_exact(tmp_path, optim, extra):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(load_recipe(None, optim=optim, output_dir=str(full), **{**SMALL, **extra}))
    cut.mkdir()
    shutil.copytree(full / "checkpoint-2", cut / "checkpoint-2")
    m = run(load_recipe(None, optim=optim, output_dir=str(cut), resume_from_checkpoint=True, **{**SMALL, **extra}))
    assert m["resumed_from"] == str(cut / "checkpoint-2") and m["steps"] == 4
    want, got = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    start = load_file(full / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(want[k], start[k]) for k in want)  # steps 3-4 moved the weights
    assert all(torch.equal(got[k], want[k]) for k in want)
    if extra.get("dtype") == "bfloat16":
        assert {t.dtype for t in want.values()} == {torch.bfloat16}
