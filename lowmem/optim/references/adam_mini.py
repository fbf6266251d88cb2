"""Plain loop of Adam-mini, written from its paper (see the package docstring)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import Reference, register_reference


def adam_mini(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
              weight_decay: float, block: str, head_dim: int | None, **_) -> list[Tensor]:
    """Adam-mini, Zhang et al. 2024, Algorithm 1, on one tensor cut into contiguous blocks of
    ``size`` elements (one element; one row of the last dimension; ``head_dim`` rows; the tensor)::

        p <- p (1 - lr wd)
        m <- b1 m + (1 - b1) g ;  v_b <- b2 v_b + (1 - b2) mean(g_b^2)   (one v per block)
        p_b <- p_b - lr (m_b / (1 - b1^t)) / (sqrt(v_b / (1 - b2^t)) + eps)
    """
    b1, b2 = betas
    row = p.shape[-1] if p.dim() else 1
    size = {"element": 1, "row": row, "head": (head_dim or 0) * row, "tensor": p.numel()}[block]
    m, v, out = torch.zeros_like(p), torch.zeros(p.numel() // size), []
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        gb = g.reshape(-1, size)
        v = b2 * v + (1 - b2) * (gb * gb).mean(dim=1)
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        step = m_hat.reshape(-1, size) / (v_hat.sqrt() + eps).unsqueeze(1)
        p = p - lr * step.reshape(p.shape)
        out.append(p)
    return out


# a wide and a tall matrix and a 3-D tensor: every block kind applies to each (head_dim 4 divides 24, 40 and 8)
register_reference("adam_mini", Reference(adam_mini, shapes=((24, 40), (40, 24), (2, 8, 5)), configs=(
    {},  # one block per tensor (plain parameters)
    {"block": "row", "lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
    {"block": "head", "head_dim": 4, "lr": 3e-3, "weight_decay": 0.01},
    {"block": "element", "lr": 3e-3, "betas": (0.0, 0.99)},
)))
