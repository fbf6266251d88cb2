"""Defects a newcomer met in files NEWCOMER did not own: a user who knows `trl sft`, LLaMA-Factory and the HF
Trainer, with a model and a config of their own. Each test was a strict xfail; the defects are fixed (each fixing
commit names its finding id, ``FOUND_NEWCOMER n``) and the tests now guard them."""

import json
import re

import pytest

import lowmem.train  # noqa: F401 - imported at collection (torch, transformers, TRL)
import lowmem.trainers.hf  # noqa: F401
from lowmem.config import ConfigError
from lowmem.train import load_recipe

TRL_CONFIG = "model_name_or_path: null\nlearning_rate: 2.0e-4\nlr_scheduler_type: cosine\nmax_steps: 2\n"


def _file(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_recipe_records_that_its_optimizer_is_the_default(tmp_path):
    assert getattr(load_recipe(_file(tmp_path, TRL_CONFIG)), "optim_source", None) == "default"
    given = getattr(load_recipe(_file(tmp_path, TRL_CONFIG + "optim: adamw_torch\n", "g.yaml")), "optim_source", None)
    assert given not in (None, "default")


def test_a_pasted_trl_config_gets_every_refused_key_in_one_error(tmp_path):
    """A Hub id as dataset_name (a local folder is the dataset now: FOUND_NEWCOMER 3) beside warmup_ratio: one error
    names both, each with its fix, and the valid keys after a separator."""
    with pytest.raises(ConfigError) as err:
        load_recipe(_file(tmp_path, TRL_CONFIG + "warmup_ratio: 0.1\ndataset_name: trl-lib/Capybara\nlora_r: 8\n"))
    message = str(err.value)
    for part in ("warmup_ratio -> warmup_steps: 0.1", "dataset_name -> dataset", "lora_r -> lora: {r: ...}"):
        assert part in message, message
    assert "; valid keys: [" in message, message


def test_dataset_name_of_a_local_folder_is_the_dataset(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"text": "1+1=2"}) + "\n")
    recipe = load_recipe(_file(tmp_path, TRL_CONFIG + f"dataset_name: {folder}\n"))
    assert recipe.dataset == str(folder)


def test_rank_too_large_for_the_model_is_refused_before_it_loads(tmp_path, own_model_dir, monkeypatch, capsys):
    import lowmem.kit
    from lowmem.cli import main

    def loaded(*args, **kwargs):
        raise RuntimeError("the model was loaded before the rank was checked")

    monkeypatch.setattr(lowmem.kit, "load_model_and_tokenizer", loaded)
    data = _file(tmp_path, "".join(json.dumps({"text": f"{i}+{i}={2 * i}"}) + "\n" for i in range(8)), "d.jsonl")
    assert main(["train", "--model", own_model_dir, "--dataset", str(data), "--lr", "1e-3", "--steps", "1",
                 "--optim", "galore_adamw", "--output_dir", str(tmp_path / "o")]) == 2
    assert "rank 128" in capsys.readouterr().err


@pytest.mark.slow
def test_reward_summary_names_the_steps_it_averaged(tmp_path, capsys):
    from lowmem.kit.shipped import shipped_recipe
    from lowmem.train import run

    run(load_recipe(shipped_recipe("grpo"), steps=2, output_dir=str(tmp_path), save_model=False))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("mean reward"))
    assert "first 5 steps" not in line and "last 10 steps" not in line, line


def test_budget_measure_shows_progress(capsys):
    from lowmem.cli import main

    """The chosen rule (lowmem.cli_budget.measuring_progress): a live bar in a terminal, one line per measured
    configuration elsewhere (capsys is no terminal), then a short one per step inside measure_memory (its progress
    callback, FOUND_NEWFIX 1): the original ask, "2/2" on stderr."""
    assert main(["budget", "tiny", "--measure", "--steps", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"measuring #1/1 \(adamw, batch 1, 2 steps on cpu\)", err)
    assert re.findall(r"measuring #1/1: step (\d)/2 done", err) == ["1", "2"]
