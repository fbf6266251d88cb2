"""Online Subspace Descent's basis steps of a bucket (issue 15): the PCA-loss gradients of the parameters of
one shape stacked (``osd.pca_loss_grad_stacked``: per parameter only the products with its gradient, the
rest one batched kernel each), equal to each parameter's ``osd.pca_loss_grad`` to float32 rounding; a
fixed number of kernels per batch (counted on meta tensors, the non-CPU path); the stacks within the
bucket's counted transient."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.optim.functional import osd as OSD
from lowmem.optim.registry import create_optimizer


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("with_proj", [True, False])
@pytest.mark.parametrize("m,n,r", [(24, 40, 4), (96, 160, 16)])
def test_stacked_pca_gradient_equals_each_parameters(side, with_proj, m, n, r):
    """Three parameters of one shape (gradients of different norms, a bias of the bases away from
    orthonormal), with and without the step's projected gradient."""
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(m, n, generator=gen) * s for s in (1.0, 1e-3, 30.0)]
    shape = (m, r) if side == "left" else (r, n)
    bases = [torch.linalg.qr(torch.randn(max(shape), min(shape), generator=gen))[0] for _ in gs]
    bases = [(b if side == "left" else b.t().contiguous()) * 1.1 for b in bases]
    norms = torch.stack([torch.linalg.vector_norm(g) for g in gs])
    projs = [(b.t() @ g if side == "left" else g @ b.t()) if with_proj else None for b, g in zip(bases, gs)]
    out = OSD.pca_loss_grad_stacked(bases, gs, side, norms, projs)
    assert out.shape == (3, *shape)
    for i, (b, g, nm, pj) in enumerate(zip(bases, gs, norms, projs)):
        ref = OSD.pca_loss_grad(b, g, side, nm, pj)
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-6, msg=f"{i}")
        assert ref.abs().max() > 1e-5  # (not a vanishing gradient)


class _Kernels(TorchDispatchMode):
    """Ops dispatched on meta tensors (views excluded) and device-to-host reads (answered True)."""

    VIEWS = {"view", "t", "transpose", "unsqueeze", "select", "slice", "diagonal", "unbind", "as_strided",
             "alias", "expand", "detach", "_unsafe_view", "squeeze"}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func is torch.ops.aten._local_scalar_dense.default:
            self.ops["<read>"] += 1
            return True if args[0].dtype is torch.bool else 1.0
        on_device = any(isinstance(a, torch.Tensor) and a.device.type == "meta"
                        for a in [*args, *(kwargs or {}).values()]
                        for a in (a if isinstance(a, (list, tuple)) else [a]))
        if name not in self.VIEWS and on_device:  # (the CPU bookkeeping's ops launch nothing)
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _basis_step_kernels(k: int, side_shape: tuple[int, int]) -> tuple[int, collections.Counter]:
    ps = [torch.nn.Parameter(torch.zeros(side_shape, device="meta")) for _ in range(k)]
    opt = create_optimizer(ps, "osd_adamw", rank=8)
    opt.materialize_state()
    group, P = opt.param_groups[0], opt.recipe.projection
    states = [opt.state[p] for p in ps]
    gs = [torch.zeros(p.shape, device="meta") for p in ps]
    lows = [P.down(g, st, group) for g, st in zip(gs, states)]
    with _Kernels() as c:
        P.foreach_post_update(gs, states, group, lows)
    return sum(v for key, v in c.ops.items() if key != "<read>"), c.ops


@pytest.mark.parametrize("shape", [(64, 96), (96, 64)], ids=["left", "right"])
def test_basis_steps_of_a_bucket_take_a_fixed_number_of_kernels_per_batch(shape):
    """16 vs 8 parameters of one shape in one bucket, rank 8, 3 batches each (the stacks within
    ``subspace.fold_budget`` of the bucket): 8 more parameters cost one kernel each (the product with
    the gradient, ``G A^T`` / ``C^T G``); the norms, the usability flags, the stacked PCA gradient and
    the AdamW basis step a fixed number per bucket or batch (the per-parameter path: 13 per parameter)."""
    n8, _ = _basis_step_kernels(8, shape)
    n16, ops = _basis_step_kernels(16, shape)
    assert n16 - n8 == 8, ops
    assert ops["mm"] == 16 and ops["bmm"] == 3 * 3 and ops["baddbmm_"] == 3 and ops["_foreach_norm"] == 1, ops
    assert ops["<read>"] == 1, ops


@pytest.mark.parametrize("proj_type,rank,shape,chunk_numel", [("std", 32, (128, 128), None),
                                                           ("reverse_std", 16, (512, 64), None),
                                                           ("std", 32, (128, 128), 2**16)])
def test_osd_bucket_stays_within_the_reported_transient(proj_type, rank, shape, chunk_numel):
    """The live tensors of a steady step (PeakTracker) through the engine's multi-tensor path stay
    within ``step_transient_bytes()`` of a step without a refresh, less MKL's kept GEMM buffer: the
    stacked basis gradients of a batch within the bucket's freed directions (``subspace.fold_budget``).
    8 weights of one shape whose bases are as large as their projected gradients (128 x 128 at rank 32)
    or 8x larger (512 x 64, a left basis of the longer side); whole, or in buckets of 2^16 projected
    elements. (Batches of 4x the budget, or the whole bucket in one: over.)"""
    import torch.nn as nn

    from lowmem.memory.measure import PeakTracker

    torch.manual_seed(0)
    mod = nn.Module()
    mod.ps = nn.ParameterList([nn.Parameter(torch.randn(shape)) for _ in range(8)])
    opt = create_optimizer([{"params": list(mod.ps), "rank": rank, "proj_type": proj_type}], "osd_adamw")
    opt.chunk_numel = chunk_numel
    for p in mod.ps:
        p.grad = torch.randn(p.shape)
    opt.step()
    opt.step()
    tracker = PeakTracker(mod, opt, device="cpu")
    with tracker:
        opt.step()
    measured = tracker.maxima["optimizer_transient"]
    reported = opt._transient_bytes(steady=True) - opt._kept_gemm_bytes()
    assert measured <= reported, (measured, reported)
