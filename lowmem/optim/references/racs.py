"""Plain loop of RACS (Gong, Scetbon, Ma & Meeds 2025, arXiv:2502.07752), written from the paper's Algorithm 1 and
Eq. 16 in float64 matrix form: ``Q = Diag_v(q)``, ``S = Diag_v(s)``, ``Diag(G^T Q G)``, ``Diag(G S G^T)`` and the
Frobenius norms multiplied out; ``eps`` as lowmem adds it (inside the square roots) and ``eta = 1`` while
``phi = 0``."""

from __future__ import annotations

import torch
from torch import Tensor

from . import Reference, register_reference


def _as_matrix(x: Tensor) -> Tensor:
    """A matrix itself; 4 or more dimensions ``[shape[0], -1]``; a vector a column; a 0-d tensor ``[1, 1]`` (a 3-D
    weight is a batch of matrices: :func:`racs`)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.dim() == 1:
        return x.reshape(-1, 1)
    return x.reshape(x.shape[0], -1)


def _fixed_point(g: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Eq. 16 from ``q = 1`` with the one-sample estimate ``E[.] = .`` of this step's ``G``::

        s = Diag(G^T Q G) / ||Q||_F^2 ,   q = Diag(G S G^T) / ||S||_F^2
    """
    m, n = g.shape
    q = torch.ones(m, dtype=torch.float64)
    for _ in range(iterations):
        big_q = torch.diag(q)
        s = torch.diagonal(g.T @ big_q @ g) / max(float(torch.linalg.matrix_norm(big_q)) ** 2, 1e-30)
        big_s = torch.diag(s)
        q = torch.diagonal(g @ big_s @ g.T) / max(float(torch.linalg.matrix_norm(big_s)) ** 2, 1e-30)
    return q, s


def racs(p: Tensor, grads: list[Tensor], *, index: int, lr: float, beta: float, alpha: float, gamma: float,
         iterations: int, eps: float, weight_decay: float, **_) -> list[Tensor]:
    """A 3-D weight ``[E, A, B]`` (fused MoE experts): each ``A x B`` matrix its own run of :func:`_racs_matrix`
    (its own scalings and norm). Otherwise :func:`_racs_matrix` of the whole tensor."""
    if p.dim() == 3:
        runs = [_racs_matrix(p[e], [g[e] for g in grads], lr=lr, beta=beta, alpha=alpha, gamma=gamma,
                             iterations=iterations, eps=eps, weight_decay=weight_decay) for e in range(p.shape[0])]
        return [torch.stack([run[t] for run in runs]) for t in range(len(grads))]
    return _racs_matrix(p, grads, lr=lr, beta=beta, alpha=alpha, gamma=gamma, iterations=iterations, eps=eps,
                        weight_decay=weight_decay)


def _racs_matrix(p: Tensor, grads: list[Tensor], *, lr: float, beta: float, alpha: float, gamma: float,
                 iterations: int, eps: float, weight_decay: float) -> list[Tensor]:
    """Algorithm 1 (with decoupled weight decay before the update, as lowmem's recipes), every step::

        S_t, Q_t from Eq. 16                                    (line 5)
        s_t = beta s_{t-1} + (1 - beta) Diag(S_t)               (line 6, s_0 = 0)
        q_t = beta q_{t-1} + (1 - beta) Diag(Q_t)               (line 7, q_0 = 0)
        G~  = Diag_v(q_t + eps)^-1/2 G Diag_v(s_t + eps)^-1/2    (line 8)
        eta = 1 (t = 1 or phi = 0) or gamma / max(||G~|| / phi, gamma)   (line 9)
        phi = eta ||G~||                                        (line 10)
        W  <- W - lr wd W - lr eta alpha G~                      (line 11)
    """
    shape, dtype = p.shape, p.dtype
    w = _as_matrix(p.double())
    m, n = w.shape
    q, s, phi = torch.zeros(m, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        gm = _as_matrix(g.double())
        q_new, s_new = _fixed_point(gm, iterations)
        s = beta * s + (1 - beta) * s_new
        q = beta * q + (1 - beta) * q_new
        g_tilde = torch.diag((q + eps) ** -0.5) @ gm @ torch.diag((s + eps) ** -0.5)
        norm = float(torch.linalg.matrix_norm(g_tilde))  # Frobenius
        eta = 1.0 if t == 1 or phi == 0 else gamma / max(norm / phi, gamma)  # (phi = 0: Algorithm 3's "else 1")
        phi = eta * norm
        w = w - lr * weight_decay * w - lr * eta * alpha * g_tilde
        out.append(w.reshape(shape).to(dtype))
    return out


register_reference("racs", Reference(racs, shapes=((24, 40), (40, 24), (40,), (3, 8, 10), (2, 3, 2, 2), ()), configs=(
    {},  # the paper's Table 9 (60M-350M): lr 2e-2, beta 0.9, alpha 0.05, gamma 1.01, 5 iterations; eps 1e-30
    {"lr": 1e-2, "weight_decay": 0.1, "iterations": 1},  # one step of Eq. 16: s the column mean squares
    {"lr": 3e-2, "beta": 0.5, "alpha": 0.2, "gamma": 1.5, "eps": 1e-6},  # a looser limiter; eps visible
    {"lr": 1e-2, "beta": 0.0, "gamma": 1.0, "iterations": 3},  # no memory: this step's scalings; no norm growth
)))
