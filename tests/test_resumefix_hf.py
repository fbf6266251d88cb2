"""RESUMEFIX: resume checks of schedules that are not a LambdaLR (AUDIT-RESUME18 2; the Trainer-level test is
tests/test_audit18_resume.py::test_plateau_resume_with_other_lr_refused, slow): lowmem.trainers.hf.plateau_mismatch on
the schedulers' real state dicts."""

from __future__ import annotations

import pytest
import torch
from transformers.optimization import get_scheduler

from lowmem.trainers.hf import plateau_mismatch


def _state(name, **kwargs):
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1e-2)
    return get_scheduler(name, opt, num_warmup_steps=0, num_training_steps=4, scheduler_specific_kwargs=kwargs).state_dict()


@pytest.mark.parametrize("name", ["reduce_lr_on_plateau", "greedy"])
def test_plateau_settings_and_rates_compared(name):
    same = _state(name, patience=10)
    assert plateau_mismatch([0.01], [0.01], same, _state(name, patience=10)) is None
    assert plateau_mismatch([0.01], [None], same, same) is None  # a checkpoint without initial_lr: not compared
    msg = plateau_mismatch([0.05], [0.01], same, same)
    assert "0.05" in msg and "0.01" in msg
    msg = plateau_mismatch([0.01], [0.01], _state(name, patience=0, factor=0.5), _state(name, patience=10, factor=0.25))
    assert "patience=10 (this run: 0)" in msg and "factor=0.25 (this run: 0.5)" in msg


def test_a_lambda_schedule_checkpoint_is_another_lr_scheduler_type():
    msg = plateau_mismatch([0.01], [0.01], _state("reduce_lr_on_plateau"), _state("cosine"))
    assert "lr_scheduler_type" in msg
