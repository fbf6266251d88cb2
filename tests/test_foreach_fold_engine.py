"""The engine's projected multi-tensor step combines a bucket back at once when the combine rule offers
it (``LowMemOptimizer._fold_low_bucket``, ``CombineRule.foreach_fold``; issue 15): kernels of a steady
step on meta tensors (the non-CPU code path) grow by a few per parameter (its project-down GEMM and
its in-place update), not by the per-parameter combine-back's 17-20; float32 only, the others (and
``foreach=False``) combine back one at a time (tests/test_foreach_projected.py: equal to float32
rounding)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.optim.registry import create_optimizer


class _Kernels(TorchDispatchMode):
    """Dispatched aten operations that launch a kernel (views and allocations left out)."""

    FREE = {"view", "_unsafe_view", "slice", "t", "unsqueeze", "squeeze", "as_strided", "detach", "alias", "expand",
            "select", "unbind", "empty", "empty_like", "new_empty", "empty_strided", "transpose", "permute",
            "_local_scalar_dense"}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.reads = 0  # device-to-host reads of meta tensors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket.__name__
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            # (a device read, e.g. the step's non-finite check: a meta tensor has no value)
            self.reads += 1
            return True if args[0].dtype is torch.bool else (1.0 if args[0].is_floating_point() else 1)
        tensors = [x for a in args for x in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(x, torch.Tensor)]
        if op not in self.FREE and any(x.device.type == "meta" for x in tensors):  # (not the CPU step counters)
            self.ops[op] += 1
        return func(*args, **(kwargs or {}))


def _steady_step_kernels(name, count, chunk_numel, hp):
    ps = [torch.nn.Parameter(torch.zeros(96, 64, device="meta")) for _ in range(count)]
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = create_optimizer(ps, name, rank=16, weight_decay=0.1, **hp)
    opt.chunk_numel = chunk_numel
    for _ in range(3):  # (the mode answers the meta tensors' one device read of each step)
        with _Kernels() as k:
            opt.step()
    return sum(k.ops.values()), k.ops


@pytest.mark.parametrize("name,per_param,hp", [("apollo_adamw", 3, {}), ("apollo_mini", 2, {}),
                                               ("fira_adamw", 5, {}), ("galore_adamw", 2, {}),
                                               ("frugal", None, {})])
@pytest.mark.parametrize("chunk_numel", [None, 2**24])
def test_projected_step_kernels_grow_by_a_few_per_parameter(name, per_param, hp, chunk_numel, monkeypatch):
    """16 parameters of one shape against 8, a steady step: ``per_param`` more kernels for each of the 8
    more (APOLLO: the project-down, the gradient's channel norms, the update's ``addcmul_``; APOLLO-Mini
    no norm (``torch._foreach_norm``); Fira also the residual's ``addmm`` and norm and the update's
    ``addmm_``, its residuals one at a time (``subspace.STACK_BY_SHAPE`` off; stacked:
    tests/test_fira_stacked.py); GaLore the project-down and one ``addmm_``). FRUGAL: the project-down, the subspace part's
    ``addmm_``, the residual's GEMM and subtraction, and its ``sign_`` and update for a batch of up to 3
    parameters' blocks (``StateFreeResidual.foreach_fold_rest``; 7 per parameter before)."""
    monkeypatch.setattr("lowmem.optim.subspace.STACK_BY_SHAPE", False)
    n8, _ = _steady_step_kernels(name, 8, chunk_numel, hp)
    n16, ops = _steady_step_kernels(name, 16, chunk_numel, hp)
    if per_param is None:
        assert 4 * 8 < n16 - n8 <= 5 * 8, ops
    else:
        assert n16 - n8 == 8 * per_param, ops


@pytest.mark.parametrize("chunk_numel", [None, 2**24])
def test_online_subspace_descent_step_reads_the_device_once(chunk_numel):
    """osd_adamw, a steady step of 8 parameters in one bucket on meta tensors: one device read, the step's
    non-finite check, which carries whether every basis step's gradient is usable
    (``SubspaceProjection.pre_check``); was 2 (a read for the bucket's, ``foreach_post_update``), before
    that 9 (one per parameter's basis step)."""
    ps = [torch.nn.Parameter(torch.zeros(96, 64, device="meta")) for _ in range(8)]
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = create_optimizer(ps, "osd_adamw", rank=8)
    opt.chunk_numel = chunk_numel
    for _ in range(3):
        with _Kernels() as k:
            opt.step()
    assert k.reads == 1
