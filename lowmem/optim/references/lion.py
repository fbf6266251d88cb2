"""Plain loops of Lion and Lion with an 8-bit momentum, written from the paper (see the package docstring).

Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2 (Program 1 in code).
The 8-bit momentum uses bitsandbytes' block-wise codec and signed dynamic map, called directly (the
storage format is bitsandbytes' ``Lion8bit``'s, Dettmers et al. 2022 Section 2); the momentum that is
stored is computed as ``m * b2 + g * (1 - b2)`` with ``add(alpha=...)``, the one float order that
reproduces the stored codes bit for bit (as references/compressed.py does for Adam's moments). The
step around it is written freely.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import Reference, register_reference


def lion(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], weight_decay: float,
         **_) -> list[Tensor]:
    """Lion, Algorithm 2::

        c <- b1 m + (1 - b1) g                  (line 5)
        p <- p - lr (sign(c) + wd p)            (line 6; = p (1 - lr wd) - lr sign(c))
        m <- b2 m + (1 - b2) g                  (line 7)
    """
    b1, b2 = betas
    m, out = torch.zeros_like(p), []
    for g in grads:
        c = b1 * m + (1 - b1) * g
        p = p - lr * (torch.sign(c) + weight_decay * p)
        m = b2 * m + (1 - b2) * g
        out.append(p)
    return out


def lion8bit(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float],
             weight_decay: float, block_size: int, min_quant_size: int, **_) -> list[Tensor]:
    """:func:`lion` with ``m`` stored as 8-bit codes of blocks of ``block_size`` (absmax per block, signed
    dynamic map) when ``p`` has at least ``min_quant_size`` elements: decoded before the step, encoded after."""
    import bitsandbytes.functional as bnbF

    b1, b2 = betas
    quantize = p.numel() >= min_quant_size
    code = bnbF.create_dynamic_map(signed=True)
    m, out = torch.zeros_like(p), []
    for g in grads:
        c = b1 * m + (1 - b1) * g
        p = p - lr * (torch.sign(c) + weight_decay * p)
        m = torch.add(m * b2, g, alpha=1 - b2)
        if quantize:
            codes, state = bnbF.quantize_blockwise(m.flatten(), code=code, blocksize=block_size)
            m = bnbF.dequantize_blockwise(codes, state).view(p.shape)
        out.append(p)
    return out


register_reference("lion", Reference(lion, configs=(
    {},
    {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.5},
    {"lr": 1e-2, "betas": (0.0, 0.99), "weight_decay": 0.1},  # beta1 = 0: sign of the gradient alone
    {"lr": 1e-3, "betas": (0.95, 0.0)},  # beta2 = 0: the momentum is the last gradient
)))

register_reference("lion8bit", Reference(lion8bit, configs=(
    {"min_quant_size": 64, "block_size": 64},
    {"min_quant_size": 64, "block_size": 256, "lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.5},
    {},  # every tensor of the suite under min_quant_size: float32 momentum
)))
