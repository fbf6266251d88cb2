"""A newcomer's `lowmem train` / `lowmem list` (NEWCOMER audit): the optimizer a run uses is named with its source
when no argument chose it (a config pasted from `trl sft` sets no optim, and lowmem's default is Adafactor where
TRL's and the HF Trainer's is AdamW), and `lowmem list` stays readable in an 80-column terminal or a pipe."""

import pytest

import lowmem.cli
import lowmem.train  # noqa: F401 - imported once at collection (torch, transformers, TRL)
import lowmem.trainers.hf  # noqa: F401
from lowmem.cli import build_parser, default_optim_note, main, split_field_flags


def _args(argv):
    parser = build_parser()
    argv, fields = split_field_flags(["train", *argv], parser)
    args = parser.parse_args(argv)
    args.fields = fields
    return args


def _recipe(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


TRL_CONFIG = "model_name_or_path: null\nlearning_rate: 2.0e-4\nlr_scheduler_type: cosine\nmax_steps: 2\n"


@pytest.mark.parametrize("extra, flags", [
    ("", []),  # a `trl sft` config: no optim
    ("", ["--max_steps", "1", "--learning_rate", "1e-3"]),  # flags that name no optimizer
])
def test_default_optimizer_is_named_with_its_source(tmp_path, extra, flags):
    note = default_optim_note(_args([_recipe(tmp_path, TRL_CONFIG + extra), *flags]), "adafactor")
    assert note is not None and note.startswith("optim=adafactor is lowmem's default")
    assert "adamw_torch" in note  # what TRL / the HF Trainer would run, and how to ask for it


def test_no_recipe_is_the_default_too():
    """`lowmem train --model DIR --dataset F --lr X`: configs/default.yaml's optim is lowmem's choice, not the user's."""
    assert default_optim_note(_args(["--lr", "1e-3", "--steps", "1"]), "adafactor") is not None


@pytest.mark.parametrize("text, flags", [
    (TRL_CONFIG + "optim: adamw_torch\n", []),
    (TRL_CONFIG + "lowmem_optim: galore_adamw\n", []),
    (TRL_CONFIG + "training_args: {optim: adamw_torch}\n", []),
    (TRL_CONFIG, ["--optim", "adamw"]),
    (TRL_CONFIG, ["--lowmem_optim", "adamw"]),
    (TRL_CONFIG, ["--training_args", "{optim: adamw_torch}"]),
])
def test_a_named_optimizer_gets_no_note(tmp_path, text, flags):
    assert default_optim_note(_args([_recipe(tmp_path, text), *flags]), "adamw") is None


def test_recipe_moved_by_resume_flag_is_read(tmp_path):
    """`lowmem train --resume recipe.yaml`: the recipe sits in --resume; its optim counts."""
    path = _recipe(tmp_path, TRL_CONFIG + "optim: adamw\n")
    assert default_optim_note(_args(["--resume", path]), "adamw") is None


def test_main_prints_the_note_before_the_run(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(lowmem.train, "run", lambda recipe, *a, **k: seen.append(recipe.optim) or {})
    monkeypatch.setattr(lowmem.cli, "set_train_threads", lambda model: 1)  # the worker's torch threads stay as they are
    assert main(["train", _recipe(tmp_path, TRL_CONFIG + f"output_dir: {tmp_path / 'o'}\n")]) == 0
    assert seen == ["adafactor"]
    assert "note: optim=adafactor is lowmem's default" in capsys.readouterr().out
    assert main(["train", _recipe(tmp_path, TRL_CONFIG + "optim: adamw_torch\n"), "--output_dir", str(tmp_path)]) == 0
    assert seen[-1] == "adamw" and "lowmem's default" not in capsys.readouterr().out


@pytest.mark.parametrize("shape", [None, pytest.param("llama-2-7b", marks=pytest.mark.slow)])  # sizing 7B: 10 s
def test_list_is_readable_in_80_columns(capsys, monkeypatch, shape):
    """`lowmem list` in an 80-column terminal, or piped (rich sizes a pipe at 80): the description column was 4
    characters wide, one word per line ("des…", "GaL…"). Now every row holds one whole name and its numbers, and each
    description follows the table in full."""
    from lowmem.optim import optimizer_entries

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["list", *(["--shape", shape] if shape else [])]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == len(optimizer_entries())  # one line per optimizer: nothing wrapped
    assert all(len(line) <= 80 and "…" not in line for line in out.splitlines()), out
    flat = " ".join(out.split())
    for e in optimizer_entries():
        assert f"{e.name}: {' '.join(e.summary.split())}" in flat, e.name
