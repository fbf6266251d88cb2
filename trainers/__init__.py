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

# TRL trainers with lowmem optimizers (:mod:`.trl`), GVPO (:mod:`.gvpo`) and BNPO (:mod:`.bnpo`).
from .bnpo import BNPOConfig, BNPOTrainer, bnpo_advantages  # noqa: E402
from .gvpo import GVPOConfig, GVPOTrainer, gvpo_loss  # noqa: E402
from .trl import (  # noqa: E402
    LowMemDPOConfig,
    LowMemDPOTrainer,
    LowMemGRPOConfig,
    LowMemGRPOTrainer,
    LowMemSFTConfig,
    LowMemSFTTrainer,
)

__all__ += [
    "BNPOConfig", "BNPOTrainer", "bnpo_advantages", "GVPOConfig", "GVPOTrainer", "gvpo_loss",
    "LowMemDPOConfig", "LowMemDPOTrainer", "LowMemGRPOConfig", "LowMemGRPOTrainer", "LowMemSFTConfig", "LowMemSFTTrainer",
]
