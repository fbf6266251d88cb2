"""Checkpoint loads refused before anything changes: another number of parameter groups (FOUND_RESUMEAUDIT 1's
counterpart of another number of parameters), and a layerwise checkpoint taken inside an accumulation window loaded
into a plain optimizer (its partial sums would be dropped)."""

from __future__ import annotations

import io

import pytest
import torch

from lowmem import create_optimizer


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _params(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(8, 8, generator=g)) for _ in range(n)]


def _step(opt, params):
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad()


def test_another_number_of_parameter_groups_names_both_counts_and_changes_nothing():
    ps = _params()
    opt = create_optimizer([{"params": ps[:2]}, {"params": ps[2:]}], "adamw")
    _step(opt, ps)
    sd = _roundtrip(opt.state_dict())
    qs = _params()
    topt = create_optimizer(qs, "adamw")
    _step(topt, qs)
    before = {k: v.clone() for k, v in topt.state[qs[0]].items()}
    groups = topt.param_groups
    with pytest.raises(ValueError, match=r"optimizer 'adamw': the checkpoint has 2 parameter groups, this optimizer 1"):
        topt.load_state_dict(sd)
    assert topt.param_groups is groups
    assert all(torch.equal(topt.state[qs[0]][k], v) for k, v in before.items())
