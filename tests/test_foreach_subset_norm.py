"""The multi-tensor paths of the Subspace-Momentum recipes (issue 15): ``adamw_snsm``, ``sgd_sm`` and
``adagrad_snsm``. Their projected parameters take the engine's projected buckets (each parameter
projected down alone, refresh and moment reset included; the momentum of every ``P^T G`` of a bucket
in one EMA kernel, :meth:`SubsetNormMoments.foreach_direction`; the bucket combined back at once,
Subset-Norm step included, where its statistics commute with the projection, else each alone); their full-rank parameters take the full-rank buckets (``sgd_sm``'s momentum by
:func:`~lowmem.optim.functional.subset_norm.sgd_momentum_foreach_`, the adaptive ones by the
Subset-Norm kernels of ``adamw_sn``). Equal to the per-parameter step (``foreach=False``) bit for bit
on the CPU, where the multi-tensor kernels run the per-tensor operations in the same order. Below,
the row blocks' arithmetic shortcuts (the complement folded into the subspace's product, SNSM's
statistic from ``vector_norm`` and its scale in the denominator) against the plain forms, to float32
rounding."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lowmem.optim.recipes.subset_norm import SubsetNormMoments
from lowmem.optim.registry import create_optimizer

# projected (rank 4): equal shapes (one bucket), both projection sides, one filling a 160-element
# bucket alone; full-rank group: vectors, a matrix, one larger than chunk_numel=160 (in pieces)
PROJECTED = [(16, 12), (16, 12), (12, 20), (20, 12), (9, 40)]
FULL_RANK = [(7,), (30,), (10, 6), (20, 12)]
RANK, STEPS = 4, 5

CONFIGS = {
    "adamw_snsm": ("adamw_snsm", {"weight_decay": 0.1}),
    "adamw_snsm_left_columns": ("adamw_snsm", {"proj_type": "left", "subset_norm": False}),
    "adamw_snsm_rsvd_scaled": ("adamw_snsm", {"projection": "rsvd", "scale": 0.5, "free_lr_scale": 0.3}),
    "sgd_sm": ("sgd_sm", {"weight_decay": 0.1}),
    "sgd_sm_no_momentum": ("sgd_sm", {"momentum": 0.0, "weight_decay": 0.1}),
    "sgd_sm_signsgd_keep": ("sgd_sm", {"free_rule": "signsgd", "moment_policy": "keep"}),
    "adagrad_snsm": ("adagrad_snsm", {"weight_decay": 0.1}),
    "adagrad_snsm_reverse": ("adagrad_snsm", {"proj_type": "reverse_std", "momentum": 0.5}),
    "adamw_snsm_rank8": ("adamw_snsm", {"rank": 8, "weight_decay": 0.1}),
    "sgd_sm_rank1": ("sgd_sm", {"rank": 1}),
}


# the configurations whose projected buckets are combined back at once (SubsetNormStep.foreach_fold,
# SubspaceMomentumResidual.foreach_fold): the weights to float32 rounding; the others (signSGD, per-element
# statistics, per-row statistics of a left projection) each parameter alone, bit for bit
FOLDED = {"adamw_snsm", "adamw_snsm_rsvd_scaled", "sgd_sm", "sgd_sm_no_momentum", "adagrad_snsm", "adamw_snsm_rank8",
          "sgd_sm_rank1"}


def _run(name, hparams, foreach, chunk_numel, dtype=torch.float32, steps=STEPS, monkeypatch=None,
         projected=PROJECTED, full_rank=FULL_RANK):
    """Weights and state after ``steps`` steps (a refresh every 2 steps: steps 1, 3, 5), the element
    counts of the projected buckets' directions and of the full-rank buckets, and the optimizer."""
    low_calls: list[list[int]] = []
    full_calls: list[list[int]] = []
    orig_dir, orig_step = SubsetNormMoments.foreach_direction, SubsetNormMoments.foreach_step_

    def spy_dir(self, gs, *args, **kwargs):
        low_calls.append([g.numel() for g in gs])
        return orig_dir(self, gs, *args, **kwargs)

    def spy_step(self, params, *args, **kwargs):
        full_calls.append([p.numel() for p in params])
        return orig_step(self, params, *args, **kwargs)

    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in projected]
    fr = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in full_rank]
    group_hp = {k: v for k, v in hparams.items() if k not in ("weight_decay", "momentum")}
    hp = {k: v for k, v in hparams.items() if k in ("weight_decay", "momentum")}
    groups = [{"params": ps, "rank": RANK, "update_proj_gap": 2, **group_hp}]
    if fr:
        groups.append({"params": fr, "rank": None})
    eps = {} if name == "sgd_sm" else {"eps": 1e-3}
    opt = create_optimizer(groups, name, lr=1e-2, **eps, **hp)
    opt.chunk_numel = chunk_numel
    for g in opt.param_groups:
        g["foreach"] = foreach
    with monkeypatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("error")  # no parameter silently trained full-rank
        mp.setattr(SubsetNormMoments, "foreach_direction", spy_dir)
        mp.setattr(SubsetNormMoments, "foreach_step_", spy_step)
        for _ in range(steps):
            for p in ps + fr:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
    params = ps + fr
    return ([p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()} for p in params],
            low_calls, full_calls, opt)


def _assert_equal(fast, ref, rounded=False):
    """Weights and state bit for bit; ``rounded``: the weights to float32 rounding (the projected bucket's
    fold, ``SubsetNormStep.foreach_fold`` / ``SubspaceMomentumResidual.foreach_fold``: ``p += a P M'`` and
    ``p += G k`` in place, against the rows' ``p -= lr (P M + G f) / d``), the state still bit for bit."""
    for i, (a, b, sa, sb) in enumerate(zip(fast[0], ref[0], fast[1], ref[1])):
        if rounded:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b), (i, (a.float() - b.float()).abs().max())
        assert sa.keys() == sb.keys(), i
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (i, k)


def _low_numel(opt, shapes=PROJECTED):
    group = opt.param_groups[0]
    return [opt.recipe.projection.low_shape(torch.Size(s), group).numel() for s in shapes]


@pytest.mark.parametrize("label", sorted(CONFIGS))
@pytest.mark.parametrize("chunk_numel", [160, None])
def test_subspace_momentum_foreach_equals_the_per_parameter_step(label, chunk_numel, monkeypatch):
    """Weights and every state tensor (momentum, Subset-Norm statistics, bases) bit for bit after 5
    steps with refreshes (and moment resets) at steps 1, 3 and 5; every projected element goes
    through the multi-tensor direction every step, in buckets of at most ``chunk_numel`` projected
    elements (one larger alone), at least one bucket holding several parameters; every full-rank
    element through a full-rank bucket; the reference takes neither."""
    name, hp = CONFIGS[label]
    fast = _run(name, hp, None, chunk_numel, monkeypatch=monkeypatch)
    ref = _run(name, hp, False, chunk_numel, monkeypatch=monkeypatch)
    assert ref[2] == [] and ref[3] == []
    _assert_equal(fast, ref, rounded=label in FOLDED)
    lows, low_calls, full_calls = _low_numel(fast[4]), fast[2], fast[3]
    assert sum(map(sum, low_calls)) == STEPS * sum(lows)
    assert max(map(len, low_calls)) > 1 or (chunk_numel is not None and 2 * min(lows) > chunk_numel)  # (rank 8)
    for bucket in low_calls:
        assert chunk_numel is None or len(bucket) == 1 or sum(bucket) <= chunk_numel, bucket
    if chunk_numel is None:
        assert len(low_calls) == STEPS  # one projected bucket per step
    assert sum(map(sum, full_calls)) == STEPS * sum(math.prod(s) for s in FULL_RANK)
    # the projected parameters moved, so the comparison is not of untouched weights
    assert all(not torch.equal(a, b) for a, b in zip(fast[0], _run(name, hp, None, chunk_numel, steps=0,
                                                                     monkeypatch=monkeypatch)[0]))


@pytest.mark.parametrize("label", ["adamw_snsm", "sgd_sm", "adagrad_snsm"])
def test_subspace_momentum_foreach_bf16_parameters(label, monkeypatch):
    """bf16 parameters and gradients (projected a block of rows at a time, float32 moments) take the
    projected buckets, equal bit for bit; their full-rank bf16 parameters stay on the per-parameter
    step (the full-rank buckets are float32)."""
    name, hp = CONFIGS[label]
    fast = _run(name, hp, None, 160, dtype=torch.bfloat16, monkeypatch=monkeypatch)
    ref = _run(name, hp, False, 160, dtype=torch.bfloat16, monkeypatch=monkeypatch)
    assert fast[2] and not ref[2]
    assert fast[3] == [] == ref[3]
    _assert_equal(fast, ref)


def test_subspace_momentum_bf16_moments_stay_per_parameter(monkeypatch):
    """Momentum stored in bf16 (``state_dtype="param"`` on bf16 parameters) has no multi-tensor form:
    the projected parameters take the per-parameter step."""
    fast = _run("sgd_sm", {"state_dtype": "param"}, None, 160, dtype=torch.bfloat16, steps=2,
                monkeypatch=monkeypatch, full_rank=[])
    assert fast[2] == []


@pytest.mark.parametrize("name", ["sgd_sm", "adamw_snsm"])
@pytest.mark.parametrize("shape,rank", [((16, 12), RANK), ((7,), None)])
def test_a_first_moment_missing_from_the_state_still_raises(name, shape, rank):
    """State allocated with momentum 0 (no first moment), then momentum set > 0: no bucket takes the
    parameter (projected or full-rank), so the per-parameter step's error names the setting (no
    silent step without momentum, no KeyError from a bucket)."""
    key, zero, set_to = ("momentum", 0.0, 0.9) if name == "sgd_sm" else ("betas", (0.0, 0.999), (0.9, 0.999))
    p = torch.nn.Parameter(torch.randn(shape))
    opt = create_optimizer([{"params": [p], "rank": rank}], name, **{key: zero})
    p.grad = torch.randn(shape)
    opt.step()
    opt.param_groups[0][key] = set_to
    with pytest.raises(ValueError, match=key):
        opt.step()


def test_step_transient_bytes_counts_the_projected_bucket(monkeypatch):
    """The report of the bucketed step is at least the per-parameter step's and exceeds it by at most 8 bytes per
    element of the largest projected bucket (the bucket's projected gradients and directions alive next to one
    parameter's own step; equal when the SVD refresh, counted alike in both, is the larger phase: since the tall
    path's LAPACK terms, aac3a2e) (how the engine overlaps the phases is its own:
    tests/test_foreach_projected.py; the measured peaks: tests/test_step_memory.py)."""
    fast = _run("sgd_sm", {}, None, 160, steps=1, monkeypatch=monkeypatch, full_rank=[])[4]
    ref = _run("sgd_sm", {}, False, 160, steps=1, monkeypatch=monkeypatch, full_rank=[])[4]
    buckets, cur = [], 0
    for n in _low_numel(fast):
        if cur and cur + n > 160:
            buckets.append(cur)
            cur = 0
        cur += n
    buckets.append(cur)
    assert ref.step_transient_bytes() <= fast.step_transient_bytes() <= ref.step_transient_bytes() + 8 * max(buckets)


def test_sgd_momentum_buckets_allocate_nothing(monkeypatch):
    """``sgd_sm``'s full-rank buckets read ``m`` itself: no transient (the per-parameter step copies
    the direction), and none is reported (the step's transient is then the non-finite check's: the float32
    norms and their stack, 8 bytes per parameter); the adaptive rules' buckets report two float32 tensors."""
    fast = _run("sgd_sm", {}, None, None, steps=1, monkeypatch=monkeypatch, projected=[])[4]
    ref = _run("sgd_sm", {}, False, None, steps=1, monkeypatch=monkeypatch, projected=[])[4]
    n = sum(len(g["params"]) for g in fast.param_groups)
    assert fast.step_transient_bytes() == fast._check_bytes() == 8 * n
    assert ref.step_transient_bytes() == 4 * max(math.prod(s) for s in FULL_RANK)
    assert SubsetNormMoments().foreach_transient_bytes(100) == 800
    assert SubsetNormMoments(adaptive=False).foreach_transient_bytes(100) == 0


def test_foreach_direction_equals_direction_per_tensor():
    """:meth:`SubsetNormMoments.foreach_direction` against :meth:`direction` one projected gradient
    at a time, with and without momentum, several steps: momenta and directions bit for bit, and
    the directions are copies (the state is not handed out)."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 12), (4, 12), (20, 4), (3, 5)]
    for rule, group in ((SubsetNormMoments(), {"betas": (0.9, 0.99), "eps": 1e-3}),
                        (SubsetNormMoments(adaptive=False), {"momentum": 0.8}),
                        (SubsetNormMoments(adaptive=False), {"momentum": 0.0}),
                        (SubsetNormMoments(accumulate=True), {"momentum": 0.5, "betas": (0.9, 0.99), "eps": 1e-3})):
        b1 = group["momentum"] if "momentum" in group else group["betas"][0]
        a = [{"exp_avg": torch.zeros(s)} if b1 > 0 else {} for s in shapes]
        b = [{k: v.clone() for k, v in st.items()} for st in a]
        assert all(rule.supports_foreach_direction(group, st, torch.zeros(1)) for st in a)
        for t in range(1, 4):
            gs = [torch.randn(s, generator=gen) for s in shapes]
            da = rule.foreach_direction(gs, a, group, float(t), 1e-2)
            # what it allocates is what it returns, as reported
            assert sum(4 * d.numel() for d in da) == rule.foreach_direction_transient_bytes(sum(g.numel() for g in gs))
            db = [rule.direction(g, st, group, float(t), 1e-2) for g, st in zip(gs, b)]
            assert all(torch.equal(x, y) for x, y in zip(da, db))
            assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
            assert all(x.data_ptr() not in {v.data_ptr() for v in st.values()} | {g.data_ptr()}
                       for x, st, g in zip(da, a, gs))


# ---- the complement folded into the subspace's product (SubspaceMomentumResidual.fold) -----------


def _sm_pieces(name, shape, hparams):
    """A parameter of ``name`` after its first step (basis, momentum), a step-2 gradient ``g``, its
    projection ``low`` and a direction ``d_low`` of ``low``'s shape."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    opt = create_optimizer([p], name, rank=6, update_proj_gap=100, **hparams)
    p.grad = torch.randn(shape, generator=gen)
    opt.step()
    state, group, recipe = opt.state[p], opt.param_groups[0], opt.recipe
    g = torch.randn(shape, generator=gen)
    low = recipe.projection.down(g, state, group)
    return g, low, torch.randn(low.shape, generator=gen), state, group, recipe


@pytest.mark.parametrize("name", ["sgd_sm", "adamw_snsm", "adagrad_snsm"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (33, 50)])
@pytest.mark.parametrize("hparams", [{}, {"proj_type": "left", "scale": 0.5, "free_lr_scale": 0.3},
                                     {"proj_type": "right", "free_lr_scale": 2.0}])
def test_sm_folded_rows_equal_unfolded_rows(name, shape, hparams):
    """The combine-back of Subspace-Momentum folded into one GEMM per row block
    (``up_rows(scale d_low - f low) + f G_rows``) equals the unfolded rows ``scale up_rows(d_low) +
    f (G_rows - up_rows(low))`` and the whole-tensor direction to float32 rounding (the two
    products summed in another order), on both sides, with SNSM's Subset-Norm step on top; the
    statistics the step updates (``sn_exp_avg_sq``) equal."""
    g, low, d_low, state, group, recipe = _sm_pieces(name, shape, hparams)
    combine, P = recipe.combine, recipe.projection
    back = combine if name == "sgd_sm" else combine.inner
    bounds = [(a, min(a + 7, shape[0])) for a in range(0, shape[0], 7)]  # uneven row blocks
    states = [{k: v.clone() for k, v in state.items()} for _ in range(3)]
    ctx = combine.prepare(g, low, d_low, states[0], group, P, bounds)
    assert (ctx if name == "sgd_sm" else ctx[0])[1] is not None  # folded
    folded = torch.cat([combine.direction_rows(g[a:b], low, d_low, states[0], group, P, a, b, ctx) for a, b in bounds])
    plain_ctx = combine.prepare(g, low, d_low, states[1], group, P, bounds)
    if name == "sgd_sm":
        plain_ctx = (plain_ctx[0], None)
    else:
        plain_ctx = ((plain_ctx[0][0], None), *plain_ctx[1:])
    plain = torch.cat([combine.direction_rows(g[a:b], low, d_low, states[1], group, P, a, b, plain_ctx)
                       for a, b in bounds])
    whole = combine.direction(g, low, d_low, states[2], group, P)
    tol = dict(rtol=1e-6, atol=1e-6 * plain.abs().max().item())
    torch.testing.assert_close(folded, plain, **tol)
    torch.testing.assert_close(folded, whole, **tol)
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[2][k], rtol=1e-6, atol=0)
    assert back.residual.transient_bytes(shape, group, state, P, 7) == 8 * low.numel() + 4


@pytest.mark.parametrize("hparams", [{"free_rule": "signsgd"}, {"projection": "columns"}])
def test_sm_fold_only_for_sgd_on_a_basis(hparams):
    """signSGD on the complement is not linear, and a coordinate projection scatters (no product to
    fold into): both keep the unfolded rows, and report their 3 row blocks."""
    g, low, d_low, state, group, recipe = _sm_pieces("sgd_sm", (40, 24), hparams)
    bounds = [(0, 7), (7, 40)]
    assert recipe.combine.prepare(g, low, d_low, state, group, recipe.projection, bounds)[1] is None
    assert recipe.residual.transient_bytes((40, 24), group, state, recipe.projection, 7) == 12 * 7 * 24


def test_div_scaled_folds_the_step_scale_into_a_smaller_denominator():
    """SNSM's ``u scale / denom`` in one pass: per row / column the scale goes into the denominator
    (to float32 rounding of ``u / denom * scale``), exactly ``u / denom`` at scale 1, and per
    element exactly the two passes."""
    from lowmem.optim.recipes.subset_norm import _div_scaled_

    gen = torch.Generator().manual_seed(0)
    u = torch.randn(30, 20, generator=gen)
    for denom in (torch.rand(30, 1, generator=gen) + 0.1, torch.rand(1, 20, generator=gen) + 0.1):
        torch.testing.assert_close(_div_scaled_(u.clone(), denom, 0.37), u / denom * 0.37, rtol=1e-6, atol=0)
        assert torch.equal(_div_scaled_(u.clone(), denom, 1.0), u / denom)
    denom = torch.rand(30, 20, generator=gen) + 0.1
    assert torch.equal(_div_scaled_(u.clone(), denom, 0.37), u / denom * 0.37)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_subset_sq_norms_by_norm_equal_the_sums_of_squares(dim):
    """SNSM's statistic from ``vector_norm`` (no ``G^2``) equals the sums of squares to float32
    rounding (per row, per column), and is ``G^2`` itself per element."""
    from lowmem.optim.functional import subset_norm as SN

    g = torch.randn(37, 53, generator=torch.Generator().manual_seed(0))
    got, ref = SN.subset_sq_norms_by_norm(g, dim), SN.subset_sq_norms(g, dim)
    assert got.shape == ref.shape
    if dim is None:
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


# ---- the projected bucket combined back at once (issue 15) ----------------------------------------


@pytest.mark.parametrize("label", sorted(CONFIGS))
def test_bucket_fold_taken_where_the_statistics_commute_with_the_projection(label, monkeypatch):
    """The bucket's fold is offered (not ``None``) exactly for :data:`FOLDED`: SGD on the complement, and
    statistics per column of a left-projected or per row of a right-projected gradient (the defaults);
    every projected bucket of a folded configuration takes it."""
    from lowmem.optim.recipes.subset_norm import SubspaceMomentumResidual, SubsetNormStep

    offered: list[bool] = []

    def spy_on(cls):
        orig = cls.foreach_fold

        def spy(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            offered.append(out is not None)
            return out
        monkeypatch.setattr(cls, "foreach_fold", spy)

    name, hp = CONFIGS[label]
    spy_on(SubsetNormStep if name != "sgd_sm" else SubspaceMomentumResidual)
    _run(name, hp, None, None, steps=2, monkeypatch=monkeypatch)
    assert len(offered) == 2 and all(x == (label in FOLDED) for x in offered), offered


@pytest.mark.parametrize("name", ["sgd_sm", "adamw_snsm", "adagrad_snsm"])
def test_bucket_fold_launches_a_few_kernels_per_parameter(name):
    """On the CUDA code path (meta tensors), each further projected parameter of a bucket adds its own
    project-down, the update's ``addmm_`` and ``addcmul_`` and (SNSM) its subset norms: 3 / 4 kernels
    (was 9 for ``sgd_sm``, 17 / 15 for ``adamw_snsm`` / ``adagrad_snsm``: the fold, ``k`` and the statistics
    per parameter, a copy of each momentum)."""
    from lowmem.bench_launches import LaunchCounter

    def kernels(k):
        ps = [torch.nn.Parameter(torch.zeros(256, 512, device="meta")) for _ in range(k)]
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt = create_optimizer([{"params": ps, "rank": 16, "update_proj_gap": 100}], name, lr=1e-3)
        opt.chunk_numel = None
        for _ in range(2):  # (the first step refreshes)
            with LaunchCounter() as c:
                opt.step()
        return c.counts["kernels"]

    per_param = (kernels(5) - kernels(1)) / 4
    assert per_param <= (3 if name == "sgd_sm" else 4), per_param
