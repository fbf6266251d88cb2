"""AUDITSR: ``step_transient_bytes()`` with ``bf16_stochastic_round`` / ``kahan_summation`` on, against a traced step
(tests/test_muonfix_sweep.py's ``_RealLive``: every dispatched output alive together at most; machine-independent),
on rules, shapes and chunk sizes tests/test_transient_per_parameter.py does not use (odd 2-D, 3-D, 1-D)."""

from __future__ import annotations

import pytest
import torch
from test_muonfix_sweep import _RealLive

from lowmem.optim.registry import create_optimizer

SHAPES = [((37, 53), None), ((37, 53), 600), ((3, 24, 40), 128), ((1000,), 600)]


def _per_param(name, shape, chunk, **hp):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape).to(torch.bfloat16))
    opt = create_optimizer([p], name, **hp)
    opt.chunk_numel = chunk
    for _ in range(2):
        p.grad = torch.randn(shape).to(torch.bfloat16)
        opt.step()
    reported = opt._param_transient_bytes(p, opt.param_groups[0], opt.state[p])
    g = torch.randn(shape).to(torch.bfloat16)
    with _RealLive() as t:
        opt.step_param(p, g)
    return reported, t.peak


@pytest.mark.parametrize("option", ["bf16_stochastic_round", "kahan_summation"])
@pytest.mark.parametrize("name,hp", [("adamw", {}), ("sm3", {}), ("racs", {}), ("adam_mini", {}), ("sinkgd", {}),
                                     ("adamw4bit_rank1", {}), ("scale", {}), ("adalomo", {}), ("adamw_sn", {}),
                                     ("came", {"state_dtype": "bfloat16"})])
def test_rounded_write_back_counted_exactly(name, hp, option):
    """Measured: reported == traced in all 80 cases, and both equal to the option off (the rounding's 3 B per element
    fit in the freed direction's place; the authors' CAME-in-one-block case is where it does not). Mutations
    checked: the write-back rounding with overwrite_src=False (a 4 B int32 work tensor per element) -> red; the
    count taking stochastic_round_bytes(n, overwrite_src=False) -> red."""
    for shape, chunk in SHAPES:
        reported, traced = _per_param(name, shape, chunk, **hp, **{option: True})
        assert reported == traced > 0, (shape, chunk, reported, traced)
