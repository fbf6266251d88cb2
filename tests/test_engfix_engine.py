"""LowMemOptimizer as a torch optimizer: complex parameters refused, copies (``copy.deepcopy``, ``pickle``) that
continue bit for bit and share nothing mutable with the original, torch's load-state-dict hooks around the whole
load (FOUND_AUDITOPT 1, 3, 5)."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import warnings

import pytest
import torch
from torch import nn

from lowmem.optim import LowMemOptimizer, create_optimizer, get_entry
from lowmem.optim.engine import BY_DEVICE, Recipe
from toy_problem import hparams_for, make_problem, train

# ---- complex parameters -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "galore_adamw", "adam_mini"])
def test_a_complex_parameter_is_refused_naming_it_before_any_state(name):
    real, cplx = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8, dtype=torch.complex64))
    hp = {"rank": 2} if name == "galore_adamw" else {}
    with pytest.raises(ValueError, match=rf"parameter group 0 of optimizer '{name}', parameter 1 of shape \(8, 8\) is "
                       r"complex \(torch.complex64\).*torch.view_as_real.*\(8, 8, 2\)"):
        create_optimizer([real, cplx], name, lr=1e-2, **hp)
    opt = create_optimizer([real], name, lr=1e-2, **hp)
    with pytest.raises(ValueError, match=r"parameter group 1 of optimizer .*, parameter 0 .*complex"):
        opt.add_param_group({"params": [cplx]})
    assert len(opt.param_groups) == 1 and not opt.state  # (the group is not kept)


def test_the_refusal_names_the_way_that_trains_like_torch():
    """The way the message names: a real ``[..., 2]`` parameter viewed as complex trains as torch.optim.AdamW trains
    the complex one."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, dtype=torch.complex64, generator=g)
    p, q = nn.Parameter(torch.view_as_real(w).clone()), nn.Parameter(w.clone())
    o1 = create_optimizer([p], "adamw", lr=0.1, weight_decay=0.01)
    o2 = torch.optim.AdamW([q], lr=0.1, weight_decay=0.01)
    for _ in range(3):
        grad = torch.randn(4, 4, dtype=torch.complex64, generator=g)
        p.grad, q.grad = torch.view_as_real(grad).clone(), grad.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(torch.view_as_complex(p.detach()), q.detach(), rtol=1e-6, atol=1e-6)


# ---- copies -------------------------------------------------------------------------------------------------------


def _nan_step(model, opt, x, y):
    opt.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    model.fc1.weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="non-finite"):
        opt.step()


def _same(m1, m2):
    return all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def _objects(x, seen=None):
    """Every object reachable from ``x`` through dicts, lists, tuples, sets and attributes."""
    seen = {} if seen is None else seen
    if id(x) in seen or isinstance(x, (str, int, float, bool, type(None), torch.dtype, torch.device)):
        return seen
    seen[id(x)] = x
    items = (x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple, set, frozenset)) else ())
    for v in (*items, *(x.keys() if isinstance(x, dict) else ())):
        _objects(v, seen)
    if not isinstance(x, torch.Tensor) and hasattr(x, "__dict__") and not isinstance(x, type):
        _objects(vars(x), seen)
    for slot in getattr(type(x), "__slots__", ()):
        if hasattr(x, slot):
            _objects(getattr(x, slot), seen)
    return seen


@pytest.mark.parametrize("name", ["adam_mini", "galore_adamw", "sgd_sm"])
def test_a_deepcopy_shares_nothing_mutable_with_the_original(name):
    """After a copy and a step of each: no tensor, dict or cache of one optimizer is the other's (the caches keyed by
    the original's parameters and groups are rebuilt, not copied), the settings and attributes are equal, and the
    registered recipe (configuration) is shared as the class's is."""
    model, x, y = make_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer(model, name, **hparams_for(name))
    opt.chunk_numel = 64
    train(model, opt, x, y, 2)
    _nan_step(model, opt, x, y)
    model2, opt2 = copy.deepcopy((model, opt))
    assert not set(opt2.__dict__) & LowMemOptimizer._NOT_COPIED
    assert (opt2.skipped_steps, opt2.chunk_numel, opt2.defaults) == (1, 64, opt.defaults)
    assert opt2.recipe is opt.recipe is get_entry(name).recipe
    train(model, opt, x, y, 2)
    train(model2, opt2, x, y, 2)
    assert _same(model, model2)
    config = _objects((opt.recipe, BY_DEVICE))  # (shared configuration: the recipe's parts, the default chunk's mark)
    mine = _objects(opt.__dict__)
    shared = [type(v).__name__ for k, v in _objects(opt2.__dict__).items()
              if k in mine and k not in config and isinstance(v, (torch.Tensor, dict, list, set))]
    assert shared == []
    # (the caches the copy made are keyed by its own parameters and groups: none was copied from the original's)
    params2, groups2 = set(map(id, model2.parameters())), set(map(id, opt2.param_groups))
    assert opt2.__dict__["_routes"] and all(k in params2 and id(r.p) == k for k, r in opt2.__dict__["_routes"].items())
    assert set(opt2.__dict__["_layout_sigs"]) == set(opt2.__dict__["_group_sigs"]) == groups2


@pytest.mark.parametrize("name", ["adam_mini", "apollo_mini", "badam"])
def test_pickle_round_trip_continues_bit_for_bit(name):
    """``pickle`` of (model, optimizer): a recipe whose settings' checks are local functions (adam_mini's,
    apollo_mini's) is stored by its registry name; BAdam's schedule (``switch_every=2``: the copy switches blocks as
    the original)."""
    model, x, y = make_problem()
    hp = {**hparams_for(name), **({"switch_every": 2} if name == "badam" else {})}
    opt = create_optimizer(model, name, **hp)
    train(model, opt, x, y, 3)
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert type(opt2) is type(opt) and opt2.recipe is opt.recipe and opt2.skipped_steps == 0
    train(model, opt, x, y, 4)
    train(model2, opt2, x, y, 4)
    assert _same(model, model2)
    if name == "badam":
        assert (opt2._period, opt2._steps) == (opt._period, opt._steps) == (3, 1)


def test_a_recipe_not_registered_is_copied_by_value():
    recipe = dataclasses.replace(get_entry("adamw").recipe, name="my_adamw")
    model, x, y = make_problem()
    opt = LowMemOptimizer(model.parameters(), recipe, lr=1e-2)
    train(model, opt, x, y, 2)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.recipe is not recipe and opt2.recipe.name == "my_adamw"
    train(model, opt, x, y, 2)
    train(model2, opt2, x, y, 2)
    assert _same(model, model2)


def test_a_copy_s_state_dict_loads_into_a_fresh_optimizer():
    """torch's ``__setstate__`` adds ``differentiable`` to the defaults (and so to every group added later): a
    setting no recipe has, which a checkpoint would carry into a load that refuses it."""
    model, x, y = make_problem()
    opt = create_optimizer(model, "adamw", lr=1e-2)
    train(model, opt, x, y, 1)
    model2, opt2 = copy.deepcopy((model, opt))
    opt2.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    assert "differentiable" not in opt2.defaults and "differentiable" not in opt2.param_groups[-1]
    fresh = create_optimizer(model2, "adamw", lr=1e-2)
    fresh.add_param_group({"params": [opt2.param_groups[-1]["params"][0]]})
    fresh.load_state_dict(opt2.state_dict())


# ---- load_state_dict hooks ----------------------------------------------------------------------------------------


def _trained(name="adamw"):
    model, x, y = make_problem()
    opt = create_optimizer(model, name, lr=1e-2)
    train(model, opt, x, y, 2)
    return model, opt


def test_a_pre_hook_s_state_dict_is_what_loads():
    """torch loads what a load-state-dict pre-hook returns; so does the engine's state rebuild."""
    model, opt = _trained()
    p = next(model.parameters())
    sd = opt.state_dict()

    def halve(o, state_dict):
        state = {k: {n: v / 2 if n == "exp_avg" else v for n, v in s.items()} for k, s in state_dict["state"].items()}
        return {**state_dict, "state": state}

    again = create_optimizer(model, "adamw", lr=1e-2)
    again.register_load_state_dict_pre_hook(halve)
    again.load_state_dict(sd)
    assert torch.equal(again.state[p]["exp_avg"], opt.state[p]["exp_avg"] / 2)
    assert torch.equal(sd["state"][0]["exp_avg"], opt.state[p]["exp_avg"])  # (the caller's dict untouched)


def test_hooks_stay_registered_and_removable_after_a_refused_load():
    """The hooks are set aside during torch's part of the load and put back, also when it raises: they run at the
    next load, and their handles still remove them."""
    model, opt = _trained()
    calls = []
    pre = opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("pre"))
    post = opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    bad = opt.state_dict()
    bad["param_groups"] = bad["param_groups"][:1]
    with pytest.raises(ValueError, match="number of parameter groups"):
        opt.load_state_dict(bad)
    assert calls == ["pre"]
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "pre", "post"]
    pre.remove()
    post.remove()
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "pre", "post"]


def test_a_post_hook_sees_the_loaded_state_of_badam():
    """BAdam loads through the engine's load: the post-hook sees the rebuilt state (its writes kept)."""
    model, x, y = make_problem()
    opt = create_optimizer(model, "badam", lr=1e-2, switch_every=5)
    train(model, opt, x, y, 2)
    seen = []
    again = create_optimizer(model, "badam", lr=1e-2, switch_every=5)
    again.register_load_state_dict_post_hook(lambda o: seen.append({id(p): dict(s) for p, s in o.state.items() if s}))
    again.load_state_dict(opt.state_dict())
    assert seen and seen[0].keys() == {id(p) for p, s in again.state.items() if s}
    assert all(s["exp_avg"] is again.state[p]["exp_avg"] for p in again.state if again.state[p]
               for s in [seen[0][id(p)]])
