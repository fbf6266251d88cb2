"""Online Subspace Descent's basis steps decided by the step's one device read (issue 15): the projection's
``pre_check`` flag (every basis step's gradient finite and not all zero) is read with the engine's non-finite
check, and the basis steps then take the gradients as usable without a read of their own. The decisions and
values are the per-bucket read's: a zero gradient still skips its basis step, a non-finite one still skips
the whole step (or, without the engine's check, its basis step), and nothing else changes by a bit."""

from __future__ import annotations

import warnings

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.functional.norms import float_norm
from lowmem.optim.subspace import SubspaceProjection

SHAPE, COUNT = (64, 48), 4
OSD_KEYS = ("proj_left", "proj_right", "pca_exp_avg", "pca_exp_avg_sq", "proj_meta")


def _opt(skip_nonfinite=True, foreach=True, dtype=torch.float32):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(SHAPE).to(dtype)) for _ in range(COUNT)]
    opt = create_optimizer(ps, "osd_adamw", rank=8, proj_lr=1e-2, lr=1e-2)
    opt.skip_nonfinite = skip_nonfinite
    opt.param_groups[0]["foreach"] = foreach
    return ps, opt


def _grads(step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(SHAPE, generator=gen) * (i + 1)).to(dtype) for i in range(COUNT)]


def _osd_state(opt, p):
    return {k: v.clone() for k, v in opt.state[p].items() if k in OSD_KEYS}


def test_pre_check_flags_every_unusable_gradient():
    """The flag is True exactly when every gradient of a basis step due is finite and not all zero; the
    norms it hands over are each float32 gradient's ``float_norm`` (bit for bit; none for a bfloat16 one,
    whose basis step computes its own); a parameter whose basis step is not due (the step after its
    refresh) is not checked."""
    ps, opt = _opt()
    for t in range(2):  # (the refresh at step 1, a basis step at step 2)
        for p, g in zip(ps, _grads(t)):
            p.grad = g
        opt.step()
    P, group = opt.recipe.projection, opt.param_groups[0]
    assert isinstance(P, SubspaceProjection)
    gs = _grads(5)

    def check(grads, states=None):
        return P.pre_check([(g, s, group) for g, s in zip(grads, states or [opt.state[p] for p in ps])])

    flag, checked = check(gs)
    assert bool(flag) and len(checked) == COUNT
    for g in gs:
        assert checked[id(g)][0] is g and torch.equal(checked[id(g)][1], float_norm(g))
    for bad in (0.0, float("nan"), float("inf"), -float("inf")):
        worse = [g.clone() for g in gs]
        if bad == 0.0:
            worse[2].zero_()
        else:
            worse[2][3, 5] = bad
        assert not bool(check(worse)[0]), bad
    half = gs[:2] + [g.to(torch.bfloat16) for g in gs[2:]]  # (one norm kernel per dtype)
    flag, checked = check(half)
    assert bool(flag) and all(checked[id(g)][0] is g and checked[id(g)][1] is None for g in half[2:])
    for bad in (0.0, float("nan"), float("inf")):
        worse = [g.clone() for g in half]
        worse[3].fill_(bad)
        assert not bool(check(worse)[0]), bad
    tiny = [g.clone() for g in gs]
    tiny[1].fill_(1e-30)  # a usable gradient whose squares underflow: its norm is what the basis step sees
    assert bool(check(tiny)[0]) == bool(float_norm(tiny[1]) > 0)
    after_refresh = [dict(opt.state[p]) for p in ps]
    after_refresh[2]["proj_meta"] = after_refresh[2]["proj_meta"].clone()
    after_refresh[2]["proj_meta"][3] = -1  # (the step after a refresh takes no basis step)
    zero = [g.clone() for g in gs]
    zero[2].zero_()
    flag, checked = check(zero, after_refresh)
    assert bool(flag) and id(zero[2]) not in checked and len(checked) == COUNT - 1
    assert P.pre_check([]) is None


@pytest.mark.parametrize("foreach,dtype", [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)],
                         ids=["buckets", "one_at_a_time", "bfloat16"])
def test_the_step_read_decides_every_basis_step_as_the_bucket_read_did(monkeypatch, foreach, dtype):
    """Two optimizers through the same gradients: one with the engine's check (the basis steps take the
    pre_check's decision and norms), one without it (``skip_nonfinite=False``: each bucket, or parameter,
    reads its own flags, the path before). Equal bit for bit at every step, a zero gradient's basis step
    skipped by both (its basis, PCA moments and count untouched); the decision is handed over at every step
    without an unusable gradient, and not at the others."""
    seen = []
    orig = {m: getattr(SubspaceProjection, m) for m in ("foreach_post_update", "post_update")}

    def spy(name):
        def wrapped(self, *args, **kwargs):  # (g or gs, state(s), group, low(s), checked)
            seen.append((args[4] if len(args) > 4 else kwargs.get("checked")) is not None)
            return orig[name](self, *args, **kwargs)
        return wrapped

    for name in orig:
        monkeypatch.setattr(SubspaceProjection, name, spy(name))
    (ps, opt), (qs, ref) = _opt(foreach=foreach, dtype=dtype), _opt(skip_nonfinite=False, foreach=foreach, dtype=dtype)
    for t in range(7):
        gs = _grads(t, dtype)
        if t == 4:
            gs[1].zero_()
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g, g.clone()
        before = [_osd_state(opt, p) if p in opt.state else None for p in ps[:2]]
        seen.clear()
        opt.step()
        handed = list(seen)
        ref.step()
        assert handed and all(h == (t not in (0, 4)) for h in handed), (t, handed)
        for p, q in zip(ps, qs):
            assert torch.equal(p, q), t
            a, b = _osd_state(opt, p), _osd_state(ref, q)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), t
        if t == 4:  # the zero gradient's basis step skipped, its neighbour's taken
            kept, moved = _osd_state(opt, ps[1]), _osd_state(opt, ps[0])
            assert all(torch.equal(before[1][k], kept[k]) for k in kept)
            assert not torch.equal(before[0]["pca_exp_avg"], moved["pca_exp_avg"])


def test_a_nonfinite_gradient_never_reaches_a_basis():
    """With the engine's check the whole step is skipped (every basis, moment and count as before); without
    it the non-finite gradient's basis step is skipped (its bucket's read), the others' are taken."""
    for skip in (True, False):
        ps, opt = _opt(skip_nonfinite=skip)
        for t in range(3):
            for p, g in zip(ps, _grads(t)):
                p.grad = g
            opt.step()
        before = [_osd_state(opt, p) for p in ps]
        gs = _grads(3)
        gs[2][1, 1] = float("nan")
        for p, g in zip(ps, gs):
            p.grad = g
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        after = [_osd_state(opt, p) for p in ps]
        assert all(torch.equal(before[2][k], after[2][k]) for k in before[2]), skip
        assert all(torch.isfinite(v).all() for v in after[2].values())
        key = "proj_left" if "proj_left" in after[0] else "proj_right"
        assert torch.equal(before[0][key], after[0][key]) == skip, skip


def test_a_later_per_parameter_step_reads_its_own_flag():
    """The step's decision is not kept beyond it: a per-parameter step afterwards (``step_param``, layerwise
    mode's) with the same gradient tensor, zeroed in place, skips its basis step as before."""
    ps, opt = _opt()
    for t in range(3):
        for p, g in zip(ps, _grads(t)):
            p.grad = g
        opt.step()
    ps[0].grad.zero_()  # (the tensor the last step checked)
    before = _osd_state(opt, ps[0])
    opt.step_param(ps[0])
    after = _osd_state(opt, ps[0])
    assert all(torch.equal(before[k], after[k]) for k in before)
