"""Builders shared by the tests/test_trl_*.py files: every lowmem TRL trainer on the tiny task."""

from __future__ import annotations

from typing import Any

import torch

from lowmem.kit import preference_dataset, reward_dataset, reward_fn, sft_dataset
from lowmem.optim import LowMemOptimizer

RL_KINDS = ("grpo", "gvpo", "bnpo")
KINDS = ("sft", "dpo", *RL_KINDS)


def tiny_rank_args(optim: str) -> dict[str, Any]:
    """``lowmem_optim_args`` with rank 16 for a projection recipe whose default rank (128; APOLLO's 256) is at or
    above every side of the tiny model's weights (64 wide at most): such a rank applies nowhere, an error."""
    from lowmem.optim import get_entry

    entry = get_entry(optim)
    rank = {h.name: h.default for h in entry.recipe.group_hparams}.get("rank") if entry.recipe is not None else None
    return {"lowmem_optim_args": {"rank": 16}} if rank is not None and rank >= 64 else {}


def make_trainer(kind: str, model_path: str, output_dir: str, steps: int, *, lr: float = 1e-2, peft_config: Any = None,
                 optim: str | None = "adafactor", eval_dataset: bool = False, **overrides: Any):
    from lowmem.trainers import (
        BNPOConfig, BNPOTrainer, GVPOConfig, GVPOTrainer, LowMemDPOConfig, LowMemDPOTrainer, LowMemGRPOConfig,
        LowMemGRPOTrainer, LowMemSFTConfig, LowMemSFTTrainer,
    )

    classes = {
        "sft": (LowMemSFTConfig, LowMemSFTTrainer), "dpo": (LowMemDPOConfig, LowMemDPOTrainer),
        "grpo": (LowMemGRPOConfig, LowMemGRPOTrainer), "gvpo": (GVPOConfig, GVPOTrainer), "bnpo": (BNPOConfig, BNPOTrainer),
    }
    config_cls, trainer_cls = classes[kind]
    fields = dict(
        output_dir=output_dir, lowmem_optim=optim, learning_rate=lr, max_steps=steps, per_device_train_batch_size=8,
        logging_steps=1, bf16=False, report_to="none", seed=0, save_strategy="no", dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    if kind in RL_KINDS:
        fields.update(num_generations=4, max_completion_length=6, per_device_eval_batch_size=8)
    if eval_dataset:
        fields.update(eval_strategy="steps", eval_steps=steps)
    fields.update(overrides)
    if optim is not None and "lowmem_optim_args" not in overrides:
        fields.update(tiny_rank_args(optim))
    args = config_cls(**fields)
    kw: dict[str, Any] = dict(model=model_path, args=args, peft_config=peft_config)
    if kind == "sft":
        kw.update(train_dataset=sft_dataset(256, 0), eval_dataset=sft_dataset(16, 0, "eval") if eval_dataset else None)
    elif kind == "dpo":
        kw.update(train_dataset=preference_dataset(256, 0),
                  eval_dataset=(preference_dataset(16, 0, "eval") if eval_dataset != "train" else preference_dataset(64, 0)) if eval_dataset else None)
    else:
        kw.update(reward_funcs=reward_fn, train_dataset=reward_dataset(256, 0),
                  eval_dataset=reward_dataset(8, 0, "eval") if eval_dataset else None)
    return trainer_cls(**kw)


def inner_optimizer(trainer) -> torch.optim.Optimizer:
    """The optimizer under accelerate's wrapper."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def assert_lowmem_optimizer(trainer, name: str = "adafactor") -> None:
    from lowmem.optim import get_entry

    opt = inner_optimizer(trainer)
    assert isinstance(opt, LowMemOptimizer), type(opt)
    assert opt.recipe is get_entry(name).recipe
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    wanted = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert held == wanted  # exactly the trainable parameters (adapter only under LoRA)


def metric_series(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def sft_warm_model(model_path: str, output_dir: str, steps: int = 30, lr: float = 1e-2) -> str:
    """A base for LoRA runs: the tiny model after a short full SFT on the addition text (saved to
    ``output_dir``). The freshly initialised tiny model predicts a near-uniform distribution
    through a near-zero ``lm_head``, which a LoRA adapter on the blocks can barely move; adapters
    are trained on top of a (briefly) trained model, as in practice."""
    import contextlib
    import io

    trainer = make_trainer("sft", model_path, output_dir, steps, lr=lr, per_device_train_batch_size=16, logging_steps=steps)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    trainer.save_model(output_dir)
    trainer.processing_class.save_pretrained(output_dir)
    return output_dir
