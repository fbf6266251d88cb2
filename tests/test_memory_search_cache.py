"""The budget search sizes each optimizer once per :func:`~lowmem.memory.estimate.sizing_key` (its name and
hyperparameters, the device, the config and the trainable parameters' (name, shape, dtype)) inside
:func:`~lowmem.memory.estimate.sizing_cache`; the candidates it finds must be exactly those found with every
estimate sizing its own optimizer."""

from __future__ import annotations

import contextlib
import warnings

from lowmem.memory import estimate
from lowmem.memory import search as search_mod
from lowmem.memory.search import search_budget

# full fine-tuning (layerwise or not: one sizing, two transients), a subspace recipe, BAdam
# (which freezes its inactive blocks: replayed on a hit), and LoRA r=16 / r=8, each with and without 4-bit
# base weights (the same trainable set: one sizing per rank)
SEARCH = dict(budget="1TiB", seq_len=32, batch_size=2, dtype="fp32", optimizers=["adamw", "galore_adamw", "badam"],
              ranks=[16], lora_ranks=(16, 8), quantization=(None, "nf4"))


def _search(monkeypatch, cached: bool, device: str) -> tuple[list[dict], int]:
    """The search's candidates (as dicts) and how many optimizer sizings it ran."""
    calls = []
    real = estimate._size_optimizer
    monkeypatch.setattr(estimate, "_size_optimizer", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    if not cached:
        monkeypatch.setattr(search_mod, "sizing_cache", contextlib.nullcontext)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = search_budget("tiny", device=device, **SEARCH)
    monkeypatch.undo()
    return [c.to_dict() for c in found], len(calls)


def test_search_with_the_sizing_cache_equals_the_search_without(monkeypatch):
    # device="cpu": a projected step's transient includes MKL's kept GEMM buffer there
    cached, n_cached = _search(monkeypatch, True, "cpu")
    plain, n_plain = _search(monkeypatch, False, "cpu")
    assert cached == plain
    # (adamw, galore_adamw r=16, badam) x layerwise or not + LoRA (r=16, r=8) x (bf16, nf4 base weights)
    assert (n_plain, n_cached) == (10, 5)
    by = {(c["settings"]["optimizer"], str(c["settings"]["optim_args"]), c["settings"]["layerwise"],
           str(c["settings"].get("lora")), c["settings"].get("quantization"), c["settings"]["gradient_checkpointing"]): c
          for c in cached}
    # the test can see a shared layerwise transient or a shared LoRA state: the shared sizings differ there
    step, lw = by[("adamw", "{}", False, "None", None, False)], by[("adamw", "{}", True, "None", None, False)]
    assert step["components"]["optimizer_transient"] != lw["components"]["optimizer_transient"]
    r16 = by[("adamw", "{}", False, "{'r': 16, 'target_modules': 'all-linear'}", "nf4", False)]
    r8 = by[("adamw", "{}", False, "{'r': 8, 'target_modules': 'all-linear'}", "nf4", False)]
    assert r16["components"]["optimizer_states"] > 1.9 * r8["components"]["optimizer_states"]
    b_step = by[("badam", "{}", False, "None", None, False)]
    full = by[("adamw", "{}", False, "None", None, False)]
    assert b_step["components"]["gradients"] < full["components"]["gradients"]  # BAdam's frozen blocks, on the hit too


def test_sizing_cache_is_scoped_and_keyed_by_the_trainable_set():
    with estimate.sizing_cache() as cache, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with estimate.sizing_cache() as inner:  # nested: the same cache
            assert inner is cache
        a = estimate.estimate_memory("tiny", "adamw", lora={"r": 16, "target_modules": "all-linear"}, seq_len=16)
        b = estimate.estimate_memory("tiny", "adamw", lora={"r": 16, "target_modules": "all-linear"}, seq_len=64,
                                     quantization="nf4", gradient_checkpointing=True)
        assert len(cache) == 1 and a.optimizer_states == b.optimizer_states
        estimate.estimate_memory("tiny", "adamw", lora={"r": 8, "target_modules": "all-linear"}, seq_len=16)
        estimate.estimate_memory("tiny", "adamw", lora={"r": 16, "target_modules": ["q_proj"]}, seq_len=16)
        estimate.estimate_memory("tiny", "adamw", optim_args={"betas": [0.9, 0.95]}, seq_len=16)
        estimate.estimate_memory("tiny", "adamw", seq_len=16, device="cpu")
        assert len(cache) == 5
    assert estimate._SIZING_CACHE is None
