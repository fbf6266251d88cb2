"""Resuming ``lowmem train`` with other learning-rate settings than the run that wrote the checkpoint. The
Trainer restores the scheduler's base rates from ``scheduler.pt`` and keeps this run's schedule function: a new
``lr`` was ignored without a word (the run went on at the checkpoint's), and a new ``lr_scheduler`` /
``warmup_steps`` mixed the checkpoint's base rate with another schedule. Both are refused, naming the values;
the same settings resume bit for bit (cosine with warm-up, so the check runs on a schedule that moves)."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lowmem.train import load_recipe, run

SMALL = dict(train_size=64, eval_size=16, batch_size=8, logging_steps=2, track_memory=False, seed=0)
RECIPE = dict(optim="adamw", lr=1e-2, steps=6, save_steps=3, lr_scheduler="cosine", warmup_steps=2)


def _run(out, **kw):
    return run(load_recipe(None, output_dir=str(out), **{**SMALL, **RECIPE, **kw}))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    _run(out)
    return out


def _interrupted(tmp_path, uninterrupted):
    """The output_dir of a run killed after checkpoint-3."""
    shutil.copytree(uninterrupted / "checkpoint-3", tmp_path / "checkpoint-3")
    return tmp_path


def test_resume_with_the_same_settings_is_exact(tmp_path, uninterrupted):
    out = _interrupted(tmp_path, uninterrupted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = _run(out, resume_from_checkpoint=True)
    assert not [w for w in caught if "data order" in str(w.message)]
    assert m["resumed_from"] == str(out / "checkpoint-3")
    want, got = load_file(uninterrupted / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_with_another_lr_is_refused(tmp_path, uninterrupted):
    out = _interrupted(tmp_path, uninterrupted)
    with pytest.raises(ValueError, match=r"learning rate.*0\.01.*0\.005") as err:
        _run(out, resume_from_checkpoint=True, lr=5e-3)
    assert "checkpoint-3" in str(err.value)
    assert not (out / "checkpoint-6").exists()  # refused before any step


def test_resume_with_another_schedule_is_refused(tmp_path, uninterrupted):
    out = _interrupted(tmp_path, uninterrupted)
    with pytest.raises(ValueError, match=r"lr_scheduler_type") as err:
        _run(out, resume_from_checkpoint=True, lr_scheduler="constant", warmup_steps=0)
    assert "step 3" in str(err.value)
    assert not (out / "checkpoint-6").exists()


@pytest.mark.parametrize("change, match", [
    (dict(weight_decay=0.1), r"weight_decay.*0\.0.*0\.1"),
    (dict(optim_args={"betas": [0.8, 0.99]}), r"betas.*\[0\.9, 0\.999\].*\[0\.8, 0\.99\]"),
])
def test_resume_with_other_optimizer_settings_is_refused(tmp_path, uninterrupted, change, match):
    """torch's ``load_state_dict`` takes the checkpoint's group settings: the run went on with the old
    weight_decay / betas, and metrics.json's effective_hparams showed the old ones."""
    out = _interrupted(tmp_path, uninterrupted)
    with pytest.raises(ValueError, match=match):
        _run(out, resume_from_checkpoint=True, **change)
    assert not (out / "checkpoint-6").exists()


@pytest.mark.parametrize("change, match", [
    (dict(seed=1), r"seed=1.*seed=0"),
    (dict(train_size=48), r"48 training rows.*64"),
    (dict(batch_size=4), r"global batch of 4 rows.*8"),
])
def test_resume_with_another_data_order_says_so(tmp_path, uninterrupted, change, match):
    """The new values apply (unlike a new lr), but the rows after the checkpoint are not the interrupted run's: the
    Trainer skips the checkpoint's number of batches of the new order. A warning names what changed (the record of
    the run in each checkpoint, lowmem_run.json); the same settings warn nothing (test above)."""
    out = _interrupted(tmp_path, uninterrupted)
    with pytest.warns(UserWarning, match=match) as caught:
        _run(out, resume_from_checkpoint=True, **change)
    assert any("data order" in str(w.message) for w in caught)


def test_resume_with_another_lora_scaling_is_refused(tmp_path):
    """peft's load takes the adapter weights and keeps this run's scaling: resumed with lora_alpha 32 over adapters
    trained at 8 (r=4) every adapter's output was 4x what it had been, and the run went on (final loss 4.098 for the
    uninterrupted 4.114). Refused before the model loads, naming the field and both values."""
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    _run(tmp_path, lora=lora, steps=4, save_steps=2, lr_scheduler="constant", warmup_steps=0)
    with pytest.raises(ValueError, match=r"lora\.lora_alpha=32.*8"):
        _run(tmp_path, lora={**lora, "lora_alpha": 32}, steps=6, save_steps=2, lr_scheduler="constant", warmup_steps=0,
             resume_from_checkpoint=True)
    assert not (tmp_path / "checkpoint-6").exists()
    m = _run(tmp_path, lora=lora, steps=6, save_steps=2, lr_scheduler="constant", warmup_steps=0,
             resume_from_checkpoint=True)  # the same lora resumes
    assert m["resumed_from"] == str(tmp_path / "checkpoint-4") and m["steps"] == 6
