"""FIXREF20 (AUDREF19 3): lowmem's StableAdamW takes torch-optimi's default kahan_sum=None (what transformers'
optim="stable_adamw" hands it): Kahan compensation on for the groups holding bfloat16 weights, unless kahan_summation
is given; torch-optimi's optim_args kahan_sum (None / true / false) and decouple_lr read as lowmem's settings."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.recipes.stable_adamw import StableAdamW
from lowmem.trainers.hf import optimizer_cls_and_kwargs, trainer_hparams, validate_optim_args


def _ones(dtype=torch.bfloat16, shape=(3, 4)):
    return torch.nn.Parameter(torch.ones(shape, dtype=dtype))


def _run(opt, params, steps=20):
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)  # constant gradient: each update is lr (m / sqrt(v) = 1)
        opt.step()


def test_default_compensates_bfloat16_groups_only():
    bf, fp = _ones(), _ones(torch.float32)
    opt = StableAdamW([{"params": [bf]}, {"params": [fp]}], lr=1e-3, weight_decay=0.0)
    assert [g["kahan_summation"] for g in opt.param_groups] == [True, False]
    _run(opt, [bf, fp])
    assert "kahan_comp" in opt.state[bf] and "kahan_comp" not in opt.state[fp]
    # 20 updates of 1e-3 from 1.0 (a bfloat16 ulp there is 2^-7): kept, as in float32
    assert torch.allclose(bf.float(), torch.full((3, 4), 0.98), atol=4e-3)
    assert torch.allclose(fp, torch.full((3, 4), 0.98), atol=1e-5)


@pytest.mark.parametrize("make", [lambda ps: StableAdamW(ps, lr=1e-3, weight_decay=0.0),
                                  lambda ps: create_optimizer(ps, "stable_adamw", lr=1e-3, weight_decay=0.0)])
def test_flat_list_and_registry_take_the_default(make):
    p = _ones()
    opt = make([p])
    assert opt.param_groups[0]["kahan_summation"] is True


def test_explicit_false_rounds_to_nearest():
    p = _ones()
    opt = StableAdamW([p], lr=1e-3, weight_decay=0.0, kahan_summation=False)
    _run(opt, [p])
    assert opt.param_groups[0]["kahan_summation"] is False and torch.equal(p.float(), torch.ones(3, 4))  # all lost


def test_stochastic_rounding_or_a_groups_own_setting_is_kept():
    p, q = _ones(), _ones()
    opt = StableAdamW([p], bf16_stochastic_round=True)
    assert opt.param_groups[0]["kahan_summation"] is False and opt.param_groups[0]["bf16_stochastic_round"] is True
    opt = StableAdamW([{"params": [p], "kahan_summation": False}, {"params": [q]}])
    assert [g["kahan_summation"] for g in opt.param_groups] == [False, True]


def test_named_parameters_and_a_single_tensor():
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    assert StableAdamW(model.named_parameters()).param_groups[0]["kahan_summation"] is True
    assert StableAdamW(_ones()).param_groups[0]["kahan_summation"] is True


def test_float16_weights_stay_uncompensated_with_a_warning():
    """torch-optimi compensates float16 weights too; lowmem's compensation is bfloat16's: said, not hidden."""
    with pytest.warns(UserWarning, match=r"the 1 float16 parameter\(s\) of parameter group 0 are written back rounded"):
        opt = StableAdamW([_ones(torch.float16)])
    assert opt.param_groups[0]["kahan_summation"] is False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert StableAdamW([_ones(torch.float16)], kahan_summation=False).param_groups[0]["kahan_summation"] is False


@pytest.mark.parametrize("saved, now", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_checkpoint_of_another_dtype_follows_the_parameters(saved, now):
    """The decided setting follows the parameters on a load: a float32 run's state gets a zero compensation on
    bfloat16 weights; a bfloat16 run's compensation is dropped on float32 weights (with a warning)."""
    p = _ones(saved)
    opt = StableAdamW([p], lr=1e-3)
    _run(opt, [p], steps=2)
    q = _ones(now)
    mine = StableAdamW([q], lr=1e-3)
    if now == torch.float32:
        with pytest.warns(UserWarning, match="kahan_comp.*of 1 parameter"):
            mine.load_state_dict(opt.state_dict())
        assert "kahan_comp" not in mine.state[q] and mine.param_groups[0]["kahan_summation"] is False
    else:
        mine.load_state_dict(opt.state_dict())
        assert torch.equal(mine.state[q]["kahan_comp"], torch.zeros(3, 4, dtype=torch.bfloat16))
        assert mine.param_groups[0]["kahan_summation"] is True
    _run(mine, [q], steps=2)
    assert float(mine.state[q]["step"]) == 4.0


def test_given_setting_is_compared_on_load_as_before():
    p = _ones()
    opt = StableAdamW([p], lr=1e-3, kahan_summation=False)
    _run(opt, [p], steps=1)
    with pytest.raises(ValueError, match="kahan_summation=False \\(this optimizer: True\\)"):
        StableAdamW([p], lr=1e-3, kahan_summation=True).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("text, want", [("kahan_sum=False", False), ("kahan_sum=0", False), ("kahan_sum=True", True),
                                        ("kahan_sum=1", True), ("kahan_sum=None", True), ("", True)])
def test_hf_optim_args_kahan_sum(tmp_path, text, want):
    from transformers import TrainingArguments

    model = torch.nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    args = TrainingArguments(output_dir=str(tmp_path), optim="stable_adamw", optim_args=text or None, use_cpu=True,
                             report_to=[])
    cls, kwargs = optimizer_cls_and_kwargs(model, "stable_adamw", args=args)
    assert all(g["kahan_summation"] is want for g in cls(**kwargs).param_groups)


def test_lowmem_train_check_reads_kahan_sum():
    assert validate_optim_args("stable_adamw", "kahan_sum=false") == {"kahan_summation": False}
    assert validate_optim_args("stable_adamw", "kahan_sum=true") == {}
    assert validate_optim_args("stable_adamw", "decouple_lr=1,max_lr=1e-3") == {"decouple_lr": True, "max_lr": 1e-3}


@pytest.mark.parametrize("name, text, match", [
    ("stable_adamw", "kahan_sum=maybe", "kahan_sum='maybe'.*expected None, true or false"),
    ("stable_adamw", "kahan_sum=false,kahan_summation=true", "both kahan_sum=False .* and kahan_summation=True"),
    ("adamw", "kahan_sum=false", r"Unknown hyperparameter\(s\) \['kahan_sum'\]"),
])
def test_kahan_sum_refusals(name, text, match):
    with pytest.raises(ValueError, match=match):
        trainer_hparams(name, None, text)
