"""functional.adam's CPU multi-tensor mul / div take their scalar as a 0-d tensor (FOUND_BENCHFIX 1,
``functional.subset_norm.foreach_scalar``): torch's CPU ``_foreach_mul_(xs, number)`` wraps the number in a new
tensor for each tensor. The results equal the Python-number form bit for bit; half-precision lists (and the
CUDA / meta path) keep the number."""

from __future__ import annotations

import pytest
import torch

import lowmem.optim.functional.adam as FA


def _lists(seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 48), (48,), (3, 5, 7), (1,), (257,)]
    return [torch.randn(s, generator=gen).mul_(10.0 ** (i - 2)).to(dtype) for i, s in enumerate(shapes)]


def _run(dtype: torch.dtype) -> list[torch.Tensor]:
    """Every multi-tensor function of functional.adam with a scalar mul / div, on copies of the same lists."""
    ps, gs, ms = _lists(1, dtype), _lists(2, dtype), _lists(3, dtype)
    vs = [x.abs() for x in _lists(4, dtype)]
    out = []
    for eps_placement in ("torch", "hf"):
        p, m, v = [x.clone() for x in ps], [x.clone() for x in ms], [x.clone() for x in vs]
        FA._adamw_operations_(p, gs, m, v, 3.0, 0.9, 0.999, 1e-2, 0.1, 1e-8, eps_placement, 7e-3)
        out += p + m + v
        out += FA.adam_direction_foreach(m, v, 3.0, 0.9, 0.999, 1e-8, eps_placement=eps_placement)
    m, v = [x.clone() for x in ms], [x.clone() for x in vs]
    FA.adam_moments_foreach_(m, v, gs, 0.9, 0.999)
    out += m + v
    if dtype != torch.float64 or FA.fused_device(torch.device("cpu")):  # (the decay before torch's fused kernel)
        p, m, v = [x.clone() for x in ps], [x.clone() for x in ms], [x.clone() for x in vs]
        FA.adamw_fused_(p, gs, m, v, 3.0, 0.9, 0.999, 1e-2, 0.1, 1e-8, step_lr=7e-3)
        out += p + m + v
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_scalars_are_tensors_and_equal_the_number_form(dtype, monkeypatch):
    seen = []
    for name in ("_foreach_mul_", "_foreach_div_"):
        real = getattr(torch, name)

        def wrapped(xs, other, _real=real):
            if not isinstance(other, (list, tuple)):
                seen.append(type(other).__name__)
            return _real(xs, other)

        monkeypatch.setattr(torch, name, wrapped)
    got = _run(dtype)
    assert len(seen) >= 9 and set(seen) == ({"float"} if dtype == torch.bfloat16 else {"Tensor"}), seen
    monkeypatch.setattr(FA, "foreach_scalar", lambda xs, value: value)  # (the form before: the Python number)
    ref = _run(dtype)
    assert len(got) == len(ref)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, ref))
    assert not all(torch.equal(a, b) for a, b in zip(got[:5], _lists(1, dtype)))  # (the steps changed the params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamw_decay_after_the_update_takes_a_tensor_and_equals_the_number_form(dtype, monkeypatch):
    """``AdamMoments(eps_placement="hf")``'s decay after the update (``foreach_step_`` and the launch of
    ``foreach_prepare``): a 0-d tensor on the CPU, equal to the Python-number form bit for bit."""
    from lowmem.optim import moments

    rule = moments.AdamMoments(eps_placement="hf")
    group = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    seen = []
    real = torch._foreach_mul_

    def mul(xs, other):
        seen.append(type(other).__name__)
        return real(xs, other)

    def run():
        out = []
        for prepared in (False, True):
            ps, gs = _lists(1, dtype), _lists(2, dtype)
            ss = [dict(exp_avg=m, exp_avg_sq=v.abs()) for m, v in zip(_lists(3, dtype), _lists(4, dtype))]
            if prepared:
                rule.foreach_prepare(ps, gs, ss, group, 3.0, 1e-2)()
            else:
                rule.foreach_step_(ps, gs, ss, group, 3.0, 1e-2)
            out += ps
        return out

    monkeypatch.setattr(torch, "_foreach_mul_", mul)
    got = run()
    assert seen.count("Tensor") >= 2 and "float" not in seen, seen
    monkeypatch.setattr(moments, "foreach_scalar", lambda xs, value: value)
    ref = run()
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert not all(torch.equal(a, b) for a, b in zip(got[:5], _lists(1, dtype)))
