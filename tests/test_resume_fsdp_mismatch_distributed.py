"""`lowmem train --resume`: a checkpoint written under FSDP resumes only under FSDP and one written without
FSDP only without (the Trainer's own errors: "Checkpoint found at ... is only supported when using PyTorch
FSDP", or under FSDP a missing pytorch_model_fsdp.bin on process 0 while process 1 crashes in gloo; both
measured with `accelerate launch`). The check runs before any model loads; no processes needed here."""

from __future__ import annotations

import json

import pytest

from lowmem.config import ConfigError
from lowmem.train import load_recipe, resolve_checkpoint

COMMON = ("trainer_state.json", "scheduler.pt")
LAYOUTS = {  # what accelerate / the Trainer write
    "fsdp_full": ("model.safetensors", "pytorch_model_fsdp.bin", "optimizer.bin"),
    "fsdp_sharded": ("pytorch_model_fsdp_0/.metadata", "optimizer_0/.metadata"),
    "plain": ("model.safetensors", "optimizer.pt"),
}


def _checkpoint(tmp_path, layout):
    ckpt = tmp_path / "out" / "checkpoint-2"
    import torch
    from safetensors.torch import save_file

    for name in COMMON + LAYOUTS[layout]:  # whole small files: --resume skips a truncated one (5886e83)
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        if name == "trainer_state.json":
            (ckpt / name).write_text(json.dumps({"global_step": 2}))
        elif name.endswith(".safetensors"):
            save_file({"w": torch.zeros(1)}, ckpt / name)
        elif name.endswith((".pt", ".bin")):
            torch.save({}, ckpt / name)
        else:  # .metadata of a sharded directory
            (ckpt / name).write_text("")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: adamw\nsteps: 4\nresume_from_checkpoint: true\n")
    return load_recipe(recipe, output_dir=str(tmp_path / "out")), str(ckpt)


@pytest.mark.parametrize("layout", ["fsdp_full", "fsdp_sharded", "plain"])
@pytest.mark.parametrize("fsdp", [False, True])
def test_resume_needs_the_fsdp_setting_that_wrote_the_checkpoint(tmp_path, monkeypatch, layout, fsdp):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true" if fsdp else "false")
    recipe, ckpt = _checkpoint(tmp_path, layout)
    if fsdp == layout.startswith("fsdp"):
        assert resolve_checkpoint(recipe) == ckpt
    elif fsdp:
        with pytest.raises(ConfigError, match="was written without FSDP .*resume it without FSDP"):
            resolve_checkpoint(recipe)
    else:
        with pytest.raises(ConfigError, match="was written under FSDP .*only under FSDP"):
            resolve_checkpoint(recipe)
