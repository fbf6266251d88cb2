"""AUDITSR: the pure-bfloat16 options refused where they cannot apply, naming the field, before anything is stepped
(several groups: the check of a later group runs before the first group is stepped), and one case accepted
silently (FOUND_AUDITSR 5)."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import create_optimizer


def _w(shape=(8, 8), dtype=torch.bfloat16):
    return torch.nn.Parameter(torch.full(shape, 0.3, dtype=dtype))


@pytest.mark.parametrize("key,value,match", [
    ("bf16_stochastic_round", True, r"parameter group 1 .*bf16_stochastic_round=True rounds updates into bfloat16"
                                    r" parameters, and this group has none \(its parameters: float32\)"),
    ("kahan_summation", True, r"parameter group 1 .*kahan_summation=True rounds updates into bfloat16 parameters"),
    ("bf16_stochastic_round", 1, r"Invalid bf16_stochastic_round=1 in parameter group 1 .*expected True or False"),
    ("kahan_summation", "yes", r"Invalid kahan_summation='yes' in parameter group 1"),
])
def test_written_into_a_later_group_refused_before_any_step(key, value, match):
    """Group 0 (bfloat16) is fine; the value written into group 1 (float32) after a step: the next step is a
    ValueError naming the field and group 1, and neither group's weights nor state moved.
    Mutation checked: check_rounding a no-op (lowmem.optim.group_layout) -> the first two red."""
    a, b = _w(), _w(dtype=torch.float32)
    opt = create_optimizer([{"params": [a]}, {"params": [b]}], "adamw", lr=0.1)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    before = [x.detach().clone() for x in (a, b)] + [v.clone() for v in opt.state[a].values()]
    opt.param_groups[1][key] = value
    with pytest.raises(ValueError, match=match):
        opt.step()
    after = [x.detach() for x in (a, b)] + list(opt.state[a].values())
    assert all(torch.equal(x, y) for x, y in zip(before, after))


@pytest.mark.parametrize("name,kw,match", [
    ("adamw8bit", {"fused": True}, "bf16_stochastic_round=True and fused=True conflict"),
    ("lion", {"fused": True}, "bf16_stochastic_round=True and fused=True conflict"),
    ("badam", {}, "bf16_stochastic_round=True and master_weights=True conflict"),
    ("adamw", {"kahan_summation": True}, "bf16_stochastic_round=True and kahan_summation=True conflict"),
])
def test_conflicts_named_at_construction(name, kw, match):
    with pytest.raises(ValueError, match=match):
        create_optimizer([_w()], name, bf16_stochastic_round=True, **kw)


def test_option_left_without_a_bfloat16_weight_refused_at_the_next_step():
    """kahan_summation is refused there (its state's dtype no longer fits: a ValueError); bf16_stochastic_round, which
    keeps no state, is accepted and does nothing."""
    m = torch.nn.Linear(8, 8, bias=False).to(torch.bfloat16)
    opt = create_optimizer(m, "adamw", lr=0.1, bf16_stochastic_round=True)
    m.weight.grad = torch.ones_like(m.weight)
    opt.step()
    m.to(torch.float32)
    m.weight.grad = torch.ones_like(m.weight)
    with pytest.raises(ValueError, match="bf16_stochastic_round"):
        opt.step()
