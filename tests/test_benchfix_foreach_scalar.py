"""CPU multi-tensor mul / div take their scalar as a 0-d tensor (functional.subset_norm.foreach_scalar): torch's
CPU ``_foreach_mul_(xs, number)`` wraps the number in a new tensor per tensor. The results equal the Python-number
form bit for bit; the CUDA / meta path and half-precision lists keep the number."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import quantized
from lowmem.optim.functional import subset_norm as SN


def _lists(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 48), (48,), (3, 5, 7), (1,), (0,), (257,)]
    return [torch.randn(s, generator=gen).mul_(10.0 ** (i - 3)).to(dtype) for i, s in enumerate(shapes)]


def test_foreach_scalar_kinds():
    xs = _lists(0)
    s = SN.foreach_scalar(xs, 0.999)
    assert isinstance(s, torch.Tensor) and s.dim() == 0 and s.dtype == torch.float32 and s.item() == pytest.approx(0.999)
    assert SN.foreach_scalar(_lists(0, torch.float64), 0.3).dtype == torch.float64
    # half precision (its kernels compute the number in float32), mixed dtypes, meta / CUDA, empty: the number
    assert SN.foreach_scalar(_lists(0, torch.bfloat16), 0.3) == 0.3
    assert SN.foreach_scalar([xs[0], xs[1].double()], 0.3) == 0.3
    assert SN.foreach_scalar([torch.empty(3, device="meta")], 0.3) == 0.3
    assert SN.foreach_scalar([], 0.3) == 0.3


def _record_scalars(monkeypatch):
    """Patch torch._foreach_mul_ / _foreach_div_ to record the type of the scalar each call gets."""
    seen = []
    for name in ("_foreach_mul_", "_foreach_div_"):
        real = getattr(torch, name)

        def wrapped(xs, other, _real=real):
            if not isinstance(other, (list, tuple)):
                seen.append(type(other).__name__)
            return _real(xs, other)
        monkeypatch.setattr(torch, name, wrapped)
    return seen


def _number_form(fn, *args):
    """Run fn with torch's mul / div given the Python number (the form before foreach_scalar)."""
    real = SN.foreach_scalar
    SN.foreach_scalar = lambda xs, v: v
    quantized.foreach_scalar = SN.foreach_scalar
    try:
        return fn(*args)
    finally:
        SN.foreach_scalar = real
        quantized.foreach_scalar = real


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_steps_get_a_tensor_and_equal_the_number_form(monkeypatch, dtype):
    ps, gs, ms, vs = _lists(1, dtype), _lists(2, dtype), _lists(3, dtype), [x.abs() for x in _lists(4, dtype)]
    lr, wd = 3e-3, 0.1

    def run():
        p, m, v = [x.clone() for x in ps], [x.clone() for x in ms], [x.clone() for x in vs]
        d = [x.clone() for x in gs]
        SN.elementwise_foreach_(p, gs, m, v, 3.0, 0.9, 0.999, lr, wd, 1e-8, 0.37)
        SN.sgd_momentum_foreach_(p, gs, m, 0.9, lr, wd)
        den = SN.sn_denominators_foreach_(v, [x * x for x in gs], 0.95, 1e-8, 0.41)
        SN.sm_fold_foreach_(gs, d, 0.43, 0.5)
        quantized.apply_updates_foreach_(p, d, lr, wd, decay_after=False)
        quantized.apply_updates_foreach_(p, d, lr, wd, decay_after=True)
        return p + m + v + list(den) + d

    seen = _record_scalars(monkeypatch)
    got = run()
    assert seen and set(seen) == ({"Tensor"} if dtype != torch.bfloat16 else {"float"})
    ref = _number_form(run)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, ref))
    assert not all(torch.equal(a, b) for a, b in zip(got, ps + ms + vs))  # the steps did change something


def test_subset_step_bit_for_bit():
    ps = [torch.randn(64, 48, generator=torch.Generator().manual_seed(5)), torch.randn(40, 96)]
    gs = [torch.randn_like(p) for p in ps]
    vs = [torch.zeros(64, 1), torch.zeros(1, 96)]

    def run():
        p, v, m = [x.clone() for x in ps], [x.clone() for x in vs], [torch.zeros_like(x) for x in ps]
        SN.subset_foreach_(p, gs, m, v, 2.0, 0.9, 0.999, 1e-2, 0.1, 1e-8, 0.7)
        return p + v + m

    got, ref = run(), _number_form(run)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
