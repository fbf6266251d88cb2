"""A parameter resized after its state was made (``p.data = ...`` of another shape: what ``resize_token_embeddings``
does to an embedding whose optimizer was built before) is refused at the next step, before anything is stepped,
with a ValueError naming it, both shapes and the fix (FOUND_AUDITOPT 7; lowmem.optim.group_layout._check_resized).
A parameter without state may be resized freely: its state is made for its shape then."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.optim import create_optimizer, optimizer_entries
from lowmem.optim.layerwise import LayerwiseOptimizer
from toy_problem import hparams_for

ENGINE = [e.name for e in optimizer_entries() if e.generic_tests and e.recipe is not None]


def _hp(name):
    hp = hparams_for(name)
    if "rank" in hp:
        hp["rank"] = 2  # below every side of the small shapes here
    return hp


def _grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def _two(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(8, 8, generator=g)) for _ in range(2)]


@pytest.mark.parametrize("name", ENGINE)
def test_a_parameter_resized_after_its_state_is_refused_before_anything_is_stepped(name):
    ps = _two()
    opt = create_optimizer(ps, name, **_hp(name))
    for s in range(2):
        _grads(ps, s)
        opt.step()
    ps[1].data = torch.randn(10, 8)  # (resize_token_embeddings)
    _grads(ps, 2)
    weights = [p.detach().clone() for p in ps]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    with pytest.raises(ValueError, match=r"parameter 1 of parameter group 0 is \(10, 8\) but its state was made for"
                                         r" \(8, 8\).*optimizer\.state\.pop\(p\)"):
        opt.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, ps)), f"{name}: a parameter moved"
    for i, (a, p) in enumerate(zip(state, ps)):
        b = opt.state[p]
        assert a.keys() == b.keys(), f"{name}: parameter {i} state keys changed"
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: parameter {i} state changed"
    opt.state.pop(ps[1])  # the fix the message names: its state is made again for (10, 8)
    opt.step()
    assert not torch.equal(weights[1], ps[1]), f"{name}: the resized parameter, its state dropped, did not train"
    assert torch.isfinite(ps[1]).all()


@pytest.mark.parametrize("name", ["adamw", "galore_adamw", "adamw8bit"])
def test_a_parameter_without_state_may_be_resized(name):
    """Resized before its first step (an optimizer built before resize_token_embeddings, no step yet), or after
    its state was dropped and materialized again: no error, its state fits its new shape."""
    ps = _two()
    opt = create_optimizer(ps, name, **_hp(name))
    _grads(ps[:1], 0)
    opt.step()  # (ps[1] has no gradient: no state)
    ps[1].data = torch.randn(10, 8)
    _grads(ps, 1)
    opt.step()
    assert opt.state[ps[1]]
    opt.state.pop(ps[1])
    ps[1].data = torch.randn(12, 8)
    opt.materialize_state()  # (made for (12, 8), not the (10, 8) kept at the last step)
    _grads(ps, 2)
    opt.step()


def test_layerwise_refuses_a_resized_parameter_before_any_is_stepped():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    opt = LayerwiseOptimizer(model.parameters(), "adamw", lr=1e-2)
    x = torch.randn(4, 8)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
    model[0].weight.data = torch.randn(8, 10)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"parameter 0 of parameter group 0 is \(8, 10\) but its state was made"
                                         r" for \(8, 8\)"):
        model(torch.randn(4, 10)).square().mean().backward()
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))


def test_a_dtype_change_is_refused_only_where_the_state_depends_on_it():
    ps = _two()
    opt = create_optimizer(ps, "adamw", lr=1e-2, state_dtype="param")
    _grads(ps, 0)
    opt.step()
    ps[0].data = ps[0].data.double()
    ps[0].grad = torch.randn(8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"parameter 0 of parameter group 0 is torch.float64 but its state was made"
                                         r" for torch.float32"):
        opt.step()
    qs = _two()
    opt = create_optimizer(qs, "adamw", lr=1e-2)  # (float32 state whatever the parameter's dtype)
    _grads(qs, 0)
    opt.step()
    qs[0].data = qs[0].data.double()
    qs[0].grad = torch.randn(8, 8, dtype=torch.float64)
    opt.step()
    assert opt.state[qs[0]]["exp_avg"].dtype == torch.float32


def test_a_copy_whose_parameter_is_resized_before_its_first_step_names_the_resize():
    """A deep copy keeps no snapshot (lowmem.optim.group_layout): its first step compares the state it holds with
    the layout the resized parameter gives it, and the message names the resize too."""
    import copy

    ps = _two()
    opt = create_optimizer(ps, "adamw", lr=1e-2)
    _grads(ps, 0)
    opt.step()
    qs, twin = copy.deepcopy((ps, opt))
    qs[1].data = torch.randn(10, 8)
    _grads(qs, 1)
    weights = [q.detach().clone() for q in qs]
    with pytest.raises(ValueError, match=r"resized after its state was made.*optimizer\.state\.pop\(p\)"):
        twin.step()
    assert all(torch.equal(w, q) for w, q in zip(weights, qs))
