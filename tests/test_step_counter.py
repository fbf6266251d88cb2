"""The engine's step counter (engine._advance_step): ``fill_(item() + 1)`` instead of ``step += 1``
(no Python ``1`` turned into a tensor at every parameter's step), with the same values as the in-place
add, in every dtype a loaded checkpoint may hold, including where float32 stops counting (2^24)."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim.engine import _advance_step
from lowmem.optim.registry import create_optimizer

VALUES = [0, 1, 7, 2**11 - 1, 2**11, 2**24 - 2, 2**24 - 1, 2**24, 2**24 + 2, 2**25 + 4, 2**53 - 1, 2**53, 0.1, 2.5, -3]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_advance_step_equals_the_in_place_add(dtype):
    for v in VALUES:
        if not dtype.is_floating_point and not float(v).is_integer():
            continue
        if dtype == torch.int32 and abs(v) >= 2**31 - 1:
            continue
        old, new = torch.tensor(v, dtype=dtype), torch.tensor(v, dtype=dtype)
        old += 1
        expected = old.item()
        t = _advance_step(new)
        assert new.dtype == dtype and torch.equal(new, old), (dtype, v, new, old)
        assert t == expected and type(t) is type(expected), (dtype, v, t, expected)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("name,hp", [("adamw", {}), ("galore_adamw", {"rank": 2})])
def test_step_counter_values_through_the_optimizer(name, hp, foreach):
    """float32 counters stop at 2^24 (2^24 + 1 rounds to even), as ``+= 1`` did; each of the engine's
    step paths (foreach buckets, projected buckets, per-parameter) reads the rounded value (the bias
    correction of 2^24, not 2^24 + 1: equal to the weights of the same step taken from 2^24 - 1 + 1)."""
    def run(start):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(6, 8))
        opt = create_optimizer([p], name, foreach=foreach, **hp)
        p.grad = torch.randn(6, 8)
        opt.step()
        opt.state[p]["step"].fill_(start)
        p.grad = torch.randn(6, 8)
        opt.step()
        return p.detach().clone(), opt.state[p]["step"]

    at_limit, step = run(2**24)
    assert step.dtype == torch.float32 and step.item() == 2**24
    below, step = run(2**24 - 1)
    assert step.item() == 2**24 and torch.equal(at_limit, below)
