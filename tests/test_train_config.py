"""Strict configuration: every wrong input is an error naming the field, exit code 2 from the CLI,
one line, no traceback, and nothing written. Numbers PyYAML reads as strings are converted."""

import datetime
import json
import os
import stat

import pytest
import torch

from lowmem.cli import main
from lowmem.config import ConfigError, check_value
from lowmem.train import HF_OPTIM_NAMES, TrainRecipe, load_recipe, resolve_optim_name


def _cli_error(tmp_path, capsys, recipe_text, *flags):
    """Run `lowmem train` on a recipe; assert exit 2, one error line, nothing in output_dir."""
    out = tmp_path / "out"
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text)
    rc = main(["train", str(path), "--output-dir", str(out), *flags])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowmem: error: "), err
    assert "Traceback" not in err
    assert not out.exists(), sorted(p.name for p in out.iterdir())  # nothing written half-way
    return lines[0]


@pytest.mark.parametrize(
    "text, field, expected",
    [
        ("lr: abc\n", "lr", "a number >= 0"),
        ("lr: -1\n", "lr", ">= 0"),
        ("lr: .nan\n", "lr", ">= 0"),
        ("layerwise: 'no'\n", "layerwise", "boolean"),
        ("layerwise: 1\n", "layerwise", "boolean"),
        ("save_steps: -5\n", "save_steps", "> 0, or null"),
        ("steps: 2.5\n", "steps", "integer > 0"),
        ("batch_size: '8'\nsteps: 0\n", "steps", "integer > 0"),
        ("eval_steps: 0\n", "eval_steps", "> 0"),
        ("weight_decay: -0.1\n", "weight_decay", ">= 0"),
        ("seed: true\n", "seed", "integer"),
        ("model: 7\n", "model", "a string"),
        ("optim_args: [1, 2]\n", "optim_args", "mapping"),
        ("training_args: {weight_decay: -0.1}\n", "training_args.weight_decay", ">= 0"),
        ("training_args: {adam_beta2: 1.0}\n", "training_args.adam_beta2", "in [0, 1)"),
        ("training_args: {adam_beta1: -0.5}\n", "training_args.adam_beta1", "in [0, 1)"),
        ("training_args: {adam_epsilon: -1e-8}\n", "training_args.adam_epsilon", ">= 0"),
        ("training_args: {learning_rate: abc}\n", "training_args.learning_rate", "a number"),
        ("training_args: {gradient_accumulation_steps: 0}\n", "gradient_accumulation_steps", "> 0"),
        ("training_args: {bf16: 'yes'}\n", "training_args.bf16", "boolean"),
        ("training_args: {save_steps: -1}\n", "training_args.save_steps", "> 0"),
        ("adam_beta2: 1.5\n", "adam_beta2", "in [0, 1)"),  # a TrainingArguments field at the top level
        ("max_grad_norm: -1\n", "max_grad_norm", ">= 0"),
    ],
)
def test_bad_value_names_the_field(tmp_path, capsys, text, field, expected):
    line = _cli_error(tmp_path, capsys, text)
    assert f"{field}=" in line and expected in line, line


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lr: [1, 2\n", "invalid YAML"),
        ("!!python/object/apply:os.system ['touch {marker}']\n", "invalid YAML"),
        ("optim: !!python/name:os.system\n", "invalid YAML"),
        ("- a\n- b\n", "a recipe is a YAML mapping"),
        ("learnig_rate: 0.1\n", "did you mean ['learning_rate']"),
        ("training_args: {learnig_rate: 0.1}\n", "did you mean ['learning_rate']"),
        ("optim: sgd_nesterov\n", "galore_adamw_8bit"),
        ("report_to: tensorboard\n", "pip install tensorboard"),
        ("report_to: nonsense\n", "unknown integration"),
        ("lr: 0.1\nlearning_rate: 0.2\n", "give one"),
        ("optim_target_modules: [q_proj]\noptim: adamw\n", "treats every parameter alike"),
        ("model: /nonexistent/model-dir\n", "no such directory"),
        ("resume_from_checkpoint: /nonexistent/checkpoint-3\n", "no such directory"),
        ("resume_from_checkpoint: true\n", "no complete checkpoint"),
        ("merge_adapters: true\n", "needs lora or quantization"),
        ("trainer: sft\ndataset: /dev/null\neval_steps: 5\n", "eval_steps=5 needs a held-out set"),
        ("training_args: {eval_strategy: sometimes}\n", "eval_strategy"),
        ("optim: adamw\noptim_args: {betas: [0.9, 1.5]}\n", "optim_args.betas"),
        ("optim: adamw\noptim_args: {lr: abc}\n", "optim_args.lr"),
        ("optim: adamw\noptim_args: {rank: 4}\n", "valid"),
        ("trainer: grpo\nnum_generations: 3\nbatch_size: 4\n", "num_generations"),
        ("optim: adafactor\nadam_epsilon: 1e-6\n", "adam_epsilon=1e-06 cannot apply to optimizer 'adafactor'"),
    ],
)
def test_bad_recipe_is_one_line_exit_2(tmp_path, capsys, text, expected):
    marker = tmp_path / "pwned"
    line = _cli_error(tmp_path, capsys, text.replace("{marker}", str(marker)))
    assert expected in line, line
    assert not marker.exists()  # a !!python tag never runs anything


def test_missing_and_unreadable_recipe_files(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    pkl = tmp_path / "recipe.pkl"
    pkl.write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x08datetime\xff\xfe")
    assert main(["train", str(pkl)]) == 2
    assert "cannot read the recipe as YAML text" in capsys.readouterr().err


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text("layerwise: 'no'\n")
    monkeypatch.setenv("LOWMEM_DEBUG", "1")
    with pytest.raises(ConfigError, match="layerwise"):
        main(["train", str(path)])


def test_numbers_written_as_strings_are_converted():
    # PyYAML (YAML 1.1) reads 3e-4 as the string '3e-4'; it must train at 3e-4, not at a default
    r = load_recipe(None, lr="3e-4", steps="1e2", training_args={"adam_epsilon": "1e-6"})
    assert r.lr == 3e-4 and isinstance(r.lr, float) and r.steps == 100 and isinstance(r.steps, int)
    assert r.training_args == {"adam_epsilon": 1e-6}
    # a recipe field given in training_args under its TrainingArguments name is the recipe's (lowmem train's own)
    r = load_recipe(None, training_args={"learning_rate": "2e-4", "max_steps": "1e2"})
    assert (r.lr, r.steps, r.training_args) == (2e-4, 100, {})
    assert load_recipe(None, optim="galore_adamw", optim_args={"lr": "3e-4", "rank": "8"}).optim_args == {"lr": 3e-4, "rank": 8}
    assert check_value("x", True, bool) is True
    with pytest.raises(ConfigError, match="x='true'"):
        check_value("x", "true", bool)


def test_trl_fields_at_top_level_and_hf_optim_names(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("trainer: dpo\nbeta: 0.2\nlearning_rate: 3e-4\nmax_steps: 7\nper_device_train_batch_size: 4\n"
                    "optim: galore_adamw_8bit_layerwise\noptim_target_modules: [q_proj, v_proj]\n"
                    "optim_args: rank=4,update_proj_gap=10,scale=0.5,proj_type=std\ngradient_accumulation_steps: 2\n")
    r = load_recipe(path)
    assert (r.lr, r.steps, r.batch_size) == (3e-4, 7, 4)
    # optim_target_modules stays a TrainingArguments field: the Trainer integration matches it by the Trainer's rules
    assert r.training_args == {"beta": 0.2, "gradient_accumulation_steps": 2, "optim_target_modules": ["q_proj", "v_proj"]}
    assert r.optim == "galore_adamw8bit" and r.layerwise is True
    assert r.optim_args == {"rank": 4, "update_proj_gap": 10, "scale": 0.5, "proj_type": "std"}
    # SFTConfig's fields apply to sft on a dataset, also when the dataset comes from --dataset
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "12+7=19"}\n{"text": "3+4=7"}\n')
    path.write_text("max_length: 64\npacking: false\n")
    assert load_recipe(path, dataset=str(data)).training_args == {"max_length": 64, "packing": False}
    with pytest.raises(ConfigError, match="max_length"):
        load_recipe(path)  # the synthetic task runs LowMemTrainer: no max_length there
    # `beta` is a DPOConfig field, not an SFT one
    path.write_text("beta: 0.2\n")
    with pytest.raises(ConfigError, match="unknown recipe key"):
        load_recipe(path)
    # the HF name inside training_args maps too, and training_args.resume_from_checkpoint is honoured
    r = load_recipe(None, training_args={"optim": "adamw_torch", "resume_from_checkpoint": str(tmp_path)})
    assert r.optim == "adamw" and r.resume_from_checkpoint == str(tmp_path) and r.training_args == {}
    for hf, ours in HF_OPTIM_NAMES.items():
        assert resolve_optim_name(hf) == (ours, False)
    assert resolve_optim_name("galore_adafactor_layerwise") == ("galore_adafactor", True)


def test_training_args_optimizer_fields_are_errors_not_defaults(tmp_path):
    from transformers import TrainingArguments

    from lowmem.kit import build_tiny_model
    from lowmem.trainers import LowMemDPOConfig, LowMemTrainingArguments, optimizer_cls_and_kwargs, trainer_hparams

    common = dict(report_to="none", use_cpu=True)
    for bad, match in [({"learning_rate": -1.0}, r"learning_rate=-1.0: expected a number >= 0"),
                       ({"weight_decay": -0.1}, r"weight_decay=-0.1: expected a number >= 0"),
                       ({"adam_beta2": 1.0}, r"adam_beta2=1.0: expected a number in \[0, 1\)"),
                       ({"adam_epsilon": -1e-8}, r"adam_epsilon=-1e-08: expected a number >= 0")]:
        with pytest.raises(ValueError, match=match):
            LowMemTrainingArguments(tmp_path, lowmem_optim="adamw", **common, **bad)
        with pytest.raises(ValueError, match=match):
            LowMemDPOConfig(tmp_path, lowmem_optim="adamw", **common, **bad)
        model, _ = build_tiny_model(0)
        with pytest.raises(ValueError, match=match):
            optimizer_cls_and_kwargs(model, "adamw", args=TrainingArguments(tmp_path, **common, **bad))
    # a value the optimizer rejects: an error when the user set it, quiet when it is the default
    args = TrainingArguments(tmp_path, adam_epsilon=1e-6, **common)
    with pytest.raises(ValueError, match="adam_epsilon=1e-06 cannot apply to optimizer 'adafactor'"):
        trainer_hparams("adafactor", args)
    assert "eps" not in trainer_hparams("adafactor", TrainingArguments(tmp_path, **common))


def test_refused_pickle_in_checkpoint_is_one_line(tmp_path, capsys):
    """A checkpoint whose optimizer.pt holds arbitrary objects: torch.load(weights_only=True)
    refuses it, and lowmem says so in one line."""
    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--save-steps", "2", "--output-dir", str(out), "--batch-size", "4"]) == 0
    ckpt = out / "checkpoint-2"
    torch.save({"when": datetime.datetime(2020, 1, 1)}, ckpt / "optimizer.pt")
    capsys.readouterr()
    rc = main(["train", "--steps", "3", "--output-dir", str(out), "--batch-size", "4", f"--resume={ckpt}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("lowmem: error:")]
    assert len(lines) == 1 and "Weights only load failed" in lines[0], err


def test_atomic_writes_have_normal_permissions_and_leave_no_temp(tmp_path, monkeypatch):
    from lowmem.io import write_bytes_atomic, write_files_atomic, write_text_atomic

    old = os.umask(0o022)
    try:
        p = write_text_atomic(tmp_path / "metrics.json", json.dumps({"a": 1}))
        assert stat.S_IMODE(p.stat().st_mode) == 0o644  # mkstemp alone would give 0600
        os.chmod(p, 0o640)
        write_text_atomic(p, "{}")
        assert stat.S_IMODE(p.stat().st_mode) == 0o640  # an existing file keeps its mode
        png = write_bytes_atomic(tmp_path / "plot.png", b"\x89PNG...")
        assert stat.S_IMODE(png.stat().st_mode) == 0o644 and png.read_bytes() == b"\x89PNG..."
    finally:
        os.umask(old)
    # a pair: when writing the second fails, neither file changes and no temp file stays
    write_files_atomic({tmp_path / "bench.json": "old-json", tmp_path / "bench.md": "old-md"})
    calls = []
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_files_atomic({tmp_path / "bench.json": "new-json", tmp_path / "bench.md": "new-md"})
    monkeypatch.undo()
    assert (tmp_path / "bench.json").read_text() == "old-json" and (tmp_path / "bench.md").read_text() == "old-md"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md", "metrics.json", "plot.png"]


def test_recipe_dataclass_direct_construction_is_checked():
    with pytest.raises(ConfigError, match="layerwise='no'"):
        TrainRecipe(layerwise="no")
    assert TrainRecipe(lr="1e-3").lr == 1e-3


def test_relative_paths_in_a_recipe_are_from_its_folder(tmp_path, monkeypatch):
    """One rule: the input paths a recipe file names (model, dataset, eval_dataset, chat_template, reward
    files and reward-model folders) are relative to the recipe's folder; overrides (flags, keywords) and
    output_dir are relative to the current directory."""
    from lowmem.train import load_recipe

    folder = tmp_path / "recipes"
    (folder / "data").mkdir(parents=True)
    recipe = folder / "r.yaml"
    recipe.write_text(
        "trainer: grpo\ndataset: [data/a.jsonl, /abs/b.jsonl]\neval_dataset: data/e.jsonl\n"
        "chat_template: data/t.jinja\noutput_dir: out\n"
        "reward_funcs: [data/r.py:f, exact_match, trl.rewards:think_format_reward, {name: data/r.py:g, k: 1}, rm_dir/]\n"
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = load_recipe(recipe)
    d = folder / "data"
    assert r.dataset == [str(d / "a.jsonl"), "/abs/b.jsonl"] and r.eval_dataset == str(d / "e.jsonl")
    assert r.chat_template == str(d / "t.jinja") and r.output_dir == "out"
    assert r.reward_funcs == [f"{d / 'r.py'}:f", "exact_match", "trl.rewards:think_format_reward",
                              {"name": f"{d / 'r.py'}:g", "k": 1}, str(folder / "rm_dir")]
    from lowmem.train import resolve_recipe_paths

    # a bare name that is no folder there stays a name: a misspelt built-in is reported as such
    assert resolve_recipe_paths({"reward_funcs": ["exact", "data"]}, folder)["reward_funcs"] == ["exact", str(d)]
    assert load_recipe(recipe, dataset="mine.jsonl").dataset == "mine.jsonl"  # an override: from the cwd
    inline = folder / "inline.yaml"
    inline.write_text("chat_template: \"{% for m in messages %}{{ m.content }}{% endfor %}\"\n")
    assert load_recipe(inline).chat_template.startswith("{% for")  # Jinja text is not a path


def test_load_recipe_overrides_map_like_yaml_keys(tmp_path):
    """Keyword overrides of load_recipe take aliases and top-level config fields exactly as YAML keys do."""
    from lowmem.config import ConfigError
    from lowmem.train import load_recipe

    r = load_recipe(None, learning_rate=1e-3, max_steps="7", per_device_train_batch_size=4, lowmem_optim="adamw")
    assert (r.lr, r.steps, r.batch_size, r.optim) == (1e-3, 7, 4, "adamw")
    assert load_recipe(None, learning_rate="3e-4").lr == 3e-4  # converted as in YAML
    with pytest.raises(ConfigError, match="'learning_rate' and 'lr' set the same value; give one"):
        load_recipe(None, lr=1e-2, learning_rate=1e-3)
    with pytest.raises(ConfigError, match=r"unknown recipe key\(s\) \['learnig_rate'\].*did you mean \['learning_rate'\]"):
        load_recipe(None, learnig_rate=1e-3)
    r = load_recipe(None, adam_beta2=0.95, optim="adamw")  # a TrainingArguments field: joins training_args
    assert r.training_args == {"adam_beta2": 0.95}
    with pytest.raises(ConfigError, match="adam_beta2"):
        load_recipe(None, adam_beta2=1.0, optim="adamw")
    with pytest.raises(ConfigError, match=r"\['adam_beta2'\] given both at the top level and in training_args"):
        load_recipe(None, adam_beta2=0.9, training_args={"adam_beta2": 0.95})
    # an override wins over the file, through either name; config fields merge into the file's training_args
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trainer: sft\nlearning_rate: 0.05\ndataset: /data/x.jsonl\nmax_length: 32\npacking: false\n")
    r = load_recipe(recipe, learning_rate=1e-3, max_length=64)
    assert r.lr == 1e-3 and r.training_args == {"max_length": 64, "packing": False}
    assert load_recipe(recipe, lr=2e-3).lr == 2e-3
    # the trainer in effect chooses the config class: SFTConfig's max_length needs a dataset (TRL's SFTTrainer)
    assert load_recipe(None, dataset="/data/x.jsonl", max_length=16).training_args == {"max_length": 16}
    with pytest.raises(ConfigError, match="max_length"):
        load_recipe(None, max_length=16)


def test_hf_argument_parsers_are_not_strict_enough(tmp_path):
    """Why lowmem.config keeps its own checker (docs/training.md, "Strict configuration"): transformers'
    HfArgumentParser.parse_dict passes YAML values through unconverted and unchecked, and trl's TrlParser
    (YAML as argparse defaults) reads the string "no" as False and accepts out-of-range values; both accept
    what lowmem rejects, and lowmem converts what parse_dict leaves as strings."""
    from transformers import HfArgumentParser, TrainingArguments
    from trl import SFTConfig, TrlParser

    from lowmem.config import ConfigError, check_fields

    (a,) = HfArgumentParser(TrainingArguments).parse_dict(
        {"output_dir": "o", "remove_unused_columns": "no", "learning_rate": "3e-4", "max_steps": "1e3", "adam_beta2": 1.5})
    assert a.remove_unused_columns == "no" and bool(a.remove_unused_columns)  # a truthy string, not False
    assert (a.learning_rate, a.max_steps, a.adam_beta2) == ("3e-4", "1e3", 1.5)  # strings stay strings; no ranges

    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: o\nuse_cpu: true\nbf16: false\nremove_unused_columns: 'no'\nlearning_rate: -1\n"
                   "adam_beta2: 1.5\nlogging_first_step: 1\n")
    (t,) = TrlParser((SFTConfig,)).parse_args_and_config(args=["--config", str(cfg)])
    assert t.remove_unused_columns is False  # "no" read as false
    assert (t.learning_rate, t.adam_beta2, t.logging_first_step) == (-1, 1.5, 1)  # no ranges; 1 kept for a bool

    fields = {"remove_unused_columns": "no", "learning_rate": -1, "adam_beta2": 1.5, "logging_first_step": 1}
    for key, value in fields.items():
        with pytest.raises(ConfigError, match=key):
            check_fields(TrainingArguments, {key: value})
    assert check_fields(TrainingArguments, {"learning_rate": "3e-4", "max_steps": "1e3"}) == {"learning_rate": 3e-4,
                                                                                            "max_steps": 1000}


def test_hf_optim_names_take_the_hf_trainers_own_defaults():
    """A config written for the HF Trainer gets the run it was tuned for: transformers' Trainer builds
    ``optim="apollo_adamw"`` at rank 128 and ``adamw_torch_4bit`` with block_size 256 where the string leaves them
    out (lowmem's recipes: 256 and 128). ``training_args.optim`` is HF's meaning; a recipe's ``optim:`` applies them
    for an HF-only name; what the user writes wins; lowmem's own names keep lowmem's defaults."""
    assert TrainRecipe(lr=1e-3, training_args={"optim": "apollo_adamw"}).optim_args == {"rank": 128}
    assert TrainRecipe(lr=1e-3, training_args={"optim": "apollo_adamw_layerwise"}).optim_args == {"rank": 128}
    assert TrainRecipe(lr=1e-3, training_args={"optim": "apollo_adamw", "optim_args": "rank=32"}).optim_args == {"rank": 32}
    assert TrainRecipe(lr=1e-3, optim="adamw_torch_4bit").optim_args == {"block_size": 256}
    assert TrainRecipe(lr=1e-3, optim="adamw_torch_4bit", optim_args={"block_size": 64}).optim_args == {"block_size": 64}
    assert TrainRecipe(lr=1e-3, optim="apollo_adamw").optim_args == {}
    assert TrainRecipe(lr=1e-3, optim="adamw4bit").optim_args == {}
