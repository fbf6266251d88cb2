"""``bf16_stochastic_round`` / ``kahan_summation`` and float16 weights: lowmem rounds into bfloat16 only, so a float16
weight's write-back would round to nearest whatever the option says. Refused, naming float16 (group_layout.
check_rounding): a group of float16 weights, a group of bfloat16 and float16 ones (before: the float16 ones were
silently left at round-to-nearest), and a model turned into float16 after construction, at the next step (plain and
layerwise). bfloat16 beside float32 (e.g. float32 norms) stays accepted: a float32 write-back rounds nothing away
that a bfloat16 one would."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.layerwise import LayerwiseOptimizer

OPTIONS = ["bf16_stochastic_round", "kahan_summation"]


def _params(*dtypes):
    return [torch.nn.Parameter(torch.zeros(3, 2, dtype=d)) for d in dtypes]


@pytest.mark.parametrize("option", OPTIONS)
def test_float16_group_is_refused_naming_the_dtype(option):
    with pytest.raises(ValueError, match=rf"{option}=True rounds updates into bfloat16 parameters, and this group has"
                                         r" none \(its parameters: float16\); float16 weights are not rounded by it"):
        create_optimizer(_params(torch.float16, torch.float16), "adamw", **{option: True})


@pytest.mark.parametrize("option", OPTIONS)
def test_float16_beside_bfloat16_is_refused_naming_them(option):
    with pytest.raises(ValueError, match=rf"{option}=True with float16 parameters \(1 of the group's 3, e.g. one of"
                                         r" shape \(3, 2\)\): lowmem rounds into bfloat16 only"):
        create_optimizer(_params(torch.bfloat16, torch.float16, torch.float32), "adamw", **{option: True})
    # in a group of their own without the option: accepted (the bfloat16 ones rounded, the float16 ones to nearest)
    bf, half = _params(torch.bfloat16, torch.float16)
    create_optimizer([{"params": [bf], option: True}, {"params": [half]}], "adamw")
    create_optimizer(_params(torch.bfloat16, torch.float32), "adamw", **{option: True})


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("option", OPTIONS)
def test_model_half_after_construction_is_refused_at_the_step(option, layerwise):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)).to(torch.bfloat16)
    kw = {option: True, "lr": 1e-2}
    opt = LayerwiseOptimizer(model, "adamw", **kw) if layerwise else create_optimizer(model, "adamw", **kw)
    model.half()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"\(its parameters: float16\); float16 weights are not rounded by it"):
        model(torch.randn(2, 4).half()).sum().backward()
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
