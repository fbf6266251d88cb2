"""An outside-in robustness audit of every registered engine optimizer, through the public API only.

What a sceptical user tries on a torch optimizer: a NaN / Inf in one tensor of a multi-tensor bucket (also among
mixed dtypes, at the first step, in layerwise mode), zero-size / 0-d / channels_last / float16 / float64 /
complex parameters, checkpoints loaded onto parameters of another dtype, ``copy.deepcopy``, torch's step and
state-dict hooks, settings out of range (and NumPy / tensor values), layerwise mode's ``add_param_group``,
hooks and settings, the global default dtype. The defects it found are fixed (session 13: FOUND_AUDITOPT 1-6,
e.g. complex parameters refused, deepcopy / pickle continuing bit for bit, load-state-dict post-hooks after the
state is rebuilt, Muon on channels_last, APOLLO's basis drawn float32 whatever the default dtype)."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lowmem.optim import LowMemOptimizer, create_optimizer, get_entry, optimizer_entries
from lowmem.optim.layerwise import LayerwiseOptimizer
from toy_problem import hparams_for, loss_fn, make_problem, train

ENGINE = [e.name for e in optimizer_entries() if e.generic_tests and e.recipe is not None]


def _hp(name, **extra):
    hp = hparams_for(name, **extra)
    if "rank" in hp:
        hp["rank"] = 2  # below every side of the small shapes here
    return hp


def _snapshot(opt, params):
    return [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


def _assert_same_state(before, after, name):
    for i, (a, b) in enumerate(zip(before, after)):
        assert a.keys() == b.keys(), f"{name}: parameter {i} state keys {sorted(a)} -> {sorted(b)}"
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: parameter {i} state {k!r} changed by a skipped step"


def _bucket(seed=0):
    """Four same-shape matrices and three same-shape vectors: they share multi-tensor buckets."""
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(8, 8, generator=g)) for _ in range(4)] + [
        nn.Parameter(torch.randn(8, generator=g)) for _ in range(3)]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


# ---- non-finite gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")], ids=["nan", "-inf"])
@pytest.mark.parametrize("name", ENGINE)
def test_nonfinite_in_one_tensor_of_a_bucket_keeps_every_parameter_and_state(name, bad):
    """docs/ARCHITECTURE.md: a non-finite gradient skips the whole step; no parameter of the bucket moves,
    no state tensor of any parameter changes, and the next finite step trains on."""
    ps = _bucket()
    opt = create_optimizer(ps, name, **_hp(name))
    for s in range(2):
        _grads(ps, s)
        opt.step()
    before, weights = _snapshot(opt, ps), [p.detach().clone() for p in ps]
    _grads(ps, 2)
    ps[2].grad[1, 3] = bad
    with pytest.warns(UserWarning, match="non-finite"):
        opt.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, ps)), f"{name}: a parameter moved"
    _assert_same_state(before, _snapshot(opt, ps), name)
    assert opt.skipped_steps == 1
    _grads(ps, 3)
    opt.step()
    assert all(torch.isfinite(p).all() for p in ps) and opt.skipped_steps == 1


@pytest.mark.parametrize("name", ENGINE)
def test_inf_in_a_float16_tensor_among_mixed_dtypes_skips_the_step(name):
    """Same-shape parameters of four dtypes (float32 twice, bfloat16, float16, float64): an Inf in the float16
    gradient skips the step for all of them (the check converts each dtype's norm, none is missed)."""
    g = torch.Generator().manual_seed(0)
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32)
    ps = [nn.Parameter(torch.randn(8, 8, generator=g).to(dt)) for dt in dtypes]
    opt = create_optimizer(ps, name, **_hp(name))
    for s in range(2):
        _grads_like(ps, s)
        opt.step()
    before, weights = _snapshot(opt, ps), [p.detach().clone() for p in ps]
    _grads_like(ps, 2)
    ps[2].grad[0, 0] = float("inf")
    with pytest.warns(UserWarning, match="non-finite"):
        opt.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, ps))
    _assert_same_state(before, _snapshot(opt, ps), name)
    _grads_like(ps, 3)
    opt.step()
    assert opt.skipped_steps == 1 and all(torch.isfinite(p).all() for p in ps)


def _grads_like(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


@pytest.mark.parametrize("name", ENGINE)
def test_nonfinite_first_step_allocates_and_counts_nothing(name):
    """A non-finite gradient at the very first step: no state appears (state_bytes stays 0), so the first
    finite step is step 1 (bias corrections) exactly as in a run without the bad step."""
    ps, twin = _bucket(), _bucket()
    opt, ref = create_optimizer(ps, name, **_hp(name)), create_optimizer(twin, name, **_hp(name))
    _grads(ps, 0)
    ps[5].grad[0] = float("inf")
    with pytest.warns(UserWarning, match="non-finite"):
        opt.step()
    assert opt.state_bytes() == 0 and all(len(opt.state[p]) == 0 for p in ps)
    for s in (1, 2):
        _grads(ps, s)
        _grads(twin, s)
        opt.step()
        ref.step()
    for a, b in zip(ps, twin):
        assert torch.equal(a, b), f"{name}: the skipped first step changed the trajectory"


@pytest.mark.parametrize("name", ENGINE)
def test_layerwise_nonfinite_leaves_that_and_later_parameters_untouched(name):
    """Layerwise mode (docs/ARCHITECTURE.md): the parameter whose gradient is non-finite and every one whose
    gradient arrives later in that step keep their weights and state; the next step trains normally."""
    model, x, y = make_problem()
    opt = LayerwiseOptimizer(model, name, **_hp(name))
    for _ in range(2):
        loss_fn(model, x, y).backward()
        opt.step()
    params = list(model.parameters())
    order = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: order.append(i)) for i, p in enumerate(params)]
    bad = model.norm.weight  # its gradient arrives in the middle of the backward pass
    hooks.append(bad.register_hook(lambda g: torch.full_like(g, float("nan"))))
    before, weights = _snapshot(opt, params), [p.detach().clone() for p in params]
    with pytest.warns(UserWarning, match="non-finite"):
        loss_fn(model, x, y).backward()
    opt.step()
    for h in hooks:
        h.remove()
    after = _snapshot(opt, params)
    first_bad = order.index(next(i for i, p in enumerate(params) if p is bad))
    assert 0 < first_bad < len(order) - 1  # some stepped before, some not after
    for i in order[first_bad:]:
        assert torch.equal(weights[i], params[i]), f"{name}: parameter {i} moved after the NaN"
        _assert_same_state([before[i]], [after[i]], name)
    assert all(p.grad is None for p in params)
    loss_fn(model, x, y).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(w, p) for w, p in zip(weights, params)), f"{name}: the step after did not train"


# ---- shapes, layouts and dtypes ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 4), (0,), (), (1, 1)], ids=["0x4", "0", "0-d", "1x1"])
@pytest.mark.parametrize("name", ENGINE)
def test_degenerate_parameter_steps_saves_and_loads(name, shape):
    """A zero-size, 0-d or 1 x 1 parameter next to a real one: the step runs (Stable-SPAM's max |g| of an empty
    tensor raised in aminmax), nothing becomes non-finite, state_bytes is exact and the state round-trips."""
    g = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(shape, generator=g)), nn.Parameter(torch.randn(6, 5, generator=g))]
    opt = create_optimizer(ps, name, **_hp(name))
    for s in range(3):
        _grads(ps, s)
        opt.step()
    assert all(torch.isfinite(p).all() for p in ps)
    assert opt.state_bytes() == sum(v.untyped_storage().nbytes() for p in ps for v in opt.state[p].values())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    again = create_optimizer(ps, name, **_hp(name))
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.state_bytes() == opt.state_bytes()


@pytest.mark.parametrize("name", ENGINE)
def test_channels_last_conv_weight_equals_its_contiguous_twin(name):
    """Two channels_last 4-D weights (one bucket) step as their contiguous twins (to the last bits) and stay
    channels_last (Adam-mini's multi-tensor block means viewed a channels_last stack: a RuntimeError). SinkGD refuses
    a 4-D weight in its targeted group by name (no reference reading of a convolution kernel; AUDMATH21 1), in either
    layout."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 6, 5, 5, generator=g) for _ in range(2)]
    cl = [nn.Parameter(w.clone().to(memory_format=torch.channels_last)) for w in ws]
    plain = [nn.Parameter(w.clone()) for w in ws]
    if name == "sinkgd":
        for params in (cl, plain):
            with pytest.raises(ValueError, match=r"shape \[8, 6, 5, 5\] in a use_sinkgd group"):
                create_optimizer(params, name, **_hp(name))
        return
    a, b = create_optimizer(cl, name, **_hp(name)), create_optimizer(plain, name, **_hp(name))
    for s in range(4):
        _grads(plain, s)
        for p, q in zip(cl, plain):
            p.grad = q.grad.clone().to(memory_format=torch.channels_last)
        a.step()
        b.step()
    for p, q in zip(cl, plain):
        # (the same math; a kernel's vector / tail split follows the memory layout: last-bit differences)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert p.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ENGINE)
def test_complex_parameter_is_refused_clearly(name):
    """The engine's state and math are real: a complex parameter must be refused naming it, not stepped."""
    p = nn.Parameter(torch.randn(8, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        opt = create_optimizer([p], name, **_hp(name))
        p.grad = torch.randn_like(p)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
@pytest.mark.parametrize("name", ENGINE)
def test_fp16_and_fp64_parameters_train_and_keep_their_dtype(name, dtype):
    model, x, y = make_problem(dtype=dtype)
    opt = create_optimizer(model, name, **hparams_for(name))
    losses = train(model, opt, x, y, 6)
    assert losses[-1] < losses[0], f"{name}: {losses}"
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    assert opt.skipped_steps == 0


# ---- torch conventions: deepcopy, hooks ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ENGINE)
def test_deepcopy_of_model_and_optimizer_continues_identically(name):
    model, x, y = make_problem()
    opt = create_optimizer(model, name, **hparams_for(name))
    train(model, opt, x, y, 2)
    loss_fn(model, x, y).backward()
    model.fc1.weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning):
        opt.step()
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.skipped_steps == opt.skipped_steps == 1
    train(model, opt, x, y, 3)
    train(model2, opt2, x, y, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ENGINE)
def test_step_and_state_dict_hooks_run_once_each(name):
    """torch's optimizer hooks, each once per call, also after a plain ``LowMemOptimizer`` exists in the process
    (torch then wraps ``LowMemOptimizer.step`` with its hook runner: BAdam's ``step``, which calls it, ran every
    step hook twice)."""
    LowMemOptimizer([nn.Parameter(torch.zeros(2))], get_entry("adamw").recipe)  # wraps LowMemOptimizer.step
    model, x, y = make_problem()
    opt = create_optimizer(model, name, **hparams_for(name))
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("step_post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("state_dict_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    train(model, opt, x, y, 1)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["step_pre", "step_post", "state_dict_post", "load_pre", "load_post"]


# ---- layerwise mode: add_param_group and hooks ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "galore_adamw", "adafactor", "badam"])
def test_layerwise_add_param_group_is_validated_and_stepped(name):
    model, x, y = make_problem()
    opt = LayerwiseOptimizer(model, name, **_hp(name))
    n = len(opt.param_groups)
    extra = nn.Parameter(torch.ones(5))
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [extra], "lr": -1.0})
    with pytest.raises(ValueError, match="rnak"):
        opt.add_param_group({"params": [extra], "rnak": 3})
    assert len(opt.param_groups) == len(opt.inner.param_groups) == n
    if name != "badam":  # (a BAdam group is a block, stepped in its turn)
        opt.add_param_group({"params": [extra]})
        assert opt.param_groups is opt.inner.param_groups and len(opt.param_groups) == n + 1
        (loss_fn(model, x, y) + extra.sum()).backward()
        opt.step()
        assert extra.grad is None and not torch.equal(extra, torch.ones(5)) and opt.state[extra]


def test_layerwise_state_dict_hooks_run():
    model, x, y = make_problem()
    opt = LayerwiseOptimizer(model, "adamw", lr=1e-2)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("state_dict_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": torch.tensor(7)})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load_pre", int(sd.pop("tag")))) or sd)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    loss_fn(model, x, y).backward()
    opt.step()
    sd = opt.state_dict()
    assert "tag" in sd and "layerwise" in sd
    opt.load_state_dict(sd)
    assert calls == ["state_dict_pre", ("load_pre", 7), "load_post"]


# ---- hyperparameter validation ---------------------------------------------------------------------------------

#: values outside each field's documented range (torch.optim raises ValueError for the same lr / betas / eps /
#: weight_decay: "Invalid learning rate", "Invalid beta parameter at index 1", ...)
_OUT_OF_RANGE = {
    "lr": [-1e-3, float("inf"), float("nan")], "betas": [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.9), (0.9,)],
    "eps": [-1e-8, float("nan")], "weight_decay": [-0.1], "rank": [0, -1, 2.5, True, 100000],
    "update_proj_gap": [0, -5, 1.5], "block_size": [0, 48, 63, 100], "quant_block_size": [0, -64],
    "topk_block_size": [0, 32769], "min_quant_size": [-1], "momentum": [1.0, -0.1], "scale": [-1.0],
    "switch_every": [0], "m": [0], "k_init": [0.0, 1.5], "head_dim": [0, -2], "threshold": [-1.0],
    "warmup_steps": [-1], "reset_interval": [-1, 1.5], "t_max": [0], "gamma1": [1.0], "gamma2": [1.0],
    "theta": [1.5], "clip_threshold": [0.0], "beta1": [1.0], "ns_steps": [0], "sinkhorn_iters": [0],
    "proj_lr": [-1.0], "grad_accu_steps": [-1], "state_dtype": ["float16"], "foreach": ["yes"],
}


@pytest.mark.parametrize("name", ENGINE)
def test_out_of_range_hyperparameters_raise_naming_field_and_range(name):
    valid = get_entry(name).valid_hparams()
    model = make_problem()[0]
    checked = 0
    for field, values in _OUT_OF_RANGE.items():
        if field not in valid:
            continue
        for value in values:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a warning and a clamp would not do
                with pytest.raises(ValueError, match=rf"{field}\b") as err:
                    create_optimizer(model, name, **{**hparams_for(name), field: value})
            assert "expected" in str(err.value) or "valid" in str(err.value), str(err.value)
            checked += 1
    assert checked >= 4  # lr, eps / betas, weight_decay, state_dtype, foreach at least
    # torch.optim's maximize / capturable / differentiable are no setting here: refused by name, never ignored
    for field in ("maximize", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=rf"Unknown hyperparameter.*{field}.*valid"):
            create_optimizer(model, name, **{**hparams_for(name), field: True})


# ---- checkpoints onto parameters of another dtype -----------------------------------------------------------


def _layout(opt, model):
    return {(i, k): (v.dtype, tuple(v.shape))
            for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["fp32-to-bf16", "bf16-to-fp32"])
@pytest.mark.parametrize("name", ENGINE)
def test_checkpoint_loads_onto_parameters_of_another_dtype(name, dtypes):
    """torch casts a loaded state to its parameter's dtype: a weights_only checkpoint of a float32 run loads into
    the same model in bfloat16 (and back) with the state a fresh optimizer of that dtype would hold, and trains on
    (BAdam refused it: its bf16 parameters' float32 ``master`` copy was missing from a float32 run's state)."""
    saved_dtype, dtype = dtypes
    model, x, y = make_problem(dtype=saved_dtype)
    opt = create_optimizer(model, name, **hparams_for(name))
    train(model, opt, x, y, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    target = copy.deepcopy(model).to(dtype)
    loaded = create_optimizer(target, name, **hparams_for(name))
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    fresh_model = copy.deepcopy(model).to(dtype)
    fresh = create_optimizer(fresh_model, name, **hparams_for(name))
    train(fresh_model, fresh, x.to(dtype), y.to(dtype), 1)
    assert _layout(loaded, target) == _layout(fresh, fresh_model)
    losses = train(target, loaded, x.to(dtype), y.to(dtype), 3)
    assert all(torch.isfinite(p).all() for p in target.parameters()) and loaded.skipped_steps == 0, losses
    held = [v for st in loaded.state.values() for v in st.values()]
    assert loaded.state_bytes() == sum(v.untyped_storage().nbytes() for v in held)


def test_spam_refuses_a_float16_second_moment_and_trains_with_float32_state():
    """SPAM's spike clipping over ``v`` stored in float16 (``state_dtype="param"`` on float16 parameters): ``v``
    underflows to 0, every small entry counts as a spike and is zeroed, Adam divides the momentum by eps; the loss
    went 0.686 -> 4.08 in 6 steps. Refused, naming the setting; the default float32 state trains."""
    model, x, y = make_problem(dtype=torch.float16)
    with pytest.raises(ValueError, match=r"state_dtype='param'.*float16.*'float32' or 'bfloat16'"):
        create_optimizer(model, "spam", state_dtype="param", **hparams_for("spam"))
    opt = create_optimizer(model, "spam", **hparams_for("spam"))
    losses = train(model, opt, x, y, 6)
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("name", ENGINE)
def test_state_dtype_param_on_float64_parameters_trains_or_is_refused(name):
    """``state_dtype="param"`` on float64 parameters: the run trains in float64 (finite, dtype kept, loss falls), or
    the setting is refused naming it; never an error from inside the step (GaLore's projected moments became
    float64 while the basis stayed float32: a matmul dtype mismatch at the first step)."""
    model, x, y = make_problem(dtype=torch.float64)
    try:
        opt = create_optimizer(model, name, state_dtype="param", **hparams_for(name))
    except ValueError as err:
        assert "state_dtype" in str(err)
        return
    losses = train(model, opt, x, y, 5)
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in model.parameters())


def test_layerwise_copy_is_refused_clearly_and_its_state_dict_is_the_way():
    """A deep copy of a LayerwiseOptimizer failed at its first step (AttributeError: torch's __getstate__ dropped
    its hook bookkeeping; the hooks stayed on the original parameters). Refused at the copy, naming the way that
    works: a new LayerwiseOptimizer on the copied model loading the state dict continues bit for bit."""
    model, x, y = make_problem()
    opt = LayerwiseOptimizer(model, "adamw", lr=1e-2)
    for _ in range(2):
        loss_fn(model, x, y).backward()
        opt.step()
    with pytest.raises(TypeError, match="load_state_dict"):
        copy.deepcopy((model, opt))
    twin = copy.deepcopy(model)
    again = LayerwiseOptimizer(twin, "adamw", lr=1e-2)
    again.load_state_dict(opt.state_dict())
    for m, o in ((model, opt), (twin, again)):
        for _ in range(2):
            loss_fn(m, x, y).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("value", [np.float32(1e-3), torch.tensor(1e-3), (np.float32(0.9), 0.999)],
                         ids=["np.float32", "tensor", "np-beta"])
def test_numpy_and_tensor_settings_are_refused_naming_their_type(value):
    """torch.optim takes ``lr=np.float32(1e-3)`` or a tensor lr; lowmem's checks take Python numbers. The refusal
    said ``Invalid lr=np.float32(0.001): expected a finite float >= 0``, which reads as a contradiction: it names the
    type and the fix."""
    field = "betas" if isinstance(value, tuple) else "lr"
    with pytest.raises(ValueError, match=rf"Invalid {field}=.*got a (numpy\.float32|torch\.Tensor).*float\(x\)"):
        create_optimizer([nn.Parameter(torch.zeros(3))], "adamw", **{field: value})
    create_optimizer([nn.Parameter(torch.zeros(3))], "adamw", **{field: _plain(value)})  # the plain number is taken


def _plain(value):
    return tuple(float(v) for v in value) if isinstance(value, tuple) else float(value)


def test_load_state_dict_post_hook_sees_the_final_state():
    """torch runs the load-state-dict post-hooks last: what a hook sets in the state stays, and a refused
    checkpoint is not announced to them. The engine rebuilt the state after torch's hooks had run."""
    model, x, y = make_problem()
    opt = create_optimizer(model, "adamw", lr=1e-2)
    train(model, opt, x, y, 2)
    sd = opt.state_dict()
    p = next(model.parameters())
    again = create_optimizer(model, "adamw", lr=1e-2)
    again.register_load_state_dict_post_hook(
        lambda o: o.state[p].__setitem__("exp_avg", torch.full_like(o.state[p]["exp_avg"], 7.0)))
    again.load_state_dict(sd)
    assert (again.state[p]["exp_avg"] == 7).all()
    calls = []
    other = create_optimizer(model, "adamw8bit", lr=1e-2, min_quant_size=64, block_size=64)
    other.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    with pytest.raises(ValueError):
        other.load_state_dict(sd)
    assert calls == []


@pytest.mark.parametrize("setting", [{"accumulation_steps": True}, {"accumulation_steps": 0},
                                     {"max_grad_norm": True}, {"max_grad_norm": "1.0"},
                                     {"max_grad_norm": float("inf")}, {"clip_mode": "global"}],
                         ids=["accum-True", "accum-0", "clip-True", "clip-str", "clip-inf", "mode"])
def test_layerwise_settings_out_of_range_raise_naming_them(setting):
    """``True`` passed for a number is no silent 1 (bool is an int in Python); a string is a ValueError naming the
    setting, not a TypeError from a comparison."""
    (field, _), = setting.items()
    with pytest.raises(ValueError, match=field):
        LayerwiseOptimizer(make_problem()[0], "adamw", **setting)


@pytest.mark.parametrize("name", ENGINE)
def test_trajectory_does_not_depend_on_the_global_default_dtype(name):
    """A float32 model trains bit for bit the same under ``torch.set_default_dtype(torch.float64)`` (a setting of the
    user's script): nothing the step allocates or draws may follow the global default (APOLLO's random basis did)."""
    runs = []
    for default in (torch.float32, torch.float64):
        model, x, y = make_problem()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            opt = create_optimizer(model, name, **hparams_for(name))
            train(model, opt, x, y, 2)
        finally:
            torch.set_default_dtype(previous)
        runs.append(([p.detach().clone() for p in model.parameters()],
                     {(i, k): v.dtype for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}))
    (w32, s32), (w64, s64) = runs
    assert s32 == s64
    assert all(torch.equal(a, b) for a, b in zip(w32, w64))
