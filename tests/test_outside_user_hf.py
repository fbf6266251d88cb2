"""An outside user's HF Trainer habits under ``lowmem train``: configs written for the Trainer or
``trl sft``, other model architectures than Llama, data as users bring it. Each test here reproduces
something that once went wrong silently or with a traceback (tiny models, a few steps)."""

import json

import pytest

from lowmem.config import ConfigError
from lowmem.train import TrainRecipe, build_training_args, load_recipe, run


def _recipe_file(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_num_train_epochs_trains_by_epochs(tmp_path):
    """``num_train_epochs`` in a Trainer config was passed to the Trainer beside the recipe's default
    ``steps: 200`` (``max_steps=200``), which the Trainer lets win: 1 epoch ran 200 steps (16.7 epochs)."""
    out = tmp_path / "out"
    path = _recipe_file(tmp_path, f"num_train_epochs: 1\ntrain_size: 40\nper_device_train_batch_size: 16\n"
                                  f"optim: adamw\nlogging_steps: 1\noutput_dir: {out}\nsave_model: false\n")
    recipe = load_recipe(path)
    assert recipe.steps is None and build_training_args(recipe).max_steps == -1
    metrics = run(recipe)
    assert metrics["steps"] == 3  # ceil(40 / 16) batches, one epoch
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    # the Trainer's own "max_steps: -1" means the same
    assert load_recipe(_recipe_file(tmp_path, "max_steps: -1\nnum_train_epochs: 2\n")).steps is None
    # a --steps override wins over the file's epochs (overrides win), and the file's epochs over the default
    assert load_recipe(path, steps=5).steps == 5 and "num_train_epochs" not in load_recipe(path, steps=5).training_args
    assert load_recipe(_recipe_file(tmp_path, "steps: 7\n"), num_train_epochs=1).steps is None


def test_steps_and_epochs_in_one_place_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"steps=10 and num_train_epochs=2 both set the length of the run"):
        load_recipe(_recipe_file(tmp_path, "num_train_epochs: 2\nmax_steps: 10\n"))
    with pytest.raises(ConfigError, match=r"steps=200 and num_train_epochs=1 .*give one"):
        TrainRecipe(training_args={"num_train_epochs": 1})
    assert TrainRecipe(steps=None, training_args={"num_train_epochs": 1}).steps is None
