"""AdEMAMix (Pagliardini, Ablin, Grangier 2024, "The AdEMAMix Optimizer: Better, Faster, Older",
arXiv 2409.03137, Algorithm 1 and Section 3).

AdEMAMix is Adam with a second, slow momentum ``m2`` (decay ``beta3`` close to 1) mixed into the
numerator with weight ``alpha``::

    m1_t = beta1 m1_{t-1} + (1 - beta1) g_t                          (Algorithm 1: the fast EMA)
    m2_t = beta3 m2_{t-1} + (1 - beta3) g_t                          (the slow EMA; beta3 -> beta3(t) with t_beta3)
    nu_t = beta2 nu_{t-1} + (1 - beta2) g_t^2                        (Adam's second moment)
    m1_hat = m1_t / (1 - beta1^t),  nu_hat = nu_t / (1 - beta2^t)    (bias corrections: m2 has none)
    theta_t = theta_{t-1} - lr ((m1_hat + alpha m2_t) / (sqrt(nu_hat) + eps) + lambda theta_{t-1})

with the warmup schedulers of Section 3 (``alpha`` and ``beta3`` scheduled with ``T_alpha`` / ``T_beta3``):
``alpha(t) = min(t alpha / T_alpha, alpha)`` and ``beta3(t) = min(exp(ln(beta1) ln(beta3) /
((1 - t / T_beta3) ln(beta3) + (t / T_beta3) ln(beta1))), beta3)`` (the half-life of ``m2`` grows
linearly from ``beta1``'s to ``beta3``'s).

The weight decay and the parameter step are the engine's (:func:`~lowmem.optim.functional.adam.
decoupled_weight_decay_`, ``apply_update_``: ``theta (1 - lr lambda) - lr d``): the functions here
return the unitless direction ``d``. The EMAs are written ``x * beta + g * (1 - beta)`` (``mul`` then
``add(alpha=...)``) and the direction as ``(m1 / c1 + alpha m2) / (sqrt(nu) / c2 + eps)``, the operations of
bitsandbytes' ``AdEMAMix`` (CPU implementation of ``optimizer_update_32bit`` / ``_8bit_blockwise``), so the
float32 results and the 8-bit codes are the same bits as its (tests/test_ademamix.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def alpha_schedule(t: float, alpha: float, t_alpha: int | None) -> float:
    """``alpha(t) = min(t alpha / T_alpha, alpha)`` (Section 3, the linear warmup of ``alpha``); ``alpha``
    itself when ``t_alpha`` is ``None``."""
    if t_alpha is None:
        return alpha
    return min(t * alpha / t_alpha, alpha)


def beta3_schedule(t: float, beta1: float, beta3: float, t_beta3: int | None) -> float:
    """``beta3(t) = min(exp(ln b1 ln b3 / ((1 - t/T) ln b3 + (t/T) ln b1)), b3)`` (Section 3: the slow EMA's
    half-life ``ln(0.5) / ln(beta)`` interpolated linearly from ``beta1``'s at ``t = 0`` to ``beta3``'s at
    ``t = T_beta3``); ``beta3`` itself when ``t_beta3`` is ``None`` and after ``T_beta3`` steps (where the
    interpolation's clamp gives ``beta3`` for ``beta1 <= beta3``, and for ``beta1 > beta3`` its denominator
    could reach 0). Needs ``0 < beta1, beta3 < 1`` when ``t_beta3`` is set (the recipe checks it)."""
    if t_beta3 is None or t > t_beta3:
        return beta3
    ln1, ln3 = math.log(beta1), math.log(beta3)
    s = t / t_beta3
    return min(math.exp((ln1 * ln3) / ((1 - s) * ln3 + s * ln1)), beta3)


def ademamix_moments_(m1: Tensor, m2: Tensor, nu: Tensor, g: Tensor, beta1: float, beta2: float,
                      beta3: float) -> None:
    """The three EMAs in place (Algorithm 1, the three EMAs): ``m1 <- b1 m1 + (1 - b1) g``,
    ``m2 <- b3 m2 + (1 - b3) g``, ``nu <- b2 nu + (1 - b2) g^2``. ``beta3`` is the step's (scheduled)
    value. ``g`` is read in ``m1``'s dtype. Allocates nothing (beyond a cast of ``g``)."""
    g = g.to(m1.dtype)
    m1.mul_(beta1).add_(g, alpha=1.0 - beta1)
    m2.mul_(beta3).add_(g, alpha=1.0 - beta3)
    nu.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)


def ademamix_direction(m1: Tensor, m2: Tensor, nu: Tensor, t: float, beta1: float, beta2: float, alpha: float,
                       eps: float) -> Tensor:
    """``(m1 / (1 - b1^t) + alpha m2) / (sqrt(nu) / sqrt(1 - b2^t) + eps)`` (Algorithm 1, the update; ``alpha``
    the step's, scheduled value) as a new tensor of ``m1``'s dtype. Two temporaries of the moments' size
    at most: ``alpha m2`` (which becomes the numerator and then the direction), ``m1 / c1`` (added, freed),
    then ``sqrt(nu)`` (the denominator). The sum is taken as ``alpha m2 + m1 / c1``, each term rounded once
    as in bitsandbytes (a fused ``add(alpha=...)`` would round once for both)."""
    c1 = 1.0 - beta1**t
    c2 = math.sqrt(1.0 - beta2**t)
    d = torch.mul(m2, alpha)
    d.add_(torch.div(m1, c1))
    denom = nu.sqrt().div_(c2).add_(eps)
    return d.div_(denom)


def ademamix_moments_foreach_(m1s: list[Tensor], m2s: list[Tensor], nus: list[Tensor], gs: list[Tensor], beta1: float,
                              beta2: float, beta3: float) -> None:
    """:func:`ademamix_moments_` of float32 tensors (Algorithm 1's three EMAs), one multi-tensor kernel per operation
    in the same order; in place, allocates nothing. The first half of :func:`ademamix_direction_foreach`: the last
    read of ``gs`` (a caller's float32 copies may be freed before :func:`ademamix_direction_from_moments_foreach`)."""
    torch._foreach_mul_(m1s, beta1)
    torch._foreach_add_(m1s, gs, alpha=1.0 - beta1)
    torch._foreach_mul_(m2s, beta3)
    torch._foreach_add_(m2s, gs, alpha=1.0 - beta3)
    torch._foreach_mul_(nus, beta2)
    torch._foreach_addcmul_(nus, gs, gs, value=1.0 - beta2)


def ademamix_direction_from_moments_foreach(m1s: list[Tensor], m2s: list[Tensor], nus: list[Tensor], t: float,
                                            beta1: float, beta2: float, alpha: float, eps: float) -> list[Tensor]:
    """:func:`ademamix_direction` of float32 tensors whose moments are updated
    (:func:`ademamix_moments_foreach_`), one multi-tensor kernel per operation in the same order. Returns the new
    directions; peak: the directions, ``m1 / c1``'s quotients (freed), then the denominators (freed): two float32
    tensors of the bucket."""
    c1 = 1.0 - beta1**t
    c2 = math.sqrt(1.0 - beta2**t)
    ds = torch._foreach_mul(m2s, alpha)
    q = torch._foreach_div(m1s, c1)
    torch._foreach_add_(ds, q)
    del q
    denoms = torch._foreach_sqrt(nus)
    torch._foreach_div_(denoms, c2)
    torch._foreach_add_(denoms, eps)
    torch._foreach_div_(ds, denoms)
    return ds


def ademamix_direction_foreach(m1s: list[Tensor], m2s: list[Tensor], nus: list[Tensor], gs: list[Tensor], t: float,
                               beta1: float, beta2: float, beta3: float, alpha: float, eps: float) -> list[Tensor]:
    """:func:`ademamix_moments_` then :func:`ademamix_direction` of float32 tensors, one multi-tensor kernel per
    operation (the same operations in the same order, each tensor's: equal bit for bit on the CPU):
    :func:`ademamix_moments_foreach_` then :func:`ademamix_direction_from_moments_foreach`. Returns the new
    directions; the moments are updated in place. Peak beside the moments: the directions, ``m1 / c1``'s
    quotients (freed), then the denominators (freed): two float32 tensors of the bucket."""
    ademamix_moments_foreach_(m1s, m2s, nus, gs, beta1, beta2, beta3)
    return ademamix_direction_from_moments_foreach(m1s, m2s, nus, t, beta1, beta2, alpha, eps)
