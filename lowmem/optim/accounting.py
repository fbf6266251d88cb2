"""Optimizer-state accounting at real scale: a Llama-shaped model on the meta device.

Nothing is allocated: the model is built under ``torch.device("meta")``, the optimizer is created on
it with :func:`~lowmem.optim.create_optimizer` and its state is materialized on the meta device, so
``state_bytes()`` is the exact size the state would have on a real 7B model.
"""

from __future__ import annotations

from typing import Any

import torch

LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
}


def llama_shaped_state_bytes(name: str, shape: str = "llama-2-7b", **hparams: Any) -> dict[str, Any]:
    """Exact optimizer-state size of ``name`` on a Llama-shaped model (meta device, no memory used).

    Args:
        name (`str`): Registered engine optimizer (``lowmem list``).
        shape (`str`, defaults to `"llama-2-7b"`): A key of :data:`LLAMA_SHAPES`.
        **hparams: Passed to ``create_optimizer`` (e.g. ``rank=1024`` for subspace recipes; a
            subspace recipe without ``rank`` uses its default).

    Returns:
        ``{"optimizer", "shape", "trainable_params", "state_bytes", "bytes_per_param"}``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from .registry import create_optimizer

    if shape not in LLAMA_SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; valid: {sorted(LLAMA_SHAPES)}")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPES[shape], tie_word_embeddings=False))
    opt = create_optimizer(model, name, **hparams)
    if not hasattr(opt, "materialize_state"):
        raise ValueError(f"{name!r} is not an engine optimizer; its state cannot be sized on the meta device")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.materialize_state()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sb = opt.state_bytes()
    return {"optimizer": name, "shape": shape, "trainable_params": n, "state_bytes": sb, "bytes_per_param": sb / n}
