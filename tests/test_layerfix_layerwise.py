"""LAYERFIX: layerwise mode keeps the user's TrainingArguments, and every entry point (the arguments, lowmem train's
recipe, LayerwiseOptimizer, estimate_memory / lowmem budget) refuses a non-engine optimizer naming the field and the
optimizers that work (AUDIT-LAYER18 1-3)."""

from __future__ import annotations

import pytest
import torch
from transformers import default_data_collator

from lowmem.kit import build_tiny_model, sft_dataset, tiny_config, tokenize_sft
from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments


def test_layerwise_training_keeps_max_grad_norm_in_the_args_and_the_checkpoint(tmp_path):
    model, tok = build_tiny_model(0)
    data = tokenize_sft(sft_dataset(4, seed=0), tok)
    args = LowMemTrainingArguments(
        str(tmp_path), lowmem_optim="adamw", lowmem_layerwise=True, max_steps=1, max_grad_norm=0.5, report_to="none",
        use_cpu=True, disable_tqdm=True, save_strategy="steps", save_steps=1, per_device_train_batch_size=4)
    trainer = LowMemTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    trainer.train()
    assert trainer.args is args and args.max_grad_norm == 0.5  # the user's object, unchanged
    opt = trainer.optimizer.optimizer
    assert opt.max_grad_norm == 0.5 and opt.clip_mode == "global_prev"
    assert trainer._clip_grad_norm(model) is None  # the Trainer's own clipping (over freed gradients) is skipped
    saved = torch.load(tmp_path / "checkpoint-1" / "training_args.bin", weights_only=False)
    assert saved.max_grad_norm == 0.5 and saved.lowmem_layerwise is True


@pytest.mark.parametrize("name", ["bnb_adamw8bit", "bnb_paged_adamw", "bnb_rmsprop8bit"])
def test_layerwise_optimizer_refuses_a_bitsandbytes_class_before_building_it(name):
    from lowmem.optim.layerwise import LayerwiseOptimizer

    # the paged one on the CPU would fail inside bitsandbytes first: the refusal comes before the inner optimizer
    with pytest.raises(ValueError, match=r"layerwise=True needs an engine optimizer.*'adamw8bit'") as err:
        LayerwiseOptimizer(torch.nn.Linear(4, 4), name)
    assert ("is the engine's optimizer of the same format" in str(err.value)) == (name != "bnb_rmsprop8bit")


def test_layerwise_arguments_refuse_the_hf_bitsandbytes_layerwise_name(tmp_path):
    # transformers' name with _layerwise sets lowmem_layerwise: the same refusal, at argument time
    with pytest.raises(ValueError, match=r"LowMemTrainingArguments\.lowmem_layerwise=True needs an engine optimizer"):
        LowMemTrainingArguments(str(tmp_path), lowmem_optim="adamw_bnb_8bit_layerwise", report_to="none", use_cpu=True)
    args = LowMemTrainingArguments(str(tmp_path), lowmem_optim="galore_adamw_8bit_layerwise", report_to="none", use_cpu=True)
    assert args.lowmem_optim == "galore_adamw8bit" and args.lowmem_layerwise is True  # an engine one: accepted


def test_lowmem_train_recipe_refuses_layerwise_with_a_bitsandbytes_optim(tmp_path):
    from lowmem.config import ConfigError
    from lowmem.train import build_training_args, load_recipe

    recipe = load_recipe(None, output_dir=str(tmp_path), optim="bnb_paged_adamw8bit", layerwise=True)
    # the recipe's keys; before the paged-on-CPU refusal (layerwise is the cause on any device)
    with pytest.raises(ConfigError, match=r"optim='bnb_paged_adamw8bit' with layerwise=True needs an engine optimizer"):
        build_training_args(recipe)


def test_layerwise_estimate_refuses_no_optimizer_and_names_the_valid_ones():
    from lowmem.memory.estimate import estimate_memory

    kw = dict(device="cpu", dtype="fp32", seq_len=16)
    with pytest.raises(ValueError, match=r"layerwise=True \(lowmem budget --layerwise\) needs an optimizer"):
        estimate_memory(tiny_config(), optimizer=None, layerwise=True, **kw)
    with pytest.raises(ValueError, match=r"needs an engine optimizer.*'lion8bit'.*--layerwise"):
        estimate_memory(tiny_config(), optimizer="bnb_lion8bit", layerwise=True, **kw)
    assert estimate_memory(tiny_config(), optimizer="lion8bit", layerwise=True, **kw).total > 0
    assert estimate_memory(tiny_config(), optimizer=None, **kw).total > 0  # no optimizer, no layerwise: priced


def test_lowmem_budget_layerwise_with_a_bitsandbytes_optimizer_is_an_error(capsys):
    from lowmem.cli import main

    code = main(["budget", "tiny", "--optimizer", "bnb_adamw8bit", "--layerwise", "--device", "cpu", "--dtype", "fp32",
                 "--seq-len", "16"])
    captured = capsys.readouterr()
    assert code != 0 and "needs an engine optimizer" in captured.err + captured.out
    assert "total" not in captured.out
