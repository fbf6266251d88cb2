"""Plain loops of the full-rank recipes, written from their papers (see the package docstring)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import Reference, register_reference


def adamw(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
          weight_decay: float, **_) -> list[Tensor]:
    """AdamW, Loshchilov & Hutter 2019, Algorithm 2 (torch's placement of eps and the decay)::

        p <- p (1 - lr wd)
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """
    b1, b2 = betas
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
        out.append(p)
    return out


register_reference("adamw", Reference(adamw, configs=(
    {},
    {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
    {"lr": 3e-3, "weight_decay": 0.0, "betas": (0.0, 0.99)},
)))
