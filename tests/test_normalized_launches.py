"""Fewer kernels for Muon / SinkGD / SCALE off the CPU (issue 15: the GPU step is launch-bound), each new
path forced on the CPU and tested equal to the path it replaces there, and its transient reported by
``step_transient_bytes()``.

* Muon's lean (chunked) step of a weight larger than the chunk (a 32000 x 1024 head): Newton-Schulz's
  column blocks as large as a row block off the CPU (``functional.muon.ns_column_block_numel``).
* SinkGD's chunked step of a weight larger than the chunk: the scalings from the row blocks in closed
  form off the CPU (``functional.sinkgd.sinkhorn_scalings(batched=True)``: 5 kernels per block and
  iteration instead of 13)."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim.functional import muon as M
from lowmem.optim.functional import sinkgd as S
from lowmem.optim.registry import create_optimizer


def _muon(monkeypatch, chunk_blocks: bool, steps: int = 3):
    """A wide 24 x 160 and a tall 150 x 20 weight stepped in row blocks (chunk 960), Newton-Schulz's
    column blocks of 384 elements (16 columns of the wide one) or, forced, of a row block's."""
    monkeypatch.setattr(M, "NS_COLUMN_BLOCK_NUMEL", 24 * 16)
    monkeypatch.setattr(M, "NS_CHUNK_BLOCKS_ON_CPU", chunk_blocks)
    calls = []
    orig = M.newton_schulz_

    def spy(x, *a, column_block_numel, **k):
        calls.append(len(M.ns_column_blocks(x.shape, column_block_numel)))
        return orig(x, *a, column_block_numel=column_block_numel, **k)

    monkeypatch.setattr("lowmem.optim.recipes.normalized.newton_schulz_", spy)
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(24, 160), (150, 20)]]
    opt = create_optimizer(ps, "muon", lr=2e-2, weight_decay=0.1)
    opt.chunk_numel = 960
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return ps, [opt.state[p]["momentum_buffer"] for p in ps], calls, opt


def test_muon_chunk_sized_column_blocks_equal_the_cpu_blocks(monkeypatch):
    """The lean step with column blocks of a row block (forced on the CPU: 4 blocks of the wide weight's
    iterate per iteration instead of 10; the tall one's 20 x 150 iterate: 3 instead of 8) equals it with
    the CPU's blocks bit for bit, weights and momentum, over 3 steps."""
    want, want_b, want_calls, _ = _muon(monkeypatch, False)
    got, got_b, got_calls, _ = _muon(monkeypatch, True)
    assert want_calls == [10, 8] * 3 and got_calls == [4, 3] * 3, (want_calls, got_calls)
    for a, b in zip(want + want_b, got + got_b):
        assert torch.equal(a, b)


def test_muon_chunk_sized_column_blocks_reported(monkeypatch):
    """step_transient_bytes() counts the wider blocks (newton_schulz_transient_bytes of the block the
    step uses) where they are the largest term: a bfloat16 model (no float32 foreach buckets) whose
    Newton-Schulz column block is its bound."""
    monkeypatch.setattr(M, "NS_COLUMN_BLOCK_NUMEL", 16)
    ps = [torch.nn.Parameter(torch.zeros(8, 4096, dtype=torch.bfloat16))]
    opt = create_optimizer(ps, "muon", nesterov=False)
    opt.chunk_numel = 8 * 1024
    opt.materialize_state()
    narrow = opt.step_transient_bytes()
    monkeypatch.setattr(M, "NS_CHUNK_BLOCKS_ON_CPU", True)
    wide = opt.step_transient_bytes()
    threads = torch.get_num_threads()
    total, block = 8 * 4096, 8 * 1024
    ns = lambda w: max(4 * 64, 2 * 64 + 2 * 8 * w) + M.bf16_gemm_workspace_bytes(8, threads)  # noqa: E731
    # (the bf16 rows' float32 gradient copy beside the momentum pass and beside the block's step, whose parameter
    # copy is made after the gradient's is freed; none in the iteration's phase: MuonMoments.chunk_counts_copies)
    assert narrow == 2 * total + max(4 * block * 2, ns(16))
    assert wide == 2 * total + max(4 * block * 2, ns(1024)), (narrow, wide)


def test_sinkgd_row_block_closed_form_equals_the_scalings():
    """sinkhorn_scalings(batched=True) against the per-row-block form at rtol 1e-5 (1, 3 and 4 row blocks;
    1, 5 and 7 iterations; columns of very different scale), a zero row and a zero column keeping
    scalings of 0; the default takes it only off the CPU (meta) and not for an FSDP2 shard."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(100, 40, generator=gen) * torch.logspace(-3, 2, 40)
    g[3] = 0
    g[:, 7] = 0
    for iters in (1, 5, 7):
        for bounds in ([(0, 100)], [(0, 30), (30, 64), (64, 100)], [(0, 25), (25, 50), (50, 75), (75, 100)]):
            want = S.sinkhorn_scalings(lambda a, b: g[a:b], bounds, 100, 40, iters, batched=False)
            got = S.sinkhorn_scalings(lambda a, b: g[a:b], bounds, 100, 40, iters, batched=True)
            for w, x in zip(want, got):
                torch.testing.assert_close(x, w, rtol=1e-5, atol=0)
            assert got[0][3] == 0 and got[1][7] == 0
    calls = []
    orig = S._squared_scalings_rows
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "_squared_scalings_rows", lambda *a: calls.append(a[-1]) or orig(*a))
        S.sinkhorn_scalings(lambda a, b: g[a:b], [(0, 100)], 100, 40, 2)
        meta = torch.empty(100, 40, device="meta")
        S.sinkhorn_scalings(lambda a, b: meta[a:b], [(0, 100)], 100, 40, 2)
        S.sinkhorn_scalings(lambda a, b: meta[a:b], [(0, 100)], 100, 40, 2, column_sq=lambda c: c, rows=100)
    assert [torch.device(d).type for d in calls] == ["meta"], calls


@pytest.mark.parametrize("hp", [{"lr": 1e-2, "scale": 0.5}, {"lr": 1e-2, "scale": 0.5, "weight_decay": 0.1, "sinkhorn_iters": 2}])
def test_sinkgd_row_block_closed_form_step_equals_the_chunked_step(hp, monkeypatch):
    """SinkGD weights larger than the chunk (48 x 40 and 40 x 48 in blocks of 7 and 6 rows, a zero
    gradient at step 2) stepped with the closed form forced on the CPU equal the chunked step at rtol
    1e-5 over 4 steps (the closed form ran: once per weight and step)."""
    from lowmem.optim.recipes import normalized

    calls = []

    def run(batched):
        def scalings(*a, **k):
            calls.append(batched)
            return S.sinkhorn_scalings(*a, **k, batched=batched)

        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(48, 40), (40, 48), (16,)]]
        opt = create_optimizer(ps, "sinkgd", **hp)
        opt.chunk_numel = 288
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(normalized, "sinkhorn_scalings", scalings)
            for step in range(4):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=gen) * (0 if step == 2 and p.dim() == 2 else 1)
                opt.step()
        return ps

    want = run(False)
    got = run(True)
    assert calls == [False] * 8 + [True] * 8, calls
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
