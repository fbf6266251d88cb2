"""Plain loops of AdEMAMix and AdEMAMix with 8-bit moments, written from the paper (see the package docstring).

Pagliardini, Ablin, Grangier 2024, "The AdEMAMix Optimizer: Better, Faster, Older" (arXiv 2409.03137),
Algorithm 1, with the ``alpha`` / ``beta3`` warmup schedulers of Section 3. The 8-bit moments use
bitsandbytes' block-wise codec (signed dynamic map for ``m1`` and ``m2``, unsigned for ``nu``), called
directly (the storage format of bitsandbytes' ``AdEMAMix8bit``, Dettmers et al. 2022 Section 2); the stored
moments are computed as ``m * b + g * (1 - b)`` with ``add(alpha=...)``, the float order that reproduces the
stored codes bit for bit (as references/lion.py does). The step around them is written freely.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import Reference, register_reference


def _schedules(t: int, alpha: float, beta1: float, beta3: float, t_alpha, t_beta3) -> tuple[float, float]:
    """Section 3: ``alpha(t) = min(t alpha / T_alpha, alpha)``; ``beta3(t) = min(exp(ln b1 ln b3 / ((1 - t/T)
    ln b3 + (t/T) ln b1)), b3)`` for ``t <= T`` (``b3`` after)."""
    a = alpha if t_alpha is None else min(t * alpha / t_alpha, alpha)
    if t_beta3 is None or t > t_beta3:
        return a, beta3
    s = t / t_beta3
    b3 = math.exp(math.log(beta1) * math.log(beta3) / ((1 - s) * math.log(beta3) + s * math.log(beta1)))
    return a, min(b3, beta3)


def ademamix(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], beta3: float,
             alpha: float, t_alpha, t_beta3, eps: float, weight_decay: float, quantize=None, **_) -> list[Tensor]:
    """AdEMAMix, Algorithm 1::

        m1 <- b1 m1 + (1 - b1) g;  m2 <- b3(t) m2 + (1 - b3(t)) g;  nu <- b2 nu + (1 - b2) g^2
        p  <- p - lr ((m1 / (1 - b1^t) + alpha(t) m2) / (sqrt(nu / (1 - b2^t)) + eps) + wd p)

    ``quantize(name, x)``: the stored value of moment ``name`` (the 8-bit loop's codec), ``None``: float32."""
    b1, b2 = betas
    m1, m2, nu, out = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p), []
    for t, g in enumerate(grads, start=1):
        a, b3 = _schedules(t, alpha, b1, beta3, t_alpha, t_beta3)
        m1 = torch.add(m1 * b1, g, alpha=1 - b1)
        m2 = torch.add(m2 * b3, g, alpha=1 - b3)
        nu = torch.addcmul(nu * b2, g, g, value=1 - b2)
        m1_hat = m1 / (1 - b1**t)
        nu_hat = nu / (1 - b2**t)
        p = p - lr * ((m1_hat + a * m2) / (nu_hat.sqrt() + eps) + weight_decay * p)
        if quantize is not None:
            m1, m2, nu = quantize("m1", m1), quantize("m2", m2), quantize("nu", nu)
        out.append(p)
    return out


def ademamix8bit(p: Tensor, grads: list[Tensor], *, index: int, block_size: int, min_quant_size: int,
                 **group) -> list[Tensor]:
    """:func:`ademamix` with ``m1``, ``m2`` (signed dynamic map) and ``nu`` (unsigned) stored as 8-bit codes of blocks
    of ``block_size`` (absmax per block) when ``p`` has at least ``min_quant_size`` elements: encoded after each
    step, decoded for the next."""
    import bitsandbytes.functional as bnbF

    codes = {"m1": bnbF.create_dynamic_map(signed=True), "m2": bnbF.create_dynamic_map(signed=True),
             "nu": bnbF.create_dynamic_map(signed=False)}

    def quantize(name: str, x: Tensor) -> Tensor:
        c, state = bnbF.quantize_blockwise(x.flatten(), code=codes[name], blocksize=block_size)
        return bnbF.dequantize_blockwise(c, state).view(x.shape)

    return ademamix(p, grads, index=index, quantize=quantize if p.numel() >= min_quant_size else None, **group)


register_reference("ademamix", Reference(ademamix, configs=(
    {},
    {"lr": 3e-3, "betas": (0.8, 0.95), "beta3": 0.999, "alpha": 8.0, "weight_decay": 0.5},
    {"lr": 1e-3, "t_alpha": 6, "t_beta3": 8},  # the schedulers: both warmups end inside the 12 steps
    {"lr": 1e-3, "betas": (0.0, 0.999), "alpha": 0.0, "weight_decay": 0.0},  # alpha = 0, beta1 = 0: Adam without m1
)))

register_reference("ademamix8bit", Reference(ademamix8bit, configs=(
    {"min_quant_size": 64, "block_size": 64},
    {"min_quant_size": 64, "block_size": 256, "lr": 3e-3, "betas": (0.8, 0.95), "t_alpha": 4, "t_beta3": 6},
    {},  # every tensor of the suite under min_quant_size: float32 moments
)))
