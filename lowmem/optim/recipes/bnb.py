"""bitsandbytes' own optimizers, registered by name for comparison with the engine's recipes.

These are not engine optimizers (no meta-device accounting, no generic suite); their state is
sized by :func:`state_bytes_closed_form`, which follows ``bitsandbytes.optim.optimizer.
Optimizer2State.init_state`` (0.50): two uint8 states plus one float32 absmax per 256-element
block for tensors of at least ``min_8bit_size`` elements (two float32 states below it), and the
two shared 256-entry quantization maps. Paged variants allocate the same bytes in unified
(pageable) memory on CUDA.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from ..registry import register

_HPARAMS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "min_8bit_size", "percentile_clipping", "block_wise")

# name -> (bitsandbytes class name, state bits, paged)
BNB_OPTIMIZERS = {
    "bnb_adamw8bit": ("AdamW8bit", 8, False),
    "bnb_paged_adamw8bit": ("PagedAdamW8bit", 8, True),
    "bnb_paged_adamw": ("PagedAdamW", 32, True),
}


def _factory(class_name: str):
    def build(params: Iterable[Any], **hparams: Any) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        return getattr(bnb.optim, class_name)(params, **hparams)

    build.__name__ = f"bnb_{class_name}"
    return build


def state_bytes_closed_form(name: str, params: Iterable[torch.Tensor], min_8bit_size: int = 4096, **_: Any) -> int:
    """Bytes of a bitsandbytes optimizer's state for ``params``, without building it.

    Args:
        name (`str`): One of :data:`BNB_OPTIMIZERS`.
        params (`Iterable[torch.Tensor]`): The trained parameters (meta tensors are fine).
        min_8bit_size (`int`, defaults to `4096`): Smaller tensors keep float32 states, as in
            bitsandbytes.
    """
    if name not in BNB_OPTIMIZERS:
        raise ValueError(f"Unknown bitsandbytes optimizer {name!r}; valid: {sorted(BNB_OPTIMIZERS)}")
    bits = BNB_OPTIMIZERS[name][1]
    total, any_8bit = 0, False
    for p in params:
        n = p.numel()
        if bits == 8 and n >= min_8bit_size:
            total += 2 * n + 2 * 4 * math.ceil(n / 256)
            any_8bit = True
        else:
            total += 8 * n
    return total + (2 * 256 * 4 if any_8bit else 0)


for _name, (_cls, _bits, _paged) in BNB_OPTIMIZERS.items():
    register(
        _name,
        _factory(_cls),
        summary=f"bitsandbytes {_cls} ({_bits}-bit states{', paged' if _paged else ''}), for comparison",
        reference="Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization (bitsandbytes)",
        hparams=_HPARAMS,
        generic_tests=False,
        state_precision="8bit" if _bits == 8 else "fp32",
        second_moment="full",
    )
