"""FP64SWEEP: the stabilizers' chunk counts with a float64 gradient, against traced steps.

SPAM (:meth:`~lowmem.optim.stabilizers.SPAMStabilizer.transient_bytes`): ``g^2``, ``sign(g)``, ``sign(g) bound``
and the result in the gradient's dtype, and the second moment's float32 copy (``v.float()``) when it is not
float32: a parameter's chunked step equals the trace for float32 / bfloat16 / float64 parameters with float32,
``"param"`` and bfloat16 moments. Stable-SPAM
(:meth:`~lowmem.optim.stabilizers.StableSPAMStabilizer.chunk_bytes`): its prepare and a chunk's AdaClip traced
alone (the engine's phase beside the rule counts the stabilized chunk, FOUND_FP64SWEEP 2)."""

from __future__ import annotations

import pytest
import torch
from test_muonfix_sweep import _RealLive

from lowmem.optim import create_optimizer


@pytest.mark.parametrize("state", ["float32", "param", "bfloat16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_spam_chunked_transient_is_the_traced_step(dtype, state):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 24, dtype=dtype))
    opt = create_optimizer([p], "spam", lr=1e-3, state_dtype=state, grad_accu_steps=1, foreach=False)
    opt.chunk_numel = 600
    peak = 0
    for step in range(4):
        grad = torch.randn(64, 24).to(dtype)
        with _RealLive() as t:
            opt.step_param(p, grad)
        if step > 1:
            peak = max(peak, t.peak)
    assert peak > 0
    # (torch's fused AdamW kernel's step count, counted kept and new: the trace sees the new one at most)
    reported, steps = opt.step_transient_bytes(per_parameter=True), opt._fused_step_bytes()
    assert reported - 2 * steps <= peak <= reported - steps, (reported, peak, steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_stable_spam_chunk_bytes_is_the_traced_prepare_and_clip(dtype):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 24, dtype=dtype))
    opt = create_optimizer([p], "stable_spam", lr=1e-3, foreach=False)
    opt.chunk_numel = 600
    for _ in range(2):
        opt.step_param(p, torch.randn(64, 24, dtype=dtype))
    stab, group, state = opt.recipe.stabilizers[0], opt.param_groups[0], opt.state[p]
    g = torch.randn(64 * 24, dtype=dtype)
    bounds = [(0, 600), (600, 1200), (1200, 1536)]
    with _RealLive() as t:
        ctx = stab.prepare(g, state, group, 3, opt.recipe.moment, bounds)
        out = stab.transform_chunk(g[0:600], state, group, 3, opt.recipe.moment, ctx)
        del out
    assert stab.chunk_bytes(600, group, bounds, g.device)[0] == t.peak
