"""This and the last session's optimizers on CUDA against their CPU results (session 16, written without a GPU; run by
``bash .ci/gpu_checks.sh``'s ``pytest:cuda`` check): ``racs``, ``alice``, ``sm3``, ``normuon`` (and ``adamw`` /
``lion`` beside them), 4 steps from the same float32 weights with the same gradients on both devices, the relative
update difference ||w_cuda - w_cpu|| / ||w_cpu - w0|| within the optimizer's float32 rounding: ``TOL``, 10x what
the same steps differ between float32 and float64 on the CPU (measured when written, 2026-12-01, AMD EPYC: racs
3.9e-6, alice 6.0e-6, sm3 2.2e-6, normuon 7.9e-6, adamw 1.9e-6, lion 1.3e-6). A CUDA path that drops a term
(a missed scale, a skipped row) is off by 1e-2 or more. The gradients of the 2-D weights are rank 4 plus noise,
so Alice's rank-4 basis (the first refresh's top singular vectors) is well separated and the same on both devices.

``lowmem.bench_gpu``'s ``equal:cuda-vs-cpu`` check covers every registered optimizer on ``llama-8x128`` (random
gradients); this file pins the new ones with a bound the suite asserts. ``DEVICE`` is the device under test
(a scratch run with ``DEVICE = "cpu"`` and float64 as reference is how the bounds were measured without a GPU)."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import create_optimizer

DEVICE = "cuda"
SHAPES = [(96, 64), (64, 160), (64,)]
#: alice: only the first refresh in 4 steps (a later one switches, drawing directions from a generator of the device,
#: which differs between CUDA and CPU), eigenvector signs fixed (cuSOLVER's and LAPACK's may differ)
SETTINGS = {"racs": {}, "alice": {"rank": 4, "update_proj_gap": 200, "fix_signs": True}, "sm3": {}, "normuon": {},
            "adamw": {}, "lion": {}}
TOL = {"racs": 4e-5, "alice": 6e-5, "sm3": 3e-5, "normuon": 8e-5, "adamw": 2e-5, "lion": 2e-5}

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _problem(steps: int = 4):
    g = torch.Generator().manual_seed(0)
    w0 = [torch.randn(s, generator=g) * 0.05 for s in SHAPES]
    grads = []
    for _ in range(steps):
        step = []
        for s in SHAPES:
            if len(s) == 2:  # rank 4 + noise: a well-separated top-4 subspace
                low = torch.randn(s[0], 4, generator=g) @ torch.randn(4, s[1], generator=g)
                step.append(1e-2 * (low + 0.05 * torch.randn(s, generator=g)))
            else:
                step.append(1e-2 * torch.randn(s, generator=g))
        grads.append(step)
    return w0, grads


def run(name: str, device: str, dtype=torch.float32, steps: int = 4) -> tuple[list, list]:
    """``(w0, weights after steps)`` of ``name`` at lr 1e-3 (float64 on the CPU)."""
    w0, grads = _problem(steps)
    ps = [torch.nn.Parameter(w.to(device, dtype, copy=True)) for w in w0]
    opt = create_optimizer(ps, name, lr=1e-3, **SETTINGS[name])
    for step in grads:
        for p, gr in zip(ps, step):
            p.grad = gr.to(device, dtype)
        opt.step()
    return w0, [p.detach().double().cpu() for p in ps]


def relative_difference(a: list, b: list, w0: list) -> float:
    diff = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    moved = sum(float((y - w.double()).pow(2).sum()) for y, w in zip(b, w0)) ** 0.5
    assert moved > 0
    return diff / moved


@pytest.mark.parametrize("name", list(SETTINGS))
def test_cuda_equals_cpu_to_float32_rounding(name):
    w0, on_device = run(name, DEVICE)
    _, on_cpu = run(name, "cpu")
    rel = relative_difference(on_device, on_cpu, w0)
    assert rel <= TOL[name], (name, rel)
