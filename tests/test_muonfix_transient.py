"""Issue 12 (MUONFIX): ``step_transient_bytes()`` equals what a traced step allocates for Muon's chunked targets.

Muon counts the float32 copies of a low-precision parameter's chunks itself (``MuonMoments.chunk_counts_copies``):
the lean step's Newton-Schulz phase holds no gradient chunk (the engine's copy was added to it: a bfloat16 8 x 4096
weight in rows, 16,384 B over), a batch of matrices computes each matrix's iterate inside the block's direction,
beside the block's gradient copy (``chunk_direction_is_new`` alone: 11,840 reported for 14,400 traced), and a
weight of one chunk takes the lean step (it was reported at the whole step's count: float32 64 x 96, 65,536 for
36,864). Every dispatched output is traced (tests/test_nonfinite_check_bytes._AllLive), the third step, with Muon's
bf16 GEMM workspace left out (functional.muon.bf16_workspace_left_out: not a torch tensor)."""

from __future__ import annotations

import pytest
import torch
from test_nonfinite_check_bytes import _AllLive

from lowmem.optim import create_optimizer
from lowmem.optim.functional.muon import bf16_workspace_left_out


def _traced(shape, dtype, chunk, nesterov, state_dtype="float32", foreach=False):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))]
    opt = create_optimizer(ps, "muon", nesterov=nesterov, state_dtype=state_dtype, foreach=foreach)
    opt.chunk_numel = chunk
    with bf16_workspace_left_out():
        for step in range(3):
            ps[0].grad = torch.randn(shape, generator=gen).to(dtype)
            if step < 2:
                opt.step()
        with _AllLive() as t:
            opt.step()
        return opt.step_transient_bytes(), t.peak


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape, chunk", [((8, 4096), 1024), ((96, 64), 1024), ((64, 96), 8192), ((3, 16, 40), 1024),
                                          ((3, 16, 40), 400), ((2, 30, 7), 70)],
                         ids=["rows", "tall", "one-chunk", "batch-spanning", "batch-within", "batch-odd"])
def test_chunked_muon_step_allocates_what_it_reports(shape, chunk, dtype, nesterov, state_dtype):
    reported, traced = _traced(shape, dtype, chunk, nesterov, state_dtype)
    assert traced > 0
    assert reported == traced, (reported, traced)


def _traced_hybrid(name, shape, dtype, chunk, foreach):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))]
    key, value, hp = {"sinkgd": ("use_sinkgd", True, dict(lr=0.01, scale=0.5, sinkhorn_iters=3)),
                      "scale": ("scale_role", "hidden", dict(lr=0.01))}[name]
    opt = create_optimizer([{"params": ps, key: value}], name, foreach=foreach, **hp)
    opt.chunk_numel = chunk
    for step in range(3):
        ps[0].grad = torch.randn(shape, generator=gen).to(dtype)
        if step < 2:
            opt.step()
    with _AllLive() as t:
        opt.step()
    return opt.step_transient_bytes(), t.peak


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-parameter"])
@pytest.mark.parametrize("chunk", [600, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(48, 24), (24, 48), (64, 24), (3, 16, 40)], ids=str)
@pytest.mark.parametrize("name", ["sinkgd", "scale"])
def test_chunked_sinkgd_and_scale_steps_allocate_what_they_report(name, shape, dtype, chunk, foreach):
    """SinkGD counts its chunks' copies itself too (``chunk_counts_copies``): a bfloat16 block's float32 copy is alive
    in the scalings' passes only until its squares are made, and the previous block's norms are freed before the
    next block's copy (``sinkhorn_scalings``). Before: a bfloat16 48 x 24 weight in blocks of 25 rows, 5,609 B reported
    for 5,280 traced; after ``chunk_counts_copies`` alone, a 24 x 48 one 5,280 for 5,328 (under: the norms)."""
    reported, traced = _traced_hybrid(name, shape, dtype, chunk, foreach)
    assert traced > 0
    assert reported == traced, (reported, traced)
