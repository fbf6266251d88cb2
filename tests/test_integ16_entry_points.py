"""The newest engine recipes (``sm3``, ``normuon``, ``racs``, ``alice``; ``lion`` and ``came`` as controls) through a
user's entry points: ``lowmem train``'s summary of the optimizer settings in effect, and the HF Trainer's
``LowMemTrainingArguments``. (Resume, layerwise mode, bfloat16, DPO / GRPO, the plain Trainer and DDP were run for
each by hand in session 16 (INTEG16) and matched; the tests here pin what went wrong.)"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from lowmem.train import load_recipe, run

SMALL = dict(train_size=16, eval_size=4, batch_size=4, logging_steps=1, track_memory=False, seed=0, lr=1e-2, steps=1,
             save_model=False)


def _summary(tmp_path, optim: str, optim_args: dict) -> str:
    out = io.StringIO()
    run(load_recipe(None, optim=optim, optim_args=optim_args, output_dir=str(tmp_path), **SMALL),
        console=Console(file=out, width=400, soft_wrap=True))
    return next(x for x in out.getvalue().splitlines() if "hyperparameters in effect" in x)


@pytest.mark.parametrize("optim, optim_args, shown", [
    ("racs", {"gamma": 1.05, "beta": 0.95}, ["gamma=1.05", "beta=0.95"]),
    ("sm3", {"momentum": 0.5}, ["momentum=0.5"]),
])
def test_the_summary_shows_the_optim_args_the_user_set(tmp_path, optim, optim_args, shown):
    """``lowmem train --optim racs --optim-args gamma=1.05`` printed "optimizer hyperparameters in effect (largest
    group): weight_decay=0.0, lr=0.01, eps=1e-08": the setting the user gave was not among what the line reads back
    from the optimizer, so the line could not confirm it applied."""
    line = _summary(tmp_path, optim, optim_args)
    for text in shown:
        assert text in line, line


@pytest.mark.parametrize("name", ["racs", "alice", "sm3_layerwise"])
def test_a_lowmem_name_in_optim_names_lowmem_optim(tmp_path, name):
    """``LowMemTrainingArguments(optim="racs")``: transformers' own error listed its OptimizerNames, with no word of
    lowmem's field that takes the name."""
    from lowmem.trainers import LowMemTrainingArguments

    with pytest.raises(ValueError, match=rf"optim='{name}'.*lowmem_optim='{name}'"):
        LowMemTrainingArguments(output_dir=str(tmp_path), optim=name, report_to=[])


def test_transformers_names_and_unknown_names_keep_their_meaning(tmp_path):
    """transformers' own names stay transformers' (``optim="adafactor"``; the enum member too); a name neither knows
    keeps transformers' error."""
    from transformers.training_args import OptimizerNames

    from lowmem.trainers import LowMemTrainingArguments

    for optim in ("adafactor", OptimizerNames.ADAFACTOR, "galore_adamw"):
        args = LowMemTrainingArguments(output_dir=str(tmp_path), optim=optim, report_to=[],
                                       **({"optim_target_modules": ["q_proj"]} if optim == "galore_adamw" else {}))
        assert args.optim == "adafactor" or args.optim == optim and args.lowmem_optim is None
    with pytest.raises(ValueError, match=r"not a valid OptimizerNames") as err:
        LowMemTrainingArguments(output_dir=str(tmp_path), optim="no_such_optimizer", report_to=[])
    assert "lowmem_optim" not in str(err.value)
