"""One generic suite over every registered engine optimizer (in the spirit of torch's OptimizerInfo).

Each optimizer in ``lowmem.list_optimizers()`` with ``generic_tests=True`` is checked for: falling
loss, exact resume through a ``weights_only`` checkpoint, zero and ``None`` gradients, bf16 / 1-D /
3-D parameters, state dtypes surviving ``load_state_dict``, exact ``state_bytes()``, skipped
non-finite steps, the closure contract and hyperparameter validation. A new recipe registered
with one line is covered here without new tests.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import lowmem
from lowmem.optim import LowMemOptimizer, create_optimizer, get_entry, optimizer_entries
from toy_problem import Toy, hparams_for, loss_fn, make_problem, train

ENGINE = [e.name for e in optimizer_entries() if e.generic_tests and e.recipe is not None]


def state_tensors(opt):
    return [v for st in opt.state.values() for v in st.values()]


@pytest.mark.parametrize("name", ENGINE)
def test_loss_falls(name):
    model, x, y = make_problem()
    opt = create_optimizer(model, name, **hparams_for(name))
    losses = train(model, opt, x, y, 60)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"


@pytest.mark.parametrize("name", ENGINE)
def test_resume_is_identical_and_weights_only(name):
    """k steps, checkpoint (weights_only load), fresh optimizer, n more steps == k + n steps."""
    model_a, x, y = make_problem()
    model_b = copy.deepcopy(model_a)
    hp = hparams_for(name)
    opt_a = create_optimizer(model_a, name, **hp)
    train(model_a, opt_a, x, y, 10)  # uninterrupted reference (10 steps)

    opt_b = create_optimizer(model_b, name, **hp)
    train(model_b, opt_b, x, y, 4)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "optim": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # must not need pickled objects

    model_c, _, _ = make_problem(seed=123)  # different init, overwritten by the checkpoint
    model_c.load_state_dict(ckpt["model"])
    opt_c = create_optimizer(model_c, name, **hp)
    opt_c.load_state_dict(ckpt["optim"])
    train(model_c, opt_c, x, y, 6)
    for (n, pa), pc in zip(model_a.named_parameters(), model_c.parameters()):
        torch.testing.assert_close(pc, pa, rtol=0, atol=0, msg=f"{name}: {n} differs after resume")


@pytest.mark.parametrize("name", ENGINE)
def test_state_is_tensors_and_state_bytes_exact(name):
    model, x, y = make_problem()
    opt = create_optimizer(model, name, **hparams_for(name))
    train(model, opt, x, y, 3)
    values = state_tensors(opt)
    assert values and all(isinstance(v, torch.Tensor) for v in values), "state must hold tensors only"
    # counted independently: the distinct storages the state really holds (a view into a larger
    # buffer, or two keys sharing one, would make numel * element_size lie about memory) ...
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in values}
    assert opt.state_bytes() == sum(storages.values())
    # ... and what a weights_only checkpoint gives back to a fresh optimizer
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    reloaded = create_optimizer(model, name, **hparams_for(name))
    reloaded.load_state_dict(torch.load(buf, weights_only=True))
    assert reloaded.state_bytes() == opt.state_bytes()
    # the meta-device accounting used by the estimator allocates the same state
    fresh = create_optimizer(make_problem()[0], name, **hparams_for(name))
    fresh.materialize_state()
    assert fresh.state_bytes() == opt.state_bytes()


@pytest.mark.parametrize("name", ENGINE)
def test_none_and_zero_grads(name):
    model, x, y = make_problem()
    opt = create_optimizer(model, name, **hparams_for(name))
    loss_fn(model, x, y).backward()
    model.fc2.weight.grad = None  # this parameter must not move nor get state
    model.fc2.bias.grad.zero_()  # a zero gradient is a legal gradient
    before = model.fc2.weight.detach().clone()
    opt.step()
    assert torch.equal(model.fc2.weight, before)
    assert len(opt.state[model.fc2.weight]) == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for v in state_tensors(opt) if v.is_floating_point())


@pytest.mark.parametrize("name", ENGINE)
def test_nonfinite_gradient_skips_step_and_keeps_state(name):
    model, x, y = make_problem()
    opt = create_optimizer(model, name, **hparams_for(name))
    train(model, opt, x, y, 2)
    params = [p.detach().clone() for p in model.parameters()]
    # every state tensor of every parameter, keyed by (parameter, key)
    state = {(i, k): v.clone() for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}
    assert len(state) == sum(len(opt.state[p]) for p in model.parameters()) > 0
    loss_fn(model, x, y).backward()
    model.fc1.weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="non-finite"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = {(i, k): v for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}
    assert after.keys() == state.keys()
    for key in state:
        assert torch.equal(state[key], after[key]), f"{name}: state {key} changed by a skipped step"
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("name", ENGINE)
def test_bf16_params_and_state_dtype_survives_load(name):
    model, x, y = make_problem(dtype=torch.bfloat16)
    opt = create_optimizer(model, name, **hparams_for(name))
    losses = train(model, opt, x, y, 20)
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    dtypes = {k: v.dtype for st in opt.state.values() for k, v in st.items()}
    opt2 = create_optimizer(model, name, **hparams_for(name))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    dtypes2 = {k: v.dtype for st in opt2.state.values() for k, v in st.items()}
    assert dtypes2 == dtypes  # torch would have cast float32 moments to bf16
    # float32 moments of a bf16 model (a stateless rule, LOMO, keeps only its step counters)
    assert any(dt == torch.float32 for k, dt in dtypes.items() if k != "step") or set(dtypes) == {"step"}


@pytest.mark.parametrize("name", ENGINE)
def test_1d_and_3d_parameters(name):
    torch.manual_seed(0)
    target1, target3 = torch.randn(7), torch.randn(3, 5, 6)
    p1, p3 = nn.Parameter(torch.zeros(7)), nn.Parameter(torch.zeros(3, 5, 6))
    hp = hparams_for(name)
    hp.pop("target_modules", None)
    opt = create_optimizer([p1, p3], name, **hp)
    first = last = None
    for _ in range(40):
        opt.zero_grad()
        loss = (p1 - target1).pow(2).sum() + (p3 - target3).pow(2).sum()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        last = loss.item()
    assert math.isfinite(last) and last < first


@pytest.mark.parametrize("name", ENGINE)
def test_closure_contract(name):
    model, x, y = make_problem()
    opt = create_optimizer(model, name, **hparams_for(name))

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    returned = []

    def recording_closure():
        returned.append(closure())
        return returned[-1]

    loss = opt.step(recording_closure)
    assert len(returned) == 1 and loss is returned[0]  # called once, its loss returned as is
    assert isinstance(loss, torch.Tensor) and loss.grad_fn is not None  # gradients were enabled inside
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # and the step used them


@pytest.mark.parametrize("name", ENGINE)
def test_invalid_hyperparameters_raise(name):
    entry = get_entry(name)
    model = Toy()
    with pytest.raises(ValueError, match="valid"):
        create_optimizer(model, name, definitely_not_a_hparam=1)
    bad_candidates = [-1.0, float("nan"), "bogus", (2.0, 2.0), 10**9 + 0.5]
    for hname, h in entry.recipe.all_hparams().items():
        raised = 0
        for bad in bad_candidates:
            try:
                h.validate(bad)
            except ValueError as err:
                assert hname in str(err)
                raised += 1
        assert raised, f"{name}.{hname}: no invalid candidate rejected"
        bad = next(b for b in bad_candidates if not _accepts(h, b))
        with pytest.raises(ValueError, match=hname):
            create_optimizer(model, name, **{**hparams_for(name), hname: bad})


def _accepts(h, value):
    try:
        h.validate(value)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("name", ENGINE)
def test_bad_param_group_rejected(name):
    entry = get_entry(name)
    opt = create_optimizer([nn.Parameter(torch.zeros(3))], name, **hparams_for(name))
    if "lr" in entry.recipe.all_hparams():
        with pytest.raises(ValueError, match="lr"):
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": -5.0})
        assert len(opt.param_groups) == 1


def test_registry_errors_name_valid_choices():
    with pytest.raises(ValueError, match="adamw"):
        lowmem.create_optimizer(Toy(), "no_such_optimizer")
    assert {"adamw", "adafactor"} <= set(lowmem.list_optimizers())


def test_groups_from_model_follow_trainer_decay_rules():
    opt = create_optimizer(Toy(), "adamw", weight_decay=0.1)
    assert isinstance(opt, LowMemOptimizer)
    model_names = {id(p): n for n, p in Toy().named_parameters()}
    assert len(model_names) == 6
    groups = {g["weight_decay"]: len(g["params"]) for g in opt.param_groups}
    assert groups == {0.1: 2, 0.0: 4}  # two weights decayed; 2 biases + LayerNorm weight/bias not


def test_gradient_norm_bound_skips_only_what_would_overflow():
    """A gradient whose squared norm overflows float32 (norm >= MAX_GRAD_NORM, ~1.8e19) is skipped
    (its squares would poison second-moment statistics); just below the bound it is stepped. A norm
    that overflows a low-precision dtype (float16) falls back to the exact float64 norm, not a skip."""
    from lowmem.optim.engine import MAX_GRAD_NORM

    p = nn.Parameter(torch.zeros(4, 4))
    opt = create_optimizer([p], "adamw", lr=1e-3)
    p.grad = torch.full((4, 4), 1e19)  # norm 4e19: the sum of 16 squares overflows float32
    with pytest.warns(UserWarning, match="step skipped"):
        opt.step()
    assert opt.skipped_steps == 1 and (p == 0).all()
    p.grad = torch.full((4, 4), 0.99 * MAX_GRAD_NORM / 4)  # norm just below the bound
    opt.step()
    assert opt.skipped_steps == 1 and torch.isfinite(p).all() and (p != 0).all()
    q = nn.Parameter(torch.zeros(4, 4, dtype=torch.float16))
    opt = create_optimizer([q], "adamw", lr=1e-3)
    q.grad = torch.full((4, 4), 6e4, dtype=torch.float16)
    assert not torch.isfinite(torch._foreach_norm([q.grad])[0])  # so the fast path must fall back
    opt.step()
    assert opt.skipped_steps == 0 and torch.isfinite(q).all() and (q != 0).all()
