"""What a new user meets when running lowmem on their own files (the AUDIT helper's findings, 2026-11-30).

Each test is a defect found by following README.md / docs/training.md step by step on a user's own
files; each was red before its fix."""

from __future__ import annotations

import sys

import pytest

from lowmem.cli import main


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("source, expected", [
    ("def my_reward(prompts, completions\n    return [1.0]\n", "SyntaxError: '(' was never closed"),
    ("import lowmem_no_such_package_xyz\ndef my_reward(**kw):\n    return []\n",
     "ModuleNotFoundError: No module named 'lowmem_no_such_package_xyz'"),
    ("x = 1 / 0\n", "ZeroDivisionError: division by zero"),
])
def test_reward_file_that_fails_to_import_is_a_one_line_error(source, expected, tmp_path, monkeypatch):
    """A reward file with a syntax error (or one raising at import) was a traceback and exit status 1
    from `lowmem train`; it is a ValueError naming the reward, the file, the cause and its line, and
    the half-imported module does not stay in sys.modules."""
    from lowmem.rewards import resolve_reward

    path = tmp_path / "my_rewards.py"
    path.write_text(source)
    sys.modules.pop("my_rewards", None)  # another test's module of that name
    before = set(sys.modules)
    with pytest.raises(ValueError, match="importing .*my_rewards.py' failed") as err:
        resolve_reward(f"{path}:my_reward")
    assert expected in str(err.value) and "line 1" in str(err.value)
    assert set(sys.modules) == before
    monkeypatch.chdir(tmp_path)  # the same file as `my_rewards:my_reward`, a module of the current directory
    with pytest.raises(ValueError, match="importing module 'my_rewards' failed") as err:
        resolve_reward("my_rewards:my_reward")
    assert expected in str(err.value)
    sys.modules.pop("my_rewards", None)


def test_reward_file_syntax_error_stops_lowmem_train_with_exit_2(tiny_model_path, tmp_path, capsys):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "1+1=", "answer": "2"}\n' * 8)
    (tmp_path / "bad.py").write_text("def r(prompts, completions\n")
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(f"trainer: grpo\nmodel: {tiny_model_path}\ndataset: prompts.jsonl\nreward_funcs: [bad.py:r]\n"
                      f"steps: 1\nlr: 1e-2\nbatch_size: 4\noutput_dir: {tmp_path / 'out'}\ntraining_args: {{num_generations: 4}}\n")
    code, err = _run(["train", str(recipe)], capsys)
    assert code == 2
    assert "lowmem: error: reward function" in err and "SyntaxError" in err and "bad.py, line 1" in err
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("config, trainer, others", [
    ("DPOConfig", "dpo", "LowMemDPOConfig: set trainer: dpo in the recipe (or --trainer dpo)"),
    ("GRPOConfig", "grpo", "LowMemGRPOConfig, GVPOConfig, BNPOConfig: set trainer: grpo / gvpo / bnpo in the recipe "
                           "(or --trainer grpo)"),
])
def test_saved_trl_config_without_trainer_names_the_trainer(config, trainer, others, tiny_model_path, tmp_path, capsys):
    """A DPOConfig / GRPOConfig the user saved (to_dict as JSON) and ran with `lowmem train` failed with
    'unknown recipe key(s)' over every DPO / GRPO field and close matches that do not help; the error
    names the trainer whose config holds the keys, and `--trainer` (new) runs it from the command line."""
    import json

    import trl

    kw = {"num_generations": 4, "max_completion_length": 8} if trainer == "grpo" else {"max_length": 64}
    cfg = getattr(trl, config)(str(tmp_path / "out"), use_cpu=True, max_steps=1, per_device_train_batch_size=4,
                               report_to="none", **kw)
    dump = {k: v for k, v in cfg.to_dict().items() if not (k.endswith("_token") and k != "hub_token")}
    path = tmp_path / "args.json"
    path.write_text(json.dumps(dump))
    code, err = _run(["train", str(path), "--model", tiny_model_path, "--dataset", "x.jsonl"], capsys)
    assert code == 2 and f"for the sft trainer's LowMemSFTConfig (trainer: sft is the default); they are fields of " \
        f"{others}" in err, err
    assert "did you mean" not in err
    from lowmem.train import load_recipe

    recipe = load_recipe(path, trainer=trainer)  # what --trainer passes
    assert recipe.trainer == trainer and recipe.training_args["beta"] == cfg.beta


def test_trainer_flag_trains_dpo_pairs_from_the_command_line(tiny_model_path, tmp_path, capsys):
    """`lowmem train --model DIR --dataset pairs.jsonl` said the columns are DPO's format, but the command
    had no way to choose the trainer (a recipe file was required)."""
    import json

    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)}) + "\n"
                            for i in range(8)))
    code, err = _run(["train", "--model", tiny_model_path, "--dataset", str(rows), "--steps", "1", "--lr", "1e-3",
                      "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "--trainer dpo" in err
    code, err = _run(["train", "--model", tiny_model_path, "--dataset", str(rows), "--trainer", "dpo", "--steps", "1", "--lr", "1e-3",
                      "--batch-size", "4", "--output-dir", str(tmp_path / "o"), "--optim", "adamw"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["trainer"] == "dpo"


def test_budget_takes_lowmem_train_s_optimizer_flag_and_names(capsys):
    """`lowmem budget MODEL --optim galore_adamw` (the flag of `lowmem train`) was 'ambiguous option: --optim could
    match --optimizer, --optim-args', and an HF optim name `lowmem train` maps (adamw_torch_4bit,
    ..._layerwise) was 'Unknown optimizer'; both size what `lowmem train` would run."""
    import json

    def estimate(*argv):
        assert main(["budget", "tiny", "--device", "cpu", "--json", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    assert estimate("--optim", "adamw_torch_4bit") == estimate("--optimizer", "adamw4bit")
    assert estimate("--optim", "galore_adamw_layerwise", "--optim-args", "rank=4") == \
        estimate("--optimizer", "galore_adamw", "--layerwise", "--optim-args", "rank=4")


@pytest.mark.parametrize("trainer", ["sft", "dpo"])
def test_drop_last_eval_set_smaller_than_a_batch_fails_before_training(trainer, tiny_model_path, tmp_path, capsys):
    """An HF config's `dataloader_drop_last: true` with an eval set smaller than one eval batch (lowmem's
    per_device_eval_batch_size 64, or the config's): every eval batch was dropped, the run trained and then
    crashed with `KeyError: 'eval_loss'` (exit 1) before saving the model."""
    import json

    rows = tmp_path / "rows.jsonl"
    row = {"text": "1+1=2"} if trainer == "sft" else {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    rows.write_text(json.dumps(row) + "\n" + "".join(json.dumps(row) + "\n" for _ in range(9)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"trainer: {trainer}\nmodel: {tiny_model_path}\ndataset: rows.jsonl\nmax_steps: 1\nlearning_rate: 1e-3\n"
                      f"per_device_train_batch_size: 2\ndataloader_drop_last: true\nmax_length: 32\n"
                      + ("eval_split: 0.3\n" if trainer == "sft" else ""))
    code, err = _run(["train", str(recipe), "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2, err
    n = 3 if trainer == "sft" else 10
    assert (f"dataloader_drop_last=true drops every eval batch: the eval set has {n} rows and one eval batch is 64 "
            f"(per_device_eval_batch_size=64): set per_device_eval_batch_size <= {n}, or dataloader_drop_last: false") in err
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("fields, message", [
    ({"r": 0}, "lora.r=0: expected an integer > 0"),
    ({"r": 2.5}, "lora.r=2.5: expected an integer > 0"),
    ({"r": 8, "lora_alpha": -16}, "lora.lora_alpha=-16: expected an integer or a number > 0"),
    ({"r": 8, "lora_dropout": 1.5}, r"lora.lora_dropout=1.5: expected a number in \[0, 1\)"),
])
def test_lora_values_out_of_range_fail_with_the_recipe(fields, message):
    """`lora: {r: 0}` passed the recipe check and failed after the model loaded with peft's "`r` should be a
    positive integer value but the value passed is 0" (no field path); a negative lora_alpha or a dropout of
    1.5 trained (peft checks neither)."""
    from lowmem.config import ConfigError
    from lowmem.train import load_recipe

    with pytest.raises(ConfigError, match=message):
        load_recipe(None, lora=fields)
    assert load_recipe(None, lora={"r": "8", "lora_alpha": 16, "lora_dropout": "0.05"}).lora  # strings as numbers


@pytest.mark.parametrize("columns, trainer, hint", [
    (["prompt", "chosen"], "dpo", r"Missing column\(s\) \['rejected'\] of the 'prompt' \+ 'chosen' \+ 'rejected' .* "
                                  r"format \(found \['chosen', 'prompt'\]\)$"),
    (["chosen"], "dpo", r"Missing column\(s\) \['rejected'\] of the 'chosen' \+ 'rejected' with the prompt inside both"),
    (["completion", "id"], "sft", r"Missing column\(s\) \['prompt'\] of the 'prompt' \+ 'completion'"),
])
def test_a_missing_column_is_named(columns, trainer, hint):
    """DPO pairs without 'rejected' were told 'These columns are the format of trainer: bnpo / grpo / gvpo' (the
    lone prompt fits GRPO) and never which column was missing."""
    import datasets

    from lowmem.data import detect_format

    with pytest.raises(ValueError, match=r"fit no .* dataset format; accepted: .*" + hint) as err:
        detect_format(datasets.Dataset.from_dict({c: ["a"] for c in columns}), trainer, source="d.jsonl")
    assert "format of trainer" not in str(err.value)


def test_train_takes_the_trainingarguments_spellings_of_its_flags():
    """`lowmem train --max_steps 2` (`trl sft` / HfArgumentParser spelling) was 'unrecognized arguments'."""
    from lowmem.cli import build_parser

    parser = build_parser()
    ours = parser.parse_args(["train", "--steps", "2", "--lr", "1e-3", "--batch-size", "4", "--model", "m",
                              "--output-dir", "o", "--optim-args", "rank=4", "--save-steps", "1", "--eval-steps", "1"])
    for argv in (["--max_steps", "2", "--learning_rate", "1e-3", "--per_device_train_batch_size", "4",
                  "--model_name_or_path", "m", "--output_dir", "o", "--optim_args", "rank=4", "--save_steps", "1",
                  "--eval_steps", "1"],
                 ["--max-steps", "2", "--learning-rate", "1e-3", "--per-device-train-batch-size", "4",
                  "--model-name-or-path", "m", "--output-dir", "o", "--optim-args", "rank=4", "--save-steps", "1",
                  "--eval-steps", "1"]):
        assert vars(parser.parse_args(["train", *argv])) == vars(ours)


def test_text_file_with_blank_lines_loads(tmp_path):
    """A .txt dataset is one row per non-blank line (docs/training.md), but a blank line between rows was refused
    as '1 of 2 rows have an empty or missing 'text' (rows [1])': the empty-row check read the whole Arrow table
    under the filter that drops blank lines. A row of the filtered dataset that is empty is still refused."""
    import datasets

    from lowmem.data import check_nonempty, detect_format, load_sources

    path = tmp_path / "notes.txt"
    path.write_text("1+1=2\n\n   \n2+2=4\n")
    ds, fmt = load_sources(str(path), "sft")
    assert ds["text"] == ["1+1=2", "2+2=4"] and fmt.name == "text"
    rows = datasets.Dataset.from_dict({"text": ["a", "", "b", " "]}).select([2, 3, 0])
    with pytest.raises(ValueError, match=r"1 of 3 rows have an empty or missing 'text' \(rows \[1\], 0-based\)"):
        check_nonempty(rows, detect_format(rows, "sft"), "sft", source="d")


@pytest.mark.parametrize("kind", ["save", "eval"])
def test_steps_flag_against_the_config_s_strategy_no_is_an_error(kind, tmp_path):
    """`lowmem train cfg.yaml --save-steps 10` on a config with `save_strategy: "no"` ran without writing a
    checkpoint (the config's strategy won over the flag), `--eval-steps` under `eval_strategy: "no"` without
    evaluating. A saved config's own inert `save_steps: 500` beside `save_strategy: "no"` still runs as written."""
    from lowmem.config import ConfigError
    from lowmem.train import load_recipe

    path = tmp_path / "cfg.yaml"
    path.write_text(f'{kind}_strategy: "no"\n{kind}_steps: 500\nmax_steps: 2\n')
    recipe = load_recipe(path)
    assert getattr(recipe, f"{kind}_steps") is None and recipe.training_args[f"{kind}_strategy"] == "no"
    with pytest.raises(ConfigError, match=rf"{kind}_steps=10 and {kind}_strategy='no' \(the config's\): the Trainer "
                                          rf"would (save|evaluate) nothing"):
        load_recipe(path, **{f"{kind}_steps": 10})
    path.write_text(f'{kind}_strategy: epoch\n{kind}_steps: 500\nnum_train_epochs: 1\n')
    assert getattr(load_recipe(path), f"{kind}_steps") is None
    with pytest.raises(ConfigError, match=rf"{kind}_strategy='epoch' .* by epoch, never every 10 steps"):
        load_recipe(path, **{f"{kind}_steps": 10})
    path.write_text(f'{kind}_strategy: steps\n{kind}_steps: 7\nmax_steps: 2\n')
    assert getattr(load_recipe(path), f"{kind}_steps") == 7


def test_budget_on_a_folder_without_config_json_says_so(tmp_path, capsys):
    """`lowmem budget ./my-model` on a folder without config.json said "Unrecognized model in ./my-model. Should
    have a `model_type` key in its config.json" (transformers' words about a file that does not exist)."""
    code, err = _run(["budget", str(tmp_path)], capsys)
    assert code == 2 and f"model={str(tmp_path)!r}: the directory has no config.json" in err, err
