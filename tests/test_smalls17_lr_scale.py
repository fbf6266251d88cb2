"""timm's ``lr_scale`` (``param_groups_layer_decay`` writes it into groups; only timm's schedulers read it, writing
``lr = schedule * lr_scale``): the engine steps with ``lr`` alone, so a group carrying it is refused the same way when
given to the constructor / ``create_optimizer`` and when written into ``param_groups`` later (at the next step,
before anything is stepped), with an error naming it and what to do instead (``hparams.PEER_NO_OPS``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.optim import AdamW, create_optimizer

HINT = r"'lr_scale' -> nothing \(timm's setting; lowmem's step reads only lr.*give the group lr \* lr_scale as its lr"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))


def _backward(m):
    m(torch.randn(4, 6)).square().sum().backward()


@pytest.mark.parametrize("name, extra", [("adamw", {}), ("fira_adamw", {"rank": 2})])
def test_lr_scale_refused_at_construction(name, extra):
    m = _model()
    groups = [{"params": list(m[0].parameters()), "lr_scale": 0.5, **extra},  # (timm's layer-decay group shape)
              {"params": list(m[1].parameters()), "lr_scale": 1.0, **extra}]
    with pytest.raises(ValueError, match=HINT):
        create_optimizer(groups, name, lr=1e-2)
    with pytest.raises(ValueError, match=HINT):
        AdamW([{"params": list(m.parameters()), "lr_scale": 0.5}], lr=1e-2)


@pytest.mark.parametrize("name, extra", [("adamw", {}), ("fira_adamw", {"rank": 2})])
def test_lr_scale_written_later_refused_before_anything_steps(name, extra):
    m = _model()
    opt = create_optimizer(m, name, lr=1e-2, **extra)
    _backward(m)
    opt.step()
    before = [p.detach().clone() for p in m.parameters()]
    opt.param_groups[0]["lr_scale"] = 0.5
    with pytest.raises(ValueError, match=r"\['lr_scale'\] written in parameter group 0 .*after construction.*" + HINT):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
    del opt.param_groups[0]["lr_scale"]  # removed: the step runs
    opt.step()
    assert not all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
