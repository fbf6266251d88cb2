"""SinkGD's batched stack off the CPU (issue 15: the GPU step is launch-bound): the squared scalings of
a stack of same-shape matrices in closed form, one ``bmm`` per half-iteration
(functional.sinkgd.sinkhorn_scalings_stacked(batched=True), the default on a non-CPU device). Forced
on the CPU here: equal to the per-matrix scalings and to the per-parameter steps up to float32
rounding; on meta tensors (the CUDA code path) its kernel count does not grow with the stack."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.optim.functional import sinkgd as F
from lowmem.optim.recipes import normalized
from lowmem.optim.registry import create_optimizer


def test_batched_scalings_equal_the_per_matrix_ones():
    """(r, c) of each matrix against sinkhorn_scalings (one row block) at rtol 1e-5, also at a
    sinkhorn_iters of 1 and 7; a zero row, a zero column and a zero matrix keep scalings of 0."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(5, 24, 40, generator=gen) * torch.logspace(-3, 2, 40)  # columns of very different scale
    g[1, 3] = 0
    g[2, :, 7] = 0
    g[3] = 0
    for iters in (1, 5, 7):
        r, c = F.sinkhorn_scalings_stacked(g.square(), iters, batched=True)
        for i in range(5):
            ri, ci = F.sinkhorn_scalings(lambda a, b, gi=g[i]: gi[a:b], [(0, 24)], 24, 40, iters)
            torch.testing.assert_close(r[i], ri, rtol=1e-5, atol=0)
            torch.testing.assert_close(c[i], ci, rtol=1e-5, atol=0)
    assert r[1, 3] == 0 and c[2, 7] == 0 and not r[3].any() and not c[3].any()


def test_batched_scalings_default_only_off_the_cpu(monkeypatch):
    """batched=None: the per-matrix products (bit for bit with sinkhorn_scalings) on the CPU, the batched
    form on another device (meta)."""
    calls = []
    orig = F._squared_scalings_batched
    monkeypatch.setattr(F, "_squared_scalings_batched", lambda *a: calls.append(a[0].device.type) or orig(*a))
    F.sinkhorn_scalings_stacked(torch.rand(2, 16, 16), 3)
    F.sinkhorn_scalings_stacked(torch.empty(2, 16, 16, device="meta"), 3)
    assert calls == ["meta"]


SHAPES = [(16, 16)] * 4 + [(24, 40)] * 2 + [(40, 24)] * 2 + [(16,), (48, 40)]


def _run(batched, foreach, chunk_numel, hp, steps=4):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = create_optimizer(ps, "sinkgd", foreach=foreach, **hp)
    opt.chunk_numel = chunk_numel
    with pytest.MonkeyPatch.context() as mp:
        if batched:
            mp.setattr(normalized, "sinkgd_foreach_", functools.partial(F.sinkgd_foreach_, batched=True))
        for step in range(steps):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen) * (1 + step % 3)
                if step == 2 and p.shape == (24, 40):
                    p.grad.zero_()
            opt.step()
    return ps


@pytest.mark.parametrize("hp", [{"lr": 1e-2, "scale": 0.5},
                                {"lr": 1e-2, "scale": 0.5, "weight_decay": 0.1, "sinkhorn_iters": 2}])
@pytest.mark.parametrize("chunk_numel", [None, 1024])
def test_batched_foreach_step_equals_the_per_parameter_step(hp, chunk_numel):
    """The foreach step with the batched stacks forced on the CPU against the per-parameter step
    (foreach=False: sr_sinkhorn whole, the row-block scalings chunked), 4 steps with a zero gradient:
    rtol 1e-5; and the weights moved."""
    ref = _run(False, False, chunk_numel, hp)
    got = _run(True, None, chunk_numel, hp)
    start = _run(False, False, chunk_numel, hp, steps=0)
    for a, b, s in zip(ref, got, start):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert (a - s).abs().max() > 1e-3


class _Kernels(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in ("view", "unsqueeze", "squeeze", "select", "empty", "unbind", "detach"):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _stack_kernels(k):
    ps = [torch.empty(64, 48, device="meta") for _ in range(k)]
    gs = [torch.empty_like(p) for p in ps]
    with _Kernels() as c:
        F.sinkgd_foreach_(ps, gs, 5, 1e-3, 0.1, 5e-5)
    return c.n


def test_batched_stack_kernels_do_not_grow_with_the_stack():
    """On meta tensors (the CUDA code path): the same kernel count for a stack of 2 and of 16 matrices,
    5 iterations in at most 60 kernels (4 per half-iteration, the bmm included, plus the stacks and the
    step; 50 measured)."""
    assert _stack_kernels(2) == _stack_kernels(16) <= 60
