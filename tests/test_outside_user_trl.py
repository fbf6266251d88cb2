"""A TRL user's own pieces through lowmem's TRL trainers: reward functions in TRL's signature (conversational
completions, ``None`` for some samples, several with ``reward_weights``), their own prompt and preference data
(plain, conversational, implicit prompt), TRL config field names, a model directory of their own, LoRA, and
every lowmem optimizer through DPO and GRPO. Each refusal names the field to change."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from own_data import dpo_rows, rl_rows

BASE = dict(lowmem_optim="adafactor", learning_rate=1e-2, max_steps=2, bf16=False, report_to="none", save_strategy="no",
            disable_tqdm=True, logging_steps=1, dataloader_pin_memory=False, seed=0)
RL = dict(BASE, per_device_train_batch_size=8, num_generations=4, max_completion_length=6)


def _text(completion):
    return completion[-1]["content"] if isinstance(completion, list) else completion


def starts_with_answer(prompts, completions, answer, **kwargs):
    return [1.0 if _text(c).strip().startswith(a) else 0.0 for c, a in zip(completions, answer)]


def half_or_none(prompts, completions, **kwargs):  # TRL: None = this function does not score this sample
    return [None if i % 3 == 0 else 0.5 for i in range(len(completions))]


def has_digit(completions, **kwargs):
    return [float(any(ch.isdigit() for ch in _text(c))) for c in completions]


def length_penalty(completions, **kwargs):  # in [-0.1 * max_completion_length, 0]: outside BNPO's default [0, 1]
    return [-0.1 * len(_text(c)) for c in completions]


# ---- configs: a GRPO field GVPO / BNPO would ignore, or one completion per prompt, is refused naming the field

@pytest.mark.parametrize("fields, named", [
    ({"loss_type": "grpo"}, "loss_type='grpo'"),
    ({"epsilon": 0.1, "epsilon_high": 0.3}, "epsilon=0.1"),
    ({"scale_rewards": "batch"}, "scale_rewards='batch'"),
    ({"multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation"),
    ({"importance_sampling_level": "sequence"}, "importance_sampling_level"),
    ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
])
def test_gvpo_refuses_grpo_loss_fields_it_would_ignore(fields, named, tmp_path):
    from lowmem.trainers import GVPOConfig

    with pytest.raises(ValueError, match=f"GVPO does not use .*{named}"):
        GVPOConfig(output_dir=str(tmp_path), **RL, **fields)
    GVPOConfig(output_dir=str(tmp_path), **RL, scale_rewards=True)  # TRL's old spelling of the default


@pytest.mark.parametrize("fields", [{"scale_rewards": "none"}, {"multi_objective_aggregation": "normalize_then_sum"}])
def test_bnpo_refuses_grpo_advantage_fields_it_would_ignore(fields, tmp_path):
    from lowmem.trainers import BNPOConfig

    with pytest.raises(ValueError, match=f"BNPO does not use {next(iter(fields))}="):
        BNPOConfig(output_dir=str(tmp_path), **RL, **fields)
    BNPOConfig(output_dir=str(tmp_path), **RL, loss_type="grpo", epsilon=0.1)  # the policy loss is TRL's: these apply


@pytest.mark.parametrize("kind, field", [("gvpo", "num_generations"), ("gvpo", "num_generations_eval"), ("bnpo", "num_generations")])
def test_one_completion_per_prompt_is_refused_naming_the_field(kind, field, tmp_path):
    from lowmem.trainers import BNPOConfig, GVPOConfig

    cls = {"gvpo": GVPOConfig, "bnpo": BNPOConfig}[kind]
    fields = dict(RL, **{field: 1})
    if field == "num_generations":
        fields["per_device_train_batch_size"] = 1
    with pytest.raises(ValueError, match=f"{kind.upper()} needs {field} >= 2 .*got {field}=1"):
        cls(output_dir=str(tmp_path), **fields)


def test_gvpo_unused_fields_are_grpo_config_fields():
    from trl import GRPOConfig

    from lowmem.trainers.gvpo import GVPO_UNUSED_FIELDS

    assert set(GVPO_UNUSED_FIELDS) <= {f.name for f in dataclasses.fields(GRPOConfig)}


# ---- a model built in memory: TRL reloads the reference by path; say so instead of TRL's OSError about a repo id ''

@pytest.mark.parametrize("kind", ["dpo", "grpo", "gvpo"])
def test_in_memory_model_with_a_reloaded_reference_is_refused_with_what_to_do(kind, tmp_path):
    from peft import LoraConfig

    from lowmem.kit import build_tiny_model, preference_dataset, reward_dataset, reward_fn
    from lowmem.trainers import GVPOConfig, GVPOTrainer, LowMemDPOConfig, LowMemDPOTrainer, LowMemGRPOConfig, LowMemGRPOTrainer

    model, tok = build_tiny_model(seed=0)
    assert model.config._name_or_path == ""
    out = str(tmp_path)
    if kind == "dpo":
        make = lambda **kw: LowMemDPOTrainer(model=model, processing_class=tok, train_dataset=preference_dataset(8),  # noqa: E731
                                             args=LowMemDPOConfig(output_dir=out, **dict(BASE, per_device_train_batch_size=4)), **kw)
        match = "DPO: TRL builds the reference model by reloading .*ref_model="
    else:
        config_cls, trainer_cls = (LowMemGRPOConfig, LowMemGRPOTrainer) if kind == "grpo" else (GVPOConfig, GVPOTrainer)
        extra = {"beta": 0.04} if kind == "grpo" else {"reference_policy": "model"}
        make = lambda **kw: trainer_cls(model=model, reward_funcs=reward_fn, processing_class=tok,  # noqa: E731
                                        train_dataset=reward_dataset(8), args=config_cls(output_dir=out, **RL, **extra), **kw)
        match = f"{kind.upper()}: TRL builds the reference model .*" + ("beta=0.0" if kind == "grpo" else "reference_policy='sampling'")
    with pytest.raises(ValueError, match=match):
        make()
    make(peft_config=LoraConfig(r=4, target_modules=["q_proj"]))  # the adapter-disabled base is the reference
    if kind == "dpo":
        import copy

        make(ref_model=copy.deepcopy(model))


def test_dpo_ref_model_as_a_path_says_to_load_it(own_model_dir, tmp_path):
    # older TRL took ref_model="path"; TRL 1.16 failed with AttributeError: 'str' object has no attribute 'modules'
    from datasets import Dataset

    from lowmem.trainers import LowMemDPOConfig, LowMemDPOTrainer

    args = LowMemDPOConfig(output_dir=str(tmp_path), **dict(BASE, per_device_train_batch_size=4))
    with pytest.raises(TypeError, match="ref_model=.*takes a model instance here, not a path"):
        LowMemDPOTrainer(model=own_model_dir, ref_model=own_model_dir, args=args,
                         train_dataset=Dataset.from_list(dpo_rows(8, conversational=False)))


# ---- BNPO: a reward outside reward_range names the function and the field

def test_bnpo_reward_outside_its_range_names_the_function(own_model_dir, tmp_path):
    from datasets import Dataset

    from lowmem.trainers import BNPOConfig, BNPOTrainer

    data = Dataset.from_list(rl_rows(16))

    def trainer(reward_range):
        args = BNPOConfig(output_dir=str(tmp_path), **dict(RL, max_steps=1), reward_range=reward_range)
        return BNPOTrainer(model=own_model_dir, reward_funcs=[has_digit, length_penalty], args=args, train_dataset=data)

    with pytest.raises(ValueError, match=r"reward function 'length_penalty' = reward_funcs\[1\]\) is outside reward_range "
                                         r"\[0.0, 1.0\]: .*one \[low, high\] per function"):
        trainer([0.0, 1.0]).train()
    trainer([[0.0, 1.0], [-0.6, 0.0]]).train()  # max_completion_length 6: the penalty is in [-0.6, 0]


# ---- the user's own reward functions, chat prompts, model directory and LoRA through GRPO / GVPO / BNPO

@pytest.mark.parametrize("kind", ["grpo", "gvpo", "bnpo"])
def test_users_rewards_chat_prompts_and_lora(kind, own_model_dir, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig

    from lowmem.optim import LowMemOptimizer
    from lowmem.trainers import BNPOConfig, BNPOTrainer, GVPOConfig, GVPOTrainer, LowMemGRPOConfig, LowMemGRPOTrainer

    seen = []

    def correct(prompts, completions, answer, **kwargs):  # TRL's signature, a dataset column as keyword
        seen.append((prompts[0], completions[0]))
        return starts_with_answer(prompts, completions, answer)

    config_cls, trainer_cls = {"grpo": (LowMemGRPOConfig, LowMemGRPOTrainer), "gvpo": (GVPOConfig, GVPOTrainer),
                               "bnpo": (BNPOConfig, BNPOTrainer)}[kind]
    weights = [1.0, 1.0, 1.0] if kind == "bnpo" else [1.0, 0.5, 0.25]
    args = config_cls(output_dir=str(tmp_path), **RL, reward_weights=weights)
    trainer = trainer_cls(model=own_model_dir, reward_funcs=[correct, half_or_none, has_digit], args=args,
                          train_dataset=Dataset.from_list(rl_rows(32, conversational=True)),
                          peft_config=LoraConfig(r=4, target_modules="all-linear"))
    scored = []
    generate = trainer._generate_and_score_completions

    def recording(inputs):
        out = generate(inputs)
        scored.append(out)
        return out

    trainer._generate_and_score_completions = recording
    trainer.train()
    prompt, completion = seen[0]
    assert prompt[-1]["role"] == "user" and completion[-1]["role"] == "assistant"  # conversational both ways
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 2 and all(h["rewards/half_or_none/mean"] == 0.5 for h in logs)  # None left out, not 0
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, LowMemOptimizer)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" in n}
    for out in scored:
        assert torch.isfinite(out["advantages"]).all()
        if kind == "gvpo":  # R_i: the weighted sum of the functions that scored the completion (TRL's nansum)
            assert torch.isfinite(out["gvpo_rewards"]).all()


# ---- the user's own preference data through DPO, in TRL's four forms

def _preferences(form):
    rows = dpo_rows(16, conversational=form.endswith("conversational"))
    if form.startswith("implicit"):  # no prompt column: TRL takes the common prefix of chosen and rejected
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    return rows


@pytest.mark.parametrize("form", ["explicit", "explicit-conversational", "implicit", "implicit-conversational"])
def test_dpo_on_users_preference_data(form, own_model_dir, tmp_path):
    from datasets import Dataset

    from lowmem.trainers import LowMemDPOConfig, LowMemDPOTrainer

    args = LowMemDPOConfig(output_dir=str(tmp_path), **dict(BASE, per_device_train_batch_size=4), beta=0.1)
    trainer = LowMemDPOTrainer(model=own_model_dir, args=args, train_dataset=Dataset.from_list(_preferences(form)))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.ref_model is not None  # reloaded from the user's directory
    assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(margins) == 2 and margins[0] == 0.0  # policy = reference at the first step


# ---- every lowmem optimizer through DPO and GRPO, two steps each (about 1.5 s each: slow)

def _every_optimizer():
    from lowmem.optim import optimizer_entries

    # (bitsandbytes' paged classes refuse CPU parameters: SILENT 27)
    return [pytest.param(e.name, marks=pytest.mark.cuda) if e.name.startswith("bnb_paged") else e.name
            for e in optimizer_entries()]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dpo", "grpo"])
@pytest.mark.parametrize("name", _every_optimizer())
def test_every_optimizer_through_dpo_and_grpo(kind, name, tiny_model_path, tmp_path):
    from lowmem.optim import get_entry
    from trl_helpers import inner_optimizer, make_trainer, trainable

    trainer = make_trainer(kind, tiny_model_path, str(tmp_path), 2, optim=name,
                           lr=0.1 if name in ("lomo", "sgd_sm", "adagrad_sn", "adagrad_snsm") else 1e-2)
    before = trainable(trainer)
    trainer.train()
    opt = inner_optimizer(trainer)
    entry = get_entry(name)
    assert entry.recipe is None or getattr(opt, "recipe", None) is entry.recipe, type(opt)
    after = trainable(trainer)
    assert [n for n in after if n in before and not torch.equal(before[n], after[n])], f"{kind} {name}: nothing moved"
    assert all(torch.isfinite(p).all() for p in after.values())


def test_gvpo_refuses_an_infinite_reward_naming_the_function(tiny_model_path, tmp_path):
    # inf - inf made the loss NaN: the logged loss was 0.0 (the Trainer's NaN filter) and the step's gradients NaN
    import math

    from lowmem.kit import reward_dataset
    from lowmem.trainers import GVPOConfig, GVPOTrainer

    def overflowing(prompts, completions, **kwargs):
        return [math.inf if i == 0 else 0.5 * (i % 2) for i in range(len(completions))]

    args = GVPOConfig(output_dir=str(tmp_path), **dict(RL, max_steps=1))
    trainer = GVPOTrainer(model=tiny_model_path, reward_funcs=[has_digit, overflowing], args=args,
                          train_dataset=reward_dataset(16))
    with pytest.raises(ValueError, match=r"reward function 'overflowing' \(reward_funcs\[1\]\) returned inf .*finite"):
        trainer.train()


def test_lowmem_train_dpo_says_how_many_pairs_its_margin_is_measured_on(own_model_dir, tmp_path):
    # a preference file of 12 pairs: the console said '64 training pairs'
    import io
    import json

    from rich.console import Console

    from lowmem.train import TrainRecipe, run
    from own_data import write_jsonl

    data = write_jsonl(tmp_path / "prefs.jsonl", dpo_rows(12, conversational=True))
    out = io.StringIO()
    metrics = run(TrainRecipe(trainer="dpo", model=own_model_dir, dataset=str(data), steps=1, batch_size=4, lr=1e-3,
                              output_dir=str(tmp_path / "out"), save_model=False, track_memory=False),
                  console=Console(file=out, width=200))
    assert metrics["margin_pairs"] == 12
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["margin_pairs"] == 12
    assert "margin (12 training pairs)" in out.getvalue(), out.getvalue()


@pytest.mark.parametrize("fields, error", [
    ({"config": "grpo"}, "BNPOTrainer needs args=BNPOConfig"),
    ({"reward_weights_after": [1.0, 2.0]}, r"equal weight; got reward_weights=\[1.0, 2.0\]"),  # BNPOConfig refuses it too
    ({"reward_range": [[0, 1], [0, 1], [0, 1]]}, "one pair per reward function \\(2\\)"),
])
def test_bnpo_trainer_checks_its_config_before_loading_the_model(fields, error, tmp_path):
    # the model path does not exist: the error must come before TRL tries to load it
    from lowmem.trainers import BNPOConfig, BNPOTrainer, LowMemGRPOConfig

    fields = dict(fields)
    cls = LowMemGRPOConfig if fields.pop("config", None) == "grpo" else BNPOConfig
    after = fields.pop("reward_weights_after", None)
    args = cls(output_dir=str(tmp_path), **RL, **fields)
    if after is not None:  # set after the config's own check
        args.reward_weights = after
    with pytest.raises((TypeError, ValueError), match=error):
        BNPOTrainer(model=str(tmp_path / "no-such-model"), reward_funcs=[has_digit, has_digit], args=args)


def test_gvpo_sync_ref_model_needs_the_model_reference(tmp_path):
    # TRL's own error said 'sync_ref_model=True while beta=0.0 ... set beta to a non-zero value' to a user with beta=0.1
    from lowmem.trainers import GVPOConfig

    with pytest.raises(ValueError, match="sync_ref_model=True needs reference_policy='model'"):
        GVPOConfig(output_dir=str(tmp_path), **RL, sync_ref_model=True)
    GVPOConfig(output_dir=str(tmp_path), **RL, sync_ref_model=True, reference_policy="model")
