"""SinkGD (Scetbon, Ma, Gong & Meeds 2025, "Gradient Multi-Normalization for Stateless and Scalable
LLM Training"): the gradient of an ``m x n`` weight normalised alternately by its rows and its
columns (SR-Sinkhorn, Algorithm 3) and stepped along without any optimizer state (Algorithm 4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Row and column norms are floored here before dividing: a zero row (or column) stays zero instead
#: of becoming NaN. The paper has no such term; any nonzero float32 norm above it is unaffected.
NORM_FLOOR = 1e-30


def sr_sinkhorn(g: Tensor, iters: int, column_sq=None, rows: int | None = None) -> Tensor:
    """SR-Sinkhorn (Algorithm 3): ``L = iters`` alternating projections of ``X_0 = G``::

        X <- sqrt(n) Q(X)^{-1} X      (every row to l2 norm sqrt(n); Q = diag of row norms)
        X <- sqrt(m) X R(X)^{-1}      (every column to l2 norm sqrt(m); R = diag of column norms)

    A fixed point has every row of norm ``sqrt(n)`` and every column of norm ``sqrt(m)`` (entries
    of RMS 1). Returns a new float32 tensor (``g`` is not modified).

    ``column_sq``: ``g`` is a block of rows of the matrix (an FSDP2 shard): sums the columns'
    squared norms over the blocks in place (an all-reduce per iteration); ``rows``: the whole ``m``.
    """
    m, n = g.shape
    if column_sq is not None:
        m = rows
    x = g
    for i in range(iters):
        row_norms = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_(min=NORM_FLOOR)
        row_factor = row_norms.reciprocal_().mul_(math.sqrt(n))
        x = x * row_factor if i == 0 else x.mul_(row_factor)  # the first product is the new tensor
        if column_sq is None:
            cols = torch.linalg.vector_norm(x, dim=0, keepdim=True).clamp_(min=NORM_FLOOR)
        else:  # a block of rows: the columns' squared norms summed over the blocks
            cols = column_sq(x.square().sum(dim=0, keepdim=True)).sqrt_().clamp_(min=NORM_FLOOR)
        x.mul_(cols.reciprocal_().mul_(math.sqrt(m)))
    return x if iters > 0 else g.clone()
