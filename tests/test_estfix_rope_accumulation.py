"""Issue 12, session 14 (ESTFIX): the estimator's components against the live tensors of real CPU steps
(``measure_memory``: torch's MemTracker, a dispatch mode that follows every storage; machine-independent).

* RoPE at batch > 1: transformers builds the rotary cos / sin from ``position_ids = arange(s)[None]``, ``(1, s)``
  whatever the batch, unless the collator passes position ids (TRL's padding-free batch: one row of ``b s`` tokens,
  ids per token). The estimate counted ``2 b s d e``: over by ``(b - 1) 2 s d e`` (tiny Qwen2 2 x 32: 4,096 B; 4 x 32:
  12,288 B, the activations' maximum over its measurement by that less the loss's labels).
* Gradient accumulation: a later micro-batch forms each gradient as a new tensor beside the kept ``.grad`` (the
  tracker labels it a gradient): the gradients' maximum is ``gradients + details["gradients_accumulating"]``; a tied
  embedding's three temporaries with every kept gradient were counted as two (the total 416,908 B under).
"""

from __future__ import annotations

import warnings

import pytest


def _config(kind="qwen2", tie=False, vocab=2000):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[kind]
    return cls(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)


def _measure(config, optimizer="adamw", batch=1, seq=32, steps=2, **kw):
    from lowmem.memory.measure import measure_memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return measure_memory(config, optimizer, batch_size=batch, seq_len=seq, dtype="fp32", steps=steps, device="cpu",
                              **kw)


HEAD_DIM, SEQ = 16, 32


@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_rope_tables_are_shared_by_the_batch(kind, batch):
    """Default position ids (1, s): one cos / sin pair of s rows whatever the batch. The activations' maximum equals
    the measured one but for the loss's int64 shifted labels and two scalars (8 B per token + 8), which the estimate
    does not hold; before, at b = 2 / 4 it was over by 4,096 / 12,288 B less those."""
    r = _measure(_config(kind), batch=batch, steps=1)
    est, tokens = r.estimate, batch * SEQ
    assert est.details["activation_parts"]["rope"] == 2 * SEQ * HEAD_DIM * 4
    gap = r.measured["activations"] - est.activations
    assert 0 <= gap <= 8 * tokens + 8, (gap, r.table())


@pytest.mark.parametrize("batch", [2, 4])
def test_padding_free_rope_tables_are_per_token(batch):
    """TRL's padding-free batch (one row of b s tokens, position ids restarting at each sequence): the rotary tables
    are per token, and so is the estimate with ``padding_free=True``. (With checkpointing on CPU's sdpa transformers
    also builds a (b s)^2 bool block mask, which the flash kernels TRL requires for padding-free do not: not here.)"""
    r = _measure(_config("qwen2"), batch=batch, steps=1, padding_free=True)
    est, tokens = r.estimate, batch * SEQ
    assert est.details["activation_parts"]["rope"] == 2 * tokens * HEAD_DIM * 4
    assert est.settings["padding_free"] is True
    gap = r.measured["activations"] - est.activations
    assert 0 <= gap <= 8 * tokens + 8, (gap, r.table())


def test_padding_free_is_checked():
    from lowmem.memory import estimate_memory

    with pytest.raises(ValueError, match="Invalid padding_free='yes': expected True or False"):
        estimate_memory(_config(), batch_size=2, seq_len=32, padding_free="yes")
    with pytest.raises(ValueError, match=r"padding_free=True is modelled for .* not trainer='dpo'"):
        estimate_memory(_config(), batch_size=2, seq_len=32, padding_free=True, trainer="dpo")
    from lowmem.memory.measure import measure_memory

    with pytest.raises(ValueError, match="padding_free must be True or False"):
        measure_memory(_config(), "adamw", padding_free=1, device="cpu")


@pytest.mark.parametrize("accumulation", [2, 3])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_accumulation_gradients_and_total(tie, accumulation):
    """A later micro-batch's gradient (the largest: the embedding's or the head's, V x h) is a new tensor beside the
    kept ``.grad`` until AccumulateGrad adds it: the gradients' measured maximum is the kept gradients and it. The
    total never under, over by at most the micro-batches' inputs the measurement does not hold; a tied head's moment
    (three weight-sized temporaries with every kept gradient) was counted as two: 416,908 B under before."""
    r = _measure(_config(tie=tie), gradient_accumulation_steps=accumulation)
    est, tokens = r.estimate, SEQ
    weight = 2000 * 64 * 4
    assert est.details["gradients_accumulating"] == weight
    assert r.measured["gradients"] == est.gradients + weight, r.table()
    assert 0 <= est.total - r.measured["total"] <= 24 * tokens * accumulation, r.table()


def test_accumulation_embedding_moment_in_the_peak():
    """Gradient accumulation (every gradient kept): the untied embedding's backward, with a later micro-batch's embedding
    gradient being added to the kept one, is a moment of its own beside the activations' and the step's."""
    from lowmem.memory.estimate import peak_total
    from lowmem.memory.report import peak_stack

    comps = dict(weights=100, quant_constants=0, gradients=50, optimizer_states=200, activations=30, optimizer_transient=20)
    assert peak_total(comps, embedding_backward=70) == 100 + 50 + 200 + 70
    assert peak_total(comps, embedding_backward=10) == 100 + 50 + 200 + 30
    stack = peak_stack(comps, embedding_backward=70)
    assert sum(stack.values()) == 100 + 50 + 200 + 70 and stack["activations"] == 70
