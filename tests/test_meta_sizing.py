"""Meta-device sizing allocates nothing: `torch.device("meta")` puts parameters *and* buffers there, which is what
`accelerate.init_empty_weights(include_buffers=True)` does too (its default leaves buffers on the CPU), so lowmem
keeps the one-line torch context (issue 16 asked to use accelerate where it simplifies; it does not here)."""

from __future__ import annotations

import torch

from lowmem.memory.estimate import build_meta_model, resolve_config


def test_meta_model_allocates_nothing_and_matches_accelerates_empty_model():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = resolve_config("llama-2-7b")
    ours = build_meta_model(cfg, torch.bfloat16)
    assert {t.device.type for t in [*ours.parameters(), *ours.buffers()]} == {"meta"}
    with init_empty_weights(include_buffers=True):
        theirs = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    shapes = lambda m: [(n, tuple(t.shape), t.dtype) for n, t in [*m.named_parameters(), *m.named_buffers()]]  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    with init_empty_weights():  # accelerate's default: buffers are real CPU tensors
        default = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    assert "cpu" in {b.device.type for b in default.buffers()}
