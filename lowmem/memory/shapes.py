"""Named model shapes for estimates without a checkpoint: ``LlamaConfig`` keyword arguments.

Numbers are the published configs (``config.json`` of each Hugging Face checkpoint; the GaLore
paper's Appendix for the small pre-training shapes). Only shapes matter: nothing is downloaded or
allocated.
"""

from __future__ import annotations

from typing import Any

_L2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
_L3 = dict(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
# GaLore (Zhao et al. 2024), Table 5: LLaMA shapes used for C4 pre-training
_GALORE = dict(vocab_size=32000, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False)

SHAPES: dict[str, dict[str, Any]] = {
    "llama-60m": dict(_GALORE, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8),
    "llama-130m": dict(_GALORE, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12),
    "llama-350m": dict(_GALORE, hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16),
    "llama-1b": dict(_GALORE, hidden_size=2048, intermediate_size=5461, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32),
    "tinyllama-1.1b": dict(_L2, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "llama-3.2-1b": dict(_L3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.2-3b": dict(_L3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-2-7b": dict(_L2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": dict(_L2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "llama-2-70b": dict(_L2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "llama-3-8b": dict(_L3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "llama-3-70b": dict(_L3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
}


def list_shapes() -> list[str]:
    """Names accepted as ``model`` by :func:`~lowmem.memory.estimate_memory` (plus ``"tiny"``, the kit's model)."""
    return sorted([*SHAPES, "tiny"])


def shape_config(name: str):
    """The ``LlamaConfig`` of a named shape (``"tiny"``: :func:`lowmem.kit.tiny_config`).

    Raises:
        ValueError: Unknown name; the message lists the valid ones.
    """
    from transformers import LlamaConfig

    key = name.strip().lower()
    if key == "tiny":
        from ..kit import tiny_config

        return tiny_config()
    if key not in SHAPES:
        raise ValueError(f"Unknown model shape {name!r}; valid: {list_shapes()} (or a local model directory)")
    return LlamaConfig(**SHAPES[key])
