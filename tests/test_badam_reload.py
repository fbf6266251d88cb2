"""A fresh BAdam loads the state_dict of a BAdam on the same model (issue 15 session, task 3): the first one
froze its inactive blocks, so a second ``create_optimizer(model, "badam")`` used to see only the active
block's parameters as trainable, build fewer parameter groups and fail in torch's load ("different number
of parameter groups"). A count that still differs is refused naming both and what to do."""

from __future__ import annotations

import io

import pytest
import torch

from lowmem.kit.model import build_tiny_model
from lowmem.optim import create_optimizer


def _trained():
    model, _ = build_tiny_model()
    opt = create_optimizer(model, "badam", lr=1e-2, switch_every=2, switch_mode="ascending")
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # a switch, then one step into the second block
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt, x


def test_a_fresh_badam_on_the_same_model_loads_and_continues_exactly():
    model, opt, x = _trained()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen  # the inactive blocks
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # (a checkpoint: state_dict() holds the live tensors)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = create_optimizer(model, "badam", lr=1e-2, switch_every=2, switch_mode="ascending")
    assert len(fresh.param_groups) == len(opt.param_groups)
    fresh.load_state_dict(sd)
    assert fresh.active_block == opt.active_block and (fresh._period, fresh._steps) == (opt._period, opt._steps)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == frozen
    for g, h in zip(opt.param_groups, fresh.param_groups):
        for p, q in zip(g["params"], h["params"]):
            assert p is q and opt.state[p].keys() == fresh.state[q].keys()
            assert all(torch.equal(opt.state[p][k], fresh.state[q][k]) for k in opt.state[p])
    # the next steps: the fresh optimizer's on a copy of the weights equal the original's
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    fresh.load_state_dict(sd)  # (again: the same start as the original's two steps)
    for _ in range(2):
        model(x, labels=x).loss.backward()
        fresh.step()
        fresh.zero_grad()
    assert all(torch.equal(after[n], p) for n, p in model.named_parameters())


def test_another_number_of_groups_is_refused_naming_what_to_do():
    model, opt, _ = _trained()
    sd = opt.state_dict()
    one = create_optimizer(list(model.parameters()), "badam", lr=1e-2)  # a single group, block 0
    with pytest.raises(ValueError, match=r"badam: the state dict has 4 parameter groups \(blocks \[0, 1\]\), this "
                                         r"optimizer 1 \(blocks \[0\]\).*create_optimizer\(model, 'badam'"):
        one.load_state_dict(sd)
