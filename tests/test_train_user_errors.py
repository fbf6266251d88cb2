"""What an outside user's recipe gets: recipe values are honoured over the TRL configs' own defaults,
and a user's mistake is one clear error before anything expensive runs."""

import warnings

import pytest

from lowmem.train import build_training_args, load_recipe


@pytest.mark.parametrize("trainer", ["sft", "dpo", "grpo"])
def test_gradient_checkpointing_false_is_not_overridden_by_trl_defaults(trainer, tmp_path):
    """TRL's configs default ``gradient_checkpointing`` to True: a recipe's ``false`` (the default) must
    still turn it off, ``true`` turn it on, and ``training_args`` (either name) win; no FutureWarning."""
    kw = dict(trainer=trainer, output_dir=str(tmp_path), batch_size=4)
    if trainer == "sft":
        data = tmp_path / "d.jsonl"
        data.write_text('{"text": "1+1=2"}\n')
        kw["dataset"] = str(data)  # SFTConfig (TRL's SFTTrainer)
    if trainer == "grpo":
        kw["training_args"] = {"num_generations": 4}
    for recipe_value, extra, expected in [(False, {}, False), (True, {}, True),
                                          (False, {"activation_checkpointing": True}, True)]:
        recipe = load_recipe(None, gradient_checkpointing=recipe_value,
                             **{**kw, "training_args": {**kw.get("training_args", {}), **extra}})
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            args = build_training_args(recipe)
        assert args.activation_checkpointing is expected and args.gradient_checkpointing is expected, (recipe_value, extra)
    recipe = load_recipe(None, **{**kw, "training_args": {**kw.get("training_args", {}), "gradient_checkpointing": True}})
    assert build_training_args(recipe).activation_checkpointing is True
