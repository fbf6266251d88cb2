"""Layerwise mode's total (issue 12): each parameter steps in its gradient hook and frees its gradient, so at the
activations' peak (the loss's moment) no gradient is live, and a step's gradient and transient are live with the
activations of a later moment (the output head's step right after the loss's, the decoder layers' later). Counting
the largest gradient and transient on top of the activations' peak put GPT-NeoX and Llama at 1.14-1.17 and Mixtral at
1.11-1.13 of the measured peak (fp32, 2 x 48 tokens, adamw); now 1.000-1.001 (Mixtral 1.018 / 1.080; what is left,
bf16 and Mixtral's checkpointed step, is the optimizers' per-parameter step transient, over-reported)."""

from __future__ import annotations

import warnings

import pytest

from lowmem.memory.estimate import peak_total


def test_layerwise_total_counts_a_step_with_the_later_activations_not_the_peak():
    c = {"weights": 100, "quant_constants": 0, "gradients": 10, "optimizer_states": 200, "activations": 50,
         "optimizer_transient": 20}
    # the activations' peak (no gradient) against a step with the later moment's activations (15 + 10 + 20)
    assert peak_total(c, layerwise=True, forward_activations=15) == 300 + 50
    # a step with the later activations the larger: gradient and transient with them
    assert peak_total(c, layerwise=True, forward_activations=30) == 300 + 30 + 10 + 20
    # the input embedding's step (every activation freed): its gradient and transient
    assert peak_total({**c, "activations": 5}, layerwise=True, forward_activations=0, transient_with_activations=1) == 300 + 30
    # without the later moments' activations (TRL's fused-head formula): everything with the activations
    assert peak_total(c, layerwise=True) == 310 + 50 + 20


def _config(name: str):
    from transformers import AutoConfig

    c = dict(vocab_size=2000, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)
    if name == "llama":
        return AutoConfig.for_model("llama", num_key_value_heads=2, tie_word_embeddings=False, **c)
    if name == "mixtral":
        return AutoConfig.for_model("mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                    tie_word_embeddings=False, **c)
    return AutoConfig.for_model(name, **c)


def _measured(name, ckpt):
    from lowmem.memory.measure import measure_memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return measure_memory(_config(name), optimizer="adamw", dtype="fp32", batch_size=2, seq_len=48, steps=2,
                              device="cpu", gradient_checkpointing=ckpt, layerwise=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gpt_neox"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_layerwise_total_against_a_measured_step(name, ckpt):
    """fp32, 2 x 48 tokens, adamw: the Llama formula and the traced step (GPT-NeoX), with and without checkpointing.
    Before: 1.138 / 1.158 (Llama), 1.151 / 1.166 (GPT-NeoX); now 1.001 / 1.001, 1.000 / 1.000."""
    r = _measured(name, ckpt)
    assert r.estimate.total == pytest.approx(r.measured["total"], rel=0.02), r.table()
    assert r.estimate.total >= r.measured["total"] - 16 * 1024, r.table()


@pytest.mark.slow
def test_layerwise_moe_steps_at_each_gradients_accumulation():
    """Mixtral (fp32, no checkpointing): an expert weight's gradient is formed, then accumulated and stepped; the
    layers' steps count the activations at the accumulation (traced "accumulate" rows), not the most live after the
    first gradient, which held that gradient being formed (counted twice): 1.053 -> 1.018."""
    r = _measured("mixtral", False)
    assert r.estimate.total == pytest.approx(r.measured["total"], rel=0.03), r.table()
    assert r.estimate.total >= r.measured["total"] - 16 * 1024, r.table()
