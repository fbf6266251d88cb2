"""A setting that fixes the state's layout, changed in ``param_groups`` between steps, is refused at the next step
before any parameter or state is touched (lowmem.optim.group_layout); settings that do not change the layout stay
live, as in torch (docs/optimizers.md, "Settings changed during a run")."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from lowmem.optim import LowMemOptimizer, create_optimizer
from lowmem.optim.registry import get_entry, list_optimizers

SHAPES = [(24, 16), (16, 40), (40,), (3, 4)]

#: setting -> (the value given to the constructor, or None for the default; the value it is changed to).
#: Each changes the layout of one of SHAPES' states in every recipe that has the setting.
CHANGES = {
    "rank": (4, 2),
    "proj_type": ("std", "left"),
    "block_size": (None, 64),
    "min_quant_size": (16, 10),  # (3, 4): 12 values, quantized under 10
    "v_normalization": ("block", "rank1"),
    "subset_size": (None, 4),
    "subset_norm": (True, False),
    "m": (10, 2),
    "use_muon": (True, False),
    "use_sinkgd": (True, False),
    "scale_role": ("hidden", "head"),
    "state_dtype": ("float32", "bfloat16"),
    "beta1": (None, 0.9),
    "proj_optimizer": ("adam", "sgd"),
}


#: (recipe, setting) -> (constructor value, new value): settings of one recipe only, or ones live elsewhere
#: (betas, momentum: live but for 0 <-> > 0, which adds or drops the first moment)
SPECIAL = {
    ("adam_mini", "block"): ("tensor", "row"),  # (Adam-mini's partition; BAdam's 'block' is a block index)
    ("adamw_sn", "betas"): ((0.0, 0.999), (0.9, 0.999)),
    ("adagrad_sn", "momentum"): (0.0, 0.9),
    ("sgd", "momentum"): (0.0, 0.9), ("rmsprop", "momentum"): (0.0, 0.9), ("rmsprop", "centered"): (False, True),
}


def _engine_names() -> list[str]:
    return [n for n in list_optimizers() if get_entry(n).recipe is not None]


def _cases() -> list[tuple[str, str]]:
    out = []
    for name in _engine_names():
        known = get_entry(name).recipe.all_hparams()
        if name == "lomo":  # (no state: its state_dtype fixes nothing)
            continue
        out += [case for case in SPECIAL if case[0] == name]
        # (microadam keeps its own dtypes: state_dtype fixes nothing there)
        # (sgd at its default momentum 0 keeps no state: state_dtype fixes nothing there either)
        out += [(name, s) for s in CHANGES if s in known and (name, s) not in (("microadam", "state_dtype"),
                                                                                ("sgd", "state_dtype"))]
        if "projection" in known and "columns" in known["projection"].valid:  # a basis -> index sets
            out.append((name, "projection"))
    return out


def _change(name: str, setting: str) -> tuple:
    if (name, setting) in SPECIAL:
        return SPECIAL[name, setting]
    return ("svd", "columns") if setting == "projection" else CHANGES[setting]


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(ps: list[nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def _make(name: str, setting: str, ps: list[nn.Parameter]) -> LowMemOptimizer:
    known = set(get_entry(name).recipe.all_hparams())
    hp: dict = {}
    if "rank" in known:
        hp["rank"] = 4
    if "min_quant_size" in known:
        hp["min_quant_size"] = 16
    first = _change(name, setting)[0]
    if first is not None:
        hp[setting] = first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_optimizer(ps, name, **hp)


def _state(opt: LowMemOptimizer) -> list[dict]:
    return [{k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for s in opt.state.values()]


@pytest.mark.parametrize("name,setting", _cases(), ids=lambda v: v)
def test_a_layout_setting_changed_between_steps_is_refused_before_any_update(name, setting):
    ps = _params()
    opt = _make(name, setting, ps)
    new = _change(name, setting)[1]
    for t in range(2):
        _grads(ps, t)
        opt.step()
    i = next(i for i, g in enumerate(opt.param_groups) if setting in g and g[setting] != new)
    old = opt.param_groups[i][setting]
    params, state = [p.detach().clone() for p in ps], _state(opt)
    opt.param_groups[i][setting] = new
    _grads(ps, 2)
    with pytest.raises(ValueError, match=rf"{name}: parameter group {i}: setting '{setting}' changed from"
                                         rf" {re.escape(repr(old))} to {re.escape(repr(new))} .*make a new optimizer,"
                                         " or load a checkpoint saved with these settings"):
        opt.step()
    # nothing of the step was applied
    assert all(torch.equal(p, q) for p, q in zip(ps, params))
    after = _state(opt)
    assert len(after) == len(state)
    assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(after, state))
    # the old value back: the run continues
    opt.param_groups[i][setting] = old
    opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(ps, params))


def test_live_settings_changed_between_steps_match_torch_adamw():
    """lr, betas, eps, weight_decay stay live (read at every step) as on torch.optim.AdamW."""
    ours, theirs = _params(), _params()
    a = create_optimizer(ours, "adamw", lr=1e-2, weight_decay=0.1)
    b = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    for t in range(6):
        if t == 3:
            for o in (a, b):
                o.param_groups[0].update(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)
        _grads(ours, t)
        _grads(theirs, t)
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert (p - q).abs().max() < 1e-5


@pytest.mark.parametrize("change", [{"lr": 3e-2}, {"scale": 0.5}, {"update_proj_gap": 2}, {"projection": "random"},
                                    {"moment_policy": "reset"}, {"betas": (0.8, 0.99)}], ids=lambda c: next(iter(c)))
def test_live_subspace_settings_stay_live(change):
    """Settings read when the state is made that give it the same layout (GaLore's projection svd -> random,
    moment_policy) or not read there at all: accepted, and they change the run."""
    runs = []
    for live in (False, True):
        ps = _params()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = create_optimizer(ps, "galore_adamw", rank=4, update_proj_gap=3)
        for t in range(7):
            if live and t == 2:
                opt.param_groups[0].update(change)
            _grads(ps, t)
            opt.step()
        runs.append(ps)
    assert any((p - q).abs().max() > 1e-6 for p, q in zip(*runs))


def test_betas_changed_at_every_step_on_a_recipe_that_reads_them_for_its_state():
    """adamw_sn reads betas when it makes its state (beta1 0: no first moment): a scheduler changing them at every
    step is accepted (same layout) and reaches the step."""
    runs = []
    for sched in (False, True):
        ps = _params()
        opt = create_optimizer(ps, "adamw_sn", lr=1e-2)
        for t in range(5):
            if sched:
                opt.param_groups[0]["betas"] = (0.9 - 0.05 * t, 0.999)
            _grads(ps, t)
            opt.step()
        runs.append(ps)
    assert any((p - q).abs().max() > 1e-6 for p, q in zip(*runs))


def test_a_group_added_later_is_covered():
    ps = _params()
    extra = nn.Parameter(torch.randn(32, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer(ps, "galore_adamw", rank=4)
    _grads(ps, 0)
    opt.step()
    opt.add_param_group({"params": [extra], "rank": 4})
    for t in (1, 2):
        _grads(ps, t)
        extra.grad = torch.randn(32, 20)
        opt.step()
    opt.param_groups[-1]["rank"] = 6
    _grads(ps, 3)
    with pytest.raises(ValueError, match=rf"parameter group {len(opt.param_groups) - 1}: setting 'rank' changed from 4 to 6"):
        opt.step()


def test_load_state_dict_then_continue_and_a_change_after_it():
    ps = _params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer(ps, "galore_adamw", rank=4)
        _grads(ps, 0)
        opt.step()
        sd = opt.state_dict()
        qs = [nn.Parameter(p.detach().clone()) for p in ps]
        other = create_optimizer(qs, "galore_adamw", rank=4)
        _grads(qs, 1)
        other.step()  # (its own state first: the load replaces it and its groups)
        other.load_state_dict(sd)
        with torch.no_grad():  # (and its parameters moved: start both runs from the same values)
            for p, q in zip(ps, qs):
                q.copy_(p)
    for t in (1, 2):
        _grads(ps, t)
        _grads(qs, t)
        opt.step()
        other.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    other.param_groups[0]["rank"] = 2
    _grads(qs, 3)
    with pytest.raises(ValueError, match=r"parameter group 0: setting 'rank' changed from 4 to 2"):
        other.step()


@pytest.mark.parametrize("name,setting,new", [("galore_adamw", "rank", 2), ("adam_mini", "block", "row"),
                                              ("adamw_sn", "subset_size", 4)])
def test_a_layout_setting_changed_between_load_state_dict_and_the_first_step(name, setting, new):
    """State that exists before the group's first step (loaded, or materialized): checked against the settings then."""
    ps = _params()
    hp = {"rank": 4} if setting == "rank" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer(ps, name, **hp)
        _grads(ps, 0)
        opt.step()
        other = create_optimizer(ps, name, **hp)
    other.load_state_dict(opt.state_dict())
    other.param_groups[0][setting] = new
    params = [p.detach().clone() for p in ps]
    _grads(ps, 1)
    with pytest.raises(ValueError, match=rf"{name}: parameter group 0: the state of a .* made before this step .*"
                                         rf"{setting}={re.escape(repr(new))}.*load a checkpoint saved with these settings"):
        other.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, params))
    other.param_groups[0][setting] = opt.param_groups[0][setting]  # (back to the state's: the run continues)
    other.step()
    assert any(not torch.equal(p, q) for p, q in zip(ps, params))


def test_layerwise_refuses_before_any_parameter_is_stepped():
    from lowmem.optim.layerwise import LayerwiseOptimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = LayerwiseOptimizer(model, "galore_adamw", rank=4)
    x = torch.randn(5, 16)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    group = next(g for g in opt.param_groups if g.get("rank") is not None)
    group["rank"] = 2
    with pytest.raises(ValueError, match=r"setting 'rank' changed from 4 to 2"):
        model(x).square().mean().backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_sharded_parameters_are_covered(tmp_path):
    """FSDP2 DTensor parameters (one process, a gloo group of one): the layout of their local shards is probed."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        ps = [nn.Parameter(distribute_tensor(torch.randn(s), mesh, [Shard(0)])) for s in SHAPES[:3]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = create_optimizer(ps, "galore_adamw", rank=4)
        for t in range(3):
            if t == 2:
                opt.param_groups[0]["rank"] = 2
            for p in ps:
                p.grad = distribute_tensor(torch.randn(p.shape), mesh, [Shard(0)])
            if t < 2:
                opt.step()
        before = [p.detach().full_tensor().clone() for p in ps]
        with pytest.raises(ValueError, match=r"parameter group 0: setting 'rank' changed from 4 to 2 .*\(this shard\)"):
            opt.step()
        assert all(torch.equal(p.detach().full_tensor(), q) for p, q in zip(ps, before))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name,setting", _cases(), ids=lambda v: v)
def test_meta_layout_is_the_fake_tensor_layout(name, setting):
    """The layout check probes ``_init_state`` on a meta twin of each parameter (group_layout.meta_layout:
    issue 15, ~0.03 ms instead of ~0.25 ms on fake tensors): for every recipe, under both values of each of
    its layout settings, on 2-D, 1-D and batched parameters, the twin's entries, shapes, dtypes and the settings
    read are those of the parameter's own device (the CPU, on fake tensors: LowMemOptimizer._probe_state)."""
    from lowmem.optim.group_layout import _Reads, meta_layout

    ps = _params() + [nn.Parameter(torch.randn(2, 8, 6))]
    opt = _make(name, setting, ps)
    for value in _change(name, setting):
        for group in opt.param_groups:
            if value is not None and setting in group:
                group[setting] = value
            for p in group["params"]:
                on_meta, on_cpu = _Reads(group), _Reads(group)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fake = {k: (tuple(v.shape), v.dtype) for k, v in opt._probe_state(p, on_cpu).items()
                            if isinstance(v, torch.Tensor)}
                    meta = meta_layout(opt, p, on_meta)
                assert meta == fake, (name, setting, value, tuple(p.shape))
                assert on_meta.read == on_cpu.read, (name, setting, value, tuple(p.shape))


def test_a_cycled_setting_read_for_the_state_is_probed_on_meta(monkeypatch):
    """adamw_sn's ``betas`` (``betas[0] > 0``: a first moment) cycled by torch's ``OneCycleLR`` at every step: the
    check probes the layout at each change without fake tensors, the run is the one without the check, and
    ``betas[0]`` -> 0 is still refused before the step."""
    import torch._subclasses.fake_tensor as ft

    def run(check: bool) -> list[torch.Tensor]:
        ps = _params()
        opt = create_optimizer(ps, "adamw_sn", lr=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10, cycle_momentum=True)
        with monkeypatch.context() as m:
            if not check:
                m.setattr("lowmem.optim.engine.check_group_layouts", lambda opt: None)
            for t in range(5):
                _grads(ps, t)
                opt.step()
                sched.step()
        if check:
            opt.param_groups[0]["betas"] = (0.0, 0.999)
            with pytest.raises(ValueError, match="setting 'betas' changed from"):
                opt.step()
        return [p.detach().clone() for p in ps]

    entered = []
    real = ft.FakeTensorMode.__enter__
    monkeypatch.setattr(ft.FakeTensorMode, "__enter__", lambda self: (entered.append(1), real(self))[1])
    checked = run(True)
    assert not entered
    assert all(torch.equal(a, b) for a, b in zip(checked, run(False)))
