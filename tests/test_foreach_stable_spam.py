"""Stable-SPAM's parameters on the foreach path (issue 15): the stabilizer (AdaClip, AdaGN, the
momentum reset) per parameter and per piece as in the chunked step, the moment rule
(``RestartBiasCorrection``: AdamW's bias correction counted from the last reset, ``beta1`` scaled
by the cosine decay with ``t_max``) on the bucket by the inner AdamW's multi-tensor step; equal to
the per-parameter step (``foreach=False``) with the same ``chunk_numel``."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.optim import functional as F
from lowmem.optim.registry import create_optimizer

SHAPES = [(12, 10), (12, 10), (8, 16), (10,), (7,), (30, 10)]  # (30, 10) in pieces at chunk_numel=128


def _run(foreach, chunk_numel, hp, monkeypatch, steps=9):
    calls = []
    orig = F.adamw_foreach_

    def spy(params, *args, **kwargs):
        calls.append(sum(p.numel() for p in params))
        return orig(params, *args, **kwargs)

    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = create_optimizer(ps, "stable_spam", foreach=foreach, **hp)
    opt.chunk_numel = chunk_numel
    with monkeypatch.context() as mp:
        mp.setattr(F, "adamw_foreach_", spy)
        for step in range(steps):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen) * (30.0 if step == 4 else 1.0)
            opt.step()
    return ps, opt, calls


@pytest.mark.parametrize("chunk_numel", [None, 128])
@pytest.mark.parametrize("hp", [{"reset_interval": 3, "weight_decay": 0.1, "lr": 1e-2},
                                {"reset_interval": 4, "t_max": 8, "lr": 1e-2}], ids=["reset", "t_max"])
def test_stable_spam_foreach_equals_the_per_parameter_step(hp, chunk_numel, monkeypatch):
    """9 steps across momentum resets (bias correction restarted), a spike at step 5 (AdaClip): every
    element through the foreach kernel every step; weights at rtol 1e-6 (addcdiv against div and add,
    as AdamW's foreach), moments too."""
    ref, ref_opt, ref_calls = _run(False, chunk_numel, hp, monkeypatch)
    got, got_opt, calls = _run(None, chunk_numel, hp, monkeypatch)
    assert ref_calls == []
    assert sum(calls) == 9 * sum(math.prod(s) for s in SHAPES)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        for k, v in ref_opt.state[a].items():
            torch.testing.assert_close(got_opt.state[b][k], v, rtol=1e-6, atol=1e-9)
