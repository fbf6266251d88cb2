"""`trl sft`-style flags on `lowmem train`: every recipe key / config field is a flag (checked as the recipe's
top-level key), instead of argparse's "unrecognized arguments" with the value taken for the recipe path."""

import pytest

from lowmem.cli import build_parser, main, recipe_from_args, split_field_flags


def _recipe(argv):
    parser = build_parser()
    argv, fields = split_field_flags(argv, parser)
    args = parser.parse_args(argv)
    args.fields = fields
    return recipe_from_args(args)


def test_config_fields_as_flags(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "1+1=2"}\n')
    recipe = _recipe(["train", "--dataset", str(data), "--output-dir", str(tmp_path), "--num_train_epochs", "2",
                      "--gradient-accumulation-steps=4", "--max_length", "64", "--packing",
                      "--optim", "galore_adamw", "--optim_target_modules", "q_proj", "v_proj", "--warmup_steps", "0.1"])
    ta = recipe.training_args
    assert (ta["num_train_epochs"], ta["gradient_accumulation_steps"], ta["max_length"], ta["packing"]) == (2, 4, 64, True)
    assert recipe.steps is None  # by epochs, as a recipe with num_train_epochs and no steps
    assert ta["optim_target_modules"] == ["q_proj", "v_proj"] and recipe.warmup_steps == 0.1


def test_unknown_field_flag_is_the_recipe_error(tmp_path, capsys):
    """trl sft's model arguments get lowmem's spelling; a typo its close match; the value after a flag is not
    taken for the recipe (before: "unrecognized arguments: --dataset_name", chat.jsonl read as the recipe)."""
    assert main(["train", "--dataset_name", "chat.jsonl", "--lora_r", "8", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe key(s) ['dataset_name', 'lora_r']" in err and "lora_r -> lora: {r: ...}" in err
    assert "unrecognized arguments" not in err and "recipe file not found" not in err
    assert main(["train", "--gradient_acumulation_steps", "2", "--output-dir", str(tmp_path)]) == 2
    assert "'gradient_accumulation_steps'" in capsys.readouterr().err.split("did you mean")[1].split("?")[0]


def test_flag_given_twice_and_recipe_after_a_bool_flag(tmp_path, capsys):
    assert main(["train", "--max_length", "8", "--max_length=9"]) == 2
    assert "--max_length is given twice" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\nsteps: 3\n")
    assert _recipe(["train", "--gradient_checkpointing", str(recipe)]).gradient_checkpointing is True
    with pytest.raises(ValueError, match=r"training_args.gradient_accumulation_steps=0: expected an integer > 0"):
        _recipe(["train", str(recipe), "--gradient_accumulation_steps", "0"])


def test_prefix_of_a_flag_stays_argparse(tmp_path):
    """argparse's abbreviations of lowmem train's own flags keep working (`--batch` for --batch-size)."""
    parser = build_parser()
    argv, fields = split_field_flags(["train", "--batch", "4", "--num_train_epochs", "1"], parser)
    assert argv == ["train", "--batch", "4"] and fields == {"num_train_epochs": 1}
    assert parser.parse_args(argv).batch_size == 4
