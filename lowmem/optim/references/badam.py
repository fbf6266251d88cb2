"""Plain loop of BAdam (Luo et al. 2024) on one block (see the package docstring)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import Reference, register_reference


def badam(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
          weight_decay: float, switch_every: int, **_) -> list[Tensor]:
    """BAdam, Luo et al. 2024, Algorithm 1, for a parameter whose block is the only one (parameters
    given as a list form one block): ``K = switch_every`` AdamW steps (Loshchilov & Hutter 2019,
    Algorithm 2, torch's placement of eps and the decay), then the block is visited again with
    Adam's state started afresh (the authors clear it at every switch)::

        every K steps: m <- 0, v <- 0, t <- 0
        t <- t + 1 ;  p <- p (1 - lr wd)
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    (Several blocks, the order of the switches and ``requires_grad``: tests/test_badam.py.)
    """
    b1, b2 = betas
    out = []
    for k, g in enumerate(grads):
        if k % switch_every == 0:
            m, v, t = torch.zeros_like(p), torch.zeros_like(p), 0
        t += 1
        p = p * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        out.append(p)
    return out


register_reference("badam", Reference(badam, configs=(
    {"switch_every": 5},  # a restart at steps 6 and 11 (the spike at step 5 is the last of a visit)
    {"switch_every": 4, "lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
    {"switch_every": 1, "lr": 3e-3},  # every step a fresh Adam: lr * g / (|g| + eps)
    {},  # switch_every 100 > 12 steps: AdamW
)))
