"""``bf16_stochastic_round`` and ``kahan_summation`` on CUDA (session 16, written without a GPU; run by
``bash .ci/gpu_checks.sh``'s ``pytest:cuda`` check): the pure rounding with a CUDA generator (unbiased, between the
two neighbours), every write-back path of the engine on CUDA tensors (round-to-nearest stalls, stochastic rounding
moves the weights as float32 ones do, Kahan's weight + compensation holds them), reproducible runs, and the step's
transient against the allocator's peak of requested bytes. The step time against round-to-nearest on a
Llama-2-7B layer is measured by ``lowmem.bench_gpu``'s ``bf16:llama-7b-layer`` check, not asserted here.

The CPU versions of these tests are tests/test_bf16_stochastic_round.py; here only the device differs (``DEVICE``:
a scratch run with ``DEVICE = "cpu"`` is how the tests were checked, and mutated, without a GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.functional.rounding import stochastic_round_to_bf16_

DEVICE = "cuda"
BF16_EPS = 2.0**-7

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("overwrite", [False, True], ids=["kept", "overwritten"])
@pytest.mark.parametrize("frac", [0.3, 0.9])
def test_cuda_rounding_unbiased_between_neighbours(frac, overwrite):
    """2^20 draws of 1 + frac ulp with a CUDA generator: each is 1 or 1 + ulp, the share rounded up is ``frac``
    within 5 standard errors (round-to-nearest or a truncation is off by hundreds of them)."""
    n = 1 << 20
    src = torch.full((n,), 1.0 + frac * BF16_EPS, device=DEVICE)
    out = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    stochastic_round_to_bf16_(out, src, torch.Generator(device=DEVICE).manual_seed(0), overwrite_src=overwrite)
    out = out.double().cpu()
    assert bool(((out == 1.0) | (out == 1.0 + BF16_EPS)).all())
    up = (out == 1.0 + BF16_EPS).double().mean().item()
    assert abs(up - frac) < 5 * math.sqrt(frac * (1 - frac) / n), up


def _drift(name, shape=(64, 512), steps=3, dtype=torch.bfloat16, lr=1e-4, with_comp=False, chunk="default", **kw):
    """The mean change of weights of 0.25 (bfloat16 half-ulp 9.8e-4) after ``steps`` steps of ``lr`` with a constant
    gradient, on ``DEVICE`` (as tests/test_bf16_stochastic_round.py's ``_drift``)."""
    p = torch.nn.Parameter(torch.full(shape, 0.25, dtype=dtype, device=DEVICE))
    opt = create_optimizer([p], name, lr=lr, weight_decay=0.0, **kw)
    if chunk != "default":
        opt.chunk_numel = chunk
    for _ in range(steps):
        p.grad = torch.ones(shape, dtype=dtype, device=DEVICE)
        opt.step()
    if with_comp:
        return 0.25 - (p.float() + opt.state[p]["kahan_comp"].float()).mean().item()
    return 0.25 - p.float().mean().item()


PATHS = {  # the engine's write-backs of a bfloat16 parameter; on CUDA adamw may pick a fused kernel: it must not
    "adamw": dict(name="adamw"),
    "adamw_whole": dict(name="adamw", chunk=None),
    "adamw8bit": dict(name="adamw8bit"),
    "lion": dict(name="lion", lr=1e-4),
    "muon": dict(name="muon", shape=(256, 128), lr=3e-3),
    "galore": dict(name="galore_adamw", rank=4, update_proj_gap=2, lr=1e-3),
    "racs": dict(name="racs", lr=1e-4),
    "sm3": dict(name="sm3", lr=1e-4),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_cuda_every_write_back_rounds_stochastically(path):
    """Round-to-nearest loses every update, stochastic rounding keeps the float32 weights' mean change within 15%,
    Kahan's weight + compensation within 1% (a path whose CUDA branch writes back with ``copy_``, e.g. a fused
    kernel, moves 0)."""
    kw = dict(PATHS[path])
    name = kw.pop("name")
    exact = _drift(name, dtype=torch.float32, **kw)
    assert _drift(name, **kw) == 0.0 and exact > 5e-5
    sr = _drift(name, bf16_stochastic_round=True, **kw)
    assert abs(sr - exact) < 0.15 * exact, (sr, exact)
    held = _drift(name, kahan_summation=True, with_comp=True, **kw)
    assert abs(held - exact) < 0.01 * exact, (held, exact)


def _train(steps, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 8)).to(DEVICE, torch.bfloat16)
    opt = create_optimizer(list(model.parameters()), "adamw", lr=1e-4, **kw)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=data).to(DEVICE, torch.bfloat16)
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().cpu() for p in model.parameters()]


def test_cuda_reproducible_bit_for_bit():
    """Two CUDA runs with stochastic rounding give the same weights (the bits are drawn from a CUDA generator seeded
    by the parameter's position and step), and differ from round-to-nearest's."""
    a, b = _train(5, bf16_stochastic_round=True), _train(5, bf16_stochastic_round=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, _train(5)))


@pytest.mark.parametrize("flag", ["none", "bf16_stochastic_round", "kahan_summation"])
@pytest.mark.parametrize("name", ["adamw", "lion", "racs"])
def test_cuda_step_transient_against_requested_peak(name, flag):
    """A later step on a 4096 x 1024 bfloat16 weight and a bias: the allocator's peak of requested bytes above the
    step's start (the tensors' own sizes, as tests/test_microadam.py's CUDA transient test) <= the reported
    ``step_transient_bytes()`` + 4 KiB, and the report <= 1.1 x measured + 1 MiB (stochastic rounding's mask and
    random bits, 3 bytes an element, are in both)."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, device=DEVICE).to(torch.bfloat16)) for s in [(4096, 1024), (1024,)]]
    kw = {} if flag == "none" else {flag: True}
    opt = create_optimizer(ps, name, lr=1e-4, **kw)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base, base_blocks = torch.cuda.memory_stats()["requested_bytes.all.current"], torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    measured = torch.cuda.memory_stats()["requested_bytes.all.peak"] - base
    blocks, reported = torch.cuda.max_memory_allocated() - base_blocks, opt.step_transient_bytes()
    assert measured <= reported + 4096, (measured, reported, blocks)
    assert reported <= 1.1 * measured + 2**20, (measured, reported, blocks)
