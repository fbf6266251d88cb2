"""QLoRA on CPU: 4-bit loading through transformers + bitsandbytes, k-bit preparation, LoRA, lowmem optimizers."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lowmem
from lowmem.kit import save_tiny_model, sft_dataset, tokenize_sft
from lowmem.memory import estimate_memory
from lowmem.memory.measure import live_bytes, quant_state_tensors
from lowmem.quant import bnb_config, load_quantized_model, quantized_modules

LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _batches(tok, n=64, bs=16):
    data = tokenize_sft(sft_dataset(n, seed=1), tok)
    ids = torch.tensor(data["input_ids"])
    labels = torch.tensor(data["labels"])
    mask = torch.tensor(data["attention_mask"])
    return [(ids[i : i + bs], mask[i : i + bs], labels[i : i + bs]) for i in range(0, n, bs)]


@pytest.mark.parametrize("optimizer", ["adamw", "bnb_adamw8bit"])
def test_qlora_trains_only_adapters_and_stays_quantized(tiny_path, optimizer):
    import bitsandbytes as bnb
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    torch.manual_seed(0)  # LoRA's A matrices are initialised from the global RNG
    model = load_quantized_model(tiny_path, "nf4", lora=LORA, dtype="bf16", device="cpu")
    q_before = {n: m.weight.data.clone() for n, m in quantized_modules(model).items()}
    assert len(q_before) == 14  # 7 linears x 2 layers; the output head stays unquantized
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = lowmem.create_optimizer(model, optimizer, lr=1e-2)
    batches = _batches(tok)
    model.train()
    losses = []
    for epoch in range(20):
        for ids, mask, labels in batches:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.3, (first, last)  # a random base model: adapters alone take it from ln(73) to ~3.6
    print(f"{optimizer}: loss {first:.3f} -> {last:.3f}")
    for n, m in quantized_modules(model).items():
        assert isinstance(m.weight, bnb.nn.Params4bit) and m.weight.dtype == torch.uint8
        assert torch.equal(m.weight.data, q_before[n]), n
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert len(changed) >= len(trainable) // 2  # lora_B starts at zero; both A and B move once B is non-zero


@pytest.mark.parametrize("quant", [("nf4", True), ("fp4", False)])
def test_loaded_quantized_model_matches_estimate_bytes(tiny_path, quant):
    qt, dq = quant
    model = load_quantized_model(tiny_path, qt, double_quant=dq, lora=LORA, dtype="bf16", device="cpu")
    weights = live_bytes(p for p in model.parameters())
    constants = sum(t.numel() * t.element_size() for t in quant_state_tensors(model))
    est = estimate_memory(tiny_path, quantization={"quant_type": qt, "double_quant": dq}, lora=LORA, dtype="bf16")
    assert est.weights == weights
    assert est.quant_constants == constants
    assert est.details["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # peft's k-bit preparation upcasts every non-4-bit parameter to float32
    assert {p.dtype for p in model.parameters()} == {torch.uint8, torch.float32}


def test_bnb_config_and_errors(tiny_path, tmp_path):
    cfg = bnb_config("fp4", double_quant=False, compute_dtype="fp32")
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "fp4" and not cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.float32
    with pytest.raises(ValueError, match="nf4"):
        bnb_config("int4")
    with pytest.raises(FileNotFoundError):
        load_quantized_model(tmp_path / "missing")


def test_measured_qlora_close_to_estimate(tiny_path):
    from lowmem.memory.measure import measure_memory

    r = measure_memory(tiny_path, quantization="nf4", lora=LORA, dtype="bf16", gradient_checkpointing=True, device="cpu")
    ratios = r.ratios()
    for comp in ("weights", "quant_constants", "gradients", "optimizer_states"):
        assert ratios[comp] == pytest.approx(1.0, abs=0.05), comp
    assert ratios["activations"] == pytest.approx(1.0, abs=0.25)
