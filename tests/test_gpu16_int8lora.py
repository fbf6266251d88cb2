"""LLM.int8 base weights with LoRA on CUDA (session 16, written without a GPU; run by ``bash .ci/gpu_checks.sh``'s
``pytest:cuda`` check): :func:`lowmem.quant.load_quantized_model` with ``quantization="int8"`` puts every linear layer
of a tiny Llama in bitsandbytes' ``Linear8bitLt`` (CUDA: ``MatMul8bitLt``, the int8 matmul with fp16 outliers above the
threshold); LoRA adapters trained by lowmem's AdamW there must (a) leave the 8-bit weights bit for bit, (b) lower the
loss, and (c) get the first step's adapter gradients of the CPU load of the same weights within the int8 matmul's
activation rounding.

The model is built from a ``LlamaConfig`` and written with ``save_pretrained`` here, not by ``lowmem.kit`` (which imports
``datasets``, absent from the device image; tests/test_int8base_quant.py's CUDA test needs it). ``DEVICE``: a scratch run
with ``DEVICE = "cpu"`` is how the test was checked without a GPU."""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda"
LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
#: relative difference of the CUDA and CPU adapter gradients: the CUDA int8 matmul rounds the activations to int8 too
#: (a few percent); a layer left out of the LoRA path or a wrong scale is off by order 1
GRAD_TOL = 0.15

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("int8-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _load(path, device):
    from lowmem.quant import load_quantized_model

    torch.manual_seed(0)  # (LoRA's A initialised alike on both devices)
    model = load_quantized_model(path, "int8", lora=LORA, dtype="bf16", device=device, gradient_checkpointing=False)
    model.train()
    return model


def _batch(device):
    ids = torch.randint(3, 120, (4, 24), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "labels": ids}


def _int8_weights(model):
    return {n: m.weight.data.detach().clone() for n, m in model.named_modules()
            if type(m).__name__ == "Linear8bitLt"}


def _lora_grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def test_cuda_int8_base_lora_trains_and_matches_the_cpu_gradients(model_dir):
    from lowmem.optim import create_optimizer

    model = _load(model_dir, DEVICE)
    frozen = _int8_weights(model)
    assert frozen and all(w.dtype == torch.int8 for w in frozen.values())
    batch = _batch(DEVICE)
    # (c) the first step's adapter gradients against the CPU load's (B starts at zero: A's gradients are zero)
    grads = _lora_grads(model, batch)
    ref = _lora_grads(_load(model_dir, "cpu"), _batch("cpu"))
    assert grads.keys() == ref.keys() and any("lora_B" in n for n in grads)
    for n, g in grads.items():
        scale = ref[n].norm()
        if scale > 0:
            assert (g - ref[n]).norm() <= GRAD_TOL * scale, (n, float((g - ref[n]).norm() / scale))
    # (a), (b): 8 steps of lowmem's AdamW on the adapters
    opt = create_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for n, w in _int8_weights(model).items():
        assert torch.equal(w, frozen[n]), n
