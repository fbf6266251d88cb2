"""SPAM (Huang et al. 2025) and Stable-SPAM (Huang et al. 2025): spike-aware gradient stabilizers.

* SPAM: "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training" (ICLR 2025),
  Algorithm 1: spike-aware clipping of ``g_i`` against ``theta * v_i``, a momentum reset every
  ``Delta T`` steps and a cosine learning-rate warm-up after each reset.
* Stable-SPAM: "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam" (2025),
  Algorithm 1: AdaClip (clip to a bias-corrected running max of ``|g|``), AdaGN (rescale ``g`` by
  running statistics of its norm) and MoRet (momentum reset). Its reference implementation
  optionally decays ``beta1`` (and AdaGN's ``gamma1``) on a cosine schedule (``t_max``).

All functions are out of place (the input may be ``p.grad``) and free of host synchronisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def spike_clip(g: Tensor, v: Tensor, threshold: float) -> Tensor:
    """SPAM's spike-aware clipping (Algorithm 1, lines 6-8).

    Entries with ``g_i^2 > theta v_i`` are spikes and become ``sign(g_i) sqrt(theta v_i)``; ``v`` is
    the optimizer's (uncorrected) second moment before this step.
    """
    bound = (v * threshold).sqrt()
    return torch.where(g.square() > threshold * v, g.sign() * bound, g)


def spam_clip_active(t: int, reset_interval: int, accumulation_steps: int) -> bool:
    """Whether SPAM clips at 1-based step ``t``: only once ``v`` has ``accumulation_steps`` steps of
    history since the start and since the last reset (the reference implementation's
    ``grad_accu_steps``, default 20)."""
    if t < accumulation_steps:
        return False
    return reset_interval == 0 or t % reset_interval >= accumulation_steps


def is_reset_step(t: int, reset_interval: int) -> bool:
    """Momentum reset (SPAM Algorithm 1, line 4; Stable-SPAM's MoRet): moments are zeroed before the
    update at every step ``t`` that is a multiple of ``Delta T``."""
    return reset_interval > 0 and t % reset_interval == 0


def spam_warmup_scale(t: int, reset_interval: int, warmup_steps: int) -> float:
    """SPAM's learning-rate multiplier after a momentum reset (Section 3, "cosine warm-up").

    ``c = t mod Delta T`` steps after the last reset (none before the first), the multiplier is
    ``1 - 0.99 (1 + cos(pi c / (W + 1))) / 2`` for ``c < W`` and 1 afterwards: 0.01 at the reset
    step, rising to 1 over ``W = warmup_steps`` steps, as in the reference implementation.
    """
    if reset_interval == 0 or t < reset_interval or warmup_steps == 0:
        return 1.0
    c = t % reset_interval
    if c >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * c / (warmup_steps + 1))) / 2.0


def steps_since_reset(t: int, reset_interval: int) -> int:
    """Bias-correction step count after Stable-SPAM's momentum reset: it restarts at 1 on the reset step."""
    if reset_interval == 0 or t < reset_interval:
        return t
    return t % reset_interval + 1


def stats_step(t: int, reset_interval: int) -> int:
    """AdaClip's / AdaGN's bias-correction count in the authors' Stable-SPAM code.

    There one counter serves Adam and the norm statistics; it is set to 1 on a reset step after
    the statistics were updated, so the statistics see ``t`` up to the first reset and
    ``steps_since_reset(t - 1) + 1`` after it (2 on the step after a reset, ``Delta T + 1`` on the next
    reset step), while their EMAs themselves are not reset.
    """
    if reset_interval == 0 or t <= reset_interval:
        return t
    return steps_since_reset(t - 1, reset_interval) + 1


def cosine_beta1_scale(t: int, t_max: int | None, floor: float = 0.5) -> float:
    """Multiplier of ``beta1`` and of AdaGN's ``gamma1`` at 1-based step ``t`` (Stable-SPAM's optional decay).

    Not in the paper's Algorithm 1; the reference implementation (``StableSPAM(total_T=...)``,
    ``t_max`` in pytorch-optimizer's port) takes a cosine-annealing schedule from 1 to
    ``eta_min = 0.5`` with period parameter ``t_max + 1`` (torch's ``CosineAnnealingLR`` in closed
    form) and multiplies both ``beta1`` (Adam's first moment and its bias correction) and ``gamma1``
    (AdaGN's norm EMA and its bias correction) by it::

        s_t = floor + (1 - floor) (1 + cos(pi t / (t_max + 1))) / 2

    ``s_t`` reaches ``floor`` at ``t = t_max + 1`` and, as in the reference, rises again after it
    (the cosine is not clamped). ``t_max = None`` disables the decay (``s_t = 1``).
    """
    if t_max is None:
        return 1.0
    return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * t / (t_max + 1))) / 2.0


def ada_clip(g: Tensor, max_ema: Tensor, theta: float, t: int) -> Tensor:
    """Stable-SPAM's AdaClip (Algorithm 1, lines 5-8); updates ``max_ema`` in place.

    ``m_max = theta m_max + (1 - theta) max|g|``; ``m_hat = m_max / (1 - theta^t)``; entries with
    ``|g_i| > m_hat`` are scaled by ``m_hat / max|g|``.
    """
    g_max = abs_max(g).float()  # the statistics are float32 (as the chunked step's), also for a float64 g
    bound = ada_clip_bound_(max_ema, g_max, theta, t)
    return ada_clip_apply(g, g_max, bound)


def ada_clip_bound_(max_ema: Tensor, g_max: Tensor, theta: float, t: int) -> Tensor:
    """AdaClip's statistics (Algorithm 1, lines 5-6), in place: ``m_max = theta m_max + (1 - theta) max|g|``;
    returns the bias-corrected bound ``m_hat = m_max / (1 - theta^t)`` (0-d)."""
    max_ema.lerp_(g_max, 1.0 - theta)
    return max_ema / (1.0 - theta**t)


def ada_clip_apply(g: Tensor, g_max: Tensor, bound: Tensor) -> Tensor:
    """AdaClip's clipping (Algorithm 1, lines 7-8): entries with ``|g_i| > m_hat`` become
    ``g_i m_hat / max|g|``. Element-wise, so it applies to any chunk of ``g`` given the whole
    tensor's ``max|g|``.

    Computed as ``torch.where(|g| > m_hat, g / max|g| * m_hat, g)`` with the same operations in the
    same order (so the same bits), but into one result tensor and one boolean mask: ``|g|`` is
    written into the result, compared, then overwritten by ``g / max|g| * m_hat`` and the ``where``
    (issue 15: four fresh float temporaries per call made this the Stable-SPAM step's largest cost
    on the CPU, each a fresh allocation of the chunk's size)."""
    out = torch.abs(g)
    mask = torch.gt(out, bound)
    torch.div(g, g_max, out=out)
    out.mul_(bound)
    return torch.where(mask, out, g, out=out)


def abs_max(g: Tensor) -> Tensor:
    """``max |g_i|`` (0-d, in ``g``'s dtype; exact) as ``max(max g, -min g)`` from one ``aminmax`` pass:
    the same value as ``g.abs().amax()`` or ``vector_norm(g, inf)`` (NaN propagates alike), about 10x
    faster than the latter on the CPU (issue 15). An empty ``g`` (a zero-size parameter, an empty shard)
    gives 0, as ``vector_norm(g, inf)`` does (``aminmax`` has no identity and raises)."""
    if g.numel() == 0:
        return g.new_zeros(())
    lo, hi = torch.aminmax(g)
    return torch.maximum(hi, lo.neg())


def ada_gn(g: Tensor, norm_m: Tensor, norm_v: Tensor, gamma1: float, gamma2: float, t: int, eps: float) -> Tensor:
    """Stable-SPAM's AdaGN (Algorithm 1, lines 9-12); updates the norm statistics in place.

    ``m_n = gamma1 m_n + (1 - gamma1) ||g||``, ``v_n = gamma2 v_n + (1 - gamma2) ||g||^2``;
    ``g <- g / ||g|| * m_hat_n / (sqrt(v_hat_n) + eps)`` with bias-corrected statistics. A zero
    gradient stays zero and the norm statistics do not move (the authors' code updates them with
    ``||g|| = 0``; pytorch-optimizer skips the parameter's step: see docs/compressed.md).
    """
    # the statistics are float32 (as the chunked step's), also for a float64 g
    norm = torch.linalg.vector_norm(g.float())
    return g * ada_gn_scale_(norm, norm_m, norm_v, gamma1, gamma2, t, eps, torch.finfo(torch.float32).tiny)


def ada_gn_scale_(
    norm: Tensor, norm_m: Tensor, norm_v: Tensor, gamma1: float, gamma2: float, t: int, eps: float, tiny: float
) -> Tensor:
    """AdaGN's factor (Algorithm 1, lines 9-12) from the gradient's norm ``||g||``, updating the norm
    statistics in place: ``m_hat_n / (sqrt(v_hat_n) + eps) / ||g||`` (0 for a zero gradient), a 0-d
    tensor that multiplies every chunk of ``g``."""
    nonzero = norm > 0
    # (each statistic selected into itself, ``out=``: the same values as a ``where`` copied back, one kernel fewer)
    torch.where(nonzero, torch.lerp(norm_m, norm, 1.0 - gamma1), norm_m, out=norm_m)
    torch.where(nonzero, torch.lerp(norm_v, norm.square(), 1.0 - gamma2), norm_v, out=norm_v)
    m_hat = norm_m / (1.0 - gamma1**t)
    v_hat = norm_v / (1.0 - gamma2**t)
    return torch.where(nonzero, m_hat / (v_hat.sqrt() + eps) / norm.clamp(min=tiny), 0.0)
