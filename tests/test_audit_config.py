"""An outside user's HF Trainer / TRL configuration through lowmem (AUDITCONFIG, 2026-11-30).

Each test is a configuration written for transformers' Trainer or TRL, set on lowmem's arguments classes as the
user wrote it: the Trainer's optimizer names, ``optim_target_modules="all-linear"``, TRL fields out of range, DPO
given SFT data, and the Trainer's own AdamW run next to lowmem's under gradient accumulation, clipping, a schedule
and weight decay.
"""

import logging

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments, default_data_collator

from lowmem.kit import build_tiny_model, sft_dataset, tokenize_sft
from lowmem.optim.layerwise import LayerwiseOptimizer
from lowmem.trainers import (
    BNPOConfig,
    GVPOConfig,
    LowMemDPOConfig,
    LowMemDPOTrainer,
    LowMemGRPOConfig,
    LowMemSFTConfig,
    LowMemTrainer,
    LowMemTrainingArguments,
)

COMMON = dict(report_to="none", use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, save_strategy="no")


@pytest.mark.parametrize("hf_name, name, layerwise", [
    ("galore_adamw_8bit", "galore_adamw8bit", False),
    ("galore_adafactor_layerwise", "galore_adafactor", True),
    ("galore_adamw_8bit_layerwise", "galore_adamw8bit", True),
    ("apollo_adamw_layerwise", "apollo_adamw", True),
    ("adamw_torch_4bit", "adamw4bit", False),
    ("adamw_torch", "adamw", False),
    ("adamw_bnb_8bit", "bnb_adamw8bit", False),
    ("paged_adamw_8bit", "bnb_paged_adamw8bit", False),
    ("galore_adamw", "galore_adamw", False),  # a lowmem name as well: unchanged
])
def test_lowmem_optim_takes_the_trainers_optimizer_names(hf_name, name, layerwise, tmp_path):
    """The names of TrainingArguments.optim map as in `lowmem train` (before: 'Unknown optimizer', blamed on optim_args)."""
    args = LowMemTrainingArguments(tmp_path, lowmem_optim=hf_name, **COMMON)
    assert (args.lowmem_optim, args.lowmem_layerwise) == (name, layerwise)
    dpo = LowMemDPOConfig(tmp_path, lowmem_optim=hf_name, **COMMON)
    assert (dpo.lowmem_optim, dpo.lowmem_layerwise) == (name, layerwise)


def test_an_unknown_optimizer_name_is_blamed_on_lowmem_optim(tmp_path):
    with pytest.raises(ValueError, match=r"^LowMemTrainingArguments\.lowmem_optim='yogi' is neither a lowmem optimizer "
                                         r"nor a Hugging Face optimizer name.*galore_adamw_8bit"):
        LowMemTrainingArguments(tmp_path, lowmem_optim="yogi", **COMMON)


def test_hf_galore_config_with_all_linear_runs_layerwise(tmp_path):
    """A config written for the Trainer's own layerwise 8-bit GaLore: its optim name, optim_args string and
    optim_target_modules='all-linear' (before: 'matched no projection layer'), and gradient accumulation, which
    transformers' layerwise GaLore refuses."""
    model, tok = build_tiny_model(0)
    data = tokenize_sft(sft_dataset(16, seed=0), tok)
    args = LowMemTrainingArguments(tmp_path, lowmem_optim="galore_adamw_8bit_layerwise", optim_target_modules="all-linear",
                                   optim_args="rank=4,update_proj_gap=2,scale=0.5,proj_type=std", max_steps=2,
                                   gradient_accumulation_steps=2, per_device_train_batch_size=4, **COMMON)
    trainer = LowMemTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    opt = trainer.create_optimizer()
    assert isinstance(opt, LayerwiseOptimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = opt.param_groups
    projected = {names[id(p)] for g in groups if g.get("rank") for p in g["params"]}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert projected == linear and len(linear) == 14  # every projection layer, the output head excluded
    assert {(g["rank"], g["update_proj_gap"], g["scale"]) for g in groups if g.get("rank")} == {(4, 2, 0.5)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("targets", ["all-linear", "all_linear"])
def test_all_linear_selects_every_projection_layer(targets, tmp_path):
    from lowmem.optim.registry import subspace_target_names
    from lowmem.trainers.hf import OptimTargetModules

    model, _ = build_tiny_model(0)
    assert subspace_target_names(model, OptimTargetModules(targets)) == subspace_target_names(model)
    # Muon's target key too
    args = LowMemTrainingArguments(tmp_path, lowmem_optim="muon", optim_target_modules=targets, max_steps=1, **COMMON)
    opt = LowMemTrainer(model=model, args=args).create_optimizer()
    assert sum(len(g["params"]) for g in opt.param_groups if g.get("use_muon")) == 14


@pytest.mark.parametrize("cls, field, value, message", [
    (LowMemGRPOConfig, "beta", -0.04, r"LowMemGRPOConfig\.beta=-0\.04: expected a number >= 0"),
    (LowMemGRPOConfig, "temperature", 0.0, r"LowMemGRPOConfig\.temperature=0\.0: expected a number > 0"),
    (LowMemGRPOConfig, "max_completion_length", 0, r"max_completion_length=0: expected an integer > 0"),
    (LowMemGRPOConfig, "top_p", 1.5, r"top_p=1\.5: expected a number in \(0, 1\]"),
    (LowMemGRPOConfig, "num_iterations", 0, r"num_iterations=0: expected an integer > 0"),
    (LowMemGRPOConfig, "epsilon", -0.2, r"epsilon=-0\.2: expected a number >= 0"),
    (LowMemGRPOConfig, "reward_weights", [1.0, float("nan")], r"LowMemGRPOConfig\.reward_weights=\[1\.0, nan\]"),
    (BNPOConfig, "temperature", -1.0, r"BNPOConfig\.temperature=-1\.0: expected a number > 0"),
    (BNPOConfig, "epsilon_high", -0.28, r"BNPOConfig\.epsilon_high=-0\.28: expected a number >= 0"),
    (GVPOConfig, "max_completion_length", -5, r"GVPOConfig\.max_completion_length=-5: expected an integer > 0"),
    (GVPOConfig, "beta", -0.1, r"GVPO needs beta > 0"),  # its own range, its own message
    (LowMemDPOConfig, "beta", -0.1, r"LowMemDPOConfig\.beta=-0\.1: expected a number >= 0"),
    (LowMemDPOConfig, "label_smoothing", 0.7, r"label_smoothing=0\.7: expected a number in \[0, 0\.5\)"),
    (LowMemDPOConfig, "max_length", 0, r"LowMemDPOConfig\.max_length=0: expected an integer > 0"),
    (LowMemDPOConfig, "truncation_mode", "keep_middle", r"truncation_mode='keep_middle': expected one of \['keep_end', 'keep_start'\]"),
    (LowMemSFTConfig, "max_length", -1, r"LowMemSFTConfig\.max_length=-1: expected an integer > 0"),
    (LowMemSFTConfig, "loss_type", "nlll", r"LowMemSFTConfig\.loss_type='nlll': expected one of \['nll', 'dft'"),
    (LowMemSFTConfig, "packing_strategy", "bdf", r"packing_strategy='bdf': expected one of \['bfd', 'bfd_split', 'wrapped'\]"),
    (LowMemTrainingArguments, "gradient_accumulation_steps", 0, r"gradient_accumulation_steps=0: expected an integer > 0"),
    (LowMemTrainingArguments, "max_grad_norm", -1.0, r"LowMemTrainingArguments\.max_grad_norm=-1\.0: expected a number >= 0"),
])
def test_config_fields_out_of_range_fail_when_the_config_is_built(cls, field, value, message, tmp_path):
    """TRL does not range-check these (a negative beta trains the wrong way; temperature 0 or
    max_completion_length 0 fail at generation, after the model loaded); lowmem train's recipes checked them,
    the Python configs did not. Also without lowmem_optim (TRL's own optimizer)."""
    extra = dict(per_device_train_batch_size=4, num_generations=4, bf16=False) if cls in (LowMemGRPOConfig, BNPOConfig, GVPOConfig) else {}
    for lowmem in ({"lowmem_optim": "adafactor"}, {}):
        with pytest.raises(ValueError, match=message):
            cls(str(tmp_path), **{field: value}, **extra, **lowmem, **COMMON)
    cls(str(tmp_path), **extra, **COMMON)  # the defaults pass
    if cls is LowMemGRPOConfig:  # negative reward weights (a penalty) are fine
        cls(str(tmp_path), reward_weights=[1.0, -0.5], **extra, **COMMON)


@pytest.mark.parametrize("rows, trainer", [
    ([{"text": "1+2=3"}], "LowMemSFTTrainer \\(lowmem train: trainer: sft\\)"),
    ([{"prompt": "1+2=", "completion": "3"}], "LowMemSFTTrainer \\(lowmem train: trainer: sft\\)"),
    ([{"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]}], "LowMemSFTTrainer"),
    ([{"prompt": "1+2=", "answer": "3"}], "LowMemGRPOTrainer / GVPOTrainer / BNPOTrainer \\(lowmem train: trainer: grpo\\)"),
])
def test_dpo_on_sft_data_names_the_trainer_that_takes_it(rows, trainer, tiny_model_path, tmp_path):
    """TRL 1.16 failed with a bare KeyError: 'chosen' while preparing the data."""
    args = LowMemDPOConfig(str(tmp_path), lowmem_optim="adamw", max_steps=1, per_device_train_batch_size=2, **COMMON)
    with pytest.raises(ValueError, match=r"LowMemDPOTrainer: train_dataset columns \[.*\] lack \['chosen', 'rejected'\]; "
                                         rf"DPO trains on preference pairs: .*train them with {trainer}"):
        LowMemDPOTrainer(model=tiny_model_path, args=args, train_dataset=Dataset.from_list(rows * 4))
    pairs = Dataset.from_list([{"prompt": "1+2=", "chosen": "3", "rejected": "4"}] * 4)
    with pytest.raises(ValueError, match=r"eval_dataset\['held'\] columns"):
        LowMemDPOTrainer(model=tiny_model_path, args=args, train_dataset=pairs,
                         eval_dataset={"held": Dataset.from_list(rows * 4)})


def test_lomo_without_layerwise_says_it_keeps_every_gradient(tmp_path, caplog):
    """The Trainer's optim='lomo' always fuses the update into the backward pass; lowmem's needs lowmem_layerwise."""
    with caplog.at_level(logging.WARNING, logger="lowmem.trainers.hf"):
        LowMemTrainingArguments(tmp_path, lowmem_optim="lomo", **COMMON)
    assert "keeps every gradient" in caplog.text and "lowmem_optim='lomo_layerwise'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem.trainers.hf"):
        args = LowMemTrainingArguments(tmp_path, lowmem_optim="adalomo_layerwise", **COMMON)
    assert args.lowmem_layerwise and "keeps every gradient" not in caplog.text


def test_adamw_equals_the_trainers_own_under_accumulation_clipping_schedule_and_decay(tmp_path):
    """lowmem_optim='adamw' against TrainingArguments(optim='adamw_torch') with the same arguments: gradient
    accumulation, clipping that binds (max_grad_norm below every step's norm), warm-up + cosine, weight decay
    off biases and norms by the Trainer's rule, adam_beta2. Same logged grad norms and learning rates, and the
    same weights to float32 rounding (measured: 1.2e-7)."""
    _, tok = build_tiny_model(0)
    data = tokenize_sft(sft_dataset(48, seed=0), tok)
    kw = dict(learning_rate=3e-3, weight_decay=0.1, max_grad_norm=0.5, gradient_accumulation_steps=2, warmup_steps=1,
              lr_scheduler_type="cosine", max_steps=5, per_device_train_batch_size=4, adam_beta2=0.95, seed=0,
              logging_steps=1, **COMMON)
    runs = []
    for cls, args in ((Trainer, TrainingArguments(tmp_path / "hf", optim="adamw_torch", **kw)),
                      (LowMemTrainer, LowMemTrainingArguments(tmp_path / "lm", lowmem_optim="adamw", **kw))):
        model, _ = build_tiny_model(0)
        trainer = cls(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
        trainer.train()
        logs = [(h["grad_norm"], h["learning_rate"]) for h in trainer.state.log_history if "grad_norm" in h]
        runs.append((model, logs))
    (theirs, their_logs), (ours, our_logs) = runs
    assert len(our_logs) == 5 and all(g > 0.5 for g, _ in our_logs)  # clipping binds on every step
    assert [lr for _, lr in our_logs] == [lr for _, lr in their_logs]
    torch.testing.assert_close([g for g, _ in our_logs], [g for g, _ in their_logs], rtol=1e-5, atol=0)
    start, _ = build_tiny_model(0)
    for (name, a), b, p0 in zip(theirs.named_parameters(), ours.parameters(), start.parameters()):
        assert not torch.equal(a, p0), name
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def _no_kwargs(prompts, completions, answer):
    return [0.0] * len(completions)


def _needs_solution(completions, solution, **kwargs):
    return [0.0] * len(completions)


def _fine(completions, answer, **kwargs):
    return [float(a in c) for c, a in zip(completions, answer)]


@pytest.mark.parametrize("kind", ["grpo", "gvpo", "bnpo"])
@pytest.mark.parametrize("fn, message", [
    (_no_kwargs, r"reward function '_no_kwargs' \(prompts, completions, answer\): got an unexpected keyword argument "
                 r"'completion_ids'; TRL calls it with the keywords \[.*'answer'\]"),
    (_needs_solution, r"reward function '_needs_solution' .*missing a required argument: 'solution'"),
])
def test_a_users_reward_function_that_cannot_take_trls_call_fails_before_the_model_loads(kind, fn, message, tmp_path):
    """TRL 1.16 called it only after the first generation (TypeError from inside its reward loop)."""
    from lowmem.trainers import BNPOTrainer, GVPOTrainer, LowMemGRPOTrainer

    cls, config = {"grpo": (LowMemGRPOTrainer, LowMemGRPOConfig), "gvpo": (GVPOTrainer, GVPOConfig),
                   "bnpo": (BNPOTrainer, BNPOConfig)}[kind]
    args = config(str(tmp_path), lowmem_optim="adafactor", per_device_train_batch_size=4, num_generations=4,
                  reward_weights=[1.0, 1.0], max_steps=1, bf16=False, **COMMON)
    data = Dataset.from_list([{"prompt": "1+2=", "answer": "3"}] * 4)
    with pytest.raises(ValueError, match=message):
        cls(model="/nonexistent/model/never/loaded", reward_funcs=[_fine, fn], args=args, train_dataset=data)


def test_a_users_reward_function_with_its_columns_is_accepted(tiny_model_path, tmp_path):
    from lowmem.trainers import LowMemGRPOTrainer

    args = LowMemGRPOConfig(str(tmp_path), lowmem_optim="adafactor", per_device_train_batch_size=4, num_generations=4,
                            max_steps=1, bf16=False, **COMMON)
    data = Dataset.from_list([{"prompt": "1+2=", "answer": "3", "solution": "3"}] * 4)
    trainer = LowMemGRPOTrainer(model=tiny_model_path, reward_funcs=[_fine, _needs_solution], args=args, train_dataset=data)
    assert [f.__name__ for f in trainer.reward_funcs] == ["_fine", "_needs_solution"]


@pytest.mark.parametrize("fields, message", [
    ({"reward_range": "0,1"}, r"BNPOConfig\.reward_range='0,1': expected a pair \[low, high\] of numbers, or a list of such pairs"),
    ({"reward_range": [True, 1]}, r"BNPOConfig\.reward_range=\[True, 1\]: expected a pair"),
    ({"reward_weights": [1.0, 2.0]}, r"BNPOConfig\.reward_weights=\[1\.0, 2\.0\]: BNPO averages one advantage per reward "
                                     r"function with equal weight"),
])
def test_bnpo_config_refuses_what_its_trainer_would(fields, message, tmp_path):
    """Before: the string was read as 3 pairs ('one pair per reward function (3)'), unequal weights passed the config."""
    with pytest.raises(ValueError, match=message):
        BNPOConfig(str(tmp_path), per_device_train_batch_size=4, num_generations=4, bf16=False, **fields, **COMMON)
    BNPOConfig(str(tmp_path), per_device_train_batch_size=4, num_generations=4, bf16=False, reward_weights=[0.5, 0.5],
               reward_range=[[0, 1], [-1, 1]], **COMMON)


def test_plain_trainer_takes_hf_names_and_says_what_replaces_its_optim(tmp_path, caplog):
    """optimizer_cls_and_kwargs(args=...) applies optim_args and optim_target_modules; the Trainer then ignores
    TrainingArguments.optim: before, optim='galore_adamw_layerwise' silently trained without layerwise mode."""
    from lowmem.optim import LowMemOptimizer
    from lowmem.trainers import optimizer_cls_and_kwargs

    model, _ = build_tiny_model(0)
    args = TrainingArguments(tmp_path, optim="galore_adamw_8bit_layerwise", optim_target_modules=["q_proj"],
                             optim_args="rank=8", max_steps=1, **COMMON)
    with caplog.at_level(logging.WARNING, logger="lowmem.trainers.hf"):
        cls, kwargs = optimizer_cls_and_kwargs(model, "galore_adamw_8bit", args=args)  # an HF name: galore_adamw8bit
    assert cls is LowMemOptimizer and kwargs["recipe"].name == "galore_adamw8bit"
    assert {g.get("rank") for g in kwargs["params"]} == {None, 8}
    assert ("replaces TrainingArguments.optim='galore_adamw_8bit_layerwise', which the Trainer ignores" in caplog.text
            and "lowmem_layerwise=True" in caplog.text)
    caplog.clear()
    same = TrainingArguments(tmp_path, optim="galore_adamw_8bit", optim_target_modules=["q_proj"], max_steps=1, **COMMON)
    with caplog.at_level(logging.WARNING, logger="lowmem.trainers.hf"):
        optimizer_cls_and_kwargs(model, "galore_adamw8bit", args=same, rank=8)
    assert "replaces" not in caplog.text  # the same optimizer under its HF name
    with pytest.raises(ValueError, match=r"optimizer_cls_and_kwargs\(model, 'galore_adamw_layerwise'\): layerwise mode .*"
                                         r"LowMemTrainer with LowMemTrainingArguments\(lowmem_optim='galore_adamw', lowmem_layerwise=True\)"):
        optimizer_cls_and_kwargs(model, "galore_adamw_layerwise", rank=8)


def test_optim_args_against_a_field_the_user_set_to_another_value_is_refused(tmp_path, caplog):
    """optim_args / lowmem_optim_args win over the mapped TrainingArguments fields; a field the user changed from
    its default to another value than theirs was named in a warning and dropped; now (SILENT 3, no silent fallback)
    it is an error naming both. The same value, or a field left at its default, is no conflict."""
    from lowmem.trainers import trainer_hparams

    args = LowMemTrainingArguments(tmp_path, lowmem_optim="adamw", learning_rate=1e-3, adam_beta1=0.8, **COMMON)
    with pytest.raises(ValueError, match=r"learning_rate=0.001 and optim_args / lowmem_optim_args' lr=0.5 both set "
                                         r"optimizer 'adamw''s lr, to different values"):
        trainer_hparams("adamw", args, "lr=0.5,betas=[0.8,0.999],eps=1e-6")
    with caplog.at_level(logging.WARNING, logger="lowmem.trainers.hf"):
        hp = trainer_hparams("adamw", args, "lr=0.001,betas=[0.8,0.999],eps=1e-6")
    assert (hp["lr"], hp["betas"], hp["eps"]) == (1e-3, (0.8, 0.999), 1e-6) and not caplog.text


def test_step_intervals_are_checked_only_under_their_steps_strategy(tmp_path):
    """save_steps=0 beside save_strategy='no' is unused (the Trainer reads it only under 'steps'): not refused."""
    LowMemTrainingArguments(tmp_path, lowmem_optim="adamw", save_steps=0, logging_strategy="no", logging_steps=0, **COMMON)
    with pytest.raises(ValueError, match=r"LowMemTrainingArguments\.logging_steps=0: expected a number > 0"):
        LowMemTrainingArguments(tmp_path, lowmem_optim="adamw", logging_steps=0, **COMMON)


def test_optim_naming_the_same_optimizer_is_not_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lowmem.trainers.hf"):
        LowMemTrainingArguments(tmp_path, optim="galore_adamw_8bit_layerwise", lowmem_optim="galore_adamw_8bit_layerwise", **COMMON)
    assert "replaces" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="lowmem.trainers.hf"):
        LowMemTrainingArguments(tmp_path, optim="galore_adamw_8bit_layerwise", lowmem_optim="galore_adamw8bit", **COMMON)
    assert "lowmem_optim='galore_adamw8bit' replaces optim='galore_adamw_8bit_layerwise', which is ignored" in caplog.text
