"""lion8bit's ``fused``: bitsandbytes' blockwise 8-bit Lion step (``optimizer_update_8bit_blockwise("lion", ...)``)
on lowmem's own 8-bit momentum (lowmem.optim.bnb_fused.fused_lion8bit_step_, recipes/lion.Lion8bitQuantized).

On CPU ``fused=True`` runs bitsandbytes' CPU implementation; it computes the engine's chunked step with the same
operations (decay before the update, ``sign(m beta1 + g (1 - beta1))``, ``m beta2 + g (1 - beta2)``, encoded by
``quantize_blockwise``), so parameters and codes are compared bit for bit. The CUDA kernel is compared in
:func:`test_cuda_kernel_close_to_cpu_chunked_path` (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import bitsandbytes.functional as bnbF

from lowmem.optim import bnb_fused
from lowmem.optim.recipes.lion import Lion8bit
from test_quantexact_fused import traced_cpu_kernel  # noqa: F401  (the fixture)
from test_transient_per_parameter import _traced_and_reported

# ragged (300 x 77: a partial last block), whole blocks, below min_quant_size (float32 momentum), larger than
# the chunk (pieces of the foreach buckets, stepped whole from the first piece)
SHAPES = [(300, 77), (64, 64), (100,), (700, 300)]


@pytest.fixture
def lion_calls(monkeypatch):
    """The sizes of the slices handed to bitsandbytes' 8-bit step, with the optimizer's name."""
    calls = []
    real = bnbF.optimizer_update_8bit_blockwise

    def spy(name, g, p, *args, **kw):
        calls.append((name, g.numel()))
        return real(name, g, p, *args, **kw)

    monkeypatch.setattr(bnbF, "optimizer_update_8bit_blockwise", spy)
    return calls


def _lockstep(hp, shapes=SHAPES, steps=4, chunk_numel=2**16, dtype=torch.float32, fused_a=False, fused_b=True,
              **kw):
    gen = torch.Generator().manual_seed(0)
    w0 = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    pa = [torch.nn.Parameter(w.clone()) for w in w0]
    pb = [torch.nn.Parameter(w.clone()) for w in w0]
    oa, ob = Lion8bit(pa, fused=fused_a, **hp, **kw), Lion8bit(pb, fused=fused_b, **hp, **kw)
    oa.chunk_numel = ob.chunk_numel = chunk_numel
    for _ in range(steps):
        for a, b in zip(pa, pb):
            a.grad = torch.randn(a.shape, generator=gen).to(dtype)
            b.grad = a.grad.clone()
        oa.step()
        ob.step()
    return pa, pb, oa, ob


def _assert_equal(pa, pb, oa, ob):
    for a, b in zip(pa, pb):
        assert torch.equal(a, b), (tuple(a.shape), (a - b).abs().max().item())
        sa, sb = oa.state[a], ob.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (tuple(a.shape), k)


@pytest.mark.parametrize("hp", [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.95))], ids=["wd", "betas"])
def test_fused_cpu_equals_chunked_step(hp, lion_calls):
    """Four steps of four tensors (multi-tensor buckets): parameters, codes and absmax bit for bit."""
    pa, pb, oa, ob = _lockstep(hp)
    _assert_equal(pa, pb, oa, ob)
    assert oa.state[pa[2]]["exp_avg"].dtype == torch.float32  # (100,): below min_quant_size, not fused
    # (700, 300) whole from its first piece, in slices of 65,536; the other two whole; 4 steps; never the 100
    assert sorted({c for c in lion_calls}) == sorted({("lion", n) for n in (23100, 4096, 65536, 210000 - 3 * 65536)})
    assert len(lion_calls) == 4 * 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_cpu_low_precision_per_parameter(dtype, lion_calls):
    """bf16 / fp16 parameters take the engine's per-parameter step (``Quantized.fused_step_``): bitsandbytes'
    CPU op rounds its float32 result once, as the engine's chunked step does."""
    pa, pb, oa, ob = _lockstep(dict(lr=1e-2, weight_decay=0.1), shapes=[(300, 77), (64, 64)], steps=3, dtype=dtype,
                               chunk_numel=5000)
    _assert_equal(pa, pb, oa, ob)
    assert lion_calls and {c[0] for c in lion_calls} == {"lion"}
    assert max(c[1] for c in lion_calls) == 4864  # 5000 rounded down to 19 blocks of 256


def test_fused_none_on_cpu_never_calls_bitsandbytes(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("fused kernel called")

    monkeypatch.setattr(bnbF, "optimizer_update_8bit_blockwise", boom)
    pa, pb, oa, ob = _lockstep(dict(lr=1e-2), steps=2, fused_a=None, fused_b=False)
    _assert_equal(pa, pb, oa, ob)


def test_fused_values_refused_naming_the_field():
    p = torch.nn.Parameter(torch.randn(64, 64))
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="fused"):
        Lion8bit([p], fused="yes")
    with pytest.raises(ValueError, match=r"fused=True.*block_size=128"):
        Lion8bit([p], fused=True, block_size=128).step()
    Lion8bit([p], fused=True, min_quant_size=10**6).step()  # float32 momentum: the plain step, no error


def test_bucket_step_transient_bytes_is_the_largest_slice():
    p, q = torch.nn.Parameter(torch.randn(700, 300)), torch.nn.Parameter(torch.randn(64, 64))
    opt = Lion8bit([p, q], fused=True)
    opt.chunk_numel = 50_000
    for x in (p, q):
        x.grad = torch.randn_like(x)
    opt.step()
    assert opt.step_transient_bytes() == bnb_fused.fused_cpu_transient_bytes(49_920)
    plain = Lion8bit([p, q], fused=False)
    plain.chunk_numel = 50_000
    plain.step()
    assert plain.step_transient_bytes() != opt.step_transient_bytes()


@pytest.mark.parametrize("chunk", [None, 4096, 300], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(200, 128), (33, 65)], ids=str)
def test_fused_cpu_step_alone_allocates_what_it_reports(traced_cpu_kernel, shape, dtype, chunk):  # noqa: F811
    """The per-parameter step traced: bitsandbytes' Lion temporaries (20 B per value, 24 with a bf16 weight's
    float32 copy) of the largest slice handed to it."""
    traced, reported = _traced_and_reported("lion8bit", dtype, shape, chunk, min_quant_size=1, fused=True)
    assert traced == reported > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_cuda_kernel_close_to_cpu_chunked_path(wd):
    """The CUDA kernel (fused=None on CUDA) against the CPU chunked step, same weights and gradients. Documented
    differences: the kernel's float arithmetic (a sign where beta1 m + (1 - beta1) g is within a rounding of 0) and
    its code search (a code by one). Relative update difference below 5e-2."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 77), (64, 64), (100,), (1024, 1024)]
    w0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 1e-2 for s in shapes] for _ in range(5)]
    out = {}
    for dev in ("cuda", "cpu"):
        ps = [torch.nn.Parameter(w.clone().to(dev)) for w in w0]
        opt = Lion8bit(ps, lr=1e-3, weight_decay=wd, fused=None)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(dev)
            opt.step()
        out[dev] = [p.detach().cpu() for p in ps]
    for w, c, r in zip(w0, out["cuda"], out["cpu"]):
        rel = ((c - w) - (r - w)).norm() / (r - w).norm()
        assert rel < 5e-2, rel
