"""Subset-Norm's gradient norms of a same-shape batch stacked (issue 15): ``SubsetNormStep.foreach_fold`` off
the CPU (``subspace.stacks_by_shape``) copies 3 or more whole gradients of one shape and side into a stack
and takes their row / column norms with one ``vector_norm``, instead of one per parameter, within the room
the engine counts for the bucket's first combine-back. ``subspace.STACK_BY_SHAPE`` runs either path on any
device: equal to the per-parameter norms (the statistics bit for bit on the CPU, the weights to float32
rounding as the fold's), fewer kernels on meta tensors, live tensors within ``step_transient_bytes()``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lowmem.optim import subspace
from lowmem.optim.recipes.subset_norm import SubsetNormStep
from lowmem.optim.registry import create_optimizer
from tests.test_foreach_subset_norm import _assert_equal, _run

# a larger weight first (the room of its combine-back), four of one shape on the right side (per-row
# statistics), three on the left (per-column)
PROJECTED = [(96, 64)] + [(64, 16)] * 4 + [(16, 48)] * 3


def _spy(monkeypatch):
    """Sizes of the stacks ``_stacked_norms`` took (the number of parameters given stacked norms per call)."""
    seen: list[int] = []
    orig = SubsetNormStep._stacked_norms

    def spy(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        seen.append(len(out))
        return out

    monkeypatch.setattr(SubsetNormStep, "_stacked_norms", spy)
    return seen


@pytest.mark.parametrize("name,hp", [("adamw_snsm", {"weight_decay": 0.1}),
                                     ("adamw_snsm", {"projection": "rsvd", "scale": 0.5, "free_lr_scale": 0.3}),
                                     ("adagrad_snsm", {"weight_decay": 0.1})])
def test_stacked_norms_equal_each_parameters(name, hp, monkeypatch):
    """5 steps (refreshes at 1, 3, 5), whole tensors (``chunk_numel=None``): the stacked norms (forced on
    the CPU; the 4 right-side and the 3 left-side weights each one stack) against the same multi-tensor
    step's per-parameter norms, the statistics and momenta bit for bit, the weights too (the same fold);
    and against the per-parameter step (``foreach=False``), as tests/test_foreach_subset_norm.py."""
    seen = _spy(monkeypatch)
    monkeypatch.setattr(subspace, "STACK_BY_SHAPE", True)
    fast = _run(name, hp, None, None, monkeypatch=monkeypatch, projected=PROJECTED)
    assert seen == [7] * 5, seen
    monkeypatch.setattr(subspace, "STACK_BY_SHAPE", False)
    one = _run(name, hp, None, None, monkeypatch=monkeypatch, projected=PROJECTED)
    assert seen == [7] * 5 + [0] * 5, seen
    _assert_equal(fast, one)
    ref = _run(name, hp, False, None, monkeypatch=monkeypatch, projected=PROJECTED)
    _assert_equal(fast, ref, rounded=True)


def test_stacked_norms_dispatch_fewer_kernels(monkeypatch):
    """On meta tensors (the non-CPU path, stacked by default), a steady step of a 512 x 512 weight and 8 of
    256 x 128 at rank 16, whole tensors: the 8 norms of the right-side weights are one stack (2 kernels, the
    stack and one ``vector_norm``) instead of 8 ``vector_norm``: 6 kernels fewer a step."""
    from lowmem.bench_launches import LaunchCounter

    def kernels(stack):
        ps = [nn.Parameter(torch.zeros(s, device="meta")) for s in [(512, 512)] + [(256, 128)] * 8]
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt = create_optimizer([{"params": ps, "rank": 16, "update_proj_gap": 100}], "adamw_snsm", lr=1e-3)
        opt.chunk_numel = None
        with monkeypatch.context() as mp:
            mp.setattr(subspace, "STACK_BY_SHAPE", stack)
            for _ in range(2):  # (the first step refreshes)
                with LaunchCounter() as c:
                    opt.step()
        return c.counts["kernels"]

    assert kernels(False) - kernels(None) == 6


@pytest.mark.parametrize("name", ["adamw_snsm", "adagrad_snsm"])
def test_stacked_norms_stay_within_the_reported_transient(name, monkeypatch):
    """The live tensors of a steady step (lowmem.memory.measure.PeakTracker) with the norms stacked (forced
    on the CPU) stay within ``step_transient_bytes()`` of a step without a refresh, less MKL's kept GEMM
    buffer: a 192 x 128 weight first, then 16 of 128 x 48 (stacks of 10 and 6 within its combine-back's
    counted room; all 16 in one stack would not fit)."""
    from lowmem.memory.measure import PeakTracker

    torch.manual_seed(0)
    mod = nn.Module()
    mod.ps = nn.ParameterList([nn.Parameter(torch.randn(s)) for s in [(192, 128)] + [(128, 48)] * 16])
    opt = create_optimizer([{"params": list(mod.ps), "rank": 8, "update_proj_gap": 200}], name, lr=1e-3)
    opt.chunk_numel = None
    for p in mod.ps:
        p.grad = torch.randn(p.shape)
    seen = _spy(monkeypatch)
    monkeypatch.setattr(subspace, "STACK_BY_SHAPE", True)
    opt.step()
    opt.step()
    tracker = PeakTracker(mod, opt, device="cpu")
    with tracker:
        opt.step()
    assert seen and min(seen) >= subspace.MIN_STACK, seen
    measured = tracker.maxima["optimizer_transient"]
    reported = opt._transient_bytes(steady=True) - opt._kept_gemm_bytes()
    assert measured <= reported, (measured, reported)
