"""The cached paths of the Subset-Norm / Subspace-Momentum recipes under a scheduler writing ``betas`` /
``momentum`` at every step (issue 15, ``MomentRule.route_settings``).

Their path decisions read ``b1`` (``betas[0]``, or ``momentum``) only as ``b1 > 0`` / ``b1 == 0``
(``SubsetNormMoments.route_settings``), so the engine keys their cached paths on that summary
(``engine._GroupEntry``): torch's ``OneCycleLR`` with ``cycle_momentum=True`` decides no path again, switching
``b1`` to 0 or back does. These tests check that the summary determines every decision it stands for, that the
cached steps equal steps decided afresh bit for bit (parameters, states, state dtypes and the refusals of a
layout change) under cycling and toggling schedules, and count the decisions."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from lowmem.optim.engine import LowMemOptimizer
from lowmem.optim.registry import create_optimizer

SN_NAMES = ["adamw_sn", "adagrad_sn", "adagrad_snsm", "sgd_sm", "adamw_snsm"]
PROJECTED = {"adagrad_snsm", "sgd_sm", "adamw_snsm"}  # (rank 4: the 2-D weights and the 3-D batch's matrices)


def _key(name: str) -> str:
    return "betas" if name in ("adamw_sn", "adamw_snsm", "adamw") else "momentum"


def _set_b1(group: dict, name: str, b1: float) -> None:
    if _key(name) == "betas":
        group["betas"] = (b1, group["betas"][1])
    else:
        group["momentum"] = b1


def _uncached(opt: LowMemOptimizer) -> LowMemOptimizer:
    """``opt`` deciding every parameter's path at every step (a subclass overriding a decision is never
    cached: ``LowMemOptimizer._group_tokens``)."""
    base = type(opt)

    class Uncached(base):  # type: ignore[misc, valid-type]
        def _foreach_ok(self, *args, **kwargs):
            return base._foreach_ok(self, *args, **kwargs)

    opt.__class__ = Uncached
    return opt


SHAPES = [(16, 12), (16, 12), (12, 16), (12,), (12,), (3, 8, 6)]  # same-shape pairs (stacked), vectors, a batch


def _make(name: str, cached: bool, foreach, b1: float | None = None) -> tuple[LowMemOptimizer, list]:
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    hp = {"rank": 4} if name in PROJECTED else {}
    if b1 is not None:
        hp[_key(name)] = (b1, 0.999) if _key(name) == "betas" else b1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (rank 4 >= a side of the batch's matrices: no such warning expected)
        opt = create_optimizer(ps, name, lr=1e-2, weight_decay=0.1, foreach=None if foreach == "flip" else foreach, **hp)
    opt.chunk_numel = 100  # the 16 x 12 weights join the buckets in pieces
    return (opt if cached else _uncached(opt)), ps


def _run(name: str, cached: bool, foreach, schedule: str) -> tuple[list, list, list[str]]:
    """6 steps of ``name`` under ``schedule``: ``"onecycle"`` (``OneCycleLR``, ``cycle_momentum=True``:
    ``b1`` in (0.85, 0.95) and ``lr`` written at every step) or ``"toggle"`` (``b1`` switched between 0 and
    > 0: a refusal where the state's layout depends on it, the value then put back, as a user would).
    ``foreach="flip"``: ``foreach`` False at steps 2-3 (a setting the decisions read by key)."""
    opt, ps = _make(name, cached, foreach, b1=0.0 if schedule == "toggle_from_0" else None)
    group = opt.param_groups[0]
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10, cycle_momentum=True)
             if schedule == "onecycle" else None)
    toggles = {"toggle": [0.9, 0.0, 0.9, 0.85, 0.0, 0.5], "toggle_from_0": [0.0, 0.0, 0.9, 0.0, 0.0, 0.0]}.get(schedule)
    errors = []
    for step in range(6):
        g = torch.Generator().manual_seed(100 + step)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        if foreach == "flip":
            group["foreach"] = False if step in (2, 3) else None
        if toggles is not None:
            old = group[_key(name)]
            _set_b1(group, name, toggles[step])
        try:
            opt.step()
        except ValueError as e:  # (the layout's refusal, before anything of the step ran)
            errors.append(f"{step}: {e}")
            group[_key(name)] = old
        if sched is not None:
            sched.step()
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    return [p.detach().clone() for p in ps], states, errors


def _assert_same(a, b, what):
    (pa, sa, ea), (pb, sb, eb) = a, b
    assert ea == eb, what
    for x, y in zip(pa, pb):
        assert x.dtype == y.dtype and torch.equal(x, y), (what, (x - y).abs().max())
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys(), what
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (what, k)


@pytest.mark.parametrize("name", SN_NAMES + ["adamw"])
def test_cached_paths_under_cycled_and_toggled_b1_step_as_deciding_afresh(name):
    """Under ``OneCycleLR`` (momentum cycling) and under ``b1`` toggled between 0 and > 0, with
    ``foreach`` on, off and flipped in the middle, the cached optimizer's parameters, state (entries,
    dtypes, values) and refusals equal bit for bit those of an optimizer deciding every path at every step.
    (A rule summarizing a setting it does not (``foreach``) leaves the projected buckets' path, whose weights
    differ from the per-parameter step's in the last bits, cached: red.)"""
    for schedule, foreach in itertools.product(["onecycle", "toggle", "toggle_from_0"], [None, False, "flip"]):
        cached = _run(name, True, foreach, schedule)
        fresh = _run(name, False, foreach, schedule)
        _assert_same(cached, fresh, (name, schedule, foreach))
        if schedule == "toggle" and name != "adamw":
            assert len(cached[2]) == 2  # (0.9 -> 0 and 0.85 -> 0 refused: the first moment's layout)


@pytest.mark.parametrize("name", SN_NAMES)
def test_the_summary_determines_the_decisions(name):
    """``route_settings`` stands for ``b1`` in the rule's decisions: for every state a parameter can hold
    (none yet under either state dtype, with and without a first moment, bf16 moments) and every shape, any two values of ``b1``
    with the same summary give the same answers of ``supports_foreach_for``, ``supports_foreach_direction``,
    ``foreach_bucket_class``, ``steps_pieces_whole`` and ``per_matrix``; and the summary tells 0 from > 0."""
    opt, _ = _make(name, True, None)
    rule, group = opt.recipe.moment, opt.param_groups[0]
    key = _key(name)
    values = [0.0, 0, 1e-8, 0.5, 0.85, 0.9, 0.95, 0.999]
    states = [{}]
    for shape, low in [((16, 12), None), ((12,), None), ((3, 8, 6), None), ((16, 12), (4, 12))]:
        for dtype, m in itertools.product([torch.float32, torch.bfloat16], [False, True]):
            st = {"step": torch.tensor(1.0)}
            if m:
                st["exp_avg"] = torch.zeros(low or shape, dtype=dtype)
            if low is None and rule.adaptive:
                st["exp_avg_sq"] = torch.zeros(shape[:-1] + (1,), dtype=dtype)
            states.append((shape, st))
    answers: dict = {}
    for b1, dtype in itertools.product(values, ["float32", "bfloat16"]):
        g = dict(group, state_dtype=dtype)  # (a state not made yet takes the group's state dtype)
        _set_b1(g, name, b1)
        summary = rule.route_settings(g)
        assert set(summary) == {key}
        got = [dtype]
        for item in states:
            shape, st = ((16, 12), item) if isinstance(item, dict) else item
            p = torch.zeros(shape)
            got.append((rule.supports_foreach_for(torch.Size(shape), g, st),
                        rule.supports_foreach_direction(g, st, p) if len(shape) == 2 else None,
                        rule.foreach_bucket_class(torch.Size(shape), g, st),
                        rule.steps_pieces_whole(torch.Size(shape), g, st),
                        rule.per_matrix(torch.Size(shape), g)))
        answers.setdefault(repr(summary), set()).add(tuple(got))
    assert len(answers) == 2  # 0 and > 0
    assert all(len(a) == 2 for a in answers.values()), answers  # (one answer per state dtype)


def test_summary_is_none_where_b1_is_not_a_number():
    """A tensor ``b1`` (torch's optimizers take one) or a group without the setting: no summary, the setting
    is compared by its value (identity and version for a tensor)."""
    from lowmem.optim.recipes.subset_norm import SubsetNormMoments

    rule = SubsetNormMoments()
    assert rule.route_settings({"betas": (0.9, 0.999)}) == {"betas": (True, False)}
    assert rule.route_settings({"betas": [0.0, 0.999]}) == {"betas": (False, True)}
    assert rule.route_settings({"betas": (torch.tensor(0.9), 0.999)}) is None
    assert rule.route_settings({}) is None
    assert SubsetNormMoments(adaptive=False).route_settings({"momentum": 0.5, "betas": (0.0, 0.9)}) == {"momentum": (True, False)}
    assert SubsetNormMoments(accumulate=True).route_settings({"momentum": True}) is None


class _Count:
    """Counts the path decisions of every optimizer (each makes one ``engine._Route``)."""

    def __init__(self, opt, monkeypatch):
        from lowmem.optim import engine

        self.n = 0
        count = self

        class Counted(engine._Route):
            __slots__ = ()

            def __init__(self, *a, **k):
                count.n += 1
                super().__init__(*a, **k)

        monkeypatch.setattr(engine, "_Route", Counted)


@pytest.mark.parametrize("name, scheduler", [(n, "onecycle") for n in SN_NAMES] + [("adamw_sn", "cyclic"),
                                                                                     ("sgd_sm", "cyclic")])
def test_cycled_b1_decides_no_path_again(name, scheduler, monkeypatch):
    """Under ``OneCycleLR`` (or ``CyclicLR``) with ``cycle_momentum=True`` the paths are decided at the first two
    steps (before and after the state exists), then never again; the route token changes only when ``b1``
    crosses 0, or when a setting read by key changes (``foreach``)."""
    opt, ps = _make(name, True, None)
    count = _Count(opt, monkeypatch)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10, cycle_momentum=True)
             if scheduler == "onecycle" else
             torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=3, cycle_momentum=True,
                                               base_momentum=0.8, max_momentum=0.9))
    group, decided, b1s = opt.param_groups[0], [], []
    for step in range(6):
        for p in ps:
            p.grad = torch.ones_like(p)
        count.n = 0
        opt.step()
        sched.step()
        decided.append(count.n)
        b1s.append(group["betas"][0] if _key(name) == "betas" else group["momentum"])
    assert all(a != b for a, b in zip(b1s, b1s[1:])) and all(0 < b < 1 for b in b1s)  # (b1 changed at every step)
    assert decided == [len(ps), len(ps), 0, 0, 0, 0], decided
    entry = opt._group_sigs[id(group)]
    assert _key(name) not in entry.keys and "foreach" in entry.keys
    token = entry.route_token
    _set_b1(group, name, 0.8)
    opt._group_tokens()
    assert entry.route_token is token
    _set_b1(group, name, 0.0)  # (refused at the next step, where the state holds a first moment)
    opt._group_tokens()
    assert entry.route_token is not token
    token = entry.route_token
    _set_b1(group, name, 0.0)
    opt._group_tokens()
    assert entry.route_token is token
    _set_b1(group, name, 0.7)
    opt._group_tokens()
    assert entry.route_token is not token
    token = entry.route_token
    group["foreach"] = False
    opt._group_tokens()
    assert entry.route_token is not token


def test_a_tensor_b1_is_read_by_key(monkeypatch):
    """A ``b1`` with no summary (a tensor) joins the recorded keys when a decision reads it
    (``_GroupEntry.add_route_keys``): each new tensor decides the paths again."""
    opt, ps = _make("adamw_sn", True, None)
    count = _Count(opt, monkeypatch)
    group = opt.param_groups[0]

    def step():
        count.n = 0
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        return count.n

    first = step()
    assert first > 0 and step() == first and step() == 0
    group["betas"] = (torch.tensor(0.8), 0.999)
    assert [step(), step()] == [first, 0]
    assert "betas" in opt._group_sigs[id(group)].keys
    group["betas"] = (torch.tensor(0.7), 0.999)
    assert [step(), step()] == [first, 0]
    group["betas"] = (0.9, 0.999)  # a number again: summarized
    assert [step(), step()] == [first, 0]
    group["betas"] = (0.8, 0.999)
    assert step() == 0
