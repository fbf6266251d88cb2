"""SMALLS20B 2: ``lowmem train`` checks the GRPO / GVPO / BNPO trainer configs' generation_kwargs and reward_weights
rules (FIXRL20: trainers.trl.BATCH_GENERATION_KWARGS, the reward_weights count, all-zero weights) while reading the
recipe, before any model loads, naming the recipe's key. Before: ``LowMemGRPOConfig: LowMemGRPOConfig.generation_kwargs
.num_return_sequences=2: ...`` (the config class's error), and a reward_weights count refused by the trainer after the
run had started (``LowMemGRPOConfig.reward_weights has 2 entries ... but reward_funcs has 1``)."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import yaml

BASE = {"optim": "adafactor", "lr": 0.01, "steps": 1, "batch_size": 8, "train_size": 16, "logging_steps": 1}


def _train(tmp_path, capsys, trainer, **training_args):
    """``lowmem train recipe.yaml``, its run replaced: (exit code, the error line, whether the run started)."""
    from lowmem.cli import main

    path = tmp_path / "recipe.yaml"
    ta = {"num_generations": 4, "max_completion_length": 4, **training_args}
    path.write_text(yaml.safe_dump({**BASE, "trainer": trainer, "output_dir": str(tmp_path / "out"), "training_args": ta}))
    with mock.patch("lowmem.train.run", side_effect=SystemExit("ran")), pytest.raises(SystemExit) as exit_:
        raise SystemExit(main(["train", str(path)]))
    err = capsys.readouterr().err.strip().splitlines()
    return exit_.value.code, err[-1] if err else ""


@pytest.mark.parametrize("trainer, key, value", [
    ("grpo", "num_return_sequences", 2), ("grpo", "output_scores", True), ("gvpo", "return_dict_in_generate", True),
    ("bnpo", "stop_strings", ["</s>"]),
])
def test_generation_kwargs_that_break_the_batch_name_the_recipe_key(tmp_path, capsys, trainer, key, value):
    code, line = _train(tmp_path, capsys, trainer, generation_kwargs={key: value})
    assert code == 2, line
    assert f": generation_kwargs.{key}={value!r}: " in line and f"; drop generation_kwargs.{key}" in line, line
    assert "Config" not in line, line  # not the trainer config class's name (LowMemGRPOConfig, GVPOConfig, BNPOConfig)


def test_generation_kwargs_as_a_json_string_and_harmless_ones(tmp_path, capsys):
    code, line = _train(tmp_path, capsys, "grpo", generation_kwargs=json.dumps({"num_return_sequences": 3}))
    assert code == 2 and "generation_kwargs.num_return_sequences=3: " in line and "Config" not in line, line
    code, line = _train(tmp_path, capsys, "grpo", generation_kwargs={"num_return_sequences": 1, "output_scores": False,
                                                                       "no_repeat_ngram_size": 2})
    assert code == "ran", line


@pytest.mark.parametrize("trainer, weights, says", [
    ("grpo", [1.0, 0.5], "training_args.reward_weights has 2 entries ([1.0, 0.5]) but reward_funcs is unset"),
    ("gvpo", [1.0, 1.0, 1.0], "training_args.reward_weights has 3 entries"),
    ("grpo", [0.0], "training_args.reward_weights=[0.0]: all weights are 0"),
    ("grpo", [2.0], None),
])
def test_training_args_reward_weights_without_reward_funcs(tmp_path, capsys, trainer, weights, says):
    code, line = _train(tmp_path, capsys, trainer, reward_weights=weights)
    if says is None:
        assert code == "ran", line
        return
    assert code == 2 and says in line and "Config" not in line, line
