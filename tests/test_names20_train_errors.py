"""NAMES20: through ``lowmem train`` (a YAML recipe), the post-training configs' own checks (trainers/trl.py,
gvpo.py, bnpo.py) name the recipe's key as the user wrote it, with the valid range / choices, and refuse before any
model loads. Before: ``LowMemGRPOConfig: LowMemGRPOConfig.loss_type='grpoo': ...``, ``GVPOConfig: GVPO needs beta >
0 ...``, ``BNPOConfig: BNPOConfig.reward_weights=[1.0, 2.0]: ...``; and three checks the trainer makes when it is built
(the eval batch of a recipe with eval data but no eval_steps, BNPO's reward_range count, remove_unused_columns) came
after the model had loaded. One check each (``trainers.trl.ConfigFieldError``: the config's naming and the recipe's,
``lowmem.train.recipe_key``)."""

from __future__ import annotations

import json
import re
from unittest import mock

import pytest
import yaml

BASE = {"optim": "adafactor", "lr": 0.01, "steps": 1, "batch_size": 8, "logging_steps": 1}
RL = {"num_generations": 4, "max_completion_length": 4}
TWO_FUNCS = {"reward_funcs": ["lowmem.kit:reward_fn", "lowmem.kit:reward_fn"]}
DATA = {"reward_funcs": ["exact_match"]}  # + dataset: a prompt / answer jsonl (the test writes it)


def _train(tmp_path, capsys, trainer, top, training_args, data=False):
    """``lowmem train recipe.yaml`` with every model loader replaced by an exit: (exit code, the error line)."""
    from lowmem.cli import main

    recipe = {**BASE, "trainer": trainer, "output_dir": str(tmp_path / "out"), **top}
    if data:
        rows = tmp_path / "rows.jsonl"
        rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(16)))
        recipe["dataset"] = str(rows)
    else:
        recipe["train_size"] = 16
    rl = {} if trainer == "dpo" else {k: v for k, v in RL.items() if k not in top}  # (a key is given once)
    recipe["training_args"] = {**rl, **training_args}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = SystemExit("model loaded")
    with mock.patch("lowmem.train._policy_tokenizer_and_dir", side_effect=loaded), \
            mock.patch("lowmem.train.load_policy", side_effect=loaded), \
            mock.patch("lowmem.kit.load_model_and_tokenizer", side_effect=loaded), pytest.raises(SystemExit) as exit_:
        raise SystemExit(main(["train", str(path)]))
    err = capsys.readouterr().err.strip().splitlines()
    return exit_.value.code, err[-1] if err else ""


CASES = [
    # (id, trainer, top-level recipe keys, training_args, dataset, the error after 'lowmem: error: ')
    # trainers.trl.check_eval_groups (LowMemGRPOConfig / GVPOConfig with eval_strategy on)
    ("eval-batch-given", "grpo", {"eval_steps": 1}, {"per_device_eval_batch_size": 3}, False,
     r"training_args\.per_device_eval_batch_size=3 does not hold whole groups of num_generations_eval=4 \(unset: "
     r"num_generations\).*multiple of 4 \(4\) or num_generations_eval to a divisor of 3"),
    ("eval-batch-from-batch_size", "grpo", {"eval_steps": 1}, {"num_generations_eval": 3}, False,
     r"batch_size=8 does not hold whole groups of num_generations_eval=3: .*set per_device_eval_batch_size to a "
     r"multiple of 3 \(6 or 9\) or num_generations_eval to a divisor of 8 \(\[2, 4, 8\]\)"),
    ("gvpo-eval-batch", "gvpo", {"eval_steps": 1}, {"num_generations_eval": 3}, False,
     r"batch_size=8 does not hold whole groups of num_generations_eval=3: .* per process \(GVPO's loss"),
    # the same check, made by the trainer (after the model loaded) when eval data is given without eval_steps
    ("eval-batch-eval_split", "grpo", {**DATA, "eval_split": 0.25}, {"num_generations_eval": 3}, True,
     r"batch_size=8 does not hold whole groups of num_generations_eval=3: "),
    # LowMemGRPOConfig's num_generations (TRL's own check named no field: 'GRPO requires at least 2 generations ...')
    ("grpo-num_generations", "grpo", {}, {"num_generations": 1}, False,
     r"GRPO needs num_generations >= 2 completions per prompt .*; got training_args\.num_generations=1"),
    # TRL's 'generation_batch_size (12) must be divisible by the global batch size (8)' (lowmem.train._check_generation_groups)
    ("generation_batch_size", "grpo", {}, {"generation_batch_size": 12}, False,
     r"generation_batch_size=12 is not a multiple of batch_size x processes \(8 x 1 = 8\): .*a multiple of 8 \(8 or 16\)"),
    # trainers.trl.check_choices (GRPO_CHOICES / DPO_CHOICES)
    ("grpo-loss_type", "grpo", {}, {"loss_type": "grpoo"}, False,
     r"training_args\.loss_type='grpoo': expected one of \['grpo', 'dr_grpo', 'dapo'"),
    ("grpo-loss_type-top", "grpo", {"loss_type": "grpoo"}, {}, False, r"loss_type='grpoo': expected one of \['grpo'"),
    ("scale_rewards", "grpo", {}, {"scale_rewards": "groups"}, False,
     r"training_args\.scale_rewards='groups': expected one of \['group', 'batch', 'none'\]"),
    ("importance_sampling_level", "gvpo", {"importance_sampling_level": "tokens"}, {}, False,
     r"importance_sampling_level='tokens': expected one of \['token', 'sequence'\]"),
    ("dpo-loss_type", "dpo", {}, {"loss_type": "sigmoidd"}, False,
     r"training_args\.loss_type=\['sigmoidd'\]: expected items one of \['sigmoid', 'hinge'"),
    ("dpo-f_divergence_type", "dpo", {"f_divergence_type": "kl"}, {}, False,
     r"f_divergence_type='kl': expected one of \['reverse_kl', 'forward_kl'"),
    # GVPOConfig
    ("gvpo-beta-0", "gvpo", {}, {"beta": 0.0}, False, r"GVPO needs beta > 0 \(the implicit-reward scale\); got "
                                                       r"training_args\.beta=0\.0"),
    ("gvpo-beta-0-top", "gvpo", {"beta": 0.0}, {}, False, r"GVPO needs beta > 0 .*; got beta=0\.0"),
    ("gvpo-num_generations", "gvpo", {}, {"num_generations": 1}, False,
     r"GVPO needs num_generations >= 2 .*; got training_args\.num_generations=1"),
    ("gvpo-num_generations_eval", "gvpo", {}, {"num_generations_eval": 1}, False,
     r"GVPO needs num_generations_eval >= 2 .*; got training_args\.num_generations_eval=1"),
    ("gvpo-reference_policy", "gvpo", {"reference_policy": "ref"}, {}, False,
     r"Unknown reference_policy 'ref'; valid: \['sampling', 'model'\]"),
    ("gvpo-sync_ref_model", "gvpo", {}, {"sync_ref_model": True}, False,
     r"training_args\.sync_ref_model=True needs reference_policy='model'"),
    ("gvpo-unused-epsilon", "gvpo", {}, {"epsilon": 0.3}, False,
     r"GVPO does not use training_args\.epsilon=0\.3 \(TRL's default 0\.2\): .* Leave it at the default, or train "
     r"with GRPO \(LowMemGRPOConfig; lowmem train: trainer: grpo\)"),
    ("gvpo-micro-batch", "gvpo", {"batch_size": 6}, {"steps_per_generation": 2}, False,
     r"GVPO needs whole groups in every micro-batch: batch_size \(6\) must be a multiple of "
     r"training_args\.num_generations \(4\)"),
    # BNPOConfig / BNPOTrainer
    ("bnpo-num_generations", "bnpo", {"num_generations": 1}, {}, False,
     r"BNPO needs num_generations >= 2 .*; got num_generations=1"),
    ("bnpo-unused-scale_rewards", "bnpo", {}, {"scale_rewards": "batch"}, False,
     r"BNPO does not use training_args\.scale_rewards='batch' \(TRL's default 'group'\)"),
    ("bnpo-weights-unequal", "bnpo", TWO_FUNCS, {"reward_weights": [1.0, 2.0]}, False,
     r"training_args\.reward_weights=\[1\.0, 2\.0\]: BNPO averages one advantage per reward function with equal "
     r"weight.*give equal weights or leave reward_weights unset"),
    ("bnpo-weights-negative", "bnpo", {}, {"reward_weights": [-1.0]}, False,
     r"training_args\.reward_weights=\[-1\.0\]: BNPO rescales .* a weight <= 0 would be ignored"),
    ("bnpo-reward_range-order", "bnpo", {}, {"reward_range": [1.0, 0.0]}, False,
     r"invalid training_args\.reward_range \(1\.0, 0\.0\): expected finite low < high"),
    ("bnpo-reward_range-count", "bnpo", TWO_FUNCS, {"reward_range": [[0, 1], [0, 1], [0, 1]]}, False,
     r"training_args\.reward_range must be a pair \(low, high\) or one pair per reward function \(2\)"),
    ("bnpo-reward_range-count-top", "bnpo", {**DATA, "reward_range": [[0, 1], [0, 1]]}, {}, True,
     r"reward_range must be a pair \(low, high\) or one pair per reward function \(1\)"),
    # LowMemGRPOTrainer's check_kept_columns
    ("remove_unused_columns", "grpo", {**DATA, "remove_unused_columns": True}, {}, True,
     r"remove_unused_columns=True would drop the dataset's columns \['answer'\] .*set remove_unused_columns=False"),
    # checks lowmem train made itself already (DEPENDENT_FIELDS, vllm_* without use_vllm, DPO's): still named so
    ("dependent-field", "grpo", {}, {"ref_model_sync_steps": 10}, False,
     r"training_args\.ref_model_sync_steps=10 is read only with sync_ref_model: true"),  # (recipe key since AUDOWN21 9)
    ("vllm-field", "grpo", {}, {"vllm_gpu_memory_utilization": 0.5}, False,
     r"training_args\.vllm_gpu_memory_utilization=0\.5: vLLM generation settings, which need training_args\.use_vllm=true"),
    ("dpo-beta-0", "dpo", {"beta": 0.0}, {}, False, r"beta=0 for DPO: .*valid: a float > 0"),
]


@pytest.mark.parametrize("trainer, top, training_args, data, says",
                         [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_config_checks_name_the_recipe_key_before_the_model_loads(tmp_path, capsys, trainer, top, training_args, data,
                                                                  says):
    code, line = _train(tmp_path, capsys, trainer, top, training_args, data)
    assert code == 2, line  # 'model loaded' when it got past the checks to a model loader
    assert re.search(r"^lowmem: error: (\S+recipe\.yaml: )?" + says, line), line
    assert "Config." not in line and "Config: " not in line, line  # no config class's naming of the field


@pytest.mark.parametrize("trainer, top, training_args, data", [
    ("grpo", {"eval_steps": 1}, {"per_device_eval_batch_size": 4}, False),
    ("gvpo", {"generation_batch_size": 16}, {}, False),
    ("gvpo", {"reference_policy": "model", "sync_ref_model": True}, {}, False),
    ("bnpo", TWO_FUNCS, {"reward_weights": [2.0, 2.0], "reward_range": [[0, 1], [-1, 1]]}, False),
    ("grpo", {**DATA, "eval_split": 0.25, "remove_unused_columns": False}, {}, True),
], ids=["eval-batch", "generation_batch_size", "gvpo-sync", "bnpo-ranges-weights", "data-eval_split"])
def test_valid_values_reach_the_model_load(tmp_path, capsys, trainer, top, training_args, data):
    code, line = _train(tmp_path, capsys, trainer, top, training_args, data)
    assert code == "model loaded", line


def test_the_config_keeps_its_own_naming():
    """The same checks, built directly: the config class names its field (unchanged messages)."""
    from lowmem.trainers import BNPOConfig, LowMemGRPOConfig
    from lowmem.trainers.trl import ConfigFieldError

    with pytest.raises(ConfigFieldError, match=r"^LowMemGRPOConfig\.loss_type='grpoo': expected one of") as err:
        LowMemGRPOConfig(output_dir="out", loss_type="grpoo", report_to="none", bf16=False)
    assert err.value.named(lambda f: f"training_args.{f}").startswith("training_args.loss_type='grpoo': expected")
    with pytest.raises(ValueError, match=r"^BNPOConfig\.reward_weights=\[1\.0, 2\.0\]: BNPO averages"):
        BNPOConfig(output_dir="out", reward_weights=[1.0, 2.0], report_to="none", bf16=False)
