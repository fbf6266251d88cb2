"""Layerwise mode re-checks ``bf16_stochastic_round`` / ``kahan_summation`` after a dtype change, as ``step()`` does:
``model.to(torch.float32)`` after construction leaves a group with no bfloat16 parameter, and the hook path refuses
it with the plain step's error, before any parameter is stepped (LayerwiseOptimizer._check_rounding)."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.layerwise import LayerwiseOptimizer


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2)).to(torch.bfloat16)


def _error(layerwise, option, first_step):
    """The error of a step after ``model.to(torch.float32)`` (``first_step``: one bfloat16 step before it), and
    whether the weights stayed as they were."""
    model = _model()
    kw = {option: True, "lr": 1e-2}
    opt = LayerwiseOptimizer(model, "adamw", **kw) if layerwise else create_optimizer(model, "adamw", **kw)
    x = torch.randn(4, 8)
    if first_step:
        model(x.bfloat16()).sum().backward()
        opt.step()
        opt.zero_grad()
    model.to(torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError) as e:
        model(x).sum().backward()
        opt.step()
    return str(e.value), all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("first_step", [False, True])
@pytest.mark.parametrize("option", ["bf16_stochastic_round", "kahan_summation"])
def test_layerwise_refuses_like_step_after_a_dtype_change(option, first_step):
    plain, _ = _error(False, option, first_step)
    hooked, unchanged = _error(True, option, first_step)
    assert hooked == plain
    assert f"{option}=True rounds updates into bfloat16 parameters, and this group has none" in hooked
    assert "parameter group 0 of optimizer 'adamw'" in hooked and "float32" in hooked
    assert unchanged


def test_layerwise_keeps_stepping_bfloat16_weights_with_the_option():
    """Still bfloat16 (the check finds nothing changed): layerwise steps as before, and equals the plain step
    (stochastic rounding: the same bits for the same parameter and step)."""
    x = torch.randn(4, 8).bfloat16()
    finals = []
    for layerwise in (False, True):
        model = _model()
        kw = {"bf16_stochastic_round": True, "lr": 1e-2}
        opt = LayerwiseOptimizer(model, "adamw", **kw) if layerwise else create_optimizer(model, "adamw", **kw)
        for _ in range(3):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))
    assert not torch.equal(finals[1][0], _model()[0].weight)
