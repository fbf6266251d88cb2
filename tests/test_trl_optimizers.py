"""Every engine optimizer through a TRL trainer (the same mixin the HF Trainer path uses, tested over
the whole registry in test_trainer_hf.py): one SFT run of 2 steps per optimizer (a few in the default suite, all of
them in the slow set: DEFAULT below), the optimizer is
the registered recipe over exactly the trainable parameters, and parameters move. GRPO runs with the
optimizers that change how parameters are grouped or frozen (Muon's targets, Adam-mini's blocks,
BAdam's active block)."""

import pytest
import torch

from lowmem.optim import optimizer_entries
from suite_helpers import slow_beyond
from trl_helpers import inner_optimizer, make_trainer, trainable

ENGINE = [e.name for e in optimizer_entries() if e.recipe is not None]
# the default suite: one optimizer of each way the trainer builds groups (plain, subspace targets, quantized state,
# fused-in-backward LOMO, Adam-mini's blocks, Muon's targets, BAdam's active block); the slow set runs all of them
# (in the default suite, test_trainer_hf.py's test_cls_and_kwargs_rebuilds_create_optimizer builds every entry as the
# Trainer does, and test_optim_generic.py steps every one)
DEFAULT = ["adamw", "galore_adamw", "adamw8bit", "microadam", "adalomo", "adam_mini", "muon", "badam", "scale"]
LR = {"lomo": 0.1, "sgd_sm": 0.1, "adagrad_sn": 0.1, "adagrad_snsm": 0.1}


def _check(trainer, name):
    from lowmem.optim import LowMemOptimizer, get_entry

    before = trainable(trainer)
    trainer.train()
    opt = inner_optimizer(trainer)
    assert isinstance(opt, LowMemOptimizer) and opt.recipe is get_entry(name).recipe, type(opt)
    after = trainable(trainer)
    # (BAdam freezes the inactive blocks when it is built: compare what is trainable after)
    moved = [n for n in after if n in before and not torch.equal(before[n], after[n])]
    assert moved, f"{name}: no parameter moved"


def _rank_args(name: str) -> dict:
    """rank 16 where the recipe's default rank (128; APOLLO's 256) is above every side of the tiny model's weights
    (64 wide at most): such a rank applies nowhere and is an error."""
    from lowmem.optim import get_entry

    rank = {h.name: h.default for h in get_entry(name).recipe.group_hparams}.get("rank")
    return {"lowmem_optim_args": {"rank": 16}} if rank is not None and rank >= 64 else {}


@pytest.mark.parametrize("name", slow_beyond(ENGINE, DEFAULT))
def test_sft_with_every_engine_optimizer(name, tiny_model_path, tmp_path):
    _check(make_trainer("sft", tiny_model_path, str(tmp_path), 2, optim=name, lr=LR.get(name, 1e-2), **_rank_args(name)), name)


@pytest.mark.parametrize("name", ["muon", "adam_mini", "badam"])
def test_grpo_with_regrouping_optimizers(name, tiny_model_path, tmp_path):
    _check(make_trainer("grpo", tiny_model_path, str(tmp_path), 2, optim=name), name)
