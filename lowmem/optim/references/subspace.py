"""Plain loops of the subspace recipes, written from their papers (see the package docstring).

GaLore (Zhao et al. 2024, Algorithm 2), GaLore with Adafactor (Section 4.3), Fira (Chen et al. 2024,
Algorithm 1), FRUGAL (Zmushko et al. 2024, Algorithm 1) and Online Subspace Descent (Liang et al.
2024, Algorithm 1), each a loop over the steps of one tensor, with the choices docs/subspace.md
documents for lowmem:

* refreshes at steps ``1, T+1, 2T+1, ...`` (``refresh_phase="aligned"``; ``"multiples"``: ``1, T, 2T, ...``;
  ``"staggered"``: parameter ``index`` of ``group_size`` shifted by ``index * T // group_size`` steps, the
  one schedule that needs the group's size: the suite passes ``group_size``, :func:`schedule_offset`); a data-dependent
  refresh (``svd``, ``rsvd``, ``online_pca``) with a zero or non-finite gradient is skipped and the
  old subspace kept (a first refresh is tried at every step until one succeeds);
* ``proj_type``: ``std`` projects the smaller side, ``reverse_std`` the larger, ``left`` / ``right``
  / ``full`` as named (galore-torch's sides); SVD bases are galore-torch's ``U[:, :r]`` / ``Vh[:r]``;
* ``moment_policy``: ``keep`` the moments, ``reset`` them to zero (and count their steps again from
  1: Adam's bias corrections, Adafactor's ``1 - t^-0.8``, as FRUGAL's authors' ``reset_statistics``), or ``rotate`` them into the new subspace (``M' = T_l M T_r``,
  ``V' = T_l^2 V T_r^2`` element-wise squared transitions; index sets keep the statistics of the
  coordinates they keep);
* a parameter that is not 2-D, or whose smaller side is ``<= rank``, trains full-rank with the same
  moment rule (no ``scale``, no residual).

Random subspaces are drawn here too, written from their descriptions with the engine's seeding
convention reproduced (so the same subspace is drawn): one ``torch.Generator().manual_seed((seed *
1_000_003 + index) * 7919 + refreshes)`` per refresh, a left basis drawn before a right one. The only
piece shared with the engine is the 8-bit blockwise codec of the ``*8bit`` variants
(:mod:`lowmem.optim.functional.quant`: the storage format).

Rounding: the exponential moving averages are written ``torch.lerp(m, g, 1 - b1)`` and
``torch.addcmul(b2 v, g, g, value=1 - b2)`` (the same EMA as ``b1 m + (1 - b1) g``), so that the
8-bit variants, whose stored moments are re-quantized every step, see bit-identical moments and
round them to the same codes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from ..functional import quant as Q
from . import Reference, register_reference

DATA_DEPENDENT = ("svd", "rsvd", "online_pca")


# ---- the subspace: which side, how it is drawn, projecting down and up ----------------------


def side_of(shape: tuple[int, int], proj_type: str) -> str:
    """galore-torch's ``proj_type``: ``std`` projects the smaller side (``right`` when ``m >= n``)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def is_projected(p: Tensor, rank: int | None) -> bool:
    """A 2-D parameter whose smaller side exceeds the rank (else: full-rank, docs/subspace.md)."""
    return rank is not None and p.ndim == 2 and rank < min(p.shape)


def random_basis(rows: int, r: int, gen: torch.Generator, orthonormal: bool) -> Tensor:
    """``rows x r`` columns independent of the gradient: Haar-random orthonormal (the QR of a Gaussian
    matrix with the signs of ``diag(R)`` moved into ``Q``, Mezzadri 2007), or ``N(0, 1/r)`` entries
    (APOLLO, Zhu et al. 2024, Section 3: ``E[P P^T] = I``)."""
    z = torch.randn(rows, r, generator=gen)
    if not orthonormal:
        return z / math.sqrt(r)
    q, upper = torch.linalg.qr(z)
    return q * torch.sign(torch.diagonal(upper))


def random_indices(size: int, k: int, gen: torch.Generator) -> Tensor:
    """``k`` distinct indices of ``range(size)``, uniformly (FRUGAL's RandK / random columns), sorted."""
    return torch.randperm(size, generator=gen)[:k].sort().values


def rsvd_basis(a: Tensor, r: int, gen: torch.Generator, iters: int, start: Tensor | None) -> Tensor:
    """Orthonormal ``m x r`` basis of ``A``'s dominant columns (Halko, Martinsson & Tropp 2011):
    the first time Algorithm 4.4 (``Q = orth(A Omega)`` with ``r + 4`` Gaussian probes, then ``iters``
    times ``Q = orth(A A^T Q)``), later the same iteration started from the previous basis; then
    Algorithm 5.1's small SVD ``U S V^T = Q^T A`` orders it: ``Q U[:, :r]``."""
    if start is None:
        k = min(r + 4, min(a.shape))
        q = torch.linalg.qr(a @ torch.randn(a.shape[1], k, generator=gen)).Q
    else:
        q = start
    for _ in range(iters):
        q = torch.linalg.qr(a @ (a.t() @ q)).Q
    u, _, _ = torch.linalg.svd(q.t() @ a, full_matrices=False)
    return q @ u[:, :r]


def draw_subspace(g: Tensor, group: dict[str, Any], index: int, refreshes: int, old: dict | None) -> dict:
    """A new subspace for gradient ``g``: a basis ``{"left": m x r, "right": r x n}`` (either may be
    ``None``) or an index set ``{"dim": 0 | 1 | None, "idx": ...}`` (``None``: flattened)."""
    m, n = g.shape
    r, method = group["rank"], group["projection"]
    side = side_of((m, n), group["proj_type"])
    gen = torch.Generator().manual_seed((group["seed"] * 1_000_003 + index) * 7919 + refreshes)
    if method in ("svd", "online_pca"):
        # GaLore Algorithm 2, line 5: U, S, V = SVD(G_t); P = U[:, :r] (left), Q = V^T[:r] (right)
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        return {"left": u[:, :r].contiguous() if side in ("left", "full") else None,
                "right": vh[:r].contiguous() if side in ("right", "full") else None}
    if method in ("random", "gaussian"):
        orth = method == "random"
        left = random_basis(m, r, gen, orth) if side in ("left", "full") else None
        right = random_basis(n, r, gen, orth).t().contiguous() if side in ("right", "full") else None
        return {"left": left, "right": right}
    if method == "rsvd":
        iters = group["power_iters"]
        left = right = None
        if side in ("left", "full"):
            left = rsvd_basis(g, r, gen, iters, None if refreshes == 0 else old["left"])
        if side in ("right", "full"):
            right = rsvd_basis(g.t(), r, gen, iters, None if refreshes == 0 else old["right"].t()).t().contiguous()
        return {"left": left, "right": right}
    # FRUGAL's coordinate subspaces (Section 3): r random columns / rows, r max(m, n) random entries,
    # or the k-th contiguous block of r columns / rows at the k-th refresh (cycling)
    if method == "randk":
        k = min(r * max(m, n), m * n)
        return {"dim": None, "idx": random_indices(m * n, k, gen)}
    dim = 1 if method == "columns" or (method == "blocks" and side == "right") else 0
    size = g.shape[dim]
    if method == "blocks":
        n_blocks = math.ceil(size / r)
        start = (refreshes % n_blocks) * r
        return {"dim": dim, "idx": torch.arange(start, start + r) % size}
    return {"dim": dim, "idx": random_indices(size, r, gen)}


def down(g: Tensor, sub: dict) -> Tensor:
    """``R = P^T G``, ``G Q^T`` or ``P^T G Q^T`` (GaLore Algorithm 2, line 6); selection for index sets."""
    if "idx" in sub:
        if sub["dim"] is None:
            return g.reshape(-1)[sub["idx"]]
        return g[:, sub["idx"]] if sub["dim"] == 1 else g[sub["idx"]]
    out = g if sub["left"] is None else sub["left"].t() @ g
    return out if sub["right"] is None else out @ sub["right"].t()


def up(x: Tensor, sub: dict, shape: torch.Size) -> Tensor:
    """``P N``, ``N Q`` or ``P N Q`` (GaLore Algorithm 2, line 10, before ``alpha``); for index sets
    the coordinates back in place, zero elsewhere."""
    if "idx" in sub:
        out = torch.zeros(shape)
        if sub["dim"] is None:
            out.view(-1)[sub["idx"]] = x
        elif sub["dim"] == 1:
            out[:, sub["idx"]] = x
        else:
            out[sub["idx"]] = x
        return out
    out = x if sub["left"] is None else sub["left"] @ x
    return out if sub["right"] is None else out @ sub["right"]


def usable(g: Tensor) -> bool:
    return bool(torch.isfinite(g).all()) and bool((g != 0).any())


def schedule_offset(group: dict, index: int) -> int:
    """How far parameter ``index``'s refresh steps are shifted from ``1, T+1, 2T+1, ...``: ``aligned`` 0,
    ``multiples`` ``T - 1`` (steps ``1, T, 2T, ...``: timmytonga/sn-sm's counter is incremented before its
    ``step % T == 0`` test), ``staggered`` ``index * T // count`` for the ``index``-th of the group's ``count``
    parameters (the refreshes of a group spread over the ``T`` steps; the loop is given ``group_size``, which a
    single tensor does not see). Under a lazy refresh ``multiples`` follows the tensor's own interval (its
    multiples), the others keep this offset."""
    phase, gap = group["refresh_phase"], group["update_proj_gap"]
    if phase == "aligned":
        return 0
    if phase == "multiples":
        return gap - 1
    if phase == "staggered":
        if group.get("group_size") is None:
            raise ValueError("refresh_phase='staggered' needs the group's parameter count: call the loop with"
                             " group_size=len(group['params'])")
        return index * gap // group["group_size"]
    raise ValueError(f"refresh_phase must be one of ['aligned', 'multiples', 'staggered'], got {phase!r}")


def maybe_refresh(g: Tensor, t: int, sub: dict | None, refreshes: int, group: dict, index: int):
    """The refresh schedule: at the first step, then at the steps ``t`` with ``(t - 1 - offset) % T == 0``
    (:func:`schedule_offset`: ``1, T+1, ...`` aligned), and every step until a first refresh worked
    (``online_pca`` only once); a data-dependent refresh of a zero gradient keeps the old subspace.
    Returns ``(subspace, refreshes, changed)``; ``changed`` is the old subspace (``{}`` before the
    first) when a refresh happened, else ``None``."""
    gap = sub["lazy"][0] if sub and "lazy" in sub else group["update_proj_gap"]  # (lazy_refresh below)
    # 'multiples' under a lazy refresh: the multiples of the tensor's own (doubled) interval
    offset = gap - 1 if group["refresh_phase"] == "multiples" else schedule_offset(group, index)
    due = refreshes == 0 or (group["projection"] != "online_pca" and (t - 1 - offset) % gap == 0)
    if not due or (group["projection"] in DATA_DEPENDENT and not usable(g)):
        return sub, refreshes, None
    new = draw_subspace(g, group, index, refreshes, sub)
    if group.get("lazy_refresh_threshold") is not None:
        new["lazy"] = lazy_refresh(sub, new, group)
    return new, refreshes + 1, sub or {}


def lazy_refresh(old: dict | None, new: dict, group: dict) -> tuple[int, list[float]]:
    """Q-GaLore's layer-adaptive lazy update (Zhang et al. 2024, Section 3, and the authors'
    ``GaLoreProjector.project``): at each refresh after the first, the cosine similarity of the new projection's
    first vector with the old one's (first column of ``P``, else first row of ``Q``; in absolute value here, a
    singular vector's sign being arbitrary) joins a queue of the last ``lazy_refresh_patience``; when the queue
    is full and its mean is ``>= lazy_refresh_threshold``, this tensor's refresh interval doubles (the queue is
    kept). Returns ``(interval, queue)``, carried in the subspace dict."""
    gap, queue = old["lazy"] if old and "lazy" in old else (group["update_proj_gap"], [])
    if not old:
        return gap, queue
    key, first = ("left", lambda b: b[:, 0]) if new["left"] is not None else ("right", lambda b: b[0])
    cos = torch.nn.functional.cosine_similarity(first(old[key]), first(new[key]), dim=0)
    queue = (queue + [abs(float(cos))])[-group["lazy_refresh_patience"]:]
    if len(queue) == group["lazy_refresh_patience"] and sum(queue) / len(queue) >= group["lazy_refresh_threshold"]:
        gap *= 2
    return gap, queue


def carry_moments(policy: str, moments: dict[str, Tensor], old: dict, new: dict, shape: torch.Size,
                  squared: tuple[str, ...] = ("v",)) -> dict[str, Tensor]:
    """The moments when the subspace changes (docs/subspace.md, "Moments when the subspace changes")."""
    if policy == "keep":
        return moments
    if policy == "reset":
        return {k: torch.zeros_like(x) for k, x in moments.items()}
    out = {}
    for k, x in moments.items():
        if "idx" in new:  # kept coordinates keep their statistics, new ones start at zero
            out[k] = down(up(x, old, shape), new)
            continue
        t_left = None if new["left"] is None else new["left"].t() @ old["left"]
        t_right = None if new["right"] is None else old["right"] @ new["right"].t()
        if k in squared:  # element-wise squared transitions for the second moment
            t_left = None if t_left is None else t_left * t_left
            t_right = None if t_right is None else t_right * t_right
        y = x if t_left is None else t_left @ x
        out[k] = y if t_right is None else y @ t_right
    return out


# ---- moments ------------------------------------------------------------------------------


def adam_ema(m: Tensor, v: Tensor, g: Tensor, b1: float, b2: float) -> tuple[Tensor, Tensor]:
    """Kingma & Ba 2015, Algorithm 1 lines 7-8: ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``."""
    return torch.lerp(m, g, 1 - b1), torch.addcmul(v * b2, g, g, value=1 - b2)


def stored(x: Tensor, code: str, group: dict, quantized: bool) -> Tensor:
    """What storage gives back: ``x`` itself, or for the 8-bit variants (tensors of at least
    ``min_quant_size`` elements) its blockwise 8-bit round trip (Dettmers et al. 2022, Section 2)."""
    if not quantized or x.numel() < group["min_quant_size"]:
        return x
    cmap = Q.code_map(code)
    codes, absmax = Q.quantize_blockwise_8bit(x, cmap, group["block_size"])
    return Q.dequantize_blockwise_8bit(codes, absmax, cmap, group["block_size"]).view(x.shape)


def store_adam(m: Tensor, v: Tensor, group: dict, quantized: bool) -> tuple[Tensor, Tensor]:
    """Dettmers et al. 2022: signed dynamic map for ``m``, unsigned for ``v``."""
    return stored(m, "dynamic8_signed", group, quantized), stored(v, "dynamic8_unsigned", group, quantized)


# ---- GaLore ------------------------------------------------------------------------------------


def galore_adamw(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, rank: int | None = None, scale: float = 1.0, moment_policy: str = "keep",
                 quantized: bool = False, **group) -> list[Tensor]:
    """GaLore-AdamW, Zhao et al. 2024, Algorithm 2, as galore-torch 1.0 writes it::

        every T steps (t = 1, T+1, ...):  U, S, V = SVD(G_t);  P_t = U[:, :r]      (line 5)
        R_t = P_t^T G_t                                                            (line 6)
        M <- b1 M + (1 - b1) R ;  V <- b2 V + (1 - b2) R^2                         (lines 7-8)
        N_t = M / (sqrt(V) + eps)                   (eps on the raw sqrt(V))      (line 9)
        W <- W - lr sqrt(1 - b2^t) / (1 - b1^t) * alpha P_t N_t                    (lines 10-11)
        W <- W - lr wd W                            (decay after the update, galore-torch)

    ``quantized``: the 8-bit variant (moments stored through the 8-bit codec after each step).
    """
    b1, b2 = betas
    group = {**group, "rank": rank}
    projected = is_projected(p, rank)
    sub, refreshes, out = None, 0, []
    mom = None
    t0 = 0  # steps before the moments last restarted (moment_policy='reset')
    for t, g in enumerate(grads, start=1):
        if projected:
            sub, refreshes, old = maybe_refresh(g, t, sub, refreshes, group, index)
            low = down(g, sub)
            if mom is None:
                mom = {"m": torch.zeros_like(low), "v": torch.zeros_like(low)}
            elif old:
                mom = carry_moments(moment_policy, mom, old, sub, p.shape)
                t0 = t - 1 if moment_policy == "reset" else t0  # zeroed moments count again from 1
        else:
            low = g
            mom = mom or {"m": torch.zeros_like(g), "v": torch.zeros_like(g)}
        m, v = adam_ema(mom["m"], mom["v"], low, b1, b2)
        n = m / (v.sqrt() + eps)
        mom["m"], mom["v"] = store_adam(m, v, group, quantized)
        step_size = lr * math.sqrt(1 - b2**(t - t0)) / (1 - b1**(t - t0))
        d = scale * up(n, sub, p.shape) if projected else n
        p = p - step_size * d
        p = p * (1 - lr * weight_decay)
        out.append(p)
    return out


def galore_adafactor(p: Tensor, grads: list[Tensor], *, index: int, lr: float | None, eps: tuple[float, float],
                     clip_threshold: float, decay_rate: float, beta1: float | None, weight_decay: float,
                     scale_parameter: bool, relative_step: bool, warmup_init: bool, rank: int | None = None,
                     scale: float = 1.0, moment_policy: str = "keep", **group) -> list[Tensor]:
    """GaLore with Adafactor (Zhao et al. 2024, Section 4.3; Shazeer & Stern 2018, Algorithm 4 with
    the update clipping of Section 6 and the step size of Section 8, as transformers' Adafactor)::

        rho_t = min(1e-2, 1/sqrt(t)) (or 1e-6 t with warm-up init; lr when not relative_step)
        a_t = max(eps2, RMS(W_{t-1})) rho_t   (rho_t alone without scale_parameter)
        R_t = P_t^T G_t  (refreshes as GaLore);  b2_t = 1 - t^c
        r <- b2_t r + (1 - b2_t) mean_cols(R^2 + eps1);  c <- b2_t c + (1 - b2_t) mean_rows(R^2 + eps1)
        U = R / sqrt(r c^T / mean(r))  (a vector keeps v <- b2_t v + (1 - b2_t)(R^2 + eps1), U = R / sqrt(v))
        U <- a_t U / max(1, RMS(U) / d);  with beta1: U <- m <- beta1 m + (1 - beta1) U
        W <- W (1 - a_t wd);  W <- W - alpha P_t U
    """
    eps1, eps2 = eps
    group = {**group, "rank": rank}
    projected = is_projected(p, rank)
    sub, refreshes, out, mom = None, 0, [], None
    t0 = 0  # steps before the statistics last restarted (moment_policy='reset')
    for t, g in enumerate(grads, start=1):
        if relative_step:
            rho = min(1e-6 * t if warmup_init else 1e-2, 1 / math.sqrt(t))
        else:
            rho = lr
        a = rho * max(eps2, float(p.square().mean().sqrt())) if scale_parameter else rho
        if projected:
            sub, refreshes, old = maybe_refresh(g, t, sub, refreshes, group, index)
            low = down(g, sub)
        else:
            low, old = g, None
        if mom is None:
            mom = {"m": torch.zeros_like(low)} if beta1 is not None else {}
            if low.ndim == 2:
                mom.update(row=torch.zeros(low.shape[0]), col=torch.zeros(low.shape[1]))
            else:
                mom.update(v=torch.zeros_like(low))
        elif old and moment_policy == "reset":  # every statistic, the factors too, counted again from 1
            mom = {k: torch.zeros_like(x) for k, x in mom.items()}
            t0 = t - 1
        elif old and moment_policy == "rotate" and "m" in mom:  # the first moment; the factors are kept
            mom["m"] = carry_moments("rotate", {"m": mom["m"]}, old, sub, p.shape)["m"]
        b2t = 1 - (t - t0)**decay_rate
        g2 = low * low + eps1
        if low.ndim == 2:
            mom["row"] = b2t * mom["row"] + (1 - b2t) * g2.mean(dim=1)
            mom["col"] = b2t * mom["col"] + (1 - b2t) * g2.mean(dim=0)
            v_hat = torch.outer(mom["row"] / mom["row"].mean(), mom["col"])
        else:
            mom["v"] = b2t * mom["v"] + (1 - b2t) * g2
            v_hat = mom["v"]
        u = low / v_hat.sqrt()
        u = u / max(1.0, float(u.square().mean().sqrt()) / clip_threshold)
        u = a * u
        if beta1 is not None:
            mom["m"] = beta1 * mom["m"] + (1 - beta1) * u
            u = mom["m"]
        p = p * (1 - a * weight_decay)
        p = p - (scale * up(u, sub, p.shape) if projected else u)
        out.append(p)
    return out


# ---- Fira ---------------------------------------------------------------------------------------


def fira_adamw(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float, rank: int | None = None, scale: float = 1.0, gamma: float = 1.01,
               moment_policy: str = "keep", quantized: bool = False, **group) -> list[Tensor]:
    """Fira, Chen et al. 2024, Algorithm 1 (fira 1.0.2): GaLore-AdamW plus the residual::

        R_t = P^T G_t;  N_t = M / (sqrt(V) + eps)           (as GaLore, Adam's direction psi(R_t))
        phi_t = ||N_t||_col / (||R_t||_col + 1e-8)           (norm-based scaling, Section 4.2: per
                                                              column of an r x n R_t, per row of m x r)
        S_t = phi_t (G_t - alpha P R_t)
        if ||S_t|| > gamma ||S_{t-1}||: S_t <- S_t gamma ||S_{t-1}|| / ||S_t||   (norm-growth limiter,
                                                              Section 4.3; ||S_{t-1}|| the limited norm)
        W <- W - lr sqrt(1 - b2^t) / (1 - b1^t) (alpha P N_t + S_t);  W <- W - lr wd W
    """
    b1, b2 = betas
    group = {**group, "rank": rank}
    projected = is_projected(p, rank)
    sub, refreshes, out, mom, prev_norm = None, 0, [], None, None
    t0 = 0  # steps before the moments last restarted (moment_policy='reset')
    for t, g in enumerate(grads, start=1):
        if projected:
            sub, refreshes, old = maybe_refresh(g, t, sub, refreshes, group, index)
            low = down(g, sub)
            if mom is None:
                mom = {"m": torch.zeros_like(low), "v": torch.zeros_like(low)}
            elif old:
                mom = carry_moments(moment_policy, mom, old, sub, p.shape)
                t0 = t - 1 if moment_policy == "reset" else t0  # zeroed moments count again from 1
        else:
            low = g
            mom = mom or {"m": torch.zeros_like(g), "v": torch.zeros_like(g)}
        m, v = adam_ema(mom["m"], mom["v"], low, b1, b2)
        n = m / (v.sqrt() + eps)
        mom["m"], mom["v"] = store_adam(m, v, group, quantized)
        step_size = lr * math.sqrt(1 - b2**(t - t0)) / (1 - b1**(t - t0))
        if projected:
            dim = 0 if n.shape[0] < n.shape[1] else 1
            phi = n.norm(dim=dim) / (low.norm(dim=dim) + 1e-8)
            s = (g - scale * up(low, sub, p.shape)) * (phi if dim == 0 else phi[:, None])
            norm = s.norm()
            if prev_norm is None:
                prev_norm = norm
            else:
                limiter = max(float(norm / (prev_norm + 1e-8)), gamma) / gamma
                s = s / limiter
                prev_norm = norm / limiter
            d = scale * up(n, sub, p.shape) + s
        else:
            d = n
        p = p - step_size * d
        p = p * (1 - lr * weight_decay)
        out.append(p)
    return out


# ---- FRUGAL -------------------------------------------------------------------------------------


def frugal(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
           weight_decay: float, rank: int | None = None, scale: float = 1.0, moment_policy: str = "reset",
           free_rule: str = "signsgd", free_lr_scale: float = 1.0, quantized: bool = False, **group) -> list[Tensor]:
    """FRUGAL, Zmushko et al. 2024, Algorithm 1: AdamW (torch's) on the subspace, a state-free rule
    on the rest::

        every T steps: a new subspace P (SVD, random, columns, rows, RandK, blocks); moments reset
        R_t = P^T G_t
        M <- b1 M + (1 - b1) R ;  V <- b2 V + (1 - b2) R^2
        D_full = alpha P (M / (1 - b1^s)) / (sqrt(V / (1 - b2^s)) + eps)   (s: steps since the reset)
        D_free = free_lr_scale * sign(G_t - P R_t)    (signSGD; SGD: the residual itself)
        W <- W (1 - lr wd);  W <- W - lr (D_full + D_free)
    """
    b1, b2 = betas
    group = {**group, "rank": rank}
    projected = is_projected(p, rank)
    sub, refreshes, out, mom = None, 0, [], None
    t0 = 0  # steps before the moments last restarted (moment_policy='reset')
    for t, g in enumerate(grads, start=1):
        if projected:
            sub, refreshes, old = maybe_refresh(g, t, sub, refreshes, group, index)
            low = down(g, sub)
            if mom is None:
                mom = {"m": torch.zeros_like(low), "v": torch.zeros_like(low)}
            elif old:
                mom = carry_moments(moment_policy, mom, old, sub, p.shape)
                t0 = t - 1 if moment_policy == "reset" else t0  # zeroed moments count again from 1
        else:
            low = g
            mom = mom or {"m": torch.zeros_like(g), "v": torch.zeros_like(g)}
        m, v = adam_ema(mom["m"], mom["v"], low, b1, b2)
        n = (m / (1 - b1**(t - t0))) / ((v / (1 - b2**(t - t0))).sqrt() + eps)
        mom["m"], mom["v"] = store_adam(m, v, group, quantized)
        if projected:
            residual = g - up(low, sub, p.shape)
            free = torch.sign(residual) if free_rule == "signsgd" else residual
            d = scale * up(n, sub, p.shape) + free_lr_scale * free
        else:
            d = n
        p = p * (1 - lr * weight_decay)
        p = p - lr * d
        out.append(p)
    return out


# ---- Online Subspace Descent ---------------------------------------------------------------------


def pca_loss_grad(basis: Tensor, g: Tensor, side: str) -> Tensor:
    """Gradient of the PCA loss of the normalized gradient ``G_n = G / ||G||`` (Liang et al. 2024,
    Section 3): for a left ``P``, ``L = ||G_n - P P^T G_n||^2`` and ``dL/dP = -2 (E G_n^T + G_n E^T) P``
    with ``E = G_n - P P^T G_n``; for a right ``Q``, ``L = ||G_n - G_n Q^T Q||^2`` and
    ``dL/dQ = -2 Q (E^T G_n + G_n^T E)`` with ``E = G_n - G_n Q^T Q``."""
    gn = g / g.norm()
    if side == "left":
        e = gn - basis @ (basis.t() @ gn)
        return -2 * (e @ gn.t() + gn @ e.t()) @ basis
    e = gn - (gn @ basis.t()) @ basis
    return -2 * basis @ (e.t() @ gn + gn.t() @ e)


def osd_adamw(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
              weight_decay: float, rank: int | None = None, scale: float = 1.0, proj_lr: float = 5e-3,
              proj_optimizer: str = "adam", proj_weight_decay: float | None = None, **group) -> list[Tensor]:
    """Online Subspace Descent, Liang et al. 2024, Algorithm 1, with GaLore's AdamW (as galore-torch)::

        P_0 from the SVD of the first gradient (GaLore's side)
        R_t = P_t^T G_t;  AdamW step as GaLore: W <- W - lr c_t alpha P_t M / (sqrt(V) + eps); W <- W - lr wd W
        P_{t+1} = P_t - proj_lr * Adam(dL/dP)   (or SGD; Adam: betas (0.9, 0.999), eps 1e-8, torch's)
                  on the PCA loss of G_t; the SVD step takes none (P_0 is optimal for G_0), nor a
                  zero gradient
        the basis optimizer's weight decay as the authors' torch.optim.AdamW / SGD (None: their
        defaults, 0.01 / 0): P <- P (1 - proj_lr wd) before the Adam step; SGD: dL/dP + wd P
    """
    pwd = ({"adam": 0.01, "sgd": 0.0}[proj_optimizer] if proj_weight_decay is None else proj_weight_decay)
    b1, b2 = betas
    group = {**group, "rank": rank, "projection": "online_pca"}
    projected = is_projected(p, rank)
    sub, refreshes, out, mom = None, 0, [], None
    pm = pv = None
    pca_t = 0
    for t, g in enumerate(grads, start=1):
        did_svd = False
        if projected:
            sub, refreshes, old = maybe_refresh(g, t, sub, refreshes, group, index)
            did_svd = old is not None
            low = down(g, sub)
        else:
            low = g
        if mom is None:
            mom = {"m": torch.zeros_like(low), "v": torch.zeros_like(low)}
        m, v = adam_ema(mom["m"], mom["v"], low, b1, b2)
        mom["m"], mom["v"] = m, v
        n = m / (v.sqrt() + eps)
        step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        p = p - step_size * (scale * up(n, sub, p.shape) if projected else n)
        p = p * (1 - lr * weight_decay)
        out.append(p)
        if not projected or did_svd or not usable(g):
            continue
        side = "left" if sub["left"] is not None else "right"
        basis = sub[side]
        grad = pca_loss_grad(basis, g, side)
        if proj_optimizer == "sgd":
            basis = basis - proj_lr * (grad + pwd * basis)
        else:
            basis = basis * (1 - proj_lr * pwd)
            pca_t += 1
            pm = torch.zeros_like(basis) if pm is None else pm
            pv = torch.zeros_like(basis) if pv is None else pv
            pm, pv = adam_ema(pm, pv, grad, 0.9, 0.999)
            basis = basis - proj_lr * (pm / (1 - 0.9**pca_t)) / ((pv / (1 - 0.999**pca_t)).sqrt() + 1e-8)
        sub = {**sub, side: basis}
    return out


# ---- configurations ---------------------------------------------------------------------------------

# rank 4, a refresh every 5 steps: refreshes at steps 1, 6, 11 of the suite's 12 (the zero gradient of
# step 9 falls between them; update_proj_gap=1 puts a skipped refresh on it)
SMALL = {"rank": 4, "update_proj_gap": 5}
ADAM = {"lr": 1e-2, "betas": (0.9, 0.99)}
QUANT = {"block_size": 64, "min_quant_size": 16}  # the 4 x 40 / 40 x 4 / 40 moments are quantized

register_reference("galore_adamw", Reference(galore_adamw, configs=(
    {**SMALL},
    {**SMALL, **ADAM, "proj_type": "reverse_std", "scale": 0.5, "weight_decay": 0.1},
    {**SMALL, **ADAM, "proj_type": "left", "projection": "random", "moment_policy": "reset"},
    {**SMALL, **ADAM, "proj_type": "right", "projection": "gaussian", "moment_policy": "rotate", "seed": 3},
    {**SMALL, **ADAM, "proj_type": "full", "projection": "rsvd", "scale": 2.0},
    # eps 1e-3: the exact SVD's two-sided core P^T G Q is diagonal up to rounding (off-diagonal ~1e-6), and
    # Adam's first step normalises each entry, m / (sqrt(v) + eps) ~ sign: at eps 1e-8 that noise's sign, which
    # differs between BLAS builds (AMD vs Intel), became +-lr-sized update terms
    {**SMALL, **ADAM, "proj_type": "full", "moment_policy": "rotate", "eps": 1e-3},
    {**ADAM, "rank": 4, "update_proj_gap": 1, "moment_policy": "rotate", "weight_decay": 0.05},
    {**ADAM, "rank": None, "weight_decay": 0.1},  # full-rank (a rank >= every smaller side is an error)
    # Q-GaLore's lazy refresh: random gradients' first singular vectors meet at |cos| ~ 0.02-0.5, so intervals double
    # at some refreshes and not at others (1 -> 4 or 8 in 12 steps: 4 refreshes, not 11)
    {**ADAM, "rank": 4, "update_proj_gap": 1, "lazy_refresh_threshold": 0.05, "lazy_refresh_patience": 1},
    {**ADAM, "rank": 4, "update_proj_gap": 1, "projection": "rsvd", "proj_type": "full", "lazy_refresh_threshold": 0.1,
     "lazy_refresh_patience": 2},
    # staggered: the three parameters' schedules shifted by 0, 1, 2 steps (refreshes at 1, 5, 9 / 1, 2, 6, 10 /
    # 1, 3, 7, 11); with a lazy refresh, the shifted schedule of each tensor's own interval
    {**ADAM, "rank": 4, "update_proj_gap": 4, "refresh_phase": "staggered"},
    {**ADAM, "rank": 4, "update_proj_gap": 3, "refresh_phase": "staggered", "moment_policy": "rotate",
     "lazy_refresh_threshold": 0.05, "lazy_refresh_patience": 1},
)))

register_reference("galore_adafactor", Reference(galore_adafactor, configs=(
    {**SMALL},  # relative step size, parameter scale
    {**SMALL, "lr": 1e-2, "beta1": 0.9, "weight_decay": 0.1, "proj_type": "reverse_std", "scale": 0.5,
     "moment_policy": "reset"},
    {**SMALL, "lr": 1e-2, "beta1": 0.8, "proj_type": "right", "moment_policy": "rotate", "projection": "random"},
    {"rank": 4, "update_proj_gap": 1, "relative_step": True, "scale_parameter": False, "proj_type": "left",
     "clip_threshold": 0.5, "weight_decay": 0.1},
    {"rank": None, "lr": 1e-2, "beta1": 0.9},  # full-rank (a rank >= every smaller side is an error)
    {"rank": 4, "update_proj_gap": 1, "lr": 1e-2, "relative_step": False, "scale_parameter": False,
     "lazy_refresh_threshold": 0.05, "lazy_refresh_patience": 1},
    {"rank": 4, "update_proj_gap": 3, "lr": 1e-2, "relative_step": False, "scale_parameter": False,
     "refresh_phase": "staggered", "moment_policy": "reset"},
)))

register_reference("fira_adamw", Reference(fira_adamw, configs=(
    {**SMALL},
    {**SMALL, **ADAM, "proj_type": "reverse_std", "scale": 0.5, "gamma": 1.2, "weight_decay": 0.1},
    {**SMALL, **ADAM, "proj_type": "left", "projection": "gaussian", "moment_policy": "rotate"},
    {**SMALL, **ADAM, "proj_type": "right", "projection": "rsvd", "moment_policy": "reset", "gamma": 1.0,
     "power_iters": 1},
    {**ADAM, "rank": 4, "update_proj_gap": 1, "gamma": 1.5},
    {**ADAM, "rank": None},  # full-rank (a rank >= every smaller side is an error)
    {**ADAM, "rank": 4, "update_proj_gap": 1, "proj_type": "left", "lazy_refresh_threshold": 0.05, "lazy_refresh_patience": 1},
    {**ADAM, "rank": 4, "update_proj_gap": 3, "proj_type": "reverse_std", "refresh_phase": "staggered"},
)))

register_reference("frugal", Reference(frugal, configs=(
    {**SMALL},
    {**SMALL, **ADAM, "projection": "columns", "free_rule": "sgd", "free_lr_scale": 0.3, "weight_decay": 0.1},
    {**SMALL, **ADAM, "projection": "rows", "moment_policy": "rotate", "free_lr_scale": 0.5, "seed": 2},
    {**SMALL, **ADAM, "projection": "randk", "moment_policy": "keep", "scale": 0.5},
    {**SMALL, **ADAM, "projection": "blocks", "proj_type": "reverse_std", "free_rule": "sgd"},
    {**ADAM, "rank": 4, "update_proj_gap": 1, "projection": "svd", "proj_type": "left", "moment_policy": "rotate"},
    {**SMALL, **ADAM, "projection": "random", "proj_type": "full", "free_lr_scale": 0.0},
    {**ADAM, "rank": None, "weight_decay": 0.1},  # full-rank: torch's AdamW
    {**ADAM, "rank": 4, "update_proj_gap": 1, "projection": "svd", "proj_type": "reverse_std",
     "lazy_refresh_threshold": 0.1, "lazy_refresh_patience": 2},
    {**ADAM, "rank": 4, "update_proj_gap": 4, "projection": "columns", "refresh_phase": "staggered"},
)))

register_reference("osd_adamw", Reference(osd_adamw, configs=(
    {"rank": 4},
    {"rank": 4, **ADAM, "proj_lr": 1e-2, "scale": 0.5, "weight_decay": 0.1},
    {"rank": 4, **ADAM, "proj_lr": 0.05, "proj_optimizer": "sgd", "proj_type": "reverse_std"},
    {"rank": 4, **ADAM, "proj_lr": 1e-2, "proj_type": "left"},
    # the basis optimizer's own weight decay, large enough to show (AdamW: decoupled; SGD: added to dL/dP)
    {"rank": 4, **ADAM, "proj_lr": 0.05, "proj_weight_decay": 2.0},
    {"rank": 4, **ADAM, "proj_lr": 0.05, "proj_optimizer": "sgd", "proj_weight_decay": 2.0},
    {"rank": None, **ADAM, "weight_decay": 0.1},  # full-rank: GaLore's AdamW, no PCA
)))

register_reference("galore_adamw8bit", Reference(functools.partial(galore_adamw, quantized=True), configs=(
    {**SMALL, **QUANT},
    {**SMALL, **QUANT, **ADAM, "proj_type": "reverse_std", "scale": 0.5, "weight_decay": 0.1, "moment_policy": "reset"},
    {**QUANT, **ADAM, "rank": 4, "update_proj_gap": 1, "projection": "random"},
    {**QUANT, **ADAM, "rank": 4, "update_proj_gap": 1, "lazy_refresh_threshold": 0.05, "lazy_refresh_patience": 1},
    {**QUANT, **ADAM, "rank": 4, "update_proj_gap": 3, "refresh_phase": "staggered", "moment_policy": "reset"},
)))

register_reference("fira_adamw8bit", Reference(functools.partial(fira_adamw, quantized=True), configs=(
    {**SMALL, **QUANT},
    {**SMALL, **QUANT, **ADAM, "proj_type": "reverse_std", "gamma": 1.2, "weight_decay": 0.1},
    {**QUANT, **ADAM, "rank": 4, "update_proj_gap": 1, "moment_policy": "reset"},
)))

register_reference("frugal8bit", Reference(functools.partial(frugal, quantized=True), configs=(
    {**SMALL, **QUANT},
    {**SMALL, **QUANT, **ADAM, "projection": "columns", "free_rule": "sgd", "free_lr_scale": 0.3, "weight_decay": 0.1},
    {**SMALL, **QUANT, **ADAM, "projection": "blocks", "moment_policy": "keep"},
    {**QUANT, **ADAM, "rank": 4, "update_proj_gap": 1, "projection": "randk", "moment_policy": "keep"},
)))
