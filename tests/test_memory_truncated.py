"""The activation trace of a truncated stack (the first few decoder layers, each kind of layer in its neighbours'
context), stitched to the whole stack (``lowmem.memory.activations._stitch_layers``), equals the trace of the whole
stack byte for byte: uniform stacks, alternating sliding / full attention (Gemma2), Qwen2's full-then-sliding layers,
GPT-2's cache (a key or value per layer freed with the model's output), float32 and bfloat16, with and without
gradient checkpointing, a batch above 3 (extrapolated)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lowmem.memory.activations import decoder_layers, layer_kinds, traced_activation_bytes, truncated_layers
from lowmem.memory.estimate import build_meta_model

L = 9


def _config(name: str, L: int = L):
    from transformers import AutoConfig

    c = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=L, num_attention_heads=2,
             max_position_embeddings=64)
    if name == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=300, n_embd=64, n_layer=L, n_head=2, n_positions=64, n_inner=96,
                                    bos_token_id=0, eos_token_id=0)
    if name == "gemma2":
        return AutoConfig.for_model("gemma2", num_key_value_heads=1, head_dim=32, sliding_window=8, **c)
    if name == "qwen2_sw":
        return AutoConfig.for_model("qwen2", num_key_value_heads=1, use_sliding_window=True, sliding_window=8,
                                    max_window_layers=2, **c)
    raise KeyError(name)


def _both(config, dtype, batch, seq, ckpt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = traced_activation_bytes(build_meta_model(config, dtype), config, batch, seq, ckpt, cache={})
        whole = traced_activation_bytes(build_meta_model(config, dtype), config, batch, seq, ckpt,
                                        cache={"step layers": config.num_hidden_layers})
    return fast, whole


@pytest.mark.parametrize("name,dtype,batch,ckpt", [
    ("gpt2", torch.float32, 1, False),
    pytest.param("gemma2", torch.bfloat16, 1, False, marks=pytest.mark.slow),
    pytest.param("gemma2", torch.float32, 4, True, marks=pytest.mark.slow),
    pytest.param("qwen2_sw", torch.bfloat16, 5, False, marks=pytest.mark.slow),
])
def test_truncated_trace_equals_the_whole_stack(name, dtype, batch, ckpt):
    """(The others are slow: LOWMEM_SLOW=1.) Before the neighbours' context and the head's frees were counted, the stitched step differed from the whole
    one by a hidden state (bfloat16 inputs freed when the next layer starts), a cache entry per missing layer (GPT-2,
    Qwen2, Gemma2) or a mask between layers of two kinds (Gemma2 checkpointed)."""
    n = 12 if name == "gemma2" else L  # (alternating: a prefix of 8)
    config = _config(name, n)
    m = truncated_layers(layer_kinds(config, decoder_layers(build_meta_model(config, dtype), n)))
    assert m < n  # the prefix is shorter than the stack: the stitching is what is tested
    fast, whole = _both(config, dtype, batch, 8, ckpt)
    assert fast == whole


def test_layer_kinds_of_alternating_and_moe_stacks():
    """Gemma2 alternates sliding and full attention: two kinds after the first layer; Qwen2-MoE's sparse layers every
    second layer are a kind of their own (an ``mlp_only_layers`` entry among them is dense); a uniform stack keeps six layers."""
    from transformers import AutoConfig

    kinds = layer_kinds(_config("gemma2"), decoder_layers(build_meta_model(_config("gemma2"), torch.float32), L))
    assert kinds[1] != kinds[2] and kinds[1] == kinds[3] and kinds[2] == kinds[4] and kinds[0] not in kinds[1:]
    moe = AutoConfig.for_model("qwen2_moe", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
                               num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=32, shared_expert_intermediate_size=64, decoder_sparse_step=2,
                               mlp_only_layers=[5])
    kinds = layer_kinds(moe, decoder_layers(build_meta_model(moe, torch.float32), 8))
    # sparse where (index + 1) % 2 == 0, except the mlp-only layer 5: dense like 2 and 4
    assert kinds[1] == kinds[3] == kinds[7] != kinds[5] and kinds[2] == kinds[4] == kinds[5]
    uniform = _config("gpt2")
    assert truncated_layers(layer_kinds(uniform, decoder_layers(build_meta_model(uniform, torch.float32), L))) == 6
