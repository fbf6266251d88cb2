"""The engine's cached path of each parameter (issue 15: its own time on many small tensors).

:meth:`LowMemOptimizer.step` decides once per parameter whether it takes the projected multi-tensor
step, the foreach buckets or its per-parameter step, and reuses the decision while nothing it depends
on changed (``LowMemOptimizer._route``): the group's settings that its decisions read (recorded when a
path is decided, ``engine._GroupEntry``; ``lr`` by its type only), the parameter's state dict, the dtype /
shape / device / contiguity of the parameter and its gradient, ``chunk_numel``. These tests change each of
them between steps (and cycle ``betas`` / ``momentum`` with torch's ``OneCycleLR``) and check that the step
is the one an optimizer deciding afresh at every step takes (bit for bit), that settings no decision reads
decide nothing again while a read one does, that the counters advance in a loaded state, and that no path
decision of any recipe reads ``lr``'s value."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim.engine import LowMemOptimizer
from lowmem.optim.registry import create_optimizer, get_entry, list_optimizers


def _uncached(opt: LowMemOptimizer) -> LowMemOptimizer:
    """``opt`` turned into an optimizer that decides every parameter's path at every step (a subclass
    overriding the decision is never cached: ``LowMemOptimizer._group_tokens``)."""
    base = type(opt)

    class Uncached(base):  # type: ignore[misc, valid-type]
        def _foreach_ok(self, *args, **kwargs):
            return base._foreach_ok(self, *args, **kwargs)

    opt.__class__ = Uncached
    return opt


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 12), (16, 12), (12,), (12,), (6, 4, 5)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in ps:
        if hasattr(p, "grad_dtype"):  # (torch >= 2.10 refuses a gradient of another dtype unless told)
            p.grad_dtype = None
    return ps


class _Spy:
    """Counts the path decisions of ``opt`` and the tensors its foreach buckets step."""

    def __init__(self, opt: LowMemOptimizer, monkeypatch: pytest.MonkeyPatch):
        self.decisions = 0
        self.bucketed: list[int] = []
        decide, bucket = opt._foreach_ok, opt.recipe.moment.foreach_step_

        def counted(*args, **kwargs):
            self.decisions += 1
            return decide(*args, **kwargs)

        def stepped(params, *args, **kwargs):
            self.bucketed += [id(p) for p in params]
            return bucket(params, *args, **kwargs)

        monkeypatch.setattr(opt, "_foreach_ok", counted)  # (an instance attribute: the class keeps its cache)
        monkeypatch.setattr(opt.recipe.moment, "foreach_step_", stepped)


def _grads(ps, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in ps]


CHANGES = ["none", "lr", "foreach_off", "foreach_back", "betas", "grad_bf16", "param_f64_then_back",
           "grad_noncontiguous_large", "chunk_numel", "state_step_replaced", "state_cleared"]


def _change(kind: str, opt: LowMemOptimizer, ps, grads, step: int) -> None:
    """Apply change ``kind`` before step ``step`` (to the gradients ``grads`` about to be set, or to ``opt``)."""
    group = opt.param_groups[0]
    if kind == "lr":
        group["lr"] = 1e-3 * (step + 1)
    elif kind == "foreach_off" and step == 2:
        group["foreach"] = False
    elif kind == "foreach_back":
        group["foreach"] = step % 2 == 0 and None
    elif kind == "betas" and step == 2:
        opt.param_groups[0]["betas"] = (0.5, 0.9)
    elif kind == "grad_bf16" and step == 2:
        grads[0] = grads[0].bfloat16()
    elif kind == "param_f64_then_back" and step in (2, 3):
        for p in ps[:2]:
            p.data = p.data.double() if step == 2 else p.data.float()
    elif kind == "grad_noncontiguous_large" and step == 2:
        grads[0] = grads[0].t().contiguous().t()  # a transposed copy: not contiguous
    elif kind == "chunk_numel" and step == 2:
        opt.chunk_numel = 64
    elif kind == "state_step_replaced" and step == 2:
        opt.state[ps[0]]["step"] = opt.state[ps[0]]["step"].clone()
    elif kind == "state_cleared" and step == 2:
        opt.state.clear()
    elif kind == "state_replaced_bf16" and step == 2:  # the same keys, moments of another dtype
        opt.state[ps[0]] = {k: v.bfloat16() if k.startswith("exp_avg") else v.clone() for k, v in opt.state[ps[0]].items()}


def _run(kind: str, cached: bool, name: str = "adamw", **hp) -> tuple[list[torch.Tensor], list[float]]:
    ps = _params()
    opt = create_optimizer(ps, name, lr=1e-2, weight_decay=0.1, **hp)
    opt.chunk_numel = 100  # the 16 x 12 weights (192 elements) join the buckets in pieces
    if not cached:
        _uncached(opt)
    for step in range(5):
        grads = _grads(ps, step)
        _change(kind, opt, ps, grads, step)
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in ps], [opt.state[p]["step"].item() for p in ps]


@pytest.mark.parametrize("kind", CHANGES)
def test_cached_paths_step_as_deciding_afresh(kind):
    """After each change, the cached optimizer's weights and counters equal bit for bit those of an
    optimizer that decides every parameter's path at every step."""
    cached, steps = _run(kind, True)
    fresh, fresh_steps = _run(kind, False)
    assert steps == fresh_steps
    for a, b in zip(cached, fresh):
        assert a.dtype == b.dtype and torch.equal(a, b), (kind, (a - b).abs().max())


@pytest.mark.parametrize("kind", ["lr", "foreach_off", "grad_bf16", "state_replaced_bf16", "state_cleared"])
def test_cached_projected_paths_step_as_deciding_afresh(kind):
    """The same for the projected multi-tensor step (GaLore: the 16 x 12 weights projected at rank 4),
    including a state dict replaced by one with bfloat16 moments (no multi-tensor direction for it)."""
    cached, steps = _run(kind, True, "galore_adamw", rank=4)
    fresh, fresh_steps = _run(kind, False, "galore_adamw", rank=4)
    assert steps == fresh_steps
    for a, b in zip(cached, fresh):
        assert a.dtype == b.dtype and torch.equal(a, b), (kind, (a - b).abs().max())


def test_paths_are_decided_once_and_again_after_a_change(monkeypatch):
    """The decision is made at the first two steps (before and after the state exists), then reused
    while only ``lr`` changes; a flipped ``foreach``, a gradient of another dtype, ``add_param_group``
    and ``load_state_dict`` decide again, and the buckets hold what the decision says."""
    ps = _params()
    opt = create_optimizer(ps[:4], "adamw", lr=1e-2)
    spy = _Spy(opt, monkeypatch)

    def step(grads=None):
        spy.decisions, spy.bucketed = 0, []
        for p, g in zip(opt.param_groups[0]["params"], grads or _grads(ps, 0)):
            p.grad = g
        opt.step()
        return spy.decisions, len(spy.bucketed)

    assert step() == (4, 4)  # first step: empty states
    assert step() == (4, 4)  # the states exist now
    opt.param_groups[0]["lr"] = 5e-3
    assert step() == (0, 4)
    opt.param_groups[0]["foreach"] = False
    assert step() == (4, 0)
    assert step() == (0, 0)
    opt.param_groups[0]["foreach"] = None
    assert step() == (4, 4)
    grads = _grads(ps, 0)
    grads[1] = grads[1].bfloat16()
    assert step(grads) == (1, 3)  # that parameter alone, stepped alone
    assert step() == (1, 4)
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    assert step() == (4, 4)
    assert all(opt.state[p]["step"].item() == 9 for p in ps[:4])  # the loaded counters advanced
    opt.add_param_group({"params": [ps[4]]})
    spy.decisions = 0
    for p, g in zip(ps, _grads(ps, 1)):
        p.grad = g
    opt.step()
    assert spy.decisions == 5


def test_loaded_counters_advance(monkeypatch):
    """``load_state_dict`` replaces the states (and their counters): the next step advances the loaded
    counters, not the ones the cached paths saw before."""
    ps = _params()[:2]
    opt = create_optimizer(ps, "adamw", lr=1e-2)
    for _ in range(3):
        for p, g in zip(ps, _grads(ps, 0)):
            p.grad = g
        opt.step()
    saved = opt.state_dict()
    saved["state"][0]["step"] = torch.tensor(40.0)
    opt.load_state_dict(saved)
    opt.step()
    assert [opt.state[p]["step"].item() for p in ps] == [41.0, 4.0]
    assert saved["state"][0]["step"].item() == 40.0  # (loaded as a copy)


def test_badam_decides_at_every_step():
    """A subclass overriding the decision (BAdam: the active block) gets no cached paths."""
    from lowmem.optim.engine import LowMemOptimizer as Engine

    ps = _params()[:2]
    opt = create_optimizer(ps, "badam", lr=1e-2)
    assert type(opt)._foreach_ok is not Engine._foreach_ok and opt._group_tokens() is None


class _Recording(dict):
    """A parameter group that records which keys are read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


class _WatchedLr(float):
    """An ``lr`` that records any use of its value (``isinstance`` is not a use: the route keys ``lr`` by its
    type, float or tensor)."""

    used: list[str]

    def _use(name):  # noqa: N805
        def method(self, *args):
            self.used.append(name)
            return getattr(float, name)(self, *args)
        return method

    for _n in ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__float__", "__int__",
               "__hash__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
               "__rtruediv__", "__pow__", "__rpow__", "__neg__", "__abs__", "__round__", "__repr__", "__str__",
               "__format__", "__trunc__", "__floor__", "__ceil__", "__mod__", "__divmod__", "__floordiv__"):
        locals()[_n] = _use(_n)
    del _n, _use


@pytest.mark.parametrize("name", [n for n in list_optimizers() if get_entry(n).recipe is not None])
def test_no_path_decision_reads_lr(name):
    """``lr`` is compared by its type only in the cached decision's key (schedulers change it at every
    step): no recipe's decision (:meth:`_route`'s: projected, batched, foreach, fused, bucket class) may
    read its value, before or after the state exists."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(24, 16)), torch.nn.Parameter(torch.randn(16)),
          torch.nn.Parameter(torch.randn(2, 8, 8))]
    recipe = get_entry(name).recipe
    hp = {"rank": 4} if recipe.projection is not None else {}
    opt = create_optimizer(ps, name, **hp)
    for stepped in (False, True):
        for group in opt.param_groups:
            for p in group["params"]:
                lr = _WatchedLr(1e-3 if group["lr"] is None else group["lr"])  # (None: Adafactor's relative step)
                lr.used = []
                rec = _Recording(group, lr=lr)
                state = opt.state[p] if stepped else {}
                opt._projected_foreach_ok(p, rec, p, state)
                opt._matrices_foreach_ok(p, rec, p, state)
                opt._foreach_ok(p, rec, p, state)
                opt._fused_whole(p, rec, state, p)
                opt.recipe.moment.foreach_bucket_class(p.shape, rec, state)
                assert not lr.used, (name, tuple(p.shape), lr.used)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()


def test_lr_turned_tensor_decides_again():
    """A float ``lr`` replaced by a tensor (torch's schedulers take either) leaves AdamW's fused kernel
    (which takes a float): the parameters it stepped whole, uncapped by ``chunk_numel``, join the capped
    buckets again, as deciding afresh does (before, the cached route kept them whole: a bucket of 576
    elements under ``chunk_numel=100``)."""

    def run(cached: bool) -> list[list[int]]:
        ps = _params()[:2]
        opt = create_optimizer(ps, "adamw", lr=1e-2)
        opt.chunk_numel = 100
        if not cached:
            _uncached(opt)
        sizes, bucket = [], opt.recipe.moment.foreach_step_
        opt.recipe.moment.foreach_step_ = lambda params, *a, **k: (sizes.append([p.numel() for p in params]),
                                                                    bucket(params, *a, **k))[1]
        try:
            for step in range(4):
                if step == 2:
                    opt.param_groups[0]["lr"] = torch.tensor(1e-2)
                for p, g in zip(ps, _grads(ps, step)):
                    p.grad = g
                opt.step()
                sizes.append([])
        finally:
            del opt.recipe.moment.foreach_step_
        return sizes

    cached = run(True)
    assert cached == run(False)
    assert max(max(s, default=0) for s in cached[-4:]) <= 100  # (after the change: capped)


def _cycling(name: str, cached: bool, spy_steps: list | None = None, monkeypatch=None, **hp):
    """``name`` stepped 6 times under torch's ``OneCycleLR`` with ``cycle_momentum=True`` (it writes
    ``betas`` or ``momentum`` and ``lr`` at every step); the decisions of each step in ``spy_steps``."""
    ps = _params()
    opt = create_optimizer(ps, name, lr=1e-2, weight_decay=0.1, **hp)
    opt.chunk_numel = 100
    if not cached:
        _uncached(opt)
    spy = _Spy(opt, monkeypatch) if spy_steps is not None else None
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10, cycle_momentum=True)
    for step in range(6):
        for p, g in zip(ps, _grads(ps, step)):
            p.grad = g
        if spy is not None:
            spy.decisions = 0
        opt.step()
        sched.step()
        if spy is not None:
            spy_steps.append(spy.decisions)
    return [p.detach().clone() for p in ps], opt


@pytest.mark.parametrize("name, hp", [("adamw", {}), ("adamw_sn", {}), ("galore_adamw", {"rank": 4}),
                                      ("muon", {}), ("sgd_sm", {"rank": 4}), ("adamw8bit", {})])
def test_cycled_settings_step_as_deciding_afresh(name, hp):
    """Under a scheduler cycling ``betas`` / ``momentum`` the cached paths step bit for bit as paths decided
    afresh at every step (the settings a decision reads, adamw_sn's ``betas[0] > 0``, still decide again)."""
    cached, opt = _cycling(name, True, **hp)
    fresh, _ = _cycling(name, False, **hp)
    assert opt.param_groups[0].get("betas", (None,))[0] != 0.95 or opt.param_groups[0].get("momentum") is not None
    for a, b in zip(cached, fresh):
        assert a.dtype == b.dtype and torch.equal(a, b), (name, (a - b).abs().max())


def test_scheduled_settings_decide_no_path_again(monkeypatch):
    """AdamW's decisions read neither ``betas`` nor ``lr``'s value: under ``OneCycleLR`` with momentum cycling
    the paths are decided at the first two steps (before and after the state exists), then never again;
    adamw_sn's read ``betas`` only as ``betas[0] > 0`` (no first moment when it is 0), the summary its rule
    gives (``MomentRule.route_settings``), so theirs too (tests/test_route2_settings.py: the other
    Subset-Norm recipes, and a switch to 0 deciding again)."""
    steps: list[int] = []
    _cycling("adamw", True, steps, monkeypatch)
    assert steps == [5, 5, 0, 0, 0, 0]
    steps = []
    _cycling("adamw_sn", True, steps, monkeypatch)
    assert steps == [5, 5, 0, 0, 0, 0]


def test_a_setting_read_later_joins_the_key(monkeypatch):
    """``foreach=False`` ends the decisions before they read anything else; after ``foreach`` comes back
    they read adamw_sn's ``betas``, which then decides again when it changes (the recorded settings grow,
    ``engine._GroupEntry.add_route_keys``). (A tensor ``betas[0]``: its rule has no summary of it,
    ``MomentRule.route_settings``, so it is compared by key; a float one is summarized as ``> 0``.)"""
    ps = _params()[:4]
    opt = create_optimizer(ps, "adamw_sn", lr=1e-2, foreach=False)
    spy = _Spy(opt, monkeypatch)

    def step():
        spy.decisions = 0
        for p, g in zip(ps, _grads(ps, 0)):
            p.grad = g
        opt.step()
        return spy.decisions

    assert [step(), step(), step()] == [4, 4, 0]
    opt.param_groups[0]["betas"] = (torch.tensor(0.8), 0.99)  # the summary gone: decided again
    assert [step(), step()] == [4, 0]
    opt.param_groups[0]["betas"] = (torch.tensor(0.75), 0.99)  # not read by these decisions
    assert step() == 0
    opt.param_groups[0]["foreach"] = None
    assert [step(), step()] == [4, 0]
    opt.param_groups[0]["betas"] = (torch.tensor(0.7), 0.99)  # read now
    assert [step(), step()] == [4, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_counter_view_advances_as_the_in_place_add(dtype):
    """The step counter written through its NumPy view (engine._advance_step_view) holds and returns
    what ``step += 1`` gives, also where float32 stops counting (2^24 + 1 rounds to 2^24); other
    dtypes (bf16, int) have no view and keep engine._advance_step."""
    from lowmem.optim.engine import _EXACT_INTEGERS, _advance_step_view, _step_view

    for v in [0, 1, 7, 2**24 - 1, 2**24, 2**24 + 2, 2**25 + 4, 2**53 - 1, 2**53, 0.1, 2.5, -3]:
        old, new = torch.tensor(v, dtype=dtype), torch.tensor(v, dtype=dtype)
        old += 1
        view = _step_view(new)
        t = _advance_step_view(new, view, _EXACT_INTEGERS[dtype])
        assert torch.equal(new, old) and t == old.item() and type(t) is float, (dtype, v, new, old, t)
    assert _step_view(torch.zeros((), dtype=torch.bfloat16)) is None and _step_view(torch.zeros((), dtype=torch.int64)) is None
