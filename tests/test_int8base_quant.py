"""8-bit base weights (LLM.int8, bitsandbytes ``load_in_8bit``) with LoRA, beside 4-bit QLoRA: the settings
(``quantization: int8``), loading on the CPU, the estimator's pricing against the loaded model's tensors and against
``measure_memory``, the budget search's int8 candidates and ``lowmem budget --quantization int8``."""

import json
import math
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

from lowmem.memory import estimate_memory  # noqa: E402
from lowmem.memory.estimate import QUANT_TYPES, QuantSpec  # noqa: E402
from lowmem.memory.measure import live_bytes, quant_state_tensors  # noqa: E402
from lowmem.quant import bnb_config, load_quantized_model, quantized_modules  # noqa: E402

LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}


def test_int8_settings_parse_and_refuse_what_does_not_apply():
    from transformers import BitsAndBytesConfig

    assert QUANT_TYPES == ("nf4", "fp4", "int8")
    spec = QuantSpec.parse("int8")
    assert spec.is_int8 and spec.threshold == 6.0 and not spec.double_quant and spec.compute_dtype is None
    assert QuantSpec.parse("INT8") == spec
    assert QuantSpec.parse({"quant_type": "int8", "threshold": 4}).threshold == 4.0
    assert QuantSpec.parse(spec.as_dict()) == spec and spec.as_dict() == {"quant_type": "int8", "threshold": 6.0}
    assert QuantSpec.parse(BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=3.5)).threshold == 3.5
    assert not QuantSpec.parse("nf4").is_int8 and QuantSpec.parse("nf4").threshold is None
    cfg = bnb_config("int8")
    assert cfg.load_in_8bit and not cfg.load_in_4bit and cfg.llm_int8_threshold == 6.0
    assert bnb_config({"quant_type": "int8", "threshold": 0}).llm_int8_threshold == 0.0
    assert bnb_config("nf4").bnb_4bit_use_double_quant and not bnb_config("nf4", double_quant=False).bnb_4bit_use_double_quant
    # an unknown type lists the three
    with pytest.raises(ValueError, match=r"\['nf4', 'fp4', 'int8'\]"):
        QuantSpec.parse("int4")
    # 4-bit fields with int8 and the threshold with 4-bit: named
    for field, value in (("double_quant", True), ("compute_dtype", "bf16"), ("blocksize", 64)):
        with pytest.raises(ValueError, match=rf"\['{field}'\] do not apply to quant_type='int8'"):
            QuantSpec.parse({"quant_type": "int8", field: value})
    with pytest.raises(ValueError, match=r"\['threshold'\] do not apply to quant_type='nf4'"):
        QuantSpec.parse({"quant_type": "nf4", "threshold": 6.0})
    for bad in (-1, float("nan"), float("inf"), True, "6"):
        with pytest.raises(ValueError, match="threshold"):
            QuantSpec.parse({"quant_type": "int8", "threshold": bad})
    with pytest.raises(ValueError, match="llm_int8_has_fp16_weight"):
        QuantSpec.parse(BitsAndBytesConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True))
    with pytest.raises(ValueError, match="double_quant"):
        bnb_config("int8", double_quant=True)
    with pytest.raises(ValueError, match="rows"):
        spec.weight_bytes(64 * 64)


def test_train_recipe_accepts_int8_and_names_a_field_that_does_not_apply():
    from lowmem.train import TrainRecipe

    assert TrainRecipe(quantization="int8", steps=1).quantization == "int8"
    TrainRecipe(quantization={"quant_type": "int8", "threshold": 4.0}, steps=1)
    with pytest.raises(ValueError, match=r"\['double_quant'\] do not apply to quant_type='int8'"):
        TrainRecipe(quantization={"quant_type": "int8", "double_quant": True}, steps=1)
    with pytest.raises(ValueError, match="int8"):
        TrainRecipe(quantization="int4", steps=1)


@pytest.fixture(scope="module")
def int8_model(tiny_model_path):
    torch.manual_seed(0)
    return load_quantized_model(tiny_model_path, "int8", lora=LORA, dtype="bf16", device="cpu")


def test_loaded_int8_model_bytes_equal_the_estimate(tiny_model_path, int8_model):
    import bitsandbytes as bnb

    model = int8_model
    layers = quantized_modules(model)
    assert len(layers) == 14 and all(isinstance(m, bnb.nn.Linear8bitLt) for m in layers.values())  # not the head
    assert all(m.weight.dtype == torch.int8 and not m.weight.requires_grad for m in layers.values())
    scales = quant_state_tensors(model)
    assert len(scales) == 14 and all(t.dtype == torch.float32 for t in scales)
    est = estimate_memory(tiny_model_path, quantization="int8", lora=LORA, dtype="bf16")
    assert est.weights == live_bytes([*model.parameters(), *model.buffers()])
    assert est.quant_constants == sum(t.numel() * t.element_size() for t in scales) == 4 * sum(
        m.out_features for m in layers.values())
    assert est.details["quantized_parameters"] == sum(m.weight.numel() for m in layers.values())
    assert est.settings["quantization"] == {"quant_type": "int8", "threshold": 6.0}
    for m in layers.values():  # one weight at a time, as bitsandbytes stores it
        assert QuantSpec.parse("int8").weight_bytes(m.weight.numel(), m.weight.shape[0]) == (
            m.weight.numel() * m.weight.element_size(), m.weight.SCB.numel() * m.weight.SCB.element_size())
    # the first forward moves each SCB to its layer's state: still found
    model(input_ids=torch.tensor([[1, 5, 6, 7]]))
    assert all(m.weight.SCB is None for m in layers.values())
    assert sum(t.numel() for t in quant_state_tensors(model)) * 4 == est.quant_constants


def test_int8_between_no_quantization_and_nf4_on_a_named_shape():
    lora = {"r": 16, "target_modules": "all-linear"}
    # float32 (a bf16 model this small is smaller unquantized: k-bit preparation upcasts its large embeddings to float32)
    int8 = estimate_memory("llama-60m", "adamw", quantization="int8", lora=lora, dtype="fp32")
    nf4 = estimate_memory("llama-60m", "adamw", quantization="nf4", lora=lora, dtype="fp32")
    none = estimate_memory("llama-60m", "adamw", lora=lora, dtype="fp32")
    # per layer: q, k, v, o 512 x 512; gate, up 1376 x 512; down 512 x 1376; 8 layers
    numel = 8 * (4 * 512 * 512 + 3 * 1376 * 512)
    rows = 8 * (4 * 512 + 2 * 1376 + 512)
    assert int8.details["quantized_parameters"] == numel
    assert int8.quant_constants == 4 * rows
    # the rest (embeddings, head, norms) float32 after k-bit preparation, as for nf4; the quantized part 1 B/param
    assert int8.weights - numel == nf4.weights - numel // 2
    assert nf4.weights + nf4.quant_constants < int8.weights + int8.quant_constants < none.weights


def _grads(path, batch, evaluate_first):
    torch.manual_seed(0)
    model = load_quantized_model(path, "int8", lora=LORA, dtype="fp32", device="cpu", gradient_checkpointing=False)
    if evaluate_first:  # lowmem train evaluates before training: eval mode runs MatMul8bitLt (LLM.int8's int8 matmul)
        model.eval()
        with torch.no_grad():
            model(**batch)
    model.train()  # (from_pretrained returns the model in eval mode: MatMul8bitLt, not the CPU's training path)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_int8_adapters_get_gradients_and_an_evaluation_before_changes_nothing(tiny_model_path):
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = dict(input_ids=ids, labels=ids)
    fresh = _grads(tiny_model_path, batch, evaluate_first=False)
    after = _grads(tiny_model_path, batch, evaluate_first=True)
    assert fresh and all("lora_" in n for n in fresh)
    # every adapter's B gets a gradient (A's is zero while B starts at zero), the first layer's included
    assert all(g.abs().sum() > 0 for n, g in fresh.items() if "lora_B" in n)
    for n in fresh:
        assert torch.equal(fresh[n], after[n]), n


@pytest.mark.parametrize("checkpointing", [True, False])
def test_measured_int8_step_agrees_with_the_estimate(tiny_model_path, checkpointing):
    """Traced bytes (MemTracker: the tensors' sizes, machine-independent). With checkpointing the 8-bit layers' inputs,
    held by their autograd contexts (ctx.A), are live through the step: without them the estimate was 0.86 of the
    measured total."""
    from lowmem.memory.measure import measure_memory

    r = measure_memory(tiny_model_path, quantization="int8", lora=LORA, dtype="fp32", gradient_checkpointing=checkpointing,
                       device="cpu")
    ratios = r.ratios()
    for comp in ("weights", "quant_constants", "gradients", "optimizer_states"):
        assert ratios[comp] == pytest.approx(1.0, abs=0.05), comp
    assert r.measured["quant_constants"] == r.estimate.quant_constants == 4096
    assert ratios["activations"] == pytest.approx(1.0, abs=0.25)  # the 4-bit test's tolerance
    assert 0.98 <= ratios["total"] <= 1.10, ratios
    assert ("int8_held_inputs" in r.estimate.details["activation_parts"]) == checkpointing


def test_budget_search_has_int8_lora_candidates_between_none_and_nf4():
    from lowmem.memory.search import COSTS, search_budget

    found = search_budget("llama-60m", "8GiB", seq_len=256, dtype="fp32", batch_size=1, optimizers=["adamw"], lora_ranks=(16,),
                          checkpointing=(True,), full_finetuning=False, device="cuda")
    by_q = {c.settings["quantization"]: c for c in found}
    assert set(by_q) == {None, "int8", "nf4"}
    assert by_q[None].cost < by_q["int8"].cost < by_q["nf4"].cost
    assert by_q["int8"].cost - by_q[None].cost == COSTS["quantization_int8"]
    assert by_q["nf4"].total < by_q["int8"].total < by_q[None].total
    assert "int8 base weights" in by_q["int8"].gives_up


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    from lowmem.kit import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("int8-cli") / "model", seed=0))


def test_lowmem_budget_quantization_int8(cli_model, capsys):
    from lowmem.cli import main

    cpu = ["--device", "cpu", "--dtype", "fp32", "--seq-len", "32"]
    assert main(["budget", cli_model, *cpu, "--lora-r", "8", "--quantization", "int8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    est = estimate_memory(cli_model, quantization="int8", lora={"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
                          dtype="fp32", seq_len=32, device="cpu")
    assert out["settings"]["quantization"] == {"quant_type": "int8", "threshold": 6.0}
    assert out["quant_constants"] == est.quant_constants > 0 and out["weights"] == est.weights
    assert main(["budget", cli_model, *cpu, "--budget", "3MiB", "--lora-r", "8", "--quantization", "int8", "--json"]) == 0
    cands = json.loads(capsys.readouterr().out)["candidates"]
    assert cands and all(c["settings"]["quantization"] == "int8" for c in cands)
    assert main(["budget", cli_model, *cpu, "--lora-r", "8", "--quantization", "int8", "--no-double-quant"]) == 2
    assert "--no-double-quant" in capsys.readouterr().err


@pytest.mark.slow
def test_lowmem_train_int8_saves_loadable_adapters_and_merges(tiny_model_path, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from lowmem.cli import main

    recipe = tmp_path / "int8.yaml"
    out = tmp_path / "run"
    recipe.write_text("trainer: sft\nquantization: int8\nlora: {r: 8, lora_alpha: 16, target_modules: all-linear}\n"
                      f"optim: adamw\nlr: 0.01\nsteps: 4\nbatch_size: 8\nseed: 0\nmerge_adapters: true\noutput_dir: {out}\n")
    assert main(["train", str(recipe), "--model", str(tiny_model_path)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantization"] == "int8" and math.isfinite(metrics["final_loss"])
    assert metrics["final_loss"] < metrics["initial_loss"]
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    adapted = AutoPeftModelForCausalLM.from_pretrained(out)  # the base as saved, in full precision
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not quantized_modules(merged)  # merged into the base reloaded in dtype, not in 8 bits
    with torch.no_grad():
        a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained (B starts at zero)


@pytest.mark.cuda
def test_int8_on_cuda_measured_close_to_estimate(tiny_model_path):
    """CUDA: MatMul8bitLt (LLM.int8's int8 matmul) in training; its inputs held in ctx.tensors as on the CPU."""
    from lowmem.memory.measure import measure_memory

    for ckpt in (True, False):
        r = measure_memory(tiny_model_path, quantization="int8", lora=LORA, dtype="bf16", gradient_checkpointing=ckpt,
                           device="cuda")
        ratios = r.ratios()
        for comp in ("weights", "quant_constants", "gradients", "optimizer_states"):
            assert ratios[comp] == pytest.approx(1.0, abs=0.05), (ckpt, comp)
        assert ratios["activations"] == pytest.approx(1.0, abs=0.25), ckpt


def test_docs_state_the_int8_cost_and_the_accepted_names():
    import re

    from lowmem.memory.search import COSTS

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    memory = " ".join(open(os.path.join(root, "docs", "memory.md")).read().split())
    cost = float(re.search(r"int8 base weights ([\d.]+), 4-bit weights", memory).group(1))
    assert cost == COSTS["quantization_int8"] and float(re.search(r"\(cost ([\d.]+), nf4", memory).group(1)) == cost
    training = open(os.path.join(root, "docs", "training.md")).read()
    row = next(line for line in training.splitlines() if line.startswith("| `quantization` |"))
    assert "error listing `" + "`, `".join(QUANT_TYPES) + "`" in row


@pytest.fixture(scope="module")
def other_arch_dirs(tmp_path_factory):
    """A tiny GPT-NeoX (traced activations: fused query_key_value, parallel attention and MLP inputs) and a tiny Phi3
    (fused qkv_proj and gate_up_proj), random weights written with save_pretrained."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Phi3Config, Phi3ForCausalLM

    out = {}
    for name, cls, cfg in (
        ("gpt_neox", GPTNeoXForCausalLM, GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                                       num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=False)),
        ("phi3", Phi3ForCausalLM, Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                             tie_word_embeddings=False, pad_token_id=0)),
    ):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name) / "model"
        cls(cfg).save_pretrained(path)
        out[name] = str(path)
    return out


@pytest.mark.parametrize("arch, per_token_per_layer", [
    ("gpt_neox", 64 + 64 + 64 + 256),  # query_key_value, dense, dense_h_to_4h (h), dense_4h_to_h (4h)
    ("phi3", 64 + 64 + 64 + 128),  # qkv_proj, o_proj, gate_up_proj (h), down_proj (i)
])
def test_int8_held_inputs_on_other_architectures(other_arch_dirs, arch, per_token_per_layer):
    """The held inputs by module name beyond the Llama formula (one per quantized linear but q/k/v and gate/up),
    measured: GPT-NeoX int8 checkpointed total 1.032 (nf4 1.044), Phi3 1.046 (nf4 1.059)."""
    from lowmem.memory.measure import measure_memory

    r = measure_memory(other_arch_dirs[arch], quantization="int8", lora=LORA, dtype="fp32", gradient_checkpointing=True,
                       device="cpu", batch_size=2, seq_len=64)
    assert r.estimate.details["activation_parts"]["int8_held_inputs"] == 2 * 64 * 2 * per_token_per_layer * 4
    ratios = r.ratios()
    assert ratios["weights"] == ratios["quant_constants"] == 1.0
    assert 0.98 <= ratios["total"] <= 1.10, ratios


def test_estimate_table_names_the_base_weights_bits():
    """The estimate's footer says 8-bit for an int8 base, 4-bit for nf4 (FOUND_INT8BASE 8)."""
    from lowmem.kit import build_tiny_model
    from lowmem.memory import estimate_memory

    config = build_tiny_model(seed=0)[0].config
    lora = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    for q, word in (("int8", "8-bit"), ("nf4", "4-bit")):
        e = estimate_memory(config, optimizer="adamw", batch_size=1, seq_len=8, dtype="fp32", device="cpu",
                            quantization=q, lora=lora)
        footer = [line for line in e.table().splitlines() if line.startswith("parameters ")]
        assert footer and f", {word} " in footer[0], (q, footer)


def test_foreign_keys_point_8bit_users_at_int8():
    """A pasted LLaMA-Factory / HF key ``load_in_8bit`` / ``quantization_bit`` names ``quantization: int8`` (FOUND_INT8BASE 1)."""
    from lowmem.train import FOREIGN_KEYS

    assert FOREIGN_KEYS["load_in_8bit"] == "quantization: int8"
    assert "int8" in FOREIGN_KEYS["quantization_bit"] and "nf4" in FOREIGN_KEYS["quantization_bit"]
