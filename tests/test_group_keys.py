"""Parameter-group keys are checked like constructor arguments (lowmem.optim.hparams.check_group_keys):
an unknown key is a ValueError naming the valid ones, never a silently ignored setting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.optim import GaLoreAdamW, create_optimizer, get_entry, optimizer_entries
from lowmem.optim.hparams import GROUP_BOOKKEEPING_KEYS, check_group_keys, valid_group_keys

ENGINE = [e.name for e in optimizer_entries() if e.recipe is not None]


class Checked(GaLoreAdamW):
    """GaLoreAdamW with the two-line call the engine's add_param_group makes (see the report of issue 11)."""

    def add_param_group(self, param_group):
        check_group_keys(self.recipe, param_group, where=f"parameter group {len(self.param_groups)}")
        super().add_param_group(param_group)


def _params():
    return [nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(6))]


@pytest.mark.parametrize("key,suggestion", [("rnak", "rank"), ("update_proj_gaps", "update_proj_gap"), ("lr_", "lr")])
def test_unknown_group_key_is_an_error_naming_the_valid_ones(key, suggestion):
    group = {"params": _params(), "rank": 2, key: 8}
    with pytest.raises(ValueError) as err:
        check_group_keys(get_entry("galore_adamw").recipe, group, where="parameter group 0")
    msg = str(err.value)
    assert repr(key) in msg and f"-> {suggestion!r}" in msg and "valid:" in msg and "'update_proj_gap'" in msg
    assert "parameter group 0" in msg and "galore_adamw" in msg
    with pytest.raises(ValueError, match=key):
        Checked([{"params": _params(), key: 8}])


def test_valid_keys_are_hparams_engine_group_and_bookkeeping():
    recipe = get_entry("galore_adamw").recipe
    valid = set(valid_group_keys(recipe))
    assert {"lr", "betas", "eps", "weight_decay", "state_dtype", "foreach", "rank", "update_proj_gap", "scale",
            "proj_type"} <= valid
    assert set(GROUP_BOOKKEEPING_KEYS) <= valid and "alpha" not in valid
    check_group_keys(recipe, {"params": _params(), "name": "attention", "rank": 4, "update_proj_gap": 50, "lr": 0.1})
    check_group_keys(recipe, {"params": _params(), "alpha": 0.5}, extra=("alpha",))  # fira's alias, when a class translates it
    with pytest.raises(ValueError, match="alpha"):
        check_group_keys(recipe, {"params": _params(), "alpha": 0.5})
    with pytest.raises(ValueError, match="rank"):  # rank is not a hyperparameter of AdamW
        check_group_keys(get_entry("adamw").recipe, {"params": _params(), "rank": 4})


@pytest.mark.parametrize("name", ENGINE)
def test_groups_lowmem_builds_pass(name):
    """create_optimizer's groups, and the ones optimizer_cls_and_kwargs hands the Trainer, carry only valid keys."""
    from transformers import TrainingArguments

    from lowmem.trainers.hf import optimizer_cls_and_kwargs

    entry = get_entry(name)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    opt = create_optimizer(model, name, **entry.example_hparams)
    for i, g in enumerate(opt.param_groups):
        check_group_keys(entry.recipe, g, where=f"group {i}")
    hp = {k: v for k, v in entry.example_hparams.items() if k != "lr"}
    args = TrainingArguments("unused", learning_rate=1e-2, report_to=[])
    cls, kwargs = optimizer_cls_and_kwargs(model, name, args=args, **hp)
    params = kwargs.pop("params")  # what the Trainer does with them
    opt = cls(params, **kwargs)
    for i, g in enumerate(opt.param_groups):
        check_group_keys(entry.recipe, g, where=f"group {i}")


def test_the_trainer_adds_no_group_keys(tmp_path):
    """transformers.Trainer(optimizer_cls_and_kwargs=...) builds the optimizer from lowmem's groups as given."""
    from transformers import Trainer, TrainingArguments

    from lowmem.kit import build_tiny_model
    from lowmem.trainers.hf import optimizer_cls_and_kwargs

    model, _ = build_tiny_model(seed=0)
    args = TrainingArguments(tmp_path, learning_rate=1e-3, report_to=[], max_steps=1, use_cpu=True)
    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, "galore_adamw", args=args, rank=4))
    opt = trainer.create_optimizer()
    recipe = get_entry("galore_adamw").recipe
    assert {k for g in opt.param_groups for k in g} <= set(valid_group_keys(recipe))
    trainer.create_scheduler(num_training_steps=1, optimizer=opt)
    for g in opt.param_groups:  # the scheduler's initial_lr; a group copied from another carries it
        check_group_keys(recipe, {**g, "params": _params()})


def test_scheduler_keys_pass():
    """torch's schedulers write into the groups; a group copied from one (``{**g, "params": new}``) is valid."""
    from lowmem.optim import AdamW

    opt = AdamW(_params(), lr=0.1)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    torch.optim.swa_utils.SWALR(opt, swa_lr=0.05)
    assert {"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr"} <= set(opt.param_groups[0])
    check_group_keys(AdamW.recipe, {**opt.param_groups[0], "params": _params()})


def test_engine_rejects_a_misspelled_group_key():
    with pytest.raises(ValueError, match="rnak"):
        GaLoreAdamW([{"params": _params(), "rnak": 8}])
    with pytest.raises(ValueError, match="update_proj_gaps"):
        GaLoreAdamW([{"params": _params(), "rank": 2, "update_proj_gaps": 5}])
    opt = GaLoreAdamW([{"params": _params(), "rank": 2}])
    with pytest.raises(ValueError, match="rnak"):
        opt.add_param_group({"params": _params(), "rnak": 2})
    assert len(opt.param_groups) == 1  # the rejected group was not added
