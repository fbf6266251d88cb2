"""Adafactor (Shazeer & Stern, 2018): factored second moments, update clipping, relative step."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rms(x: Tensor) -> Tensor:
    """Root mean square, ``RMS(X) = sqrt(mean(X^2))`` (Section 5). A 0-d tensor: no host sync."""
    return x.norm(2) / math.sqrt(x.numel())


def adafactor_beta2(t: float, decay_rate: float) -> float:
    """Increasing second-moment decay ``beta2_t = 1 - t^c`` (Section 7.2, ``c = decay_rate = -0.8``)."""
    return 1.0 - math.pow(t, decay_rate)


def factored_second_moment_(row: Tensor, col: Tensor, g2: Tensor, beta2: float) -> None:
    """Update the factored second moment in place (Algorithm 4, lines 5-6).

    ``R_t = beta2 R_{t-1} + (1 - beta2) mean_cols(g^2 + eps1)``;
    ``C_t = beta2 C_{t-1} + (1 - beta2) mean_rows(g^2 + eps1)``. Mean instead of sum, as in the
    reference implementation: the ratio in :func:`factored_rsqrt` is the same.
    ``g2`` must already hold ``g^2 + eps1``. Works on the last two dimensions of any ``ndim >= 2``
    tensor (leading dimensions are batch dimensions).
    """
    row.mul_(beta2).add_(g2.mean(dim=-1), alpha=1.0 - beta2)
    col.mul_(beta2).add_(g2.mean(dim=-2), alpha=1.0 - beta2)


def factored_rsqrt(row: Tensor, col: Tensor) -> Tensor:
    """``1 / sqrt(V_hat)`` with ``V_hat = R C / (1^T R)`` (Algorithm 4, line 7), as an outer product.

    Normalizing ``R`` by its mean (not its sum) matches the mean-based statistics above.
    """
    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    c_factor = col.unsqueeze(-2).rsqrt()
    return torch.mul(r_factor, c_factor)


def clip_by_rms_(u: Tensor, threshold: float) -> Tensor:
    """Update clipping ``U / max(1, RMS(U) / d)`` (Section 6, eq. 12; ``d = clip_threshold``)."""
    return u.div_((rms(u) / threshold).clamp_(min=1.0))


def adafactor_relative_lr(t: float, warmup_init: bool) -> float:
    """Relative step size ``rho_t = min(1e-2, 1/sqrt(t))`` (Section 8; ``1e-6 t`` with warm-up init)."""
    min_step = 1e-6 * t if warmup_init else 1e-2
    return min(min_step, 1.0 / math.sqrt(t))


def adafactor_param_scale(p: Tensor, eps2: float) -> Tensor:
    """Parameter scale ``max(eps2, RMS(X_{t-1}))`` (Section 8), as a 0-d tensor."""
    return rms(p).clamp(min=eps2)


