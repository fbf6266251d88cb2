"""The first step of an unprojected batch of matrices (``racs``, ``adamw_sn``, ``adagrad_sn`` on ``[..., A, B]``
weights) allocates each stacked state entry at once (``LowMemOptimizer._init_matrices``: the first matrix's state
broadcast into the stack, issue 15), not matrix by matrix: the state is bit for bit, stride for stride, the
per-matrix allocation's (the reference below: each matrix's own ``_init_matrix`` copied into its slot), so a
checkpoint written before resumes, and the first step's kernels no longer grow with the number of matrices
(counted on meta tensors: the CUDA code path)."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.bench_launches import LaunchCounter
from lowmem.optim import create_optimizer
from lowmem.optim import engine as E

NAMES = ["racs", "adamw_sn", "adagrad_sn"]
PRECISIONS = {"fp32": (torch.float32, {}), "bf16_kahan": (torch.bfloat16, {"kahan_summation": True}),
              "bf16_sr": (torch.bfloat16, {"bf16_stochastic_round": True})}


def _opt(name, p, **hp):
    group = {"params": [p], **({} if name == "racs" else {"subset_norm": True}), **hp}
    return create_optimizer([group], name, lr=1e-2)


def _per_matrix_state(opt, p):
    """The state of batch ``p`` as the per-matrix allocation makes it: each matrix's ``_init_matrix`` stacked."""
    group, lead = opt.param_groups[0], p.shape[:-2]
    state: dict[str, torch.Tensor] = {}
    for e in range(math.prod(lead)):
        idx = E.matrix_index(e, lead)
        sub: dict[str, torch.Tensor] = {}
        opt._init_matrix(E.matrix_of(p, idx), group, sub, matrix=(p, e))
        for k, v in sub.items():
            if e == 0:
                state[k] = v if k in E.MATRIX_SHARED_KEYS else E._stack_like(v, lead)
            if k not in E.MATRIX_SHARED_KEYS:
                E.matrix_of(state[k], idx).copy_(v)
    return state


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        assert (x.shape, x.stride(), x.dtype, x.device) == (y.shape, y.stride(), y.dtype, y.device), k
        assert torch.equal(x.view(torch.uint8) if x.dim() else x, y.view(torch.uint8) if y.dim() else y), k


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("name", NAMES)
def test_the_batch_state_is_the_per_matrix_allocation(name, precision):
    dtype, hp = PRECISIONS[precision]
    for shape in [(5, 12, 8), (4, 6, 20)] + ([] if name == "racs" else [(2, 3, 8, 8)]):
        p = torch.nn.Parameter(torch.randn(shape).to(dtype))
        opt = _opt(name, p, **hp)
        opt.materialize_state()
        state = opt.state[p]
        _same(state, _per_matrix_state(opt, p))


@pytest.mark.parametrize("name", NAMES)
def test_steps_and_a_resumed_checkpoint_match_the_per_matrix_allocation(name, tmp_path):
    """The batch stepped from the broadcast state and from the per-matrix one (put in its place before the first
    step) is equal bit for bit; a checkpoint of the latter (what the per-matrix allocation wrote) resumes."""
    torch.manual_seed(0)
    init = torch.randn(4, 12, 8)
    grads = [torch.randn(4, 12, 8) * 10 ** (i % 3) for i in range(4)]
    runs = []
    for reference in (False, True):
        p = torch.nn.Parameter(init.clone())
        opt = _opt(name, p)
        if reference:
            opt.state[p].update(_per_matrix_state(opt, p))
        for g in grads[:2]:
            p.grad = g.clone()
            opt.step()
        runs.append((p, opt))
    (p0, o0), (p1, o1) = runs
    assert torch.equal(p0, p1)
    torch.save(o1.state_dict(), tmp_path / "ckpt.pt")
    p2 = torch.nn.Parameter(p1.detach().clone())
    o2 = _opt(name, p2)
    o2.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    for g in grads[2:]:
        for p, o in ((p0, o0), (p2, o2)):
            p.grad = g.clone()
            o.step()
    assert torch.equal(p0, p2)
    for k, v in o0.state[p0].items():
        assert torch.equal(v, o2.state[p2][k]), k


@pytest.mark.parametrize("name", NAMES)
def test_first_step_kernels_do_not_grow_with_the_matrices(name):
    """On meta tensors the first step of 8 or 32 matrices launches the same kernels (was 2 per state entry per
    matrix more: 96 more for racs' 3 entries)."""
    counts = []
    for experts in (8, 32):
        p = torch.nn.Parameter(torch.empty(experts, 64, 32, device="meta"))
        p.grad = torch.zeros_like(p)
        opt = _opt(name, p)
        with LaunchCounter() as c:
            opt.step()
        counts.append(c.result().kernels)
    assert counts[0] == counts[1], counts
