"""SMALLS20B 3: StableAdamW built by a plain ``transformers.Trainer`` (``optimizer_cls_and_kwargs``) decides its Kahan
compensation from the weights' dtype as lowmem's own does (torch-optimi's ``kahan_sum=None``, commit b5cae1f), load
pre-hook included. Before, the pair passed ``kahan_summation`` as given (the built optimizer's defaults and groups): the
Trainer's optimizer had no hook, and resuming a float32 run's checkpoint onto bfloat16 weights was refused ("the
checkpoint was saved with other settings kahan_summation=False (this optimizer: True)")."""

from __future__ import annotations

import warnings

import pytest
import torch

from lowmem.optim.recipes.stable_adamw import StableAdamW
from lowmem.trainers.hf import optimizer_cls_and_kwargs


def _model(dtype):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(dtype)


def _as_trainer_builds(model, **hp):
    """What ``Trainer.create_optimizer`` does with the pair: ``cls(kwargs.pop("params"), **kwargs)``."""
    cls, kwargs = optimizer_cls_and_kwargs(model, "stable_adamw", lr=1e-3, **hp)
    params = kwargs.pop("params")
    return cls(params, **kwargs)


def _steps(opt, model, n=2):
    for _ in range(n):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()


@pytest.mark.parametrize("saved, now", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_the_pair_resumes_onto_weights_of_another_dtype(saved, now):
    a, b = _model(saved), _model(now)
    before = _as_trainer_builds(a)
    _steps(before, a)
    opt = _as_trainer_builds(b)
    assert type(opt) is StableAdamW
    assert [g["kahan_summation"] for g in opt.param_groups] == [now == torch.bfloat16] * len(opt.param_groups)
    if now == torch.float32:
        with pytest.warns(UserWarning, match="kahan_comp"):
            opt.load_state_dict(before.state_dict())
        assert all("kahan_comp" not in st for st in opt.state.values())
    else:
        opt.load_state_dict(before.state_dict())
        assert all(torch.equal(st["kahan_comp"], torch.zeros_like(p)) for p, st in opt.state.items())
    assert [g["kahan_summation"] for g in opt.param_groups] == [now == torch.bfloat16] * len(opt.param_groups)
    _steps(opt, b)
    assert all(float(st["step"]) == 4.0 for st in opt.state.values())


def test_a_given_setting_stays_given():
    """kahan_summation given (optim_args kahan_sum=false, or the hyperparameter) is passed as before and compared on
    load as lowmem's own StableAdamW compares it."""
    a, b = _model(torch.float32), _model(torch.bfloat16)
    cls, kwargs = optimizer_cls_and_kwargs(a, "stable_adamw", lr=1e-3, kahan_summation=False)
    assert kwargs["kahan_summation"] is False and all(g["kahan_summation"] is False for g in kwargs["params"])
    before = _as_trainer_builds(a, kahan_summation=False)
    _steps(before, a)
    opt = _as_trainer_builds(b, kahan_summation=True)
    with pytest.raises(ValueError, match=r"kahan_summation=False \(this optimizer: True\)"):
        opt.load_state_dict(before.state_dict())


def test_a_plain_trainer_resumes_a_float32_checkpoint_onto_bfloat16_weights(tmp_path):
    from transformers import Trainer, TrainingArguments, default_data_collator

    from lowmem.kit import build_tiny_model, sft_dataset, tokenize_sft

    def trainer(dtype, steps):
        model, tok = build_tiny_model(0, dtype=dtype)
        args = TrainingArguments(str(tmp_path / "out"), learning_rate=1e-3, max_steps=steps, per_device_train_batch_size=4,
                                 logging_steps=1, save_strategy="steps", save_steps=2, use_cpu=True, report_to="none",
                                 disable_tqdm=True, dataloader_pin_memory=False, seed=0)
        return Trainer(model=model, args=args, train_dataset=tokenize_sft(sft_dataset(16, seed=0), tok),
                       data_collator=default_data_collator,
                       optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, "stable_adamw", args=args))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(torch.float32, 2).train()
        resumed = trainer(torch.bfloat16, 3)
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    opt = resumed.optimizer.optimizer if hasattr(resumed.optimizer, "optimizer") else resumed.optimizer
    assert isinstance(opt, StableAdamW) and resumed.state.global_step == 3
    assert all(g["kahan_summation"] for g in opt.param_groups)
    assert all("kahan_comp" in st for st in opt.state.values())
