"""The step's transient memory: the chunked step equals the whole-tensor step, its transient stays
bounded on a large tensor (peak RSS in a fresh process), and step_transient_bytes() reports it."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from lowmem.optim.registry import create_optimizer

MiB = 2**20

# family -> hyperparameters that make a small tensor exercise every code path (quantized, clipped, reset)
CHUNKED = {
    "adamw": {"foreach": False},
    "adamw8bit": {"min_quant_size": 1, "block_size": 64},
    "adamw4bit": {"min_quant_size": 1, "block_size": 64},
    "adamw4bit_rank1": {"min_quant_size": 1, "block_size": 64},
    "microadam": {"m": 3, "k_init": 0.1, "topk_block_size": 64, "quant_block_size": 32},
    "spam": {"threshold": 2.0, "grad_accu_steps": 0, "reset_interval": 3, "warmup_steps": 2, "weight_decay": 0.1},
    "stable_spam": {"reset_interval": 3, "weight_decay": 0.1},
    "adafactor": {},
    "adafactor_beta1": {"beta1": 0.9, "weight_decay": 0.1, "lr": 1e-2, "relative_step": False},
    "adam_mini": {"block": "row", "weight_decay": 0.1},  # chunks of whole rows (other blocks: tests/test_adam_mini.py)
}


def _run(name: str, hparams: dict, chunk_numel: int | None, dtype=torch.float32, shape=(37, 29), steps: int = 5):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = create_optimizer([p], name, **hparams)
    opt.chunk_numel = chunk_numel
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        g = torch.randn(shape, generator=gen)
        if i % 2:
            g[0, :3] *= 100.0  # spikes, so clipping paths run
        p.grad = g.to(dtype)
        opt.step()
    return p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}


@pytest.mark.parametrize("name", sorted(CHUNKED) + ["adamw_foreach"])
def test_chunked_step_equals_whole_tensor_step(name):
    """37 x 29 = 1073 elements (odd: a half-filled last 4-bit byte) in chunks of ~128: several chunks
    and a last partial one (a partial quantization / top-k block, a partial row chunk for rank-1)."""
    hp = CHUNKED.get(name, {})
    name = name.replace("_foreach", "").replace("_beta1", "")
    whole_p, whole_s = _run(name, hp, None)
    chunk_p, chunk_s = _run(name, hp, 128)
    assert set(whole_s) == set(chunk_s)
    if name in ("stable_spam", "adafactor"):  # norms / column means summed over chunks: rounding differs
        torch.testing.assert_close(chunk_p, whole_p, rtol=1e-6, atol=1e-7)
        for k in whole_s:
            torch.testing.assert_close(chunk_s[k], whole_s[k], rtol=1e-5, atol=1e-8)
        return
    assert torch.equal(chunk_p, whole_p)
    for k in whole_s:
        assert torch.equal(chunk_s[k], whole_s[k]), k


# subspace recipes: the combine-back scale * P.up(d_low) + residual in blocks of rows, refreshes included
PROJECTED = {
    "galore_adamw": {"rank": 4, "update_proj_gap": 2, "scale": 0.5},
    "galore_adamw_left": {"rank": 4, "update_proj_gap": 2, "proj_type": "left"},
    "galore_adamw_full": {"rank": 4, "update_proj_gap": 2, "proj_type": "full"},
    "galore_adamw_rsvd": {"rank": 4, "update_proj_gap": 2, "projection": "rsvd"},
    "fira_adamw": {"rank": 4, "update_proj_gap": 2},
    "fira_adamw_left": {"rank": 4, "update_proj_gap": 2, "proj_type": "left"},
    "frugal": {"rank": 4, "update_proj_gap": 2},
    "frugal_columns": {"rank": 4, "update_proj_gap": 2, "projection": "columns"},
    "frugal_rows": {"rank": 4, "update_proj_gap": 2, "projection": "rows"},
    "frugal_randk": {"rank": 4, "update_proj_gap": 2, "projection": "randk"},
    "osd_adamw": {"rank": 4, "proj_lr": 1e-2},
}


@pytest.mark.parametrize("label", sorted(PROJECTED))
def test_chunked_combine_back_equals_whole_tensor(label):
    name = label.replace("_left", "").replace("_full", "").replace("_rsvd", "").replace("_columns", "")
    name = name.replace("_rows", "").replace("_randk", "")
    whole_p, whole_s = _run(name, PROJECTED[label], None, steps=5)
    chunk_p, chunk_s = _run(name, PROJECTED[label], 128, steps=5)  # 4 rows of 29 per block: 10 blocks
    torch.testing.assert_close(chunk_p, whole_p, rtol=1e-5, atol=1e-6)
    for k in whole_s:
        torch.testing.assert_close(chunk_s[k], whole_s[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("label", ["galore_adamw", "galore_adamw_left", "galore_adamw_full", "fira_adamw",
                                   "fira_adamw_left", "frugal", "frugal_columns", "frugal_randk", "osd_adamw"])
def test_projected_bf16_blocks_equal_whole_tensor(label):
    """bf16 parameters and gradients: projected down and combined back a block of rows at a time,
    without a float32 copy of the whole gradient, as the whole-tensor step does."""
    name = label.replace("_left", "").replace("_full", "").replace("_columns", "").replace("_randk", "")
    whole_p, whole_s = _run(name, PROJECTED[label], None, dtype=torch.bfloat16, steps=5)
    chunk_p, chunk_s = _run(name, PROJECTED[label], 128, dtype=torch.bfloat16, steps=5)
    torch.testing.assert_close(chunk_p.float(), whole_p.float(), rtol=1e-2, atol=1e-2)
    assert (chunk_p != whole_p).float().mean() < 0.02  # bf16 rounding of a float32 difference, rarely
    for k in whole_s:
        torch.testing.assert_close(chunk_s[k].float(), whole_s[k].float(), rtol=1e-3, atol=1e-5)


def test_chunked_step_bf16_parameters():
    whole_p, whole_s = _run("adamw8bit", CHUNKED["adamw8bit"], None, dtype=torch.bfloat16)
    chunk_p, chunk_s = _run("adamw8bit", CHUNKED["adamw8bit"], 128, dtype=torch.bfloat16)
    assert torch.equal(chunk_p, whole_p)
    for k in whole_s:
        assert torch.equal(chunk_s[k], whole_s[k]), k


def test_chunked_step_actually_chunks(monkeypatch):
    """The chunked path visits the tensor in several pieces of whole blocks (so the equality above
    is not trivially one chunk)."""
    p = torch.nn.Parameter(torch.randn(37, 29))
    opt = create_optimizer([p], "adamw4bit", **CHUNKED["adamw4bit"])
    opt.chunk_numel = 128
    opt.materialize_state()
    bounds = opt._chunk_bounds(p, opt.param_groups[0], opt.state[p])
    assert len(bounds) == 9 and all((a % 64, b - a) == (0, 128) for a, b in bounds[:-1]) and bounds[-1] == (1024, 1073)


def test_chunk_numel_validated():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = create_optimizer([p], "adamw")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunk_numel"):
            opt.chunk_numel = bad


# ---- step_transient_bytes() ------------------------------------------------------------------

ELEMENTWISE = ("adamw", "adamw8bit", "adamw4bit", "adamw4bit_rank1", "microadam", "spam", "stable_spam", "adam_mini")


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_step_transient_bytes_on_meta_is_bounded_by_the_chunk(name):
    """On the meta device (a model never built): the transient of a chunked family depends on the
    chunk, not on the tensor, and the whole-tensor path (chunk_numel=None) scales with the tensor. At the
    CPU's chunk (set) within 32 MiB; at the meta device's default (the GPU's chunk, 32 x larger) within 1 GiB.
    Rank-1 scales (adamw4bit_rank1): the chunked step keeps the whole matrix's new column maxima through its
    chunks (Quantized.prepare_chunks, 4 B per column, Quantized.chunk_transient_bytes), so a wider matrix adds up
    to 4 B per column (exactly that at the CPU's codec forms; on meta, the device's, the second moment's encode is
    the peak, beside its chunk's row maxima: 4 B per row, fewer rows in a chunk of a wider matrix)."""
    from lowmem.optim.engine import DEFAULT_CHUNK_NUMEL, DEVICE_CHUNK_NUMEL

    for chunk, shapes, bound in ((DEFAULT_CHUNK_NUMEL, ((4096, 4096), (8192, 8192)), 32 * MiB),
                                 (None, ((8192, 8192), (16384, 8192)), 32 * MiB * DEVICE_CHUNK_NUMEL // DEFAULT_CHUNK_NUMEL)):
        sizes = {}
        for shape in shapes:
            p = torch.nn.Parameter(torch.empty(shape, device="meta"))
            opt = create_optimizer([p], name)
            if chunk is not None:
                opt.chunk_numel = chunk
            opt.materialize_state()
            sizes[shape] = opt.step_transient_bytes()
            opt.chunk_numel = None
            whole = opt.step_transient_bytes()
            assert whole >= 4 * p.numel()  # at least one full-size float32 temporary unchunked
        cols = 4 * (shapes[1][-1] - shapes[0][-1]) if name == "adamw4bit_rank1" else 0
        assert sizes[shapes[0]] <= sizes[shapes[1]] <= min(sizes[shapes[0]] + cols, bound), (chunk, sizes)
        assert sizes[shapes[1]] > 0


def test_step_transient_bytes_meta_equals_cpu_and_counts_buckets(monkeypatch):
    # AdamW's multi-tensor operations on the CPU, as on meta (torch's fused kernel, the CPU's default,
    # allocates nothing: test_fused_adamw.py, test_first_foreach_step_in_a_fresh_process_is_the_report)
    from lowmem.optim.functional import adam as FA

    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(FA, "FUSED_ON_CPU", False)
    shapes = [(300, 200), (1000,), (64, 64)]
    for name in ("adamw", "adamw4bit", "galore_adamw", "fira_adamw", "adafactor"):
        hp = {"rank": 8} if name in ("galore_adamw", "fira_adamw") else {}
        values = []
        for device in ("meta", "cpu", "fake cpu"):  # the estimator's: fake tensors of the run's device
            with FakeTensorMode() if device == "fake cpu" else contextlib.nullcontext():
                ps = [torch.nn.Parameter(torch.zeros(s, device="meta" if device == "meta" else "cpu")) for s in shapes]
                opt = create_optimizer(ps, name, **hp)
                opt.materialize_state()
                values.append(opt.step_transient_bytes())
        assert values[2] == values[1] > 0, name
        # meta is the device code path: on the CPU (MKL) a basis's GEMM packing buffers, once (the combine-back's of
        # the widest weight); 4-bit buckets' codecs take their CPU forms (Quantized._four_bit_bucket_bytes; the
        # device's joint forms, _four_bit_joint_bytes, allocate less here: 1,493,664 vs 1,793,664 B)
        kept = _kept(8, 200) if name in ("galore_adamw", "fira_adamw") else 0
        if name == "adamw4bit":
            assert 0 < values[0] < values[1], name
        else:
            assert values[0] + kept == values[1], name
    # foreach AdamW: one bucket of every small tensor (sqrt(v) of the bucket), capped by chunk_numel
    ps = [torch.nn.Parameter(torch.zeros(1000, device="meta")) for _ in range(10)]
    opt = create_optimizer(ps, "adamw")
    opt.materialize_state()
    assert opt.step_transient_bytes() == 4 * 10_000
    opt.chunk_numel = 3000
    assert opt.step_transient_bytes() == 4 * 3000


def _kept(rank: int, cols: int) -> int:
    """MKL's packing buffers a CPU projected step keeps (SubspaceProjection.kept_gemm_bytes)."""
    from lowmem.optim.functional.galore import kept_pack_bytes  # (as MKL keeps them on the running CPU)

    return kept_pack_bytes(rank, cols) * torch.backends.mkl.is_available()


def test_gemm_packing_buffer_counted_once_on_mkl_cpu_only(monkeypatch):
    """MKL's GEMM packing buffers (issue 12) are added once for the whole step, the largest over
    projected basis parameters (not per parameter, not per phase), only where MKL keeps them (a CPU
    tensor on a build with MKL); a rsvd refresh, whose report already holds them, is not raised by them;
    coordinate projections combine back by indexing (none)."""
    if not torch.backends.mkl.is_available():
        pytest.skip("needs a build with MKL")
    shapes = [(300, 200), (64, 500), (64, 64), (1000,)]

    def report(device, **hp):
        ps = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
        opt = create_optimizer(ps, "galore_adamw", **hp)
        opt.materialize_state()
        return opt.step_transient_bytes(), opt.step_transient_bytes(per_parameter=True)

    for hp in ({"rank": 8, "projection": "gaussian"}, {"rank": 8, "projection": "random"}):
        meta, cpu = report("meta", **hp), report("cpu", **hp)
        # the widest (500 columns), once; and on the CPU torch's fused AdamW kernel's step count for the full-rank
        # (1000,): 4 bytes kept from the last step, 4 new (meta: the device is not known, no kernel)
        assert [c - m for m, c in zip(meta, cpu)] == [_kept(8, 500) + 8] * 2, hp
    # rsvd: its refresh (the largest phase here) already counts the combine-back's buffer: not twice
    from lowmem.optim.subspace import SubspaceProjection

    for proj_type in ("std", "left", "right"):  # (300 x 200: a left basis; forced right: its G^T's buffer)
        hp = {"rank": 8, "projection": "rsvd", "proj_type": proj_type}
        ps = {d: torch.nn.Parameter(torch.zeros(300, 200, device=d)) for d in ("meta", "cpu")}
        reports = {}
        for d, p in ps.items():
            opt = create_optimizer([p], "galore_adamw", **hp)
            opt.materialize_state()
            reports[d] = opt.step_transient_bytes()
        group = opt.param_groups[0]
        assert reports["meta"] >= SubspaceProjection().transient_bytes(p.shape, group, opt.state[p], refresh=True)
        assert reports["cpu"] == reports["meta"], proj_type
    # coordinates (FRUGAL's columns): no packing buffer
    for name in ("frugal",):
        vals = []
        for d in ("meta", "cpu"):
            opt = create_optimizer([torch.nn.Parameter(torch.zeros(300, 200, device=d))], name, rank=8, projection="columns")
            opt.materialize_state()
            vals.append(opt.step_transient_bytes())
        assert vals[0] == vals[1], name
    # no MKL (or not the CPU): nothing
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    # (but the fused AdamW kernel's step count of the full-rank parameter, 4 + 4 bytes on the CPU)
    assert report("cpu", rank=8, projection="gaussian") == tuple(m + 8 for m in report("meta", rank=8, projection="gaussian"))


needs_proc_early = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")


def test_step_transient_bytes_needs_state_on_a_real_device():
    p = torch.nn.Parameter(torch.zeros(8, 8))
    opt = create_optimizer([p], "adamw")
    with pytest.raises(RuntimeError, match="materialize_state"):
        opt.step_transient_bytes()


def test_layerwise_step_transient_bytes():
    """The inner per-parameter step next to the hook's squared norm and running sum (8 bytes); clipping adds
    the coefficient (4) and no copy in the hooks (they scale the gradient in place), a copy from DDP's
    communication hook (the largest gradient, 128 x 64 float32)."""
    from lowmem.optim.layerwise import LayerwiseOptimizer

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 32))
    lw = LayerwiseOptimizer(model, "adamw8bit")
    lw.inner.materialize_state()
    base = lw.step_transient_bytes()
    assert base == lw.inner.step_transient_bytes(per_parameter=True) + 8 > 8
    clipped = LayerwiseOptimizer(model, "adamw8bit", max_grad_norm=1.0)
    clipped.inner.materialize_state()
    assert clipped.step_transient_bytes() == base + 4
    clipped._ddp = object()  # (as attach_ddp sets it: stepped on views of DDP's buckets)
    assert clipped.step_transient_bytes() == base + 4 + 128 * 64 * 4
    lw.remove_hooks()
    clipped.remove_hooks()


def _traced_hook_step(dtype, shape, clip, mode, owned=True):
    """Bytes that one LayerwiseOptimizer._step_param allocates alive together, the inner step stubbed out (its
    own term is the engine's): the non-finite check and the clipping, every dispatched output counted."""
    from test_nonfinite_check_bytes import _AllLive

    from lowmem.optim.layerwise import LayerwiseOptimizer

    torch.manual_seed(0)
    m = torch.nn.Linear(shape[1], shape[0], bias=False).to(dtype)
    lw = LayerwiseOptimizer(m, "lomo", lr=1e-3, max_grad_norm=clip, clip_mode=mode)
    lw.inner.step_param = lambda *a, **k: None
    p, g = m.weight, torch.randn(shape).to(dtype)
    lw._step_param(p, g.clone(), lw._group_of[p], owned=owned)  # (a running sum exists, as for a later parameter)
    lw._new_step()
    g2 = g.clone()
    with _AllLive() as t:
        lw._step_param(p, g2, lw._group_of[p], owned=owned)
    lw.remove_hooks()
    return t.peak, g2, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("clip,mode", [(None, "per_param"), (1.0, "per_param"), (1.0, "global_prev")])
def test_layerwise_hook_allocates_what_it_counts(dtype, clip, mode):
    """The hook's non-finite check (float_norm's float32 block of a bfloat16 gradient: 2 MiB here) and clipping
    coefficient, traced, against layerwise_transient_bytes with no inner transient: at most the running sum of
    the earlier parameters (4 bytes, allocated before the trace) apart. The hooks clip in place (the same values
    as a copy), DDP's views into a copy."""
    from lowmem.optim.layerwise import LayerwiseOptimizer, check_bytes, layerwise_transient_bytes

    shape = (1024, 1024)  # 2^20 elements: two of float_norm's blocks
    traced, scaled, g = _traced_hook_step(dtype, shape, clip, mode)
    reported = layerwise_transient_bytes(0, [(shape[0] * shape[1], dtype, True)], 0, clip, mode)
    assert traced <= reported <= traced + 4, (traced, reported)
    if dtype is torch.bfloat16:
        assert check_bytes(2**20, dtype) == 4 * 2**19 + 8 <= reported
    if clip is not None:
        coef = torch.clamp(clip / (float_norm_of(g) + 1e-6), max=1.0) if mode == "per_param" else torch.ones(())
        assert torch.equal(scaled, g * coef.to(dtype))
        traced_ddp, kept, _ = _traced_hook_step(dtype, shape, clip, mode, owned=False)
        assert torch.equal(kept, g)  # (a DDP bucket's view is not scaled)
        reported_ddp = layerwise_transient_bytes(0, [(2**20, dtype, True)], 0, clip, mode, ddp=True)
        assert traced_ddp <= reported_ddp <= traced_ddp + 4, (traced_ddp, reported_ddp)
    del LayerwiseOptimizer


def float_norm_of(g):
    from lowmem.optim.functional.norms import float_norm

    return float_norm(g).float().square().sqrt()


@needs_proc_early
def test_layerwise_check_copies_a_small_low_precision_gradient_whole():
    """A bfloat16 gradient of at most 2^19 elements: vector_norm(g, dtype=float32) converts it whole inside its
    kernel (no dispatched output: measured by the peak RSS of a fresh process), 4 bytes per element as
    check_bytes counts."""
    import subprocess
    import sys

    from lowmem.optim.layerwise import check_bytes
    from lowmem.optim.step_memory import LIVE_ENV

    code = (
        "import torch\n"
        "from lowmem.optim.step_memory import _reset_peak, _status_kib\n"
        "from lowmem.optim.layerwise import LayerwiseOptimizer\n"
        "m = torch.nn.Linear(1024, 512, bias=False).to(torch.bfloat16)\n"
        "lw = LayerwiseOptimizer(m, 'lomo', lr=1e-3)\n"
        "lw.inner.step_param = lambda *a, **k: None\n"
        "p = m.weight; g = torch.randn(512, 1024).to(torch.bfloat16)\n"
        "lw._step_param(p, g, lw._group_of[p]); lw._new_step()\n"
        "_reset_peak(); base = _status_kib('VmRSS')\n"
        "lw._step_param(p, g, lw._group_of[p])\n"
        "print((_status_kib('VmHWM') - base) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **LIVE_ENV})
    grown, counted = int(out.stdout.split()[-1]), check_bytes(2**19, torch.bfloat16)
    assert counted == 4 * 2**19 + 4
    # the claim: never over the count (+ 64 KiB of RSS noise). The floor is a sanity check that the conversion is
    # seen at all (measured 0.89-0.96 of the count here, AMD EPYC, 2026-11-30, also with 3 busy processes; RSS on
    # another machine may read lower, as the project's CI did for the range finder below): half the count
    assert 0.5 * counted <= grown <= counted + 64 * 1024, (grown, counted)


@pytest.mark.parametrize("name,hp", [("adamw", {}), ("galore_adamw", {"rank": 16, "projection": "random"})])
def test_layerwise_transient_counts_no_buckets(name, hp):
    """Layerwise mode steps each parameter alone in its gradient hook (step_param): its transient is
    the largest per-parameter step's (next to the hook's squared norm and running sum, 8 bytes), without
    the foreach buckets (AdamW's sqrt(v) of a bucket of every small tensor) or the projected buckets (every
    weight's projected gradient and direction) that step() would use; the estimator uses the same
    (estimate_memory(layerwise=True))."""
    from lowmem.memory.estimate import optimizer_memory
    from lowmem.optim.layerwise import LayerwiseOptimizer

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(256, 64, bias=True) for _ in range(6)]).to("meta")

    m = model()
    full = create_optimizer(m, name, **hp)
    full.materialize_state()
    alone = max(full._param_transient_bytes(p, g, full.state[p]) for g in full.param_groups for p in g["params"])
    assert full.step_transient_bytes(per_parameter=True) == alone
    assert full.step_transient_bytes() > 2 * alone  # six weights (or their projected gradients) in one bucket
    lw = LayerwiseOptimizer(m, name, **hp)
    lw.inner.materialize_state()
    assert lw.step_transient_bytes() == alone + 8
    lw.remove_hooks()
    assert optimizer_memory(model(), name, hp, layerwise=True)[1] == alone + 8
    assert optimizer_memory(model(), name, hp)[1] == full.step_transient_bytes()


def test_layerwise_estimate_counts_the_hook_check():
    """LOMO (no per-parameter transient on float32): the hook's check (the norm and its square next to the running
    sum, 12 bytes) is layerwise mode's transient, in LayerwiseOptimizer.step_transient_bytes and in the estimator
    alike; on bfloat16 with the inner step in small chunks, the check's float32 block of 2^19 elements decides."""
    from lowmem.memory.estimate import optimizer_memory
    from lowmem.optim.layerwise import LayerwiseOptimizer

    def model(dtype=torch.float32):
        return torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False), torch.nn.Linear(1024, 8)).to(
            device="meta", dtype=dtype)

    lw = LayerwiseOptimizer(model(), "lomo", lr=1e-3)
    lw.inner.materialize_state()
    assert lw.inner.step_transient_bytes(per_parameter=True) == 0
    assert lw.step_transient_bytes() == 12 == optimizer_memory(model(), "lomo", {"lr": 1e-3}, layerwise=True)[1]
    lw.remove_hooks()
    lw = LayerwiseOptimizer(model(torch.bfloat16), "lomo", lr=1e-3)
    lw.inner.chunk_numel = 2**16
    lw.inner.materialize_state()
    assert lw.inner.step_transient_bytes(per_parameter=True) < 4 * 2**19
    assert lw.step_transient_bytes() == 4 * 2**19 + 12
    lw.remove_hooks()


# ---- measured in a fresh process ----------------------------------------------------------------

BOUND = 64 * MiB
SHAPE = (2048, 2048)  # 16 MiB float32: 8 chunks of 2^19
MEASURED = {
    "adamw": ({}, "plain", 2),
    "adamw8bit": ({}, "plain", 2),
    "adamw4bit": ({}, "plain", 2),
    "adamw4bit_rank1": ({}, "plain", 2),
    "microadam": ({}, "plain", 2),
    "spam": ({"grad_accu_steps": 0}, "plain", 2),
    "stable_spam": ({}, "plain", 2),
    "galore_adamw": ({"rank": 64, "update_proj_gap": 200}, "plain", 2),
    "galore_adamw_rsvd": ({"rank": 64, "update_proj_gap": 2, "projection": "rsvd"}, "refresh", 3),
    "fira_adamw_rsvd": ({"rank": 64, "update_proj_gap": 2, "projection": "rsvd"}, "refresh", 3),
    "fira_adamw": ({"rank": 64, "update_proj_gap": 200}, "plain", 2),
    "frugal": ({"rank": 64, "update_proj_gap": 200}, "plain", 2),
    "osd_adamw": ({"rank": 64}, "plain", 2),
    "adafactor": ({}, "plain", 2),
    "adafactor_beta1": ({"beta1": 0.9}, "plain", 2),
    "adam_mini": ({}, "plain", 2),
    # normalized hybrids (issue 14): SCALE's and SinkGD's rows in chunks; Muon's lean step (the bfloat16
    # iterate, A and P: 24 MiB here, plus the products' workspace)
    "scale": ({"scale_role": "head"}, "plain", 2),
    # SCALE's embedding role: its columns' RMS from a pass over blocks of rows, then the blocks' steps
    "scale_embedding": ({"scale_role": "embedding"}, "plain", 2),
    "sinkgd": ({}, "plain", 2),
    "muon": ({}, "plain", 2),
    "muon_no_nesterov": ({"nesterov": False}, "plain", 2),
    # element-wise / factored recipes of this session: Subset-Norm, LOMO / AdaLomo, BAdam (its active
    # block's AdamW), in chunks; APOLLO at rank 512 (its projected gradient 4 MiB): plain steps, Gaussian
    # refreshes (steps 1 and 3) and an orthonormal one, held to the tightness below (TIGHT), on the
    # per-parameter path (foreach=False: the engine's multi-tensor projected step adds its bucket's terms)
    "adamw_sn": ({}, "plain", 2),
    "adagrad_sn": ({}, "plain", 2),
    "lomo": ({}, "plain", 2),
    "adalomo": ({}, "plain", 2),
    "badam": ({}, "plain", 2),
    "apollo_adamw": ({"rank": 512, "update_proj_gap": 200, "foreach": False}, "plain", 2),
    "apollo_adamw_gaussian": ({"rank": 512, "update_proj_gap": 2, "foreach": False}, "refresh", 3),
    "apollo_adamw_random": ({"rank": 512, "update_proj_gap": 200, "projection": "random", "foreach": False}, "refresh", 1),
    "apollo_mini": ({"update_proj_gap": 2}, "refresh", 3),
    # the engine's multi-tensor projected step (the default foreach; a bucket of one weight): its phases,
    # not a parameter's own step plus the bucket (issue 12's double count: 2x the measurement)
    "apollo_adamw_bucket": ({"rank": 512, "update_proj_gap": 200}, "plain", 2),
    "apollo_adamw_gaussian_bucket": ({"rank": 512, "update_proj_gap": 2}, "refresh", 3),
    "galore_adamw_random_bucket": ({"rank": 512, "update_proj_gap": 2, "projection": "random"}, "refresh", 3),
    "fira_adamw_random_bucket": ({"rank": 512, "update_proj_gap": 200, "projection": "random"}, "plain", 2),
    # factored moments in the projected buckets (one step size per weight): 13.4 MiB measured, 14.0 reported
    "galore_adafactor_random_bucket": ({"rank": 512, "update_proj_gap": 200, "projection": "random"}, "plain", 2),
    # Subspace-Momentum: a plain step and randomized refreshes (its default exact SVD is galore's, below)
    "sgd_sm": ({"rank": 64, "update_proj_gap": 200}, "plain", 2),
    "adamw_snsm_rsvd": ({"rank": 64, "update_proj_gap": 2, "projection": "rsvd"}, "refresh", 3),
    # not chunked, reported honestly: the exact SVD refresh (galore-torch's)
    "galore_adamw_svd": ({"rank": 64, "update_proj_gap": 200}, "refresh", 1),
}
needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")


@pytest.fixture(scope="module")
def measured():
    """Every family in one fresh process, one after another (peak reset before each, glibc's mmap
    threshold fixed so freed blocks go back to the kernel): about 15 s on 2 cores."""
    from lowmem.optim.step_memory import LIVE_ENV, measure_steps

    labels = sorted(MEASURED)
    specs = [{"name": label.replace("_rsvd", "").replace("_svd", "").replace("_beta1", "").replace("_no_nesterov", "")
              .replace("_gaussian", "").replace("_random", "").replace("_bucket", "").replace("_embedding", ""), "shape": list(SHAPE), "hparams": MEASURED[label][0],
              "mode": MEASURED[label][1], "steps": MEASURED[label][2]} for label in labels]
    return dict(zip(labels, measure_steps(specs, env=LIVE_ENV)))


@needs_proc
@pytest.mark.parametrize("label", sorted(set(MEASURED) - {"galore_adamw_svd"}))
def test_step_peak_is_bounded_and_reported(measured, label):
    """Peak RSS growth of real steps (refreshes included for rsvd: steps 1 and 3) above weight, gradient
    and state stays under 64 MiB, and step_transient_bytes() bounds it from above. For the
    element-wise families and refreshes it is also tight (within 2x + 4 MiB); for a plain subspace
    step the report includes the default exact SVD's refresh workspace, which that step does not reach."""
    hp, mode, _ = MEASURED[label]
    r = measured[label]
    grown, reported = r["growth_bytes"], r["transient_bytes"]
    assert grown <= BOUND, (label, grown / MiB)
    assert grown <= 1.1 * reported + MiB, (label, grown / MiB, reported / MiB)
    # (the rsvd rows count MKL's first-call buffers, which this shared process has from earlier rows:
    # their tightness is test_rsvd_refresh_transient_in_a_fresh_process's)
    if ("rank" not in hp or mode == "refresh" or label in TIGHT) and not label.endswith("_rsvd"):
        assert reported <= 2 * grown + 4 * MiB, (label, grown / MiB, reported / MiB)
    if label in TIGHT:
        # (MKL's GEMM packing buffers, counted on every CPU projected step, are in this shared process
        # from its earlier rows: their growth is test_gemm_packing_buffer_measured_in_a_fresh_process's)
        assert reported - _shared_kept(label) <= TIGHT[label] * grown + MiB, (label, grown / MiB, reported / MiB)
    if label.endswith("_rsvd"):  # the range finder's phases and MKL's kept buffers: at least the measurement
        assert grown <= reported, (label, grown / MiB, reported / MiB)
    # (reports under 1 MiB, adamw's / badam's 12 B and lomo's 8 B: torch's fused kernel and in-place updates, measured
    # 0 here, are held to the claim above only: growth <= 1.1 x + 1 MiB, which a kept copy of a 2 MiB chunk fails)
    if label not in NO_FLOOR and reported >= MiB and (("rank" not in hp or mode == "refresh" or label in TIGHT)
                                                      and not label.endswith("_rsvd")):
        assert grown >= FLOOR * reported, (label, grown / MiB, reported / MiB)


# A sanity floor for the rows of test_step_peak_is_bounded_and_reported whose report is the step's own allocations and at
# least 1 MiB (not a plain subspace step's exact-SVD workspace, which it does not reach, nor the rsvd rows' MKL first
# calls, measured in a process of their own: test_rsvd_refresh_transient_in_a_fresh_process): growth >= FLOOR x the
# report. Measured 0.42 (stable_spam, 1.87 / 4.5 MiB) to 0.99 (adalomo) of the report here (AMD EPYC, 2026-11-30, load
# ~5 on 2 cores; adamw_sn 0.48, adagrad_sn 0.50, spam 0.53, the others 0.76-0.99): 0.2 leaves 2x under the lowest
# for another machine's RSS (the project's CI read 0.68 of a count) and fails a step whose growth the measurement does
# not see (0: what the earlier `2 x + 4 MiB` let through for every report under 4 MiB: 8 of these rows).
FLOOR = 0.2
# Rows of at least 1 MiB reported that no floor can hold, and why:
NO_FLOOR = {
    # APOLLO-Mini (rank 1): its own tensors, 24 KiB (three 2048-vectors: heap chunks under the mmap threshold, reused;
    # growth 0), under 1 MiB and so held to the claim only on an AMD CPU, where MKL keeps nothing for its rank-1
    # project-down (galore.down_only_pack_bytes; before, 1.75 MiB of GaLore's combine-back and project-down buffers
    # were counted: 1.77 MiB for 0 grown, FOUND_ROWS 1). On an Intel CPU its count adds the project-down's 1 MiB,
    # not measured for a rank-1 product there (a bound): no floor. Its count is tests/test_bounds_apollo_kept.py's.
    "apollo_mini": "report = its 24 KiB of heap chunks (AMD) or an unmeasured 1 MiB MKL bound (Intel)",
}


@pytest.mark.parametrize("shape,chunk,iters", [((256, 512), 2**14, 5), ((512, 256), 2**14, 1), ((256, 512), 2**20, 2),
                                               ((64, 4096), 4096, 2)])  # (one row a block: the column phase's peak)
@pytest.mark.parametrize("batched", [False, True], ids=["cpu", "closed_form"])
def test_sinkgd_chunked_step_allocates_what_it_reports(monkeypatch, shape, chunk, iters, batched):
    """SinkGD's chunked per-parameter step (the scalings' passes over blocks of rows, then the blocks' steps), every
    dispatched output traced: equal to the report, on the CPU and in the closed form that runs off the CPU (forced
    here on the CPU; reported for a meta parameter). Before: the CPU form 1,152 B above its report (the previous
    iteration's column norms alive into the next), the closed form 4 (m + n) below."""
    import functools

    from test_nonfinite_check_bytes import _AllLive

    import lowmem.optim.functional.sinkgd as S
    import lowmem.optim.recipes.normalized as N

    monkeypatch.setattr(N, "sinkhorn_scalings", functools.partial(S.sinkhorn_scalings, batched=batched))
    m, n = shape
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = create_optimizer([p], "sinkgd", foreach=False, sinkhorn_iters=iters)
    opt.chunk_numel = chunk
    g = torch.randn(shape)
    opt.step_param(p, g.clone())
    g2 = g.clone()
    with _AllLive() as t:
        opt.step_param(p, g2)
    on = torch.nn.Parameter(torch.empty(shape, device="meta")) if batched else p
    rep = create_optimizer([on], "sinkgd", foreach=False, sinkhorn_iters=iters)
    rep.chunk_numel = chunk
    rep.materialize_state()
    assert t.peak == rep.step_transient_bytes(per_parameter=True)
    block = min(chunk, m * n) // n
    assert t.peak == S.sinkhorn_scalings_bytes(m, n, block, batched)


@needs_proc
def test_scale_embedding_steps_in_blocks_of_rows(measured):
    """SCALE's embedding (column-normalised over every row) is stepped a block of rows at a time after a pass
    for its columns' RMS: a 2^19-element block in float32 and three n-vectors, not the whole matrix (a
    8192 x 8192 weight: 256.0 MiB measured / 256.03 reported stepped whole, 1.87 / 2.06 MiB in blocks)."""
    r = measured["scale_embedding"]
    assert r["transient_bytes"] == 4 * 2**19 + 8 * SHAPE[1]
    assert r["growth_bytes"] <= r["transient_bytes"] + MiB // 4, r["growth_bytes"] / MiB


def _shared_kept(label: str) -> int:
    """The MKL packing buffers the report of MEASURED's ``label`` counts (LowMemOptimizer._kept_gemm_bytes)."""
    if "rank" not in MEASURED[label][0]:
        return 0
    name = label.replace("_gaussian", "").replace("_random", "").replace("_bucket", "")
    opt = create_optimizer([torch.nn.Parameter(torch.empty(SHAPE))], name, **MEASURED[label][0])
    return opt._kept_gemm_bytes()


@needs_proc
@pytest.mark.parametrize("shape,projection", [((2048, 2048), "gaussian"), ((1024, 4096), "gaussian"),
                                              ((2048, 2048), "random")])
def test_gemm_packing_buffer_measured_in_a_fresh_process(shape, projection):
    """galore_adamw rank 256, plain steps in a fresh process of their own: the project-down's and the
    combine-back's first GEMMs leave MKL's packing buffers, alive through every later phase (issue 12).
    Reported (with them) at least the measurement (+ 64 KiB of RSS noise: 1024 x 4096 is 60-140 KiB under its
    report here): 2048 x 2048 Gaussian 9.2 measured, 9.7 reported (6.0 without them); random 9.1, 10.9 (its
    basis's QR, counted as before) on an Intel Xeon; on an AMD EPYC, whose MKL keeps other buffers
    (galore.kept_pack_bytes by the CPU's vendor), Gaussian 7.0-7.1 / 7.75 and 1024 x 4096 15.1-15.2 / 15.25,
    random 7.0-7.1 / 9.0. Below, RSS is no exact witness on another machine (MKL's pool, glibc's pages: the
    project's CI read 0.68 of a count once), so the floor is a sanity check (the report within 2x + 0.5 MiB of
    the growth); which buffers each vendor's MKL keeps is tests/test_cpu_portability.py's."""
    from lowmem.optim.step_memory import LIVE_ENV, measure_steps

    hp = {"rank": 256, "update_proj_gap": 200, "projection": projection}
    r = measure_steps([{"name": "galore_adamw", "shape": list(shape), "hparams": hp, "mode": "plain", "steps": 3}],
                      env=LIVE_ENV)[0]
    grown, reported = r["growth_bytes"], r["transient_bytes"]
    assert grown <= reported + 64 * 1024, (grown / MiB, reported / MiB)
    if projection == "gaussian":
        assert reported <= 2 * grown + MiB // 2, (grown / MiB, reported / MiB)


QUANTIZED_FLOAT = ["adamw8bit", "adamw4bit"]


@pytest.fixture(scope="module")
def quantized_float_measured():
    """Both quantized AdamWs of the test below, one after the other in one fresh process (peak reset before each)."""
    from lowmem.optim.step_memory import LIVE_ENV, measure_steps

    specs = [{"name": name, "shape": list(SHAPE), "hparams": {"min_quant_size": 10**9}, "mode": "plain", "steps": 3}
             for name in QUANTIZED_FLOAT]
    return dict(zip(QUANTIZED_FLOAT, measure_steps(specs, env=LIVE_ENV)))


@needs_proc
@pytest.mark.parametrize("name", QUANTIZED_FLOAT)
def test_quantized_bucket_below_min_quant_size_measured(quantized_float_measured, name):
    """A 2048 x 2048 weight below min_quant_size (float32 moments) in pieces of 2^19 elements, on the
    foreach path of quantized AdamW (issue 12): its buckets decode nothing, so the report is the inner
    AdamW's direction of a piece (4.0 MiB; was 9.0 / 16.0), measured 3.9-4.0 MiB live in a fresh process of
    its own, 3.74-4.0 with both in one (2026-11-30; glibc's mmap threshold fixed: what the first frees goes
    back to the kernel before the second). The claim: never over the report (+ 64 KiB of RSS noise: the growth
    equals the report to the byte in some runs); the floor a sanity check that excludes the old 9.0 (2x + 0.5 MiB:
    RSS on another machine may read well under the live tensors)."""
    r = quantized_float_measured[name]
    grown, reported = r["growth_bytes"], r["transient_bytes"]
    assert grown <= reported + 64 * 1024, (grown / MiB, reported / MiB)
    assert reported <= 2 * grown + MiB // 2, (grown / MiB, reported / MiB)


@needs_proc
def test_first_foreach_step_in_a_fresh_process_is_the_report():
    """A 2048 x 2048 float32 AdamW weight in foreach pieces of 2^19 on the multi-tensor operations
    (``FUSED_ON_CPU`` off in the child): the first step of a fresh process grows by the bucket's sqrt(v),
    2.0 MiB = the report (measured 1.87-1.97). Its extra 0.4 MiB seen before (2.3-2.5 MiB, issue 12) was
    the pieces path's first use in the process, one-time and of any size, which the harness's warm-up
    now runs (step_memory._child); the following steps never had it. The same weight on torch's fused
    AdamW kernel (the CPU's default), first and later steps: report 12 B (the non-finite check's and the kernel's
    step count), growth under 1/8 MiB (measured 0)."""
    from lowmem.optim.step_memory import LIVE_ENV, measure_steps

    spec = {"name": "adamw", "shape": list(SHAPE), "hparams": {}, "mode": "plain", "steps": 1, "fused_on_cpu": False}
    fused = {**spec, "fused_on_cpu": True, "steps": 3}  # (True: the default, set back after spec's False)
    r, f = measure_steps([spec, fused], env=LIVE_ENV)  # spec first: its step is the process's first multi-tensor one
    grown, reported = r["growth_bytes"], r["transient_bytes"]
    assert reported == 2 * MiB
    # the claim (+ 1/8 MiB of noise); the floor a sanity check that the step's sqrt(v) is seen (measured 1.80-1.97
    # MiB here; RSS on another machine may read lower)
    assert grown <= reported + MiB // 8 and reported <= 2 * grown, (grown / MiB, reported / MiB)
    # (the fused kernel's report: the non-finite check's norm and stack, 8 B, beside its step count, 4 + 4 B)
    assert f["transient_bytes"] == 4 + 8 and f["growth_bytes"] <= MiB // 8, f["growth_bytes"] / MiB


# reports that follow the code closely (issue 12): at most this factor above the live measurement (+ 1 MiB), less the
# MKL buffers the shared process has from earlier rows. Measured 0.92-1.10 x + 1 MiB (AMD EPYC, 2026-11-30, also with 3
# busy processes); 1.75 leaves room for another machine's RSS (a 20% lower growth and noise, as the project's CI
# saw: 0.68 of a count there) and still fails a double count (issue 12's: 2x the measurement).
# Muon's lean step: the iterate, A, P and the products' workspace; APOLLO: a plain step's projected
# gradient, its direction and d_low / c, a refresh's basis draw (Gaussian: the draw and its scaled copy;
# orthonormal: QR's factors) followed by a plain step; the multi-tensor projected step (the "_bucket" rows):
# the bucket's projected gradients, directions and sqrt(v), or a combine-back next to them
TIGHT = {"muon": 1.75, "muon_no_nesterov": 1.75, "apollo_adamw": 1.75, "apollo_adamw_gaussian": 1.75,
         "apollo_adamw_random": 1.75, "apollo_adamw_bucket": 1.75, "apollo_adamw_gaussian_bucket": 1.75,
         "galore_adamw_random_bucket": 1.75, "fira_adamw_random_bucket": 1.75, "galore_adafactor_random_bucket": 1.75}


# MicroAdam's per-parameter and piece-wise steps (issue 12): one float32 weight, peak RSS in a fresh process,
# 3 steps (2026-11-29), grown / reported MiB: the 4000 x 256 embedding 5.94 / 6.00 (pieces) and 6.09 / 6.00
# (foreach=False), 1000 x 300 (one chunk padded to whole quantization blocks) 3.34 / 3.48, 8192 x 8192 5.94-6.79 / 6.00
# (its 128 pieces: up to 0.8 MiB of the process's heap, not tensors: the live-tensor tracker measures 6,292,544 B,
# reported 6,294,528). Reported before: 12.80 MiB for every chunked weight, 7.32 for 1000 x 300.
MICROADAM_SHAPES = {"default": [((4000, 256), {}), ((4000, 256), {"foreach": False}), ((1000, 300), {"foreach": False})],
                    "8192": [((8192, 8192), {})]}


@needs_proc
@pytest.mark.parametrize("shapes", ["default", pytest.param("8192", marks=pytest.mark.slow)])
def test_microadam_step_transient_in_a_fresh_process(shapes):
    """MicroAdam's report (microadam.eager_direction_bytes of the largest chunk) against the peak RSS of its steps
    (one fresh process, the peak reset before each weight): at least the measurement less the heap's noise, at
    most 1.5 x it + 1 MiB (AMD EPYC, 2026-11-30, also with 3 busy processes: 5.75-5.89 MiB grown for 6.00 reported,
    1000 x 300 3.38-3.51 for 3.48; 1.1 x + 1 MiB before, which RSS reading 20% lower failed; a sanity floor that
    still fails the old 24 B per element + 16 per ring entry, 2.1x)."""
    from lowmem.optim.step_memory import LIVE_ENV, measure_steps

    specs = [{"name": "microadam", "shape": list(shape), "hparams": hp, "mode": "plain", "steps": 3}
             for shape, hp in MICROADAM_SHAPES[shapes]]
    for spec, r in zip(specs, measure_steps(specs, env=LIVE_ENV)):
        grown, reported = r["growth_bytes"], r["transient_bytes"]
        assert grown <= reported + MiB, (spec, grown / MiB, reported / MiB)
        assert reported <= 1.5 * grown + MiB, (spec, grown / MiB, reported / MiB)


@needs_proc
def test_rsvd_refresh_transient_in_a_fresh_process():
    """The rsvd refreshes (range finder at step 1, subspace iteration at step 3) of one 2048 x 2048
    weight at rank 64 in a fresh process of its own, so that MKL's first calls (its code paged in,
    the SVD panel and packing buffers it keeps) are measured, as in a training run (the shared
    fixture above has them from earlier rows): the report (galore.rsvd_refresh_bytes, 8.1 MiB) is at
    least the measurement (fira_adamw 6.8-6.9 MiB, galore_adamw 5.4-5.6 when first measured; fira_adamw 5.8-6.0
    on an AMD EPYC, 2026-11-30, also with 3 busy processes) and, a sanity floor, at most 2x of it + 1 MiB (1.3x +
    1 MiB before: RSS reading 6-9% lower than here failed it). The old 20 (r + 4)(m + n) reported 5.3."""
    from lowmem.optim.step_memory import LIVE_ENV, measure_steps

    hp = {"rank": 64, "update_proj_gap": 2, "projection": "rsvd"}
    spec = {"name": "fira_adamw", "shape": list(SHAPE), "hparams": hp, "mode": "refresh", "steps": 3}
    r = measure_steps([spec], env=LIVE_ENV)[0]
    grown, reported = r["growth_bytes"], r["transient_bytes"]
    assert grown <= reported <= 2 * grown + MiB, (grown / MiB, reported / MiB)


_RANGE_FINDER_CHILD = """
import gc, json, sys, torch
from lowmem.optim.functional import galore as GL
def rss(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))
out = []
for d, e, r in json.loads(sys.argv[1]):
    g = torch.randn(d, e, generator=torch.Generator().manual_seed(0))
    q0 = torch.linalg.qr(torch.randn(d, r)).Q
    for fn in (lambda: GL.range_finder(g, r, torch.Generator().manual_seed(1), 2), lambda: GL.subspace_iteration(g, q0, 2)):
        for _ in range(2):  # the second call: MKL's kept buffers and code are there from the first
            gc.collect()
            open("/proc/self/clear_refs", "w").write("5")
            base = rss("VmRSS")
            q = fn()
            peak = rss("VmHWM") - base
            del q
        out.append(peak)
print(json.dumps(out))
"""


@needs_proc
def test_range_finder_bytes_counts_the_live_phases():
    """galore.range_finder_bytes (first_call=False: the live tensors, phase by phase) against the peak
    of a second range finder / subspace iteration in a fresh process with glibc's mmap threshold fixed
    (live bytes): measured 0.93-0.98 of it for 2048 x 2048 and 4096 x 1024 at rank 128 (4.1-6.4 MiB) here, 0.68 once
    in the project's CI; never over it."""
    import json
    import subprocess
    import sys

    from lowmem.optim.functional import galore as GL
    from lowmem.optim.step_memory import LIVE_ENV

    cases = [(2048, 2048, 128), (4096, 1024, 128)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **LIVE_ENV}
    out = subprocess.run([sys.executable, "-c", _RANGE_FINDER_CHILD, json.dumps(cases)], capture_output=True,
                         text=True, env=env, check=True)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    for i, (d, e, r) in enumerate(cases):
        for j, oversample in enumerate((4, None)):
            counted = GL.range_finder_bytes(d, e, r, 2, oversample, first_call=False)
            traced = GL.range_finder_traced_bytes(d, e, r, 2, oversample)
            # The claim: never under (+ 64 KiB: RSS noise of a few pages, seen once in CI under load: 4,632,576
            # for 4,604,160; every term of the count is at least r d 4 B = 1 MiB here). Below, RSS is no exact
            # witness: MKL's pool and glibc hand back pages touched by the first call, so the growth can fall under
            # even the live tensors (the project's CI, 2026-11-30: 3,141,632 for 4,604,160 counted, 3,314,256
            # traced, 0.95 of it). So the floor is a sanity check that the measurement sees the phases at all:
            # three quarters of the traced live tensors (galore.range_finder_traced_bytes, whose exact count is
            # tests/test_galoreexact_per_parameter.py's).
            assert 0.75 * traced <= peaks[2 * i + j] <= counted + 65536, ((d, e, r, oversample), peaks[2 * i + j], counted, traced)


@pytest.mark.slow  # about 60 s: 4096 x 11008 and 8192 x 8192 weights, three steps each
@needs_proc
@pytest.mark.parametrize("name", ["galore_adamw", "fira_adamw"])
def test_rsvd_refresh_transient_on_large_weights(name):
    """The rsvd refreshes of a large weight (issue 12): the range finder (step 1) and a subspace
    iteration (step 3) at rank 256, measured live in a fresh process, against
    SubspaceProjection's report (galore.rsvd_refresh_bytes): at least the measurement (1 MiB of
    MKL's noise) and at most 1.25x of it (MKL's pool reuses some buffers the bound counts apart:
    4096 x 11008 measures 53 MiB for 64 reported). The old 20 (r + 4)(m + n) reported 81 MiB for
    8192 x 8192 (53-55 measured). On an AMD EPYC (MKL keeps no SVD panel there; the bound follows the
    CPU's vendor): 4096 x 11008 44.0-44.4 for 47.7, 8192 x 8192 39.9 for 43.4 (the Intel bound: 63.9, 1.44x)."""
    from lowmem.optim.step_memory import LIVE_ENV, measure_steps

    hp = {"rank": 256, "update_proj_gap": 2, "projection": "rsvd"}
    for shape in ((4096, 11008), (8192, 8192)):  # a fresh process each (MKL's first calls included)
        spec = {"name": name, "shape": list(shape), "hparams": hp, "mode": "refresh", "steps": 3}
        r = measure_steps([spec], env=LIVE_ENV)[0]
        grown, reported = r["growth_bytes"], r["transient_bytes"]
        assert grown <= reported + MiB, (shape, grown / MiB, reported / MiB)
        assert reported <= 1.25 * grown + MiB, (shape, grown / MiB, reported / MiB)


@needs_proc
def test_exact_svd_refresh_transient_is_reported(measured):
    """The exact SVD refresh (the default, for parity with galore-torch) needs workspace of the
    gradient's size; step_transient_bytes() bounds it (projection="rsvd" is bounded, above)."""
    r = measured["galore_adamw_svd"]
    grown, reported = r["growth_bytes"], r["transient_bytes"]
    assert 4 * SHAPE[0] * SHAPE[1] <= grown <= 1.1 * reported + MiB <= 3 * grown, (grown / MiB, reported / MiB)


@pytest.mark.slow  # compiling takes ~20 s on CPU
@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_microadam_compiled_chunks_follow_the_plain_whole_tensor_step():
    """MicroAdam's torch.compile'd path (the CUDA default) on chunk views of its state (strided ring
    columns, sliced error codes): 60 000 entries in 8192-entry chunks (7 and a partial one)."""
    from lowmem.optim.microadam import MicroAdamMoments

    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(300, 200, generator=g)
    grads = [torch.randn(300, 200, generator=g) for _ in range(4)]
    results = []
    for mode, chunk in (("never", None), ("always", 8192)):
        p = torch.nn.Parameter(p0.clone())
        opt = create_optimizer([p], "microadam", m=3, k_init=0.05, topk_block_size=4096, quant_block_size=2048)
        opt.recipe = type(opt.recipe)(**{**opt.recipe.__dict__, "moment": MicroAdamMoments(compile=mode)})
        opt.chunk_numel = chunk
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
        results.append(p.detach().clone())
    assert (results[0] - p0).abs().max() > 1e-3
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_float_norm_of_low_precision_tensor_in_blocks():
    from lowmem.optim.functional.norms import float_norm

    x = torch.randn(3000, 7, generator=torch.Generator().manual_seed(0)).bfloat16()
    ref = torch.linalg.vector_norm(x.float())
    got = float_norm(x, block_numel=1000)  # 21 blocks, the last partial
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    assert float_norm(x.float()) == ref


@pytest.mark.parametrize("name", ["lomo", "adamw_sn"])
def test_chunked_low_precision_step_frees_each_chunks_copies(name):
    """A bfloat16 parameter stepped in chunks: each chunk's float32 copies (gradient, parameter) are freed before the
    next chunk's, so the per-parameter step allocates what it reports (LOMO, no moment temporaries: 2 float32
    chunks, 4 MiB for 1024 x 1024 at 2^19-element chunks; the previous chunk's parameter copy stayed alive into the
    next: 6 MiB traced for 4 MiB reported)."""
    from test_nonfinite_check_bytes import _AllLive

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1024, 1024).to(torch.bfloat16))
    opt = create_optimizer([p], name, lr=1e-3)
    opt.chunk_numel = 2**19
    opt.materialize_state()
    g = torch.randn(1024, 1024).to(torch.bfloat16)
    opt.step_param(p, g)
    with _AllLive() as t:
        opt.step_param(p, g)
    assert t.peak <= opt.step_transient_bytes(per_parameter=True), (t.peak, opt.step_transient_bytes(per_parameter=True))
    if name == "lomo":
        assert t.peak == 8 * 2**19
