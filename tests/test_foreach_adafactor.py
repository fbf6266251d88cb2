"""Adafactor's multi-tensor path (issue 15): the engine's foreach buckets step parameters of every
shape with ``functional.adafactor_foreach_`` (a group of same-shape tensors at a time, each operation
once on the group's stack; step sizes by ``adafactor_lr_foreach``: the parameters' RMS in one
``torch._foreach_norm``), equal bit for bit to the per-parameter step (``foreach=False``, the
reference path) with the same ``chunk_numel``; a tensor larger than ``chunk_numel`` arrives in pieces
and is stepped whole from its first one (a matrix chunked by rows, a vector or a batched matrix whole)."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowmem.optim.functional as F
from lowmem.optim.functional.adafactor import stack_groups
from lowmem.optim.moments import FactoredMoments, constant_lr
from lowmem.optim.registry import create_optimizer

# same-shape matrices (stacked groups), a different one, a 1 x n row, an n x 1 column, vectors (two of one
# length), batched matrices (two 3-D of one shape, a 4-D), and with chunk_numel=1024 a matrix, a vector
# and a 3-D tensor larger than it (pieces, stepped whole)
SHAPES = [(37, 29), (37, 29), (16, 8), (16, 8), (16, 8), (1, 13), (13, 1), (64,), (64,), (7,), (2, 5, 6), (2, 5, 6),
          (2, 3, 2, 5), (3000,), (40, 40), (2, 30, 20)]
# bucketed at chunk_numel=1024 (everything at None)
SMALL = {(16, 8), (1, 13), (13, 1), (64,), (7,), (2, 5, 6), (2, 3, 2, 5)}

CONFIGS = {
    "default": {},  # relative step, parameter scale
    "relative_no_scale": {"scale_parameter": False},
    "lr_scaled": {"lr": 1e-2, "relative_step": False},
    "lr_plain": {"lr": 1e-2, "relative_step": False, "scale_parameter": False},
    "beta1_wd": {"beta1": 0.9, "weight_decay": 0.1},
    "beta1_wd_lr": {"beta1": 0.9, "weight_decay": 0.1, "lr": 1e-2, "relative_step": False, "scale_parameter": False},
    "wd_warmup_clip": {"weight_decay": 0.2, "warmup_init": True, "clip_threshold": 0.3},
}


def _run(hparams, foreach, chunk_numel, monkeypatch, steps=4, name="adafactor"):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = create_optimizer(ps, name, foreach=foreach, **hparams)
    opt.chunk_numel = chunk_numel
    seen = []
    orig = F.adafactor_foreach_

    def spy(params, *args, **kwargs):
        seen.append(sorted(tuple(p.shape) for p in params))
        return orig(params, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(F, "adafactor_foreach_", spy)
        for i in range(steps):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen) * (30.0 if i % 2 else 1.0)  # spikes: clipping
            opt.step()
    return ps, opt, seen


@pytest.mark.parametrize("chunk_numel", [None, 1024])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_foreach_equals_the_per_parameter_step_bit_for_bit(config, chunk_numel, monkeypatch):
    _check_equal(config, CONFIGS[config], chunk_numel, monkeypatch, "adafactor")


@pytest.mark.parametrize("chunk_numel", [None, 1024])
def test_adalomo_foreach_equals_the_per_parameter_step_bit_for_bit(chunk_numel, monkeypatch):
    """AdaLomo's plain step() (its lr rule ``lr * max(eps2, RMS)``: AdaLomoMoments.foreach_lr_form)."""
    _check_equal("adalomo", {"lr": 1e-2, "weight_decay": 0.1, "clip_threshold": 0.5}, chunk_numel, monkeypatch, "adalomo")


def _check_equal(config, hp, chunk_numel, monkeypatch, name):
    ref, ref_opt, ref_seen = _run(hp, False, chunk_numel, monkeypatch, name=name)
    got, got_opt, seen = _run(hp, None, chunk_numel, monkeypatch, name=name)
    assert ref_seen == []
    expected = sorted(s for s in SHAPES if chunk_numel is None or s in SMALL)
    assert seen and all(shapes == expected for shapes in seen), seen
    for a, b in zip(ref, got):
        assert torch.equal(a, b), (config, tuple(a.shape), (a - b).abs().max().item())
        sa, sb = ref_opt.state[a], got_opt.state[b]
        assert set(sa) == set(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (config, tuple(a.shape), k)


def test_stacked_groups_are_small_tensors_of_one_shape_and_kind():
    xs = [torch.zeros(s) for s in [(4, 5), (5,), (4, 5), (4, 5), (20,), (200, 200), (200, 200), (2, 4, 5)]]
    xs.append(torch.zeros(5, 4).t())  # non-contiguous: alone
    kinds = [2, 1, 2, 1, 1, 2, 2, 2, 2]  # (4, 5) with a full second moment: not stacked with the factored ones
    assert stack_groups(xs, kinds) == [[0, 2], [1], [3], [4], [5], [6], [7], [8]]  # 40,000 >= STACK_NUMEL: alone


def test_large_tensors_are_not_stacked_so_threads_do_not_change_a_bit(monkeypatch):
    """With two threads torch splits a whole-tensor sum of at least GRAIN_SIZE elements (the column
    mean of a 40,000 x 1 matrix) over the threads; stacked, each row of the stack is summed by one
    thread: the bits differ. Such tensors are groups of their own (``STACK_NUMEL``)."""
    shapes = [(40000, 1), (40000, 1), (1, 40000), (1, 40000)]

    def run(foreach):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = create_optimizer(ps, "adafactor", foreach=foreach, weight_decay=0.1)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return ps

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref, got = run(False), run(None)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(ref, got):
        assert torch.equal(a, b), tuple(a.shape)


@pytest.mark.parametrize("hparams", [{}, {"beta1": 0.9, "weight_decay": 0.1}])
def test_non_contiguous_gradients_and_parameters_bit_for_bit(hparams):
    """Transposed parameters and gradients (their ``g^2`` is reduced in the gradient's own layout by the
    per-parameter step: such a tensor is not stacked, and a lone tensor is not copied into a stack),
    next to contiguous ones of the same shape, and 0-d parameters."""

    def run(foreach):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn((), generator=gen)), torch.nn.Parameter(torch.randn((), generator=gen)),
              torch.nn.Parameter(torch.randn(7, 5, generator=gen).t()), torch.nn.Parameter(torch.randn(5, 7, generator=gen)),
              torch.nn.Parameter(torch.randn(5, 7, generator=gen)),
              torch.nn.Parameter(torch.randn(3, 7, 5, generator=gen).transpose(1, 2)),
              torch.nn.Parameter(torch.randn(3, 5, 7, generator=gen))]
        opt = create_optimizer(ps, "adafactor", foreach=foreach, **hparams)
        for i in range(3):
            for p in ps:  # every gradient of 2+ dimensions transposed in memory
                g = torch.randn(tuple(reversed(p.shape)), generator=gen)
                p.grad = g.permute(*reversed(range(p.dim()))) * (20.0 if i % 2 else 1.0) if p.dim() else g
            opt.step()
        return ps, opt

    (ref, ref_opt), (got, got_opt) = run(False), run(None)
    for a, b in zip(ref, got):
        assert torch.equal(a, b), tuple(a.shape)
        assert all(torch.equal(ref_opt.state[a][k], got_opt.state[b][k]) for k in ref_opt.state[a])


def test_bucket_clips_and_scales_each_tensor_by_its_own_rms():
    """The pure kernel on one bucket against the paper's step written per tensor (Algorithm 4 with
    Section 6's clipping and Section 8's step size), with tensors of very different RMS so a step
    size or clip taken from the wrong tensor shows."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 5), (6, 5), (9,), (4, 7)]
    scales = [1.0, 100.0, 0.01, 10.0]
    ps = [torch.randn(s, generator=gen) * c for s, c in zip(shapes, scales)]
    gs = [torch.randn(s, generator=gen) * c for s, c in zip(shapes, reversed(scales))]
    rows = [torch.rand(s[0], generator=gen) + 0.1 if len(s) == 2 else None for s in shapes]
    cols = [torch.rand(s[1], generator=gen) + 0.1 if len(s) == 2 else None for s in shapes]
    vs = [None if len(s) == 2 else torch.rand(s, generator=gen) + 0.1 for s in shapes]
    beta2, eps1, eps2, d, rho, wd = 0.7, 1e-30, 1e-3, 1.0, 0.05, 0.1
    expected = []
    for p, g, r, c, v in zip(ps, gs, rows, cols, vs):
        g2 = g * g + eps1
        if r is not None:
            r2, c2 = beta2 * r + (1 - beta2) * g2.mean(1), beta2 * c + (1 - beta2) * g2.mean(0)
            vhat = torch.outer(r2, c2) / r2.mean()
        else:
            vhat = beta2 * v + (1 - beta2) * g2
        u = g / vhat.sqrt()
        u = u / torch.clamp(u.pow(2).mean().sqrt() / d, min=1.0)
        alpha = rho * torch.clamp(p.pow(2).mean().sqrt(), min=eps2)
        expected.append(p - alpha * wd * p - alpha * u)
    lrs = F.adafactor_lr_foreach(ps, rho, True, eps2)
    second = [(r, c) if r is not None else (v,) for r, c, v in zip(rows, cols, vs)]
    F.adafactor_foreach_(ps, gs, second, None, lrs, beta2, eps1, d, None, wd)
    for p, e in zip(ps, expected):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-7)


def test_which_parameters_take_the_buckets(monkeypatch):
    rule = FactoredMoments()
    group = {"params": [torch.zeros(3)]}
    assert rule.supports_foreach_for(torch.Size([4, 5]), group, {})
    assert rule.supports_foreach_for(torch.Size([5]), group, {})
    assert rule.supports_foreach_for(torch.Size([2, 4, 5]), group, {})  # a batched matrix, factored per matrix
    monkeypatch.setattr("lowmem.optim.moments.sharded_group", lambda g: True)
    assert not rule.supports_foreach_for(torch.Size([4, 5]), group, {})  # FSDP2: all-reduced statistics
    with pytest.raises(ValueError, match="no multi-tensor form of the lr rule"):
        rule.foreach_step_([], [], [], {}, 1, 0.1, lr_rule=constant_lr)


def test_foreach_transient_bytes_is_reported():
    """A bucket of every small tensor, stepped a group of one shape at a time: the largest group's
    updates and decay term (two float32 tensors of the group) and its stacked row / column statistics
    with their scalings (8 k (R + C) bytes), plus 16 bytes per tensor for the step sizes (issue 12: was two
    float32 tensors of the whole bucket, without the statistics; tests/test_engine_accounting.py holds
    this against the allocations); a tensor in pieces adds its per-parameter chunked step's transient
    (rows of the largest chunk)."""
    ps = [torch.nn.Parameter(torch.zeros(s, device="meta")) for s in [(64,)] * 8 + [(32, 32)] * 4]
    opt = create_optimizer(ps, "adafactor")
    opt.materialize_state()
    assert opt.step_transient_bytes() == max(8 * 8 * 64, 8 * 4 * 1024 + 8 * 4 * (32 + 32)) + 16 * 12
    # a vector in pieces is stepped whole (g^2 + eps1 and its update: 8 bytes an element, and the step size's 0-d
    # tensor), a matrix in chunks of whole rows (20 rows of 100 for pieces of 2000: the chunk's step beside the
    # factors, FactoredMoments.chunk_transient_bytes): the meta report is what a CPU step allocates (traced)
    from test_transient_per_parameter import _Traced

    for shape, expected in (((5000,), 8 * 5000 + 4), ((100, 100), None)):
        big = [torch.nn.Parameter(torch.zeros(shape, device="meta"))]
        opt = create_optimizer(big, "adafactor")
        opt.materialize_state()
        opt.chunk_numel = 2000
        p = torch.nn.Parameter(torch.randn(shape))
        real = create_optimizer([p], "adafactor")
        real.chunk_numel = 2000
        for _ in range(3):
            p.grad = torch.randn(shape)
            if _ == 2:
                with _Traced() as traced:
                    real.step()
            else:
                real.step()
        assert opt.step_transient_bytes() == traced.peak == real.step_transient_bytes(), shape
        if expected is not None:
            assert traced.peak == expected, shape


def test_galore_adafactor_full_rank_parameters_take_the_buckets(monkeypatch):
    """galore_adafactor: the projected weights stay on the per-parameter step, the full-rank ones
    (vectors, and a weight whose smaller side is at most the rank) take Adafactor's buckets, equal bit
    for bit to ``foreach=False``."""
    shapes = [(32, 24), (20,), (20,), (3, 12)]

    def run(foreach):
        with warnings.catch_warnings():
            return _run_galore(foreach)

    def _run_galore(foreach):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        # one group at rank 4: (32, 24) projected; the vectors and (3, 12) full-rank (a group whose rank is above
        # every 2-D side, as (3, 12)'s alone at the default 128 was, is an error)
        groups = [{"params": ps, "rank": 4}]
        warnings.filterwarnings("ignore", message=".*full-rank")  # (3, 12): rank >= its smaller side
        opt = create_optimizer(groups, "galore_adafactor", foreach=foreach, weight_decay=0.1)
        seen, orig = [], F.adafactor_foreach_

        def spy(params, *a, **k):
            seen.append(sorted(tuple(p.shape) for p in params))
            return orig(params, *a, **k)

        with monkeypatch.context() as mp:
            mp.setattr(F, "adafactor_foreach_", spy)
            for i in range(3):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=gen) * (20.0 if i % 2 else 1.0)
                opt.step()
        return ps, seen

    ref, ref_seen = run(False)
    got, seen = run(None)
    assert ref_seen == [] and seen and all(s == [(3, 12), (20,), (20,)] for s in seen), seen
    for a, b in zip(ref, got):
        assert torch.equal(a, b), tuple(a.shape)



@pytest.mark.parametrize("beta1", [None, 0.9])
@pytest.mark.parametrize("tensor_lrs", [False, True])
def test_foreach_direction_equals_direction_of_each_bit_for_bit(beta1, tensor_lrs):
    """The projected multi-tensor form (GaLore with Adafactor: ``foreach_direction``, one step size per
    gradient) against :meth:`direction` of each projected gradient, over steps with spikes (clipping):
    directions and statistics equal bit for bit, directions never a state's own tensor. (The engine
    takes this path once its projected buckets accept a rule with ``foreach_direction_lrs``.)"""
    rule = FactoredMoments()
    group = {"eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8, "beta1": beta1, "state_dtype": "float32",
             "params": [torch.zeros(1)]}
    shapes = [(8, 24), (8, 24), (8, 24), (24, 8), (4, 30), (1, 7), (7, 1)]
    gen = torch.Generator().manual_seed(5)
    ref_states, got_states = [{} for _ in shapes], [{} for _ in shapes]
    for a, b, s in zip(ref_states, got_states, shapes):
        rule.init_state(a, torch.Size(s), group, torch.zeros(1))
        rule.init_state(b, torch.Size(s), group, torch.zeros(1))
        assert rule.supports_foreach_direction(group, b, torch.zeros(1))
    for t in range(1, 5):
        gs = [torch.randn(s, generator=gen) * (25.0 if t % 2 else 1.0) for s in shapes]
        lrs = [torch.rand((), generator=gen) * 0.1 if tensor_lrs else 0.01 * (i % 3 + 1) for i in range(len(shapes))]
        expected = [rule.direction(g, st, group, t, lr) for g, st, lr in zip(gs, ref_states, lrs)]
        got = rule.foreach_direction(gs, got_states, group, t, lrs)
        for e, d, a, b in zip(expected, got, ref_states, got_states):
            assert torch.equal(e, d), (t, tuple(e.shape))
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
            assert all(d.untyped_storage().data_ptr() != v.untyped_storage().data_ptr() for v in b.values())
    assert not rule.supports_foreach_direction({**group, "state_dtype": "bfloat16"}, {}, torch.zeros(1))


@pytest.mark.parametrize("hparams", [{"weight_decay": 0.1}, {"beta1": 0.9}, {"lr": 1e-2, "relative_step": False}])
def test_galore_adafactor_projected_parameters_bit_for_bit(hparams, monkeypatch):
    """galore_adafactor's projected weights: the default ``foreach`` equals ``foreach=False`` bit for bit,
    over refreshes. The engine's projected buckets take them (``FactoredMoments.foreach_direction``, one
    step size per parameter: ``foreach_direction_lrs``): ``seen`` holds the bucket of four at every step."""
    shapes = [(32, 24), (32, 24), (24, 32), (40, 16), (20,)]

    def run(foreach):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        groups = [{"params": ps[:4], "rank": 4, "update_proj_gap": 2}, {"params": ps[4:]}]
        opt = create_optimizer(groups, "galore_adafactor", foreach=foreach, **hparams)
        seen, orig = [], F.adafactor_direction_foreach

        def spy(gs, *a, **k):
            seen.append(len(gs))
            return orig(gs, *a, **k)

        with monkeypatch.context() as mp:
            mp.setattr(F, "adafactor_direction_foreach", spy)
            for i in range(4):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=gen) * (20.0 if i % 2 else 1.0)
                opt.step()
        return ps, opt, seen

    (ref, ref_opt, ref_seen), (got, got_opt, seen) = run(False), run(None)
    assert ref_seen == [] and len(seen) == 4 and all(n == 4 for n in seen), seen
    for a, b in zip(ref, got):
        assert torch.equal(a, b), tuple(a.shape)
        assert all(torch.equal(ref_opt.state[a][k], got_opt.state[b][k]) for k in ref_opt.state[a])


@pytest.mark.parametrize("config", ["default", "beta1_wd_lr"])
def test_groups_capped_at_group_numel_step_as_the_reference(config):
    """Same-shape tensors beyond GROUP_NUMEL (2^18) elements are stacked in consecutive groups of at most
    that many (issue 15: the stacks stay in cache): 17 weights of 128 x 128 (16,384 elements) form
    groups of 16 and 1 and 40 vectors of 8192 groups of 32 and 8; the step equals ``foreach=False`` bit for
    bit (the groups' results do not depend on their size), and the bucket's report follows the groups."""
    from lowmem.optim.functional.adafactor import GROUP_NUMEL

    shapes = [(128, 128)] * 17 + [(8192,)] * 40
    xs = [torch.zeros(s) for s in shapes]
    groups = stack_groups(xs, [2] * 17 + [1] * 40)
    assert [len(g) for g in groups] == [16, 1, 32, 8] and GROUP_NUMEL == 2**18
    assert [i for g in groups for i in g] == list(range(len(shapes)))

    def run(foreach):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = create_optimizer(ps, "adafactor", foreach=foreach, **CONFIGS[config])
        for i in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen) * (30.0 if i % 2 else 1.0)
            opt.step()
        return ps, opt

    (ref, ref_opt), (got, got_opt) = run(False), run(None)
    for a, b in zip(ref, got):
        assert torch.equal(a, b), tuple(a.shape)
        for k in ref_opt.state[a]:
            assert torch.equal(ref_opt.state[a][k], got_opt.state[b][k]), (tuple(a.shape), k)
    # the report: the largest group (16 weights: 2 x 1 MiB and their statistics), not all 17
    rule = got_opt.recipe.moment
    members = [(p.numel(), got_opt.state[p]) for p in got]
    assert rule.foreach_bucket_transient_bytes(0, members) == 8 * 16 * 16384 + 8 * 16 * 256 + 16 * len(shapes)
