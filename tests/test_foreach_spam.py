"""SPAM's parameters on the foreach path (issue 15): the stabilizer runs per parameter and per piece
as in the chunked step (``prepare``: the momentum reset; ``transform_chunk``: spike clipping), the
AdamW step on the bucket with the warm-up's step size (``step_lr``); equal to the single-tensor
reference (``chunk_numel=None, foreach=False``)."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.optim import functional as F
from lowmem.optim.functional import adam as FA
from lowmem.optim.registry import create_optimizer

# 2-D and 1-D, one (30 x 10) larger than chunk_numel (it joins the buckets in pieces)
SHAPES = [(12, 10), (8, 16), (10,), (7,), (30, 10)]
HP = {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-3, "reset_interval": 6, "warmup_steps": 3, "grad_accu_steps": 2}


def _run(fast: bool, threshold: float, monkeypatch, steps: int = 14):
    # the multi-tensor AdamW operations (bit for bit the single-tensor step's moments); torch's fused AdamW
    # kernel, the CPU's default, is checked on SPAM's buckets in tests/test_fused_adamw.py
    monkeypatch.setattr(FA, "FUSED_ON_CPU", False)
    calls: list[tuple[int, float | None]] = []
    orig = F.adamw_foreach_

    def spy(params, *args, **kwargs):
        calls.append((sum(p.numel() for p in params), kwargs.get("step_lr")))
        return orig(params, *args, **kwargs)

    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = create_optimizer(ps, "spam", threshold=threshold, **HP)
    opt.chunk_numel = 128 if fast else None
    for g in opt.param_groups:
        g["foreach"] = None if fast else False
    with monkeypatch.context() as mp:
        mp.setattr(F, "adamw_foreach_", spy)
        for step in range(steps):
            for p in ps:  # a spike at step 10: clipped
                p.grad = torch.randn(p.shape, generator=gen) * (30.0 if step == 9 else 1.0)
            opt.step()
    return [p.detach().clone() for p in ps], [{k: v.clone() for k, v in opt.state[p].items()} for p in ps], calls, opt


@pytest.mark.parametrize("threshold", [2.0, 0.0])
def test_spam_foreach_equals_the_single_tensor_step(threshold, monkeypatch):
    """14 steps with momentum resets at 6 and 12, warm-ups after them (lr scale < 1: ``step_lr``),
    spike clipping active (``threshold=2``: most steps clip some entries) or off, weight decay after
    the update: every element through the foreach kernel every step, weights at rtol 1e-6 (addcdiv
    against div and add), moments bit for bit (the same operations)."""
    fast_p, fast_s, fast_calls, _ = _run(True, threshold, monkeypatch)
    ref_p, ref_s, ref_calls, _ = _run(False, threshold, monkeypatch)
    assert ref_calls == []
    assert sum(n for n, _ in fast_calls) == 14 * sum(math.prod(s) for s in SHAPES)
    assert all(n <= 128 for n, _ in fast_calls)
    # the warm-up after each reset (steps 6, 7, 8 and 12, 13, 14: scale 0.01, 0.155, 0.505) passes its step size
    scaled = sorted({lr for _, lr in fast_calls if lr is not None})
    assert len(scaled) == 3 and all(0 < lr < HP["lr"] for lr in scaled), scaled
    for a, b in zip(fast_p, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for sa, sb in zip(fast_s, ref_s):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("threshold", [2.0, 0.0])
def test_spam_foreach_transient_counts_the_stabilized_bucket(threshold, monkeypatch):
    """The report: a full bucket (128 elements) holds its stabilized gradients and ``sqrt(v)``
    (8 bytes each); a piece being clipped, its spike-clipping temporaries (13 bytes each, the result
    included, with the rest of its bucket); clipping off: no temporaries of its own."""
    *_, opt = _run(True, threshold, monkeypatch, steps=1)
    assert opt.step_transient_bytes() == (13 * 128 if threshold else 8 * 128)
