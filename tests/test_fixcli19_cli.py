"""FIXCLI19 (session 19): regression tests of the command-line fixes of AUDCLI19 / AUDQLORA19 7 / SMALLS19 1, beside
the audit's own reproducers in tests/test_audit19_cli.py and tests/test_audit19_models.py."""

from __future__ import annotations

import pytest


def _fields(*argv: str) -> dict:
    from lowmem.cli import build_parser, split_field_flags

    return split_field_flags(["train", *argv], build_parser())[1]


# ---- AUDCLI19 3: a field flag's value read by the field's type (HfArgumentParser's way) ----------------------------

@pytest.mark.parametrize("argv, expected", [
    (("--save_strategy", "no"), {"save_strategy": "no"}),  # YAML 1.1 reads no as false; the field takes text
    (("--run_name", "2024-01-01"), {"run_name": "2024-01-01"}),  # a date: never a field's value
    (("--run_name", "true"), {"run_name": "true"}),  # a str field keeps the text as typed, as HfArgumentParser does
    (("--run_name", "123"), {"run_name": "123"}),
    (("--packing", "yes"), {"packing": True}),  # a bool field still reads yes / off as YAML does
    (("--bf16", "off"), {"bf16": False}),
    (("--num_train_epochs", "1"), {"num_train_epochs": 1}),
    (("--scale_rewards", "no"), {"scale_rewards": False}),  # str | bool (TRL converts False -> "none"): the bool stays
])
def test_field_flag_value_read_by_the_field_type(argv, expected):
    assert _fields(*argv) == expected


# ---- AUDCLI19 7: numbers written as strings inside a list / tuple optim_args value ----------------------------------

def test_optim_args_pair_items_are_converted_like_scalars():
    from lowmem.trainers.hf import validate_optim_args

    out = validate_optim_args("adamw", {"betas": ["0.9", "1e-3"], "eps": "1e-8"})
    assert tuple(out["betas"]) == (0.9, 1e-3) and all(isinstance(b, float) for b in out["betas"]) and out["eps"] == 1e-8
    assert tuple(validate_optim_args("adafactor", {"eps": ("1e-30", "1e-3")})["eps"]) == (1e-30, 1e-3)
    with pytest.raises(ValueError, match="optim_args.betas"):  # a wrong pair is still refused, naming the key
        validate_optim_args("adamw", {"betas": ["0.9", "abc"]})


# ---- AUDCLI19 4 / AUDQLORA19 7: the spellings of one flag -----------------------------------------------------------

@pytest.mark.parametrize("argv, named", [
    (["--steps", "5", "--max_steps", "6"], "--max_steps"),
    (["--output_dir", "a", "--output-dir", "b"], "--output-dir"),
    (["--batch-size", "4", "--batch_size", "8"], "--batch-size"),
    (["--lr", "1e-3", "--lr", "2e-3"], "--lr"),  # one spelling twice with two values, as a field flag twice is refused
])
def test_two_values_for_one_flag_are_refused(argv, named, capsys):
    from lowmem.cli import main

    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowmem: error: ") and named in err and "give one" in err


@pytest.mark.parametrize("argv, key, value", [
    (["--lr", "1e-3", "--learning_rate", "0.001"], "lr", 1e-3),  # the same value twice: accepted
    (["--batch_size", "4"], "batch_size", 4),
    (["--resume_from_checkpoint", "out/checkpoint-1"], "resume_from_checkpoint", "out/checkpoint-1"),
])
def test_underscore_spellings_reach_the_recipe(argv, key, value):
    from lowmem.cli import build_parser, recipe_from_args, split_field_flags

    parser = build_parser()
    rest, fields = split_field_flags(["train", "--steps", "1", *argv], parser)
    args = parser.parse_args(rest)
    args.fields = fields
    recipe = recipe_from_args(args)
    assert getattr(recipe, key) == value or str(getattr(recipe, key)).endswith(str(value))


# ---- AUDCLI19 1 / 2: lowmem bench's tiny-task flags elsewhere, --optim-args for a name not benched -------------------

@pytest.mark.parametrize("mode", [["--launches", "--shapes", "small-linear"], ["--shapes", "small-tensors"],
                                  ["--task", "text"]])
@pytest.mark.parametrize("flag", [["--optim-args", "adamw:eps=1e-6"], ["--model", "/nonexistent"], ["--seed", "0"]])
def test_bench_tiny_only_flags_refused_in_other_modes(mode, flag, tmp_path, capsys):
    from lowmem.cli import main

    assert main(["bench", "adamw", *mode, *flag, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} applies to the tiny task only, not {mode[0]}" in err
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_bench_optim_args_of_an_unbenched_name_names_the_benched(tmp_path, capsys):
    from lowmem.cli import main

    assert main(["bench", "adamw", "lion:lr=1e-4", "--optim-args", "galore_adamw:rank=4", "--steps", "10",
                 "--output-dir", str(tmp_path)]) == 2
    assert "['galore_adamw'], which are not benched; benched: ['adamw', 'lion']" in capsys.readouterr().err


# ---- AUDCLI19 6: an output_dir that is (or lies under) a file ------------------------------------------------------

@pytest.mark.parametrize("sub", ["", "sub/deeper"])
def test_output_dir_under_a_file_is_refused_naming_the_field(tmp_path, sub):
    from lowmem.config import ConfigError
    from lowmem.train import load_recipe

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir=.*afile.* is a file, not a folder"):
        load_recipe(None, steps=1, output_dir=str(afile / sub) if sub else str(afile))
    assert load_recipe(None, steps=1, output_dir=str(tmp_path / "new" / "run")).output_dir.endswith("run")


# ---- AUDCLI19 5: examples/pure_bf16.py's arguments checked by argparse types -----------------------------------------

@pytest.mark.parametrize("argv, named", [(["--steps", "0"], "--steps"), (["--lr", "abc"], "--lr"),
                                         (["--lr", "1e-4,-1"], "--lr"), (["--optim", "adamw,,lion"], "--optim")])
def test_pure_bf16_example_names_a_bad_argument(argv, named):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "pure_bf16.py"
    out = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"argument {named}:" in out.stderr and "Traceback" not in out.stderr, out.stderr[-300:]


# ---- SMALLS19 1: a launch's error line is never lost when a process other than 0 exits first ------------------------

@pytest.mark.parametrize("rank, world, printed", [("0", "2", "lowmem: error: "), ("1", "2", "lowmem: error: [rank 1] "),
                                                  ("1", None, None)])
def test_other_ranks_print_their_error_after_a_wait(tmp_path, capsys, monkeypatch, rank, world, printed):
    import time

    import lowmem.cli as cli

    waited = []
    monkeypatch.setattr(time, "sleep", waited.append)
    monkeypatch.setenv("RANK", rank)
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: adamw\nlr: abc\n")
    assert cli.main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == ("" if printed is None else f"{printed}{bad}: lr='abc': expected a number >= 0, or null\n")
    # process 0 prints at once; another waits (process 0, failing too, prints and the launcher ends the others)
    assert waited == ([cli.OTHER_RANK_ERROR_WAIT_S] if rank != "0" and world else [])
