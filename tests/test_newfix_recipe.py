"""FOUND_NEWCOMER 1-3 (NEWFIX): a recipe records where its optimizer was named (``optim_source``: the startup line and
metrics.json say lowmem's default, which TRL's / the HF Trainer's AdamW is not); a pasted TRL config gets every refused
key in one error; ``dataset_name`` naming a local file or folder is the recipe's ``dataset``."""

import io
import json

import pytest

import lowmem.train
from lowmem.config import ConfigError
from lowmem.train import TrainRecipe, load_recipe

TRL_CONFIG = "model_name_or_path: null\nlearning_rate: 2.0e-4\nmax_steps: 2\n"


def _file(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, overrides, source", [
    ("", {}, "default"),
    ("optim: adamw_torch\n", {}, "recipe"),
    ("lowmem_optim: galore_adamw\n", {}, "recipe"),
    ("training_args: {optim: adamw_torch}\n", {}, "recipe training_args"),
    ("", {"optim": "adamw"}, "override"),
    ("optim: adamw_torch\n", {"lowmem_optim": "lion"}, "override"),
    ("", {"training_args": {"optim": "adamw_torch"}}, "override training_args"),
    ("", {"optim": None}, "default"),  # an unset flag (None) names nothing
])
def test_optim_source_names_where_the_optimizer_was_named(tmp_path, text, overrides, source):
    assert load_recipe(_file(tmp_path, TRL_CONFIG + text), **overrides).optim_source == source


def test_default_recipe_and_direct_construction():
    """No recipe file: configs/default.yaml's optim is lowmem's default, not the user's; a TrainRecipe built in
    Python counts as the default only while its optim is the field's default."""
    assert load_recipe(None, lr=1e-3).optim_source == "default"
    assert TrainRecipe(lr=1e-3).optim_source == "default"
    assert TrainRecipe(lr=1e-3, optim="adamw").optim_source == "recipe"


def test_startup_line_and_metrics_name_the_source(tmp_path, monkeypatch):
    """run(load_recipe(...)) from Python: the startup line and metrics.json say the optimizer is lowmem's default (the
    trainer itself is stubbed: what is checked is what run() prints and writes around it)."""
    from rich.console import Console

    result = {"optimizer_state_bytes": 8, "adamw_state_bytes": 16, "trainable_params": 2, "steps": 1,
              "initial_loss": 1.0, "final_loss": 0.5}
    monkeypatch.setitem(lowmem.train.TRAINERS, "sft", lambda recipe: dict(result))
    out = io.StringIO()
    recipe = load_recipe(_file(tmp_path, TRL_CONFIG + f"output_dir: {tmp_path / 'o'}\nsave_model: false\n"))
    metrics = lowmem.train.run(recipe, console=Console(file=out, soft_wrap=True))
    start = next(x for x in out.getvalue().splitlines() if x.startswith("lowmem train"))
    assert "optim=adafactor (lowmem's default; TRL's and the HF Trainer's is adamw_torch)" in start, start
    assert metrics["optim_source"] == "default"
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["optim_source"] == "default"


def test_warmup_ratio_alone_keeps_its_message(tmp_path):
    with pytest.raises(ConfigError, match=r"warmup_ratio=0\.1: transformers 5 has no warmup_ratio; write warmup_steps: "
                       r"0\.1 \(a warmup_steps below 1 is a fraction of the steps\)"):
        load_recipe(_file(tmp_path, TRL_CONFIG + "warmup_ratio: 0.1\n"))


def test_warmup_ratio_beside_a_trainer_field_keeps_its_message(tmp_path):
    """gradient_accumulation_steps (a TrainingArguments field) is no refused key: the error is warmup_ratio's alone."""
    with pytest.raises(ConfigError, match=r"^\S+: warmup_ratio=0\.1: transformers 5 has no warmup_ratio"):
        load_recipe(_file(tmp_path, TRL_CONFIG + "warmup_ratio: 0.1\ngradient_accumulation_steps: 2\n"))


def test_dataset_name_is_relative_to_the_recipe(tmp_path, monkeypatch):
    """A relative dataset_name is read from the recipe's folder, as dataset is (not from the current directory)."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "d.jsonl").write_text(json.dumps({"text": "1+1=2"}) + "\n")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(_file(tmp_path / "cfg", TRL_CONFIG + "dataset_name: d.jsonl\n"))
    assert recipe.dataset == str(tmp_path / "cfg" / "d.jsonl")
    with pytest.raises(ConfigError, match="dataset_name -> dataset"):  # from the cwd it names nothing: a Hub id
        load_recipe(_file(tmp_path, TRL_CONFIG + "dataset_name: other.jsonl\n"))


def test_dataset_name_and_dataset_together_are_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "1+1=2"}) + "\n")
    with pytest.raises(ConfigError, match="'dataset_name' and 'dataset' set the same value; give one"):
        load_recipe(_file(tmp_path, TRL_CONFIG + "dataset_name: d.jsonl\ndataset: d.jsonl\n"))


def test_missing_lr_names_the_optimizer_in_effect(own_model_dir):
    """The advice names AdamW's usual lr; the message says which optimizer this run has (lowmem's default here)."""
    with pytest.raises(ConfigError, match=r"this run's optimizer is optim=adafactor, lowmem default\)"):
        load_recipe(None, model=own_model_dir)
    with pytest.raises(ConfigError, match=r"this run's optimizer is optim=lion\)"):
        load_recipe(None, model=own_model_dir, optim="lion")


def test_budget_help_states_every_option(capsys):
    """`lowmem budget --help`: --batch-size was the only option without a help text (its default unstated)."""
    from lowmem.cli import main

    with pytest.raises(SystemExit):
        main(["budget", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE sequences per micro-batch (default 1)" in out


def test_missing_lr_with_the_default_named_in_the_file(tmp_path, own_model_dir):
    """`optim: adafactor` written in the recipe is the user's choice, not lowmem's default (load_recipe's source is
    known to the checks of TrainRecipe.__post_init__)."""
    with pytest.raises(ConfigError, match=r"this run's optimizer is optim=adafactor\)"):
        load_recipe(_file(tmp_path, f"model: {own_model_dir}\noptim: adafactor\n"))
