"""FIXES2 (FOUND_USERFIX F3): ``lowmem train --resume`` (resume_from_checkpoint: true) refuses when the latest checkpoint
was written with save_only_model (it took the older complete one, silently), as LowMemTrainer does."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from lowmem.config import ConfigError
from lowmem.train import checkpoint_problems, resolve_checkpoint, weights_only_checkpoint


def _checkpoint(out: Path, step: int, complete: bool) -> Path:
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
    if complete:
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            torch.save({}, d / name)
    return d


def _recipe(out):
    return SimpleNamespace(resume_from_checkpoint=True, output_dir=str(out), steps=100, training_args={},
                           lora=None, quantization=None)


def test_latest_weights_only_checkpoint_is_refused_naming_the_older_complete_one(tmp_path):
    older = _checkpoint(tmp_path, 2, complete=True)
    latest = _checkpoint(tmp_path, 4, complete=False)
    assert checkpoint_problems(older) is None and weights_only_checkpoint(latest)
    with pytest.raises(ConfigError, match=r"the latest checkpoint, .*checkpoint-4, holds the weights only") as err:
        resolve_checkpoint(_recipe(tmp_path))
    assert f"model: {latest}" in str(err.value) and f"resume_from_checkpoint: {older}" in str(err.value)


def test_a_complete_latest_checkpoint_still_resumes_over_an_older_weights_only_one(tmp_path):
    _checkpoint(tmp_path, 2, complete=False)
    latest = _checkpoint(tmp_path, 4, complete=True)
    assert resolve_checkpoint(_recipe(tmp_path)) == str(latest)
