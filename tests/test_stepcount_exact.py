"""Issue 12 (STEPCOUNT): ``step_transient_bytes()`` / the per-parameter transient equal what a traced step allocates,
for the rules whose counts were off (tests/test_muonfix_sweep.py's sweep found them; here each on shapes, dtypes and
chunk sizes of its own). The trace (``_RealLive``: every dispatched output on a real device, alive together at most) is
machine-independent; the fused AdamW kernel and MKL's buffers are not involved in these rules."""

from __future__ import annotations

import pytest
import torch
from test_muonfix_sweep import _RealLive

from lowmem.optim.registry import create_optimizer


def _per_param(name, shape, dtype, chunk, steps=2, **hp):
    """(reported, traced) of one parameter's step (``step_param``) after ``steps`` steps."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = create_optimizer([p], name, **hp)
    opt.chunk_numel = chunk
    for _ in range(steps):
        p.grad = torch.randn(shape).to(dtype)
        opt.step()
    g = torch.randn(shape).to(dtype)
    group = opt.param_groups[0]
    reported = opt._param_transient_bytes(p, group, opt.state[p])
    with _RealLive() as t:
        opt.step_param(p, g)
    return reported, t.peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,chunk", [((48, 24), 600), ((40,), None), ((16, 8), 64)])
def test_adalomo_counts_its_step_size_tensor(shape, chunk, dtype):
    """AdaLomo's step size (``adalomo_lr``) is always a 0-d float32 tensor alive through the step (4 B)."""
    reported, traced = _per_param("adalomo", shape, dtype, chunk)
    assert reported == traced


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block,shape,chunk", [
    ("tensor", (48, 24), 600), ("tensor", (48,), 600), ("tensor", (40, 24), None), ("row", (48, 24), 600),
    ("element", (48, 24), 600), ("element", (48,), 600), ("head", (48, 24), 192), ("row", (16, 8), None),
])
def test_adam_mini_chunked_step_is_counted_phase_by_phase(block, shape, chunk, dtype, state_dtype):
    """Adam-mini's chunked step: a whole-tensor block's sum of squares (two 0-d sums beside a chunk's ``g^2`` and
    gradient copy), the blocks' factors, the update beside the parameter chunk's copy (the gradient's freed)."""
    hp = {"block": block, "state_dtype": state_dtype}
    if block == "head":
        hp["head_dim"] = 8
    reported, traced = _per_param("adam_mini", shape, dtype, chunk, **hp)
    assert reported == traced


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["adamw4bit", "adamw4bit_rank1"])
@pytest.mark.parametrize("shape,chunk", [((64, 24), 600), ((48, 24), 600), ((40, 24), 200), ((64, 24), None)])
def test_four_bit_chunked_step_writes_its_absmax_in_place(name, shape, chunk, dtype):
    """The 4-bit encode writes a chunk's block maxima into the state (``torch.amax(..., out=)``): nothing new. (The
    sweep's trace took an ``out=`` keyword for a new tensor of its whole storage, 72-96 B: FOUND_MUONFIX 3 was that.)"""
    reported, traced = _per_param(name, shape, dtype, chunk, min_quant_size=64, block_size=64)
    assert reported == traced


def _badam_step(opt, params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype) if p.requires_grad else None
    with _RealLive() as t:
        opt.step()
    return t.peak


@pytest.mark.parametrize("freeze", [False, True], ids=["all-grads", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_badam_counts_every_checked_gradient_and_a_new_block(dtype, freeze):
    """BAdam's step: the non-finite check reads every gradient the step gets (``freeze_inactive=False``: the
    inactive blocks' too), and right after a switch (the new block has no state until it steps) the report is the
    new block's step, counted from the state its first step makes (no 'call materialize_state() first')."""
    from test_muonfix_sweep import _Tiny

    torch.manual_seed(0)
    model = _Tiny().to(dtype)
    opt = create_optimizer(model, "badam", switch_every=3, freeze_inactive=freeze, switch_mode="ascending", foreach=None)
    opt.chunk_numel = 600
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for period in range(3):
        block = opt.active_block
        assert not any(opt.state.get(p) for g in opt._active_groups() for p in g["params"])  # (a new block)
        first = opt.step_transient_bytes()  # (before the block's state exists: its first step's)
        assert not any(opt.state.get(p) for g in opt._active_groups() for p in g["params"])  # (none left made)
        traced_first = _badam_step(opt, params, gen)
        traced_first -= opt.state_bytes()  # (its first step makes the block's state: kept, not a transient)
        reported = opt.step_transient_bytes()
        traced = max(_badam_step(opt, params, gen), _badam_step(opt, params, gen))
        assert opt.active_block != block  # (switched after 3 steps)
        steps = opt._fused_step_bytes()  # (torch's fused AdamW kernel's 0-d step count: kept, and a new one at most)
        assert first == reported, (period, block)  # (the block's first step is counted as its later ones)
        assert traced_first <= first - steps, (period, block, first, traced_first)  # (its check is before the state)
        assert reported - 2 * steps <= traced <= reported - steps, (period, block, reported, traced)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,hp", [("adamw_sn", {}), ("adamw_sn", {"subset_size": 8}), ("adamw_sn", {"betas": (0.0, 0.99)}),
                                     ("adagrad_sn", {}), ("adagrad_sn", {"momentum": 0.0})],
                         ids=["adamw", "flat8", "beta1-0", "adagrad", "adagrad-m0"])
@pytest.mark.parametrize("shape,chunk", [((48, 24), 600), ((24, 48), 576), ((48, 24), 96), ((40,), 16), ((48, 24), None),
                                         ((24, 48), None), ((40,), None)],
                         ids=["rows", "columns", "small", "vector", "whole", "whole-columns", "whole-vector"])
def test_subset_norm_chunked_step_is_counted_phase_by_phase(name, hp, shape, chunk, dtype):
    """Subset-Norm's chunked step: ``g^2`` and its subset sums beside the gradient chunk's copy (rows / flat
    subsets), the column sums over every chunk then the kept denominators (columns), ``g^2`` then the denominator
    beside the direction (per element); the direction beside the parameter chunk's copy (the gradient's freed).
    Stepped whole (``chunk_numel=None``): the same without the column pass (``whole_transient_bytes``)."""
    reported, traced = _per_param(name, shape, dtype, chunk, lr=1e-2, **hp)
    assert reported == traced


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,hp", [
    ("spam", {"reset_interval": 8, "warmup_steps": 3, "grad_accu_steps": 2, "threshold": 50.0}),
    ("stable_spam", {"reset_interval": 8, "t_max": 40}),
])
@pytest.mark.parametrize("shape,chunk", [((64, 24), 600), ((48, 24), 200), ((40,), 16)])
def test_stabilized_chunks_are_counted_phase_by_phase(name, hp, shape, chunk, dtype):
    """A stabilized chunk (SPAM's spike clipping: 13 B per element; Stable-SPAM's AdaClip: 5, and its 0-d statistics)
    beside the gradient chunk's copy, then the rule's direction beside the stabilized chunk: the larger, not the sum."""
    reported, traced = _per_param(name, shape, dtype, chunk, steps=3, lr=1e-3, **hp)
    assert reported == traced


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,rank", [((48, 24), 4), ((24, 48), 8)])
def test_online_pca_reports_no_refresh_after_its_first_svd(shape, rank, dtype):
    """Online Subspace Descent's basis is an SVD at the first step only (then learned online: refresh_due): once it
    is made the per-parameter report is the traced plain step, not the SVD's bound (20,736 B for 48 x 24 before)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = create_optimizer([p], "osd_adamw", rank=rank, proj_lr=0.01)
    opt.chunk_numel = 600
    group = opt.param_groups[0]
    opt.materialize_state()
    fresh = opt._param_transient_bytes(p, group, opt.state[p])  # (its first step: the SVD)
    traced = []
    for _ in range(4):
        g = torch.randn(shape).to(dtype)
        with _RealLive() as t:
            opt.step_param(p, g)
        traced.append(t.peak)
    reported = opt._param_transient_bytes(p, group, opt.state[p])
    assert reported == max(traced[1:]) < fresh


@pytest.mark.parametrize("first", [torch.bfloat16, torch.float32], ids=["bf16-first", "fp32-first"])
def test_a_projected_bucket_that_cannot_fold_counts_each_combine_back_alone(first, monkeypatch):
    """A projected bucket with a bfloat16 member is not folded (``_fold_low_bucket``): every member, its float32 ones
    too, is combined back alone, and counted so (``back_alone``), not as its share of a fold."""
    import lowmem.optim.functional.adam as FA

    monkeypatch.setattr(FA, "FUSED_ON_CPU", True)
    FA.clear_step_tensors()
    torch.manual_seed(0)
    other = torch.float32 if first is torch.bfloat16 else torch.bfloat16
    ps = [torch.nn.Parameter(torch.randn(48, 24).to(first)), torch.nn.Parameter(torch.randn(24, 48).to(other))]
    opt = create_optimizer(ps, "osd_adamw", rank=4, proj_lr=0.01)
    opt.chunk_numel = 600
    gen = torch.Generator().manual_seed(1)
    traced = 0
    for step in range(4):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        with _RealLive() as t:
            opt.step()
        traced = max(traced, t.peak) if step else 0  # (the first step's SVD: not again)
    reported = opt.step_transient_bytes() - opt._kept_gemm_bytes()
    steps = opt._fused_step_bytes()
    assert reported - 2 * steps <= traced <= reported - steps, (reported, traced)


class _NoGroup:
    """A shard's ``ShardReduce`` stand-in in one process: its rows of the whole matrix, the sums over one shard."""

    def __init__(self, rows, shape):
        self.rows, self.shape = rows, shape

    @staticmethod
    def sum_(t):
        return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,first,whole,shards", [((6, 2), 6, (16, 2), 3), ((6, 8), 0, (16, 8), 3), ((10, 8), 10, (20, 8), 2)])
def test_adam_mini_straddling_heads_shard_is_bounded(shape, first, whole, shards, dtype):
    """FSDP2, heads cut by the shards (``_prepare_straddling_heads``: the rows' sums, every head's mean, v's update):
    ``sharded_transient_bytes`` (and the engine's gradient copy) is never under that pass, traced in one process."""
    from lowmem.optim.recipes.adam_mini import AdamMiniMoments

    rule, group = AdamMiniMoments(), {"block": "head", "head_dim": 4, "betas": (0.9, 0.999)}
    state = {"exp_avg": torch.zeros(shape), "exp_avg_sq": torch.zeros(shape[0])}
    g = torch.randn(shape).to(dtype)
    bounds = [(0, shape[0] * shape[1] // 2), (shape[0] * shape[1] // 2, shape[0] * shape[1])]
    with _RealLive() as t:
        rule._prepare_straddling_heads(state, torch.Size(shape), group, bounds,
                                       lambda a, b, view: g.view(-1)[a:b].float(), _NoGroup((first, first + shape[0]), whole))
    copy = 4 * g.numel() * (dtype is not torch.float32)
    reported = rule.sharded_transient_bytes(torch.Size(shape), torch.Size(whole), shards, group, state)
    assert 0 < t.peak <= reported + copy, (t.peak, reported, copy)
