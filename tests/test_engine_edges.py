"""Engine edge cases found from outside (issue 11): sparse gradients, NaN in layerwise mode,
float64 parameters, huge finite gradients. Every engine optimizer in the registry is covered."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.optim import AdamW, create_optimizer, optimizer_entries
from lowmem.optim.layerwise import LayerwiseOptimizer
from toy_problem import hparams_for

ENGINE = [e.name for e in optimizer_entries() if e.generic_tests and e.recipe is not None]


def _sparse_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 4, sparse=True))


@pytest.mark.parametrize("name", ENGINE)
def test_sparse_gradient_is_refused_clearly_before_any_state(name):
    model = _sparse_model()
    opt = create_optimizer(model, name, **hparams_for(name))
    model(torch.tensor([1, 2])).sum().backward()
    before = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match=rf"{name}.*sparse gradients are not supported"):
        opt.step()
    assert not any(opt.state[p] for p in model.parameters())
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("name", ["adamw", "galore_adamw"])
def test_sparse_gradient_is_refused_clearly_in_layerwise_mode(name):
    model = _sparse_model()
    opt = LayerwiseOptimizer(model, name, **hparams_for(name))
    with pytest.raises(RuntimeError, match=rf"{name}.*sparse gradients are not supported"):
        model(torch.tensor([1, 2])).sum().backward()
    assert not any(opt.state[p] for p in model.parameters())


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_layerwise_nan_stops_the_rest_of_the_step_and_says_how_many_were_stepped():
    """Parameters are stepped in the hooks as gradients arrive (last layer first): once a
    non-finite gradient arrives no further parameter is stepped in that step, and the warning
    says how many were already stepped (they cannot be undone). The next step is normal."""
    model = _mlp()
    opt = LayerwiseOptimizer(model, "adamw", lr=1e-2)
    first = model[0].weight
    first.register_hook(lambda g: torch.full_like(g, float("nan")))  # the first layer's weight: late in backward
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(5, 4)
    with pytest.warns(UserWarning, match=r"non-finite gradient.*\b(\d+) parameter\(s\) already stepped") as rec:
        model(x).sum().backward()
        opt.step()
    msg = str(next(w.message for w in rec if "non-finite" in str(w.message)))
    stepped = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert f"{len(stepped)} parameter(s) already stepped" in msg
    assert "0.weight" not in stepped and not opt.state[first]
    assert len(stepped) < 4 and sum(bool(opt.state[p]) for p in model.parameters()) == len(stepped)
    assert opt.inner.skipped_steps == 1 and all(p.grad is None for p in model.parameters())
    # the following step (finite again once the hook is gone) steps everything
    model2 = _mlp()
    opt2 = LayerwiseOptimizer(model2, "adamw", lr=1e-2)
    before = {n: p.detach().clone() for n, p in model2.named_parameters()}
    model2(x).sum().backward()
    opt2.step()
    assert all(not torch.equal(p, before[n]) for n, p in model2.named_parameters())


def test_layerwise_nan_flag_resets_without_step_calls():
    """A loop that never calls step() (accumulation_steps=1): a parameter's next gradient starts a
    new step, so one NaN does not freeze training."""
    model = _mlp()
    opt = LayerwiseOptimizer(model, "adamw", lr=1e-2)
    x = torch.randn(5, 4)
    with pytest.warns(UserWarning, match="non-finite.*already stepped"):
        model(torch.full_like(x, float("nan"))).sum().backward()  # every gradient NaN but the last bias
    assert sum(bool(opt.state[p]) for p in model.parameters()) <= 1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x).sum().backward()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("name", ENGINE)
def test_float64_parameter_with_lr_zero_is_unchanged_bit_for_bit(name):
    """float64 parameters are stepped in float64: never rounded to float32 (lr 0 changes nothing)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-12)  # bits below float32's precision
    hp = hparams_for(name, lr=0.0) if "lr" in hparams_for(name) else hparams_for(name)
    if "lr" not in hp:
        pytest.skip(f"{name} has no lr")
    opt = create_optimizer(model, name, **hp)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        model(torch.randn(8, 16, dtype=torch.float64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for b, p in zip(before, model.parameters()):
        assert p.dtype == torch.float64 and torch.equal(p, b), name


def test_float64_adamw_matches_torch_adamw_in_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    ref = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    ref.load_state_dict(model.state_dict())
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    opt = AdamW(model.parameters(), state_dtype="param", **hp)
    opt_ref = torch.optim.AdamW(ref.parameters(), foreach=False, **hp)
    for _ in range(5):
        x = torch.randn(8, 16, dtype=torch.float64)
        for m, o in ((model, opt), (ref, opt_ref)):
            m(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", ENGINE)
def test_huge_finite_gradient_is_skipped_and_training_continues(name):
    """A finite gradient whose squares overflow float32 (1e20) would make Adafactor's / Stable-SPAM's
    statistics inf forever: the step is skipped like a non-finite one, and training goes on."""
    from toy_problem import loss_fn, make_problem, train

    model, x, y = make_problem()
    opt = create_optimizer(model, name, **hparams_for(name))
    train(model, opt, x, y, 3)
    loss_fn(model, x, y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.grad.mul_(0).add_(1e20)
    with pytest.warns(UserWarning, match="step skipped"):
        opt.step()
    opt.zero_grad()
    assert opt.skipped_steps == 1
    losses = train(model, opt, x, y, 40)
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert torch.isfinite(v).all(), name
    assert losses[-1] < losses[0], f"{name}: {losses[0]} -> {losses[-1]}"


def test_huge_finite_gradient_is_skipped_in_layerwise_mode():
    model = _mlp()
    opt = LayerwiseOptimizer(model, "adafactor", lr=1e-2)
    model[0].weight.register_hook(lambda g: torch.full_like(g, 1e20))
    with pytest.warns(UserWarning, match="non-finite"):
        model(torch.randn(5, 4)).sum().backward()
    assert not opt.state[model[0].weight]
