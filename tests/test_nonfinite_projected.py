"""The non-finite check through projected gradients (issue 15): on a step without refreshes, a GaLore
parameter's ``P^T G`` / ``G Q^T`` is checked instead of its gradient (``LowMemOptimizer._checked_lows``),
which saves one read of every projected gradient. Sound because a NaN or +-Inf anywhere in ``G`` leaves
a whole column / row of the product non-finite (IEEE: ``NaN * x``, ``Inf * 0`` and ``Inf - Inf`` are NaN),
whatever the basis holds, zero rows included; a skipped step leaves every state tensor and weight bit for
bit as it was, and the steps it takes are those of the gradient check bit for bit."""

from __future__ import annotations

import random

import pytest
import torch

from lowmem.optim import LowMemOptimizer
from lowmem.optim.functional import galore as GL
from lowmem.optim.registry import create_optimizer

BAD = [float("nan"), float("inf"), float("-inf")]
# both projection sides (std: left for m <= n, right otherwise), and a full-rank vector in the group
SHAPES = [(12, 20), (20, 12), (16, 16), (7,)]
RANK = 4


def _bases(m, n, r, side, gen, zero_row, zero_col):
    left = right = None
    if side in ("left", "full"):
        left = GL.basis_zeros(m, r)
        left.copy_(torch.linalg.qr(torch.randn(m, r, generator=gen))[0])
        left[zero_row] = 0.0  # a gradient row that was zero at the refresh gives a zero basis row
    if side in ("right", "full"):
        right = GL.basis_zeros(r, n)
        right.copy_(torch.linalg.qr(torch.randn(n, r, generator=gen))[0].t())
        right[:, zero_col] = 0.0
    return left, right


@pytest.mark.parametrize("side", ["left", "right", "full"])
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
def test_a_nonfinite_gradient_entry_makes_the_projection_nonfinite(side, bad):
    """A single NaN / +Inf / -Inf at random positions, and at the zero row / column of the basis, makes
    the projected gradient's whole column (left) / row (right) non-finite: float32 ``project_down`` and
    the low-precision row-block ``project_down_rows`` (bf16, blocks of 5 rows)."""
    gen, rnd = torch.Generator().manual_seed(0), random.Random(0)
    m, n = 13, 17
    for trial in range(12):
        zero_row, zero_col = rnd.randrange(m), rnd.randrange(n)
        left, right = _bases(m, n, RANK, side, gen, zero_row, zero_col)
        i, j = (zero_row, zero_col) if trial % 2 else (rnd.randrange(m), rnd.randrange(n))
        g = torch.randn(m, n, generator=gen)
        g[i, j] = bad
        bounds = [(a, min(a + 5, m)) for a in range(0, m, 5)]
        for low in (GL.project_down(g, left, right), GL.project_down_rows(g.bfloat16(), left, right, bounds)):
            bad_part = low[:, j] if side == "left" else low[i] if side == "right" else low
            assert not torch.isfinite(bad_part).any(), (trial, i, j)


def _opt(name="galore_adamw", dtype=torch.float32, hold=True, seed=0, **hp):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    opt = create_optimizer(ps, name, **{"rank": RANK, "update_proj_gap": 3, "lr": 1e-2, "weight_decay": 0.1, **hp})
    # the small shapes' reported bound leaves no room (MKL's kept buffer dominates it): hold them all, or none
    opt._hold_budget = (lambda tokens: 10**9) if hold else (lambda tokens: 0)
    return ps, opt, gen


def _spy(opt):
    """Record, per step, how many parameters' projected gradients the check read."""
    held: list[int] = []
    orig = opt._checked_lows

    def spy(work, tokens):
        lows = orig(work, tokens)
        held.append(len(lows))
        return lows

    opt._checked_lows = spy
    return held


def _snapshot(ps, opt):
    return [p.detach().clone() for p in ps], [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("refresh", [False, True])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_a_skipped_step_leaves_weights_and_state_bit_for_bit(dtype, foreach, refresh, proj_type):
    """NaN / +Inf / -Inf at random positions of each parameter in turn, including the zero rows and
    columns of the bases, on a step with and without a refresh, on the multi-tensor path (the projected
    check) and the per-parameter one (the gradient check): the step is skipped, counted and warned about,
    and nothing changed; the next finite step goes on as if the bad one never came."""
    rnd = random.Random(1)
    ps, opt, gen = _opt(dtype=dtype, proj_type=proj_type)
    for group in opt.param_groups:
        group["foreach"] = foreach
    held = _spy(opt)
    steps = 4 if refresh else 2  # (gap 3: step 4 refreshes, step 3 does not)
    for _ in range(steps - 1):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    zeros = {}
    for i, p in enumerate(ps):  # zero rows / columns in the bases
        st = opt.state[p]
        r, c = rnd.randrange(p.shape[0]), rnd.randrange(p.shape[-1])
        if "proj_left" in st:
            st["proj_left"][r] = 0.0
        if "proj_right" in st:
            st["proj_right"][:, c] = 0.0
        zeros[i] = (r, c)
    skipped = 0
    for target in range(len(ps)):
        for bad in BAD:
            before = _snapshot(ps, opt)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            g = ps[target].grad
            if g.dim() == 2:
                r, c = zeros[target] if bad != BAD[0] else (rnd.randrange(g.shape[0]), rnd.randrange(g.shape[1]))
                g[r, c] = bad
            else:
                g[rnd.randrange(g.numel())] = bad
            with pytest.warns(UserWarning, match="non-finite"):
                opt.step()
            skipped += 1
            assert opt.skipped_steps == skipped
            after = _snapshot(ps, opt)
            for a, b in zip(before[0], after[0]):
                assert torch.equal(a, b)
            for sa, sb in zip(before[1], after[1]):
                assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # which check ran: the projected gradients of the three weights, only without a refresh on the buckets
    assert set(held[steps - 1:]) == ({3} if foreach is None and not refresh else {0})
    # the next finite step is the step the optimizer would have taken without the bad ones
    ref_ps, ref, ref_gen = _opt(dtype=dtype, proj_type=proj_type)
    for group in ref.param_groups:
        group["foreach"] = foreach
    for _ in range(steps - 1):
        for p in ref_ps:
            p.grad = torch.randn(p.shape, generator=ref_gen).to(dtype)
        ref.step()
    for p, q in zip(ps, ref_ps):
        for k in opt.state[p]:
            ref.state[q][k].copy_(opt.state[p][k])  # (the zeroed basis rows)
        with torch.no_grad():
            q.copy_(p)
    for p, q in zip(ps, ref_ps):
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    for p, q in zip(ps, ref_ps):
        assert torch.equal(p, q)
        assert all(torch.equal(opt.state[p][k], ref.state[q][k]) for k in opt.state[p])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hp", [{}, {"proj_type": "full"}, {"projection": "rsvd"}, {"moment_policy": "reset"}],
                         ids=["std", "full", "rsvd", "reset"])
def test_the_projected_check_steps_bit_for_bit_as_the_gradient_check(dtype, hp):
    """Eight steps (refreshes at 1, 4, 7) with the projected gradients held from the check into the
    step, and without (every gradient checked): the same weights and state bit for bit; the check read
    the three weights' projected gradients on the five steps without a refresh."""
    runs = []
    for hold in (True, False):
        ps, opt, gen = _opt(dtype=dtype, hold=hold, **hp)
        held = _spy(opt)
        for _ in range(8):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        runs.append((_snapshot(ps, opt), held))
    (a, held), (b, none) = runs
    assert held == [0, 3, 3, 0, 3, 3, 0, 3] and set(none) == {0}
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for sa, sb in zip(a[1], b[1]):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_only_within_the_budget_and_the_rest_through_their_gradients():
    """With room for one projected gradient, the check reads that one and the other parameters'
    gradients; a NaN in a gradient beyond the budget still skips the step."""
    ps, opt, gen = _opt()
    budget = opt.recipe.projection.low_shape(ps[0].shape, opt.param_groups[0]).numel()
    opt._hold_budget = lambda tokens: budget
    held = _spy(opt)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    assert held == [0, 1]
    before = _snapshot(ps, opt)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    ps[1].grad[3, 5] = float("nan")
    with pytest.warns(UserWarning, match="non-finite"):
        opt.step()
    assert held[-1] == 1 and opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before[0], ps))


@pytest.mark.parametrize("name,hp", [("fira_adamw", {}), ("frugal", {}), ("frugal", {"projection": "columns"}),
                                     ("apollo_adamw", {}), ("osd_adamw", {})],
                         ids=["fira", "frugal", "frugal_columns", "apollo", "osd"])
def test_steps_that_read_the_gradient_keep_the_gradient_check(name, hp):
    """A combine-back that reads ``G`` (Fira's and FRUGAL's residuals, APOLLO's scaling), a basis step
    that reads it (online PCA) and a selection of coordinates (an entry not selected is not read) keep
    the check of every gradient."""
    ps, opt, gen = _opt(name, **hp)
    held = _spy(opt)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    assert held == [0, 0, 0]


def test_which_projections_keep_nonfinite_values():
    """Basis products do (svd, rsvd, random, gaussian); online PCA (its basis step reads ``G``) and the
    coordinate selections (columns, rows, randk, blocks) do not."""
    from lowmem.optim.subspace import BASIS_METHODS, COORDINATE_METHODS, SubspaceProjection

    P = SubspaceProjection()
    assert [m for m in BASIS_METHODS + COORDINATE_METHODS if P.down_keeps_nonfinite({}, {"projection": m})] == [
        "svd", "rsvd", "random", "gaussian"]


def test_the_hold_budget_is_the_room_the_refresh_leaves_in_the_reported_bound():
    """The default budget: what the reported bound holds beyond a step without refreshes (the exact
    SVD's workspace at this size), in float32 elements, enough for every projected gradient here; the
    reported bound itself does not change."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(256, 512), (512, 256), (384, 384)]]
    opt = create_optimizer(ps, "galore_adamw", rank=16, lr=1e-3)
    opt.materialize_state()
    whole, steady = opt.step_transient_bytes(), opt._transient_bytes(steady=True)
    budget = opt._hold_budget(opt._group_tokens())
    assert budget == (whole - steady) // 4 > sum(opt.recipe.projection.low_shape(p.shape, opt.param_groups[0]).numel()
                                                 for p in ps)
    assert LowMemOptimizer.step_transient_bytes(opt) == whole
    assert opt.__dict__["_hold"][1] == budget  # cached with the groups' tokens
    opt.param_groups[0]["rank"] = 8  # (a new token: computed again)
    assert opt._hold_budget(opt._group_tokens()) != budget


def test_the_float32_fast_check_decides_as_the_grouped_one(monkeypatch):
    """``engine._all_finite`` on float32 gradients on one device (the common case, one multi-tensor norm
    over the list as it is) decides as the grouped form (by device and dtype) that mixed lists take: NaN,
    +-Inf anywhere, entries of 1e19 (stepped) and 1e30 (squares overflow: skipped), a norm just below
    the bound, in many small tensors."""
    from lowmem.optim import engine as E

    calls = []
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, *a, _f=torch._foreach_norm: calls.append(len(ts)) or _f(ts, *a))
    gen, big = torch.Generator().manual_seed(0), E.MAX_GRAD_NORM
    cases = []
    for bad in (*BAD, 1e19, 0.99 * big / 4, 1e30):
        ts = [torch.randn(s, generator=gen) for s in [(5,), (4, 4), (3, 2, 2)] * 12]
        if bad == 0.99 * big / 4:
            ts[7].fill_(bad)  # norm just below the bound: stepped
        else:
            ts[rnd_index(len(ts))].view(-1)[rnd_index(4)] = bad
        cases.append(ts)
    for ts in cases:
        calls.clear()
        fast = E._all_finite(ts)
        assert calls == [len(ts)]  # one multi-tensor norm
        grouped = E._all_finite([*ts, torch.zeros(1, dtype=torch.float64)])  # (a float64 entry: the grouped form)
        assert calls[1:] == [len(ts), 1] and fast == grouped  # (one norm per dtype: float32's, then float64's)
    assert [E._all_finite(ts) for ts in cases] == [False, False, False, True, True, False]


def rnd_index(n, _r=random.Random(3)):
    return _r.randrange(n)
