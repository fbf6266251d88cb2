"""SMALLS20B 1: the estimator quantizes the layers transformers' bitsandbytes loading quantizes.

``replace_with_bnb_linear`` replaces a module whose type is exactly ``nn.Linear`` or transformers' ``Conv1D`` (its
weight transposed), outside ``modules_to_not_convert``. The estimator took every ``isinstance(mod, nn.Linear)``: GPT-2's
``Conv1D`` layers, loaded 4-/8-bit, were sized full precision (weights 474,112 B for a real 130,048 B nf4 load), and
Falcon's ``FalconLinear`` layers, loaded full precision (the loader now refuses such a model), were sized quantized.
Now one rule (``estimate.bnb_quantizes``) for the estimator and ``lowmem.quant.check_some_layer_quantized``, and
``estimate_memory`` / ``lowmem budget`` refuse a quantization that quantizes nothing, as the loader does."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

LORA = {"r": 4, "target_modules": "all-linear"}


def _save(tmp_path_factory, name, build):
    import transformers

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build(transformers)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 (Conv1D c_attn / c_proj / c_fc / mlp.c_proj; lm_head tied to wte), built offline."""
    return _save(tmp_path_factory, "gpt2", lambda t: t.GPT2LMHeadModel(t.GPT2Config(
        n_embd=64, n_layer=2, n_head=2, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0)))


@pytest.fixture(scope="module")
def falcon_dir(tmp_path_factory):
    """A tiny Falcon (FalconLinear layers: subclasses of nn.Linear, which transformers does not quantize)."""
    return _save(tmp_path_factory, "falcon", lambda t: t.FalconForCausalLM(t.FalconConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=96, bos_token_id=0, eos_token_id=0)))


def _meta(path):
    from lowmem.memory.estimate import build_meta_model, resolve_config

    return build_meta_model(resolve_config(path), torch.float32)


def test_the_rule_is_transformers_own(gpt2_dir, falcon_dir):
    from transformers.pytorch_utils import Conv1D

    from lowmem.memory.estimate import bnb_quantizes, quantized_weight_ids

    class Sub(nn.Linear):
        pass

    assert bnb_quantizes(nn.Linear(2, 2)) and bnb_quantizes(Conv1D(2, 3))
    assert not bnb_quantizes(Sub(2, 2)) and not bnb_quantizes(nn.Embedding(2, 2))
    names = sorted(quantized_weight_ids(_meta(gpt2_dir)).values())
    assert names == [f"transformer.h.{i}.{leaf}" for i in range(2)
                     for leaf in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert quantized_weight_ids(_meta(falcon_dir)) == {}


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_gpt2_estimate_equals_the_quantized_load(gpt2_dir, quant):
    """Weights (parameters and buffers) and bitsandbytes' constants of the real CPU load, to the byte."""
    from lowmem.memory import estimate_memory
    from lowmem.memory.measure import live_bytes, quant_state_tensors
    from lowmem.quant import load_quantized_model, quantized_modules

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_quantized_model(gpt2_dir, quant, lora=LORA, dtype="float32", device="cpu")
        est = estimate_memory(gpt2_dir, quantization=quant, lora=LORA, dtype="float32", device="cpu")
    layers = quantized_modules(model)
    assert len(layers) == 8
    assert est.details["quantized_parameters"] == sum(m.weight.numel() for m in layers.values()) * (
        2 if quant != "int8" else 1) == 2 * 64 * (3 * 64 + 64 + 4 * 64 + 4 * 64)  # 4-bit: two codes a stored byte
    assert est.weights == live_bytes([*model.parameters(), *model.buffers()])
    assert est.quant_constants == sum(t.numel() * t.element_size() for t in quant_state_tensors(model)) > 0
    if quant == "int8":  # one float32 scale per output row: Conv1D's (in, out) weight transposed
        assert est.quant_constants == 4 * 2 * (3 * 64 + 64 + 4 * 64 + 64)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_estimate_refuses_a_quantization_that_quantizes_nothing(falcon_dir, quant):
    from lowmem.memory import estimate_memory

    with pytest.raises(ValueError) as err:
        estimate_memory(falcon_dir, quantization=quant, lora=LORA, dtype="float32")
    for word in (f"quantization={quant!r} would quantize no layer", "'falcon'", "FalconLinear", "Drop quantization"):
        assert word in str(err.value), (word, str(err.value))
    estimate_memory(falcon_dir, lora=LORA, dtype="float32")  # without quantization: estimated


def test_lowmem_budget_refuses_it_and_the_search_offers_no_quantized_candidate(falcon_dir, capsys):
    from lowmem.cli import main

    cpu = ["--device", "cpu", "--dtype", "fp32", "--seq-len", "16"]
    for extra in ([], ["--budget", "64MiB"]):
        assert main(["budget", falcon_dir, *cpu, "--lora-r", "4", "--quantization", "nf4", *extra]) == 2
        err = capsys.readouterr().err
        assert "quantization='nf4' would quantize no layer of this 'falcon' model" in err, err
    assert main(["budget", falcon_dir, *cpu, "--budget", "64MiB", "--lora-r", "4", "--json"]) == 0
    cands = json.loads(capsys.readouterr().out)["candidates"]
    assert cands and all(not c["settings"]["quantization"] for c in cands)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_gpt2_activations_run_bitsandbytes_stand_ins(gpt2_dir, quant):
    """The traced step runs the stand-ins of bitsandbytes' matmuls on GPT-2's Conv1D layers too (activations.kbit_linears:
    the same rule). Measured (LoRA r=4, fp32, 2 x 32 tokens, not checkpointed, CPU): activations 1.000 of the real step,
    totals 1.001 (before, the Conv1D layers ran as plain matmuls: activations 0.989 nf4, 0.938 int8; checkpointed
    0.978 / 0.747)."""
    from lowmem.memory.measure import measure_memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = measure_memory(gpt2_dir, "adamw", quantization=quant, lora=LORA, dtype="float32", seq_len=32, batch_size=2,
                           device="cpu")
    ratios = m.ratios()
    assert ratios["activations"] == pytest.approx(1.0, abs=0.005), ratios
    assert 1.0 <= ratios["total"] <= 1.005, ratios
