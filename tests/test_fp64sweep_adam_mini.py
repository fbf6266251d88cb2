"""FP64SWEEP: Adam-mini's ``step_transient_bytes(per_parameter=True)`` equals the traced step of a float64 parameter
for every block kind (row, element, head, tensor; a vector in a tensor block), every state dtype (float32 and
bfloat16 moments beside the float64 gradient: its ``g.to(m.dtype)`` copies; float64 moments, ``state_dtype="param"``)
and chunked or whole. (Before 2026-11-30 a float64 gradient's copies beside float32 moments were uncounted: a
64 x 24 weight's chunk of 600, 2,408 B reported, 4,804 traced.)"""

from __future__ import annotations

import pytest
import torch
from test_muonfix_sweep import _RealLive

from lowmem.optim import create_optimizer

_BLOCKS = [("row", (64, 24)), ("element", (64, 24)), ("head", (64, 24)), ("tensor", (64, 24)), ("tensor", (48,))]


@pytest.mark.parametrize("chunk", [None, 96, 600])
@pytest.mark.parametrize("state", ["float32", "param", "bfloat16"])
def test_adam_mini_float64_transient_is_the_traced_step(state, chunk):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=torch.float64)) for _, shape in _BLOCKS]
    groups = [{"params": [p], "block": block, **({"head_dim": 16} if block == "head" else {})}
              for p, (block, _) in zip(params, _BLOCKS)]
    opt = create_optimizer(groups, "adam_mini", lr=1e-3, state_dtype=state, foreach=False)
    opt.chunk_numel = chunk
    rows = []
    for group in opt.param_groups:
        p = group["params"][0]
        peak = 0
        for step in range(3):
            grad = torch.randn(p.shape, dtype=torch.float64)
            with _RealLive() as t:
                opt.step_param(p, grad)
            if step:
                peak = max(peak, t.peak)
        rows.append((group["block"], tuple(p.shape), opt._param_transient_bytes(p, group, opt.state[p]), peak))
    assert all(peak > 0 for *_, peak in rows)
    assert [r[2] for r in rows] == [r[3] for r in rows], rows
