"""Plain loops of LOMO and AdaLomo (Lv et al. 2023, 2024), written from the papers' Algorithm 1 and
the authors' ``lomo-optim`` 0.1.1 (see the package docstring)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import Reference, register_reference


def lomo(p: Tensor, grads: list[Tensor], *, index: int, lr: float, weight_decay: float, **_) -> list[Tensor]:
    """LOMO, Lv et al. 2023, Algorithm 1 (SGD on each parameter as its gradient arrives), with
    ``lomo-optim``'s decoupled weight decay before the step::

        p <- p (1 - lr wd) ;  p <- p - lr g
    """
    out = []
    for g in grads:
        p = p * (1 - lr * weight_decay)
        p = p - lr * g
        out.append(p)
    return out


register_reference("lomo", Reference(lomo, configs=(
    {},
    {"lr": 0.1, "weight_decay": 0.5},
    {"lr": 1e-2, "weight_decay": 0.0},
)))


def adalomo(p: Tensor, grads: list[Tensor], *, index: int, lr: float, eps: tuple[float, float], clip_threshold: float,
            decay_rate: float, weight_decay: float, **_) -> list[Tensor]:
    """AdaLomo, Lv et al. 2024, Algorithm 1, with ``lomo-optim`` 0.1.1's constants::

        beta_t = 1 - t^c                                   (c = decay_rate = -0.8)
        r_t = beta_t r_{t-1} + (1 - beta_t) (g^2 + eps1) 1_m    row sums   (matrices)
        c_t = beta_t c_{t-1} + (1 - beta_t) 1_n^T (g^2 + eps1)  column sums
        v_t = r_t c_t / (1_n^T r_t)        (vectors: v_t = beta_t v_{t-1} + (1 - beta_t)(g^2 + eps1))
        u_t = g / sqrt(v_t)
        u_t <- u_t / max(1, RMS(u_t) / d)                   grouped update normalization, part 1
        a_t = lr max(eps2, RMS(theta_{t-1}))                grouped update normalization, part 2
        theta_t = theta_{t-1} (1 - a_t wd) - a_t u_t        (lomo-optim: decay before the step)

    Sums, as in the paper (lomo-optim keeps means: the same ratio).
    """
    eps1, eps2 = eps
    matrix = p.dim() >= 2
    if matrix:
        r = torch.zeros(p.shape[:-1])
        c = torch.zeros(p.shape[:-2] + p.shape[-1:])
    else:
        v = torch.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        beta = 1.0 - t**decay_rate
        g2 = g * g + eps1
        if matrix:
            r = beta * r + (1 - beta) * g2.sum(dim=-1)
            c = beta * c + (1 - beta) * g2.sum(dim=-2)
            v_hat = r.unsqueeze(-1) * c.unsqueeze(-2) / r.sum(dim=-1, keepdim=True).unsqueeze(-1)
        else:
            v = beta * v + (1 - beta) * g2
            v_hat = v
        u = g / v_hat.sqrt()
        rms_u = u.pow(2).mean().sqrt()
        u = u / max(1.0, float(rms_u) / clip_threshold)
        a = lr * max(eps2, float(p.pow(2).mean().sqrt()))
        p = p * (1 - a * weight_decay) - a * u
        out.append(p)
    return out


register_reference("adalomo", Reference(adalomo, shapes=((24, 40), (40, 24), (40,), (3, 8, 10)), configs=(
    {},
    {"lr": 1e-2, "weight_decay": 0.1, "clip_threshold": 0.5},
    # a large eps2 (the parameter-scale floor binds) and a slower statistic (c = -0.5)
    {"lr": 5e-3, "eps": (1e-20, 10.0), "decay_rate": -0.5},
    {"lr": 1e-3, "eps": (1e-3, 1e-3), "clip_threshold": 100.0},  # eps1 visible; clipping never binds
)))

