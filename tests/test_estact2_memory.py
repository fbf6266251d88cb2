"""Issue 12, session 13 (ESTACT): each component of the estimate against the live tensors of real CPU steps
(``measure_memory``: torch's MemTracker, a dispatch mode that follows every storage; machine-independent)."""

from __future__ import annotations

import warnings

import pytest


def _measure(config, optimizer="adafactor", batch=1, seq=32, steps=1, **kw):
    from lowmem.memory.measure import measure_memory

    oa = {"lr": 1e-3, "relative_step": False} if optimizer == "adafactor" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return measure_memory(config, optimizer, optim_args=oa, batch_size=batch, seq_len=seq, dtype="fp32", steps=steps,
                              device="cpu", **kw)


def test_llama_formula_counts_the_head_weight_gradient_being_formed():
    """Few tokens beside the vocabulary's rows: the activations' maximum is the output head's backward, its weight's
    gradient (V h) being formed by ``mm`` beside the logits' gradient and its input's, before autograd hands it to
    ``.grad`` (MemTracker labels it a temporary until then). Qwen2 h=384, vocabulary 8000, 1 x 128 tokens: activations
    estimate / measured 28,164,608 / 32,458,248 B (0.868) before, 32,457,216 (1.000) with the head's moment; the total
    was already exact (the moment holds no gradient)."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=2000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    r = _measure(config, seq=16)
    parts = r.estimate.details["activation_parts"]
    assert parts["head_backward"] > 0  # the head's moment is the activations' maximum at this shape
    # the measured maximum also holds the loss's int64 shifted labels and two scalars (8 B per token + 8)
    assert 0 <= r.measured["activations"] - r.estimate.activations <= 8 * 16 + 8, r.table()
    assert r.estimate.total >= r.measured["total"], r.table()


def _gemma2_tied():
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=2000, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=16,
                        tie_word_embeddings=True)


@pytest.mark.parametrize("optimizer", ["microadam", "adamw"])
def test_layerwise_tied_head_peak_is_the_traced_gradient_moment(optimizer):
    """Layerwise with a tied head on a traced architecture: the peak is a moment of the traced step (a gradient
    complete, its parameter's step, the activations then), as without a tie. The estimate took the forward's saved
    tensors with the largest later gradient instead: Gemma2 h=384, 4 layers, vocabulary 8000, 1 x 128 tokens,
    layerwise microadam 91,874,248 B for 86,981,412 measured (1.056) -> 86,986,692 (1.0001), adamw 153,636,820 for
    152,256,456 (1.009) -> 152,259,524; GPT-2 adamw8bit 151,030,852 for 150,632,512 (1.003) -> 150,635,584. And the
    activations' maximum of a short sequence (GPT-2 h=384 1 x 32 layerwise adamw: 24,576,000 B estimated for 36,864,264
    measured, 0.667, before; 36,864,000 now)."""
    r = _measure(_gemma2_tied(), optimizer, seq=32, layerwise=True)
    assert r.estimate.details["forward_activations"] is not None
    # never under; over by at most the batch inputs the measurement does not hold (16 B per token) and the step
    # transient's bound (microadam: a few KiB)
    assert 0 <= r.estimate.total - r.measured["total"] <= 16 * 32 + 4096, r.table()
    # the activations' maximum, a short sequence's: the tied moment's three weight-sized temporaries (the head's
    # contribution, the embedding's, their sum before it is accumulated), and 264 B of scalars and ids (measured)
    assert 0 <= r.measured["activations"] - r.estimate.activations <= 512, r.table()


def test_fused_adamw_step_count_is_kept_with_the_activations():
    """torch's fused AdamW kernel reads the step count from a float32 0-d tensor per device that the step makes and
    ``lowmem.optim.functional.adam._step_tensor`` keeps to the next step: live at the second step's activations' peak,
    labelled optimizer memory there (4 B above the state). Mamba2 (h=64, 2 layers), AdamW fp32, 1 x 64 tokens, two
    steps: estimate - measured total +1,532 B before (the batch inputs less those 4 B), +1,536 now (Falcon-Mamba 2 x 64:
    +3,068 -> +3,072): the batch inputs
    (24 B per token) exactly, every other byte counted."""
    from transformers import Mamba2Config

    config = Mamba2Config(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=32, state_size=8,
                          n_groups=1, chunk_size=16)
    r = _measure(config, "adamw", seq=64, steps=2)
    kept = r.estimate.details["optimizer_kept_step_count"]
    assert kept == 4  # one float32 scalar on the one device
    assert r.at_peak["optimizer_states"] - r.estimate.optimizer_states == kept, r.table()
    # the estimate counts the Trainer's three int64 tensors per token; the measurement holds its ids, which the trace
    # counts among the activations
    assert r.estimate.total - r.measured["total"] == r.estimate.details["batch_input_bytes"], r.table()


def test_tied_moment_activations_without_layerwise():
    """A tied head, a short sequence, no layerwise: the activations' maximum is the tied moment (the head's and the
    embedding's contributions and their sum before accumulation, three weight-sized temporaries), whose gradients the
    backward's moment gives up; the total is unchanged. GPT-2 h=384 tied 1 x 32 adamw activations 24,576,000 B for
    36,864,264 measured (0.667) -> 36,864,000; total 250,381,364 / 250,380,860 before and after."""
    r = _measure(_gemma2_tied(), "adamw", seq=32)
    assert 0 <= r.measured["activations"] - r.estimate.activations <= 512, r.table()
    assert 0 <= r.estimate.total - r.measured["total"] <= 16 * 32 + 64, r.table()
