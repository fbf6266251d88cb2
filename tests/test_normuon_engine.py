"""NorMuon (Li et al. 2025, Algorithm 1) on the engine: its paths against the paper loop
(lowmem/optim/references/normuon.py) on shapes beyond the reference suite's, against each other (whole, chunked in
blocks of rows, multi-tensor buckets, an FSDP2 shard's step on one shard), its state (Muon's plus one number per
row) and its step's allocations traced against its report."""

from __future__ import annotations

import math

import pytest
import torch
from test_transient_per_parameter import _Traced

from lowmem.optim import create_optimizer
from lowmem.optim.functional.muon import bf16_workspace_left_out
from lowmem.optim.references import get_reference


def _group_of(opt):
    return {k: v for k, v in opt.param_groups[0].items() if k != "params"}


def _grads(shape, steps, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    gs = [torch.randn(shape, generator=gen).to(dtype) for _ in range(steps)]
    if steps > 2:
        gs[2] = torch.zeros(shape, dtype=dtype)  # a zero gradient: O = 0, the rescaling's eps keeps it finite
    return gs


SHAPES = [(16, 48), (48, 16), (40,), (), (6, 3, 3, 3), (2, 5, 7)]  # wide, tall, a vector, 0-d, conv-like, a batch
CONFIGS = [{"lr": 2e-2}, {"lr": 2e-2, "nesterov": False, "weight_decay": 0.1, "update_scale": "preserve_norm"},
           {"lr": 1e-2, "weight_decay": 0.3, "beta2": 0.5, "row_eps": 1e-4, "momentum": 0.8}]


@pytest.mark.parametrize("path", ["whole", "chunked", "foreach"])
@pytest.mark.parametrize("config", CONFIGS, ids=["defaults", "plain_preserve", "decay_beta2"])
def test_engine_follows_the_paper_loop(config, path):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    init = [p.detach().clone() for p in ps]
    opt = create_optimizer(ps, "normuon", foreach=path == "foreach", **config)
    opt.chunk_numel = {"whole": None, "chunked": 96, "foreach": 2**20}[path]
    grads = [_grads(s, 5, seed=i) for i, s in enumerate(SHAPES)]
    traj = [[] for _ in ps]
    for t in range(5):
        for p, g in zip(ps, grads):
            p.grad = g[t].clone()
        opt.step()
        for i, p in enumerate(ps):
            traj[i].append(p.detach().clone())
    loop = get_reference("normuon").loop
    for i, p in enumerate(ps):
        want = loop(init[i].clone(), grads[i], index=i, **_group_of(opt))
        for t in range(5):
            torch.testing.assert_close(traj[i][t], want[t], rtol=1e-5, atol=1e-6, msg=f"{SHAPES[i]} step {t + 1}")
    assert opt.state[ps[0]]["second_momentum_buffer"].shape == (16,)
    # a conv kernel: one per output channel, a row of its matrix [6, 27] (AUDMATH21 1; before, one per row of each
    # 3 x 3 kernel, (6, 3, 3))
    assert opt.state[ps[4]]["second_momentum_buffer"].shape == (6,)


def _run(path, shapes, steps=4, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    opt = create_optimizer(ps, "normuon", lr=2e-2, foreach=path == "foreach", **kw)
    opt.chunk_numel = {"whole": None, "chunked": 64, "foreach": 2**20, "pieces": 200}[path]
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = _grads(p.shape, steps, seed=10 * i + 1, dtype=dtype)[t]
        opt.step()
    return ps, opt


@pytest.mark.parametrize("path", ["chunked", "foreach", "pieces"])
def test_every_path_equals_the_whole_step_bit_for_bit(path):
    """Whole matrices (the reference iteration), blocks of rows, buckets of stacked matrices of one shape (three
    24 x 40, two 40 x 24, a batch 2 x 24 x 40 joining them) and a bucket whose large weight arrives in pieces:
    the same weights and states, bit for bit (the same bfloat16 iterate, rows' norms of contiguous rows, the
    factors by the same foreach kernels, one product per element). The AdamW vector to float32 rounding."""
    shapes = [(24, 40)] * 3 + [(40, 24)] * 2 + [(2, 24, 40), (20, 30), (30,)]
    want, wopt = _run("whole", shapes)
    got, gopt = _run(path, shapes)
    for a, b in zip(want, got):
        if a.dim() < 2:  # (AdamW's: torch's fused kernel in a bucket, to float32 rounding)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            continue
        assert torch.equal(a, b), a.shape
        for k, v in wopt.state[a].items():
            assert torch.equal(v, gopt.state[b][k]), (a.shape, k)


class _OneShard:
    """A ShardReduce over one shard holding every row (no process group): what the sharded step reads."""

    def __init__(self, shape):
        self.shape, self.rows = torch.Size(shape), (0, shape[0])

    def gather_rows(self, t, rows):
        return t[:rows]

    def sum_(self, t):
        return t


@pytest.mark.parametrize("update_scale", ["match_rms", "preserve_norm"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_shard_step_with_one_shard_equals_the_whole_step(shape, update_scale):
    """The FSDP2 step (Muon's gathered iteration, then ``||O^||_F`` and ``||O||_F`` from their squares summed over
    the shards) on one shard holding every row: the whole step's direction and state (float32 rounding of the two
    norms' sums)."""
    torch.manual_seed(0)
    p, q = torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(shape))
    q.data.copy_(p.data)
    a = create_optimizer([p], "normuon", lr=2e-2, update_scale=update_scale)
    a.chunk_numel = None
    b = create_optimizer([q], "normuon", lr=2e-2, update_scale=update_scale)
    rule = b.recipe.moment
    group = b.param_groups[0]
    for t, g in enumerate(_grads(shape, 4, seed=3)):
        p.grad = g.clone()
        a.step()
        if not b.state[q]:
            b.state[q].update(step=torch.zeros(()))
            rule.init_state(b.state[q], q.shape, group, q)
        step = rule.prepare_chunks(b.state[q], shape, group, t + 1, group["lr"], [(0, q.numel())],
                                   lambda s, e, _: g.reshape(-1)[s:e], reduce=_OneShard(shape))
        with torch.no_grad():
            q.mul_(1 - group["lr"] * group["weight_decay"]).sub_(step)
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.state[q]["second_momentum_buffer"], a.state[p]["second_momentum_buffer"], rtol=1e-6,
                               atol=0)


def test_state_is_muons_plus_one_float_per_row():
    """A model of a 64 x 48 and a 32 x 64 weight, a 4 x 16 x 8 batch and biases: NorMuon's state is Muon's plus
    4 bytes per row of each targeted matrix (64 + 32 + 4 x 16 rows), exactly, also sized on meta parameters."""
    for device in ("cpu", "meta"):
        ps = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in [(64, 48), (32, 64), (4, 16, 8), (64,), (32,)]]
        muon, normuon = create_optimizer(ps, "muon"), create_optimizer(ps, "normuon")
        muon.materialize_state()
        normuon.materialize_state()
        assert normuon.state_bytes() - muon.state_bytes() == 4 * (64 + 32 + 4 * 16)
        assert muon.state_bytes() == 4 * (64 * 48 + 32 * 64 + 4 * 16 * 8) + 8 * (64 + 32) + 4 * 2 + 4 * 3


def test_bfloat16_weights_keep_float32_state_and_follow_the_float32_loop():
    torch.manual_seed(0)
    w32 = torch.randn(24, 40)
    p = torch.nn.Parameter(w32.to(torch.bfloat16))
    opt = create_optimizer([p], "normuon", lr=2e-2, weight_decay=0.1)
    grads = _grads((24, 40), 4, seed=5)
    for g in grads:
        p.grad = g.to(torch.bfloat16)
        opt.step()
    assert opt.state[p]["second_momentum_buffer"].dtype == torch.float32
    want = get_reference("normuon").loop(w32.to(torch.bfloat16).float(), [g.bfloat16().float() for g in grads],
                                          index=0, **_group_of(opt))[-1]
    torch.testing.assert_close(p.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", ["default", 4096, None], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(200, 128), (96, 160), (64, 2)])  # (64 x 2: the normalization phase peaks)
def test_per_parameter_step_allocates_what_it_reports(shape, dtype, chunk, state_dtype):
    """The step of one weight (layerwise mode's, ``step_param``) traced against
    ``step_transient_bytes(per_parameter=True)`` without the BLAS workspace (not a tensor): equal."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = create_optimizer([p], "normuon", lr=2e-2, state_dtype=state_dtype)
    if chunk != "default":
        opt.chunk_numel = chunk
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        opt.step_param(p, torch.randn(shape, generator=gen).to(dtype))
    g = torch.randn(shape, generator=gen).to(dtype)
    with _Traced() as t:
        opt.step_param(p, g)
    with bf16_workspace_left_out():
        reported = opt.step_transient_bytes(per_parameter=True)
    assert t.peak == reported > 0


# (16 x 2: the factors' phase is the peak)
@pytest.mark.parametrize("k,shape", [(3, (24, 40)), (2, (40, 24)), (4, (16, 16)), (3, (16, 2))])
def test_bucket_step_allocates_what_it_reports(k, shape):
    """A bucket of ``k`` float32 matrices of one shape (:func:`normuon_foreach_`) traced against the rule's count of
    it without the BLAS workspace: equal."""
    from lowmem.optim.recipes.normuon import normuon_foreach_, normuon_foreach_bytes

    torch.manual_seed(0)
    ps = [torch.randn(shape) for _ in range(k)]
    opt = create_optimizer([torch.nn.Parameter(p) for p in ps], "normuon", lr=2e-2)
    group = opt.param_groups[0]
    bufs, vs = [torch.zeros(shape) for _ in ps], [torch.zeros(shape[0]) for _ in ps]
    gs = [torch.randn(shape) for _ in ps]
    normuon_foreach_(ps, gs, bufs, vs, shape, group, 2e-2)  # (a first step: the BLAS's first products)
    with _Traced() as t:
        normuon_foreach_(ps, gs, bufs, vs, shape, group, 2e-2)
    with bf16_workspace_left_out():
        assert t.peak == normuon_foreach_bytes(k * math.prod(shape), shape)


@pytest.mark.parametrize("bad", [{"beta2": 1.0}, {"row_eps": 0.0}, {"update_scale": "rms"},
                                 {"adjust_lr_fn": "original"}])
def test_invalid_settings_name_the_field(bad):
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        create_optimizer([torch.nn.Parameter(torch.zeros(4, 4))], "normuon", **bad)


def test_eps_that_no_parameter_takes_is_said():
    """``eps`` is AdamW's here (as in lowmem's Muon); pytorch_optimizer's ``NorMuon(eps=...)`` is the row
    normalization's (``row_eps`` here). Given to a NorMuon whose every parameter takes NorMuon, it would change
    nothing: a warning names ``row_eps``. With an AdamW parameter present it applies: no warning."""
    from lowmem.optim import NorMuon

    with pytest.warns(UserWarning, match="row_eps"):
        NorMuon([torch.nn.Parameter(torch.zeros(4, 4))], eps=1e-6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NorMuon([torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4))], eps=1e-6)
        NorMuon([torch.nn.Parameter(torch.zeros(4, 4))], row_eps=1e-6)
