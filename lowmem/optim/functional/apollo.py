"""APOLLO (Zhu et al. 2024, "APOLLO: SGD-like Memory, AdamW-level Performance"): Adam's moments of a
random projection of the gradient only estimate *how much* Adam would rescale each channel; the
update is the raw gradient rescaled by that estimate.

Notation: ``G`` the ``m x n`` gradient, ``R = P^T G`` (left side, ``r x n``) or ``G P`` (right side,
``m x r``) its projection, ``R~`` the moment rule's direction in the subspace (``m_t / (sqrt(v_t) + eps)``,
Algorithm 1 line 7, without the bias correction).
"""

from __future__ import annotations

import torch
from torch import Tensor


def channel_scaling(low_direction: Tensor, low_grad: Tensor, side: str, eps: float = 1e-8) -> Tensor:
    """Channel-wise scaling factor ``s_j = ||R~[:, j]|| / ||R[:, j]||`` (Algorithm 1 line 8, eq. 4).

    A channel is a row or column of ``G`` the projection keeps whole: a left projection (``r x n``)
    keeps the ``n`` columns, a right one (``m x r``) the ``m`` rows. Returns ``[n]`` (broadcasts over
    the columns) or ``[m, 1]`` (over the rows); rows ``a:b`` of ``G`` take ``s`` or ``s[a:b]``.
    """
    if side == "left":
        return low_direction.norm(dim=0) / (low_grad.norm(dim=0) + eps)
    if side == "right":
        return (low_direction.norm(dim=1) / (low_grad.norm(dim=1) + eps)).unsqueeze(1)
    raise ValueError(f"channel scaling needs a one-sided projection ('left' or 'right'), got {side!r}")


def tensor_scaling(low_direction: Tensor, low_grad: Tensor, eps: float = 1e-8) -> Tensor:
    """Tensor-wise scaling factor ``s = ||R~|| / ||R||`` (APOLLO-Mini, Section 4.2): one number for
    the whole matrix (0-d tensor, no host synchronisation)."""
    return torch.linalg.vector_norm(low_direction) / (torch.linalg.vector_norm(low_grad) + eps)
