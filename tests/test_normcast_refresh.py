"""A refresh step's non-finite check read with the due refreshes' usability (``LowMemOptimizer._finite_and_pre_check``)
takes the grouped norms of ``engine._norms`` (issue 15): one multi-tensor norm per dtype, its stack cast to float32
once, instead of one cast per bfloat16 norm (a bfloat16 368M Llama's GaLore refresh step: 219 casts). The due
gradients lead the list, so they are the first norms of each dtype's group: one usability ``all`` per dtype of
them (``engine._runs``). The decisions are the per-parameter ones (``skip_nonfinite=False``: each refresh reads its
own), and what the check allocates is ``_check_bytes()``, which counts the groups in any order (the due ones first
may put a group before one it followed)."""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.optim import create_optimizer
from lowmem.optim import engine as E
from lowmem.optim import subspace as S
from tests.test_nonfinite_check_bytes import _AllLive

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


class _Ops(TorchDispatchMode):
    """The aten operations dispatched under it, by name (a CPU stand-in for the kernels: the multi-tensor norm is
    one of them, whatever the number of its tensors)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _galore(dtypes, seed=0):
    torch.manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(48, 40).to(d)) for d in dtypes] + [torch.nn.Parameter(torch.randn(40))]
    opt = create_optimizer([{"params": ps[:-1], "rank": 8, "update_proj_gap": 2}, {"params": ps[-1:]}],
                           "galore_adamw", lr=1e-2)
    return ps, opt


def _check_ops(dtypes):
    """The operations of each step's check (4 steps; refreshes at steps 1 and 3)."""
    ps, opt = _galore(dtypes)
    orig, seen = opt._all_finite, []

    def counted(work, lows=None, tokens=None):
        with _Ops() as m:
            ok = orig(work, lows, tokens)
        seen.append(m.ops)
        return ok

    opt._all_finite = counted
    for _ in range(4):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    return seen


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_a_refresh_check_costs_the_same_whatever_the_number_of_weights(dtype):
    """3 or 12 projected weights of one dtype and a float32 vector: the refresh step's check dispatches the same
    operations (per dtype a multi-tensor norm and a stack, a bfloat16 stack's one float32 cast, their
    concatenation, the comparison, its ``all``, the due norms' ``all``: was one cast per bfloat16 norm)."""
    few, many = _check_ops([dtype] * 3), _check_ops([dtype] * 12)
    assert few == many
    refresh = few[0]
    assert refresh == few[2] and refresh["_to_copy"] == (dtype is BF16) and refresh["_foreach_norm"] == 1 + (dtype is BF16)
    assert refresh["all"] == 2 and few[1]["all"] == 1  # (the due refreshes' usability, at the refresh steps only)


def test_due_weights_of_two_dtypes_read_one_usability_per_dtype():
    """Due float32 and bfloat16 weights: their norms lead each dtype's group (two runs of the stack), one
    ``all`` each; one cast, that of the bfloat16 stack."""
    refresh = _check_ops([F32, BF16, F32, BF16, BF16])[0]
    assert (refresh["all"], refresh["_to_copy"], refresh["_foreach_norm"], refresh["cat"]) == (3, 1, 2, 1)
    x, y, z = (torch.zeros(1) for _ in range(3))
    assert E._runs([x, y, z, x], {id(x), id(z)}) == [(0, 1), (2, 4)] and E._runs([y], set()) == []


def _usable_reads(monkeypatch):
    calls = []
    orig = S._usable
    monkeypatch.setattr(S, "_usable", lambda g, norm=None: calls.append(tuple(g.shape)) or orig(g, norm))
    return calls


@pytest.mark.parametrize("zero", [None, 0, 1, 3, 4])
def test_a_zero_gradient_of_either_dtype_fails_the_read_and_steps_as_before(zero, monkeypatch):
    """Mixed float32 / bfloat16 weights (due ones in both groups of the stack), one gradient zeroed at the second
    refresh (index ``zero``: the first or a later norm of either dtype's run; ``None``: none): the check's flag
    fails exactly then (each refresh reads its own usability, warns and keeps its subspace), else no weight is read
    on its own; weights and states bit-equal to the per-parameter reference (``skip_nonfinite=False``)."""
    dtypes = [F32, BF16, F32, BF16, BF16]
    (ps_a, fast), (ps_b, ref) = _galore(dtypes), _galore(dtypes)
    ref.skip_nonfinite = False
    calls = _usable_reads(monkeypatch)
    torch.manual_seed(1)
    for step in range(4):
        grads = [torch.randn_like(p) for p in ps_a]
        if step == 2 and zero is not None:
            grads[zero].zero_()
        for p, q, g in zip(ps_a, ps_b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        before = len(calls)
        with warnings.catch_warnings(record=True) as wa:
            warnings.simplefilter("always")
            fast.step()
        fast_reads = len(calls) - before
        with warnings.catch_warnings(record=True) as wb:
            warnings.simplefilter("always")
            ref.step()
        msgs = [str(w.message) for w in wa if "refresh" in str(w.message)]
        assert msgs == [str(w.message) for w in wb if "refresh" in str(w.message)]
        if step == 2:
            assert (fast_reads, bool(msgs)) == ((5, True) if zero is not None else (0, False))
    for p, q in zip(ps_a, ps_b):
        assert torch.equal(p, q)
        for k, v in ref.state[q].items():
            assert torch.equal(fast.state[p][k], v), k


def test_the_due_weights_first_may_reorder_the_groups_and_the_count_holds_it():
    """Two float64 vectors before a float32 weight: ``_all_finite`` stacks float64's norms first (32 B: 16 each,
    their 0-d norms beside their stack), a refresh's check the due float32 weight's first, then float64's beside its
    float32 stack (36 B). ``_check_bytes()`` is the larger (each group last): exactly the refresh step's."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(40, dtype=F64)) for _ in range(2)] + [torch.nn.Parameter(torch.randn(48, 40))]
    opt = create_optimizer([{"params": ps[:2]}, {"params": ps[2:], "rank": 8, "update_proj_gap": 2}],
                           "galore_adamw", lr=1e-2)
    orig, peaks = opt._all_finite, []

    def measured(work, lows=None, tokens=None):
        with _AllLive() as m:
            ok = orig(work, lows, tokens)
        peaks.append(m.peak)
        return ok

    opt._all_finite = measured
    for _ in range(4):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    specs = [(p.numel(), p.dtype, p.device) for p in ps]
    assert E._all_finite_bytes(specs) == 32
    assert peaks == [36, 32, 36, 32] and opt._check_bytes() == 36, (peaks, opt._check_bytes())
