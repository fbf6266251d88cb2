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


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_layerwise_nan_stops_the_rest_of_the_step_and_says_how_many_were_stepped():
    """Parameters are stepped in the hooks as gradients arrive (last layer first): once a
    non-finite gradient arrives no further parameter is stepped in that step, and the warning
    says how many were already stepped (they cannot be undone). The next step is normal."""
    model = _mlp()
    opt = LayerwiseOptimizer(model, "adamw", lr=1e-2)
    first = model[0].weight
    first.register_hook(lambda g: torch.full_like(g, float("nan")))  # the first layer's weight: late in backward
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(5, 4)
    with pytest.warns(UserWarning, match=r"non-finite gradient.*\b(\d+) parameter\(s\) already stepped") as rec:
        model(x).sum().backward()
        opt.step()
    msg = str(next(w.message for w in rec if "non-finite" in str(w.message)))
    stepped = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert f"{len(stepped)} parameter(s) already stepped" in msg
    assert "0.weight" not in stepped and not opt.state[first]
    assert len(stepped) < 4 and sum(bool(opt.state[p]) for p in model.parameters()) == len(stepped)
    assert opt.inner.skipped_steps == 1 and all(p.grad is None for p in model.parameters())
    # the following step (finite again once the hook is gone) steps everything
    model2 = _mlp()
    opt2 = LayerwiseOptimizer(model2, "adamw", lr=1e-2)
    before = {n: p.detach().clone() for n, p in model2.named_parameters()}
    model2(x).sum().backward()
    opt2.step()
    assert all(not torch.equal(p, before[n]) for n, p in model2.named_parameters())


def test_layerwise_nan_flag_resets_without_step_calls():
    """A loop that never calls step() (accumulation_steps=1): a parameter's next gradient starts a
    new step, so one NaN does not freeze training."""
    model = _mlp()
    opt = LayerwiseOptimizer(model, "adamw", lr=1e-2)
    x = torch.randn(5, 4)
    with pytest.warns(UserWarning, match="non-finite.*already stepped"):
        model(torch.full_like(x, float("nan"))).sum().backward()  # every gradient NaN but the last bias
    assert sum(bool(opt.state[p]) for p in model.parameters()) <= 1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x).sum().backward()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
