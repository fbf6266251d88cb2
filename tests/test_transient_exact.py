"""Issue 12: step_transient_bytes() is the exact count, not a bound, for the normalized hybrids' paths and the
quantized moments of projected buckets (every dispatched output traced: tests/test_nonfinite_check_bytes._AllLive).

SinkGD with ``chunk_numel=None``: its whole-tensor step (sr_sinkhorn) and its multi-tensor buckets (sinkgd_foreach_)
were reported as a bound (the chunked form of one block of every row, and 7 bytes per element)."""

from __future__ import annotations

import functools

import pytest
import torch
from test_nonfinite_check_bytes import _AllLive

import lowmem.optim.functional.sinkgd as S
from lowmem.optim.registry import create_optimizer

SINKGD_CASES = [((256, 512), 5), ((512, 256), 1), ((300, 200), 2), ((64, 4096), 3), ((8, 300), 5), ((40, 24), 1)]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("shape,iters", [((16, 16), 0), ((32, 64), 1), ((64, 32), 2), ((17, 200), 5), ((300, 20), 5)])
@pytest.mark.parametrize("batched", [False, True], ids=["cpu", "closed_form"])
def test_sinkgd_foreach_bytes_is_what_sinkgd_foreach_allocates(k, shape, iters, batched):
    """functional.sinkgd.sinkgd_foreach_bytes == the traced peak of sinkgd_foreach_ (a zero row included)."""
    m, n = shape
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(m, n, generator=gen) for _ in range(k)]
    gs = [torch.randn(m, n, generator=gen) for _ in range(k)]
    gs[0][1] = 0
    with _AllLive() as t:
        S.sinkgd_foreach_(ps, gs, iters, 1e-3, 0.1, 5e-5, batched=batched)
    assert t.peak == S.sinkgd_foreach_bytes(k, m, n, iters, batched)


@pytest.mark.parametrize("shape,iters", SINKGD_CASES)
@pytest.mark.parametrize("foreach", [False, True], ids=["per_parameter", "buckets"])
def test_sinkgd_unchunked_step_allocates_what_it_reports(shape, iters, foreach):
    """chunk_numel=None: two SinkGD weights stepped whole (sr_sinkhorn) or stacked in one bucket (sinkgd_foreach_),
    traced == step_transient_bytes() (and the per-parameter step == step_transient_bytes(per_parameter=True)).
    Before: the whole step reported as one block of every row of the chunked form (256 x 512, 5 iterations:
    534,788 for 529,408), the bucket as 7 bytes per element (1,835,008 for 1,070,084)."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(shape)) for _ in range(2)]
    opt = create_optimizer(ps, "sinkgd", foreach=foreach, sinkhorn_iters=iters)
    opt.chunk_numel = None
    gs = [torch.randn(shape) for _ in ps]
    for p, g in zip(ps, gs):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(ps, gs):
        p.grad = g.clone()
    with _AllLive() as t:
        opt.step()
    assert t.peak == opt.step_transient_bytes()
    for p in ps:
        p.grad = None
    g0 = gs[0].clone()
    with _AllLive() as t1:
        opt.step_param(ps[0], g0)
    assert t1.peak == opt.step_transient_bytes(per_parameter=True) == S.sr_sinkhorn_bytes(*shape, iters)


@pytest.mark.parametrize("shape,iters", [((256, 512), 5), ((512, 256), 2), ((300, 200), 1)])
def test_sinkgd_closed_form_bucket_allocates_what_meta_reports(monkeypatch, shape, iters):
    """The buckets' closed form (off the CPU; forced here on the CPU) against the report for meta parameters
    (which count as off the CPU), chunk_numel=None."""
    import lowmem.optim.recipes.normalized as N

    monkeypatch.setattr(N, "sinkgd_foreach_", functools.partial(S.sinkgd_foreach_, batched=True))
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(shape)) for _ in range(3)]
    opt = create_optimizer(ps, "sinkgd", sinkhorn_iters=iters)
    opt.chunk_numel, opt.skip_nonfinite = None, False  # (the check's bytes depend on the device)
    for p in ps:
        p.grad = torch.randn(shape)
    opt.step()
    with _AllLive() as t:
        opt.step()
    meta = [torch.nn.Parameter(torch.empty(shape, device="meta")) for _ in range(3)]
    rep = create_optimizer(meta, "sinkgd", sinkhorn_iters=iters)
    rep.chunk_numel, rep.skip_nonfinite = None, False
    rep.materialize_state()
    assert t.peak == rep.step_transient_bytes() == S.sinkgd_foreach_bytes(3, *shape, iters, True)


# ---- SCALE on tensors of more than 2 dimensions: in chunks, exactly reported -----------------------------------


def _scale_run(shape, role, chunk, state_dtype="float32", steps=3):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = create_optimizer([p], "scale", scale_role=role, weight_decay=0.1, lr=1e-2, state_dtype=state_dtype,
                           foreach=False)
    opt.chunk_numel = chunk
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps - 1):
        opt.step_param(p, torch.randn(shape, generator=gen))
    g = torch.randn(shape, generator=gen)
    with _AllLive() as t:
        opt.step_param(p, g)
    return p.detach().clone(), t.peak, opt.step_transient_bytes(per_parameter=True)


@pytest.mark.parametrize("shape", [(4, 6, 10), (3, 5, 4, 4)], ids=["moe", "conv"])
@pytest.mark.parametrize("role", ["hidden", "head", "embedding"])
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_scale_nd_steps_in_chunks_equal_to_the_whole_step(shape, role, state_dtype):
    """A 3-D (MoE experts) or 4-D (conv) SCALE target is stepped in chunks of any size (a row of its [rows, cols] view
    may span chunks: its RMS from a first pass, functional.scale.add_squares_ / normalize_flat), equal to the whole
    step (column_normalize; chunk_numel=None) up to float32 rounding, and every step's traced peak is its report
    (flat_chunks_bytes / target_whole_transient_bytes). Before: stepped whole at any chunk_numel."""
    whole, peak, reported = _scale_run(shape, role, None, state_dtype)
    assert peak == reported
    for chunk in (7, 16, 60, 61, 1000):  # inside a row, a row's divisor, whole rows, across rows, all of it
        got, peak, reported = _scale_run(shape, role, chunk, state_dtype)
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
        assert peak == reported, (chunk, peak, reported)


def test_scale_moe_weight_transient_is_the_chunk():
    """A [8, 1024, 2048] expert weight in chunks of 2^19 (256 rows of one expert: SCALE steps fused experts per
    matrix): the report is the chunk's step and its rows' RMS (4 x 2^19 + 4 x 256), not the tensor's 64 MiB."""
    p = torch.nn.Parameter(torch.empty(8, 1024, 2048, device="meta"))
    opt = create_optimizer([p], "scale")
    opt.chunk_numel = 2**19
    opt.materialize_state()
    assert opt.step_transient_bytes(per_parameter=True) == 4 * 2**19 + 4 * 256


@pytest.mark.parametrize("role", ["hidden", "head"])
@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
def test_scale_bucket_allocates_what_it_reports(role, shape):
    """SCALE's row-normalised matrices stacked in a bucket (scale_rows_foreach_): the stack and its rows' RMS,
    4 N + 4 k out, traced == step_transient_bytes() (was the bound 4.25 N for any bucket)."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(shape)) for _ in range(3)]
    opt = create_optimizer(ps, "scale", scale_role=role)
    opt.chunk_numel, opt.skip_nonfinite = None, False
    for p in ps:
        p.grad = torch.randn(shape)
    opt.step()
    with _AllLive() as t:
        opt.step()
    n = 3 * shape[0] * shape[1]
    assert t.peak == opt.step_transient_bytes() == 4 * n + 4 * 3 * shape[0]


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", [60, 200, None])
def test_adamw_bfloat16_per_parameter_step_allocates_what_it_reports(chunk, state_dtype, monkeypatch):
    """A bfloat16 weight stepped alone (layerwise mode's step), AdamW's element-wise path: traced == reported.
    The gradient chunk's float32 copy is freed when the direction returns, before the parameter chunk's is made
    (AdamMoments.chunk_direction_is_new): 24 x 40 at chunk 200 was reported 2,408 for 1,600 traced (float32
    moments), found by the layerwise estimate's check against measured runs (issue 12)."""
    from lowmem.optim.functional import adam as FA

    monkeypatch.setattr(FA, "FUSED_ON_CPU", False)
    torch.manual_seed(0)
    shape = (24, 40)
    p = torch.nn.Parameter(torch.randn(shape).to(torch.bfloat16))
    opt = create_optimizer([p], "adamw", weight_decay=0.1, lr=1e-2, state_dtype=state_dtype, foreach=False)
    opt.chunk_numel = chunk
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        opt.step_param(p, torch.randn(shape, generator=gen).to(torch.bfloat16))
    g = torch.randn(shape, generator=gen).to(torch.bfloat16)
    with _AllLive() as t:
        opt.step_param(p, g)
    assert t.peak == opt.step_transient_bytes(per_parameter=True) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_fused_per_parameter_step_allocates_what_it_reports(dtype):
    """Stepped alone (layerwise mode's step) with moments of the parameter's dtype, AdamW takes torch's fused
    kernel (AdamMoments.fused_step_), which allocates nothing: the report is the traced step (the non-finite
    check's few bytes, within 8), not the element-wise path's direction (a (2000, 128) float32 weight reported 1,024,000 B
    for 0 measured in a layerwise run, issue 12)."""
    torch.manual_seed(0)
    shape = (200, 128)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = create_optimizer([p], "adamw", weight_decay=0.1, lr=1e-2, state_dtype="param")
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        opt.step_param(p, torch.randn(shape, generator=gen).to(dtype))
    g = torch.randn(shape, generator=gen).to(dtype)
    with _AllLive() as t:
        opt.step_param(p, g)
    # (the report's 8 B are the step's scalars of the non-finite check, 4 B traced)
    assert t.peak <= opt.step_transient_bytes(per_parameter=True) <= t.peak + 8
