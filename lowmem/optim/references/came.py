"""Plain loop of CAME (Luo et al., ACL 2023), written from the paper's algorithm (see the package docstring)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import Reference, register_reference


def came(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float, float],
         eps: tuple[float, float], clip_threshold: float, weight_decay: float, **_) -> list[Tensor]:
    """CAME, Luo et al. 2023 (the algorithm "CAME Optimizer"), on the last two dimensions of a matrix
    (leading ones are a batch), with sums as in the paper::

        r_t = b2 r_{t-1} + (1 - b2) (G^2 + eps1) 1_m ;  c_t = b2 c_{t-1} + (1 - b2) 1_n^T (G^2 + eps1)
        v_t = r_t c_t / (1_n^T r_t) ;  u_t = G / sqrt(v_t) ;  u^_t = u_t / max(1, RMS(u_t) / d)
        m_t = b1 m_{t-1} + (1 - b1) u^_t ;  U_t = (u^_t - m_t)^2
        R_t = b3 R_{t-1} + (1 - b3) (U_t + eps2) 1_m ;  C_t = b3 C_{t-1} + (1 - b3) 1_n^T (U_t + eps2)
        S_t = R_t C_t / (1_n^T R_t) ;  theta_t = theta_{t-1} (1 - lr wd) - lr m_t / sqrt(S_t)

    A vector (the paper treats matrices only), as the authors' ``came_pytorch`` 0.1.3: a full
    ``v_t = b2 v_{t-1} + (1 - b2)(G^2 + eps1)`` and the step ``lr m_t`` (no confidence). The decoupled
    decay ``lr wd theta`` is the authors' (``p -= wd lr p``, before the update).
    """
    b1, b2, b3 = betas
    eps1, eps2 = eps
    matrix = p.dim() >= 2
    m = torch.zeros_like(p)
    if matrix:
        rows, cols = p.shape[:-1], p.shape[:-2] + p.shape[-1:]
        r, c, big_r, big_c = torch.zeros(rows), torch.zeros(cols), torch.zeros(rows), torch.zeros(cols)
    else:
        v = torch.zeros_like(p)

    def outer(a: Tensor, b: Tensor) -> Tensor:  # a_i b_j / sum_i a_i, per matrix of the batch
        return a.unsqueeze(-1) * b.unsqueeze(-2) / a.sum(dim=-1, keepdim=True).unsqueeze(-1)

    out = []
    for g in grads:
        g2 = g * g + eps1
        if matrix:
            r = b2 * r + (1 - b2) * g2.sum(dim=-1)
            c = b2 * c + (1 - b2) * g2.sum(dim=-2)
            v_t = outer(r, c)
        else:
            v = b2 * v + (1 - b2) * g2
            v_t = v
        u = g / v_t.sqrt()
        u = u / max(1.0, u.square().mean().sqrt().item() / clip_threshold)
        m = b1 * m + (1 - b1) * u
        if matrix:
            big_u = (u - m) ** 2 + eps2
            big_r = b3 * big_r + (1 - b3) * big_u.sum(dim=-1)
            big_c = b3 * big_c + (1 - b3) * big_u.sum(dim=-2)
            step = m / outer(big_r, big_c).sqrt()
        else:
            step = m
        p = p - lr * weight_decay * p - lr * step
        out.append(p)
    return out


register_reference("came", Reference(came, shapes=((24, 40), (40, 24), (40,), (3, 8, 10)), configs=(
    {},  # the authors' defaults: lr 2e-4, betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16), d = 1
    {"lr": 1e-2, "betas": (0.8, 0.95, 0.99), "weight_decay": 0.1, "clip_threshold": 0.05},  # clipping bites every step
    {"lr": 3e-3, "eps": (1e-3, 1e-2), "clip_threshold": 100.0},  # both eps visible; clipping never binds
    {"lr": 1e-3, "betas": (0.0, 0.5, 0.0), "eps": (1e-30, 1.0), "weight_decay": 0.5},  # no memory: U = 0, S = eps2
)))
