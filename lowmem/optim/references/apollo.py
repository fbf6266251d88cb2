"""Plain loops of APOLLO and APOLLO-Mini (Zhu et al. 2024, Algorithm 1), from the paper.

Shared with the engine, by design: the seeded random-basis generator
(:func:`lowmem.optim.functional.galore.random_basis` with the engine's seeding convention), so that
the loop draws the same projection. Everything else is plain torch below.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..functional.galore import random_basis
from . import Reference, register_reference


def _side(shape: tuple[int, int], proj_type: str) -> str:
    m, n = shape
    return {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right"}.get(proj_type, proj_type)


def apollo(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
           weight_decay: float, rank: int | None = None, update_proj_gap: int = 200, scale: float = 1.0,
           proj_type: str = "std", projection: str = "gaussian", seed: int = 0, scale_type: str = "channel",
           gamma: float | None = 1.01, refresh_phase: str = "aligned", moment_policy: str = "keep", **_) -> list[Tensor]:
    """APOLLO, Algorithm 1 (bias correction in the step size and decay after the update, as apollo-torch)::

        every T steps: P ~ N(0, 1/r)  (m x r, left; or n x r, right)      # line 3
        R = P^T G  or  G P                                                 # line 4
        M <- b1 M + (1 - b1) R ;  V <- b2 V + (1 - b2) R^2                 # lines 5-6
        R~ = M / (sqrt(V) + eps)                                           # line 7
        s_j = ||R~_j|| / (||R_j|| + 1e-8) per channel j (or one s per tensor: APOLLO-Mini)   # line 8
        S = G * s ;  if ||S|| > gamma ||S_prev||: S <- S gamma ||S_prev|| / ||S||   # Fira's limiter
        W <- W - lr sqrt(1 - b2^t) / (1 - b1^t) sqrt(scale) S ;  W <- W (1 - lr wd)   # line 10

    A parameter that is not 2-D, or whose smaller side is <= rank, takes plain Adam steps (the same
    eps placement, step size and decay).
    """
    if refresh_phase != "aligned" or moment_policy != "keep" or projection not in ("gaussian", "random", "svd"):
        raise NotImplementedError("the APOLLO reference covers aligned refreshes, moment_policy='keep' and"
                                  " projection in ['gaussian', 'random', 'svd']")
    b1, b2 = betas
    projected = rank is not None and p.dim() == 2 and rank < min(p.shape)
    side = _side(tuple(p.shape), proj_type) if projected else None
    basis, refreshes, prev_norm, m, v, out = None, 0, None, None, None, []
    for t, g in enumerate(grads, start=1):
        if projected:
            if refreshes == 0 or (t - 1) % update_proj_gap == 0:
                if projection == "svd":
                    if bool(g.norm() > 0):  # a zero gradient keeps the previous subspace
                        u, _, vh = torch.linalg.svd(g, full_matrices=False)
                        basis, refreshes = (u[:, :rank] if side == "left" else vh[:rank].t()), refreshes + 1
                else:
                    gen = torch.Generator().manual_seed((seed * 1_000_003 + index) * 7919 + refreshes)
                    rows = p.shape[0] if side == "left" else p.shape[1]
                    basis, refreshes = random_basis(rows, rank, gen, projection == "random"), refreshes + 1
            r = basis.t() @ g if side == "left" else g @ basis
        else:
            r = g
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        m = b1 * m + (1 - b1) * r
        v = b2 * v + (1 - b2) * r * r
        r_tilde = m / (v.sqrt() + eps)
        if projected:
            if scale_type == "tensor":
                s = r_tilde.norm() / (r.norm() + 1e-8)
            elif side == "left":  # channels are the n columns
                s = r_tilde.norm(dim=0) / (r.norm(dim=0) + 1e-8)
            else:  # channels are the m rows
                s = (r_tilde.norm(dim=1) / (r.norm(dim=1) + 1e-8))[:, None]
            d = g * s
            if gamma is not None:
                norm = d.norm()
                if prev_norm is not None:
                    limiter = torch.clamp(norm / (prev_norm + 1e-8), min=gamma) / gamma
                    d, norm = d / limiter, norm / limiter
                prev_norm = norm
            d = d * math.sqrt(scale)
        else:
            d = r_tilde
        p = p - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * d
        p = p * (1 - lr * weight_decay)
        out.append(p)
    return out


_CONFIGS = (
    {"rank": 4, "update_proj_gap": 5},
    {"rank": 3, "update_proj_gap": 1, "scale": 4.0, "weight_decay": 0.1, "lr": 1e-2, "proj_type": "reverse_std"},
    {"rank": 4, "update_proj_gap": 5, "projection": "svd", "gamma": None, "proj_type": "left"},
    {"rank": 2, "update_proj_gap": 4, "projection": "random", "scale_type": "tensor", "gamma": 1.5, "proj_type": "right"},
    {"rank": None},  # full-rank Adam (a rank >= the smaller side of (24, 40) is an error)
)
register_reference("apollo_adamw", Reference(apollo, configs=_CONFIGS))
register_reference("apollo_mini", Reference(apollo, configs=(
    {"update_proj_gap": 5},
    {"update_proj_gap": 3, "lr": 1e-2, "weight_decay": 0.05, "scale": 32.0, "betas": (0.8, 0.99)},
    {"update_proj_gap": 5, "scale_type": "channel", "gamma": None},
)))
