"""What an outside user's recipe gets: recipe values are honoured over the TRL configs' own defaults,
and a user's mistake is one clear error before anything expensive runs."""

import warnings

import pytest

from lowmem.train import build_training_args, load_recipe


@pytest.mark.parametrize("trainer", ["sft", "dpo", "grpo"])
def test_gradient_checkpointing_false_is_not_overridden_by_trl_defaults(trainer, tmp_path):
    """TRL's configs default ``gradient_checkpointing`` to True: a recipe's ``false`` (the default) must
    still turn it off, ``true`` turn it on, and ``training_args`` (either name) win; no FutureWarning."""
    kw = dict(trainer=trainer, output_dir=str(tmp_path), batch_size=4)
    if trainer == "sft":
        data = tmp_path / "d.jsonl"
        data.write_text('{"text": "1+1=2"}\n')
        kw["dataset"] = str(data)  # SFTConfig (TRL's SFTTrainer)
    if trainer == "grpo":
        kw["training_args"] = {"num_generations": 4}
    for recipe_value, extra, expected in [(False, {}, False), (True, {}, True),
                                          (False, {"activation_checkpointing": True}, True)]:
        recipe = load_recipe(None, gradient_checkpointing=recipe_value,
                             **{**kw, "training_args": {**kw.get("training_args", {}), **extra}})
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            args = build_training_args(recipe)
        assert args.activation_checkpointing is expected and args.gradient_checkpointing is expected, (recipe_value, extra)
    recipe = load_recipe(None, **{**kw, "training_args": {**kw.get("training_args", {}), "gradient_checkpointing": True}})
    assert build_training_args(recipe).activation_checkpointing is True


@pytest.mark.parametrize("optim, optim_args, message", [
    ("galore_adamw", "rank=abc", r"lowmem_optim_args.rank='abc': Invalid rank='abc': expected None or an int > 0"),
    ("galore_adamw", {"rank": 0}, r"lowmem_optim_args.rank=0: Invalid rank=0"),
    ("adamw", {"betas": [0.9, 1.5]}, r"lowmem_optim_args.betas=\(0.9, 1.5\): .*0 <= beta < 1"),
    ("adamw", {"rnak": 3}, r"Unknown hyperparameter\(s\) \['rnak'\] for optimizer 'adamw'; valid: \["),
])
def test_trainer_arguments_check_optim_arg_values_when_built(optim, optim_args, message, tmp_path):
    """``LowMemTrainingArguments`` checks each lowmem_optim_args value with the optimizer's spec when it is
    built (before a model or Trainer exists), not at the first training step."""
    from lowmem.trainers import LowMemDPOConfig, LowMemTrainingArguments

    for cls in (LowMemTrainingArguments, LowMemDPOConfig):
        with pytest.raises(ValueError, match=message):
            cls(str(tmp_path), report_to="none", lowmem_optim=optim, lowmem_optim_args=optim_args)


def test_trainer_arguments_convert_numeric_strings_and_refuse_targets_early(tmp_path):
    from lowmem.trainers import LowMemTrainingArguments

    args = LowMemTrainingArguments(str(tmp_path), report_to="none", lowmem_optim="galore_adamw",
                                   lowmem_optim_args={"rank": "8", "proj_type": "std"}, optim_target_modules=["q_proj"])
    assert args.lowmem_optim_args == {"rank": 8, "proj_type": "std"}
    with pytest.raises(ValueError, match=r"optim_target_modules=\['q_proj'\] .* lowmem_optim='adamw' treats every parameter alike"):
        LowMemTrainingArguments(str(tmp_path), report_to="none", lowmem_optim="adamw", optim_target_modules=["q_proj"])


def test_optimizer_typo_suggests_the_close_names():
    from lowmem.config import ConfigError
    from lowmem.train import resolve_optim_name

    with pytest.raises(ConfigError, match=r"optim='adamw8bitt' .*; did you mean \['adamw8bit'.*\]\? lowmem: \['adafactor'"):
        resolve_optim_name("adamw8bitt")
    with pytest.raises(ConfigError, match=r"did you mean \['galore_adamw_8bit'"):
        resolve_optim_name("galore_adamw_8bti_layerwise")
    with pytest.raises(ConfigError) as err:
        resolve_optim_name("zzz")
    assert "did you mean" not in str(err.value) and "Hugging Face: ['adafactor'" in str(err.value)


def test_model_directory_without_config_or_tokenizer_is_named(tmp_path, tiny_model_path):
    import shutil

    from lowmem.config import ConfigError

    assert load_recipe(None, model=tiny_model_path, lr=1e-3).model == tiny_model_path
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    with pytest.raises(ConfigError, match=r"model='.*notes': the directory lacks config.json and a tokenizer file \(one of "
                                          r"\['tokenizer.json'.*save_pretrained"):
        load_recipe(None, model=str(tmp_path / "notes"))
    weights_only = tmp_path / "weights-only"
    shutil.copytree(tiny_model_path, weights_only, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(ConfigError, match=r"lacks a tokenizer file"):
        load_recipe(None, model=str(weights_only))
    with pytest.raises(ConfigError, match="no such directory"):
        load_recipe(None, model=str(tmp_path / "missing"))


def test_hf_optim_args_and_target_modules_are_honoured_not_ignored(tmp_path):
    """A config written for the HF Trainer (``optim_args="rank=8"``, ``optim_target_modules``) keeps them
    under a lowmem optimizer: ``optimizer_cls_and_kwargs(args=...)`` used to drop both silently (rank 128 on
    every linear layer), ``LowMemTrainingArguments`` the ``optim_args``."""
    from transformers import TrainingArguments

    from lowmem.kit import build_tiny_model
    from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments, optimizer_cls_and_kwargs

    model, _ = build_tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    args = TrainingArguments(str(tmp_path), report_to="none", optim_args="rank=8", optim_target_modules=["q_proj"])
    _, kwargs = optimizer_cls_and_kwargs(model, "galore_adamw", args=args)
    projected = [(g["rank"], names[id(p)]) for g in kwargs["params"] if g.get("rank") for p in g["params"]]
    assert projected and all(r == 8 and "q_proj" in n for r, n in projected) and len(projected) == 2
    _, kwargs = optimizer_cls_and_kwargs(model, "galore_adamw", args=args, rank=4)  # keyword arguments win
    assert {g["rank"] for g in kwargs["params"] if g.get("rank")} == {4}

    args = LowMemTrainingArguments(str(tmp_path), report_to="none", lowmem_optim="galore_adamw",
                                   optim_args="rank=8,update_proj_gap=7", lowmem_optim_args="update_proj_gap=5")
    opt = LowMemTrainer(model=model, args=args).create_optimizer()
    assert {(g["rank"], g["update_proj_gap"]) for g in opt.param_groups if g.get("rank")} == {(8, 5)}  # lowmem_optim_args win
    with pytest.raises(ValueError, match=r"LowMemTrainingArguments.optim_args.rank=0: Invalid rank=0"):
        LowMemTrainingArguments(str(tmp_path), report_to="none", lowmem_optim="galore_adamw", optim_args="rank=0")
    with pytest.raises(ValueError, match=r"LowMemTrainingArguments.optim_args: Unknown hyperparameter\(s\) \['rnak'\]"):
        LowMemTrainingArguments(str(tmp_path), report_to="none", lowmem_optim="galore_adamw", optim_args="rnak=3")


@pytest.mark.parametrize("trainer, field, value, expected", [
    ("dpo", "beta", -0.1, "a number >= 0"), ("dpo", "label_smoothing", 0.7, r"a number in \[0, 0.5\)"),
    ("dpo", "max_length", 0, "an integer > 0, or null"), ("grpo", "temperature", 0.0, "a number > 0"),
    ("grpo", "max_completion_length", 0, "an integer > 0"), ("grpo", "top_p", 1.5, r"a number in \(0, 1\]"),
    ("grpo", "epsilon", -0.2, "a number >= 0"), ("grpo", "num_iterations", 0, "an integer > 0"),
])
def test_trl_fields_out_of_range_are_errors(trainer, field, value, expected, tmp_path):
    """TRL's configs accept these silently (a negative DPO beta trains towards the rejected answers, a zero
    temperature divides by zero): a recipe's value is range-checked with the rest, before the model loads."""
    from lowmem.config import ConfigError

    extra = {"num_generations": 4} if trainer == "grpo" else {}
    with pytest.raises(ConfigError, match=rf"training_args.{field}={value}: expected {expected}"):
        load_recipe(None, trainer=trainer, output_dir=str(tmp_path), batch_size=4, training_args={**extra, field: value})
    load_recipe(None, trainer=trainer, output_dir=str(tmp_path), batch_size=4,  # the defaults / usual values pass
                training_args={**extra, "beta": 0.1, "max_length" if trainer == "dpo" else "temperature": 512 if trainer == "dpo" else 0.7})


def test_resume_from_a_checkpoint_at_or_past_steps_is_an_error(tmp_path):
    """``steps`` is the total to reach: resuming checkpoint-9 with steps=3 made the Trainer do one more step
    and report 10; now an error before anything loads."""
    import json

    from lowmem.config import ConfigError
    from lowmem.train import resolve_checkpoint

    ckpt = tmp_path / "checkpoint-9"
    ckpt.mkdir()
    import torch
    from safetensors.torch import save_file

    for name in ("optimizer.pt", "scheduler.pt"):  # whole files: --resume skips truncated ones
        torch.save({}, ckpt / name)
    save_file({"w": torch.zeros(1)}, ckpt / "model.safetensors")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 9}))
    for steps in (3, 9):
        recipe = load_recipe(None, output_dir=str(tmp_path), steps=steps, resume_from_checkpoint=True)
        with pytest.raises(ConfigError, match=rf"steps={steps}: the checkpoint to resume, .*checkpoint-9, is already at step 9; "
                                              r"steps is the total to reach .*set steps > 9"):
            resolve_checkpoint(recipe)
    assert resolve_checkpoint(load_recipe(None, output_dir=str(tmp_path), steps=10, resume_from_checkpoint=str(ckpt))) == str(ckpt)


def test_hyperparameter_typo_suggests_the_close_names():
    from lowmem.config import ConfigError

    with pytest.raises(ConfigError, match=r"Unknown hyperparameter\(s\) \['rnak'\] for optimizer 'galore_adamw' "
                                          r"\(did you mean 'rnak' -> 'rank'\?\); valid: \['betas'"):
        load_recipe(None, optim="galore_adamw", optim_args={"rnak": 4})


def test_warmup_ratio_configs_and_fractional_warmup_steps(tmp_path):
    """transformers 5 dropped ``warmup_ratio`` (a ``warmup_steps`` below 1 is the fraction): an HF config's
    ``warmup_ratio`` is an error that gives the replacement, and ``warmup_steps: 0.1`` reaches the Trainer."""
    from lowmem.config import ConfigError

    with pytest.raises(ConfigError, match=r"warmup_ratio=0.1: transformers 5 has no warmup_ratio; write warmup_steps: 0.1"):
        load_recipe(None, warmup_ratio=0.1)
    # (a scheduler that warms up: under lowmem's default 'constant' a warm-up is refused, SILENT 1)
    recipe = load_recipe(None, warmup_steps=0.1, steps=50, lr_scheduler="constant_with_warmup", output_dir=str(tmp_path))
    assert build_training_args(recipe).get_warmup_steps(50) == 5
    assert build_training_args(load_recipe(None, warmup_steps=3, lr_scheduler="linear",
                                           output_dir=str(tmp_path))).get_warmup_steps(50) == 3
    with pytest.raises(ConfigError, match=r"warmup_steps=2.5: expected a whole number of steps, or a fraction"):
        load_recipe(None, warmup_steps=2.5)


@pytest.mark.parametrize("fields, hint", [({"rank": 8}, "['r']"), ({"lora_rank": 8, "alpha": 16}, "['lora_alpha', 'r']"),
                                          ({"lora_dropuot": 0.1}, "['lora_dropout']")])
def test_lora_field_typos_name_peft_s_field(fields, hint):
    """`lora: {rank: 8}` (LLaMA-Factory's lora_rank, ...) names peft's field before the list."""
    from lowmem.train import lora_config

    with pytest.raises(ValueError, match=r"Unknown lora field\(s\) .*; did you mean " + __import__("re").escape(hint)):
        lora_config(fields)


def test_own_model_needs_a_learning_rate(tiny_model_path, tmp_path, capsys):
    """With a model of one's own and no ``lr`` anywhere, the demo's 1e-2 (default.yaml, for the embedded
    tiny model trained from scratch) trained a pretrained model quietly: now an error naming ``lr`` and the
    flag, before anything loads. ``optim_args``' lr, a recipe's ``learning_rate`` and ``--lr`` each set it;
    the embedded tiny model keeps the demo's 1e-2."""
    from lowmem.cli import main
    from lowmem.config import ConfigError
    from lowmem.train import DEMO_LR, TrainRecipe

    with pytest.raises(ConfigError, match=r"lr: no learning rate given for model='.*'; set one with --lr"):
        load_recipe(None, model=tiny_model_path)
    with pytest.raises(ConfigError, match=r"lr: no learning rate given"):
        TrainRecipe(model=tiny_model_path)
    assert main(["train", "--model", tiny_model_path, "--steps", "1", "--output-dir", str(tmp_path / "o")]) == 2
    assert "lr: no learning rate given" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert load_recipe(None, model=tiny_model_path, lr=3e-5).lr == 3e-5
    assert load_recipe(None, model=tiny_model_path, optim="adamw", optim_args="lr=4e-5").lr == 4e-5
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model_path}\nlearning_rate: 5.0e-5\n")
    assert load_recipe(recipe).lr == 5e-5
    assert load_recipe(None).lr == DEMO_LR == TrainRecipe().lr == 1e-2
