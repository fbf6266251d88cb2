"""OWNFIXB (session 18): config fields that only another setting reads (lowmem.train.DEPENDENT_FIELDS) stay accepted
with that setting on, and at their defaults (a saved config writes every field); refused for GRPO too."""

from __future__ import annotations

import json

import pytest
import yaml

ROWS = {"sft": {"prompt": "1+1=", "completion": "2"}, "dpo": {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        "grpo": {"prompt": "1+1=", "answer": "2"}}


def _build(tmp_path, trainer, training_args):
    from lowmem.train import build_training_args, load_recipe

    (tmp_path / "d.jsonl").write_text((json.dumps(ROWS[trainer]) + "\n") * 8)
    recipe = {"trainer": trainer, "dataset": "d.jsonl", "lr": 1e-3, "steps": 2, "batch_size": 4,
              "output_dir": str(tmp_path / "out"), "training_args": training_args}
    if trainer == "grpo":
        recipe["reward_funcs"] = ["exact_match"]
        recipe["training_args"] = {"num_generations": 4, "max_completion_length": 4, **training_args}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return build_training_args(load_recipe(path))


@pytest.mark.parametrize("trainer, training_args", [
    ("dpo", {"discopop_tau": 0.1, "loss_type": "discopop"}),
    ("dpo", {"ref_model_sync_steps": 10, "ref_model_mixup_alpha": 0.9, "sync_ref_model": True}),
    ("dpo", {"f_alpha_divergence_coef": 0.25, "f_divergence_type": "alpha_divergence"}),
    ("dpo", {"discopop_tau": 0.05, "ref_model_sync_steps": 512, "ref_model_mixup_alpha": 0.6,  # a saved DPOConfig
             "f_alpha_divergence_coef": 0.5, "gradient_checkpointing_kwargs": None}),
    ("sft", {"packing_strategy": "wrapped", "packing": True}),
    ("sft", {"packing_strategy": "bfd"}),  # TRL's default, as a saved SFTConfig writes it
    ("sft", {"gradient_checkpointing_kwargs": {"use_reentrant": False}, "gradient_checkpointing": True}),
], ids=["discopop", "sync_ref_model", "alpha_divergence", "saved-dpo-config", "packing", "saved-sft", "checkpointing"])
def test_dependent_fields_with_their_setting_pass(tmp_path, trainer, training_args):
    args = _build(tmp_path, trainer, training_args)
    for key, value in training_args.items():
        if key.startswith("gradient_checkpointing"):
            continue  # transformers 5 moves them to activation_checkpointing*
        got = getattr(args, key)
        assert (got == value or str(getattr(got, "value", got)) == str(value)
                or getattr(got, "__iter__", None) and [str(getattr(t, "value", t)) for t in got] == [value]), (key, got)


@pytest.mark.parametrize("field, value", [("ref_model_sync_steps", 10), ("ref_model_mixup_alpha", 0.9)])
def test_grpo_sync_fields_without_sync_ref_model_are_refused(tmp_path, field, value):
    """GRPOConfig's TR-DPO-style fields are read only by the SyncRefModelCallback that sync_ref_model adds
    (trl grpo_trainer): without it they are an error naming the field and sync_ref_model."""
    from lowmem.config import ConfigError

    with pytest.raises(ConfigError, match=rf"{field}=.*sync_ref_model"):
        _build(tmp_path, "grpo", {field: value})


def test_python_api_dpo_config_refuses_them_too():
    """LowMemDPOConfig runs lowmem.train.check_dpo_fields in __post_init__: the same refusal; the setting on passes."""
    from lowmem.config import ConfigError
    from lowmem.trainers import LowMemDPOConfig

    common = {"output_dir": "unused", "bf16": False, "use_cpu": True}
    with pytest.raises(ConfigError, match=r"LowMemDPOConfig\.ref_model_sync_steps=10 .*sync_ref_model: true"):
        LowMemDPOConfig(**common, ref_model_sync_steps=10)
    assert LowMemDPOConfig(**common, ref_model_sync_steps=10, sync_ref_model=True).ref_model_sync_steps == 10


def test_do_train_true_and_a_saved_config_pass(tmp_path):
    """do_train: true (what lowmem train does) passes; a whole saved TrainingArguments.to_dict() (do_train: false
    written for every run of a script that never set it) is not refused (check_script_fields); do_train: false alone is."""
    from transformers import TrainingArguments

    from lowmem.config import ConfigError
    from lowmem.train import check_script_fields

    assert _build(tmp_path, "sft", {"do_train": True}).do_train is True
    saved = TrainingArguments(str(tmp_path / "o"), report_to="none", use_cpu=True).to_dict()
    assert saved["do_train"] is False
    check_script_fields(saved)
    with pytest.raises(ConfigError, match="do_train=false"):
        check_script_fields({"do_train": False, "learning_rate": 1e-3})
