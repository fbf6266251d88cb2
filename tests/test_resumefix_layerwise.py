"""RESUMEFIX: the LayerwiseOptimizer checkpoint fixes of AUDIT-RESUME18 4, 6, 7 (tests/test_audit18_resume.py), the
directions and controls the audit's tests leave out."""

from __future__ import annotations

import copy

import torch

from lowmem.optim.layerwise import LayerwiseOptimizer
from toy_problem import loss_fn, make_problem


def test_window_boundary_checkpoint_loads_into_another_accumulation_steps():
    """accumulation_steps is refused only inside a window: a checkpoint after step() loads into any value."""
    torch.manual_seed(0)
    model, x, y = make_problem(0)
    opt = LayerwiseOptimizer(model, "adamw", accumulation_steps=4, lr=1e-2)
    for _ in range(4):
        loss_fn(model, x, y).backward()
    opt.step()
    sd = opt.state_dict()
    assert int(sd["layerwise"]["accumulation_steps"]) == 4 and int(sd["layerwise"]["micro"].max()) == 0
    LayerwiseOptimizer(copy.deepcopy(model), "adamw", accumulation_steps=2, lr=1e-2).load_state_dict(sd)


def test_global_prev_coefficient_follows_the_loading_max_grad_norm_and_old_checkpoints_keep_theirs():
    """A run at max_grad_norm=1.0 resumed at 1e-3: the first step's coefficient is 1e-3's (the saved one was 1: not
    clipped); a checkpoint without prev_norm (older) keeps its saved coefficient."""
    torch.manual_seed(0)
    model, x, y = make_problem(0)
    opt = LayerwiseOptimizer(model, "adamw", lr=1e-2, max_grad_norm=1.0, clip_mode="global_prev")
    for _ in range(2):
        loss_fn(model, x, y).backward()
        opt.step()
    sd = opt.state_dict()
    norm = sd["layerwise"]["prev_norm"]
    assert float(sd["layerwise"]["clip_coef"]) == 1.0 and float(norm) > 1e-3
    other = LayerwiseOptimizer(copy.deepcopy(model), "adamw", lr=1e-2, max_grad_norm=1e-3, clip_mode="global_prev")
    other.load_state_dict(copy.deepcopy(sd))
    assert torch.equal(other._clip_coef, torch.clamp(1e-3 / (norm + 1e-6), max=1.0))
    old = copy.deepcopy(sd)
    del old["layerwise"]["prev_norm"], old["layerwise"]["accumulation_steps"]
    other.load_state_dict(old)
    assert float(other._clip_coef) == 1.0


def test_remove_hooks_drops_a_loaded_windows_grad_check():
    """A loaded mid-window checkpoint without .grad, then remove_hooks(): the model's next backward is no longer the
    optimizer's business (no error); without remove_hooks it is refused naming the parameter's .grad."""
    import pytest

    torch.manual_seed(0)
    model, x, y = make_problem(0)
    opt = LayerwiseOptimizer(model, "adamw", accumulation_steps=2, lr=1e-2)
    loss_fn(model, x, y).backward()
    sd = opt.state_dict()
    fresh = copy.deepcopy(model)
    fresh.zero_grad(set_to_none=True)
    other = LayerwiseOptimizer(fresh, "adamw", accumulation_steps=2, lr=1e-2)
    other.load_state_dict(sd)
    other.remove_hooks()
    loss_fn(fresh, x, y).backward()
    again = LayerwiseOptimizer(fresh, "adamw", accumulation_steps=2, lr=1e-2)
    fresh.zero_grad(set_to_none=True)
    again.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"\.grad"):
        loss_fn(fresh, x, y).backward()
