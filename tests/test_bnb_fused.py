"""adamw8bit's ``fused``: bitsandbytes' blockwise 8-bit Adam step on lowmem's own 8-bit state (lowmem.optim.bnb_fused).

On CPU ``fused=True`` runs bitsandbytes' CPU implementation of ``optimizer_update_8bit_blockwise``; it is
compared with the default chunked PyTorch step (``fused=None`` on CPU), the same gradients in lockstep.
The two differ only in rounding (the engine's ``lerp`` for ``m`` against bitsandbytes' ``mul + add``),
which now and then moves an 8-bit code by one; every element whose codes never differed must agree to
float32 rounding, and the rest stay within a code step. The CUDA kernel is compared in
:func:`test_cuda_kernel_close_to_cpu_chunked_path` (skipped without a GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

import bitsandbytes.functional as bnbF

from lowmem.optim import bnb_fused
from lowmem.optim.functional import quant as Q
from lowmem.optim.recipes.compressed import AdamW8bit

# ragged (300 x 77 = 23100, not whole blocks), whole blocks (64 x 64), below min_quant_size (float32 moments),
# and a tensor larger than the chunk (pieces of the foreach buckets)
SHAPES = [(300, 77), (64, 64), (100,), (700, 300)]


def _lockstep(hp: dict, shapes=SHAPES, steps: int = 4, chunk_numel: int | None = 2**16, seed: int = 0,
              fused_a=None, fused_b=True):
    """Two adamw8bit optimizers (``fused_a`` / ``fused_b``) on the same weights and gradients; per tensor:
    the elements whose codes ever differed, and the optimizers."""
    gen = torch.Generator().manual_seed(seed)
    w0 = [torch.randn(s, generator=gen) for s in shapes]
    pa = [torch.nn.Parameter(w.clone()) for w in w0]
    pb = [torch.nn.Parameter(w.clone()) for w in w0]
    oa, ob = AdamW8bit(pa, fused=fused_a, **hp), AdamW8bit(pb, fused=fused_b, **hp)
    oa.chunk_numel = ob.chunk_numel = chunk_numel
    flipped = [torch.zeros(w.numel(), dtype=torch.bool) for w in w0]
    for _ in range(steps):
        for a, b in zip(pa, pb):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        oa.step()
        ob.step()
        for i, (a, b) in enumerate(zip(pa, pb)):
            sa, sb = oa.state[a], ob.state[b]
            if "exp_avg_absmax" in sa:
                flipped[i] |= (sa["exp_avg"] != sb["exp_avg"]) | (sa["exp_avg_sq"] != sb["exp_avg_sq"])
    return pa, pb, flipped, oa, ob


CONFIGS = [
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, weight_decay=0.0, betas=(0.8, 0.95), eps=1e-6),
    dict(lr=3e-3, weight_decay=0.01, betas=(0.9, 0.99), eps=1e-3),
]


@pytest.mark.parametrize("hp", CONFIGS, ids=["wd", "no-wd-betas", "eps"])
def test_fused_cpu_equals_chunked_step(hp):
    pa, pb, flipped, oa, ob = _lockstep(hp)
    lr = hp["lr"]
    total_flips = 0
    for a, b, f in zip(pa, pb, flipped):
        diff = (a.detach() - b.detach()).abs().view(-1)
        clean = ~f
        # elements whose codes never differed: float32 rounding of the update (|p| ~ 1: a few ulps)
        assert diff[clean].max().item() <= 1e-6, (tuple(a.shape), diff[clean].max().item())
        # a code moved by one (a rounding tie of the two moment forms): within a fraction of the step
        if f.any():
            assert diff[f].max().item() <= 0.1 * lr * 4
        total_flips += int(f.sum())
    numel = sum(a.numel() for a in pa)
    assert total_flips <= 1e-3 * numel, total_flips  # measured: 0-10 of 349,000 values over 4 steps
    # below min_quant_size: float32 moments, the plain step, bit for bit
    small = SHAPES.index((100,))
    assert torch.equal(pa[small], pb[small])
    assert oa.state[pa[small]]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("chunk_numel", [None, 50_000, 2**16])
def test_fused_cpu_pieces_and_slices(chunk_numel):
    """A tensor larger than ``chunk_numel`` reaches the bucket in pieces (not whole blocks for 50,000):
    it is stepped whole from its first piece, in slices of whole blocks; each element once."""
    pa, pb, flipped, _, _ = _lockstep(dict(lr=1e-2, weight_decay=0.1), shapes=[(700, 300), (300, 77)],
                                      steps=3, chunk_numel=chunk_numel)
    for a, b, f in zip(pa, pb, flipped):
        assert (a.detach() - b.detach()).abs().view(-1)[~f].max().item() <= 1e-6


def test_fused_cpu_calls_bitsandbytes_per_slice(monkeypatch):
    calls = []
    real = bnbF.optimizer_update_8bit_blockwise

    def spy(name, g, p, *args, **kw):
        calls.append((name, g.numel(), p.data_ptr()))
        return real(name, g, p, *args, **kw)

    monkeypatch.setattr(bnbF, "optimizer_update_8bit_blockwise", spy)
    p = torch.nn.Parameter(torch.randn(700, 300))
    opt = AdamW8bit([p, torch.nn.Parameter(torch.randn(100))], fused=True)
    opt.chunk_numel = 50_000
    p.grad = torch.randn_like(p)
    opt.param_groups[0]["params"][1].grad = torch.randn(100)
    opt.step()
    # 210,000 values in slices of 49,920 (50,000 rounded down to blocks of 256); the 100-value tensor not fused
    assert [c[1] for c in calls] == [49_920] * 4 + [210_000 - 4 * 49_920]
    assert all(c[0] == "adam" for c in calls)


def test_fused_none_on_cpu_never_calls_bitsandbytes(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("fused kernel called")

    monkeypatch.setattr(bnbF, "optimizer_update_8bit_blockwise", boom)
    pa, pb, flipped, _, _ = _lockstep(dict(lr=1e-2), steps=2, fused_a=None, fused_b=False)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


def test_fused_true_refuses_what_it_cannot_run():
    p = torch.nn.Parameter(torch.randn(64, 64))
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=r"fused=True.*block_size=128"):
        AdamW8bit([p], fused=True, block_size=128).step()
    with pytest.raises(ValueError, match="fused"):
        AdamW8bit([p], fused="yes")
    # below min_quant_size: float32 moments take the plain step, no error
    AdamW8bit([p], fused=True, min_quant_size=10**6).step()


def test_per_parameter_step_runs_the_kernel():
    """The engine's per-parameter step (foreach=False, a bf16 parameter) takes the kernel through
    MomentRule.fused_step_: bit for bit the multi-tensor fused step (the same whole blocks), not the
    chunked step (which rounds m's update differently)."""
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    grads = [torch.randn(96, 128) for _ in range(3)]
    runs = {}
    for name, kw in {"foreach": {}, "alone": {"foreach": False}, "chunked": {"fused": False, "foreach": False}}.items():
        p = torch.nn.Parameter(w.clone())
        opt = AdamW8bit([p], lr=1e-2, weight_decay=0.1, **({"fused": True} | kw))
        for g in grads:
            p.grad = g.clone()
            opt.step()
        runs[name] = p.detach().clone()
    assert torch.equal(runs["alone"], runs["foreach"])
    assert not torch.equal(runs["alone"], runs["chunked"])
    q = torch.nn.Parameter(torch.randn(64, 64, dtype=torch.bfloat16))
    q.grad = torch.randn_like(q)
    before = q.detach().clone()
    AdamW8bit([q], fused=True).step()  # (bf16: the per-parameter step; bitsandbytes' op takes bf16)
    assert not torch.equal(q.detach(), before)


def test_state_is_bitsandbytes_format_and_round_trips():
    """The maps are bitsandbytes' dynamic maps, and a fused run's state_dict loads into an unfused one
    (the same tensors: uint8 codes, float32 absmax per block of 256)."""
    assert torch.equal(Q.code_map("dynamic8_signed"), bnbF.create_dynamic_map(signed=True))
    assert torch.equal(Q.code_map("dynamic8_unsigned"), bnbF.create_dynamic_map(signed=False))
    pa, pb, _, oa, ob = _lockstep(dict(lr=1e-2), shapes=[(64, 64)], steps=2)
    sa, sb = oa.state[pa[0]], ob.state[pb[0]]
    assert {k: (v.dtype, v.shape) for k, v in sa.items()} == {k: (v.dtype, v.shape) for k, v in sb.items()}
    assert sb["exp_avg_absmax"].numel() == 64 * 64 // bnb_fused.BNB_BLOCK_SIZE
    oa.load_state_dict(ob.state_dict())
    for k in sb:
        assert torch.equal(oa.state[pa[0]][k], sb[k])


def test_step_transient_bytes_counts_the_cpu_temporaries():
    p = torch.nn.Parameter(torch.randn(700, 300))
    q = torch.nn.Parameter(torch.randn(64, 64))
    opt = AdamW8bit([p, q], fused=True)
    opt.chunk_numel = 50_000
    for x in (p, q):
        x.grad = torch.randn_like(x)
    opt.step()
    fused = opt.step_transient_bytes()
    assert fused == bnb_fused.fused_cpu_transient_bytes(49_920)  # the largest slice
    plain = AdamW8bit([p, q], fused=None)
    plain.chunk_numel = 50_000
    plain.step()
    assert plain.step_transient_bytes() != fused


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_cuda_kernel_close_to_cpu_chunked_path(wd):
    """The CUDA kernel (fused=None on CUDA) against the CPU chunked step, same weights and gradients.
    Documented differences: decay after the update (lr^2 wd |u| per step), float32 bias corrections,
    ``quantize_2D`` codes. Relative update difference (as bench_gpu's equal check) below 5e-2."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 77), (64, 64), (100,), (1024, 1024)]
    w0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 1e-2 for s in shapes] for _ in range(5)]
    out = {}
    for dev in ("cuda", "cpu"):
        ps = [torch.nn.Parameter(w.clone().to(dev)) for w in w0]
        opt = AdamW8bit(ps, lr=1e-3, weight_decay=wd, fused=None)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(dev)
            opt.step()
        out[dev] = [p.detach().cpu() for p in ps]
    for w, c, r in zip(w0, out["cuda"], out["cpu"]):
        rel = ((c - w) - (r - w)).norm() / (r - w).norm()
        assert rel < 5e-2, rel


@pytest.mark.slow  # (a fresh process: ~20 s on 2 busy cores)
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_fused_cpu_transient_measured_in_a_fresh_process():
    """2048 x 2048 float32 in pieces of 2^19 with fused=True on CPU: bitsandbytes' CPU implementation's
    temporaries of one slice, reported 20 B x 2^19 = 10.0 MiB, measured 9.9 MiB (the chunked step: 8.0 / 7.6)."""
    from lowmem.optim.step_memory import LIVE_ENV, measure_steps

    spec = {"name": "adamw8bit", "shape": [2048, 2048], "hparams": {"fused": True}, "mode": "plain", "steps": 3}
    r = measure_steps([spec], env=LIVE_ENV)[0]
    grown, reported = r["growth_bytes"], r["transient_bytes"]
    assert reported == bnb_fused.fused_cpu_transient_bytes(2**19)
    assert grown <= reported <= 1.1 * grown + 2**19, (grown / 2**20, reported / 2**20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_per_parameter_equals_chunked(dtype):
    """Quantized.fused_step_ (the per-parameter form the engine hook would call; bf16 parameters never reach
    the multi-tensor step) against the engine's per-parameter chunked step of the same tensor."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(300, 77, generator=gen).to(dtype)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    oa = AdamW8bit([a], lr=1e-2, weight_decay=0.1, foreach=False)
    ob = AdamW8bit([b], lr=1e-2, weight_decay=0.1, fused=True)
    oa.chunk_numel = ob.chunk_numel = 5000
    rule, group = ob.recipe.moment, ob.param_groups[0]
    flipped = torch.zeros(a.numel(), dtype=torch.bool)
    for t in range(1, 4):
        g = torch.randn(a.shape, generator=gen).to(dtype)
        a.grad = g.clone()
        oa.step()
        if t == 1:
            ob._init_state(b, group, ob.state[b])
        st = ob.state[b]
        st["step"].add_(1)
        with torch.no_grad():
            assert rule.fused_step_(b, g, group, st, t, group["lr"], ob.chunk_numel)
        sa = oa.state[a]
        flipped |= (sa["exp_avg"] != st["exp_avg"]) | (sa["exp_avg_sq"] != st["exp_avg_sq"])
    diff = (a.detach().float() - b.detach().float()).abs().view(-1)
    tol = 1e-6 if dtype == torch.float32 else 0.0  # bf16: both round the same float32 result
    assert diff[~flipped].max().item() <= tol
    assert int(flipped.sum()) <= 10
