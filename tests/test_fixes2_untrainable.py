"""FIXES2 (FOUND_USERFIX F4): an optimizer built before peft froze its parameters trains nothing; its step is refused
(engine and LayerwiseOptimizer), naming the count and the fix. A step with a gradient is never refused."""

import pytest
import torch
from torch import nn


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)


def _peft_after(opt_of):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = _Net()
    opt = opt_of(net)  # built first: on the base weights
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["lin"], lora_dropout=0.0))  # freezes them
    model(torch.randn(4, 8)).pow(2).sum().backward()  # the adapter's weights get gradients, the optimizer's none
    return opt


def test_engine_step_built_before_peft_is_refused():
    from lowmem.optim import create_optimizer

    opt = _peft_after(lambda net: create_optimizer(net, "adamw", lr=1e-3))
    with pytest.raises(ValueError, match=r"none of its 2 parameter\(s\) requires grad .*get_peft_model"):
        opt.step()


def test_layerwise_step_built_before_peft_is_refused():
    from lowmem.optim.layerwise import LayerwiseOptimizer

    opt = _peft_after(lambda net: LayerwiseOptimizer(net, "adamw", lr=1e-3))
    with pytest.raises(ValueError, match=r"LayerwiseOptimizer.*none of its 2 parameter\(s\) requires grad"):
        opt.step()


def test_a_step_without_gradients_is_not_refused_while_one_parameter_requires_grad():
    from lowmem.optim import create_optimizer
    from lowmem.optim.layerwise import LayerwiseOptimizer

    net = _Net()
    for opt in (create_optimizer(net, "adamw"), LayerwiseOptimizer(net, "adamw")):
        net.lin.bias.requires_grad_(False)
        opt.step()  # (the weight still requires grad: nothing to step this time, no error)
        net.lin.bias.requires_grad_(True)


def test_frozen_parameter_with_a_gradient_is_stepped():
    from lowmem.optim import create_optimizer

    net = _Net()
    opt = create_optimizer(net, "adamw", lr=0.1)
    for p in net.parameters():
        p.requires_grad_(False)
    net.lin.weight.grad = torch.ones_like(net.lin.weight)
    before = net.lin.weight.clone()
    opt.step()  # torch's rule: a gradient is stepped, whatever requires_grad says
    assert not torch.equal(before, net.lin.weight)
