"""bfloat16 weights in the multi-tensor buckets on CUDA (written without a GPU; run by the ``pytest:cuda`` check).

On the CPU the buckets equal the per-parameter step bit for bit (tests/test_bf16_buckets.py). On CUDA the operations
are the same, but torch's per-tensor division by a number multiplies by its reciprocal where the multi-tensor one
divides, so a float32 result may differ in its last bit, and a bfloat16 weight by one unit in the last place where
that lands on a rounding boundary: asserted here as at most 1% of the weights' elements apart, by at most one ulp.
The stochastic rounding draws the same bits on both paths (each weight's own CUDA generator stream). ``DEVICE`` set to
``"cpu"`` in a scratch copy is how this file was checked without a GPU (then nothing differs)."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import create_optimizer

DEVICE = "cuda"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                   reason="needs a CUDA GPU")]
SHAPES = [(64, 48), (300,), (1000, 70), (3,)]
ROUNDING = {"nearest": {}, "sr": {"bf16_stochastic_round": True}, "kahan": {"kahan_summation": True}}


def _run(name, foreach, rounding, moments):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, torch.bfloat16)) for s in SHAPES]
    opt = create_optimizer([{"params": ps, **ROUNDING[rounding]}], name, lr=1e-3, weight_decay=0.1,
                           state_dtype=moments, foreach=foreach)
    opt.chunk_numel = 4096  # (the (1000, 70) weight in pieces: its stream continued piece by piece)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, torch.bfloat16)
        opt.step()
    return [p.detach().float().cpu() for p in ps]


@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
@pytest.mark.parametrize("rounding", list(ROUNDING))
@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_cuda_bf16_buckets_match_the_per_parameter_step(name, rounding, moments):
    got, want = _run(name, True, rounding, moments), _run(name, False, rounding, moments)
    for a, b in zip(got, want):
        apart = a != b
        assert apart.float().mean().item() <= 0.01
        ulp = torch.maximum(a.abs(), b.abs()) * 2.0**-7
        assert bool(((a - b).abs()[apart] <= ulp[apart]).all())
