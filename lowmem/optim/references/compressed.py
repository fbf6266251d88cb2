"""Plain loops of the compressed-state and spike-aware recipes, written from their papers (see the
package docstring): SPAM, Stable-SPAM, AdamW with 8-bit / 4-bit / rank-1 4-bit moments, MicroAdam.

What is shared with the implementation, and why:

* 8-bit moments: bitsandbytes' blockwise codec (``functional.quant.quantize_blockwise_8bit`` /
  ``dequantize_blockwise_8bit`` and its dynamic maps). The storage format *is* bitsandbytes'
  (Dettmers et al. 2022, Section 2), and its CPU kernel picks the nearest code or its neighbour,
  which no plain nearest search reproduces; the Adam math around it is written here.
* 4-bit moments: only the 16 values of the signed dynamic-exponent map (``code_map
  ("dynamic4_signed")``, bitsandbytes' ``create_dynamic_map``: a table, the format's definition).
  Block-wise absmax normalization, rank-1 normalization (Li et al. 2023, Section 4.2), the
  zero-free linear map (Section 4.1) and the nearest-code rounding are written here, so a change to
  any of them in the engine shows.
* MicroAdam: nothing. Top-k per block, the 4-bit min/max error codec and the window are written
  here from Algorithm 1 of Modoranu et al. 2024.

Bit compatibility: a quantized moment is a function of the gradients only, but a value one ulp
away from a rounding boundary of a code flips to the neighbouring code, which moves the step by a
whole code step. So the moments that are stored quantized are computed with the same float
operations as the implementation (``torch.lerp`` for ``b1 m + (1 - b1) g``, ``torch.addcmul`` for
``b2 v + (1 - b2) g^2``, MicroAdam's ``g + Q^{-1}(e)`` and ``floor((a - delta) / u + 1/2)``): the
same equations written in the one order that reproduces the stored codes bit for bit. Everything
downstream of the codes (the step) is written freely and compared at rtol 1e-5.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..functional import quant as Q
from . import Reference, register_reference


# ---- SPAM (Huang et al. 2025, "SPAM: Spike-Aware Adam with Momentum Reset") ------------------


def spam(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
         weight_decay: float, threshold: float, reset_interval: int, warmup_steps: int, grad_accu_steps: int,
         **_) -> list[Tensor]:
    """SPAM, Algorithm 1, as the authors' AdamW runs it (docs/compressed.md)::

        if t mod DeltaT == 0:  m <- 0, v <- 0                                   (momentum reset, l.4)
        if theta > 0 and t >= N and (DeltaT == 0 or t mod DeltaT >= N):      (N = grad_accu_steps)
            spikes: g_i^2 > theta v_i  ->  g_i <- sign(g_i) sqrt(theta v_i)    (spike clipping, l.6-8)
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        p <- p - lr s_c sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)       (eps on the raw sqrt(v))
        p <- p (1 - lr wd)                                                     (after the step, not warmed up)

    ``s_c = 1 - 0.99 (1 + cos(pi c / (W + 1))) / 2`` for ``c < W = warmup_steps`` steps since the
    last reset (``c = 0`` on the reset step; 1 before the first reset), the cosine warm-up of
    Section 3. Bias corrections count from the first step (they do not restart at a reset).
    """
    b1, b2 = betas
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    since_reset = None  # no warm-up before the first reset
    for t, g in enumerate(grads, start=1):
        if reset_interval > 0 and t % reset_interval == 0:
            m, v = torch.zeros_like(p), torch.zeros_like(p)
            since_reset = 0
        elif since_reset is not None:
            since_reset += 1
        history = t >= grad_accu_steps and (reset_interval == 0 or t % reset_interval >= grad_accu_steps)
        if threshold > 0 and history:
            spike = g * g > threshold * v
            g = torch.where(spike, torch.sign(g) * torch.sqrt(threshold * v), g)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if since_reset is not None and since_reset < warmup_steps:
            scale = 1.0 - 0.99 * (1.0 + math.cos(math.pi * since_reset / (warmup_steps + 1))) / 2.0
        else:
            scale = 1.0
        p = p - lr * scale * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
        p = p * (1 - lr * weight_decay)
        out.append(p)
    return out


register_reference("spam", Reference(spam, configs=(
    {},  # reset every 500, clipping after 20 steps: plain Adam (hf eps) over 12 steps
    # no clipping (threshold 0); resets at 4, 8, 12 with a 2-step warm-up; decay after the step
    {"threshold": 0.0, "reset_interval": 4, "warmup_steps": 2, "lr": 1e-2, "weight_decay": 0.1},
    # clipping from step 2, never a reset: the spike at step 5 is clipped
    {"grad_accu_steps": 2, "reset_interval": 0, "lr": 1e-2},
    # a small threshold (ordinary entries are clipped too) with resets at 6 and 12 and a 3-step warm-up
    {"threshold": 50.0, "reset_interval": 6, "warmup_steps": 3, "grad_accu_steps": 2, "betas": (0.8, 0.95),
     "eps": 1e-8, "weight_decay": 0.05},
)))


# ---- Stable-SPAM (Huang et al. 2025, "Stable-SPAM: How to Train in 4-Bit More Stably") --------


def stable_spam(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
                weight_decay: float, gamma1: float, gamma2: float, theta: float, reset_interval: int,
                t_max: int | None, stats_step: str, **_) -> list[Tensor]:
    """Stable-SPAM, Algorithm 1, with the authors' step counter and optional cosine decay::

        p <- p (1 - lr wd)                                                    (before the step)
        AdaClip (l.5-8):  m_max <- theta m_max + (1 - theta) max|g| ;  b = m_max / (1 - theta^k_s)
                          |g_i| > b  ->  g_i <- g_i b / max|g|
        AdaGN (l.9-12):   m_n <- g1 m_n + (1 - g1) ||g|| ;  v_n <- gamma2 v_n + (1 - gamma2) ||g||^2
                          g <- g / ||g|| (m_n / (1 - g1^k_s)) / (sqrt(v_n / (1 - gamma2^k_s)) + eps)
        MoRet:            t mod DeltaT == 0:  m <- 0, v <- 0, k <- 1 (the bias corrections restart)
        Adam:             m <- b1' m + (1 - b1') g ;  v <- b2 v + (1 - b2) g^2
                          p <- p - lr (m / (1 - b1'^k)) / (sqrt(v / (1 - b2^k)) + eps)

    ``k`` counts steps since the last reset (the authors' ``state['step']``, set to 1 on a reset
    step). The statistics' count ``k_s`` is the global step ``t`` (``stats_step="global"``,
    pytorch-optimizer's port) or, with ``"since_reset"``, that same counter *before* the reset sets
    it to 1 (the authors' code: the statistics' EMAs are never reset, their correction is).
    ``t_max`` (the reference's ``total_T``): ``b1' = b1 s_t`` and ``g1 = gamma1 s_t`` with
    ``s_t = 0.5 + 0.25 (1 + cos(pi t / (t_max + 1)))`` (torch's ``CosineAnnealingLR`` to 0.5 in
    closed form, not clamped after ``t_max + 1``); else ``s_t = 1``. A zero gradient stays zero and
    leaves the norm statistics unchanged (documented: the paper's ``g / ||g||`` is undefined there).
    """
    b1_base, b2 = betas
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    m_max = norm_m = norm_v = torch.tensor(0.0)
    k = 0
    for t, g in enumerate(grads, start=1):
        k += 1
        k_s = t if stats_step == "global" else k
        s = 1.0 if t_max is None else 0.5 + 0.25 * (1.0 + math.cos(math.pi * t / (t_max + 1)))
        b1, g1 = b1_base * s, gamma1 * s
        p = p * (1 - lr * weight_decay)
        # AdaClip
        g_max = g.abs().max()
        m_max = theta * m_max + (1 - theta) * g_max
        bound = m_max / (1 - theta**k_s)
        g = torch.where(g.abs() > bound, g / g_max * bound, g)
        # AdaGN
        norm = torch.linalg.vector_norm(g)
        if norm > 0:
            norm_m = g1 * norm_m + (1 - g1) * norm
            norm_v = gamma2 * norm_v + (1 - gamma2) * norm**2
            g = g / norm * (norm_m / (1 - g1**k_s)) / ((norm_v / (1 - gamma2**k_s)).sqrt() + eps)
        # MoRet
        if reset_interval > 0 and t % reset_interval == 0:
            m, v, k = torch.zeros_like(p), torch.zeros_like(p), 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
        out.append(p)
    return out


register_reference("stable_spam", Reference(stable_spam, configs=(
    {},  # no reset within 12 steps, no cosine decay; AdaClip clips the spike at step 5
    # resets at 4, 8, 12 with the authors' counter in AdaClip / AdaGN; weight decay before the step
    {"reset_interval": 4, "stats_step": "since_reset", "lr": 1e-2, "weight_decay": 0.1},
    # resets at 5 and 10 with the global count; t_max inside the run: s_t falls to 0.5 at t = 7, rises after
    {"reset_interval": 5, "t_max": 6, "theta": 0.9, "gamma1": 0.5, "gamma2": 0.95},
    # never reset, a fast max EMA (AdaClip bites often), slow cosine decay, since_reset without resets
    {"reset_interval": 0, "t_max": 20, "theta": 0.5, "betas": (0.8, 0.99), "eps": 1e-6, "stats_step": "since_reset"},
)))
