"""Plain loop of StableAdamW, written from Wortsman et al. 2023, Algorithm 2 (with torch-optimi's ``decouple_lr``)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import Reference, register_reference


def stable_adamw(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, decouple_lr: bool, max_lr: float | None, **_) -> list[Tensor]:
    """``b_hat = b (1 - b^(t-1)) / (1 - b^t)``; ``m, v`` EMAs with ``b_hat``; ``RMS = sqrt(mean(g^2 / max(v, eps^2)))``;
    ``eta = lr / max(1, RMS)``; ``p <- p - eta wd p - eta m / (sqrt(v) + eps)`` (``decouple_lr``: ``(eta / max_lr) wd``)."""
    b1, b2 = betas
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    for t, g in enumerate(grads, start=1):
        b1h = b1 * (1 - b1 ** (t - 1)) / (1 - b1**t)
        b2h = b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)
        m = b1h * m + (1 - b1h) * g
        v = b2h * v + (1 - b2h) * g * g
        rms = float((g * g / torch.clamp(v, min=eps * eps)).mean().sqrt())
        eta = lr / max(1.0, rms)
        decay = eta / max_lr * weight_decay if decouple_lr else eta * weight_decay
        p = p - decay * p - eta * m / (v.sqrt() + eps)
        out.append(p)
    return out


register_reference("stable_adamw", Reference(stable_adamw, configs=(
    {},
    {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1},
    {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 1e-4, "decouple_lr": True, "max_lr": 1e-2},
    {"lr": 1e-3, "betas": (0.0, 0.5), "eps": 1e-3},  # beta1 = 0: the gradient itself; a large eps floor
)))
