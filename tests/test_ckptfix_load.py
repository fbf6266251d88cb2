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
    with pytest.raises(ValueError, match=r"optimizer 'adamw': another number of parameter groups: the checkpoint has 2,"
                                         r" this optimizer 1"):
        topt.load_state_dict(sd)
    assert topt.param_groups is groups
    assert all(torch.equal(topt.state[qs[0]][k], v) for k, v in before.items())


def _layerwise_checkpoint(name, inside_window, **hp):
    from lowmem.kit import build_tiny_model
    from lowmem.optim.layerwise import LayerwiseOptimizer

    torch.manual_seed(0)
    model = build_tiny_model(0)[0]
    opt = LayerwiseOptimizer(model, name, accumulation_steps=2, **hp)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3 if inside_window else 2):  # one whole step, then (inside) the next window's first micro-batch
        model(input_ids=ids, labels=ids).loss.backward()
    if not inside_window:
        opt.step()
    return model, opt, _roundtrip(opt.state_dict())


@pytest.mark.parametrize("name, hp, low", [("adamw", {}, False), ("galore_adamw", dict(rank=4, update_proj_gap=2), True)])
def test_a_layerwise_checkpoint_inside_a_window_is_refused_by_a_plain_optimizer(name, hp, low):
    model, _, sd = _layerwise_checkpoint(name, True, **hp)
    assert sd["layerwise"]["micro"].sum() > 0 and bool(sd["layerwise"].get("low")) == low
    plain = create_optimizer(model, name, **hp)
    groups = plain.param_groups
    with pytest.raises(ValueError, match=rf"optimizer '{name}': the checkpoint was saved by a LayerwiseOptimizer inside a"
                                         r" gradient accumulation window .*Load it into a LayerwiseOptimizer"):
        plain.load_state_dict(sd)
    assert plain.param_groups is groups and not plain.state


def test_layerwise_and_plain_checkpoints_at_a_window_boundary_load_both_ways():
    from lowmem.optim.layerwise import LayerwiseOptimizer

    model, lw, sd = _layerwise_checkpoint("adamw", False)
    assert sd["layerwise"]["micro"].sum() == 0
    plain = create_optimizer(model, "adamw")
    plain.load_state_dict(sd)  # between windows: nothing to drop
    got = plain.state_dict()["state"]
    assert got.keys() == sd["state"].keys() and all(torch.equal(got[i][k], v) for i in got for k, v in sd["state"][i].items())
    back = LayerwiseOptimizer(model, "adamw", accumulation_steps=2)  # a plain checkpoint into layerwise: no window
    back.load_state_dict(_roundtrip(plain.state_dict()))
    again = back.state_dict()
    assert again["layerwise"]["micro"].sum() == 0 and "low" not in again["layerwise"]
    assert all(torch.equal(again["state"][i][k], v) for i in got for k, v in got[i].items())
