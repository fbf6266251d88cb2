"""The Llama formula's recomputed (or last) layer at its ``down_proj``: the first gradient its backward forms is the
weight's, a new ``i x h`` tensor that autograd hands to ``.grad`` only once formed, live beside the layer's tensors,
its incoming gradient and the gradient of the ``down_proj`` input. With few tokens beside the weight that moment, not
the later one of the MLP's gate and up gradients, is the activations' peak (measured: every live storage there).

Activations estimate / measured (fp32, AdamW) before it was counted and now: h=768, i=2048, 4 layers, vocab 1000,
batch 2 x 256, checkpointed 0.959 -> 1.003 (bf16 0.962 -> 1.002); h=512, i=2048, 2 layers, vocab 500, batch 1 x 128,
checkpointed 0.746 -> 1.000, without checkpointing 0.818 -> 1.000. Totals unchanged (0.993-1.000): the weight's
gradient was counted with the gradients formed at that moment; now it is counted among the activations there."""

from __future__ import annotations

import warnings

import pytest


def _config():
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", vocab_size=500, hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                                tie_word_embeddings=False)


@pytest.mark.parametrize("ckpt", [True, False], ids=["checkpointed", "plain"])
def test_down_proj_weight_gradient_moment_is_the_activations_peak(ckpt):
    from lowmem.memory.measure import measure_memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = measure_memory(_config(), optimizer="adamw", dtype="fp32", batch_size=1, seq_len=128, steps=1, device="cpu",
                           gradient_checkpointing=ckpt)
    assert r.estimate.activations == pytest.approx(r.measured["activations"], rel=0.01), r.table()
    assert r.estimate.total == pytest.approx(r.measured["total"], rel=0.01), r.table()


def test_down_proj_moment_only_with_a_trainable_down_proj():
    """The formula's recomputed layer: the ``down_proj`` moment replaces the gate and up moment's ``2 e i`` per token by
    ``e i`` per token and the weight's gradient; frozen (LoRA), the gate and up moment stays the larger."""
    from lowmem.memory.activations import llama_activation_bytes

    config = _config()
    tokens, e, i, h = 128, 4, config.intermediate_size, config.hidden_size
    frozen = llama_activation_bytes(config, 1, tokens, e, True)
    trained = llama_activation_bytes(config, 1, tokens, e, True, down_grad_bytes=4 * i * h)
    assert frozen["checkpoint_layer"] == frozen["checkpoint_layer_gates"] == trained["checkpoint_layer_gates"]
    assert trained["checkpoint_layer"] == frozen["checkpoint_layer"] - tokens * e * i + 4 * i * h
    plain = llama_activation_bytes(config, 1, tokens, e, False, down_grad_bytes=4 * i * h)
    # (both moments hold the layer's incoming gradient e h; the gate / up moment adds the product's when down_proj saved none)
    assert plain["last_layer_down_moment"] - plain["last_layer_moment"] == 4 * i * h - tokens * e * i
