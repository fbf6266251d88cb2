"""The int8 base's backward moments without checkpointing (issue 12: never say a run fits when it does not).

bitsandbytes' 8-bit matmul keeps its input in its autograd context (``MatMul8bitFp``: ``ctx.A``) to the end of the
backward pass, also when a LoRA adapter saves the same tensor (then the activations count it, freed at the adapter's
backward). So after a layer's ``down_proj`` backward its input is still live: tiny Llama int8, LoRA r=8 all-linear,
4 x 96 tokens, no checkpointing, the peak is there (the input's gradient summed from the base and adapter branches,
3 e i + e h per token, beside the layer's tensors and that input). The estimate was 0.987 of the measured total."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

from lowmem.memory.activations import llama_activation_bytes  # noqa: E402

LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}


def test_kept_inputs_are_the_adapted_8bit_linears_inputs_of_one_layer(tiny_model_path):
    """What the estimate passes to the Llama formula: the distinct inputs (q/k/v one, gate/up one) of the last layer's
    8-bit linears that their adapters save (and so the formula frees at their backward)."""
    from lowmem.memory.estimate import estimate_memory

    def parts(**kw):
        kw = {"quantization": "int8", "lora": LORA, **kw}
        return estimate_memory(tiny_model_path, "adamw", dtype="fp32", batch_size=2, seq_len=64, **kw).details[
            "activation_parts"]

    int8 = parts()
    h, i, L, tokens = 64, 128, 2, 2 * 64
    kept = 4 * (h + h + h + i)  # qkv, o_proj, gate_up, down_proj inputs, float32
    assert int8["kept_inputs_first_layer"] == tokens * (kept * (L - 1) + 4 * i)
    # the last layer's moment holds its down_proj's input beyond nf4's (whose adapter's backward freed it)
    assert int8["last_layer_moment"] - parts(quantization="nf4")["last_layer_moment"] == tokens * 4 * i


@pytest.mark.slow
def test_no_kept_inputs_with_dropout_or_checkpointing(tiny_model_path):
    """With dropout the adapter saves its dropped copy (the held input counts at every moment: ``int8_held_inputs``);
    checkpointed, every held input counts at every moment already."""
    from lowmem.memory.estimate import estimate_memory

    for kw in ({"lora": {**LORA, "lora_dropout": 0.1}}, {"lora": LORA, "gradient_checkpointing": True}):
        parts = estimate_memory(tiny_model_path, "adamw", quantization="int8", dtype="fp32", batch_size=2, seq_len=64,
                                **kw).details["activation_parts"]
        assert "kept_inputs_first_layer" not in parts and parts["int8_held_inputs"] > 0, kw


def test_formula_kept_inputs_raise_the_later_moments_only_without_checkpointing():
    from lowmem.kit import tiny_config

    cfg = tiny_config()
    kept = {"qkv": 4 * cfg.hidden_size, "down_proj": 4 * cfg.intermediate_size}
    base = llama_activation_bytes(cfg, 4, 96, 4, saved_inputs={"q_proj", "down_proj"})
    with_kept = llama_activation_bytes(cfg, 4, 96, 4, saved_inputs={"q_proj", "down_proj"}, kept_inputs=kept)
    tokens, L = 4 * 96, cfg.num_hidden_layers
    assert with_kept["last_layer_moment"] - base["last_layer_moment"] == tokens * kept["down_proj"]
    assert with_kept["kept_inputs_first_layer"] == tokens * (sum(kept.values()) * (L - 1) + kept["down_proj"])
    assert with_kept["total"] >= with_kept["last_layer_moment"]
    for key in ("norm_moment", "last_layer_down_moment", "head_step_moment"):  # before down_proj's backward: unchanged
        assert with_kept[key] == base[key], key
    ckpt = llama_activation_bytes(cfg, 4, 96, 4, True, saved_inputs={"q_proj", "down_proj"})
    assert llama_activation_bytes(cfg, 4, 96, 4, True, saved_inputs={"q_proj", "down_proj"}, kept_inputs=kept) == ckpt


def _measure(path, quantization, b, s, ckpt):
    from lowmem.memory.measure import measure_memory

    return measure_memory(path, quantization=quantization, lora=LORA, dtype="bf16", gradient_checkpointing=ckpt,
                          device="cpu", batch_size=b, seq_len=s)


def _never_under(r):
    """Traced bytes (MemTracker: machine-independent): the estimate at or above the measured total, within the 4-bit
    tests' tolerance."""
    ratios = r.ratios()
    assert r.estimate.total >= r.measured["total"], (r.estimate.total, r.measured["total"])
    assert ratios["total"] <= 1.10, ratios
    assert ratios["activations"] == pytest.approx(1.0, abs=0.25), ratios


def test_int8_4x96_without_checkpointing_is_not_under(tiny_model_path):
    """The case that was 0.987 (3,999,156 B estimated, 4,050,364 measured): now 4,102,068 (1.013)."""
    r = _measure(tiny_model_path, "int8", 4, 96, False)
    _never_under(r)
    # the peak is a backward moment with a gradient formed (the last down_proj's adapter's), not the loss's moment
    assert r.at_peak["gradients"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "nf4"])
@pytest.mark.parametrize("b, s, ckpt", [(1, 64, True), (1, 64, False), (4, 96, True), (4, 96, False)])
def test_int8_and_nf4_table_is_never_under(tiny_model_path, quantization, b, s, ckpt):
    _never_under(_measure(tiny_model_path, quantization, b, s, ckpt))


@pytest.mark.slow
@pytest.mark.parametrize("b, s", [(2, 64), (4, 96)])
def test_int8_qwen2_without_checkpointing_is_not_under(tmp_path, b, s):
    """Qwen2 (the Llama formula with q/k/v biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=False)).save_pretrained(tmp_path)
    _never_under(_measure(str(tmp_path), "int8", b, s, False))


@pytest.mark.parametrize("quantization", [None, "nf4", "int8"])
@pytest.mark.parametrize("rank, b, s, targets", [(64, 1, 32, "all-linear"), (128, 1, 16, "all-linear"),
                                                 (128, 1, 16, ["gate_proj", "up_proj", "down_proj"])])
def test_large_adapters_few_tokens_are_not_under(tiny_model_path, quantization, rank, b, s, targets):
    """Large adapters, few tokens (LoRA all-linear, fp32): the peak is in the first layer's backward with most gradients
    formed (r=128, 1 x 16: at its q / k / v adapters' backward, every other gradient formed). Without the layers' last
    moment (``first_adapters_moment``: every gradient, the gradients of the layer's input and of lora_A's output, the
    adapters' saved input, an 8-bit base's kept inputs of every layer) the estimate was under: r=64, 1 x 32 full
    precision 0.992, nf4 0.998, int8 0.995; r=128, 1 x 16 0.997, 0.997, 0.989; MLP adapters only (the moment at gate /
    up's), r=128, 1 x 16: nf4 0.995, int8 0.984. Traced bytes."""
    from lowmem.memory.measure import measure_memory

    r = measure_memory(tiny_model_path, quantization=quantization, lora={**LORA, "r": rank, "target_modules": targets},
                       dtype="fp32", device="cpu", batch_size=b, seq_len=s)
    assert r.at_peak["gradients"] > r.at_peak["activations"]  # a gradient-made peak
    assert r.estimate.total >= r.measured["total"], (r.estimate.total, r.measured["total"])
    assert r.ratios()["total"] <= 1.10, r.ratios()


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "nf4"])
@pytest.mark.parametrize("rank, s", [(128, 16), (64, 32)])
@pytest.mark.parametrize("arch", ["phi3", "gpt_neox"])
def test_int8_traced_architecture_large_adapters_is_not_under(tmp_path, arch, quantization, rank, s):
    """Traced architectures (Phi3, GPT-NeoX), large adapters, few tokens: the traced step's moments came from a model
    without bitsandbytes' layers (Phi3 r=128 1 x 16 int8 0.990; r=64 1 x 32: Phi3 int8 0.950, nf4 0.980, GPT-NeoX
    (this config) int8 0.966, nf4 0.999; full precision 1.0003); its quantized linears now run stand-ins that
    de-quantize and keep what bitsandbytes' do (tests/test_int8trace_moments.py). Traced bytes."""
    from test_int8trace_moments import _check, _gpt_neox, _phi3

    _check((_phi3 if arch == "phi3" else _gpt_neox)(tmp_path), quantization, rank, 1, s, False, 1.02)
