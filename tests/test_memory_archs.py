"""The estimator on architectures other than Llama (issue 12's "bring your own model"): tiny models of each
built from a config, offline; the estimate's components against what ``measure_memory`` measures on CPU.

Non-Llama blocks get their activations traced on fake tensors (the tensors their own forward saves:
GPT-2's Conv1D blocks, GPT-NeoX's parallel block, Gemma's GeGLU and soft-capping, Phi-3's fused projections,
Mixtral's experts); a head tied to the input embedding adds the backward's two weight-sized tensors."""

from __future__ import annotations

import warnings

import pytest

from lowmem.memory import estimate_memory

H, I, L, A = 128, 344, 2, 4


def arch_config(name: str, vocab: int = 2000):
    from transformers import AutoConfig

    c = dict(vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=A,
             max_position_embeddings=256)
    if name == "llama":
        return AutoConfig.for_model("llama", num_key_value_heads=2, tie_word_embeddings=False, **c)
    if name == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab, n_embd=H, n_layer=L, n_head=A, n_positions=256, n_inner=I,
                                    bos_token_id=0, eos_token_id=0)
    if name == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", **c)
    if name == "phi3":
        return AutoConfig.for_model("phi3", num_key_value_heads=A, tie_word_embeddings=False, pad_token_id=0,
                                    bos_token_id=0, eos_token_id=0, **c)
    if name == "gemma":
        return AutoConfig.for_model("gemma", num_key_value_heads=1, head_dim=32, **c)
    if name == "gemma2":
        return AutoConfig.for_model("gemma2", num_key_value_heads=2, head_dim=32, sliding_window=16, **c)
    if name == "mixtral":
        return AutoConfig.for_model("mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                    tie_word_embeddings=False, **c)
    if name == "qwen2_moe":
        return AutoConfig.for_model("qwen2_moe", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=128, shared_expert_intermediate_size=256, decoder_sparse_step=1,
                                    tie_word_embeddings=False, **c)
    raise KeyError(name)


def _measure(config, **kw):
    from lowmem.memory.measure import measure_memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return measure_memory(config, **{"optimizer": "adamw", "dtype": "fp32", "batch_size": 2, "seq_len": 48,
                                         "steps": 1, "device": "cpu", **kw})


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "phi3", "gemma2", "mixtral", "qwen2_moe"])
def test_traced_activations_match_the_measurement(name):
    """Before: GPT-2 raised AttributeError ('intermediate_size'); the others took the Llama formula (Gemma 0.78,
    Mixtral 0.83 of the measured activations, GPT-NeoX 1.28)."""
    r = _measure(arch_config(name))
    est = r.estimate
    assert any("traced on fake tensors" in n for n in est.notes)
    if name == "gemma2":  # tied: the measured maximum is the end of the backward pass, 3 weight-sized tensors
        assert est.activations >= 0.9 * r.measured["activations"] - 2 * est.details["activation_parts"]["tied_embedding_backward"]
    else:
        assert est.activations == pytest.approx(r.measured["activations"], rel=0.10), r.table()
    for c in ("weights", "gradients", "optimizer_states"):  # exact whatever the block (3D experts, Conv1D)
        assert est.components()[c] == pytest.approx(r.measured[c], abs=1024), c


def test_tied_embedding_backward_is_counted():
    """A big tied vocabulary (Gemma): at the end of the backward pass the head's gradient contribution, the
    embedding's and their sum are live with every other gradient. With a short sequence that moment is the
    step's peak: the estimate was below the measurement before it was counted."""
    config = arch_config("gemma", vocab=16000)
    r = _measure(config, seq_len=8, batch_size=1)
    est = r.estimate
    emb = config.vocab_size * H * 4
    assert est.details["activation_parts"]["tied_embedding_backward"] == 2 * emb
    assert est.total >= r.measured["total"] - 64 * 1024, r.table()
    assert est.total == pytest.approx(r.measured["total"], rel=0.05), r.table()
    untied = estimate_memory(arch_config("gemma", vocab=16000).__class__(**{**config.to_dict(), "tie_word_embeddings": False}),
                             dtype="fp32", batch_size=1, seq_len=8)
    assert "tied_embedding_backward" not in untied.details["activation_parts"]


def test_lora_freezes_the_tied_embedding_term():
    est = estimate_memory(arch_config("gemma", vocab=16000), dtype="fp32", seq_len=8, lora={"r": 4, "target_modules": "all-linear"})
    assert "tied_embedding_backward" not in est.details["activation_parts"]


@pytest.mark.parametrize("model_type,words", [("llava", "multimodal"), ("gemma3", "multimodal"), ("t5", "not a causal LM")])
def test_models_the_estimate_does_not_cover_are_named(model_type, words):
    from transformers import AutoConfig

    with pytest.raises(ValueError, match=rf"model_type='{model_type}'.*{words}"):
        estimate_memory(AutoConfig.for_model(model_type))


def test_unknown_model_type_in_a_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "foo_lm", "hidden_size": 64}')
    with pytest.raises(ValueError, match="foo_lm"):
        estimate_memory(str(tmp_path))


@pytest.mark.parametrize("kw,words", [
    ({"batch_size": "2"}, "batch_size='2'"), ({"seq_len": 0}, "seq_len=0"), ({"batch_size": True}, "batch_size=True"),
    ({"lora": {"rank": 8}}, r"lora field\(s\) \['rank'\]; did you mean \['r'\]"),
    ({"dtype": "fp8"}, "dtype 'fp8'"), ({"device": "tpu"}, "device='tpu'"),
])
def test_bad_arguments_name_the_field(kw, words):
    with pytest.raises(ValueError, match=words):
        estimate_memory("tiny", **kw)


def test_a_batch_above_two_is_extrapolated_exactly():
    """Two traces serve every batch (the budget search's), equal to a trace at that batch: the step's trace (GPT-2,
    with and without checkpointing; Mixtral's grouped_mm experts), operation by operation, from batches 2 and 3 (at 1
    GPT-2's attention takes the math path on fake CPU tensors); the saved tensors (TRL's fused head), from 1 and 2."""
    import torch

    from lowmem.memory.activations import _trace_saved, decoder_layers, traced_activation_bytes
    from lowmem.memory.estimate import build_meta_model

    for name, ckpt in (("gpt2", False), ("gpt2", True), ("mixtral", False)):
        config = arch_config(name)
        model = build_meta_model(config, torch.float32)
        cache: dict = {}
        parts = traced_activation_bytes(model, config, 5, 40, ckpt, cache=cache)
        assert sorted(cache) == [(2, 40, "step", ckpt), (3, 40, "step", ckpt)]
        per_layer, other, _, whole = _trace_saved(model, config, decoder_layers(model, L), 5, 40, backward=True,
                                                  checkpointed=ckpt, whole_step=True)
        ops = [(a, g) for n, a, g, done, _ in whole["steps"] if not done and n not in ("|", "~")]  # not the segments' records
        assert parts["total"] == max(a for a, _ in ops)
        assert parts["backward_peak"] == max(a + g for a, g in ops)
        assert abs(parts["other"] - other) <= 64  # a few integer scalars
    config = arch_config("mixtral")
    model = build_meta_model(config, torch.float32)
    cache = {}
    parts = traced_activation_bytes(model, config, 5, 40, cache=cache, head_parts={"logits": 0, "loss_backward": 0})
    assert sorted(cache) == [(1, 40), (2, 40)]
    per_layer, other = _trace_saved(model, config, decoder_layers(model, L), 5, 40)
    assert parts["layers"] == sum(per_layer)
    assert abs(parts["other"] - max(0, other - 5 * 40 * config.vocab_size * 4)) <= 64


def test_measure_a_directory_with_only_a_config(tmp_path):
    """``lowmem budget ./dir --measure`` on a directory with only config.json (what the estimate reads) raised
    OSError 'no file named model.safetensors'; it measures seeded random weights of that config."""
    arch_config("gpt2").save_pretrained(tmp_path)
    r = _measure(str(tmp_path), seq_len=16, batch_size=1)
    assert r.measured["weights"] == pytest.approx(r.estimate.weights, abs=1024)
    assert r.estimate.settings["model"] == str(tmp_path)


@pytest.mark.parametrize("name", ["llama", "gpt_neox", "mixtral"])
def test_total_within_10_percent_when_activations_are_large(name):
    """One micro-batch per step: the gradients fill while the backward frees the activations. Counting every
    gradient with the activations put the total at 1.21 (Llama), 1.14 (GPT-NeoX), 1.13 (Mixtral) of the measured
    peak (h=256, batch 2 x 64); with the gradients made before the activations' peak, 1.09 / 1.02 / 1.01."""
    r = _measure(arch_config(name), batch_size=2, seq_len=64)
    est = r.estimate
    assert est.activations > 0.5 * est.gradients  # activations matter here
    assert 0.97 <= est.total / r.measured["total"] <= 1.10, r.table()
    accumulated = estimate_memory(arch_config(name), dtype="fp32", batch_size=2, seq_len=64, device="cpu",
                                  gradient_accumulation_steps=4)
    assert accumulated.total == est.total - est.details["gradients_with_activations"] + est.gradients or \
        accumulated.total > est.total


def test_budget_cli_gradient_accumulation(capsys):
    import json

    from lowmem.cli import main

    assert main(["budget", "tiny", "--gradient-accumulation-steps", "0"]) == 2
    assert "--gradient-accumulation-steps 0: expected an integer >= 1" in capsys.readouterr().err
    assert main(["budget", "tiny", "--dtype", "fp32", "--seq-len", "32", "--gradient-accumulation-steps", "2",
                 "--measure", "--device", "cpu", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["losses"]) == 4  # 2 steps x 2 micro-batches, measured
    totals = {}
    for ga in ("1", "4"):
        assert main(["budget", "tiny", "--dtype", "fp32", "--seq-len", "256", "--batch-size", "4", "--json",
                     "--gradient-accumulation-steps", ga]) == 0
        data = json.loads(capsys.readouterr().out)
        totals[ga] = data["total"]
        assert data["settings"]["gradient_accumulation_steps"] == int(ga)
    # four micro-batches: every gradient is live with the activations; the loop holds the four micro-batches'
    # input_ids, attention_mask and labels through the step (24 B per token)
    assert data["details"]["batch_input_bytes"] == 24 * 4 * 256 * 4
    # (+ the transient's kept part, live at the activations' moment: the fused AdamW kernel's step count, 4 B)
    kept = data["details"]["optimizer_kept_tables"] + data["details"]["optimizer_kept_step_count"]
    assert totals["4"] == (data["weights"] + data["gradients"] + data["optimizer_states"]
                           + max(data["activations"] + kept, data["optimizer_transient"])
                           + data["details"]["batch_input_bytes"])
    assert totals["1"] < totals["4"]


def test_lora_on_mixtral_experts_is_traced():
    """peft's all-linear adapts Mixtral's 3-D experts (a parameter wrapper that opens torch.autocast on the weight's
    device): on the meta device torch refused it ('unsupported autocast device_type'), and the budget search of a
    Mixtral directory stopped with that error at its first LoRA candidate."""
    r = _measure(arch_config("mixtral"), lora={"r": 8, "target_modules": "all-linear"})
    est = r.estimate
    assert est.optimizer_states == r.measured["optimizer_states"]  # the experts' adapters are trained
    assert est.activations == pytest.approx(r.measured["activations"], rel=0.10), r.table()
    assert est.total == pytest.approx(r.measured["total"], rel=0.10), r.table()


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamw"])
def test_layerwise_tied_embedding_steps_after_the_activations(optimizer):
    """Layerwise mode steps each parameter in its gradient hook; a tied embedding's gradient is the backward's last
    (its two contributions summed first), so its step (here the largest transient) runs with the activations
    freed, and the other parameters' steps are live with the activations before the tied moment. Adding the
    largest transient and the tied moment to the activations put GPT-2 at 1.307 (adamw8bit) / 1.051 (adamw) of
    the measured peak (h=256, batch 1 x 32); now 1.002 / 1.000."""
    from transformers import AutoConfig

    # h=256, vocab 4000: the tied moment holds three weight-sized tensors, as counted (at h=128 / vocab 2000 /
    # 16 tokens two were measured: 1.11, see docs/memory.md)
    config = AutoConfig.for_model("gpt2", vocab_size=4000, n_embd=256, n_layer=2, n_head=4, n_positions=256, n_inner=688,
                                  bos_token_id=0, eos_token_id=0)
    r = _measure(config, optimizer=optimizer, layerwise=True, batch_size=1, seq_len=32, steps=2)
    assert r.estimate.total == pytest.approx(r.measured["total"], rel=0.05), r.table()
    assert r.estimate.total >= r.measured["total"] - 64 * 1024, r.table()


def _ratio_config(name: str, h: int, i: int, layers: int, heads: int, vocab: int):
    from transformers import AutoConfig

    c = dict(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
             max_position_embeddings=512)
    if name == "llama":
        return AutoConfig.for_model("llama", num_key_value_heads=heads // 2, tie_word_embeddings=False, **c)
    if name == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab, n_embd=h, n_layer=layers, n_head=heads, n_positions=512,
                                    n_inner=i, bos_token_id=0, eos_token_id=0)
    return AutoConfig.for_model(name, **c)


RATIO_CASES = [(name, ckpt) for name in ("llama", "gpt2", "gpt_neox") for ckpt in (False, True)]


def _assert_ratio_band(name, ckpt, shape, batch_size, seq_len, rel, dtype="fp32"):
    r = _measure(_ratio_config(name, *shape), batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=ckpt,
                 dtype=dtype)
    est = r.estimate
    assert est.activations == pytest.approx(r.measured["activations"], rel=rel), r.table()
    assert est.total == pytest.approx(r.measured["total"], rel=rel), r.table()


@pytest.mark.parametrize("name,ckpt", [pytest.param(n, c, marks=pytest.mark.slow) if n != "llama" and not c else (n, c)
                                       for n, c in RATIO_CASES])  # (the suite's time: the traced non-checkpointed two slow)
def test_activations_and_total_within_3_percent(name, ckpt):
    """Activations large beside the vocabulary (h=256, i=688, 4 layers, vocab 100, batch 4 x 64, AdamW, fp32):
    the backward's moments set the peak, not the loss's. Estimate / measured before (activations, total): llama
    0.979 / 1.024, checkpointed 1.012 / 0.911; gpt2 0.956 / 1.023, 0.962 / 0.910; gpt_neox 0.947 / 1.029, 0.851 /
    0.928. Now 0.997-1.013 for all (2026-11-30): the Llama formula counts the final norm's and the last layer's
    backward and the first layer's moment with the later layers' gradients; the other architectures trace the step
    itself (``loss.backward()`` on fake tensors, the model's own checkpointing)."""
    _assert_ratio_band(name, ckpt, (256, 688, 4, 4, 100), 4, 64, rel=0.03)


def test_llama_bf16_activations_within_3_percent():
    """bf16 activations (the shape above, no checkpointing): the final RMSNorm's backward forms float32 temporaries of
    the hidden states (4 with the upcast incoming gradient), the peak with a small vocabulary. Activations / total
    before 0.947 / 1.011, now 1.004 / 1.001."""
    _assert_ratio_band("llama", False, (256, 688, 4, 4, 100), 4, 64, rel=0.03, dtype="bf16")


@pytest.mark.slow
@pytest.mark.parametrize("name,ckpt", RATIO_CASES)
def test_activations_and_total_within_3_percent_larger(name, ckpt):
    """As above at h=512, i=1376, 4 layers, 8 heads, vocab 256, batch 4 x 128 (11.9M parameters for Llama). Before:
    llama 0.980 / 1.023, 1.006 / 0.913; gpt2 0.963 / 1.018, 0.963 / 0.905; gpt_neox 0.952 / 1.029, 0.851 / 0.928;
    now 0.998-1.013 / 0.996-1.002."""
    _assert_ratio_band(name, ckpt, (512, 1376, 4, 8, 256), 4, 128, rel=0.03)
