"""Fira (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?"): the gradient outside GaLore's subspace is used, scaled like the low-rank update."""

from __future__ import annotations

import torch
from torch import Tensor


def norm_based_scaling(residual: Tensor, low_direction: Tensor, low_grad: Tensor, eps: float = 1e-8) -> Tensor:
    """Scaled residual ``phi(R) (G - P P^T G)`` (Section 4.2, eq. 7-8, column-wise as in fira 1.0.2).

    ``phi = ||psi(R)||_col / ||R||_col``: how much the optimizer (``psi``, here Adam) rescales each
    column of the low-rank gradient ``R``; the residual's matching column is scaled by it. The norm is
    taken along the low-rank dimension: per column of an ``r x n`` tensor, per row of ``m x r``.
    """
    return residual * scaling_factor(low_direction, low_grad, eps)


def scaling_factor(low_direction: Tensor, low_grad: Tensor, eps: float = 1e-8) -> Tensor:
    """The factor ``phi`` of :func:`norm_based_scaling`, shaped to broadcast against the residual:
    ``[n]`` (one per column) for an ``r x n`` low-rank tensor, ``[m, 1]`` (one per row) for ``m x r``.
    Rows ``a:b`` of the residual take ``factor`` or ``factor[a:b]``."""
    dim = 0 if low_direction.shape[0] < low_direction.shape[1] else 1
    factor = low_direction.norm(dim=dim) / (low_grad.norm(dim=dim) + eps)
    return factor.unsqueeze(1) if dim == 1 else factor


def norm_growth_limit(scaled: Tensor, previous_norm: Tensor, gamma: float, eps: float = 1e-8) -> Tensor:
    """Norm-growth limiter (Section 4.3, eq. 9): if ``||S_t|| / ||S_{t-1}|| > gamma``, rescale
    ``S_t`` to ``gamma ||S_{t-1}||``. Updates ``previous_norm`` (0-d) in place; returns ``S_t``.

    A negative ``previous_norm`` marks the first call: only the norm is recorded. No host
    synchronisation.
    """
    return scaled / growth_limiter_(scaled.norm(), previous_norm, gamma, eps)


#: The peak bytes :func:`growth_limiter_` allocates beside its float32 0-d ``norm`` (traced): the norm itself, the
#: first-call flag (1 B), ``ones_like`` and two 0-d temporaries of the clamped ratio.
LIMITER_BYTES = 4 + 1 + 4 + 4 + 4


def growth_limiter_(norm: Tensor, previous_norm: Tensor, gamma: float, eps: float = 1e-8) -> Tensor:
    """The divisor of :func:`norm_growth_limit` from ``||S_t||`` (eq. 9): ``max(||S_t|| / ||S_{t-1}||,
    gamma) / gamma`` (1 on the first call); records ``||S_t|| / limiter`` in ``previous_norm``."""
    first = previous_norm < 0
    limiter = torch.where(first, torch.ones_like(norm), torch.clamp(norm / (previous_norm + eps), min=gamma) / gamma)
    previous_norm.copy_(norm / limiter)
    return limiter


# ---- the multi-tensor combine-back (issue 15): a bucket's parameters of one shape at once ----------


def factor_from_norms(direction_norms: Tensor, grad_norms: Tensor, eps: float = 1e-8) -> Tensor:
    """:func:`scaling_factor` from the channel norms it divides (eq. 7-8): ``||psi(R)||_col / (||R||_col
    + eps)``; any shape (a stack of parameters' norms, ``[B, channels]``)."""
    return direction_norms / (grad_norms + eps)


def scaled_norms(channel_norms: Tensor, factor: Tensor) -> Tensor:
    """``||S * phi||`` for each stacked parameter from the channel norms of ``S`` (``[B, C]``, the norms of
    the columns or rows the factor ``phi`` (``[B, C]``) scales): ``sqrt(sum_j phi_j^2 ||S_j||^2)``, the
    norm the limiter (eq. 9) reads, without the full-size ``S * phi``. Returns ``[B]``."""
    return torch.linalg.vector_norm(channel_norms * factor, dim=1)


def growth_limiter_foreach_(norms: Tensor, previous_norms: list[Tensor], gamma: float, eps: float = 1e-8) -> Tensor:
    """:func:`growth_limiter_` of ``B`` parameters at once: ``norms`` ``[B]`` (``||S_t||`` of each) and
    their 0-d ``previous_norms`` (updated in place, one multi-tensor copy). The same element-wise
    operations as the per-parameter form, so the same bits. Returns the limiters ``[B]``."""
    previous = torch.stack(previous_norms)
    first = previous < 0
    limiter = torch.where(first, torch.ones_like(norms), torch.clamp(norms / (previous + eps), min=gamma) / gamma)
    torch._foreach_copy_(previous_norms, list((norms / limiter).unbind(0)))
    return limiter
