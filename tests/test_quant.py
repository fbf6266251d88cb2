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
    weights = live_bytes([*model.parameters(), *model.buffers()])  # the estimate's weights hold the buffers
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


@pytest.fixture(scope="module")
def tiny_qwen2_path(tmp_path_factory):
    """A tiny Qwen2 (biases on q/k/v, unlike Llama) with the kit's tokenizer, written with save_pretrained."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lowmem.kit import build_tokenizer

    tok = build_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    path = tmp_path_factory.mktemp("tiny-qwen2") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _qlora_grads(path, batch, evaluate_first: bool, dtype: str = "fp32"):
    torch.manual_seed(0)
    model = load_quantized_model(path, "nf4", lora=LORA, dtype=dtype, device="cpu", gradient_checkpointing=False)
    if evaluate_first:  # what `lowmem train` and Trainer(eval_on_start=True) do
        model.eval()
        with torch.no_grad():
            model(**batch)
        model.train()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_gradients_do_not_depend_on_an_evaluation_before(tiny_path, tiny_qwen2_path, tokenizer):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel in eval mode and then trains through a
    path without autograd (lost gradients on Llama, a crash with Qwen2's biases); lowmem.quant keeps the
    autograd path. In float32 the gradients are bitwise those of a model never evaluated."""
    ids, mask, labels = _batches(tokenizer, n=4, bs=4)[0]
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    for path in (tiny_path, tiny_qwen2_path):
        fresh = _qlora_grads(path, batch, evaluate_first=False)
        after_eval = _qlora_grads(path, batch, evaluate_first=True)
        for n in fresh:
            assert torch.equal(fresh[n], after_eval[n]), (path, n)


def test_qlora_on_qwen2_trains_after_evaluation(tiny_qwen2_path, tokenizer):
    """QLoRA on a Qwen2-style model (q/k/v biases) with an evaluation before training (issue 16)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = load_quantized_model(tiny_qwen2_path, "nf4", lora=LORA, dtype="bf16", device="cpu")
    assert len(quantized_modules(model)) == 14
    biases = [m for n, m in quantized_modules(model).items() if n.endswith(("q_proj.base_layer", "k_proj.base_layer", "v_proj.base_layer"))]
    assert len(biases) == 6 and all(m.bias is not None for m in biases)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = lowmem.create_optimizer(model, "adamw", lr=1e-2)
    batches = _batches(tokenizer, n=64, bs=16)
    ids, mask, labels = batches[0]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    model.train()
    losses = []
    for ids, mask, labels in batches * 2:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < before
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert len(changed) == len(trainable)  # every adapter moved, the first layer's too (its gradient is not lost)
    for m in quantized_modules(model).values():
        assert isinstance(m.weight, bnb.nn.Params4bit) and not getattr(m.weight.quant_state, "packing_format_for_cpu", False)


def test_keep_4bit_trainable_stops_packing_and_refuses_a_packed_model(tiny_qwen2_path):
    from transformers import AutoModelForCausalLM

    from lowmem.quant import keep_4bit_trainable_on_cpu

    def packed(model):
        return [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized_modules(model).values()]

    def evaluate(model):
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 5, 6]]))

    load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        tiny_qwen2_path, quantization_config=bnb_config("nf4"), device_map={"": "cpu"})
    model = load()
    assert keep_4bit_trainable_on_cpu(model) == 14
    evaluate(model)
    assert not any(packed(model))
    model = load()
    evaluate(model)
    if not any(packed(model)):
        pytest.skip("bitsandbytes does not pack 4-bit weights on this CPU (no AVX512-BF16)")
    with pytest.raises(ValueError, match="already packed"):
        keep_4bit_trainable_on_cpu(model)


def test_loading_causes_no_deprecation_noise(tiny_path):
    """peft's k-bit preparation called transformers' deprecated `gradient_checkpointing_enable` and read
    `is_gradient_checkpointing` (two FutureWarnings per load); checkpointing is still on, non-reentrant."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = load_quantized_model(tiny_path, "nf4", lora=LORA, dtype="bf16", device="cpu", gradient_checkpointing=True)
    base = model.get_base_model()
    assert base.is_activation_checkpointing
    assert any(p.requires_grad for p in model.parameters())


def test_lowmem_train_qlora_on_qwen2(tiny_qwen2_path, tmp_path):
    """`lowmem train` evaluates before training: the path that crashed at the first step on Qwen2 (issue 16)."""
    import json
    import math

    from lowmem.cli import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "run"
    assert main(["train", os.path.join(root, "configs", "qlora.yaml"), "--model", str(tiny_qwen2_path), "--steps", "4",
                 "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantization"] == "nf4" and math.isfinite(metrics["initial_loss"]) and math.isfinite(metrics["final_loss"])
