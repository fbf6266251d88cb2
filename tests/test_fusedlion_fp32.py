"""lion's ``fused``: bitsandbytes' 32-bit Lion step (``optimizer_update_32bit("lion", ...)``) on lowmem's own float32
momentum (lowmem.optim.bnb_fused.fused_lion32bit_step_, recipes/lion.LionMoments(fused_32bit=True)).

On CPU ``fused=True`` runs bitsandbytes' CPU implementation: the engine's operations (decay first,
``sign(m beta1 + g (1 - beta1))``, ``m beta2 + g (1 - beta2)``), so parameters and moments are compared bit for bit.
Its temporaries are traced by calling the Python kernel directly (a registered custom operator is not dispatched
through a Python mode inside): 12 B per value, 16 with a low-precision weight."""

from __future__ import annotations

import pytest
import torch

import bitsandbytes.functional as bnbF

from lowmem.optim import bnb_fused, create_optimizer
from lowmem.optim.recipes.lion import Lion
from test_transient_per_parameter import _Traced, _traced_and_reported

SHAPES = [(300, 77), (64, 64), (100,), (700, 300)]


@pytest.fixture
def calls(monkeypatch):
    seen = []
    real = bnbF.optimizer_update_32bit

    def spy(name, g, p, *args, **kw):
        seen.append((name, g.numel()))
        return real(name, g, p, *args, **kw)

    monkeypatch.setattr(bnbF, "optimizer_update_32bit", spy)
    return seen


@pytest.fixture
def traced_cpu_kernel(monkeypatch):
    import bitsandbytes.functional  # noqa: F401  (registers the operators)
    from bitsandbytes.backends.cpu import ops as cpu_ops

    torch.ops.bitsandbytes.optimizer_update_32bit  # noqa: B018  (the attribute, made on first access)
    monkeypatch.setattr(torch.ops.bitsandbytes, "optimizer_update_32bit", cpu_ops._optimizer_update_32bit_cpu)


def _lockstep(hp, shapes=SHAPES, steps=4, chunk_numel=2**16, dtype=torch.float32, fused_a=False, fused_b=True, **kw):
    gen = torch.Generator().manual_seed(0)
    w0 = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    pa = [torch.nn.Parameter(w.clone()) for w in w0]
    pb = [torch.nn.Parameter(w.clone()) for w in w0]
    oa, ob = Lion(pa, fused=fused_a, **hp, **kw), Lion(pb, fused=fused_b, **hp, **kw)
    oa.chunk_numel = ob.chunk_numel = chunk_numel
    for _ in range(steps):
        for a, b in zip(pa, pb):
            a.grad = torch.randn(a.shape, generator=gen).to(dtype)
            b.grad = a.grad.clone()
        oa.step()
        ob.step()
    for a, b in zip(pa, pb):
        assert torch.equal(a, b), (tuple(a.shape), (a - b).abs().max().item())
        assert torch.equal(oa.state[a]["exp_avg"], ob.state[b]["exp_avg"]), tuple(a.shape)


@pytest.mark.parametrize("hp", [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.95))], ids=["wd", "betas"])
def test_fused_cpu_equals_engine_step_in_buckets(hp, calls):
    """Multi-tensor buckets, (700, 300) in pieces of 65,536 (element-wise: each piece its own call)."""
    _lockstep(hp)
    assert {c[0] for c in calls} == {"lion"}
    assert sorted(c[1] for c in calls[:7]) == sorted([23100, 4096, 100, 65536, 65536, 65536, 210000 - 3 * 65536])
    assert len(calls) == 4 * 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_cpu_equals_engine_step_per_parameter(dtype, calls):
    """foreach=False (and every low-precision parameter): the engine's per-parameter step calls fused_step_, the
    CPU op in slices of chunk_numel; bitsandbytes rounds a bf16 / fp16 result once, as the engine does."""
    _lockstep(dict(lr=1e-2, weight_decay=0.1), shapes=[(300, 77), (100,)], steps=3, dtype=dtype, chunk_numel=5000,
              foreach=False)
    assert max(c[1] for c in calls) == 5000 and {c[0] for c in calls} == {"lion"}


def test_fused_none_on_cpu_never_calls_bitsandbytes(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("fused kernel called")

    monkeypatch.setattr(bnbF, "optimizer_update_32bit", boom)
    _lockstep(dict(lr=1e-2), steps=2, fused_a=None, fused_b=False)


def test_fused_values_refused_naming_the_field():
    p = torch.nn.Parameter(torch.randn(64, 64))
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="fused"):
        Lion([p], fused=1)
    with pytest.raises(ValueError, match=r"fused=True.*state_dtype='float32'"):
        Lion([p], fused=True, state_dtype="bfloat16").step()
    q = torch.nn.Parameter(torch.randn(64, 64).t())  # (not contiguous: the per-parameter step)
    q.grad = torch.randn(64, 64).t()
    with pytest.raises(ValueError, match=r"fused=True.*not contiguous"):
        Lion([q], fused=True, foreach=False).step()


@pytest.mark.parametrize("chunk", [None, 4096, 300], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_cpu_step_alone_allocates_what_it_reports(traced_cpu_kernel, dtype, chunk):
    traced, reported = _traced_and_reported("lion", dtype, (200, 128), chunk, fused=True, foreach=False)
    assert traced == reported == (12 if dtype == torch.float32 else 16) * min(200 * 128, chunk or 10**9)


@pytest.mark.parametrize("chunk", [4096, 2**16], ids=str)
def test_fused_cpu_bucket_allocates_what_it_reports(traced_cpu_kernel, chunk):
    """Float32 buckets: one member at a time, every tensor here in pieces of ``chunk``: its temporaries."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(600, 1000), (300, 128), (128,)]]
    opt = create_optimizer(ps, "lion", fused=True)
    opt.chunk_numel = chunk
    for i in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape)
        if i < 2:
            opt.step()
    with _Traced() as t:
        opt.step()
    assert t.peak == opt.step_transient_bytes() == bnb_fused.fused_lion32_cpu_transient_bytes(chunk)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_cuda_kernel_close_to_cpu_engine_step(wd):
    """The CUDA kernel (fused=None on CUDA) against the CPU engine step: a sign may differ where
    beta1 m + (1 - beta1) g is within a rounding of zero; relative update difference below 1e-2."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 77), (64, 64), (100,), (1024, 1024)]
    w0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 1e-2 for s in shapes] for _ in range(5)]
    out = {}
    for dev in ("cuda", "cpu"):
        ps = [torch.nn.Parameter(w.clone().to(dev)) for w in w0]
        opt = Lion(ps, lr=1e-3, weight_decay=wd, fused=None)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(dev)
            opt.step()
        out[dev] = [p.detach().cpu() for p in ps]
    for w, c, r in zip(w0, out["cuda"], out["cpu"]):
        rel = ((c - w) - (r - w)).norm() / (r - w).norm()
        assert rel < 1e-2, rel


def test_unfused_step_refuses_fused_true():
    """A step the engine does not hand to fused_step_ (an FSDP2 shard stepped per parameter) reaches the rule's
    direction: with fused=True it is an error, not a silent unfused step; lion8bit's inner rule is not concerned."""
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = Lion([p], fused=True)
    state = {"exp_avg": torch.zeros(64, 64)}
    with pytest.raises(ValueError, match="fused=True"):
        opt.recipe.moment.direction(torch.randn(64, 64), state, opt.param_groups[0], 1, 1e-3)
    lion8 = create_optimizer([p], "lion8bit", fused=True)
    lion8.recipe.moment.inner.direction(torch.randn(64, 64), state, lion8.param_groups[0], 1, 1e-3)


@pytest.mark.parametrize("name", ["lion", "lion8bit"])
@pytest.mark.parametrize("fused", [None, True, False], ids=str)
def test_cuda_kernel_step_reports_nothing(name, fused):
    """Sized on fake CUDA tensors, as the estimator does: bitsandbytes' CUDA kernels update the state in registers,
    so a parameter they step alone reports 0; fused=False the engine's step (its direction at least)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def reports(recipe, fused):
        with FakeTensorMode(allow_non_fake_inputs=True):
            p = torch.nn.Parameter(torch.empty(2000, 1024, device="cuda"))
            opt = create_optimizer([p], recipe, fused=fused)
            opt.materialize_state()
            return opt.step_transient_bytes(per_parameter=True), opt.step_transient_bytes()

    per_parameter, bucket = reports(name, fused)
    if fused is False:
        assert per_parameter >= 4 * 2000 * 1024 and bucket >= 4 * 2000 * 1024
    else:  # (the bucket report keeps the engine's own per-device bytes, 132 here: adamw8bit's kernel's too)
        assert per_parameter == 0
        assert bucket == reports("adamw8bit", fused)[1] < 1024
