"""Plain loop of RACS (Gong, Scetbon, Ma & Meeds 2025, arXiv:2502.07752), written from the paper's RACS algorithm
with the statistics as means and ``eps`` placed as pytorch_optimizer's ``RACS`` (see
:mod:`lowmem.optim.functional.racs`), in float64 matrix form: ``diag(G G^T)``, ``diag(G^T G)`` and the two diagonal
matrices multiplied out."""

from __future__ import annotations

import torch
from torch import Tensor

from . import Reference, register_reference


def _as_matrix(x: Tensor) -> Tensor:
    """A matrix itself; more dimensions ``[shape[0], -1]``; a vector a column; a 0-d tensor ``[1, 1]``."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.dim() == 1:
        return x.reshape(-1, 1)
    return x.reshape(x.shape[0], -1)


def racs(p: Tensor, grads: list[Tensor], *, index: int, lr: float, beta: float, alpha: float, gamma: float,
         eps: float, weight_decay: float, **_) -> list[Tensor]:
    """RACS from ``q_0 = 0``, ``s_0 = 1`` (pytorch_optimizer's start), every step::

        q_t = beta q_{t-1} + (1 - beta) diag(G G^T) / n          (rows)
        s_t = beta s_{t-1} + (1 - beta) diag(G^T G) / m          (columns)
        G~  = Q^-1/2 G S^-1/2,   Q = diag(q_t + eps), S = diag(s_t + eps)
        eta = 1 (first step) or min(1, gamma phi' / ||G~||),  phi' = phi_{t-1} + eps   (norm-growth limiter)
        phi_t = eta ||G~||
        W <- W - lr wd W - lr alpha eta G~                       (decoupled decay, before the update)
    """
    shape, dtype = p.shape, p.dtype
    w = _as_matrix(p.double())
    m, n = w.shape
    q, s, phi = torch.zeros(m, dtype=torch.float64), torch.ones(n, dtype=torch.float64), 0.0  # q_0 = 0, s_0 = 1
    out = []
    for t, g in enumerate(grads, start=1):
        gm = _as_matrix(g.double())
        q = beta * q + (1 - beta) * torch.diagonal(gm @ gm.T) / n
        s = beta * s + (1 - beta) * torch.diagonal(gm.T @ gm) / m
        g_tilde = torch.diag((q + eps) ** -0.5) @ gm @ torch.diag((s + eps) ** -0.5)
        norm = float(torch.linalg.matrix_norm(g_tilde))  # Frobenius
        eta = 1.0 if t == 1 else min(1.0, gamma * (phi + eps) / norm) if norm > 0 else 1.0
        phi = eta * norm
        w = w - lr * weight_decay * w - lr * alpha * eta * g_tilde
        out.append(w.reshape(shape).to(dtype))
    return out


register_reference("racs", Reference(racs, shapes=((24, 40), (40, 24), (40,), (3, 8, 10), ()), configs=(
    {},  # pytorch_optimizer's defaults: lr 1e-3, beta 0.9, alpha 0.05, gamma 1.01, eps 1e-8
    {"lr": 1e-2, "weight_decay": 0.1},
    {"lr": 3e-2, "beta": 0.5, "alpha": 0.2, "gamma": 1.5, "eps": 1e-3},  # a looser limiter; eps visible
    {"lr": 1e-2, "beta": 0.0, "gamma": 1.0},  # no memory: this step's statistics; the norm may never grow
)))
