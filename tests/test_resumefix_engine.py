"""RESUMEFIX: the engine's refusal of another optimizer's checkpoint (AUDIT-RESUME18 1, its engine-level note): a plain
torch.optim.RAdam checkpoint (Adam's state entries, weight_decay 0 so no flag check applies) into lowmem's adamw."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import create_optimizer
from toy_problem import loss_fn, make_problem


def _torch_checkpoint(cls):
    torch.manual_seed(0)
    model, x, y = make_problem(0)
    opt = cls(model.parameters(), lr=1e-2)
    loss_fn(model, x, y).backward()
    opt.step()
    return model, opt.state_dict()


def test_torch_radam_checkpoint_refused_by_adamw():
    model, sd = _torch_checkpoint(torch.optim.RAdam)
    with pytest.raises(ValueError, match=r"another optimizer.*torch\.optim\.RAdam"):
        create_optimizer(list(model.parameters()), "adamw", weight_decay=0.0).load_state_dict(sd)


def test_torch_adamw_checkpoint_still_loads_into_adamw():
    """The control: torch's AdamW (amsgrad False, weight_decay 0.01 as lowmem's default) loads."""
    model, sd = _torch_checkpoint(torch.optim.AdamW)
    opt = create_optimizer(list(model.parameters()), "adamw", weight_decay=0.01)
    opt.load_state_dict(sd)
    assert opt.state_dict()["lowmem_optimizer"] == "adamw"
