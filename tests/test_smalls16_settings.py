"""Values written into ``param_groups`` after construction that the step would not use are refused at the next step
(group_layout.check_group_settings), as the constructor refuses them, and what real schedulers write still steps:

* Adafactor's ``lr`` in a ``relative_step=True`` group: the step computes its own step size. Refused by the
  constructor, ``create_optimizer`` and the Trainer's ``optim_args`` (transformers' error), and when written later
  unless ``None``, ``0.0`` (torch.distributed.checkpoint's state initialization) or the step size
  ``Adafactor._get_lr`` reports (transformers' ``AdafactorSchedule`` writes it there after each step; it also loads
  back from a checkpoint).
* A key written later that reads as a misspelled setting (``betas1``, ``weight_decy``, ``beta2`` on AdamW): the
  construction's "Unknown parameter-group key" error with difflib's hint; the keys torch's / transformers' /
  accelerate's schedulers and wrappers write (``initial_lr``, ``max_lr``, ``max_momentum``, ``swa_lr``, timm's
  ``initial_<field>``) and unrelated keys are accepted, as torch.optim accepts them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowmem.optim import Adafactor, create_optimizer

RELATIVE = r"Invalid lr=.* relative_step=True computes its own step size and does not use lr; expected None"


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))


def _backward(m, seed=1):
    m.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(seed)
    m(torch.randn(4, 8, generator=g)).square().sum().backward()


def _weights(m):
    return [p.detach().clone() for p in m.parameters()]


# ---- 1. Adafactor: an lr with relative_step=True --------------------------------------------------------------

def test_adafactor_lr_with_relative_step_is_refused_everywhere_it_is_given():
    m = _model()
    with pytest.raises(ValueError, match=r"Cannot combine manual `lr` and `relative_step=True` options \(Adafactor\): "
                                         r".*give lr=None, or relative_step=False"):
        Adafactor(m.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"Adafactor needs `lr` when `relative_step=False`: give lr \(a float >= 0\), "
                                         r"or relative_step=True"):
        Adafactor(m.parameters(), relative_step=False)
    with pytest.raises(ValueError, match=r"Cannot combine manual `lr` and `relative_step=True`"):
        create_optimizer(m, "adafactor", lr=1e-3, relative_step=True)
    from lowmem.trainers.hf import validate_optim_args

    with pytest.raises(ValueError, match=r"optim_args.relative_step=True .*cannot apply under a Trainer"):
        validate_optim_args("adafactor", "lr=1e-3,relative_step=True")


@pytest.mark.parametrize("value", [1e-3, torch.tensor(1e-3)])
def test_adafactor_lr_written_into_a_relative_step_group_is_refused(value):
    m = _model()
    opt = Adafactor(m.parameters())
    _backward(m)
    opt.step()
    opt.param_groups[0]["lr"] = value
    before = _weights(m)
    with pytest.raises(ValueError, match=r"parameter group 0 of optimizer 'adafactor'.*relative_step=False"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # nothing stepped
    with pytest.raises(ValueError, match=RELATIVE):  # refused again until put right
        opt.step()
    opt.param_groups[0]["lr"] = None
    opt.step()
    # relative_step turned on later in a group with an lr: refused too (the cross-field check)
    opt2 = Adafactor(m.parameters(), lr=1e-2, relative_step=False)
    opt2.step()
    opt2.param_groups[0]["relative_step"] = True
    with pytest.raises(ValueError, match=RELATIVE):
        opt2.step()


@pytest.mark.parametrize("zero", [0.0, torch.tensor(0.0)])
def test_adafactor_zero_lr_in_a_relative_step_group_is_accepted(zero):
    # torch.distributed.checkpoint's _init_optim_state: lr = 0.0 (a tensor if lr was one), one step, lr restored
    m = _model()
    opt = Adafactor(m.parameters())
    _backward(m)
    opt.param_groups[0]["lr"] = zero
    opt.step()
    opt.param_groups[0]["lr"] = None
    opt.step()


def _scheduled_run(steps=4, resume_at=None):
    from transformers.optimization import AdafactorSchedule

    m = _model()
    opt = Adafactor(m.parameters(), warmup_init=True)
    sched = AdafactorSchedule(opt)
    lrs = []
    for t in range(steps):
        if t == resume_at:  # a checkpoint of the optimizer (its groups hold AdafactorSchedule's report) loads back
            sd = copy.deepcopy(opt.state_dict())
            assert all(isinstance(g["lr"], float) and g["lr"] > 0 for g in sd["param_groups"])
            opt = Adafactor(m.parameters(), warmup_init=True)
            opt.load_state_dict(sd)
            sched = AdafactorSchedule(opt)
        _backward(m, seed=t)
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr())
    return m, opt, lrs


def test_adafactor_schedule_reports_the_step_size_and_changes_nothing():
    m, opt, lrs = _scheduled_run()
    # the reported step size: rho_t (warm-up 1e-6 t) times max(eps2, RMS(X_t)) of the group's first parameter
    w = m[0].weight.detach()
    assert lrs[-1][0] == pytest.approx(1e-6 * 4 * max(1e-3, w.square().mean().sqrt().item()), rel=1e-6)
    assert opt.param_groups[0]["lr"] == lrs[-1][0]
    # the same weights as without a scheduler (its lr is a report)
    plain = _model()
    opt2 = Adafactor(plain.parameters(), warmup_init=True)
    for t in range(4):
        _backward(plain, seed=t)
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), plain.parameters()))
    # a checkpoint taken under it resumes (its groups are first seen with the report in lr)
    m2, _, _ = _scheduled_run(resume_at=2)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


# ---- 2. keys written into a group after construction ----------------------------------------------------------

@pytest.mark.parametrize("key, hint", [("betas1", "'betas'"), ("weight_decy", "'weight_decay'"), ("beta2", "'betas'"),
                                       ("eps1", "'eps'")])
def test_misspelled_setting_written_later_is_refused(key, hint):
    m = _model()
    opt = create_optimizer(m, "adamw", lr=1e-2)
    _backward(m)
    opt.step()
    opt.param_groups[0][key] = 0.8
    before = _weights(m)
    with pytest.raises(ValueError, match=rf"Unknown parameter-group key\(s\) \['{key}'\] written in parameter group 0 "
                                         rf"of optimizer 'adamw' after construction \(did you mean '{key}' -> {hint}\?\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    del opt.param_groups[0][key]
    opt.step()


def test_a_key_renamed_at_the_same_count_is_seen():
    m = _model()
    opt = create_optimizer(m, "adamw", lr=1e-2)
    _backward(m)
    g = opt.param_groups[0]
    g["initial_lr"] = 1e-2  # (a scheduler's key: accepted)
    opt.step()
    del g["initial_lr"]
    g["weight_decy"] = 0.0  # the same number of keys as at the last check
    with pytest.raises(ValueError, match=r"'weight_decy' -> 'weight_decay'"):
        opt.step()


def test_a_group_appended_by_hand_with_a_misspelled_setting_is_refused():
    m = _model()
    opt = create_optimizer(m, "sm3", lr=1e-2)
    _backward(m)
    extra = nn.Parameter(torch.ones(3))
    extra.grad = torch.ones(3)
    opt.param_groups.append({**opt.param_groups[0], "params": [extra], "momentm": 0.5})
    with pytest.raises(ValueError, match=r"parameter group 2 of optimizer 'sm3' after construction \(did you mean "
                                         r"'momentm' -> 'momentum'\?\)"):
        opt.step()


def test_other_keys_written_later_are_accepted():
    m = _model()
    opt = create_optimizer(m, "fira_adamw", lr=1e-2, rank=2)
    _backward(m)
    opt.step()
    g = opt.param_groups[0]
    # timm's schedulers: initial_<field> of the setting they drive; a library's own tag far from every setting
    g["initial_weight_decay"] = 0.01
    g["warmup_initial_lr"] = g["warmup_max_lr"] = 1e-2  # (warm-up schedulers' copies of lr)
    g["my_tag"] = "decoder"
    g["layer_id"] = 3
    opt.step()
    ada = Adafactor(m.parameters())  # ('warmup_initial_lr' is difflib-close to Adafactor's 'warmup_init')
    ada.step()
    ada.param_groups[0]["warmup_initial_lr"] = 1e-3
    ada.step()


def _schedulers(opt):
    from torch.optim import lr_scheduler as L
    from torch.optim.swa_utils import SWALR
    from transformers import get_cosine_schedule_with_warmup

    return {
        "LambdaLR": lambda: L.LambdaLR(opt, lambda s: 0.9 ** s),
        "OneCycleLR": lambda: L.OneCycleLR(opt, max_lr=1e-2, total_steps=20),  # initial_lr, max_lr, min_lr, momenta
        "CyclicLR": lambda: L.CyclicLR(opt, 1e-3, 1e-2, step_size_up=2),
        "CosineAnnealingWarmRestarts": lambda: L.CosineAnnealingWarmRestarts(opt, T_0=2),
        "SequentialLR": lambda: L.SequentialLR(opt, [L.LinearLR(opt, 0.5, total_iters=2), L.ExponentialLR(opt, 0.9)],
                                               milestones=[2]),
        "ReduceLROnPlateau": lambda: L.ReduceLROnPlateau(opt, patience=0),
        "SWALR": lambda: SWALR(opt, swa_lr=1e-3, anneal_epochs=2),
        "cosine_with_warmup": lambda: get_cosine_schedule_with_warmup(opt, 2, 10),
    }


@pytest.mark.parametrize("name", ["adamw", "sm3"])
@pytest.mark.parametrize("which", ["LambdaLR", "OneCycleLR", "CyclicLR", "CosineAnnealingWarmRestarts", "SequentialLR",
                                   "ReduceLROnPlateau", "SWALR", "cosine_with_warmup"])
def test_schedulers_and_accelerate_still_step(name, which):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    m = _model()
    opt = create_optimizer(m, name, lr=1e-2)
    sched = _schedulers(opt)[which]()
    wrapped, wsched = acc.prepare_optimizer(opt), acc.prepare_scheduler(sched)  # AcceleratedOptimizer / -Scheduler
    for t in range(4):
        _backward(m, seed=t)
        wrapped.step()
        wsched.step(1.0) if which == "ReduceLROnPlateau" else wsched.step()
    assert opt.state  # stepped
    if which == "OneCycleLR":
        assert {"initial_lr", "max_lr", "min_lr"} <= set(opt.param_groups[0])


@pytest.mark.slow  # (8 s: a Trainer on the tiny model)
def test_a_plain_trainer_runs_relative_step_adafactor_with_adafactor_schedule(tmp_path):
    """transformers' documented way to train with Adafactor's own step size: ``optimizers=(Adafactor(...,
    relative_step=True), AdafactorSchedule(opt))`` on a plain Trainer, which logs the reported step size as the
    learning rate (lowmem's Trainer integration refuses relative_step: it builds its own scheduler)."""
    from transformers import Trainer, TrainingArguments, default_data_collator
    from transformers.optimization import AdafactorSchedule

    from lowmem.kit import build_tiny_model, sft_dataset, tokenize_sft

    model, tok = build_tiny_model(0)
    opt = Adafactor(model.parameters(), warmup_init=True)
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                             save_strategy="no", use_cpu=True, report_to="none", disable_tqdm=True,
                             dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=tokenize_sft(sft_dataset(16), tok),
                      data_collator=default_data_collator, optimizers=(opt, AdafactorSchedule(opt)))
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    # the Trainer logs the scheduler's last lr before its step: AdafactorSchedule's initial 0.0, then the reports
    # after steps 1 and 2 (warm-up: 1e-6 t times the first parameter's scale)
    assert lrs[0] == 0.0 and 0 < lrs[1] < lrs[2] < 1e-7, lrs
    assert lrs[2] / lrs[1] == pytest.approx(2.0, rel=0.05)
    assert opt.param_groups[0]["lr"] == pytest.approx(
        opt._get_lr(opt.param_groups[0], opt.state[opt.param_groups[0]["params"][0]]))  # (step 3's report)
