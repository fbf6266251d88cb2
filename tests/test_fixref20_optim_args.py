"""FIXREF20 (AUDREF19 4): optim_args booleans written "1" / "0" (transformers' _get_sgd / _get_rmsprop read "true",
"1", "yes") are True / False for boolean options; numbers stay numbers, and other values stay refused."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import get_entry
from lowmem.optim.hparams import is_boolean_option, parse_optim_args, text_booleans
from lowmem.trainers.hf import trainer_hparams, validate_optim_args


def test_text_booleans_converts_only_boolean_options():
    specs = get_entry("sgd").recipe.all_hparams()
    got = text_booleans(specs, parse_optim_args("nesterov=1,momentum=0.9,dampening=0,foreach=0,lr=1"))
    assert got == {"nesterov": True, "momentum": 0.9, "dampening": 0, "foreach": False, "lr": 1}
    assert type(got["dampening"]) is int and type(got["lr"]) is int  # (numbers: not options of True / False)
    assert is_boolean_option(specs["nesterov"]) and is_boolean_option(specs["foreach"])
    assert not is_boolean_option(specs["momentum"]) and not is_boolean_option(specs["lr"])


@pytest.mark.parametrize("text, value", [("centered=1", True), ("centered=0", False), ("centered=true", True),
                                         ("centered=False", False), ("centered=yes", True)])
def test_lowmem_train_optim_args_booleans(text, value):
    """lowmem train's check of optim_args (validate_optim_args) and the Trainer's mapping agree."""
    assert validate_optim_args("rmsprop", text)["centered"] is value
    assert trainer_hparams("rmsprop", None, text)["centered"] is value


@pytest.mark.parametrize("text", ["centered=2", "centered=0.5", "centered=maybe"])
def test_other_values_of_a_boolean_option_stay_refused(text):
    with pytest.raises(ValueError, match="centered"):
        validate_optim_args("rmsprop", text)


def test_hf_optim_args_zero_is_false(tmp_path):
    from transformers import TrainingArguments

    from lowmem.trainers.hf import optimizer_cls_and_kwargs

    args = TrainingArguments(output_dir=str(tmp_path), optim="sgd", optim_args="momentum=0.9,nesterov=0", use_cpu=True,
                             report_to=[])
    cls, kwargs = optimizer_cls_and_kwargs(torch.nn.Linear(4, 3), "sgd", args=args)
    assert all(g["nesterov"] is False for g in cls(**kwargs).param_groups)
