"""Issue 12, session 13 (ESTRES): the estimator's last residuals, each component against the live tensors of real CPU
steps (``measure_memory``: torch's MemTracker, a dispatch mode that follows every storage; machine-independent)."""

from __future__ import annotations

import warnings

import pytest


def _measure(config, optimizer="adamw8bit", batch=1, seq=32, steps=2, **kw):
    from lowmem.memory.measure import measure_memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return measure_memory(config, optimizer, batch_size=batch, seq_len=seq, dtype="fp32", steps=steps, device="cpu",
                              **kw)


def _qwen2():
    from transformers import Qwen2Config

    # a vocabulary large beside the tokens: the output head's gradient is the largest, its step the peak
    return Qwen2Config(vocab_size=2000, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_layerwise_head_step_is_before_the_final_norm_backward(ckpt):
    """Layerwise with an untied head on the Llama formula: the head steps in its gradient's hook, which autograd runs
    (AccumulateGrad) before the final norm's backward, so the norm's float32 temporaries (12 B per token per hidden
    unit) are not live with the head's step. Qwen2 h=384, 4 layers, vocabulary 8000, 1 x 128 tokens, layerwise
    adamw8bit: 1.0053 of the measured peak before (over by 591,868 B: 589,824 of them these temporaries), 1.00002
    now (checkpointed: 1.0061 -> 1.00001)."""
    r = _measure(_qwen2(), gradient_checkpointing=ckpt, layerwise=True)
    est, tokens = r.estimate, 32
    fwd = est.details["forward_activations"]
    # the activations at the peak (the head's step): the estimate's moment, and what the measurement holds beside it:
    # the loss's int64 shifted labels and two scalars (8 B per token + 8), checkpointed also the int64 position ids
    gap = r.at_peak["activations"] - fwd
    assert 0 <= gap <= (16 if ckpt else 8) * tokens + 8, (gap, r.table())
    # the total never under; over by at most the batch inputs the measurement does not hold (16 B per token)
    assert 0 <= est.total - r.measured["total"] <= 16 * tokens, r.table()


def _qwen2_tied():
    return _qwen2().__class__(**{**_qwen2().to_dict(), "tie_word_embeddings": True, "vocab_size": 4000})


@pytest.mark.parametrize("accumulation", [2, 3])
def test_layerwise_accumulation_tied_moment_holds_the_kept_gradients_it_can(accumulation):
    """Layerwise with gradient accumulation and a tied embedding: the tied moment (three weight-sized temporaries W)
    holds the first micro-batch's other gradients, a middle one's every kept gradient, the last one's the embedding's
    kept gradient alone (the others stepped and freed: 4 W). The estimate had every kept gradient and the step's
    transient beside it: Qwen2 tied h=256, vocabulary 32000, 2 x (1 x 128), layerwise adamw8bit, 198,542,640 B for
    189,387,384 measured (1.048), 189,392,488 now; 3 micro-batches (adamw, a middle one's moment): 1.00003."""
    r = _measure(_qwen2_tied(), "adamw", layerwise=True, gradient_accumulation_steps=accumulation)
    est, tokens = r.estimate, 32
    weight = 4000 * 64 * 4
    # the measured peak is the tied moment: its three temporaries among the activations
    assert r.at_peak["activations"] >= 3 * weight, r.table()
    grads_then = weight if accumulation == 2 else est.gradients  # the last micro-batch's / a middle one's
    assert r.at_peak["gradients"] == grads_then, (r.at_peak, est.gradients)
    # never under; over by at most the micro-batches' inputs the measurement does not hold (16 B per token each, and
    # the ids of the micro-batches before the current one, 24 B per token)
    assert 0 <= est.total - r.measured["total"] <= (16 + 24) * tokens * accumulation, r.table()


def test_measure_refuses_a_bad_accumulation():
    from lowmem.memory.measure import measure_memory

    with pytest.raises(ValueError, match="gradient_accumulation_steps must be an int >= 1, got 0"):
        measure_memory(_qwen2(), "adamw", gradient_accumulation_steps=0, device="cpu")
