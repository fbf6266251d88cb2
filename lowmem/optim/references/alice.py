"""Plain loop of Alice (Gong et al. 2025, arXiv 2502.07752, Algorithm "Alice"), from the paper.

Shared with the engine, by design: the seeding convention of the complement's Gaussian draw (the
generator of refresh ``k`` of the parameter at ``index``: ``(seed * 1_000_003 + index) * 7919 + k``), so that
the loop draws the same directions, and with ``fix_signs`` the Ritz vectors' sign convention (each column of
``eigh``'s eigenvectors with its largest entry positive: the paper leaves the sign open, and the kept first moment
depends on it; :func:`lowmem.optim.functional.alice.fix_signs_`). Everything else is plain torch below: the
tracked covariance is formed as the ``d x d`` matrix of the paper, ``p`` from ``diag(G^T G) - diag(sigma^T
sigma)``, ``||C||`` from ``C``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import Reference, register_reference


def _side(shape: tuple[int, int], proj_type: str) -> str:
    """The paper's side (Sec. 2.1: ``m <= n``, ``U`` in ``R^{m x r}``): ``std`` the rows of a square weight."""
    m, n = shape
    return {"std": "left" if m <= n else "right", "reverse_std": "right" if m <= n else "left"}.get(proj_type, proj_type)


def alice(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
          weight_decay: float, rank: int | None = None, update_proj_gap: int = 200, scale: float = 0.3,
          proj_type: str = "std", seed: int = 0, power_iters: int = 1, beta3: float = 0.999,
          switch_fraction: float = 0.84375, alpha_c: float = 0.4, comp_beta: float | None = None, gamma: float = 1.01,
          bias_correction: bool = False, carry_covariance: bool = False, fix_signs: bool = False,
          refresh_phase: str = "multiples",
          moment_policy: str = "keep", **_) -> list[Tensor]:
    """Alice, Algorithm 4 with Algorithms 2, 3 and 10 (``G`` transposed when the right side is projected, so ``U``
    is ``d x r``)::

        t = 1:            U = top-r eigenvectors of G G^T  (= singular vectors of G; U_0 = 0 leaves line 7 undefined)
        t mod K == 0:     Q~ = b3 U Q U^T + (1 - b3) G G^T                          # line 6, tracking
                          X = qr(Q~ U) (power_iters times); (w, E) = eigh(X^T Q~ X); V = X E (descending;
                          fix_signs: each column of E with its largest entry positive)
                          U' = [V[:, :l], r - l directions of the complement of span(V)]   # line 7, switching
                          (carry_covariance: Q = U'^T U Q U^T U') ;  U = U'
        sigma = U^T G ;   Q = b3 Q + (1 - b3) sigma sigma^T                          # line 12
        m = b1 m + (1 - b1) sigma ;  v = b2 v + (1 - b2) sigma^2
        p = cb p + (1 - cb) (diag(G^T G) - diag(sigma^T sigma))   (cb = b1: line 16)  # Algorithm 3
        C = sqrt(d - r) (G - U sigma) Diag(p)^{-1/2} ;  C <- C min(1, gamma ||C_prev|| / ||C||)
        W <- W - lr alpha (U m / (sqrt(v) + eps) + alpha_c C) ;  W <- W (1 - lr wd)

    ``refresh_phase="aligned"``: the switches at ``t = K+1, 2K+1, ...`` instead (GaLore's schedule).

    ``l = rank - floor(rank * switch_fraction)``; a complement smaller than ``r - l`` is taken whole and the next
    Ritz vectors fill the rest. ``bias_correction=True`` multiplies ``m / (sqrt(v) + eps)`` by
    ``sqrt(1 - b2^t) / (1 - b1^t)``. A parameter that is not 2-D, or whose smaller side is <= rank, takes Adam
    steps (eps on the raw ``sqrt(v)``, the bias correction in the step size, decay after the update).
    """
    if refresh_phase not in ("aligned", "multiples") or moment_policy != "keep":
        raise NotImplementedError("the Alice reference covers aligned / multiples refreshes and moment_policy='keep'")
    b1, b2 = betas
    cb = b1 if comp_beta is None else comp_beta
    due = (lambda t: (t - 1) % update_proj_gap == 0) if refresh_phase == "aligned" else (lambda t: t % update_proj_gap == 0)
    projected = rank is not None and p.dim() == 2 and rank < min(p.shape)
    right = projected and _side(tuple(p.shape), proj_type) == "right"
    u = q = m = v = pc = prev = None
    refreshes, out = 0, []
    for t, g in enumerate(grads, start=1):
        if not projected:
            if m is None:
                m, v = torch.zeros_like(g), torch.zeros_like(g)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * (m / (v.sqrt() + eps))
            p = p * (1 - lr * weight_decay)
            out.append(p)
            continue
        a = g.t() if right else g
        d = a.shape[0]
        if u is None:
            u, q = torch.zeros(d, rank), torch.zeros(rank, rank)
            m, v = torch.zeros(rank, a.shape[1]), torch.zeros(rank, a.shape[1])
            pc = torch.zeros(a.shape[1])
        if (refreshes == 0 or due(t)) and bool(a.norm() > 0):
            if refreshes == 0:
                # (the SVD of G itself, whose signs the moments kept at a later switch depend on: U, or V for G^T)
                usv = torch.linalg.svd(g, full_matrices=False)
                u = usv[2][:rank].t() if right else usv[0][:, :rank]
            else:
                qt = beta3 * u @ q @ u.t() + (1 - beta3) * a @ a.t()
                x = u
                for _ in range(power_iters):
                    x = torch.linalg.qr(qt @ x)[0]
                w, e = torch.linalg.eigh(x.t() @ qt @ x)
                e = e.flip(1)
                if fix_signs:  # (each column's largest entry positive)
                    e = e * torch.sign(e[e.abs().argmax(0), torch.arange(rank)])
                vecs = x @ e
                lead = rank - math.floor(rank * switch_fraction)
                c = min(rank - lead, d - rank)
                new = vecs[:, : rank - c]
                if c > 0:
                    gen = torch.Generator().manual_seed((seed * 1_000_003 + index) * 7919 + refreshes)
                    z = torch.randn(d, c, generator=gen)
                    z = z - vecs @ (vecs.t() @ z)
                    z = z - vecs @ (vecs.t() @ z)
                    new = torch.cat([new, torch.linalg.qr(z)[0]], dim=1)
                if carry_covariance:
                    q = new.t() @ u @ q @ u.t() @ new
                u = new
            refreshes += 1
        sigma = u.t() @ a
        q = beta3 * q + (1 - beta3) * sigma @ sigma.t()
        m = b1 * m + (1 - b1) * sigma
        v = b2 * v + (1 - b2) * sigma * sigma
        omega = m / (v.sqrt() + eps)
        if bias_correction:
            omega = omega * math.sqrt(1 - b2**t) / (1 - b1**t)
        pc = torch.clamp(cb * pc + (1 - cb) * ((a * a).sum(0) - (sigma * sigma).sum(0)), min=torch.finfo(torch.float32).tiny)
        comp = math.sqrt(d - rank) * (a - u @ sigma) / pc.sqrt()
        norm = comp.norm()
        if prev is not None and prev > 0:
            comp = comp * torch.clamp(gamma * prev / norm, max=1.0)
        prev = comp.norm()
        step = scale * (u @ omega + alpha_c * comp)
        p = p - lr * (step.t() if right else step)
        p = p * (1 - lr * weight_decay)
        out.append(p)
    return out


_CONFIGS = (
    {"rank": 4, "update_proj_gap": 5},
    {"rank": 3, "update_proj_gap": 2, "weight_decay": 0.1, "lr": 1e-2, "proj_type": "reverse_std", "beta3": 0.9,
     "switch_fraction": 0.5, "power_iters": 2, "carry_covariance": True, "refresh_phase": "aligned"},
    {"rank": 8, "update_proj_gap": 3, "proj_type": "left", "bias_correction": True, "alpha_c": 1.0, "gamma": 1.2,
     "switch_fraction": 0.0, "betas": (0.9, 0.999)},
    {"rank": 20, "update_proj_gap": 4, "proj_type": "right", "switch_fraction": 0.9, "comp_beta": 0.5, "carry_covariance": True,
     "scale": 1.0, "power_iters": 0, "fix_signs": True},  # (d - r = 4 < r - l = 18: the whole complement and 14 more
    # Ritz vectors; switches at 4, 8, 12: with eigh's own signs 0.5 of an entry apart from step 8, docs/subspace.md)
    {"rank": None},  # full-rank Adam (a rank >= the smaller side of (24, 40) is an error)
)
register_reference("alice", Reference(alice, configs=_CONFIGS))
