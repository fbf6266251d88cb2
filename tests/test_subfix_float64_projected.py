"""FOUND_AUDITOPT 4: ``state_dtype="param"`` on float64 parameters projected through a basis. The projected moments
became float64 while the basis and the projected gradient stay float32 (docs/ARCHITECTURE.md: subspace state and
math stay float32), so the first step raised ``RuntimeError: expected m1 and m2 to have the same dtype`` in the
combine-back. Now refused when the group is built (``recipes.subspace.check_projected_state_dtype``), naming
``state_dtype`` and the valid ``'float32'`` / ``'bfloat16'``; what stepped before steps as before."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.optim import create_optimizer
from toy_problem import hparams_for, make_problem, train

REFUSED = [("galore_adamw", {}), ("fira_adamw", {}), ("osd_adamw", {}), ("adamw_snsm", {}), ("adagrad_snsm", {}),
           ("sgd_sm", {}), ("frugal", {"projection": "svd"}), ("frugal", {"projection": "random"}),
           ("galore_adamw", {"proj_type": "full"})]


@pytest.mark.parametrize("name,extra", REFUSED, ids=[f"{n}-{'-'.join(map(str, e.values()))}" for n, e in REFUSED])
def test_param_state_on_float64_basis_projected_parameters_is_refused_by_name(name, extra):
    model, _, _ = make_problem(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"state_dtype='param' on float64 parameters.*'float32'.*'bfloat16'"):
        create_optimizer(model, name, state_dtype="param", **{**hparams_for(name), **extra})


@pytest.mark.parametrize("name,extra", REFUSED[:3], ids=[n for n, _ in REFUSED[:3]])
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_the_valid_state_dtypes_train_float64_parameters(name, extra, state_dtype):
    model, x, y = make_problem(dtype=torch.float64)
    opt = create_optimizer(model, name, state_dtype=state_dtype, **{**hparams_for(name), **extra})
    losses = train(model, opt, x, y, 3)
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in model.parameters())


KEPT = [("frugal", {"projection": "columns"}), ("frugal", {"projection": "randk"}),
        ("galore_adafactor", {"beta1": 0.9}), ("apollo_adamw", {})]


@pytest.mark.parametrize("name,extra", KEPT, ids=[f"{n}-{'-'.join(map(str, e.values()))}" for n, e in KEPT])
def test_param_state_without_a_float32_basis_in_the_way_still_trains_in_float64(name, extra):
    """Coordinate projections, factored statistics and APOLLO's scaling step float64 projected moments: kept."""
    model, x, y = make_problem(dtype=torch.float64)
    opt = create_optimizer(model, name, state_dtype="param", **{**hparams_for(name), **extra})
    losses = train(model, opt, x, y, 3)
    assert losses[-1] < losses[0]


def test_a_float64_group_without_projected_parameters_keeps_param_state():
    """Only projected float64 parameters are refused: a float64 bias beside float32 matrices keeps float64 moments."""
    w, b = nn.Parameter(torch.randn(16, 32)), nn.Parameter(torch.randn(16, dtype=torch.float64))
    opt = create_optimizer([w, b], "galore_adamw", state_dtype="param", rank=4, update_proj_gap=5)
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    assert opt.state[b]["exp_avg"].dtype == torch.float64 and opt.state[w]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("name", ["galore_adamw8bit", "fira_adamw8bit"])
def test_eight_bit_moments_are_refused_only_where_they_stay_unquantized(name):
    """The 8-bit variants decode quantized moments to float32 (they stepped float64 parameters under "param");
    a projected moment below ``min_quant_size`` is stored plainly, as "param" says: float64, the crash. The
    [32, 16] weight's projected moments are 32 x 4 = 128 elements."""
    def run(min_quant_size):
        w = nn.Parameter(torch.randn(32, 16, dtype=torch.float64))
        opt = create_optimizer([w], name, state_dtype="param", rank=4, update_proj_gap=5, min_quant_size=min_quant_size)
        for _ in range(2):
            w.grad = torch.randn_like(w)
            opt.step()
        return w

    assert torch.isfinite(run(128)).all()
    with pytest.raises(ValueError, match=r"state_dtype='param' on float64 parameters .*\(32, 16\)"):
        run(129)
