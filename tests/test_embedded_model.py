"""The embedded tiny model, when a trainer needs it as a path, is saved with the run's outputs (issue 16:
LoRA adapters pointed to a temporary folder that was never cleaned)."""

from __future__ import annotations

import json
import os

import torch

from lowmem.kit import build_tiny_model, save_embedded_model


def test_saved_next_to_the_outputs_and_replaced_whole(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    m0, tok = build_tiny_model(seed=0)
    path = save_embedded_model(m0, tok, out)
    assert path == str((out / "base_model").resolve())
    assert (os.stat(path).st_mode & 0o777) == 0o755
    m1, _ = build_tiny_model(seed=1)
    assert save_embedded_model(m1, tok, out) == path  # a second run (another seed) into the same output_dir
    loaded = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), m1.state_dict().values()))
    assert sorted(p.name for p in out.iterdir()) == ["base_model"]  # no temporary or old folders left


def test_lora_adapter_points_into_the_output_dir(tmp_path):
    from transformers import AutoModelForCausalLM

    from lowmem.quant import attach_lora  # peft.get_peft_model without its deprecation warning

    out = tmp_path / "run"
    model, tok = build_tiny_model(seed=0)
    base = save_embedded_model(model, tok, out)
    peft_model = attach_lora(AutoModelForCausalLM.from_pretrained(base, local_files_only=True),
                             {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    peft_model.save_pretrained(out / "adapter")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == base and base.startswith(str(out.resolve()))
