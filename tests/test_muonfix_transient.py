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
