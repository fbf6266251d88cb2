"""SMALLS20 2: YAML 1.1 reads an unquoted ``no`` / ``off`` as false and ``yes`` / ``on`` as true, so a recipe's
``save_strategy: no`` reached the checker as ``False`` and the error said the value was wrong but not why. The error
now says what YAML did and what to write (lowmem.config._yaml_boolean_hint); nothing is accepted in its place
(transformers refuses ``save_strategy=False`` too)."""

from __future__ import annotations

import pytest


def _train(tmp_path, capsys, body: str) -> tuple[int, str]:
    from lowmem.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 1\nlr: 1e-3\n" + body + "\n")
    rc = main(["train", str(recipe), "--output-dir", str(tmp_path / "out")])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("body, field, hint", [
    ("save_strategy: no", "training_args.save_strategy=False", "unquoted no / off as false: write 'no' in quotes"),
    ("training_args:\n  eval_strategy: off", "training_args.eval_strategy=False",
     "unquoted no / off as false: write 'no' in quotes"),
    ("logging_strategy: no", "training_args.logging_strategy=False", "unquoted no / off as false: write 'no' in quotes"),
    ("report_to: no", "report_to=False", "unquoted no / off as false: write none)"),
    ("training_args:\n  report_to: off", "training_args.report_to=False", "unquoted no / off as false: write none)"),
    ("training_args:\n  save_strategy: yes", "training_args.save_strategy=True",
     "YAML reads an unquoted yes / no / on / off as a boolean: write a word meant as text in quotes"),
])
def test_yaml_boolean_for_a_text_field_says_why(tmp_path, capsys, body, field, hint):
    rc, err = _train(tmp_path, capsys, body)
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lowmem: error: ") and f"{field}: expected " in line and hint in line, line
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_number_field_gets_no_yaml_hint(tmp_path, capsys):
    rc, err = _train(tmp_path, capsys, "seed: no")
    assert rc == 2 and "seed=False: expected an integer >= 0" in err and "YAML" not in err, err


def test_quoted_no_trains(tmp_path, capsys):
    rc, err = _train(tmp_path, capsys, "save_strategy: 'no'\ntraining_args:\n  eval_strategy: 'no'\n"
                                       "  logging_strategy: 'no'")
    assert rc == 0, err
    assert (tmp_path / "out" / "metrics.json").is_file() and not list((tmp_path / "out").glob("checkpoint-*"))
