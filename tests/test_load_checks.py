"""load_state_dict of an engine optimizer checks what it loads (no silent fallback): a checkpoint of
another optimizer, or of settings that give the state another layout, is a ValueError naming the
parameter group or parameter and the entry, and the optimizer keeps its own groups and state; a
checkpoint that lacks one of this optimizer's settings (it predates the setting) keeps the
constructor's value. (FSDP2 shards: tests/test_fsdp_adam_mini_reshard.py.)"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lowmem.optim import create_optimizer


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 64))


def _stepped(model, name, **hp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer(model, name, **hp)
    model(torch.randn(3, 128)).sum().backward()
    opt.step()
    return opt


@pytest.mark.parametrize("saved, hp_saved, loading, hp, match", [
    ("adamw", {}, "adafactor", {}, r"settings \['betas'\] this optimizer does not know"),
    ("adamw8bit", {}, "adamw", {}, r"settings \['block_size', 'min_quant_size'\]"),
    ("adamw", {}, "adamw8bit", {}, r"parameter 0 of shape \(128, 128\): loaded state 'exp_avg' is a torch.float32"),
    ("adamw", {}, "galore_adamw", {"rank": 8}, r"loaded state has no 'proj_meta'"),
    ("galore_adamw", {"rank": 8}, "galore_adamw", {"rank": 16}, r"rank=8 \(this optimizer: 16\)"),
    ("adam_mini", {}, "adamw", {}, r"\['block', 'head_dim'\]"),
])
def test_another_optimizers_or_layouts_checkpoint_refuses(saved, hp_saved, loading, hp, match):
    model = _model()
    sd = _stepped(model, saved, **hp_saved).state_dict()
    opt = _stepped(model, loading, **hp)
    groups = [dict(g) for g in opt.param_groups]
    state = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    # the optimizer is as it was, and still steps
    assert [dict(g) for g in opt.param_groups] == groups
    assert all(torch.equal(opt.state[p][k], v) for p, s in state.items() for k, v in s.items())
    model(torch.randn(3, 128)).sum().backward()
    opt.step()


@pytest.mark.parametrize("name, hp", [("adamw", {}), ("adamw8bit", {}), ("galore_adamw", {"rank": 8}),
                                      ("apollo_adamw", {"rank": 8}), ("microadam", {}), ("adafactor", {})])
def test_own_checkpoint_loads_and_continues_exactly(name, hp):
    model = _model()
    opt = _stepped(model, name, **hp)
    sd = opt.state_dict()
    twin = _model()
    twin.load_state_dict(model.state_dict())
    other = _stepped(twin, name, **hp)  # (its own first step, then the checkpoint replaces its state)
    twin.load_state_dict(model.state_dict())
    other.load_state_dict(sd)
    x = torch.randn(3, 128)
    for m, o in ((model, opt), (twin, other)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_a_setting_the_checkpoint_predates_keeps_the_constructors_value():
    model = _model()
    sd = _stepped(model, "adamw8bit").state_dict()
    for g in sd["param_groups"]:
        del g["fused"]  # (written before adamw8bit had the setting)
    opt = _stepped(model, "adamw8bit", fused=False)
    opt.load_state_dict(sd)
    assert all(g["fused"] is False for g in opt.param_groups)


@pytest.mark.parametrize("name,proj_type", [("galore_adamw", "left"), ("galore_adamw", "full"), ("fira_adamw", "right")])
def test_loaded_bases_take_the_allocated_layout_and_resume_bit_for_bit(name, proj_type):
    """A checkpoint whose bases are row-major (a distributed checkpoint loads contiguous tensors; so did lowmem before
    bases were stored column by column) loads into the layout the optimizer allocates (column-major,
    galore.basis_zeros), so the resumed run takes the same GEMM kernels and bits as the uninterrupted one on any BLAS
    (an AMD EPYC's MKL rounds the two layouts differently: tests/test_subspace.py)."""
    import torch
    from torch import nn

    from lowmem.optim import create_optimizer

    torch.manual_seed(0)
    w0 = torch.randn(40, 24)
    gs = [torch.randn(40, 24) for _ in range(6)]

    def run(steps, p, opt):
        for g in steps:
            p.grad = g.clone()
            opt.step()

    p = nn.Parameter(w0.clone())
    opt = create_optimizer([p], name, rank=6, update_proj_gap=4, proj_type=proj_type, lr=1e-2)
    run(gs, p, opt)

    q = nn.Parameter(w0.clone())
    first = create_optimizer([q], name, rank=6, update_proj_gap=4, proj_type=proj_type, lr=1e-2)
    run(gs[:2], q, first)
    saved = first.state_dict()
    layouts = {k: v.stride() for k, v in saved["state"][0].items() if k.startswith("proj_")}
    saved["state"][0] = {k: v.contiguous() for k, v in saved["state"][0].items()}  # as a DCP load gives them
    resumed = create_optimizer([q], name, rank=6, update_proj_gap=4, proj_type=proj_type, lr=1e-2)
    resumed.load_state_dict(saved)
    assert {k: resumed.state[q][k].stride() for k in layouts} == layouts
    run(gs[2:], q, resumed)
    assert torch.equal(p, q)
    for k, v in opt.state[p].items():
        assert torch.equal(v, resumed.state[q][k]), k
