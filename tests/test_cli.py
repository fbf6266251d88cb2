import json
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from lowmem.cli import main
from lowmem.train import AVAILABLE_TRAINERS, RECIPE_KEYS, TrainRecipe, load_recipe

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
REQUIRED = {"optimizer", "initial_loss", "final_loss", "optimizer_state_bytes", "adamw_state_bytes", "steps"}


def test_train_default_end_to_end(tmp_path, capsys):
    assert main(["train", "--steps", "40", "--output-dir", str(tmp_path), "--batch-size", "16"]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert REQUIRED <= m.keys()
    assert m["optimizer"] == "adafactor" and m["steps"] == 40
    assert m["initial_loss"] > 4.0 and m["final_loss"] < 0.7 * m["initial_loss"]
    # AdamW: two float32 moments per parameter + a 4-byte step per tensor (the tiny Llama has 21)
    assert m["adamw_state_bytes"] == 8 * m["trainable_params"] + 4 * 21
    assert 0 < m["optimizer_state_bytes"] < m["adamw_state_bytes"] / 10
    out = capsys.readouterr().out
    assert "initial" in out and "final" in out and "AdamW" in out
    assert (tmp_path / "model.safetensors").is_file()


def test_train_yaml_recipe_with_overrides(tmp_path, tiny_model_path):
    rc = main(["train", str(CONFIGS / "adamw.yaml"), "--steps", "5", "--lr", "0.002", "--model", tiny_model_path,
               "--output-dir", str(tmp_path), "--optim-args", "betas=[0.8,0.9]"])
    assert rc == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["optimizer"] == "adamw" and m["steps"] == 5 and m["model"] == tiny_model_path
    assert m["optim_args"] == {"betas": [0.8, 0.9]}
    assert m["optimizer_state_bytes"] == m["adamw_state_bytes"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_configs_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.trainer in AVAILABLE_TRAINERS and recipe.steps > 0


def test_default_yaml_is_what_train_uses(tmp_path, monkeypatch):
    import lowmem.train

    assert lowmem.train.DEFAULT_RECIPE == CONFIGS / "default.yaml" and lowmem.train.DEFAULT_RECIPE.is_file()
    custom = tmp_path / "default.yaml"
    custom.write_text("optim: adamw\nsteps: 7\n")
    monkeypatch.setattr(lowmem.train, "DEFAULT_RECIPE", custom)
    assert (load_recipe(None).optim, load_recipe(None).steps) == ("adamw", 7)
    assert load_recipe(None, steps=3, lr=None).steps == 3  # overrides win, None means "not given"


def test_bad_recipe_key_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: adamw\nlearnig_rate: 0.1\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "learnig_rate" in err and "valid keys" in err and "'lr'" in err and "did you mean ['learning_rate']" in err
    with pytest.raises(ValueError, match="valid keys"):
        load_recipe(bad)


@pytest.mark.parametrize(
    "text, match",
    [
        ("trainer: ppo\n", "available: \\['sft', 'dpo', 'grpo', 'gvpo', 'bnpo'\\]"),
        ("optim: nope\n", "adafactor"),
        ("steps: 0\n", "steps"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_invalid_recipes(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_recipe(path)


def test_missing_recipe_file(capsys):
    assert main(["train", "/nonexistent/recipe.yaml"]) == 2
    assert "recipe.yaml" in capsys.readouterr().err


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "adamw" in out and "adafactor" in out and "4096x4096" in out
    assert "8 " in out  # AdamW's 8 bytes per parameter


def test_entry_point_and_recipe_keys():
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "lowmem"]
    assert ep.value == "lowmem.cli:main"
    assert {"trainer", "optim", "optim_args", "steps", "lr", "output_dir", "model", "seed", "batch_size"} <= set(RECIPE_KEYS)
    assert TrainRecipe().optim == "adafactor"


def test_list_reports_default_hyperparameters_not_test_settings(capsys, monkeypatch):
    """`lowmem list` sizes state at the defaults users get (GaLore rank 128, MicroAdam 1% density),
    not at the generic suite's example settings."""
    from lowmem.cli import main

    monkeypatch.setenv("COLUMNS", "250")
    assert main(["list"]) == 0
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in capsys.readouterr().out.splitlines()
            if line.startswith("│")}
    assert rows["adamw"] == "8"
    assert rows["galore_adamw"] == "0.375"  # (4096*128 + 2*128*4096) * 4 B / 4096^2
    assert float(rows["microadam"]) < 1.0


def test_list_at_llama_7b_scale(capsys, monkeypatch):
    from lowmem.cli import main

    monkeypatch.setenv("COLUMNS", "300")
    assert main(["list", "--shape", "llama-2-7b"]) == 0
    rows = {line.split("│")[1].strip(): line.split("│")[-2].strip() for line in capsys.readouterr().out.splitlines()
            if line.startswith("│")}
    assert rows["adamw"] == "50.21 GiB"  # 8 B x 6.74e9 parameters (+ step counters)
    assert rows["galore_adamw"] == "3.90 GiB"  # rank 128: projected state + AdamW on embeddings and head
    assert rows["bnb_adamw8bit"].endswith("(closed form)")


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path, monkeypatch):
    import os

    from lowmem.io import write_text_atomic

    target = tmp_path / "metrics.json"
    write_text_atomic(target, "old")

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("rank, printed", [(None, True), ("0", True), ("1", False), ("3", False)])
def test_config_error_printed_once_under_several_processes(tmp_path, capsys, monkeypatch, rank, printed):
    """Under torchrun / accelerate launch every process meets the same recipe error: only RANK 0 prints
    the line, the others exit 2 quietly (tests/test_train_distributed.py launches two processes)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: adamw\nlr: abc\n")
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert main(["train", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("lowmem: error: " + f"{bad}: lr='abc': expected a number >= 0, or null\n" if printed else "")
