import logging
import shutil
from functools import partial

import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from lowmem import create_optimizer
from lowmem.kit import build_tiny_model, sft_dataset, tokenize_sft
from lowmem.optim import Adafactor, AdamW, LowMemOptimizer, get_entry, optimizer_entries
from lowmem.optim.registry import decay_parameter_names
from lowmem.trainers import (
    LowMemTrainer,
    LowMemTrainingArguments,
    optimizer_cls_and_kwargs,
    parse_optim_args,
    trainer_hparams,
)

COMMON = dict(report_to="none", use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, save_strategy="no")


@pytest.fixture(scope="module")
def train_data(tokenizer):
    return tokenize_sft(sft_dataset(96, seed=0), tokenizer)


def hyper(group):
    return {k: v for k, v in group.items() if k != "params"}


def test_plain_trainer_uses_lowmem_groups_and_training_args(tmp_path, train_data):
    model, _ = build_tiny_model(0)
    args = TrainingArguments(tmp_path, learning_rate=3e-3, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95,
                             adam_epsilon=1e-6, max_steps=1, **COMMON)
    trainer = Trainer(model=model, args=args, train_dataset=train_data, data_collator=default_data_collator,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, "adamw", args=args))
    # the Trainer's own grouping would decay everything: only lowmem's groups keep norms decay-free
    trainer.get_decay_parameter_names = lambda m: [n for n, _ in m.named_parameters()]
    opt = trainer.create_optimizer()
    assert isinstance(opt, AdamW)
    decay = decay_parameter_names(model)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in opt.param_groups:
        assert (g["lr"], g["betas"], g["eps"]) == (3e-3, (0.8, 0.95), 1e-6)
        for p in g["params"]:
            seen.add(names[id(p)])
            assert g["weight_decay"] == (0.05 if names[id(p)] in decay else 0.0), names[id(p)]
    assert seen == set(names.values())
    assert any("norm" in n for n in set(names.values()) - decay)  # there are decay-free norm weights
    trainer.train()  # and it runs


@pytest.mark.parametrize("entry", [e for e in optimizer_entries() if e.recipe is not None], ids=lambda e: e.name)
def test_cls_and_kwargs_rebuilds_create_optimizer(entry):
    """For every registered engine optimizer, cls(**kwargs) builds what create_optimizer builds."""
    model, _ = build_tiny_model(0)
    cls, kwargs = optimizer_cls_and_kwargs(model, entry.name, **entry.example_hparams)
    params = kwargs.pop("params")
    rebuilt = cls(params, **kwargs)
    reference = create_optimizer(model, entry.name, **entry.example_hparams)
    assert isinstance(rebuilt, LowMemOptimizer) and rebuilt.recipe is entry.recipe
    assert [hyper(g) for g in rebuilt.param_groups] == [hyper(g) for g in reference.param_groups]
    assert [[id(p) for p in g["params"]] for g in rebuilt.param_groups] == [[id(p) for p in g["params"]] for g in reference.param_groups]


def test_lowmem_trainer_honours_training_args(tmp_path, train_data):
    model, _ = build_tiny_model(0)
    args = LowMemTrainingArguments(tmp_path, lowmem_optim="adamw", learning_rate=2e-3, weight_decay=0.1, adam_beta1=0.85,
                                   adam_beta2=0.98, adam_epsilon=1e-7, max_steps=2, **COMMON)
    trainer = LowMemTrainer(model=model, args=args, train_dataset=train_data, data_collator=default_data_collator)
    trainer.train()
    opt = trainer.optimizer.optimizer  # accelerate's wrapper
    assert isinstance(opt, AdamW)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    for g in opt.param_groups:
        assert (g["initial_lr"], g["betas"], g["eps"]) == (2e-3, (0.85, 0.98), 1e-7)
    assert opt.state_bytes() > 0


def test_explicit_optim_args_win_and_adafactor_defaults(tmp_path, train_data, caplog):
    # (was: learning_rate=1e-3 and adam_beta1=0.5 beside lowmem_optim_args' lr, each lost with a warning; now each is
    # an error naming it, SILENT 2 / 3 of the no-silent-fallback audit, and untouched adam_* defaults are not logged)
    model, _ = build_tiny_model(0)
    args = LowMemTrainingArguments(tmp_path, lowmem_optim="adafactor", lowmem_optim_args="lr=0.02,clip_threshold=2.0",
                                   learning_rate=0.02, max_steps=1, **COMMON)
    assert args.lowmem_optim_args == {"lr": 0.02, "clip_threshold": 2.0}
    trainer = LowMemTrainer(model=model, args=args, train_dataset=train_data, data_collator=default_data_collator)
    with caplog.at_level(logging.INFO, logger="lowmem.trainers.hf"):
        opt = trainer.create_optimizer()
    assert isinstance(opt, Adafactor)
    g = opt.param_groups[0]
    assert (g["lr"], g["clip_threshold"], g["relative_step"], g["scale_parameter"], g["beta1"]) == (0.02, 2.0, False, False, None)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "adam_epsilon" not in caplog.text  # its untouched default: Adafactor's own eps pair applies, nothing to say
    for kw, named in ((dict(learning_rate=1e-3), r"learning_rate=0.001 and optim_args / lowmem_optim_args' lr=0.02"),
                      (dict(adam_beta1=0.5), r"adam_beta1=0.5, adam_beta2=0.999 cannot apply to optimizer 'adafactor'")):
        bad = LowMemTrainingArguments(tmp_path, lowmem_optim="adafactor", lowmem_optim_args="lr=0.02", max_steps=1,
                                      **{"learning_rate": 0.02, **kw}, **COMMON)
        with pytest.raises(ValueError, match=named):
            LowMemTrainer(model=model, args=bad, train_dataset=train_data, data_collator=default_data_collator).create_optimizer()


def test_trainer_hparams_mapping():
    args = TrainingArguments("unused", learning_rate=0.1, weight_decay=0.2, **COMMON)
    # (TrainingArguments' optim, adamw_torch, is the HF name for adamw: its untouched betas / eps apply, as the HF
    # Trainer's; for another optimizer they would leave its own defaults, FOUND_SMALLS17 3)
    assert trainer_hparams("adamw", args) == {"lr": 0.1, "weight_decay": 0.2, "betas": (0.9, 0.999), "eps": 1e-8}
    assert trainer_hparams("racs", args) == {"lr": 0.1, "weight_decay": 0.2}
    assert trainer_hparams("adamw", args, {"eps": 1e-5, "lr": 0.1})["eps"] == 1e-5  # (another lr: an error, SILENT 3)
    hp = trainer_hparams("adafactor", args)
    assert hp == {"lr": 0.1, "weight_decay": 0.2, "relative_step": False, "scale_parameter": False}
    with pytest.raises(ValueError, match="valid"):
        trainer_hparams("adamw", args, {"rank": 4})


def test_parse_optim_args_and_validation(tmp_path):
    assert parse_optim_args("betas=[0.9,0.99],eps=1e-6,foo=bar,ok=True") == {"betas": (0.9, 0.99), "eps": 1e-6, "foo": "bar", "ok": True}
    assert parse_optim_args('{"lr": 0.5, "beta1": null}') == {"lr": 0.5, "beta1": None}
    assert parse_optim_args(None) == {} and parse_optim_args({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="k=v"):
        parse_optim_args("lr 0.1")
    with pytest.raises(ValueError, match="valid"):
        LowMemTrainingArguments(tmp_path, lowmem_optim="adamw", lowmem_optim_args="rank=4", **COMMON)
    with pytest.raises(ValueError, match="adafactor"):
        LowMemTrainingArguments(tmp_path, lowmem_optim="no-such-optimizer", **COMMON)


def test_relative_step_rejected_under_trainer(tmp_path):
    """Refused with the arguments, before any model or Trainer exists (the Trainer drives the step size)."""
    with pytest.raises(ValueError, match=r"lowmem_optim_args\.relative_step=True .*Trainer drives the step size.*relative_step=False"):
        LowMemTrainingArguments(tmp_path, lowmem_optim="adafactor", lowmem_optim_args={"relative_step": True, "lr": None},
                                max_steps=1, **COMMON)


def _train(out_dir, name, train_data, resume=None, steps=6, checked=True):
    torch.manual_seed(0)
    model, _ = build_tiny_model(0)
    example = {k: v for k, v in get_entry(name).example_hparams.items() if k != "lr"}
    args = LowMemTrainingArguments(
        out_dir, lowmem_optim=name, lowmem_optim_args=example, learning_rate=1e-2, max_steps=steps, per_device_train_batch_size=8,
        **{**COMMON, "save_strategy": "steps"}, save_steps=3, seed=0,
    )
    trainer = LowMemTrainer(model=model, args=args, train_dataset=train_data, data_collator=default_data_collator)
    # checked=False: transformers' own train, without the mixin's check of the checkpoint (resume_checkpoint)
    (trainer.train if checked else partial(Trainer.train, trainer))(resume_from_checkpoint=resume)
    return model, trainer.optimizer.optimizer


ENGINE_OPTIMIZERS = [e.name for e in optimizer_entries() if e.recipe is not None and e.generic_tests]
# One recipe per kind of state in the default run (the Trainer's optimizer.pt round trip is the same code for all;
# every engine optimizer's own state_dict resume is tests/test_optim_generic.py's test_resume_is_identical_and_weights_only):
# full-rank (adamw, with the control), factored (adafactor), subspace (galore_adamw), quantized (adamw8bit),
# compressed (microadam), hybrid (muon: orthogonalized + AdamW groups), layerwise-fused (adalomo). The rest: slow.
RESUME_DEFAULT = {"adamw", "adafactor", "galore_adamw", "adamw8bit", "microadam", "muon", "adalomo"}


@pytest.mark.parametrize("name", [n if n in RESUME_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in ENGINE_OPTIMIZERS])
def test_resume_from_checkpoint_matches_uninterrupted(tmp_path, train_data, name):
    full, full_opt = _train(tmp_path / "full", name, train_data)
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").is_file()
    resumed, resumed_opt = _train(tmp_path / "resumed", name, train_data, resume=str(ckpt))
    start = dict(build_tiny_model(0)[0].named_parameters())
    ref = dict(full.named_parameters())
    assert any(not torch.equal(p, start[k]) for k, p in ref.items())  # it did train
    for k, p in resumed.named_parameters():
        torch.testing.assert_close(p, ref[k], rtol=1e-6, atol=1e-7, msg=k)
    a, b = full_opt.state_dict()["state"], resumed_opt.state_dict()["state"]
    assert a.keys() == b.keys()
    for i in a:
        for key in a[i]:
            torch.testing.assert_close(a[i][key], b[i][key], rtol=1e-6, atol=1e-7)

    if name == "adamw":  # control: without the optimizer state the resumed run must differ
        bare = tmp_path / "bare-ckpt"
        shutil.copytree(ckpt, bare)
        (bare / "optimizer.pt").unlink()
        # LowMemTrainer refuses it now, as `lowmem train` does (USERAPI 1 / 4); the Trainer's own train resumes it
        with pytest.raises(ValueError, match=r"not a complete checkpoint: missing \['optimizer.pt'\]"):
            _train(tmp_path / "bare", name, train_data, resume=str(bare))
        drifted, _ = _train(tmp_path / "bare", name, train_data, resume=str(bare), checked=False)
        assert any(not torch.allclose(p, ref[k], rtol=1e-6, atol=1e-7) for k, p in drifted.named_parameters())


def test_mixin_is_inert_without_lowmem_optim(tmp_path, train_data):
    model, _ = build_tiny_model(0)
    args = TrainingArguments(tmp_path, optim="adamw_torch", max_steps=1, **COMMON)
    trainer = LowMemTrainer(model=model, args=args, train_dataset=train_data, data_collator=default_data_collator)
    assert type(trainer.create_optimizer()) is torch.optim.AdamW
    assert get_entry("adamw").name == "adamw"


def test_optim_target_modules_selects_projected_layers_by_the_trainers_rules(tmp_path, train_data):
    # a configuration written for the Trainer's own GaLore: regexes in a list (peft's list rule would match none)
    model, _ = build_tiny_model(0)
    args = LowMemTrainingArguments(tmp_path, lowmem_optim="galore_adamw", lowmem_optim_args="rank=4",
                                   optim_target_modules=[r".*self_attn.*", "up_proj"], max_steps=1, **COMMON)
    trainer = LowMemTrainer(model=model, args=args, train_dataset=train_data, data_collator=default_data_collator)
    opt = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    projected = sorted(names[id(p)] for g in opt.param_groups if g.get("rank") for p in g["params"])
    assert projected and all(("self_attn" in n or "up_proj" in n) and n.endswith("weight") for n in projected)
    assert len(projected) == 2 * 5  # q, k, v, o (regex) and up_proj (substring) in each of 2 blocks
    # a non-subspace optimizer cannot honour it: an error when the arguments are built, not a silently ignored field
    with pytest.raises(ValueError, match="treats every parameter alike"):
        LowMemTrainingArguments(tmp_path, lowmem_optim="adamw", optim_target_modules=["q_proj"], max_steps=1, **COMMON)
    # Muon's orthogonalized weights are chosen the same way (its target key, not a rank)
    args = LowMemTrainingArguments(tmp_path, lowmem_optim="muon", optim_target_modules=["q_proj"], max_steps=1, **COMMON)
    trainer = LowMemTrainer(model=model, args=args, train_dataset=train_data, data_collator=default_data_collator)
    opt = trainer.create_optimizer()
    muon = sorted(names[id(p)] for g in opt.param_groups if g.get("use_muon") for p in g["params"])
    assert muon and all("q_proj" in n for n in muon) and len(muon) == 2


def test_resume_with_another_optimizer_is_a_clear_error(tmp_path, train_data):
    """Resuming a checkpoint with another lowmem optimizer: torch's load_state_dict would adopt the saved
    groups' hyperparameters and the first step fail with a KeyError ('relative_step') inside the update."""
    _train(tmp_path / "adamw", "adamw", train_data, steps=3)
    ckpt = str(tmp_path / "adamw" / "checkpoint-3")
    # (the engine's load_state_dict refuses another optimizer's settings, re-raised naming the checkpoint)
    with pytest.raises(ValueError, match=r"checkpoint-3 does not fit lowmem_optim='adafactor' with these optim_args "
                                         r"\(adafactor: parameter group 0: the checkpoint's parameter group has settings "
                                         r"\['betas'\] this optimizer does not know.*resume with the optimizer"):
        _train(tmp_path / "adafactor", "adafactor", train_data, resume=ckpt)
    with pytest.raises(ValueError, match=r"checkpoint-3 does not fit lowmem_optim='galore_adamw' with these optim_args "
                                         r"\(.*another number of parameter groups: the checkpoint has 2, this optimizer 3.*\); resume with the optimizer"):
        _train(tmp_path / "galore", "galore_adamw", train_data, resume=ckpt)
