"""APOLLO refuses Q-GaLore's lazy refresh by name, saying which recipes take it (FOUND_LAZYPROJ 1): not the generic
unknown-key error."""
import pytest
import torch
from torch import nn

from lowmem.optim import create_optimizer


@pytest.mark.parametrize("name", ["apollo_adamw", "apollo_mini"])
def test_apollo_refuses_lazy_refresh_naming_the_recipes(name):
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    with pytest.raises(ValueError, match=r"lazy_refresh_threshold.*not supported by APOLLO.*galore_adamw"):
        create_optimizer(model, name, rank=4, lazy_refresh_threshold=0.4)
    opt = create_optimizer(model, name, rank=4)  # off (None): accepted, steps as before
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
