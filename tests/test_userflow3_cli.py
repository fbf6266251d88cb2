"""``lowmem train``'s generic field flags (USERFLOW3's audit, session 16): ``--max_length null`` (what lowmem's own
padding_free message asks for, and TRL's "set max_length=None") was dropped without a word: a keyword override of None
means "not given" in :func:`lowmem.train.load_recipe` (argparse's unset flags), so the recipe's or TRL's value stayed.
An explicit null flag now reaches the recipe as the file's ``max_length: null`` does."""

import pytest

from lowmem.cli import build_parser, recipe_from_args, split_field_flags


def _recipe(argv):
    parser = build_parser()
    argv, fields = split_field_flags(["train", *argv], parser)
    args = parser.parse_args(argv)
    args.fields = fields
    return recipe_from_args(args)


def test_an_explicit_null_flag_reaches_the_recipe(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "1+1=2"}\n' * 4)
    common = ["--dataset", str(tmp_path / "rows.jsonl"), "--lr", "1e-3", "--padding_free"]
    assert _recipe([*common, "--max_length", "null"]).training_args["max_length"] is None
    assert _recipe([*common, "--max_length=null", "--packing", "false"]).training_args["max_length"] is None


def test_flags_left_out_stay_unset(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "1+1=2"}\n' * 4)
    recipe = _recipe(["--dataset", str(tmp_path / "rows.jsonl"), "--lr", "1e-3", "--max_length", "64"])
    assert recipe.training_args["max_length"] == 64 and recipe.steps == 200 and recipe.seed == 0
