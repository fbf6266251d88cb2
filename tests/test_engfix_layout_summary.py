"""The layout check (``lowmem.optim.group_layout``) of a setting that the moment rule summarizes
(``MomentRule.route_settings``: Subset-Norm's ``betas`` / ``momentum`` as ``(b1 > 0, b1 == 0)``).

A scheduler cycling ``b1`` within ``(0, 1)`` (``OneCycleLR``'s ``cycle_momentum``) changes a setting the state is
made from; the check compares it by the summary, so it probes nothing (FOUND_ROUTE2 2, issue 15), while ``b1``
crossing 0 with state is still refused. That is sound only if every registered recipe whose rule summarizes makes its
state from such a setting through the summary alone: traced here on every kind of parameter they take."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
from torch import nn

import lowmem.optim.group_layout as GL
from lowmem.optim import create_optimizer, optimizer_entries
from lowmem.optim.group_layout import meta_layout
from toy_problem import hparams_for, make_problem

SN = ["adamw_sn", "adagrad_sn", "adagrad_snsm", "sgd_sm", "adamw_snsm"]


def _key(name: str) -> str:
    return "betas" if name in ("adamw_sn", "adamw_snsm") else "momentum"


def _set_b1(group: dict, key: str, b1) -> None:
    if key == "betas":
        group["betas"] = (b1, group["betas"][1])
    else:
        group["momentum"] = b1


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in [(16, 12)] * 3 + [(12, 16), (12,), (3, 8, 6)]]


def _make(name: str, ps: list[nn.Parameter]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (rank 4 >= a side of the batch's matrices)
        return create_optimizer(ps, name, lr=1e-2, **({"rank": 4} if "sm" in name.split("_")[-1] else {}))


def _grads(ps: list[nn.Parameter], t: int) -> None:
    g = torch.Generator().manual_seed(100 + t)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


# ---- the contract: the state is made from a summarized setting through its summary only ---------------------------


class _Traced:
    """A number standing in for a setting while the state is made: records every use of its value but a
    comparison with 0 (which the summary ``(b1 > 0, b1 == 0)`` answers) when ``summarized``, every use at all
    otherwise (``betas[1]``: not in the summary)."""

    def __init__(self, value: float, summarized: bool, uses: list) -> None:
        self.value, self.summarized, self.uses = value, summarized, uses

    def _use(self, op: str, other=None):
        if not (self.summarized and op in _CMP and type(other) in (int, float) and other == 0):
            self.uses.append((op, other))

    def __bool__(self):
        self._use("ne", 0)
        return self.value != 0


_CMP = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le, "eq": operator.eq,
        "ne": operator.ne}
_OPS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv, "pow": operator.pow,
        "floordiv": operator.floordiv, "mod": operator.mod}


def _cmp(name, f):
    return lambda self, other: (self._use(name, other), f(self.value, other))[1]


def _op(name, f, right=False):
    return lambda self, other: (self._use(name, other), f(other, self.value) if right else f(self.value, other))[1]


def _unary(name, f):
    return lambda self, *a: (self._use(name), f(self.value, *a))[1]


for _n, _f in _CMP.items():
    setattr(_Traced, f"__{_n}__", _cmp(_n, _f))
for _n, _f in _OPS.items():
    setattr(_Traced, f"__{_n}__", _op(_n, _f))
    setattr(_Traced, f"__r{_n}__", _op("r" + _n, _f, right=True))
for _n, _f in {"float": float, "int": int, "index": operator.index, "neg": operator.neg, "abs": abs, "round": round,
               "hash": hash, "format": format, "repr": repr, "trunc": int}.items():
    setattr(_Traced, f"__{_n}__", _unary(_n, _f))


def _summarizing_entries() -> list[str]:
    names = []
    for e in optimizer_entries():
        if e.recipe is None:
            continue
        m = make_problem()[0]
        opt = create_optimizer(m, e.name, **hparams_for(e.name))
        if any(opt.recipe.moment.route_settings(g) for g in opt.param_groups):
            names.append(e.name)
    return names


def test_the_summarizing_recipes_are_the_subset_norm_ones():
    """(So the trace below covers every registered recipe whose rule summarizes a setting.)"""
    assert _summarizing_entries() == sorted(SN)


@pytest.mark.parametrize("b1", [0.9, 0.0])
@pytest.mark.parametrize("name", SN)
def test_the_state_is_made_from_a_summarized_setting_through_its_summary_only(name, b1):
    """Every parameter kind these recipes take (projected 2-D, full-rank 1-D / 2-D, a 3-D batch, a model's groups):
    ``_init_state`` on a meta twin with ``b1`` (and ``betas[1]``) traced gives the layout of the plain values and
    uses ``b1`` only in comparisons with 0, ``betas[1]`` not at all."""
    model = make_problem()[0]
    opts = [_make(name, _params()), create_optimizer(model, name, **hparams_for(name))]
    key = _key(name)
    for opt in opts:
        for group in opt.param_groups:
            _set_b1(group, key, b1)
            assert opt.recipe.moment.route_settings(group), (name, key)
            for p in group["params"]:
                uses: list = []
                traced = dict(group)
                value = traced[key]
                traced[key] = ((_Traced(value[0], True, uses), _Traced(value[1], False, uses)) if key == "betas"
                               else _Traced(value, True, uses))
                assert meta_layout(opt, p, traced) == meta_layout(opt, p, group), (name, tuple(p.shape))
                assert uses == [], (name, tuple(p.shape), uses)


def test_the_trace_sees_a_value_read():
    """(The tracer itself: a comparison with another number, arithmetic, a conversion are uses.)"""
    uses: list = []
    b1, b2 = _Traced(0.9, True, uses), _Traced(0.999, False, uses)
    assert (b1 > 0) and (b1 != 0) and not (b1 == 0) and bool(b1)
    assert uses == []
    assert b1 > 0.5 and b2 > 0 and float(b1) == 0.9 and 1 - b1 == pytest.approx(0.1)
    assert [u[0] for u in uses] == ["gt", "gt", "float", "rsub"]


# ---- the check: compared by the summary -------------------------------------------------------------------------


def _count_snapshots(monkeypatch) -> list:
    calls: list = []
    real = GL._snapshot
    monkeypatch.setattr(GL, "_snapshot", lambda opt, group: (calls.append(id(group)), real(opt, group))[1])
    return calls


@pytest.mark.parametrize("name", SN)
def test_onecycle_cycle_momentum_probes_no_layout_after_the_first_step(name, monkeypatch):
    """OneCycleLR writes ``b1`` (0.85-0.95) at every step: one snapshot per group (the first step), no probe after,
    and the kept value follows the group (a refusal names the value before the change)."""
    snaps = _count_snapshots(monkeypatch)
    ps = _params()
    opt = _make(name, ps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20, cycle_momentum=True)
    seen = []
    for t in range(6):
        _grads(ps, t)
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0][_key(name)])
    assert len(set(map(str, seen))) == 6  # (b1 changed at every step)
    assert len(snaps) == len(opt.param_groups)
    _grads(ps, 6)
    opt.step()  # (the value written by the last sched.step(): kept without a probe)
    entry = opt.__dict__["_layout_sigs"][id(opt.param_groups[0])]
    assert entry.values[entry.keys.index(_key(name))] == opt.param_groups[0][_key(name)] != seen[0]
    assert len(snaps) == len(opt.param_groups)


@pytest.mark.parametrize("name", SN)
def test_b1_crossing_zero_with_state_is_still_refused_naming_the_last_value(name):
    ps = _params()
    opt = _make(name, ps)
    key, group = _key(name), opt.param_groups[0]
    for t, b1 in enumerate([0.9, 0.8, 0.7]):
        _set_b1(group, key, b1)
        _grads(ps, t)
        opt.step()
    before = [p.detach().clone() for p in ps]
    _set_b1(group, key, 0.0)
    _grads(ps, 3)
    last = "(0.7, 0.999)" if key == "betas" else "0.7"
    with pytest.raises(ValueError, match=rf"setting '{key}' changed from {last.replace('(', '[(]').replace(')', '[)]')}"
                       r" to .*0\.0"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps))
    _set_b1(group, key, 0.6)  # (back within the summary kept: steps)
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, ps))


@pytest.mark.parametrize("name", ["adamw_sn", "sgd_sm"])
def test_b1_from_zero_to_positive_with_state_is_refused(name):
    ps = _params()
    key = _key(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer(ps, name, lr=1e-2, **({"rank": 4} if name == "sgd_sm" else {}),
                               **({"betas": (0.0, 0.999)} if key == "betas" else {"momentum": 0.0}))
    _grads(ps, 0)
    opt.step()
    _set_b1(opt.param_groups[0], key, 0.5)
    with pytest.raises(ValueError, match=f"setting '{key}' changed"):
        opt.step()


def test_another_setting_changed_with_a_summarized_one_is_probed(monkeypatch):
    """A change of a summarized setting together with another candidate (``subset_size``, a layout setting) is no
    summary-only change: probed, and refused."""
    ps = _params()
    opt = _make("adamw_sn", ps)
    _grads(ps, 0)
    opt.step()
    snaps = _count_snapshots(monkeypatch)
    group = opt.param_groups[0]
    group["betas"] = (0.8, 0.999)
    group["subset_size"] = 4
    with pytest.raises(ValueError, match="subset_size"):
        opt.step()
    assert snaps == [id(group)]


def test_a_tensor_b1_is_compared_by_its_value(monkeypatch):
    """No summary for a tensor ``b1`` (``route_settings`` None): compared by value, probed at each change."""
    ps = _params()
    opt = _make("sgd_sm", ps)
    _grads(ps, 0)
    opt.step()
    snaps = _count_snapshots(monkeypatch)
    for t, m in enumerate([0.8, 0.7]):
        opt.param_groups[0]["momentum"] = torch.tensor(m)
        _grads(ps, t + 1)
        opt.step()
    assert len(snaps) == 2


def test_each_parameter_kind_is_computed_once_per_snapshot(monkeypatch):
    """A probed change walks the parameters' kinds once (the refusal reuses the snapshot's)."""
    ps = _params()
    opt = _make("adamw_sn", ps)
    _grads(ps, 0)
    opt.step()
    calls: list = []
    real = GL._kind
    monkeypatch.setattr(GL, "_kind", lambda p: (calls.append(1), real(p))[1])
    opt.param_groups[0]["eps"] = 1e-7  # (not a layout candidate: no probe)
    opt.param_groups[0]["subset_norm"] = not opt.param_groups[0]["subset_norm"]
    with pytest.raises(ValueError, match="subset_norm"):
        opt.step()
    # (the snapshot's walk, and the probes of the settings that change the layout on their own: none per parameter)
    assert len(calls) == len(ps)
