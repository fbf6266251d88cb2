"""Settings written into ``param_groups`` after construction are validated at the next step (FOUND_AUDIT2 2).

``add_param_group`` validates every hyperparameter once; a value written later (a user's ``group["beta2"] = 1.5``,
a scheduler's) is refused by ``step()`` with the construction's message, ``Invalid <name>=... in parameter group
<i> of optimizer '<recipe>': expected <valid>``, before anything is stepped
(``lowmem.optim.group_layout.check_group_settings``). Only the values that changed since the last check are
validated again: a steady step validates nothing, OneCycleLR's step its ``lr`` and ``betas`` only.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim import group_layout
from lowmem.optim.hparams import HParam


def _opt(name: str, n: int = 3, **kw):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(6, 4)) for _ in range(n)]
    return ps, create_optimizer(ps, name, **kw)


def _grads(ps, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def _snapshot(opt, ps):
    return [p.detach().clone() for p in ps], [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]


BAD = [
    ("adamw", "lr", -1.0, "a finite float >= 0"),
    ("adamw", "lr", float("nan"), "a finite float >= 0"),
    ("adamw", "betas", (0.9, 1.5), "0 <= beta < 1"),
    ("adamw", "eps", -1e-8, "a finite float >= 0"),
    ("adamw", "weight_decay", -0.1, "a finite float >= 0"),
    ("sm3", "beta2", 1.5, "0 <= beta2 <= 1"),
    ("sm3", "momentum", 1.0, "0 <= momentum < 1"),
    ("normuon", "update_scale", "match", "one of"),
]


@pytest.mark.parametrize("name,field,value,valid", BAD, ids=[f"{b[0]}-{b[1]}={b[2]}" for b in BAD])
def test_an_invalid_value_written_later_is_refused_before_anything_is_stepped(name, field, value, valid):
    ps, opt = _opt(name)
    _grads(ps, 1)
    opt.step()
    opt.param_groups[0][field] = value
    _grads(ps, 2)
    weights, state = _snapshot(opt, ps)
    with pytest.raises(ValueError, match=rf"Invalid {field}=.* in parameter group 0 of optimizer '{name}'") as err:
        opt.step()
    assert valid in str(err.value)
    for p, w, s in zip(ps, weights, state):  # nothing stepped
        assert torch.equal(p, w)
        assert opt.state[p].keys() == s.keys() and all(torch.equal(opt.state[p][k], s[k]) for k in s)
    with pytest.raises(ValueError, match=f"Invalid {field}="):  # refused again until it is put right
        opt.step()


def test_a_valid_change_is_accepted_and_an_invalid_one_put_right_steps_again():
    ps, opt = _opt("sm3")
    _grads(ps, 1)
    opt.step()
    opt.param_groups[0]["beta2"] = 0.99  # valid: stepped with
    opt.step()
    assert opt.param_groups[0]["beta2"] == 0.99 and all(torch.isfinite(p).all() for p in ps)
    opt.param_groups[0]["beta2"] = 1.5
    with pytest.raises(ValueError, match="Invalid beta2=1.5"):
        opt.step()
    opt.param_groups[0]["beta2"] = 0.9
    opt.step()
    assert all(torch.isfinite(p).all() for p in ps)


def test_a_list_changed_in_place_is_seen():
    ps, opt = _opt("adamw", betas=[0.9, 0.999])
    _grads(ps, 1)
    opt.step()
    opt.param_groups[0]["betas"][1] = 0.99  # valid: kept as validated (a copy: the list is changed again below)
    opt.step()
    opt.param_groups[0]["betas"][1] = 1.5
    with pytest.raises(ValueError, match=r"Invalid betas=\[0.9, 1.5\] in parameter group 0"):
        opt.step()


def test_the_group_is_named_in_a_second_group():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    opt = create_optimizer([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], "adamw")
    a.grad, b.grad = torch.randn(4, 4), torch.randn(4)
    opt.step()
    opt.param_groups[1]["weight_decay"] = -1.0
    with pytest.raises(ValueError, match="Invalid weight_decay=-1.0 in parameter group 1 of optimizer 'adamw'"):
        opt.step()


def test_the_recipes_cross_field_check_runs_again_when_a_key_it_reads_changes():
    """sm3's ``validate_group`` refuses ``state_dtype='param'`` with a float16 parameter: written later (before any
    state), the same error, naming the group."""
    p = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float16))
    opt = create_optimizer([p], "sm3")
    opt.param_groups[0]["state_dtype"] = "param"
    p.grad = torch.randn(6, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="parameter group 0 of optimizer 'sm3': .*float16"):
        opt.step()
    assert not opt.state.get(p)


def test_a_rank_change_keeps_the_layout_checks_message_and_an_invalid_rank_is_refused():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 6))
    opt = create_optimizer([{"params": [p], "rank": 4}], "galore_adamw")
    p.grad = torch.randn(8, 6)
    opt.step()
    opt.param_groups[0]["rank"] = 2  # valid, another layout: the layout check's refusal
    with pytest.raises(ValueError, match="setting 'rank' changed from 4 to 2"):
        opt.step()
    opt.param_groups[0]["rank"] = -1
    with pytest.raises(ValueError, match=r"Invalid rank=-1 in parameter group 0 of optimizer 'galore_adamw'"):
        opt.step()


def _one_cycle_run(name: str, check: bool, monkeypatch, **kw) -> list[torch.Tensor]:
    ps, opt = _opt(name, n=4, **kw)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12)
    with monkeypatch.context() as m:
        if not check:
            m.setattr(group_layout, "check_group_settings", lambda opt: None)
        for i in range(10):
            _grads(ps, 10 + i)
            opt.step()
            sched.step()
    return [p.detach().clone() for p in ps]


@pytest.mark.parametrize("name,kw", [("adamw", {}), ("sm3", {"momentum": 0.9})], ids=["adamw", "sm3"])
def test_one_cycle_lr_runs_bit_for_bit_as_without_the_check(name, kw, monkeypatch):
    """OneCycleLR writes lr and betas / momentum into the group at every step: each is validated, none refused,
    and the weights are those of the same run with the check switched off."""
    checked = _one_cycle_run(name, True, monkeypatch, **kw)
    unchecked = _one_cycle_run(name, False, monkeypatch, **kw)
    assert all(torch.equal(a, b) for a, b in zip(checked, unchecked))


def test_only_the_values_that_changed_are_validated(monkeypatch):
    """A steady step validates nothing; a step after OneCycleLR's write validates ``lr`` and ``betas`` only."""
    ps, opt = _opt("adamw", n=100)
    _grads(ps, 1)
    opt.step()
    calls: list[str] = []

    def counted(h: HParam) -> HParam:
        return dataclasses.replace(h, check=lambda value: (calls.append(h.name), h.check(value))[1])

    monkeypatch.setattr(group_layout, "_specs", lambda recipe: {k: counted(h) for k, h in recipe.all_hparams().items()})
    for _ in range(3):
        opt.step()
    assert calls == []
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12)  # (writes lr and betas)
    for _ in range(3):
        calls.clear()
        opt.step()
        assert sorted(calls) == ["betas", "lr"]
        sched.step()


def test_a_tensor_written_later_is_validated_by_its_value():
    """A tensor ``lr`` (torch.optim takes one; the step here too) is checked by its value when it is written."""
    ps, opt = _opt("adamw")
    _grads(ps, 1)
    opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(1e-3)
    opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(-1e-3)
    weights, _ = _snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"Invalid lr=-0.001.* in parameter group 0"):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(ps, weights))
    opt.param_groups[0]["betas"] = (torch.tensor(0.9), torch.tensor(1.0))
    opt.param_groups[0]["lr"] = 1e-3
    with pytest.raises(ValueError, match=r"Invalid betas=\(0\.\d+, 1\.0\)"):
        opt.step()


def test_lr_written_by_torch_dcp_init_is_not_refused_by_adafactors_cross_field_check():
    """torch.distributed.checkpoint's state initialization writes ``lr = 0.0`` into every group and steps once on
    zero gradients; relative-step Adafactor's ``validate_group`` refuses a manual lr at construction, so ``lr`` is no
    trigger of that check at a step (its own range still is: ``lr = -1.0`` refused)."""
    ps, opt = _opt("adafactor")
    assert opt.param_groups[0]["relative_step"] and opt.param_groups[0]["lr"] is None
    opt.param_groups[0]["lr"] = 0.0
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid lr=-1.0 in parameter group 0 of optimizer 'adafactor'"):
        opt.step()
