"""Issue 12: Online Subspace Descent's folded bucket with a zero gradient (BOUNDS, session 13).

A zero gradient makes the pre-check's flag fail (:meth:`~lowmem.optim.subspace.SubspaceProjection.pre_check`): the
engine then keeps none of its norms and the bucket's basis steps compute their own norms and usability flags
(:meth:`~lowmem.optim.subspace.SubspaceProjection.foreach_post_update`), and the zero gradient's parameter takes no
basis step. The report is the larger of the two outcomes (``foreach_post_update_bytes(..., checked=True)``); the
all-usable step attains it, traced, and a step with a zero gradient allocates at most it. Before: the flags stayed
alive through the basis steps, one byte per gradient the report did not count ((96, 64) and (16, 12) at rank 8, the
small one's gradient zero: 15,118 B traced for 15,116 reported), and the steps with a zero gradient in the bucket
read 4 bytes per gradient under the report (its pre-check norms, not kept), which is that outcome, not an over-count.
"""

import warnings

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim import engine as E
from lowmem.optim import subspace as S
from test_transient_per_parameter import _Traced

SETS = {
    "mixed": [(96, 64), (64, 96), (96, 64), (64,), (160, 64), (200, 40)],
    "tall_wide": [(300, 40), (40, 300), (300, 40)],
    "one_tiny": [(96, 64), (16, 12)],
    "tiny_one": [(16, 12), (96, 64)],
    "one_tiny3": [(96, 64), (16, 12), (12, 16), (20, 10)],
    "same4": [(64, 96)] * 4,
}


def _run(shapes, zero, hp):
    """The traced third step (no refresh) with the gradients of ``zero`` all zero, and the meta report of a steady
    step."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer(ps, "osd_adamw", rank=8, update_proj_gap=1000, **hp)
        metas = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in shapes]
        meta = create_optimizer(metas, "osd_adamw", rank=8, update_proj_gap=1000, **hp)
        gen = torch.Generator().manual_seed(1)
        for i in range(3):
            for j, p in enumerate(ps):
                p.grad = torch.randn(p.shape, generator=gen)
                if i == 2 and j in zero:
                    p.grad.zero_()
            with _Traced() as t:
                opt.step()
    meta.materialize_state()
    return t.peak, meta._transient_bytes(False, steady=True), opt


@pytest.mark.parametrize("hp", [{}, {"proj_optimizer": "sgd"}], ids=["adamw", "sgd"])
@pytest.mark.parametrize("shapes", sorted(SETS))
def test_a_zero_gradient_step_stays_within_the_all_usable_report(shapes, hp):
    """All usable: traced == reported; one gradient zero (each in turn): traced <= reported."""
    shapes_ = SETS[shapes]
    traced, reported, _ = _run(shapes_, (), hp)
    assert traced == reported > 0
    for j, s in enumerate(shapes_):
        if len(s) == 2:
            assert _run(shapes_, (j,), hp)[0] <= reported, j


@pytest.mark.parametrize("hp", [{}, {"proj_optimizer": "sgd"}], ids=["adamw", "sgd"])
@pytest.mark.parametrize("shapes", ["one_tiny", "one_tiny3", "same4", "mixed"])
def test_the_basis_steps_with_a_zero_gradient_allocate_their_count(monkeypatch, shapes, hp):
    """The bucket's basis steps when the pre-check fails (one gradient zero) == foreach_post_update_bytes(...,
    checked=False, usable=...) of the bucket, the zero one taking no basis step."""
    monkeypatch.setattr(S, "STACK_BY_SHAPE", False)
    posts, folds = [], []
    orig_post, orig_fold = S.SubspaceProjection.foreach_post_update, E.LowMemOptimizer._fold_low_bucket
    state = {"t": None}

    def post(self, gs, states, group, lows, checked=None):
        t = state["t"]
        before, live = t.peak, t.live
        t.peak = t.live
        try:
            return orig_post(self, gs, states, group, lows, checked)
        finally:
            posts.append((t.peak - live, [bool(g.any()) for g in gs], checked))
            t.peak = max(before, t.peak)

    def fold(opt, bucket, ds, *a, **k):
        folds.append(([(b.p.shape, b.low.shape, b.state, [(0, b.p.shape[0])]) for b in bucket], bucket[0].group))
        return orig_fold(opt, bucket, ds, *a, **k)

    monkeypatch.setattr(S.SubspaceProjection, "foreach_post_update", post)
    monkeypatch.setattr(E.LowMemOptimizer, "_fold_low_bucket", fold)
    shapes_ = SETS[shapes]
    for j in [i for i, s in enumerate(shapes_) if len(s) == 2]:
        del posts[:], folds[:]
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes_]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = create_optimizer(ps, "osd_adamw", rank=8, update_proj_gap=1000, **hp)
            gen = torch.Generator().manual_seed(1)
            for i in range(3):
                del posts[:], folds[:]
                for q, p in enumerate(ps):
                    p.grad = torch.randn(p.shape, generator=gen)
                    if i == 2 and q == j:
                        p.grad.zero_()
                with _Traced() as t:
                    state["t"] = t
                    opt.step()
        P = opt.recipe.projection
        assert len(posts) == len(folds) >= 1
        for (peak, usable, checked), (members, group) in zip(posts, folds):
            assert checked is None  # (the pre-check failed: the bucket reads its own)
            assert peak == P.foreach_post_update_bytes(members, group, False, usable) > 0, (j, usable)
