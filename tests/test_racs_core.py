"""RACS (``racs``, lowmem/optim/recipes/racs.py): the engine against the plain float64 loop of the paper's Algorithm 1
with Eq. 16 (references/racs.py), Eq. 16's fixed point, scale invariance, how pytorch_optimizer's ``RACS`` differs, the
state (``m + n + 1`` per matrix), the norm-growth limiter, the blocked step and its FSDP2 reduction (shards simulated
by threads), what a step allocates against its report, and the refused settings."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from test_muonfix_sweep import _RealLive  # (the traced step's tracer: every dispatched output)

from lowmem.optim import create_optimizer
from lowmem.optim.functional.racs import racs_fixed_point, racs_rows
from lowmem.optim.recipes.racs import RACS, RacsMoments
from lowmem.optim.references.racs import _fixed_point as ref_fixed_point
from lowmem.optim.references.racs import racs as racs_ref

SHAPES = [(24, 40), (40, 24), (40,), (3, 8, 10), (2, 3, 2, 2), ()]
CONFIGS = [
    {},
    {"lr": 1e-2, "weight_decay": 0.1, "iterations": 1},
    {"lr": 3e-2, "beta": 0.5, "alpha": 0.2, "gamma": 1.5, "eps": 1e-6},
    {"lr": 1e-2, "beta": 0.0, "gamma": 1.0, "iterations": 2},
]


def _grads(shape, steps, seed, dtype=torch.float32):
    """Gradients whose scale changes every step (the limiter acts at the growing ones), with a spike at step 4."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        g = torch.randn(shape, generator=gen) * (0.5 + 0.5 * math.sin(t + 1)) * (1 + t % 3)
        if t == 3:
            g.view(-1)[:2] *= 50.0
        out.append(g.to(dtype))
    return out


def _run(shape, config, steps=8, chunk="default", seed=0, cls=None):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape) * 1e-3)  # (small: float32 rounding of p far below the steps)
    start = p.detach().clone()
    opt = create_optimizer([p], "racs", **config) if cls is None else cls([p], **config)
    if chunk != "default":
        opt.chunk_numel = chunk
    out = []
    for g in _grads(shape, steps, seed + 1):
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return start, out, opt, p


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_engine_equals_the_algorithm_loop(shape, config):
    """2-D both orientations, a vector (a column), a 3-D tensor (fused experts: three 8 x 10 matrices, each its own
    scalings), a 4-D one (a convolution kernel: its ``[2, 12]`` view), a 0-d tensor: every step equals the float64
    matrix-form loop, stepped whole, in blocks of one row and of two rows (of a matrix)."""
    cols = max(1, math.prod(shape[1:] if len(shape) != 3 else shape[2:])) if len(shape) > 1 else 1
    for chunk in (None, cols, 2 * cols):
        start, got, opt, _ = _run(shape, config, chunk=chunk)
        group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        want = racs_ref(start.clone(), _grads(shape, 8, 1), index=0, **group)
        for t, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a - start, b - start, rtol=2e-5, atol=1e-8,
                                       msg=lambda m: f"chunk {chunk} step {t + 1}: {m}")


def test_fixed_point_is_eq16_and_fits_the_squares():
    """Eq. 16 by passes over row blocks (blocks of 1, 3 and all 7 rows) equals the matrix-form loop of the reference
    (``Diag(G^T Q G) / ||Q||_F^2``, ``Diag(G S G^T) / ||S||_F^2``); one iteration's ``s`` is the column mean squares;
    after 30 iterations ``q s^T`` is the best rank-1 fit of a rank-1 ``G^2`` (exactly ``G^2``)."""
    g = torch.randn(7, 5, generator=torch.Generator().manual_seed(2))
    sq = g.square()
    for iterations in (1, 2, 5):
        want_q, want_s = ref_fixed_point(g.double(), iterations)
        for rows in (1, 3, 7):
            bounds = [(a, min(a + rows, 7)) for a in range(0, 7, rows)]
            q, s, ss = racs_fixed_point(lambda a, b: sq[a:b], bounds, 7, 5, iterations, g.device, torch.float32)
            q = racs_rows(sq, s, ss, out=q)
            torch.testing.assert_close(s.double(), want_s, rtol=1e-5, atol=0)
            torch.testing.assert_close(q.double(), want_q, rtol=1e-5, atol=0)
    _, s, _ = racs_fixed_point(lambda a, b: sq[a:b], [(0, 7)], 7, 5, 1, g.device, torch.float32)
    torch.testing.assert_close(s, sq.mean(dim=0), rtol=1e-6, atol=0)
    a, b = torch.rand(7) + 0.5, torch.rand(5) + 0.5
    rank1 = torch.outer(a, b)
    q, s, ss = racs_fixed_point(lambda i, j: rank1[i:j], [(0, 7)], 7, 5, 30, g.device, torch.float32)
    q = racs_rows(rank1, s, ss, out=q)
    torch.testing.assert_close(torch.outer(q, s), rank1, rtol=1e-5, atol=0)


def test_step_is_scale_invariant():
    """The fixed point makes ``q_i s_j`` track ``G_ij^2``, so ``G~`` does not change when every gradient is scaled
    (x 1e-3 or x 1e3: the same trajectory to float32 rounding; pytorch_optimizer's means do not have this, next)."""
    _, base, _, _ = _run((24, 40), {}, steps=8)
    for scale in (1e-3, 1e3):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(24, 40) * 1e-3)
        start = p.detach().clone()
        opt = create_optimizer([p], "racs")
        for t, g in enumerate(_grads((24, 40), 8, 1)):
            p.grad = g * scale
            opt.step()
            torch.testing.assert_close(p.detach() - start, base[t] - start, rtol=1e-4, atol=1e-8)


def test_differs_from_pytorch_optimizer_racs_as_documented():
    """pytorch_optimizer 4.1.0's ``RACS`` keeps EMAs of the row and the column mean squares each on its own (its
    column one from 1, both without Eq. 16's fixed point), so its ``G~`` is not the paper's: measured on a 24 x 40
    weight over 12 steps, its displacement's RMS is 0.36x lowmem's (2.0e-4 vs 5.7e-4) and the two differ by 0.66 of
    lowmem's largest step (both at pytorch_optimizer's lr 1e-3). Asserted: they differ by more than 0.3 of it (and
    lowmem follows the reference: test_engine_equals_the_algorithm_loop)."""
    peer = pytest.importorskip("pytorch_optimizer")
    _, got, _, _ = _run((24, 40), {"lr": 1e-3}, steps=12)
    start, want, _, _ = _run((24, 40), {"lr": 1e-3}, steps=12, cls=peer.RACS)
    ours, theirs = got[-1] - start, want[-1] - start
    assert (ours - theirs).abs().max() > 0.3 * ours.abs().max()
    assert 0.2 < (theirs.square().mean() / ours.square().mean()).sqrt() < 0.6


def test_state_is_rows_plus_columns_plus_one():
    """A 64 x 24 weight keeps 64 + 24 + 1 float32 numbers (``row_scale``, ``col_scale``, ``update_norm``, all from 0 as
    Algorithm 1's line 2); a vector of 24 its 24 + 1 + 1; a (3, 8, 10) tensor (fused experts) 3 (8 + 10 + 1) stacked
    ``[3, 8]``, ``[3, 10]``, ``[3]``; a (2, 3, 2, 2) one (a convolution kernel) 2 + 12 + 1; bfloat16 scalings halve all
    but the norm."""
    cases = {(64, 24): (64, 24), (24,): (24, 1), (3, 8, 10): (8, 10), (2, 3, 2, 2): (2, 12), (): (1, 1)}
    ps = {s: torch.nn.Parameter(torch.randn(s)) for s in cases}
    for state_dtype, size in (("float32", 4), ("bfloat16", 2)):
        opt = RACS(list(ps.values()), state_dtype=state_dtype)
        opt.materialize_state()
        for s, (rows, cols) in cases.items():
            st, lead = opt.state[ps[s]], s[:1] if len(s) == 3 else ()
            assert st["row_scale"].shape == (*lead, rows) and st["col_scale"].shape == (*lead, cols)
            assert st["update_norm"].shape == lead and st["update_norm"].dtype == torch.float32
            assert not st["row_scale"].any() and not st["col_scale"].any()
        want = sum((size * (r + c) + 4) * (s[0] if len(s) == 3 else 1) for s, (r, c) in cases.items())
        assert opt.state_bytes() - sum(st["step"].numel() * 4 for st in opt.state.values()) == want


def _unlimited_norm(g, q_prev, s_prev, beta, iterations=5):
    """||G~|| of line 8 for gradient ``g`` after the averages ``q_prev``, ``s_prev`` (the reference's fixed point)."""
    q_new, s_new = ref_fixed_point(g.double(), iterations)
    q = beta * q_prev + (1 - beta) * q_new
    s = beta * s_prev + (1 - beta) * s_new
    return (g.double() / ((q + 1e-30).sqrt()[:, None] * (s + 1e-30).sqrt()[None, :])).norm().item(), q, s


def test_norm_growth_limiter():
    """Step 1 is unlimited; a gradient whose ``G~`` is much larger at step 2 (spikes on a rank-1 ``G^2``, which
    the fixed point fits exactly at step 1: ``||G~|| = sqrt(m n)``) is held to exactly ``gamma`` times step 1's norm;
    a smaller one at step 3 is not scaled (``eta = 1``): the update is ``lr alpha G~`` of that step's scalings."""
    lr, alpha, gamma, beta = 0.1, 0.5, 1.25, 0.0  # (beta 0: the scalings are this step's alone)
    p = torch.nn.Parameter(torch.zeros(6, 5))
    opt = RACS([p], lr=lr, alpha=alpha, gamma=gamma, beta=beta)
    gen = torch.Generator().manual_seed(3)
    g1 = torch.outer(torch.rand(6, generator=gen) + 0.5, torch.rand(5, generator=gen) + 0.5)
    g2 = g1.clone()
    g2[0, 0] *= 40.0
    g2[3, 2] *= -30.0
    q, s = torch.zeros(6, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    norms = []
    for step, g in enumerate((g1, g2, g1), start=1):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        norms.append(((p.detach() - before).norm() / (lr * alpha)).item())
        unlimited, q, s = _unlimited_norm(g, q, s, beta)
        if step == 1:
            assert unlimited == pytest.approx(30 ** 0.5, rel=1e-4) and norms[-1] == pytest.approx(unlimited, rel=1e-5)
        elif step == 2:
            assert unlimited > 2 * gamma * norms[0]  # (it would grow more)
            assert norms[-1] == pytest.approx(gamma * norms[0], rel=1e-5)
        else:
            assert norms[-1] == pytest.approx(unlimited, rel=1e-5) and norms[-1] < norms[-2]
        assert opt.state[p]["update_norm"].item() == pytest.approx(norms[-1], rel=1e-5)


@pytest.mark.parametrize("zero_at", [1, 4], ids=["first-step", "later-step"])
def test_an_all_zero_gradient_does_not_stop_the_tensor(zero_at):
    """An all-zero gradient (LoRA's ``lora_A`` at step 1; an expert no token reached) leaves ``phi = 0``; the next
    steps take ``eta = 1`` (Algorithm 3's "if phi > 0 else 1"), not ``gamma / (||G~|| / 0) = 0`` for good: the
    weight moves again by a full step (``lr alpha ||G~||``) and the trajectory equals the reference loop's."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.zeros(6, 9) if t == zero_at else torch.randn(6, 9, generator=gen) for t in range(1, 8)]
    p = torch.nn.Parameter(torch.randn(6, 9, generator=gen))
    start = p.detach().clone()
    opt = create_optimizer([p], "racs")
    got = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        got.append(p.detach().clone())
    assert torch.equal(got[zero_at - 1], got[zero_at - 2] if zero_at > 1 else start)  # (the zero step moves nothing)
    assert opt.state[p]["update_norm"].item() > 0
    moved = (got[zero_at] - got[zero_at - 1]).norm().item()
    assert moved > 0.5 * 0.02 * 0.05 * (6 * 9) ** 0.5  # (a full step: lr alpha ||G~||, ||G~|| ~ sqrt(m n))
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    want = racs_ref(start.clone(), [g.clone() for g in grads], index=0, **group)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_blocked_step_equals_whole():
    """A (40, 24) weight in blocks of 1, 3 and 40 rows: every step equals the whole step (the norm's square summed
    over the blocks in another order: float32 rounding)."""
    _, whole, _, _ = _run((40, 24), CONFIGS[2], chunk=None)
    for rows in (1, 3, 40):
        _, got, _, _ = _run((40, 24), CONFIGS[2], chunk=24 * rows)
        for a, b in zip(got, whole):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class _ThreadReduce:
    """:class:`~lowmem.optim.sharded.ShardReduce`'s ``sum_`` across threads (one per shard), with a barrier (a shard
    that skips the collective breaks it after 10 s: the others raise, the test fails instead of hanging)."""

    def __init__(self, n):
        self.barrier, self.slots, self.n = threading.Barrier(n, timeout=10), {}, n
        self.calls = 0

    def bind(self, rank):
        outer = self

        class R:
            def sum_(self, t):
                outer.slots[rank] = t.clone()
                outer.barrier.wait()
                t.copy_(torch.stack([outer.slots[r] for r in range(outer.n)]).sum(dim=0))
                outer.barrier.wait()
                outer.calls += rank == 0
                return t
        return R()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("chunk_rows", [None, 1], ids=["one-block", "row-blocks"])
def test_shards_of_rows_with_sum_reduce_equal_the_whole_tensor(chunk_rows, dtype):
    """FSDP2's layout simulated by threads: a (5, 7) matrix's rows as shards [0:3], [3:5] and an empty one, each
    stepped by the rule's chunked step with ``reduce`` (each of 3 fixed-point iterations' column sums with ``q . q``,
    then the norm's square, summed over the shards); every shard's rows, its column scaling and kept norm equal the
    unsharded step's, three steps (4 all-reduces per step). Float64 gradients beside float32 scalings: an FSDP2
    float64 shard's gradient is not cast by the engine (its fixed point runs in float64, rounded into the scalings)."""
    rule = RacsMoments()
    group = {"beta": 0.5, "alpha": 0.2, "gamma": 1.1, "eps": 1e-8, "iterations": 3, "state_dtype": "float32"}
    shape, cuts = torch.Size((5, 7)), [(0, 3), (3, 5), (5, 5)]
    grads = _grads(shape, 3, 4, dtype)

    def steps(g_rows, state, shard_shape, reduce, t):
        numel = shard_shape.numel()
        size = numel if chunk_rows is None else 7 * chunk_rows
        bounds = [(a, min(a + size, numel)) for a in range(0, numel, size)] if numel else []
        flat = g_rows.reshape(-1)
        ctx = rule.prepare_chunks(state, shard_shape, group, t, 0.1, bounds, lambda a, b, v: flat[a:b], reduce=reduce)
        ds = [rule.direction(flat[a:b], rule.chunk_state(state, a, b, shard_shape, group, ctx), group, t, 0.1)
              for a, b in bounds]
        rule.finish_chunks(state, ctx)
        return torch.cat(ds) if ds else torch.zeros(0)

    whole = {}
    rule.init_state(whole, shape, group, torch.empty(shape))
    want = [rule.direction(g.clone(), whole, group, t, 0.1) for t, g in enumerate(grads, start=1)][-1]
    red = _ThreadReduce(len(cuts))
    states, got = [{} for _ in cuts], [None] * len(cuts)

    def run(rank):
        a, b = cuts[rank]
        sh = torch.Size((b - a, 7))
        rule.init_state(states[rank], sh, group, torch.empty(sh))
        for t, g in enumerate(grads, start=1):
            got[rank] = steps(g[a:b], states[rank], sh, red.bind(rank), t)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(len(cuts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert red.calls == 12 and all(x is not None for x in got)  # 4 all-reduces per step, every shard stepped
    torch.testing.assert_close(torch.cat(got), want.view(-1), rtol=1e-6, atol=1e-7)
    for (a, b), st in zip(cuts, states):
        torch.testing.assert_close(st["row_scale"], whole["row_scale"][a:b], rtol=1e-6, atol=0)
        torch.testing.assert_close(st["col_scale"], whole["col_scale"], rtol=1e-6, atol=0)
        torch.testing.assert_close(st["update_norm"], whole["update_norm"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("key,value,valid", [
    ("beta", 1.0, "0 <= beta < 1"), ("beta", -0.1, "0 <= beta < 1"), ("alpha", 0.0, "a finite float > 0"),
    ("gamma", 0.99, "a finite float >= 1"), ("gamma", float("inf"), "a finite float >= 1"),
    ("eps", 0.0, "a finite float > 0"), ("lr", -1e-3, "a finite float >= 0"), ("weight_decay", -0.1, ">= 0"),
    ("iterations", 0, "an int >= 1"), ("iterations", 2.0, "an int >= 1"),
])
def test_invalid_settings_are_refused(key, value, valid):
    p = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=f"Invalid {key}={value!r} in optimizer 'racs': expected .*{valid}"):
        create_optimizer([p], "racs", **{key: value})


def test_float16_state_is_refused_naming_state_dtype():
    """``state_dtype='param'`` of a float16 weight would keep float16 scalings carrying the gradient's squares (inf
    past 65504, 0 below 6e-8): refused at construction and, for a weight made float16 later, when the state is made."""
    p = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="racs: .*state_dtype='param' of a float16 parameter"):
        RACS([p], state_dtype="param")
    q = torch.nn.Parameter(torch.zeros(3, 3))
    opt = RACS([q], state_dtype="param")
    q.data = q.data.half()
    q.grad = torch.ones(3, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match="state_dtype"):
        opt.step()
    r = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float16))
    opt = RACS([r])  # float32 statistics of a float16 weight: fine
    r.grad = torch.full((3, 3), 300.0, dtype=torch.float16)
    opt.step()
    assert torch.isfinite(r).all() and torch.isfinite(opt.state[r]["col_scale"]).all()


# ---- what a step allocates ----------------------------------------------------------------------------------------

TRACE_SHAPES = [(64, 24), (24, 48), (48,), (3, 8, 10), (2, 3, 2, 2), ()]


def _traced_off(shape, pdtype, state_dtype):
    """``(shape, chunk, counted, traced)`` of each chunk size at which ``step_transient_bytes()`` of one parameter
    differs from the traced peak of its steps 2-3."""
    off = []
    cols = max(1, math.prod(shape[1:] if len(shape) != 3 else shape[2:])) if len(shape) > 1 else 1
    for chunk in (None, 600, 2 * cols, 1):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(shape).to(pdtype))
        opt = create_optimizer([p], "racs", state_dtype=state_dtype)
        opt.chunk_numel = chunk
        gen = torch.Generator().manual_seed(1)
        peak = 0
        opt.materialize_state()
        for step in range(3):
            p.grad = torch.randn(shape, generator=gen).to(pdtype)
            with _RealLive() as tr:
                opt.step()
            if step > 0:
                peak = max(peak, tr.peak)
        if opt.step_transient_bytes() != peak:
            off.append((shape, chunk, opt.step_transient_bytes(), peak))
    return off


def _casts_per_matrix(shape, pdtype, state_dtype):
    """A float64 batch of matrices whose gradient the engine casts to float32 (a float32 / bfloat16 state): the step
    casts one matrix at a time, the engine's count the whole batch (FOUND_RACS2 1: an engine.py fix)."""
    return len(shape) == 3 and pdtype == torch.float64 and state_dtype != "param"


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16", "param"])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_step_transient_bytes_equal_the_traced_step(pdtype, state_dtype):
    """``step_transient_bytes()`` of one parameter equals the largest set of tensors its steps hold together
    (every dispatched output traced, tests/test_muonfix_sweep.py's tracer; steps 2-3): 6 shapes (a 3-D one a batch of
    matrices, each stepped alone) x whole / one block / blocks of 2 rows / of 1 row. A float32 weight with float32
    statistics takes a bucket of its own (the multi-tensor step), the others the per-parameter step. (A float64 batch
    cast to float32: :func:`test_step_transient_bytes_of_a_float64_batch`.)"""
    off = [o for shape in TRACE_SHAPES if not _casts_per_matrix(shape, pdtype, state_dtype)
           for o in _traced_off(shape, pdtype, state_dtype)]
    assert not off, off


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_step_transient_bytes_of_a_float64_batch(state_dtype):
    """A float64 ``(3, 8, 10)`` batch with a float32 / bfloat16 state: the count equals the traced step (measured:
    1508 B counted vs 868 traced whole, float32 state: the 3 x 80 elements' copy counted, 80 made)."""
    assert not _traced_off((3, 8, 10), torch.float64, state_dtype)


# ---- the multi-tensor step ----------------------------------------------------------------------------------------

BUCKET = [(16, 24)] * 4 + [(24,)] * 3 + [(3, 8, 10)] * 2 + [(), (40, 300), (0, 4)]
STACKS = [(16, 24)] * 8 + [(24,)] * 3 + [(3, 8, 10)] * 2 + [()]


def _bucket_run(foreach, steps=6, chunk=4096, shapes=BUCKET, config=None):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = create_optimizer(ps, "racs", foreach=foreach, **(config or {"weight_decay": 0.1}))
    opt.chunk_numel = chunk
    gen = torch.Generator().manual_seed(5)
    for t in range(steps):
        for p in ps:  # (t = 2: an all-zero gradient; t = 4: 100x smaller, scale-free: the limiter sees the same G~)
            p.grad = torch.randn(p.shape, generator=gen) * (0.0 if t == 2 else 0.01 if t == 4 else 1 + t % 3)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("config", [None, CONFIGS[2], CONFIGS[3]], ids=["decay", "loose", "no-memory"])
def test_foreach_buckets_equal_the_per_parameter_step(config):
    """Same-shape tensors stacked (4 matrices, 3 vectors; the fixed point by batched products), 2 3-D tensors (batches
    of matrices: each matrix stepped alone by the engine, outside the buckets), a 0-d
    and an empty tensor, a 40 x 300 weight above ``chunk_numel`` stepped from its first piece: weights and scalings
    equal ``foreach=False`` to float32 rounding over 6 steps with an all-zero one (measured: 2 ulps of the weights)."""
    calls = []
    orig = RacsMoments._group_direction

    def counting(grads, states, group, t):
        calls.append((len(grads), tuple(grads[0].shape)))
        return orig(grads, states, group, t)

    RacsMoments._group_direction = staticmethod(counting)
    try:
        a, oa = _bucket_run(None, config=config)
    finally:
        RacsMoments._group_direction = staticmethod(orig)
    assert (4, (16, 24)) in calls and (3, (24,)) in calls  # (stacked)
    assert not [c for c in calls if len(c[1]) == 3]  # (a batch of matrices: stepped by the engine in blocks of whole matrices, outside the buckets)
    b, ob = _bucket_run(False, config=config)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=lambda m: f"{tuple(x.shape)}: {m}")
        for k in oa.state[x]:
            torch.testing.assert_close(oa.state[x][k], ob.state[y][k], rtol=1e-5, atol=0)


@pytest.mark.parametrize("shapes,chunk", [(BUCKET, 4096), (BUCKET, 600), (BUCKET, None), (STACKS, 4096),
                                          ([(64, 24), (24,), (24, 48), (48,)], 100000), ([()] * 5, 4096)],
                         ids=["bucket", "bucket-600", "bucket-whole", "stacks", "mixed", "scalars"])
def test_foreach_step_allocates_what_it_reports(shapes, chunk):
    """``step_transient_bytes()`` with the buckets equals the traced steps 2-4 (measured: 12 bucket layouts and
    chunks and single-shape stacks of 1-5 tensors, 0 off; a stack of 0-d tensors peaks in the limiter's phase)."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = create_optimizer(ps, "racs")
    opt.chunk_numel = chunk
    gen = torch.Generator().manual_seed(1)
    peak = 0
    opt.materialize_state()
    for step in range(4):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        with _RealLive() as tr:
            opt.step()
        if step > 0:
            peak = max(peak, tr.peak)
    assert opt.step_transient_bytes() == peak
