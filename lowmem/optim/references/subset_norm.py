"""Plain loops of Subset-Norm and Subspace-Momentum (Nguyen & Nguyen 2024 / ICML 2025), from the
paper (Sections 3-4) with the authors' step-size conventions (timmytonga/sn-sm: ``adamw_sn.py``,
``GenericOptim.py``, ``subset_norm.py``, ``subspace_momentum.py``).

The subspace (its side, SVD / random / coordinate draws, the refresh schedule (the authors' ``1, T,
2T, ...``: ``refresh_phase="multiples"``; ``aligned`` / ``staggered`` as GaLore's; Q-GaLore's opt-in lazy
refresh, Zhang et al. 2024, Section 3: ``lazy_refresh_threshold`` doubles a tensor's interval while the first
vectors of successive SVD bases stay aligned) with a zero gradient keeping the old subspace, and what the
momentum does at a refresh) comes from
the plain helpers of :mod:`lowmem.optim.references.subspace`: references, not engine code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import Reference, register_reference
from .subspace import carry_moments, down, is_projected, maybe_refresh, up


def _subset_dim(p: Tensor, subset_norm: bool | None) -> int | None:
    """The dimension the subset norms sum over: the shorter side of a 2-D parameter of a
    ``subset_norm`` group (the authors' ``reduce_dim = 0 if m >= n else 1``, summing over
    ``1 - reduce_dim``); ``None`` (element-wise, Adam's) otherwise."""
    if not subset_norm or p.ndim != 2:
        return None
    return 1 if p.shape[0] >= p.shape[1] else 0


def _flat_k(numel: int, subset_size: int) -> int:
    """The authors' general subsets (``adamw_sng.py``): the largest divisor of ``numel`` not above
    ``subset_size`` (``-d``: ``int(sqrt(numel) / d)``), clamped to ``[1, numel]``."""
    want = subset_size if subset_size > 0 else int(math.sqrt(numel) / -subset_size)
    want = min(max(want, 1), numel)
    while numel % want:
        want -= 1
    return want


def _sq(g: Tensor, dim: int | None) -> Tensor:
    """``||g_Psi_i||^2``: the squared norm of every subset (Section 3), or ``g^2`` per element."""
    return g * g if dim is None else (g * g).sum(dim=dim, keepdim=True)


def adamw_sn(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
             weight_decay: float, subset_norm: bool | None = None, subset_size: int | None = None, **_) -> list[Tensor]:
    """AdamSN (Section 3; the authors' ``adamw_sn.py``)::

        m <- b1 m + (1 - b1) g          (b1 = 0: m = g, no state: RMSPropSN)
        v_i <- b2 v_i + (1 - b2) sum_{j in Psi_i} g_j^2      (Psi_i: a row of the longer side; with
                                                               subset_size: k contiguous flat elements)
        p <- p - lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)
        p <- p (1 - lr wd)
    """
    if subset_norm and subset_size is not None:  # flat subsets: the same loop on a (numel / k, k) view
        k = _flat_k(p.numel(), subset_size)
        out = adamw_sn(p.reshape(-1, k), [g.reshape(-1, k) for g in grads], index=index, lr=lr, betas=betas, eps=eps,
                       weight_decay=weight_decay, subset_norm=True, _rows=True)
        return [x.reshape(p.shape) for x in out]
    b1, b2 = betas
    dim = 1 if _.get("_rows") else _subset_dim(p, subset_norm)
    m = torch.zeros_like(p)
    v = torch.zeros_like(_sq(p, dim))
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g if b1 > 0 else g
        v = b2 * v + (1 - b2) * _sq(g, dim)
        p = p - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
        p = p * (1 - lr * weight_decay)
        out.append(p)
    return out


def adagrad_sn(p: Tensor, grads: list[Tensor], *, index: int, lr: float, momentum: float, eps: float,
               weight_decay: float, subset_norm: bool | None = None, subset_size: int | None = None,
               **_) -> list[Tensor]:
    """AdaGrad-SN (Section 3, with the authors' momentum and ``beta2 = 1``, no bias correction)::

        m <- b1 m + (1 - b1) g          (b1 = 0: m = g)
        b_i^2 <- b_i^2 + sum_{j in Psi_i} g_j^2
        p <- p - lr m / (b + eps) ;  p <- p (1 - lr wd)
    """
    if subset_norm and subset_size is not None:  # flat subsets of k, as adamw_sn
        k = _flat_k(p.numel(), subset_size)
        out = adagrad_sn(p.reshape(-1, k), [g.reshape(-1, k) for g in grads], index=index, lr=lr, momentum=momentum,
                         eps=eps, weight_decay=weight_decay, subset_norm=True, _rows=True)
        return [x.reshape(p.shape) for x in out]
    dim = 1 if _.get("_rows") else _subset_dim(p, subset_norm)
    m = torch.zeros_like(p)
    b2 = torch.zeros_like(_sq(p, dim))
    out = []
    for g in grads:
        m = momentum * m + (1 - momentum) * g if momentum > 0 else g
        b2 = b2 + _sq(g, dim)
        p = p - lr * m / (b2.sqrt() + eps)
        p = p * (1 - lr * weight_decay)
        out.append(p)
    return out


def subspace_momentum(p: Tensor, grads: list[Tensor], *, index: int, lr: float, weight_decay: float,
                      betas: tuple[float, float] | None = None, eps: float | None = None, momentum: float | None = None,
                      rank: int | None = None, scale: float = 1.0, moment_policy: str = "reset", free_rule: str = "sgd",
                      free_lr_scale: float = 1.0, subset_norm: bool | None = None, **group) -> list[Tensor]:
    """Subspace-Momentum (Section 4), with the Subset-Norm step size when ``eps`` is given (AdamSNSM with
    ``betas``, AdaGrad-SNSM with ``momentum``: running sums, no bias correction)::

        at steps 1, T, 2T, ...: P from the SVD of G (GaLore's side), the momentum reset (moment_policy);
            with lazy_refresh_threshold (Q-GaLore, Zhang et al. 2024, Section 3): T doubles while the mean |cos|
            of the last lazy_refresh_patience successive first basis vectors is >= the threshold
        m <- b1 m + (1 - b1) P^T G
        u  = P m + (G - P P^T G)                     (sign(G - P P^T G) with free_rule='signsgd')
        AdamSNSM: v_i <- b2 v_i + (1 - b2) ||G_Psi_i||^2 ;  u <- sqrt(1 - b2^t) / (1 - b1^t) u / (sqrt(v) + eps)
        AdaGrad-SNSM: v_i <- v_i + ||G_Psi_i||^2 ;  u <- u / (sqrt(v) + eps)
        p <- p - lr u ;  p <- p (1 - lr wd)

    A parameter that is not projected (not 2-D, or its smaller side <= rank) takes AdamSN steps
    (AdamSNSM) or SGD with momentum ``m`` (``sgd_sm``), as the authors' regular parameters.
    """
    adaptive, accumulate = eps is not None, betas is None
    if not is_projected(p, rank):
        if adaptive and accumulate:
            return adagrad_sn(p, grads, index=index, lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay,
                              subset_norm=subset_norm)
        if adaptive:
            return adamw_sn(p, grads, index=index, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            subset_norm=subset_norm)
        m, out = torch.zeros_like(p), []
        for g in grads:
            m = momentum * m + (1 - momentum) * g
            p = (p - lr * m) * (1 - lr * weight_decay)
            out.append(p)
        return out
    b1, b2 = (momentum, None) if accumulate else betas
    group = {**group, "rank": rank}
    dim = _subset_dim(p, subset_norm)
    v = torch.zeros_like(_sq(p, dim))
    sub, refreshes, m, out = None, 0, None, []
    for t, g in enumerate(grads, start=1):
        sub, refreshes, old = maybe_refresh(g, t, sub, refreshes, group, index)
        low = down(g, sub)
        if m is None:
            m = torch.zeros_like(low)
        elif old:
            m = carry_moments(moment_policy, {"m": m}, old, sub, p.shape)["m"]
        m = b1 * m + (1 - b1) * low
        residual = g - up(low, sub, p.shape)
        if free_rule == "signsgd":
            residual = torch.sign(residual)
        u = scale * up(m, sub, p.shape) + free_lr_scale * residual
        if adaptive and accumulate:
            v = v + _sq(g, dim)
            u = u / (v.sqrt() + eps)
        elif adaptive:
            v = b2 * v + (1 - b2) * _sq(g, dim)
            u = math.sqrt(1 - b2**t) / (1 - b1**t) * u / (v.sqrt() + eps)
        p = p - lr * u
        p = p * (1 - lr * weight_decay)
        out.append(p)
    return out


register_reference("adamw_sn", Reference(adamw_sn, configs=(
    {},  # a flat parameter list: one subset_norm group (per column of the wide, per row of the tall matrix)
    {"betas": (0.0, 0.99), "lr": 1e-2, "weight_decay": 0.1},  # RMSPropSN: no first moment
    {"betas": (0.8, 0.95), "eps": 0.5},  # eps large enough that its placement (on the raw sqrt(v)) shows
    {"subset_norm": False, "eps": 0.1},  # element-wise: Adam with the authors' eps placement
    # flat subsets (adamw_sng.py / pytorch_optimizer): sqrt(960) / 2 -> 15 (divides 960), sqrt(40) / 2 -> 3 -> 2
    {"subset_size": -2, "lr": 1e-2},
    {"subset_size": 7, "betas": (0.0, 0.999)},  # 960 -> 6 per subset, 40 -> 5
    {"subset_size": 1, "lr": 1e-2},  # single-element subsets: v of shape (numel, 1), Adam element-wise
)))
register_reference("adamw_snsm", Reference(subspace_momentum, configs=(
    {"rank": 4, "update_proj_gap": 5},
    # refreshes at 1, 3, 6, 9, 12 (the authors' schedule, refresh_phase='multiples'): the zero gradient of
    # step 9 keeps the subspace (and the momentum)
    {"rank": 3, "update_proj_gap": 3, "lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 0.5,
     "proj_type": "reverse_std"},
    {"rank": 4, "update_proj_gap": 3, "projection": "random", "subset_norm": False, "moment_policy": "keep"},
    {"rank": 4, "update_proj_gap": 4, "refresh_phase": "aligned"},  # galore-torch's schedule: 1, 5, 9
    {"rank": 4, "update_proj_gap": 5, "projection": "columns", "free_rule": "signsgd", "free_lr_scale": 0.5,
     "betas": (0.0, 0.999)},
    {"rank": None},  # full-rank: AdamSN (a rank >= the smaller side of (24, 40) is an error)
    # Q-GaLore's lazy refresh (the shared rule, lowmem.optim.references.subspace.lazy_refresh): random gradients'
    # first singular vectors meet at |cos| ~ 0.02-0.5, so intervals double at some refreshes (1 -> 4 or 8 in 12 steps)
    {"rank": 4, "update_proj_gap": 1, "lazy_refresh_threshold": 0.05, "lazy_refresh_patience": 1},
    {"rank": 4, "update_proj_gap": 1, "projection": "rsvd", "proj_type": "full", "lazy_refresh_threshold": 0.1,
     "lazy_refresh_patience": 2, "subset_norm": False},
    {"rank": 4, "update_proj_gap": 4, "refresh_phase": "staggered"},  # shifted by 0, 1, 2 steps
)))
register_reference("adagrad_sn", Reference(adagrad_sn, configs=(
    {},
    {"momentum": 0.0, "lr": 1e-2, "weight_decay": 0.1, "eps": 0.5},  # AdaGrad-SN itself (no momentum state)
    {"subset_norm": False, "momentum": 0.5},  # element-wise: AdaGrad with momentum
    {"subset_size": 16, "lr": 1e-2},  # flat subsets of 16 (960) and 10 (40)
    {"subset_size": 1, "momentum": 0.5},  # single-element subsets: AdaGrad element-wise
)))
register_reference("adagrad_snsm", Reference(subspace_momentum, configs=(
    {"rank": 4, "update_proj_gap": 5, "lr": 1e-2},
    {"rank": 3, "update_proj_gap": 4, "momentum": 0.5, "eps": 0.5, "weight_decay": 0.1, "proj_type": "reverse_std"},
    {"rank": None},  # full-rank: AdaGrad-SN
    {"rank": 4, "update_proj_gap": 1, "lr": 1e-2, "lazy_refresh_threshold": 0.05, "lazy_refresh_patience": 1},
)))
register_reference("sgd_sm", Reference(subspace_momentum, configs=(
    {"rank": 4, "update_proj_gap": 5},
    {"rank": 3, "update_proj_gap": 4, "momentum": 0.5, "lr": 1e-2, "weight_decay": 0.1, "proj_type": "left",
     "moment_policy": "rotate"},
    {"rank": None, "momentum": 0.0},  # full-rank: plain SGD
    {"rank": 4, "update_proj_gap": 3, "refresh_phase": "staggered", "lazy_refresh_threshold": 0.05,
     "lazy_refresh_patience": 1, "proj_type": "reverse_std"},
)))
