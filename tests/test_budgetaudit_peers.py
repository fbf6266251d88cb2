"""The estimate's components beside ``accelerate estimate-memory``'s for the same model (BUDGETAUDIT, session 13).

``accelerate estimate-memory`` takes Hub names only (a local directory fails in ``huggingface_hub``'s repo-id check,
accelerate 1.x), so its two functions are called as the command calls them: ``calculate_maximum_sizes`` on the model
built under ``init_empty_weights`` and ``estimate_training_usage(size, "float32")`` (model 1x, gradients 1x, optimizer 2x,
"step" 4x the model, whatever the optimizer, no activations). Tiny Llama / Qwen2 (untied) / OLMoE configs, fp32.
"""

from __future__ import annotations

import warnings

import pytest

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
SEQ = 64


def _config(arch: str, **kw):
    from transformers import LlamaConfig, OlmoeConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(**TINY, **kw)
    if arch == "qwen2":
        return Qwen2Config(**{**TINY, "tie_word_embeddings": False, **kw})
    return OlmoeConfig(**TINY, num_experts=4, num_experts_per_tok=2, eos_token_id=None, pad_token_id=None, **kw)


def _accelerate(config) -> dict[str, int]:
    """What ``accelerate estimate-memory`` computes for ``config`` in float32."""
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    total, _ = calculate_maximum_sizes(model)
    return {"total": total, **estimate_training_usage(total, "float32")}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "olmoe"])
def test_weights_equal_accelerates_and_where_it_ignores_the_optimizer(arch):
    """Weights: equal to accelerate's model size (parameters and buffers). Gradients: accelerate's minus the buffers
    (they have none). Optimizer state: AdamW's two moments are accelerate's 2x (plus a step count per tensor, minus the
    buffers' share accelerate doubles); 8-bit AdamW and Adafactor hold a fraction of it, which accelerate's number,
    the same for every optimizer, does not see. Measured (B, Llama): weights 558,400 both; AdamW states 1,116,756 /
    accelerate 1,116,800; adamw8bit 334,420; adafactor 14,164."""
    from lowmem.memory import estimate_memory

    config = _config(arch)
    acc = _accelerate(config)
    ests = {opt: estimate_memory(config, optimizer=opt, dtype="fp32", device="cpu", batch_size=1, seq_len=SEQ)
            for opt in ("adamw", "adamw8bit", "adafactor")}
    adamw = ests["adamw"]
    buffers = adamw.weights - adamw.gradients  # every parameter trains: what is not a gradient is a buffer
    assert 0 <= buffers < 1024
    assert adamw.weights == acc["model"] == acc["total"]
    assert adamw.gradients == acc["gradients"] - buffers
    steps = adamw.optimizer_states - 2 * adamw.gradients  # AdamW's step counts (a few bytes per parameter tensor)
    assert 0 <= steps <= 8 * 64
    assert adamw.optimizer_states == acc["optimizer"] - 2 * buffers + steps
    assert ests["adamw8bit"].optimizer_states < acc["optimizer"] / 3
    assert ests["adafactor"].optimizer_states < acc["optimizer"] / 20
    for e in ests.values():  # accelerate's training figure has no activations and no step transient
        assert e.activations > 0 and e.optimizer_transient > 0


def test_accelerates_training_figure_is_under_the_measured_adamw_step():
    """accelerate's fp32 "training" size (4x the model: weights, gradients, two moments) is under what one AdamW step of
    batch 1 x 64 tokens measures (the activations: 2,233,600 B for accelerate on the tiny Llama, measured peak about
    2.69 MB); lowmem's estimate is not under the measurement."""
    from lowmem.memory.measure import measure_memory

    config = _config("llama")
    acc = _accelerate(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = measure_memory(config, "adamw", batch_size=1, seq_len=SEQ, dtype="fp32", steps=2, device="cpu")
    measured = r.measured["total"]
    assert acc["step"] < measured, (acc, measured)
    assert r.estimate.total >= measured - 64, r.table()


def test_a_tied_head_is_counted_once():
    """With ``tie_word_embeddings`` the model holds the embedding once; lowmem's weights count it once (the parameters
    of the real model, deduplicated, plus its buffers). accelerate's empty model, built under ``init_empty_weights``,
    reports the head's bytes twice: 559,424 B for 428,352 (Qwen2 tiny, tied)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lowmem.memory import estimate_memory

    config = _config("qwen2", tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    real = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    ours = estimate_memory(config, dtype="fp32", device="cpu", seq_len=SEQ).weights
    assert ours == real
    head = model.lm_head.weight.nbytes
    assert _accelerate(config)["total"] in (real, real + head)  # (accelerate's: recorded, not asserted either way)
