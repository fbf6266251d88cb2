"""MicroAdam's kept tables (issue 12; FOUND_QUANTEXACT 2): the eager step's 4-bit levels' lookup pairs
(``Q.lookup_pairs("levels", device)``, 2,048 B) and its cached age weights (two ``m``-float32 vectors per step, the
last 16 kept) stay alive for the process from the first step, neither state nor a later step's allocation.
``MicroAdamMoments.cached_bytes`` reports them (the age weights' cache full), and the estimator adds them once per
device (``estimate._kept_table_bytes``). Before, they were counted nowhere (2,688 B at ``m = 10``)."""

from __future__ import annotations

import gc

import bitsandbytes.functional  # noqa: F401  (its import keeps 128 B of tensors: before any traced step)
import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.microadam import MicroAdamMoments
from lowmem.optim.functional import microadam as MA
from lowmem.optim.functional import quant as Q
from test_quantexact_cached_tables import _WithFresh


def _left_after_steps(steps, shape=(200, 128), **kw):
    """Bytes the first ``steps`` steps leave alive beyond the state, from a process state without tables, and what
    the moment rule reports."""
    Q.clear_kept_tables()
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = create_optimizer([p], "microadam", **kw)
    with _WithFresh() as t:
        for _ in range(steps):
            p.grad = torch.randn(shape)
            opt.step()
        p.grad = None
        gc.collect()
        left = t.live
    return left - opt.state_bytes(), opt.recipe.moment.cached_bytes([opt.state[p]], p.device)


@pytest.mark.parametrize("m", [10, 4])
def test_cached_bytes_are_what_the_steps_keep_once_the_age_weights_cache_is_full(m):
    steps = MA.AGE_WEIGHTS_KEPT // 2  # (two age-weight vectors a step)
    left, reported = _left_after_steps(steps + 1, m=m)
    assert left == reported == 2048 + MA.AGE_WEIGHTS_KEPT * 4 * m
    left, _ = _left_after_steps(1, m=m)  # the first step: the levels and its own two vectors
    assert left == 2048 + 2 * 4 * m


def test_cached_bytes_per_device_and_path():
    opt = create_optimizer([torch.nn.Parameter(torch.zeros(64, 64, device="meta"))], "microadam")
    opt.materialize_state()
    states = [opt.state[p] for g in opt.param_groups for p in g["params"]]
    assert opt.recipe.moment.cached_bytes(states, "meta") == 2048 + 16 * 4 * 10  # (the eager path's forms)
    assert opt.recipe.moment.cached_bytes([{}], "cpu") == 0
    assert MicroAdamMoments(compile="always").cached_bytes(states, "cpu") == 4 + 16 * 4 * 10  # (its divisor)


def test_estimate_counts_the_kept_tables():
    from transformers import AutoConfig

    from lowmem.memory import estimate_memory

    c = AutoConfig.for_model("llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                             tie_word_embeddings=False)
    est = estimate_memory(c, "microadam", dtype="fp32", batch_size=1, seq_len=16, device="cpu")
    assert est.details["optimizer_kept_tables"] == 2048 + 16 * 4 * 10
