"""Outside audit AUDCLI19 (session 19): the command line, the recipes in configs/, the examples and the docs' claims,
run as a new user would. Each test reproduces one defect the audit found (a flag or value ignored or misread, an
error only after the model loaded) and asserts the correct behaviour. The defects are fixed (each fixing commit names
its finding id, ``AUDCLI19 n``); the tests, once strict xfails, now guard the fixed behaviour."""

from __future__ import annotations

import json

import pytest


def _main(argv: list[str]) -> int:
    from lowmem.cli import main

    return main(argv)


def test_bench_optim_args_applied_or_refused_outside_tiny_task(tmp_path):
    # the user asks GaLore at rank 4 on the small-linear set (128x128 weights): the run must use rank 4 or refuse
    # --optim-args by name; today it benches (skips) GaLore at its default rank 128 and exits 0
    rc = _main(["bench", "--launches", "--shapes", "small-linear", "galore_adamw", "--optim-args",
                "galore_adamw:rank=4", "--output-dir", str(tmp_path)])
    if rc == 0:
        text = (tmp_path / "bench_launches.json").read_text()
        assert "rank 128" not in text and "RankError" not in text, "galore_adamw:rank=4 was not applied"
    else:
        assert rc == 2


def test_bench_optim_args_for_an_unbenched_name_is_refused(tmp_path, capsys):
    # `galore_adam` (typo of galore_adamw) names no benched row: the override would be dropped without a word
    rc = _main(["bench", "adamw", "--optim-args", "galore_adam:rank=4", "--steps", "10", "--output-dir", str(tmp_path)])
    assert rc == 2
    assert "galore_adam" in capsys.readouterr().err


def _recipe(argv: list[str]):
    """The recipe `lowmem train ARGV` would run (nothing trained), as lowmem.cli.main builds it."""
    from lowmem.cli import build_parser, recipe_from_args, split_field_flags

    parser = build_parser()
    rest, fields = split_field_flags(list(argv), parser)
    args = parser.parse_args(rest)
    args.fields = fields
    return recipe_from_args(args)


@pytest.mark.parametrize("flag", ["--save_strategy", "--eval_strategy", "--logging_strategy"])
def test_strategy_no_flag_as_trl_spells_it(flag):
    from lowmem.train import build_training_args

    recipe = _recipe(["train", flag, "no", "--steps", "2"])
    args = build_training_args(recipe)
    assert str(getattr(getattr(args, flag[2:]), "value", getattr(args, flag[2:]))) == "no"


def test_flag_aliases_given_twice_are_refused(tmp_path, capsys):
    # a field flag given twice is refused (`--max_length 8 --max_length=9`, lowmem/cli.py split_field_flags) and a
    # recipe naming lr and learning_rate is refused; the parser's own aliases keep the last value without a word
    rc = _main(["train", "--lr", "1e-3", "--learning_rate", "2e-3", "--steps", "1", "--output-dir", str(tmp_path)])
    assert rc == 2
    assert "learning_rate" in capsys.readouterr().err


def test_pure_bf16_example_refuses_zero_seeds():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "pure_bf16.py"
    out = subprocess.run([sys.executable, str(script), "--seeds", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--seeds" in out.stderr, (out.returncode, out.stdout[-300:], out.stderr[-300:])


def test_output_dir_that_is_a_file_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import lowmem.train as train
    from lowmem.config import ConfigError

    class Loaded(Exception):
        pass

    def load_policy(*args, **kwargs):
        raise Loaded("the model started loading")

    monkeypatch.setattr(train, "load_policy", load_policy)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(ConfigError, match="output_dir"):
        train.run(train.load_recipe(None, steps=1, output_dir=str(afile)))


def test_optim_args_pair_in_exponent_notation_is_read_as_numbers(tmp_path):
    from lowmem.train import load_recipe

    recipe_file = tmp_path / "ada.yaml"
    # Adafactor's default eps, as lowmem's own metrics.json prints it ("eps": [1e-30, 0.001]) and as configs are
    # written; PyYAML (YAML 1.1) reads 1e-30 and 1e-3 as strings, which lowmem converts for a scalar (eps: 1e-8)
    recipe_file.write_text("optim: adafactor\noptim_args: {eps: [1e-30, 1e-3]}\nsteps: 1\n")
    recipe = load_recipe(recipe_file)
    assert tuple(float(x) for x in recipe.optim_args["eps"]) == (1e-30, 1e-3)
    assert all(isinstance(x, float) for x in recipe.optim_args["eps"])
