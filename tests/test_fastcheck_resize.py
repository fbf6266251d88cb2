"""The resize check (lowmem.optim.group_layout.check_resized) rides on the step's cached paths (LowMemOptimizer._route,
keyed by each parameter's shape and dtype): a step whose paths are all cached compares no shape at all, a path
decided again has its group's shapes compared before anything is stepped (issue 15: the check cost 0.15 us per
parameter at every step). Counted, not timed: the reads of the shapes the check compares (``group_layout._SHAPE``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowmem.optim.group_layout as gl
from lowmem.optim import create_optimizer


def _params(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(8, 8, generator=g)) for _ in range(n)]


def _grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def _counting(monkeypatch):
    reads = []
    real = gl._SHAPE
    monkeypatch.setattr(gl, "_SHAPE", lambda p: (reads.append(p), real(p))[1])
    return reads


@pytest.mark.parametrize("name", ["adamw", "galore_adamw", "adamw8bit"])
def test_cached_paths_compare_no_shape_and_a_resize_compares_its_group_only(name, monkeypatch):
    a, b = _params(6), _params(4, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer([{"params": a}, {"params": b}], name, lr=1e-2, **({"rank": 2} if "galore" in name else {}))
    for t in range(3):  # (the paths of the first steps: no state, then state)
        _grads(a + b, t)
        opt.step()
    reads = _counting(monkeypatch)
    for t in range(3, 6):
        _grads(a + b, t)
        opt.step()
    assert reads == [], f"{name}: {len(reads)} shapes compared in 3 steps whose paths were all cached"
    b[2].data = torch.randn(10, 8)
    _grads(a + b, 6)
    weights = [p.detach().clone() for p in a + b]
    with pytest.raises(ValueError, match=r"parameter 2 of parameter group 1 is \(10, 8\) but its state was made for"):
        opt.step()
    assert len(reads) == len(b) and all(any(r is q for q in b) for r in reads), \
        f"{name}: the shapes compared are not those of the resized parameter's group ({len(reads)} reads)"
    assert all(torch.equal(w, p) for w, p in zip(weights, a + b)), f"{name}: a parameter moved"


def test_a_resize_with_a_setting_of_the_same_layout_changed_in_the_same_step_is_refused():
    """GaLore's ``projection`` svd -> random probes the layout again (the same one): the group's new snapshot keeps
    the shapes its parameters' state was made for, so the parameter resized in the same step is still refused."""
    ps = _params(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer(ps, "galore_adamw", lr=1e-2, rank=2)
    for t in range(2):
        _grads(ps, t)
        opt.step()
    ps[1].data = torch.randn(10, 8)
    opt.param_groups[0]["projection"] = "random"
    _grads(ps, 2)
    weights = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=r"parameter 1 of parameter group 0 is \(10, 8\) but its state was made for"):
        opt.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, ps))


def test_a_resized_parameter_without_a_gradient_is_refused_when_it_has_one():
    """Not stepped, it is not compared (its path is not looked up); the step where it has a gradient again refuses
    it before anything is stepped."""
    ps = _params(3)
    opt = create_optimizer(ps, "adamw", lr=1e-2)
    for t in range(2):
        _grads(ps, t)
        opt.step()
    ps[0].data = torch.randn(10, 8)
    ps[0].grad = None
    _grads(ps[1:], 2)
    opt.step()  # (the others step)
    _grads(ps, 3)
    weights = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=r"parameter 0 of parameter group 0 is \(10, 8\) but its state was made for"):
        opt.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, ps))


def test_a_skipped_first_step_leaves_no_state_entries():
    """The step's pass over the paths looks each parameter's state up before the non-finite check; a skipped step
    leaves no empty state behind (``state_dict()`` as before any step)."""
    ps = _params(2)
    opt = create_optimizer(ps, "adamw", lr=1e-2)
    _grads(ps, 0)
    ps[1].grad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert opt.skipped_steps == 1
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
