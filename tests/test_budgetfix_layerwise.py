"""Layerwise stepping with gradient accumulation in the estimate (BUDGETFIX, FOUND_BUDGETAUDIT 1): what
``LayerwiseOptimizer(accumulation_steps=2)`` keeps after a window's first micro-batch, counted exactly (ledger: the
``.grad`` tensors and the subspace accumulators, machine-independent)."""

from __future__ import annotations

import warnings

import pytest

SEQ = 64


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("budgetfix-llama")
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("optimizer, args", [("galore_adamw", {"rank": 8}), ("fira_adamw", {"rank": 8})], ids=["galore", "fira"])
def test_layerwise_accumulation_counts_what_the_window_keeps(llama_dir, optimizer, args):
    """GaLore accumulates a projected parameter in its ``r x n`` float32 buffer (``LayerwiseOptimizer._low``), Fira (a
    residual: needs the full gradient) in ``.grad``: after micro-batch 1 of 2 the estimate's gradients are exactly what
    is kept, plus the largest projected parameter's full gradient (being formed in micro-batch 2 before its hook
    projects it). Tiny Llama: GaLore 304,384 kept + 32,768; Fira 558,336 (every gradient)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lowmem.memory import estimate_memory
    from lowmem.optim.layerwise import LayerwiseOptimizer

    m = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = LayerwiseOptimizer(m, optimizer, accumulation_steps=2, **args)
    ids = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(0))
    m(input_ids=ids, labels=ids).loss.backward()
    kept = sum(p.grad.nbytes for p in m.parameters() if p.grad is not None) + sum(t.nbytes for t in opt._low.values())
    projected = max((p.nbytes for p in opt._low), default=0)
    opt.remove_hooks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = estimate_memory(llama_dir, optimizer=optimizer, optim_args=args, layerwise=True, gradient_accumulation_steps=2,
                              batch_size=1, seq_len=SEQ, dtype="fp32", device="cpu")
        one = estimate_memory(llama_dir, optimizer=optimizer, optim_args=args, layerwise=True, batch_size=1, seq_len=SEQ,
                              dtype="fp32", device="cpu")
    assert est.gradients == kept + projected, (est.gradients, kept, projected)
    # the kept gradients are live with the next micro-batch's activations and the step: all of them in the total
    assert est.total >= one.total + kept - one.gradients, (est.total, one.total, kept)
