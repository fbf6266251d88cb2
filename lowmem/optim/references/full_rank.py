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


def adafactor(p: Tensor, grads: list[Tensor], *, index: int, lr: float | None, eps: tuple[float, float],
              clip_threshold: float, decay_rate: float, beta1: float | None, weight_decay: float,
              scale_parameter: bool, relative_step: bool, warmup_init: bool, **_) -> list[Tensor]:
    """Adafactor, Shazeer & Stern 2018: Algorithm 4 (matrices: the last two dimensions, leading ones
    are a batch) and Algorithm 5 (vectors: a full second moment), with Sections 6-8 and the optional
    first moment as transformers' ``Adafactor`` (the parity peer) and tensor2tensor run it::

        rho_t   = min(1e-2, 1/sqrt(t))      (relative_step; min(1e-6 t, 1/sqrt(t)) with warmup_init;
                                             else the external lr)                          Sec. 8
        alpha_t = max(eps2, RMS(X_{t-1})) rho_t  (scale_parameter; else rho_t)              Sec. 8
        beta2_t = 1 - t^c                   (c = decay_rate)                                Sec. 7.2
        R_t = beta2_t R_{t-1} + (1 - beta2_t) (G^2 + eps1) 1_m        (row sums)           Alg. 4 l.5
        C_t = beta2_t C_{t-1} + (1 - beta2_t) 1_n^T (G^2 + eps1)      (column sums)        Alg. 4 l.6
        V_t = R_t C_t / (1_n^T R_t)        (vectors: V_t = beta2_t V_{t-1} + (1 - beta2_t)(G^2 + eps1))
        U_t = G / sqrt(V_t) ;  U_t <- U_t / max(1, RMS(U_t) / d)                           Sec. 6, eq. 12
        M_t = beta1 M_{t-1} + (1 - beta1) alpha_t U_t   (beta1 set; else M_t = alpha_t U_t)
        X_t = X_{t-1} - wd alpha_t X_{t-1} - M_t

    The statistics are sums as in the paper (the implementation keeps means: the same ratio). The
    parameter scale is read before the weight decay of the step, and the decay uses ``alpha_t``
    (transformers' placement; docs/optimizers.md).
    """
    eps1, eps2 = eps
    factored = p.dim() >= 2
    if factored:
        row = torch.zeros(p.shape[:-1])
        col = torch.zeros(p.shape[:-2] + p.shape[-1:])
    else:
        v = torch.zeros_like(p)
    m = torch.zeros_like(p) if beta1 is not None else None
    out = []
    for t, g in enumerate(grads, start=1):
        if relative_step:
            rho = min(1e-6 * t if warmup_init else 1e-2, 1.0 / math.sqrt(t))
        else:
            rho = lr
        alpha = max(eps2, p.square().mean().sqrt().item()) * rho if scale_parameter else rho
        beta2t = 1.0 - t**decay_rate
        g2 = g * g + eps1
        if factored:
            row = beta2t * row + (1 - beta2t) * g2.sum(dim=-1)
            col = beta2t * col + (1 - beta2t) * g2.sum(dim=-2)
            v_hat = row.unsqueeze(-1) * col.unsqueeze(-2) / row.sum(dim=-1, keepdim=True).unsqueeze(-1)
        else:
            v = beta2t * v + (1 - beta2t) * g2
            v_hat = v
        u = g / v_hat.sqrt()
        u = u / max(1.0, u.square().mean().sqrt().item() / clip_threshold)
        step = alpha * u
        if m is not None:
            m = beta1 * m + (1 - beta1) * step
            step = m
        p = p - weight_decay * alpha * p - step
        out.append(p)
    return out


register_reference("adafactor", Reference(adafactor, shapes=((24, 40), (40, 24), (40,), (3, 8, 10)), configs=(
    {},  # relative step, parameter scaling, no first moment
    {"beta1": 0.9, "weight_decay": 0.1, "clip_threshold": 0.05},  # first moment; the clipping bites every step
    {"lr": 3e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.5, "decay_rate": -0.5},
    # warmup_init: rho = 1e-6 t; eps2 = 1e3 far above RMS(X) ~ 1: the floor sets the scale (steps ~1e-3 t)
    {"warmup_init": True, "eps": (1e-20, 1e3), "weight_decay": 0.01},
)))
