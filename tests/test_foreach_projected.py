"""The multi-tensor step of projected parameters (issue 15): each parameter projected down alone, the
moment rule on a bucket's projected gradients at once (``MomentRule.foreach_direction``), the bucket
combined back at once where the combine rule offers it (``CombineRule.foreach_fold``: GaLore, Fira,
OSD, APOLLO on float32 parameters), else each alone; equal to the per-parameter step (``foreach=False``):
the moments bit for bit on the CPU, where the multi-tensor kernels run the per-tensor operations in the
same order, the weights to float32 rounding (tests/test_foreach_fold.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.optim import functional as F
from lowmem.optim.registry import create_optimizer

# several equal shapes (one bucket), different shapes and both projection sides, one long enough to
# fill a bucket alone, and a vector (full-rank, in the same group)
SHAPES = [(16, 12), (16, 12), (12, 20), (20, 12), (9, 40), (7,)]
RANK = 4

CONFIGS = {
    "galore_std": ("galore_adamw", {"weight_decay": 0.1, "scale": 0.5}),
    "galore_reverse_std": ("galore_adamw", {"proj_type": "reverse_std", "weight_decay": 0.1}),
    "galore_rsvd_rotate": ("galore_adamw", {"projection": "rsvd", "moment_policy": "rotate"}),
    "galore_reset": ("galore_adamw", {"moment_policy": "reset", "proj_type": "left"}),
    "fira": ("fira_adamw", {"weight_decay": 0.1}),
    "frugal": ("frugal", {"weight_decay": 0.1}),  # torch's eps placement, decay before the update
    "frugal_columns": ("frugal", {"projection": "columns"}),
    "apollo": ("apollo_adamw", {"weight_decay": 0.1}),
    "apollo_mini": ("apollo_mini", {"rank": 1}),
    "osd": ("osd_adamw", {"proj_lr": 1e-2}),
    # 8-bit moments: decoded, the bucket's Adam step, encoded; 64-element projected gradients stay float32
    "galore_8bit": ("galore_adamw8bit", {"min_quant_size": 70, "block_size": 64, "weight_decay": 0.1}),
    "fira_8bit": ("fira_adamw8bit", {"min_quant_size": 16, "block_size": 64}),
    "frugal_8bit": ("frugal8bit", {"min_quant_size": 16, "block_size": 64, "projection": "columns"}),
}


def _run(name, hparams, foreach, chunk_numel, dtype=torch.float32, steps=5, skip_first=(), monkeypatch=None):
    """Weights and state after ``steps`` steps (a refresh every 2 steps), and the element counts of
    the buckets the multi-tensor direction stepped."""
    calls: list[list[int]] = []

    def spy_on(orig):
        def spy(ms, *args, **kwargs):
            calls.append([m.numel() for m in ms])
            return orig(ms, *args, **kwargs)
        return spy

    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    hp = {"rank": RANK, "update_proj_gap": 2, "lr": 1e-2, "eps": 1e-3, **hparams}
    opt = create_optimizer(ps, name, **hp)
    opt.chunk_numel = chunk_numel
    for g in opt.param_groups:
        g["foreach"] = foreach
    with monkeypatch.context() as mp:
        mp.setattr(F, "adam_direction_foreach", spy_on(F.adam_direction_foreach))
        mp.setattr(F, "adafactor_direction_foreach", spy_on(F.adafactor_direction_foreach))
        for step in range(steps):
            for i, p in enumerate(ps):
                p.grad = None if (step == 0 and i in skip_first) else torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
    return [p.detach().clone() for p in ps], [{k: v.clone() for k, v in opt.state[p].items()} for p in ps], calls, opt


def _assert_equal(fast, ref, rounded=False):
    """Projected parameters and their state bit for bit; the full-rank vector (the full-rank foreach
    path where the rule has one, tested on its own in test_reference / test_speed_paths) at rtol 1e-6.
    ``rounded``: the state to float32 rounding (Online Subspace Descent's basis gradients stacked by
    shape, ``osd.pca_loss_grad_stacked``: torch's batched GEMM of tiny matrices sums in another order)."""
    fast_p, fast_s = fast[:2]
    ref_p, ref_s = ref[:2]
    for i, (a, b, sa, sb) in enumerate(zip(fast_p, ref_p, fast_s, ref_s)):
        assert sa.keys() == sb.keys()
        if a.dim() == 1:
            for x, y in [(a, b), *((sa[k], sb[k]) for k in sa)]:
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
            continue
        # the bucket's combine-back (CombineRule.foreach_fold, float32: statistics stacked by shape, the
        # update folded into addmm_ / addcmul_) rounds differently from each parameter's: weights and the
        # limiters' norms to float32 rounding; the moments (before the combine-back) bit for bit
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7, msg=lambda m: f"{i}: {m}")
        for k in sa:
            if k.endswith("_prev_norm"):
                torch.testing.assert_close(sa[k], sb[k], rtol=2e-6, atol=0, msg=lambda m: f"{i} {k}: {m}")
            elif rounded:
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-8, msg=lambda m: f"{i} {k}: {m}")
            else:
                assert torch.equal(sa[k], sb[k]), (i, k)


def _low_numel(opt, ps_shapes=SHAPES):
    group = opt.param_groups[0]
    return [opt.recipe.projection.low_shape(torch.Size(s), group).numel() for s in ps_shapes if len(s) == 2]


@pytest.mark.parametrize("label", sorted(CONFIGS))
@pytest.mark.parametrize("chunk_numel", [160, None])
def test_projected_bucket_equals_the_per_parameter_step(label, chunk_numel, monkeypatch):
    """Weights and every state tensor equal bit for bit after 5 steps with refreshes at steps 1, 3
    and 5; every projected element goes through the multi-tensor direction every step, in buckets
    of at most ``chunk_numel`` projected elements (one larger than that alone), at least one bucket
    holding several parameters; the reference never calls it."""
    name, hp = CONFIGS[label]
    fast = _run(name, hp, None, chunk_numel, monkeypatch=monkeypatch)
    ref = _run(name, hp, False, chunk_numel, monkeypatch=monkeypatch)
    assert ref[2] == []
    _assert_equal(fast, ref, rounded=name == "osd_adamw")
    lows, vector = _low_numel(fast[3]), [n for s in SHAPES if len(s) == 1 for n in s]
    calls = [c for c in fast[2] if c != vector]  # (8-bit moments: the vector's full-rank bucket calls it too)
    assert len(fast[2]) - len(calls) == (5 if name.endswith("8bit") else 0)
    assert sum(map(sum, calls)) == 5 * sum(lows)
    assert max(map(len, calls)) > 1
    for bucket in calls:
        assert chunk_numel is None or len(bucket) == 1 or sum(bucket) <= chunk_numel, bucket
    if chunk_numel is None:  # one bucket per step
        assert len(calls) == 5


@pytest.mark.parametrize("label", ["galore_std", "fira", "apollo", "frugal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_projected_bucket_bf16_and_float64_parameters(label, dtype, monkeypatch):
    """bf16 parameters and gradients (projected a block of rows at a time) take the buckets too, with float32
    moments, equal bit for bit; float64 ones take the per-parameter step (session 15, FOUND_FP64SWEEP 3: the bucket's
    float32 copies made it allocate more than its count, 14,888 B traced for 6,920 reported on apollo_adamw; the
    per-parameter step 10,856, counted exactly)."""
    name, hp = CONFIGS[label]
    fast = _run(name, hp, None, 160, dtype=dtype, monkeypatch=monkeypatch)
    ref = _run(name, hp, False, 160, dtype=dtype, monkeypatch=monkeypatch)
    assert (bool(fast[2]) if dtype != torch.float64 else not fast[2]) and not ref[2]
    _assert_equal(fast, ref)


def test_projected_bucket_splits_by_step_count(monkeypatch):
    """A parameter without a gradient at the first step is a step behind the others: it is stepped in
    a bucket of its own step count (its bias correction), equal to the per-parameter step."""
    fast = _run("galore_adamw", {"weight_decay": 0.1}, None, None, skip_first=(1,), monkeypatch=monkeypatch)
    ref = _run("galore_adamw", {"weight_decay": 0.1}, False, None, skip_first=(1,), monkeypatch=monkeypatch)
    _assert_equal(fast, ref)
    # one bucket open at a time: parameter 1 (step t - 1) closes parameter 0's bucket and opens its own
    assert [len(c) for c in fast[2]] == [4] + [1, 1, 3] * 4


@pytest.mark.parametrize("name,hparams", [
    ("galore_adamw", {"state_dtype": "param"}),  # bf16 moments of a bf16 parameter: no multi-tensor form
    ("galore_adafactor", {"eps": (1e-30, 1e-3), "state_dtype": "param"}),  # bf16 factored statistics
])
def test_projected_bucket_not_taken_without_a_float32_multi_tensor_rule(name, hparams, monkeypatch):
    _, _, calls, _ = _run(name, hparams, None, 160, dtype=torch.bfloat16 if "state_dtype" in hparams else torch.float32,
                          steps=2, monkeypatch=monkeypatch)
    # no projected gradient in a bucket; the unprojected bf16 vectors may take the rule's bf16 bucket (BF16RULES:
    # Adafactor's bfloat16 statistics on float32 copies)
    vectors = {math.prod(s) for s in SHAPES if len(s) == 1}
    assert all(n in vectors for c in calls for n in c), calls


def test_galore_adafactor_takes_the_projected_buckets(monkeypatch):
    """Factored moments with an lr rule that reads the parameter (one step size per projected gradient,
    ``MomentRule.foreach_direction_lrs``): bucketed, equal to ``foreach=False`` bit for bit (the whole
    comparison over 3 configurations: tests/test_foreach_adafactor.py)."""
    hp = {"eps": (1e-30, 1e-3)}
    fast = _run("galore_adafactor", hp, None, 160, monkeypatch=monkeypatch)
    ref = _run("galore_adafactor", hp, False, 160, monkeypatch=monkeypatch)
    _assert_equal(fast, ref)
    assert ref[2] == [] and fast[2] and max(sum(c) for c in fast[2]) <= 160


# one weight shape whose plain step outweighs its refresh at rank 16 (a random basis: a draw, no SVD),
# so the phases of the bucket decide the report; float32 Adam moments
PHASES = [("apollo_adamw", {}), ("galore_adamw", {"projection": "random"}), ("fira_adamw", {"projection": "random"}),
          ("frugal", {"projection": "random"}), ("galore_adamw", {"projection": "random", "proj_type": "left"})]


@pytest.mark.parametrize("name,hp", PHASES)
@pytest.mark.parametrize("chunk_numel", [None, 8192])
def test_step_transient_bytes_counts_the_bucket_phases(name, hp, chunk_numel):
    """Issue 12: a bucket of ``k`` projected parameters of ``n`` projected elements each is counted
    phase by phase as the step runs it (exact against a traced step: tests/test_galoreexact_per_parameter.py's
    ``test_float32_bucket_of_same_shapes`` runs these setups). Here, on meta: the multi-tensor direction holds the
    bucket's projected gradients, directions and ``sqrt(v)`` (``12 k n`` bytes), a lower bound of every bucket's
    report; a float32 GaLore bucket folds in place, so that is its whole report; ``foreach=False`` reports the
    per-parameter step (``ref``) whatever the number of parameters. ``chunk_numel=8192``: buckets of two
    parameters (4096 elements each)."""
    def report(k, foreach):
        ps = [torch.nn.Parameter(torch.zeros(64, 256, device="meta")) for _ in range(k)]
        opt = create_optimizer(ps, name, rank=16, **hp)
        opt.chunk_numel = chunk_numel
        for g in opt.param_groups:
            g["foreach"] = foreach
        opt.materialize_state()
        return opt.step_transient_bytes(), opt

    ref = report(1, False)[0]
    one, opt = report(1, None)
    group = opt.param_groups[0]
    n = opt.recipe.projection.low_shape(torch.Size((64, 256)), group).numel()
    assert n == 4096 and opt._projected_foreach_ok(group["params"][0], group)
    k = 3 if chunk_numel is None else 2  # the largest bucket of 3 parameters
    three = report(3, None)[0]
    assert one >= 12 * n and three >= 12 * k * n
    if name == "galore_adamw":
        assert one == 12 * n and three == 12 * k * n
    assert report(3, False)[0] == ref


def test_foreach_direction_equals_direction_per_tensor():
    """``AdamMoments.foreach_direction`` against ``direction`` one tensor at a time, both eps
    placements, several steps: moments and directions bit for bit."""
    from lowmem.optim.moments import AdamMoments

    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 12), (4, 12), (20, 4), (3, 5)]
    for placement in ("torch", "hf"):
        rule = AdamMoments(placement)
        group = {"betas": (0.9, 0.99), "eps": 1e-3}
        a = [{"exp_avg": torch.zeros(s), "exp_avg_sq": torch.zeros(s)} for s in shapes]
        b = [{k: v.clone() for k, v in st.items()} for st in a]
        for t in range(1, 4):
            gs = [torch.randn(s, generator=gen) for s in shapes]
            da = rule.foreach_direction(gs, a, group, float(t), 1e-2)
            db = [rule.direction(g, st, group, float(t), 1e-2) for g, st in zip(gs, b)]
            assert all(torch.equal(x, y) for x, y in zip(da, db))
            assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
