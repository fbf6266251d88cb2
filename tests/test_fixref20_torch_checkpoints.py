"""FIXREF20 (AUDREF19 1): torch.optim.SGD(momentum > 0) and torch.optim.Muon checkpoints (``momentum_buffer``, no
``'step'``) load into lowmem's sgd / muon and continue torch's run; every other state without ``'step'`` stays refused.
"""

from __future__ import annotations

import pytest
import torch

import lowmem.optim as LO


def _grads(shapes, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64).float() for s in shapes] for _ in range(steps)]


def _continue(torch_opt, mine, ps, grads):
    """``torch_opt``'s state loaded into ``mine`` (both on ``ps``), then ``grads`` stepped by ``mine``."""
    mine.load_state_dict(torch_opt.state_dict())
    for gl in grads:
        for p, g in zip(ps, gl):
            p.grad = g.clone()
        mine.step()


def _resume(make_torch, make_mine, shapes, steps=6, cut=3):
    """max |p - p_torch| after ``cut`` torch steps + the rest in lowmem, against ``steps`` torch steps; and ``mine``."""
    init = [torch.randn(s, generator=torch.Generator().manual_seed(0)) for s in shapes]
    grads = _grads(shapes, steps)
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make_torch(ref)
    for gl in grads:
        for p, g in zip(ref, gl):
            p.grad = g.clone()
        opt.step()
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make_torch(ps)
    for gl in grads[:cut]:
        for p, g in zip(ps, gl):
            p.grad = g.clone()
        opt.step()
    mine = make_mine(ps)
    _continue(opt, mine, ps, grads[cut:])
    return max((a - b).abs().max().item() for a, b in zip(ps, ref)), mine


@pytest.mark.parametrize("kw", [dict(lr=0.05, momentum=0.9, dampening=0.3),  # (a first step again would not damp)
                                dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1)])
def test_torch_sgd_checkpoint_continues(kw):
    diff, mine = _resume(lambda ps: torch.optim.SGD(ps, **kw), lambda ps: LO.SGD(ps, **kw), [(4, 6), (6,)])
    assert diff < 1e-6
    # the count lowmem keeps starts at 1 on the load (torch keeps none): 1 + the 3 steps since
    assert all(float(s["step"]) == 4.0 for s in mine.state.values())


@pytest.mark.filterwarnings("ignore:eps=")
def test_torch_muon_checkpoint_takes_torch_names():
    """torch's eps is lowmem's ns_eps (lowmem's eps is AdamW's: kept), torch's adjust_lr_fn=None is 'original'."""
    kw = dict(lr=0.02, weight_decay=0.05, momentum=0.9, eps=1e-3)
    diff, mine = _resume(lambda ps: torch.optim.Muon(ps, **kw),
                         lambda ps: LO.Muon(ps, lr=0.02, weight_decay=0.05, momentum=0.9, eps=1e-5), [(6, 4), (3, 5)])
    assert diff < 1e-5
    g = mine.param_groups[0]
    assert (g["ns_eps"], g["eps"], g["adjust_lr_fn"]) == (1e-3, 1e-5, "original")


def test_torch_sgd_checkpoint_leaves_the_callers_dict_alone():
    ps = [torch.nn.Parameter(torch.randn(3, 3))]
    opt = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    ps[0].grad = torch.ones(3, 3)
    opt.step()
    sd = opt.state_dict()
    LO.SGD(ps, lr=0.1, momentum=0.9).load_state_dict(sd)
    assert set(sd["state"][0]) == {"momentum_buffer"}


@pytest.mark.parametrize("make, entry", [
    (lambda ps: LO.AdamW(ps, lr=1e-2), "exp_avg"),  # Adam's bias correction needs the count: refused as before
    (lambda ps: LO.RMSprop(ps, lr=1e-2, momentum=0.9), "square_avg"),
])
def test_state_without_step_of_other_optimizers_stays_refused(make, entry):
    ps = [torch.nn.Parameter(torch.randn(3, 3))]
    opt = make(ps)
    ps[0].grad = torch.ones(3, 3)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0] = {k: v for k, v in sd["state"][0].items() if k != "step"}
    with pytest.raises(ValueError, match="no 'step'"):
        make(ps).load_state_dict(sd)


def test_sgd_state_without_step_with_another_entry_stays_refused():
    """Only torch's exact state (momentum_buffer alone) takes the count of 1."""
    ps = [torch.nn.Parameter(torch.randn(3, 3))]
    opt = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    ps[0].grad = torch.ones(3, 3)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="no 'step'|does not keep"):
        LO.SGD(ps, lr=0.1, momentum=0.9).load_state_dict(sd)


@pytest.mark.filterwarnings("ignore:eps=")
def test_lowmem_muon_group_is_not_renamed():
    """A lowmem Muon checkpoint (ns_eps, betas) loads its own settings unchanged."""
    ps = [torch.nn.Parameter(torch.randn(4, 4))]
    opt = LO.Muon(ps, lr=0.02, eps=1e-4, ns_eps=1e-6)
    ps[0].grad = torch.ones(4, 4)
    opt.step()
    other = LO.Muon(ps, lr=0.02, eps=1e-8, ns_eps=1e-7)
    other.load_state_dict(opt.state_dict())
    g = other.param_groups[0]
    assert (g["eps"], g["ns_eps"], g["adjust_lr_fn"]) == (1e-4, 1e-6, "match_rms_adamw")
