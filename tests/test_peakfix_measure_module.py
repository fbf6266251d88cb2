"""PEAKFIX (session 18, AUDIT-PEAK18 1-3): measure_memory of a user's module estimates that module in its own dtype
(refusing a different ``dtype=``), and the layerwise-with-accumulation peak counts the loss's moment with every kept
gradient but no step (``peak_total``'s ``gradients_with_activations`` in its layerwise branch)."""

from __future__ import annotations

import pytest
import torch


def test_measure_memory_refuses_a_dtype_the_module_does_not_hold():
    """The module is measured as is (not cast): ``dtype="fp32"`` given with a bfloat16 module was an estimate of
    float32 weights beside a bfloat16 run (1.281 of its peak); now a ValueError naming ``dtype`` and the module's, raised
    before any step runs."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lowmem.memory.measure import _module_dtype, measure_memory

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"dtype='fp32'.*bfloat16"):
        measure_memory(model, "adamw", dtype="fp32", steps=1, device="cpu")
    assert _module_dtype(model, None) == torch.bfloat16
    assert _module_dtype(model, "bf16") == torch.bfloat16
    # a peft-like module: float32 adapters on a bfloat16 base (most of the elements): the base's dtype
    model.lm_head.extra = torch.nn.Parameter(torch.zeros(8, dtype=torch.float32))
    assert _module_dtype(model, None) == torch.bfloat16


def test_layerwise_loss_moment_holds_the_kept_gradients_not_the_step():
    """``peak_total``, layerwise with ``forward_activations`` (the step moments' activations): the loss's moment is the
    activations' peak with ``gradients_with_activations`` (every kept gradient with accumulation; none without), the
    step moment its own activations with every gradient and the transient. Numbers: rest 1,000 (weights) + gradients
    300; activations 2,000 at the loss's moment, 500 at the step's; transient 900."""
    from lowmem.memory.estimate import peak_total

    comps = {"weights": 1000, "gradients": 300, "optimizer_states": 0, "activations": 2000, "optimizer_transient": 900}
    # accumulating: loss moment 1000 + 300 + 2000 = 3300; step moment 1000 + 300 + 500 + 900 = 2700
    assert peak_total(comps, layerwise=True, forward_activations=500, gradients_with_activations=300) == 3300
    # not accumulating: the loss's moment has no gradient (the largest step's moment: 2700)
    assert peak_total(comps, layerwise=True, forward_activations=500) == 3000
    # a step moment with more activations than the loss's moment's gradients make up for
    assert peak_total(comps, layerwise=True, forward_activations=1900, gradients_with_activations=300) == 4100
