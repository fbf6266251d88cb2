"""The planned steady step's host work (issue 15, the engine's own time on many small tensors), pinned against
the forms it replaced.

``LowMemOptimizer._plan_foreach`` keys a piece into the open bucket without a dictionary round trip when the piece
has that bucket's group, step, device and class and fits it; every other piece is keyed as the step's loop keys it
(``_bucket_key``). The buckets it answers are compared here with the plan as it was written before (kept below as
the reference: the same keys in the same order, the same members), over groups, diverging step counters, tensors in
pieces of a small ``chunk_numel`` that fill buckets exactly, bucket classes and torch's fused AdamW kernel's
uncapped buckets. AdamW's fused buckets skip the per-tensor checks of ``functional.adam.fused_indices``
(``all_fit``): wherever the engine says so, those checks answer every index.
"""

from __future__ import annotations

import pytest
import torch

import lowmem.optim.functional.adam as FA
from lowmem.optim import create_optimizer
from lowmem.optim import engine as E


def _reference_plan(self, work):
    """``_plan_foreach``'s buckets and counters as written before the inlined keying (the reference)."""
    if self.recipe.stabilizers or not work:
        return None
    for key, p, grad, group, reduce, state, route in work:
        if (reduce is not None or route is None or route.path != "foreach" or route.token is None
                or route.step_view is None or route.step is not state.get("step")):
            return None
        t = float(route.step_view[0][()]) + 1
        if not (abs(t) <= route.step_view[1] and t.is_integer()):
            return None
    if len({id(w[6].step) for w in work}) != len(work):
        return None
    buckets, sizes, counters = {}, {}, []
    for key, p, grad, group, reduce, state, route in work:
        t = route.step.item() + 1
        counters.append((route.step_view[0], t))
        pieces, device, chunk, cls = route.pieces, route.device, route.chunk, route.cls
        if route.fused:
            buckets.setdefault((id(group), t, device, 1, -1), (group, []))[1].append((p, grad, state))
            continue
        for start, stop in pieces:
            bkey = self._bucket_key(sizes, (id(group), t, device, 1, False, cls), stop - start, chunk)
            piece = (p, grad, state) if stop - start == p.numel() else (
                p.view(-1)[start:stop], grad.view(-1)[start:stop],
                self.recipe.moment.chunk_state(state, start, stop, p.shape, group))
            buckets.setdefault(bkey, (group, []))[1].append(piece)
    return buckets, counters


def _same_tensor(a, b) -> bool:
    return (a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
                       and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype))


def _same_member(a, b) -> bool:
    if not (_same_tensor(a[0], b[0]) and _same_tensor(a[1], b[1])):
        return False
    sa, sb = a[2], b[2]
    return sa is sb or (sa.keys() == sb.keys() and all(_same_tensor(sa[k], sb[k]) for k in sa))


# (shapes: 40 + 24 = 64 fills a bucket of 64 exactly, one more element starts the next; 100 > 64 is in pieces;
# 0-element and 3-D tensors too)
SHAPES = [(40,), (24,), (1,), (8, 8), (100,), (0,), (5, 3), (2, 4, 8), (64,), (7,)]

CASES = {
    "lion_pieces": dict(name="lion", hp=dict(weight_decay=0.1), chunk=64),
    "lion_two_groups": dict(name="lion", hp=dict(), chunk=64, groups=True),
    "lion_counter_apart": dict(name="lion", hp=dict(), chunk=64, apart=True),
    "adamw_fused": dict(name="adamw", hp=dict(weight_decay=0.1), chunk=64, fused=True, groups=True, apart=True),
    "adamw_ops": dict(name="adamw", hp=dict(), chunk=64, fused=False, groups=True),
    "adafactor_classes": dict(name="adafactor", hp=dict(), chunk=64),
    "sm3": dict(name="sm3", hp=dict(), chunk=None, groups=True),
    "lion_whole": dict(name="lion", hp=dict(), chunk=None, apart=True),
}


@pytest.mark.parametrize("label", sorted(CASES))
def test_plan_equals_the_reference_plan(label, monkeypatch):
    """Four steady steps: ``_plan_foreach``'s buckets (keys, order, members) and counters equal the reference's,
    from the very ``work`` of each step; the step is planned (not vacuous)."""
    case = CASES[label]
    monkeypatch.setattr(FA, "FUSED_ON_CPU", case.get("fused", True))
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    params = [{"params": ps[:4]}, {"params": ps[4:], "lr": 3e-3}] if case.get("groups") else ps
    opt = create_optimizer(params, case["name"], lr=1e-2, **case["hp"])
    opt.chunk_numel = case["chunk"]
    compared = []
    plan = E.LowMemOptimizer._plan_foreach

    def both(self, work):
        ref = _reference_plan(self, work)
        out = plan(self, work)
        assert (out is None) == (ref is None)
        if out is not None:
            buckets, counters, _ = out
            assert list(buckets) == list(ref[0]), (list(buckets), list(ref[0]))
            for bkey in buckets:
                (ga, ma), (gb, mb) = buckets[bkey], ref[0][bkey]
                assert ga is gb and len(ma) == len(mb) and all(_same_member(a, b) for a, b in zip(ma, mb)), bkey
            assert [(v.ctypes.data, t) for v, t in counters] == [(v.ctypes.data, t) for v, t in ref[1]]
            compared.append(len(buckets))
        return out

    monkeypatch.setattr(E.LowMemOptimizer, "_plan_foreach", both)
    for k in range(5):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        if k == 2 and case.get("apart"):  # (one counter ahead: its parameter keys buckets of another step)
            opt.state[ps[1]]["step"].add_(3)
            opt.state[ps[6]]["step"].add_(3)
        opt.step()
    assert len(compared) == 4 and max(compared) >= 2, compared


def _noncontiguous_adamw(monkeypatch):
    monkeypatch.setattr(FA, "FUSED_ON_CPU", True)
    g = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(12, 8), (16,), (8, 12), (5,)]]
    ps.append(torch.nn.Parameter(torch.randn(8, 6, generator=g).t()))  # (not contiguous: not the fused kernel's)
    return ps, create_optimizer(ps, "adamw", lr=1e-2, weight_decay=0.1)


def test_fused_buckets_are_all_in_the_kernels_layout(monkeypatch):
    """Every list the engine prepares with ``all_fit`` (its buckets of the fused kernel) is one
    ``fused_indices`` takes whole; the others are not told (a non-contiguous parameter among them here)."""
    ps, opt = _noncontiguous_adamw(monkeypatch)
    seen = []
    prepare = FA.adamw_foreach_prepare

    def spy(params, grads, ms, vs, t, b1, b2, lr, wd, eps, **kw):
        fit = FA.fused_indices(params, grads, ms, vs, lr, kw.get("step_lr"))
        seen.append((kw.get("all_fit", False), len(params), list(fit) == list(range(len(params)))))
        return prepare(params, grads, ms, vs, t, b1, b2, lr, wd, eps, **kw)

    monkeypatch.setattr(FA, "adamw_foreach_prepare", spy)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape)
        opt.step()
    told = [s for s in seen if s[0]]
    assert told and all(s[2] for s in told), seen
    assert any(not s[0] and not s[2] for s in seen), seen  # (the non-contiguous one: checked per tensor)


def test_fused_bucket_step_equals_the_per_tensor_checked_one(monkeypatch):
    """AdamW stepped with the fused buckets' ``all_fit`` equals AdamW whose every bucket is checked tensor by tensor
    (``all_fit`` ignored), bit for bit, over five steps with a non-contiguous parameter among them."""
    runs = []
    for ignore in (False, True):
        with monkeypatch.context() as mp:
            ps, opt = _noncontiguous_adamw(mp)
            if ignore:
                prepare = FA.adamw_foreach_prepare
                mp.setattr(FA, "adamw_foreach_prepare", lambda *a, all_fit=False, **kw: prepare(*a, **kw))
            g = torch.Generator().manual_seed(5)
            for _ in range(5):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
            runs.append(([p.detach().clone() for p in ps], [dict(opt.state[p]) for p in ps]))
    (pa, sa), (pb, sb) = runs
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    for a, b in zip(sa, sb):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cpu_scalars_are_kept_by_value_and_bounded():
    """``functional.subset_norm.cpu_scalar``: one 0-d tensor per value and dtype, the value ``torch.tensor`` makes;
    at most ``_CPU_SCALARS_KEPT`` kept (a scheduled ``lr`` makes a new ``1 - lr wd`` every step)."""
    from lowmem.optim.functional import subset_norm as SN

    a = SN.cpu_scalar(0.9, torch.float32)
    assert SN.cpu_scalar(0.9, torch.float32) is a and SN.cpu_scalar(0.9, torch.float64) is not a
    assert torch.equal(a, torch.tensor(0.9, dtype=torch.float32)) and a.dtype == torch.float32 and a.dim() == 0
    for k in range(3 * SN._CPU_SCALARS_KEPT):
        SN.cpu_scalar(1.0 - k * 1e-6, torch.float32)
        assert len(SN._CPU_SCALARS) <= SN._CPU_SCALARS_KEPT


def test_cpu_scalars_under_a_dispatch_mode_are_that_modes():
    """Under a fake tensor mode the scalar is made there, neither taken from nor left in the kept ones."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from lowmem.optim.functional import subset_norm as SN

    kept = SN.cpu_scalar(0.75, torch.float32)
    with FakeTensorMode():
        inside = SN.cpu_scalar(0.75, torch.float32)
        new = SN.cpu_scalar(0.125, torch.float32)
    assert inside is not kept and isinstance(inside, FakeTensor) and isinstance(new, FakeTensor)
    assert not isinstance(SN.cpu_scalar(0.125, torch.float32), FakeTensor)
