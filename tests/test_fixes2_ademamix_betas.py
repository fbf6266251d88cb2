"""FIXES2 (FOUND_ADEMAMIX 10): transformers' ``beta1=`` / ``beta2=`` in optim_args (read by its Trainer for AdEMAMix)
become ``betas`` for the recipes with ``betas`` and ``beta3``; the other of the pair follows docs/training.md's rule."""

import pytest
from transformers import TrainingArguments

from lowmem.trainers.hf import trainer_hparams


def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], **kw)


@pytest.mark.parametrize("name", ["ademamix", "ademamix8bit"])
def test_hf_beta1_in_optim_args_becomes_betas(tmp_path, name):
    # optim="ademamix" (HF's name): the other beta is adam_beta2's value, set or not, as transformers' Trainer reads it
    args = _args(tmp_path, optim="ademamix", optim_args="beta1=0.8,beta3=0.999", adam_beta2=0.99)
    hp = trainer_hparams(name, args)
    assert hp["betas"] == (0.8, 0.99) and hp["beta3"] == 0.999 and "beta1" not in hp


def test_beta2_in_lowmem_optim_args_keeps_a_set_adam_beta1_else_the_recipe_default(tmp_path):
    assert trainer_hparams("ademamix", _args(tmp_path, adam_beta1=0.85), {"beta2": 0.95})["betas"] == (0.85, 0.95)
    assert trainer_hparams("ademamix", None, {"beta2": 0.95})["betas"] == (0.9, 0.95)


def test_conflicts_and_other_optimizers_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"both \['beta1'\] and betas"):
        trainer_hparams("ademamix", None, {"beta1": 0.8, "betas": (0.8, 0.99)})
    with pytest.raises(ValueError, match=r"adam_beta1=0.7 and .* beta1=0.8"):
        trainer_hparams("ademamix", _args(tmp_path, adam_beta1=0.7), {"beta1": 0.8})
    with pytest.raises(ValueError, match=r"Unknown hyperparameter\(s\) \['beta1'\] for optimizer 'adamw'"):
        trainer_hparams("adamw", None, {"beta1": 0.8})
