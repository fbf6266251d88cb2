"""RACS, Row-And-Column Scaled SGD (Gong, Scetbon, Ma & Meeds 2025, "Towards Efficient Optimizer Design for LLM
via Structured Fisher Approximation with a Low-Rank Extension", arXiv:2502.07752, Section 4 and its RACS algorithm).

RACS approximates the Fisher information of an ``m x n`` weight by a Kronecker product of two positive diagonal
matrices, ``F ~ S (x) Q``, and keeps only their diagonals as moving averages of the gradient's squared row and
column statistics, ``m + n`` numbers, plus the previous update's norm for the norm-growth limiter (Fira, Chen et al.
2024): ``m + n + 1`` per matrix, no first moment. One step, for the gradient ``G`` (``m x n``)::

    q_t = beta q_{t-1} + (1 - beta) mean_j G_ij^2           (row statistic,    m values)
    s_t = beta s_{t-1} + (1 - beta) mean_i G_ij^2           (column statistic, n values)
    G~  = diag(q_t + eps)^-1/2  G  diag(s_t + eps)^-1/2      (the row-and-column scaled gradient)
    eta = 1 at a tensor's first step, else gamma / max(||G~|| / (phi_{t-1} + eps), gamma)   (norm-growth limiter)
    phi_t = eta ||G~||                                       (the limited update's norm, kept)
    W  <- W - lr alpha eta G~                                (alpha: the update's scale)

from ``q_0 = 0``, ``s_0 = 1``. The statistics are means (``diag(G G^T) / n`` and ``diag(G^T G) / m``), start at
those values and ``eps`` is added inside each square root and to ``phi`` as pytorch_optimizer's ``RACS`` does; the paper's algorithm writes the diagonals without the
``1 / n``, ``1 / m`` and without ``eps`` (a common factor of the two statistics rescales ``G~`` by a constant,
which the norm-growth limiter and ``alpha`` then see; ``docs/optimizers.md``'s RACS section has the comparison).

Each function is one line of the step on tensors; :class:`~lowmem.optim.recipes.racs.RacsMoments` keeps the
statistics and runs them over a whole tensor, over blocks of its rows (two passes: statistics, then the scaled
gradient's norm) or over an FSDP2 shard of rows (the column sums and the norm summed over the shards).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def matrix_dims(shape) -> tuple[int, int]:
    """The ``(rows, cols)`` a tensor of ``shape`` is stepped as: a matrix as itself; a tensor of more than 2
    dimensions as its ``[shape[0], -1]`` view; a vector as a column ``[n, 1]`` and a 0-d tensor as ``[1, 1]`` (as
    pytorch_optimizer's ``RACS``: the paper defines RACS for matrices only)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], 1
    return shape[0], math.prod(shape[1:])


def row_square_means(g: Tensor) -> Tensor:
    """``mean_j G_ij^2`` of each row of the 2-D ``g`` (a new tensor of ``g.shape[0]`` values, the row statistic's
    sample ``diag(G G^T) / n``), from the rows' norms: no temporary of ``g``'s size. A stack ``(k, m, n)``: each
    matrix's, ``(k, m)``."""
    return torch.linalg.vector_norm(g, dim=-1).square_().div_(max(g.shape[-1], 1))


def column_square_sums(g: Tensor) -> Tensor:
    """``sum_i G_ij^2`` of each column of the 2-D ``g`` (``g.shape[1]`` values): a block of rows' share of the
    column statistic's sample ``diag(G^T G)``, divided by the whole row count once every block is summed. A stack
    ``(k, m, n)``: each matrix's, ``(k, n)``."""
    return torch.linalg.vector_norm(g, dim=-2).square_()


def racs_ema_(stat: Tensor, sample: Tensor, beta: float) -> Tensor:
    """``stat <- beta stat + (1 - beta) sample`` in place (the row and column statistics' moving averages; a float64
    sample of an FSDP2 float64 shard, which the engine does not cast, rounded to a float32 ``stat``). Returns
    ``stat``."""
    return stat.lerp_(sample if sample.dtype == stat.dtype else sample.to(stat.dtype), 1.0 - beta)


def racs_factors(row: Tensor, col: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``((q + eps)^-1/2, (s + eps)^-1/2)``: the row and column scalings of ``G~`` (new tensors)."""
    return row.add(eps).rsqrt_(), col.add(eps).rsqrt_()


def racs_scale(g: Tensor, row_factor: Tensor, col_factor: Tensor) -> Tensor:
    """``G~ = diag(row_factor) g diag(col_factor)`` of the 2-D ``g`` (a block of rows with its rows' factors): a
    new tensor of ``g``'s shape. A stack ``(k, m, n)`` with ``(k, m)`` and ``(k, n)`` factors: each matrix's."""
    return (g * row_factor.unsqueeze(-1)).mul_(col_factor.unsqueeze(-2))


def norm_growth_limit(norm: Tensor, previous: Tensor, gamma: float, eps: float) -> Tensor:
    """The limiter's factor ``eta = gamma / max(||G~|| / (phi_{t-1} + eps), gamma)`` (a 0-d tensor): 1 while the
    update's norm grows by at most ``gamma`` over the previous step's, else the factor that makes it exactly
    ``gamma phi_{t-1}``. (The first step of a tensor takes ``eta = 1``: the caller's.) ``norm`` and ``previous`` may
    be ``(k,)`` vectors, one per stacked matrix: element-wise the same arithmetic."""
    return torch.clamp(norm / (previous + eps), min=gamma).reciprocal_().mul_(gamma)
