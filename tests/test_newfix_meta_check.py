"""FOUND_NEWCOMER 4 (NEWFIX): the run's optimizer is built over the model on the meta device (from config.json) before
the model and the data load, so shape-dependent values (a subspace rank larger than every weight's smaller side) are
refused first, with the optimizer's own message."""

import warnings

import pytest

import lowmem.train
from lowmem.config import ConfigError
from lowmem.optim import create_optimizer, list_optimizers
from lowmem.train import TrainRecipe, build_training_args, check_optimizer_on_meta


def _error(build):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build()
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize("every", [False, pytest.param(True, marks=pytest.mark.slow)])  # every optimizer: 7 s
def test_meta_build_refuses_what_the_real_build_refuses(every):
    """Every registered optimizer at its defaults (slow; else the subspace ones), and the subspace ranks around the
    tiny Llama's sides (64 wide, 32 for k/v): the build over meta tensors fails exactly when the build over the
    loaded model does, with its message."""
    from lowmem.kit import build_tiny_model

    cases = [(name, {}) for name in (list_optimizers() if every else ["adafactor", "adamw", "muon", "adam_mini"])]
    cases += [(name, {"rank": r}) for name in ("galore_adamw", "apollo_adamw", "fira_adamw") for r in (32, 64, 128)]
    refused = 0
    for name, hp in cases:
        recipe = TrainRecipe(optim=name, optim_args=hp, lr=1e-3, steps=1, layerwise=name.startswith(("lomo", "adalomo")))
        model = build_tiny_model(seed=0)[0]  # a fresh one: BAdam's build freezes the blocks it does not train
        real = _error(lambda: create_optimizer(model, recipe.optim, lr=1e-3, **recipe.optim_args))
        meta = _error(lambda: check_optimizer_on_meta(recipe, build_training_args(recipe)))
        if name.startswith("bnb_paged") and real is not None:  # (CPU parameters: lowmem train refuses the recipe
            assert meta is not None and "paged" in meta and "paged" in real, (name, meta, real)  # first, SILENT 27)
            continue
        assert meta == real, (name, hp, meta, real)
        refused += real is not None
    assert refused >= 3  # galore / apollo / fira at rank 64 and 128 at least: the comparison saw refusals


def test_rank_error_names_the_shapes(own_model_dir):
    recipe = TrainRecipe(model=own_model_dir, optim="galore_adamw", lr=1e-3, steps=1)
    with pytest.raises(ValueError, match=r"rank 128 >= the smaller side of every 2-D parameter.*valid: rank 1 \.\. 63"):
        check_optimizer_on_meta(recipe, build_training_args(recipe))


def test_run_refuses_before_the_trainer_loads_anything(tmp_path, monkeypatch):
    """run(load_recipe(...)) from Python: the error comes before the trainer (which loads the model and data) runs."""
    def trainer(recipe):
        raise AssertionError("the trainer ran before the rank was checked")

    monkeypatch.setitem(lowmem.train.TRAINERS, "sft", trainer)
    recipe = lowmem.train.load_recipe(None, optim="galore_adamw", optim_args={"rank": 64}, lr=1e-3, steps=1,
                                      output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="rank 64 >= the smaller side"):
        lowmem.train.run(recipe)


def test_lora_adapters_are_checked_as_they_train():
    """With lora the trained parameters are peft's adapters (r x 64 and 64 x r on the tiny Llama): a rank for the
    base's weights (32) is refused for r=8 adapters, as the build over the loaded model with adapters refuses it."""
    from lowmem.kit import build_tiny_model
    from lowmem.quant import attach_lora
    from lowmem.train import lora_config

    for r, rank in [(8, 4), (8, 8), (8, 32), (16, 8)]:
        lora = {"r": r, "lora_alpha": 2 * r, "target_modules": "all-linear"}
        recipe = TrainRecipe(optim="galore_adamw", optim_args={"rank": rank}, lr=1e-3, steps=1, lora=lora)
        model = attach_lora(build_tiny_model(seed=0)[0], lora_config(lora))
        real = _error(lambda: create_optimizer(model, "galore_adamw", lr=1e-3, rank=rank))
        meta = _error(lambda: check_optimizer_on_meta(recipe, build_training_args(recipe)))
        assert meta == real and (real is None) == (rank < r), (r, rank, meta, real)


def test_adapters_matching_no_layer_are_left_to_the_real_build():
    """lora.target_modules naming no layer: peft's error on the meta model is not raised here (the real build turns
    it into lowmem's message naming the model's layers)."""
    recipe = TrainRecipe(optim="adamw", lr=1e-3, steps=1, lora={"r": 8, "target_modules": ["c_attn"]})
    check_optimizer_on_meta(recipe, build_training_args(recipe))

