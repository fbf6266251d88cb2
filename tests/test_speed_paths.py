"""Fast paths of the step (issue 15), each tested equal to the reference form it replaces."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.optim.functional import quant as Q


def _probe_values(name: str) -> torch.Tensor:
    """Random values, every code value, every midpoint and its float32 neighbours, 0, -0, tiny,
    subnormal, values above 1 and below -1, infinities and NaN."""
    code = Q.code_map(name)
    mid = (code[1:] + code[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    near = torch.cat([mid, code])
    up, down = torch.nextafter(near, torch.tensor(math.inf)), torch.nextafter(near, torch.tensor(-math.inf))
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, 1e-30, 1e-7, 1.0, -1.0, 1.0000001, 1.5, 2.0, 16.0,
                            -2.0, 1e30, -1e30, 3e38, math.inf, -math.inf, math.nan])
    rand = torch.rand(200_000, generator=g) * 2.2 - 1.1
    fine = torch.linspace(-1.05, 1.05, 100_003)
    vals = torch.cat([rand, fine, near, up, down, special, -near, -up, -down])
    if name == "linear4_nozero":
        vals = torch.cat([vals, rand.abs(), torch.rand(10_000, generator=g) * 1e-6])
    return vals.float()


@pytest.mark.parametrize("name", ["linear4_nozero", "dynamic4_signed"])
def test_fast_nearest_code_equals_the_search(name):
    """Arithmetic (linear map) and cell table (dynamic map) give the search's indices bit for bit:
    ties (values on a midpoint) go to the lower code, NaN to the last, out-of-range values clamp."""
    code = Q.code_map(name)
    x = _probe_values(name)
    ref = Q.nearest_code_search(x, code)
    fast = Q.nearest_code(x, code, name)
    assert fast.dtype == ref.dtype == torch.int32
    assert torch.equal(fast, ref), x[fast != ref][:10]
    mid = (code[1:] + code[:-1]) / 2  # a value on a midpoint takes the lower code
    assert torch.equal(Q.nearest_code(mid, code, name), torch.arange(15, dtype=torch.int32))
    # a 2-d input (rank-1 normalization passes a flat view, but the shape must not matter)
    assert torch.equal(Q.nearest_code(x[:200_000].view(400, 500), code, name), ref[:200_000].view(400, 500))


@pytest.mark.parametrize("name", ["linear4_nozero", "dynamic4_signed"])
def test_fast_4bit_quantizers_equal_the_search(name):
    g = torch.Generator().manual_seed(1)
    code = Q.code_map(name)
    x = torch.randn(4096 * 3 + 77, generator=g) * torch.logspace(-6, 2, 4096 * 3 + 77)
    if name == "linear4_nozero":
        x = x.abs()
        x[::97] = 0.0
    fast = Q.quantize_blockwise_4bit(x, code, 128, name)
    ref = Q.quantize_blockwise_4bit(x, code, 128)
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    if name == "linear4_nozero":
        m = x[: 64 * 192].view(64, 192)
        assert all(torch.equal(a, b) for a, b in zip(Q.quantize_rank1_4bit(m, code, None, name), Q.quantize_rank1_4bit(m, code)))

