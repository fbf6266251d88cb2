"""Stable-SPAM's per-tensor statistics for a whole foreach bucket at once (issue 15: the GPU step is
launch-bound): StableSPAMStabilizer.transform_many stacks the bucket's float32 gradients of one size,
takes every row's max|g| (AdaClip), updates the per-tensor scalars as vectors, clips, takes every row's
norm (AdaGN) and scales on the stack. Equal to the per-tensor prepare / transform_chunk (the CPU's
foreach path) up to float32 rounding, with the same state; on meta tensors (the CUDA code path) a
kernel count that does not grow with the tensors. The engine uses it off the CPU
(LowMemOptimizer._stabilizes_many); forced on the CPU here."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.optim.engine import LowMemOptimizer
from lowmem.optim.recipes.compressed import STABLE_SPAM_RECIPE
from lowmem.optim.registry import create_optimizer
from lowmem.optim.stabilizers import Stabilizer, StableSPAMStabilizer

STAB = StableSPAMStabilizer()
GROUP = {"gamma1": 0.7, "gamma2": 0.9, "theta": 0.999, "reset_interval": 4, "t_max": None, "stats_step": "global",
         "eps": 1e-8}
SHAPES = [(12, 10), (12, 10), (8, 15), (10,), (7,), (120,), (3, 4)]


def _states(dtypes):
    return [{**{k: torch.zeros(()) for k in STAB.state_keys},
             "exp_avg": torch.ones(s, dtype=d), "exp_avg_sq": torch.ones(s, dtype=d)} for s, d in zip(SHAPES, dtypes)]


@pytest.mark.parametrize("group", [GROUP, {**GROUP, "t_max": 10, "stats_step": "since_reset", "gamma1": 0.85}])
def test_transform_many_equals_each_tensor(group):
    """8 steps (a 30x spike at step 3 that AdaClip clips, a zero gradient at step 5, resets at 4 and 8;
    one float64 tensor, taken alone): the gradients at rtol 1e-6 and the state (the three scalars,
    the moments zeroed on reset steps) equal to prepare / transform_chunk of each tensor."""
    dtypes = [torch.float32] * 6 + [torch.float64]
    gen = torch.Generator().manual_seed(0)
    got, ref = _states(dtypes), _states(dtypes)
    for t in range(1, 9):
        gs = [torch.randn(s, generator=gen, dtype=d) * (30.0 if t == 3 else 1.0) * (t != 5)
              for s, d in zip(SHAPES, dtypes)]
        for st in got + ref:
            st["exp_avg"].add_(1.0)
        a = STAB.transform_many(gs, got, group, t, STABLE_SPAM_RECIPE.moment)
        b = Stabilizer.transform_many(STAB, gs, ref, group, t, STABLE_SPAM_RECIPE.moment)
        for x, y, g in zip(a, b, gs):
            assert x.shape == g.shape and x.dtype == g.dtype
            torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
        for x, y in zip(got, ref):
            for k in y:
                torch.testing.assert_close(x[k], y[k], rtol=1e-6, atol=0)
        if t == 3:  # AdaClip clipped the spike
            assert a[0].abs().max() < 0.99 * (gs[0].abs().max() * b[0].norm() / gs[0].norm())
        if t in (4, 8):
            assert all(not st["exp_avg"].any() for st in got)


class _Kernels(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in ("view", "unsqueeze", "squeeze", "select", "empty", "unbind", "detach",
                                                 "alias", "_local_scalar_dense", "lift_fresh", "t", "slice"):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _kernels(k, sizes=((64, 48), (48,))):
    gs = [torch.empty(size, device="meta") for size in sizes for _ in range(k)]
    states = [{key: torch.zeros((), device="meta") for key in STAB.state_keys} for _ in gs]
    with _Kernels() as c:
        STAB.transform_many(gs, states, GROUP, 2, STABLE_SPAM_RECIPE.moment)
    return c.n


def test_transform_many_kernels_do_not_grow_with_the_tensors():
    """On meta tensors: 2 x 2 and 2 x 16 tensors of two sizes take the same number of kernels (45
    measured), and a second size adds at most 12 (the statistics' vectors are shared by all sizes:
    11 measured)."""
    assert _kernels(2) == _kernels(16) <= 50
    assert _kernels(2) - _kernels(2, sizes=((64, 48),)) <= 12


PSHAPES = [(12, 10), (12, 10), (8, 16), (10,), (7,), (30, 10)]


def _run(many, chunk_numel, hp, steps=9):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in PSHAPES]
    opt = create_optimizer(ps, "stable_spam", foreach=None if many else False, **hp)
    opt.chunk_numel = chunk_numel
    with pytest.MonkeyPatch.context() as mp:
        calls = []
        if many:
            mp.setattr(LowMemOptimizer, "_stabilizes_many", lambda self, device: True)
            orig = StableSPAMStabilizer.transform_many
            mp.setattr(StableSPAMStabilizer, "transform_many", lambda *a: calls.append(len(a[1])) or orig(*a))
        for step in range(steps):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen) * (30.0 if step == 4 else 1.0)
            opt.step()
    return ps, opt, calls


@pytest.mark.parametrize("hp", [{"lr": 1e-2, "reset_interval": 4}, {"lr": 1e-2, "reset_interval": 3, "t_max": 6,
                                                                     "stats_step": "since_reset"}])
@pytest.mark.parametrize("chunk_numel", [None, 128])
def test_engine_many_equals_the_per_parameter_step(hp, chunk_numel):
    """The foreach step with the buckets stabilized at once (forced on the CPU) against foreach=False:
    weights and state at rtol 1e-5 after 9 steps (a spike, resets); (30, 10) in pieces at chunk 128
    stays per tensor; the weights moved."""
    ref, ref_opt, _ = _run(False, chunk_numel, hp)
    got, got_opt, calls = _run(True, chunk_numel, hp)
    assert calls and (max(calls) >= 3 if chunk_numel is None else max(calls) >= 2)
    start = _run(False, chunk_numel, hp, steps=0)[0]
    for a, b, s in zip(ref, got, start):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        assert (a - s).abs().max() > 1e-3
        for k, v in ref_opt.state[a].items():
            torch.testing.assert_close(got_opt.state[b][k], v, rtol=1e-5, atol=1e-7)


def test_engine_counts_the_stacks(monkeypatch):
    """step_transient_bytes with the buckets stabilized at once counts transform_many's 9 bytes per
    element of the largest bucket."""
    ps = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(8)]
    opt = create_optimizer(ps, "stable_spam")
    opt.chunk_numel = None
    opt.materialize_state()
    before = opt.step_transient_bytes()
    monkeypatch.setattr(LowMemOptimizer, "_stabilizes_many", lambda self, device: True)
    assert opt.step_transient_bytes() >= 9 * 8 * 64 * 64 > before


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors the dispatched operations allocate (not views: outputs on a new storage),
    alive together at most (each freed when its tensor object goes)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _drop(self, nbytes, ptr):
        self.live -= nbytes
        self.seen.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in inputs or ptr in self.seen:  # (a view, or written in place / out=)
                continue
            nbytes = t.untyped_storage().nbytes()
            self.seen.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._drop, nbytes, ptr)
        return out


@pytest.mark.parametrize("sizes", [(16384,), (16384, 8192)])
def test_transform_many_transient_within_its_report(sizes):
    """A bucket of 4 tensors of each size: what transform_many allocates alive together (measured on
    the dispatched operations' outputs: every stack (4 bytes per element), then per size its clipped
    copy and mask (5)) is within transform_many_transient_bytes (9 bytes per element), and equal to it
    up to the scalars' vectors with one size."""
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(n, generator=gen) for n in sizes for _ in range(4)]
    states = [{k: torch.zeros(()) for k in STAB.state_keys} for _ in gs]
    numel = sum(g.numel() for g in gs)
    with _LiveBytes() as m:
        out = STAB.transform_many(gs, states, GROUP, 2, STABLE_SPAM_RECIPE.moment)
    del out
    report = STAB.transform_many_transient_bytes(numel, GROUP)
    assert m.peak <= report, (m.peak, report)
    assert m.peak >= 4 * numel + 5 * 4 * max(sizes), (m.peak, report)
    if len(sizes) == 1:
        assert m.peak > 0.99 * report
    assert STAB.transform_many_transient_bytes(numel, GROUP, torch.bfloat16) >= STAB.transient_bytes(numel, GROUP)
