"""Layerwise mode over the whole registry: for every engine optimizer, stepping each parameter from
its gradient hook (``LayerwiseOptimizer``, gradients freed at once) gives the same weights as the
ordinary ``step()`` on the same batches. A recipe that cannot run layerwise must say so clearly."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lowmem.optim import create_optimizer, optimizer_entries
from lowmem.optim.layerwise import LayerwiseOptimizer
from toy_problem import hparams_for, loss_fn, make_problem

ENGINE = [e.name for e in optimizer_entries() if e.recipe is not None and e.generic_tests]


@pytest.mark.parametrize("name", ENGINE)
def test_layerwise_equals_plain_step(name):
    model, x, y = make_problem()
    twin = copy.deepcopy(model)
    hp = hparams_for(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = create_optimizer(model, name, **hp)
        layerwise = LayerwiseOptimizer(twin, name, **hp)
        for _ in range(4):
            plain.zero_grad(set_to_none=True)
            loss_fn(model, x, y).backward()
            plain.step()
            loss_fn(twin, x, y).backward()
            assert all(p.grad is None for p in twin.parameters()), "a gradient outlived its hook"
            layerwise.step()
    layerwise.remove_hooks()
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {n}: {m}")
