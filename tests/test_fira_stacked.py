"""Fira's residuals of a same-shape batch stacked (issue 15): ``FiraResidual.foreach_fold`` off the CPU
computes the residuals ``G - scale P P^T G`` of a few parameters of one shape as one ``baddbmm_`` on a copy
of their gradients (``Projection.residuals_stacked``) and their channel norms as one ``vector_norm``,
instead of an ``addmm`` and a ``vector_norm`` per parameter. ``subspace.STACK_BY_SHAPE`` runs either
path on any device: equal to the per-parameter residuals to float32 rounding (the optimizer's weights and
limiter state over several steps), fewer kernels on meta tensors (the non-CPU path), and the stacks
within ``step_transient_bytes()`` (live tensors measured)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.optim import subspace
from lowmem.optim.registry import create_optimizer

# three of one shape on each side (the left side's bases are column-major), two larger ones (their stacks
# beyond the bucket's fold budget: one parameter at a time)
SHAPES = [(16, 12)] * 3 + [(12, 20)] * 3 + [(64, 64)] * 2


def _run(name, hp, stack, foreach=True, steps=4, monkeypatch=None, spy=None):
    """Weights and state after ``steps`` steps (whole tensors: one block of rows each), residuals stacked
    or not; ``spy``: a list the stacked batches' sizes are appended to."""
    gen = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = create_optimizer(ps, name, rank=8, update_proj_gap=3, lr=1e-2, eps=1e-3, **hp)
    opt.chunk_numel = None
    for g in opt.param_groups:
        g["foreach"] = None if foreach else False
    with monkeypatch.context() as mp:
        mp.setattr(subspace, "STACK_BY_SHAPE", stack)
        if spy is not None:
            orig = subspace.SubspaceProjection.residuals_stacked

            def counted(self, gs, *args, **kwargs):
                spy.append((len(gs), tuple(gs[0].shape)))
                return orig(self, gs, *args, **kwargs)

            mp.setattr(subspace.SubspaceProjection, "residuals_stacked", counted)
        for step in range(steps):
            for p in ps:  # (a larger gradient at the third step: the limiter acts)
                p.grad = torch.randn(p.shape, generator=gen) * (20.0 if step == 2 else 1.0)
            opt.step()
    return ps, opt


@pytest.mark.parametrize("name,hp", [("fira_adamw", {"weight_decay": 0.1}), ("fira_adamw", {"scale": 0.5}),
                                     ("fira_adamw", {"proj_type": "reverse_std"}),
                                     ("fira_adamw8bit", {"min_quant_size": 16, "block_size": 64})])
def test_stacked_residuals_equal_each_parameters(name, hp, monkeypatch):
    """4 steps with a refresh at the first and fourth and a limited third: the weights and the limiters'
    norms of the stacked residuals (forced on the CPU) against the per-parameter residuals of the same
    multi-tensor step and against the per-parameter step (``foreach=False``, the reference
    tests/test_reference.py checks against Fira's paper loop), rtol 2e-6; the moments bit for bit. Both
    sides were stacked, a batch of 3 each step (the 64 x 64 weights one at a time)."""
    seen: list[tuple[int, tuple]] = []
    fast, fo = _run(name, hp, True, monkeypatch=monkeypatch, spy=seen)
    assert sorted(set(seen)) == [(3, (12, 20)), (3, (16, 12))] and len(seen) == 8, seen
    for stack, foreach in ((False, True), (False, False)):
        ref, ro = _run(name, hp, stack, foreach, monkeypatch=monkeypatch)
        for i, (a, b) in enumerate(zip(fast, ref)):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7, msg=lambda m: f"{name} {hp} param {i}: {m}")
            for key, x in fo.state[a].items():
                y = ro.state[b][key]
                if key == "fira_prev_norm":
                    torch.testing.assert_close(x, y, rtol=2e-6, atol=0, msg=lambda m: f"{key} {i}: {m}")
                elif foreach:  # (the multi-tensor moments: the same kernels whatever the residuals)
                    assert torch.equal(x, y), (key, i)


def test_residuals_stacked_equals_residual_rows():
    """``SubspaceProjection.residuals_stacked`` (one ``baddbmm_``) against ``residual_rows`` of each
    parameter's whole rows (``addmm``), left and right bases, rtol 1e-6; the gradients untouched."""
    P = subspace.SubspaceProjection()
    for shape, proj_type in (((24, 16), "std"), ((16, 40), "std"), ((20, 20), "left"), ((20, 20), "right")):
        gen = torch.Generator().manual_seed(1)
        ps = [nn.Parameter(torch.randn(shape, generator=gen)) for _ in range(3)]
        opt = create_optimizer(ps, "fira_adamw", rank=4, proj_type=proj_type, projection="random")
        group = opt.param_groups[0]
        states, gs, lows = [], [], []
        for p in ps:
            st = opt.state[p]
            opt._init_state(p, group, st)
            g = torch.randn(shape, generator=gen)
            P.refresh(g, st, group)
            states.append(st)
            gs.append(g)
            lows.append(P.down(g, st, group))
        copies = [g.clone() for g in gs]
        out = P.residuals_stacked(gs, torch.stack(lows), states, group, -0.75)
        for g, c in zip(gs, copies):
            assert torch.equal(g, c)
        for j, (g, low, st) in enumerate(zip(gs, lows, states)):
            torch.testing.assert_close(out[j], P.residual_rows(g, low, st, group, 0, shape[0], -0.75), rtol=1e-6, atol=1e-6)
        assert P.stacked_residual_bytes(torch.Size(shape), group) * 3 == 4 * (out.numel() + sum(
            st.get("proj_left", st.get("proj_right")).numel() for st in states))


class _Kernels(TorchDispatchMode):
    """Dispatched aten operations on meta tensors that launch a kernel (views and allocations left out; a
    device read answered, as tests/test_foreach_fold_engine.py does)."""

    FREE = {"view", "_unsafe_view", "slice", "t", "unsqueeze", "squeeze", "as_strided", "detach", "alias", "expand",
            "select", "unbind", "empty", "empty_like", "new_empty", "empty_strided", "transpose", "permute",
            "_local_scalar_dense"}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket.__name__
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return True if args[0].dtype is torch.bool else (1.0 if args[0].is_floating_point() else 1)
        tensors = [x for a in args for x in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(x, torch.Tensor)]
        if op not in self.FREE and any(x.device.type == "meta" for x in tensors):
            self.ops[op] += 1
        return func(*args, **(kwargs or {}))


def _step_kernels(stack, monkeypatch):
    """Kernels of a steady third step of 16 meta weights of 256 x 64 at rank 32 (the right side: a
    projected gradient half the gradient), whole tensors; residuals stacked as off the CPU or not."""
    ps = [nn.Parameter(torch.zeros(256, 64, device="meta")) for _ in range(16)]
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = create_optimizer(ps, "fira_adamw", rank=32, update_proj_gap=100)
    opt.chunk_numel = None
    with monkeypatch.context() as mp:
        mp.setattr(subspace, "STACK_BY_SHAPE", stack)
        for _ in range(3):
            with _Kernels() as k:
                opt.step()
    return sum(k.ops.values()), k.ops


def test_stacked_residuals_dispatch_fewer_kernels(monkeypatch):
    """On meta tensors (the non-CPU path, stacked by default): the bucket's 16 weights fold in statistics
    batches of 7, 7 and 2 (``subspace.fold_budget``); each batch of 7 stacks its residuals 4 and 3 at a time
    (the stacks within the budget less the batch's norms), 5 kernels a stack (the bases, gradients and
    projected gradients stacked, ``baddbmm_``, ``vector_norm`` into the batch's norms) instead of an
    ``addmm`` and a ``vector_norm`` each and the norms' stack (15 a batch); the batch of 2 (below
    ``subspace.MIN_STACK``) one at a time as before: 10 kernels fewer a step."""
    n, ops = _step_kernels(None, monkeypatch)
    one, one_ops = _step_kernels(False, monkeypatch)
    assert one_ops["addmm"] == 16 and one_ops.get("baddbmm_", 0) == 0, one_ops
    assert ops["addmm"] == 2 and ops["baddbmm_"] == 4, ops
    assert one - n == 2 * (15 - 10), (n, one, ops, one_ops)


@pytest.mark.parametrize("rank", [32, 48])
@pytest.mark.parametrize("name", ["fira_adamw", "fira_adamw8bit"])
def test_stacked_residuals_stay_within_the_reported_transient(name, rank, monkeypatch):
    """The live tensors of a steady step (lowmem.memory.measure.PeakTracker) with the residuals stacked
    (forced on the CPU) stay within ``step_transient_bytes()`` of a step without a refresh, less MKL's kept
    GEMM buffer (not a tensor): each stack of gradients, bases and projected gradients within
    ``subspace.fold_budget`` (the multi-tensor direction's freed ``sqrt(v)``) less the batch's channel
    norms. 8 weights of 256 x 64 (right side) and 4 of 64 x 192 (left), whole tensors, at ranks where
    stacks of 3-5 happen."""
    from lowmem.memory.measure import PeakTracker

    torch.manual_seed(0)
    mod = nn.Module()
    mod.ps = nn.ParameterList([nn.Parameter(torch.randn(s)) for s in [(256, 64)] * 8 + [(64, 192)] * 4])
    opt = create_optimizer([{"params": list(mod.ps), "rank": rank, "update_proj_gap": 200, "projection": "random"}],
                           name, **({"min_quant_size": 16} if name.endswith("8bit") else {}))
    opt.chunk_numel = None
    for p in mod.ps:
        p.grad = torch.randn(p.shape)
    seen: list[int] = []
    orig = subspace.SubspaceProjection.residuals_stacked

    def counted(self, gs, *args, **kwargs):
        seen.append(len(gs))
        return orig(self, gs, *args, **kwargs)

    monkeypatch.setattr(subspace, "STACK_BY_SHAPE", True)
    monkeypatch.setattr(subspace.SubspaceProjection, "residuals_stacked", counted)
    opt.step()
    opt.step()
    tracker = PeakTracker(mod, opt, device="cpu")
    with tracker:
        opt.step()
    assert seen and min(seen) >= subspace.MIN_STACK, seen
    measured = tracker.maxima["optimizer_transient"]
    reported = opt._transient_bytes(steady=True) - opt._kept_gemm_bytes()
    assert measured <= reported, (measured, reported)
