"""Lion's multi-tensor direction on the CPU reads ``beta1`` / ``beta2`` from 0-d tensors (``subset_norm.cpu_scalar``):
made by a step and kept, or, under the measurement's tracker (a dispatch mode), made anew beside the directions. The
estimate counts them (``estimate._foreach_scalar_bytes``): the measured step transient equals it (before: 8 B over)."""

from __future__ import annotations

import pytest
import torch

from lowmem.memory.estimate import _foreach_scalar_bytes
from lowmem.memory.measure import measure_memory
from lowmem.optim import create_optimizer


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lion_measured_transient_equals_the_estimate(dtype):
    """The tiny Llama, one step on the CPU: fp32 332,296 B measured and estimated (332,288 + the two betas' 4 B each),
    bf16 (float32 momenta: the float32 copies' step) 664,584; MemTracker's counts, machine-independent."""
    got = measure_memory("tiny", optimizer="lion", steps=1, seq_len=8, dtype=dtype, device="cpu")
    assert got.measured["optimizer_transient"] == got.estimate.optimizer_transient
    assert got.estimate.details["optimizer_foreach_scalars"] == 8  # (beta1 and beta2, float32)


def test_scalar_bytes_by_value_dtype_and_path():
    """4 B per distinct (beta, dtype) over the CPU parameters on the multi-tensor path: a group with other betas 8
    more; bfloat16 momenta the float32 copies' (8 B); float64 (the per-parameter step), ``foreach=False`` (the per-parameter step: Python numbers) none; AdamW none."""
    ps = [torch.nn.Parameter(torch.zeros(4, 4)) for _ in range(3)]
    opt = create_optimizer([{"params": ps[:2]}, {"params": ps[2:], "betas": (0.95, 0.98)}], "lion")
    opt.materialize_state()
    assert _foreach_scalar_bytes(opt) == 16
    opt = create_optimizer(ps, "lion", betas=(0.9, 0.9))
    opt.materialize_state()
    assert _foreach_scalar_bytes(opt) == 4  # (one value: one tensor)
    p16 = [torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))]
    opt = create_optimizer(p16, "lion", state_dtype="param")  # (bfloat16 momenta: their float32 copies' betas)
    opt.materialize_state()
    assert opt.state[p16[0]]["exp_avg"].dtype == torch.bfloat16 and _foreach_scalar_bytes(opt) == 8
    p64 = [torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))]
    opt = create_optimizer(p64, "lion")  # (float64: the per-parameter step, Python numbers)
    opt.materialize_state()
    assert _foreach_scalar_bytes(opt) == 0
    opt = create_optimizer(ps, "lion", foreach=False)
    opt.materialize_state()
    assert _foreach_scalar_bytes(opt) == 0
    opt = create_optimizer(ps, "adamw")
    opt.materialize_state()
    assert _foreach_scalar_bytes(opt) == 0
