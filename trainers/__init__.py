"""Hugging Face and TRL integration, installed as ``lowmem.trainers``.

* :mod:`.hf` - ``transformers.Trainer``: :func:`optimizer_cls_and_kwargs`, :class:`LowMemTrainer`,
  :class:`LowMemTrainingArguments`, :class:`LowMemOptimizerMixin` (reusable by TRL trainers).
"""

from .hf import (
    LowMemArguments,
    LowMemOptimizerMixin,
    LowMemTrainer,
    LowMemTrainingArguments,
    optimizer_cls_and_kwargs,
    parse_optim_args,
    trainer_hparams,
)

__all__ = [
    "LowMemArguments",
    "LowMemOptimizerMixin",
    "LowMemTrainer",
    "LowMemTrainingArguments",
    "optimizer_cls_and_kwargs",
    "parse_optim_args",
    "trainer_hparams",
]
