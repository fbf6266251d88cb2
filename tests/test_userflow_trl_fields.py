"""TRL config fields a user's `trl grpo` / `trl dpo` config sets, through `lowmem train` and the configs of
lowmem.trainers: TRL's documented spellings are taken (``scale_rewards: false``, refused before as "expected a
string"), and a value outside TRL's list (a typo) is an error when the config is built, where TRL 1.16 failed at
the first training step, after the model loaded and (GRPO) generated."""

import dataclasses
import re

import pytest

from lowmem.config import ConfigError
from lowmem.trainers import BNPOConfig, GVPOConfig, LowMemDPOConfig, LowMemGRPOConfig
from lowmem.trainers.trl import DPO_CHOICES, GRPO_CHOICES

COMMON = dict(report_to="none", bf16=False, use_cpu=True)


@pytest.mark.parametrize("value, built", [(False, "none"), (True, "group"), ("batch", "batch")])
def test_scale_rewards_takes_trls_bool_spelling(tmp_path, value, built):
    """TRL documents ``scale_rewards`` as ``str`` or ``bool`` (GRPOConfig maps True / False to "group" / "none"),
    and Dr. GRPO configs write ``scale_rewards: false``; its annotation says ``str``."""
    from lowmem.train import build_training_args, load_recipe

    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    recipe = load_recipe(None, trainer="grpo", dataset=str(data), reward_funcs=["exact_match"], batch_size=4,
                         output_dir=str(tmp_path / "out"), num_generations=2, scale_rewards=value)
    assert build_training_args(recipe).scale_rewards == built


@pytest.mark.parametrize("cls, field, value", [
    (LowMemGRPOConfig, "loss_type", "dr-grpo"), (LowMemGRPOConfig, "scale_rewards", "gruop"),
    (LowMemGRPOConfig, "importance_sampling_level", "seq"), (LowMemGRPOConfig, "multi_objective_aggregation", "sum"),
    (LowMemGRPOConfig, "vllm_mode", "local"), (BNPOConfig, "loss_type", "dapo_"),
    (GVPOConfig, "importance_sampling_level", "seq"),
    (LowMemDPOConfig, "loss_type", ["sigmoid", "sfft"]), (LowMemDPOConfig, "f_divergence_type", "kl"),
])
def test_a_value_outside_trls_list_is_refused_when_built(tmp_path, cls, field, value):
    kw = dict(per_device_train_batch_size=4, num_generations=2) if cls is not LowMemDPOConfig else {}
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{field}=.*: expected (items )?one of \["):
        cls(output_dir=str(tmp_path), **COMMON, **kw, **{field: value})


def test_trls_own_values_pass(tmp_path):
    LowMemGRPOConfig(output_dir=str(tmp_path), **COMMON, loss_type="dr_grpo", scale_rewards="batch",
                     importance_sampling_level="token", multi_objective_aggregation="normalize_then_sum")
    assert LowMemDPOConfig(output_dir=str(tmp_path), **COMMON, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                           f_divergence_type="js_divergence").loss_type == ["sigmoid", "sft"]


@pytest.mark.parametrize("config, choices", [("GRPOConfig", GRPO_CHOICES), ("DPOConfig", DPO_CHOICES)])
def test_the_lists_are_trls(config, choices):
    """Each value lowmem lets through is one TRL's field documents (its help text): red if TRL renames one."""
    import trl

    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(getattr(trl, config))}
    for name, values in choices.items():
        missing = [v for v in values if not re.search(rf"[`']{v}[`']", helps[name])]  # TRL writes `group' too
        assert not missing, (config, name, missing, helps[name][:300])


def _any_reward(completions, **kwargs):
    return [1.0 for _ in completions]


@pytest.mark.parametrize("cls", [LowMemGRPOConfig, GVPOConfig, BNPOConfig])
def test_remove_unused_columns_true_with_reward_columns_is_refused(tmp_path, cls):
    """The HF Trainer's default remove_unused_columns=True in a config written for it drops the columns TRL would
    pass to the reward functions: before, "missing 1 required positional argument: 'answer'" at the first step,
    after the model loaded and generated (or, through **kwargs, the columns silently gone). Checked before the model
    loads (the path below is never read)."""
    from datasets import Dataset

    from lowmem.trainers import BNPOTrainer, GVPOTrainer, LowMemGRPOTrainer

    trainer = {LowMemGRPOConfig: LowMemGRPOTrainer, GVPOConfig: GVPOTrainer, BNPOConfig: BNPOTrainer}[cls]
    data = Dataset.from_list([{"prompt": "1+1=", "answer": "2"}] * 4)
    args = cls(output_dir=str(tmp_path), **COMMON, per_device_train_batch_size=4, num_generations=2,
               remove_unused_columns=True)
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.remove_unused_columns=True would drop the dataset's columns "
                                         r"\['answer'\] .*set remove_unused_columns=False"):
        trainer(model=str(tmp_path / "never-read"), reward_funcs=_any_reward, args=args, train_dataset=data)
