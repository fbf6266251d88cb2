"""``estimate_memory(model_instance)`` sizes the instance's own parameters (their dtypes, frozen / trainable flags,
LoRA adapters, bitsandbytes' packed 4-bit weights and their constants), not what its ``.config`` would build: the
weights, gradients and optimizer state equal a count of the instance's tensors (meta / tensor counts: exact)."""

from __future__ import annotations

import pytest
import torch

import lowmem
from lowmem.kit import build_tiny_model
from lowmem.optim import create_optimizer


def _count(model):
    """(weights and buffers, gradients) of ``model``'s tensors, each storage once (tied weights once)."""
    params = {id(p): p for p in model.parameters()}.values()
    buffers = {id(b): b for b in model.buffers()}.values()
    weights = sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size() for b in buffers)
    return weights, sum(p.numel() * p.element_size() for p in params if p.requires_grad)


def _mixed_tiny(peft: bool):
    """The tiny Llama in bfloat16 (its rotary table too), its embedding frozen, its first MLP float32; with ``peft``
    wrapped in a LoRA adapter (r=4 on q_proj / v_proj)."""
    model, _ = build_tiny_model(seed=0)
    model = model.to(torch.bfloat16)
    model.get_input_embeddings().weight.requires_grad_(False)
    model.model.layers[0].mlp.float()
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return model


@pytest.mark.parametrize("peft", [False, True])
def test_instance_weights_gradients_and_state_are_its_own(peft):
    """Plain: weights 215,968 B (333,632 from the config in float32 before), gradients 206,592 (333,568: the frozen
    embedding and the bfloat16 weights), AdamW state 629,840 (667,220); the LoRA wrap: weights 223,136 (340,800 before),
    gradients 7,168 and state 14,368 (the adapters, as before). Notes say the dtypes and the frozen tensors."""
    model = _mixed_tiny(peft)
    est = lowmem.estimate_memory(model, "adamw", batch_size=1, seq_len=8, device="cpu", dtype="fp32")
    opt = create_optimizer(model, "adamw")
    opt.materialize_state()
    weights, gradients = _count(model)
    assert (est.weights, est.gradients, est.optimizer_states) == (weights, gradients, opt.state_bytes())
    assert est.details["trainable_parameters"] == sum(p.numel() for p in {id(p): p for p in model.parameters()
                                                                          if p.requires_grad}.values())
    text = " ".join(est.notes)
    assert "holds bfloat16, float32 parameters: sized in their own dtypes" in text
    assert ("frozen" in text) is (not peft)  # (a peft model's frozen base is its adapter's sizing)


def test_a_config_or_a_name_is_sized_as_before():
    """Not an instance: the config's model in ``dtype=`` (the built model's count), every parameter trained."""
    model, _ = build_tiny_model(seed=0)
    est = lowmem.estimate_memory(model.config, "adamw", batch_size=1, seq_len=8, device="cpu", dtype="bf16")
    model = model.to(torch.bfloat16)
    weights, gradients = _count(model)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # (cast by .to; the config's keep float32)
    assert (est.weights - est.details["buffer_bytes"], est.gradients) == (weights - buffers, gradients)
    assert not any("model given" in n for n in est.notes)


@pytest.mark.slow  # (builds, saves and reloads a 4-bit tiny Llama: ~3 s)
def test_a_loaded_4bit_peft_model_is_sized_from_its_tensors():
    """A tiny Llama loaded in nf4 (bitsandbytes, CPU) with a LoRA adapter on every linear: its config's
    ``quantization_config`` (transformers' enum ``quant_method``) is bitsandbytes' (refused before 2026-12-01: 'not
    bitsandbytes'); the weights (packed 4-bit and the rest), the quantization constants and the adapters' gradients
    equal the instance's tensors (108,352 / 16,496 / 32,768 B)."""
    from lowmem.memory.measure import _build_model, quant_state_tensors

    model, _ = _build_model("tiny", torch.float32, "nf4", {"r": 4, "target_modules": "all-linear"}, False, "cpu", 0)
    est = lowmem.estimate_memory(model, "adamw", batch_size=1, seq_len=8, device="cpu", dtype="fp32")
    weights, gradients = _count(model)
    constants = sum(t.numel() * t.element_size() for t in quant_state_tensors(model))
    assert (est.weights, est.quant_constants, est.gradients) == (weights, constants, gradients)


def test_measure_memory_of_an_instance_estimates_the_instance():
    """``measure_memory`` of an instance (used as is) estimates that instance: the measured weights, gradients and
    optimizer state (MemTracker's labels) equal the estimate's (before: the config's float32 model, every parameter
    trained)."""
    from lowmem.memory.measure import measure_memory

    model, _ = build_tiny_model(seed=0)
    model = model.to(torch.bfloat16)  # (runnable: one dtype)
    model.get_input_embeddings().weight.requires_grad_(False)
    got = measure_memory(model, optimizer="adamw", steps=1, seq_len=8, device="cpu")  # (dtype=None: its own, bfloat16)
    for c in ("weights", "gradients", "optimizer_states"):
        assert got.measured[c] == getattr(got.estimate, c), (c, got.measured[c], getattr(got.estimate, c))
