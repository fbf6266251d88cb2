"""The non-finite check's norms grouped by dtype (``engine._norms``, issue 15): one multi-tensor norm per device and
dtype, its stack cast to float32 once, instead of one cast per bfloat16 norm (a 368M bfloat16 Llama's step: 219 of
549 kernels). The decisions are the ones of the per-norm casts (the reference below: the check as it was), each
norm is paired with its own tensor (the float16 recheck of a failing step reads the right one), and the kernels
of the check no longer grow with the number of bfloat16 tensors (counted on meta tensors, the CUDA code path)."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.bench_launches import LaunchCounter
from lowmem.optim import create_optimizer
from lowmem.optim import engine as E

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def _reference(tensors):
    """The check as it was before the grouping: each tensor's norm in its dtype cast to float32 alone, in the
    tensors' order; a float16 norm that overflowed rechecked piecewise."""
    values = [torch._foreach_norm([t])[0].float().item() for t in tensors]
    return all(v < E.MAX_GRAD_NORM or (E._narrow(t.dtype) and not math.isnan(v) and E._norm_below(t))
               for v, t in zip(values, tensors))


def _mixed(dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7 + 3 * i, 5, generator=g).to(d) for i, d in enumerate(dtypes)]


DTYPES = [F32, BF16, F16, F32, BF16, F64, F16, BF16]


def test_each_norm_is_its_own_tensors_and_bit_equal_to_the_cast_one():
    ts = _mixed(DTYPES)
    norms, ordered = E._norms(ts)
    assert sorted(map(id, ordered)) == sorted(map(id, ts)) and len(ordered) == len(ts)
    assert [t.dtype for t in ordered] == [F32, F32, BF16, BF16, BF16, F16, F16, F64]  # (each dtype as it first appears)
    assert norms.dtype is F32 and norms.shape == (len(ts),)
    want = torch.stack([torch._foreach_norm([t])[0].float() for t in ordered])
    assert torch.equal(norms.view(torch.int32), want.view(torch.int32))
    one = [t.to(BF16) for t in ts]  # one dtype: the tensors' own order, the list itself
    assert E._norms(one)[1] is one


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("pos", [0, 1, 2, 4, 5, 7])
def test_a_bad_value_anywhere_skips_as_before(pos, bad):
    ts = _mixed(DTYPES, seed=pos)
    ts[pos].view(-1)[3] = float(bad)
    assert _reference(ts) is False
    assert E._all_finite(ts) is False


def test_float16_overflow_rechecks_its_own_tensor():
    """A float16 tensor whose norm overflows float16 (65504) but not the bound passes by its recheck; with a NaN in
    another tensor (of another dtype, before or after it) the step fails; a float16 tensor with an Inf fails. The
    recheck must read the float16 tensor the norm belongs to: paired with another tensor it would pass a NaN."""
    for pos in (0, 3, 6):
        ts = _mixed(DTYPES, seed=pos)
        big = torch.full((400, 300), 1000.0, dtype=F16)  # norm 3.5e5: inf in float16, finite in float32
        ts[pos] = big
        assert _reference(ts) is True and E._all_finite(ts) is True
        for other in (1, 5, 7):  # a NaN in a bfloat16 / float64 tensor: fails whatever the float16 recheck says
            bad = list(ts)
            bad[other] = bad[other].clone()
            bad[other].view(-1)[0] = float("nan")
            assert _reference(bad) is False and E._all_finite(bad) is False
        inf = list(ts)
        inf[pos] = big.clone()
        inf[pos][0, 0] = float("inf")
        assert _reference(inf) is False and E._all_finite(inf) is False


@pytest.mark.parametrize("pos", [0, 2, 5])
def test_the_optimizer_skips_a_mixed_dtype_step_with_a_nan(pos):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(6, 4).to(d)) for d in [F32, BF16, F32, BF16, F32, BF16]]
    opt = create_optimizer(ps, "adamw", lr=1e-2)
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[pos].grad[1, 1] = float("nan")
    before = [p.detach().clone() for p in ps]
    with pytest.warns(UserWarning, match="non-finite"):
        opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(a, p) for a, p in zip(before, ps))
    ps[pos].grad[1, 1] = 0.0
    opt.step()
    assert opt.skipped_steps == 1 and not torch.equal(before[pos], ps[pos])


def _check_kernels(tensors):
    with LaunchCounter() as c:
        assert E._all_finite(tensors)
    return c.result()


def test_the_check_launches_a_few_kernels_per_dtype_not_one_per_norm():
    """On meta tensors (the CUDA code path): bfloat16 gradients cost the multi-tensor norm, the stack, its float32
    cast, the comparison and its ``all`` (5, whatever their number; was 4 + one cast per tensor), as float32 ones
    cost 4; three dtypes 3 each, their concatenation and the two (11)."""
    for n in (3, 40):
        bf = [torch.empty(64, 32, dtype=BF16, device="meta") for _ in range(n)]
        f32 = [torch.empty(64, 32, device="meta") for _ in range(n)]
        assert _check_kernels(bf).kernels == 5
        assert _check_kernels(f32).kernels == 4
        mixed = [torch.empty(64, 32, dtype=(F32, BF16, F16)[i % 3], device="meta") for i in range(n)]
        r = _check_kernels(mixed)
        assert (r.kernels, r.syncs) == (11, 1), r
