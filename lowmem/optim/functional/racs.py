"""RACS, Row-And-Column Scaled SGD (Gong, Scetbon, Ma & Meeds 2025, "Towards Efficient Optimizer Design for LLM
via Structured Fisher Approximation with a Low-Rank Extension", arXiv:2502.07752, Section 4, Algorithm 1).

RACS approximates the Fisher information of an ``m x n`` weight by a Kronecker product of two positive diagonal
matrices, ``F ~ S (x) Q`` (Eq. 15), whose best Frobenius fit solves the fixed point of Eq. 16::

    s = Diag(E[G^T Q G]) / ||Q||_F^2 ,   q = Diag(E[G S G^T]) / ||S||_F^2       (s: n columns, q: m rows)

i.e. ``s_j = sum_i q_i G_ij^2 / sum_i q_i^2`` and ``q_i = sum_j s_j G_ij^2 / sum_j s_j^2``: power iteration on
``G^2`` (element-wise), whose fixed point is its principal singular pair (``q_i s_j ~ G_ij^2``). As the paper's
experiments: from ``q = 1``, a one-sample estimate of ``E`` (this step's gradient), ``iterations`` (5) steps. Then
Algorithm 1, lines 6-11::

    s_t = beta s_{t-1} + (1 - beta) s ;  q_t = beta q_{t-1} + (1 - beta) q          (s_0 = q_0 = 0)
    G~  = diag(q_t)^-1/2 G diag(s_t)^-1/2
    eta = gamma / max(||G~|| / phi_{t-1}, gamma) if t > 1 (and phi_{t-1} > 0) else 1   (Fira's norm-growth limiter)
    phi_t = eta ||G~||
    W  <- W - lr eta alpha G~

``m + n + 1`` numbers per matrix, no first moment. Additions of lowmem's (the paper has none): ``eps`` inside each
square root (``(q_t + eps)^-1/2``, ``(s_t + eps)^-1/2``), so that a zero row or column gives 0 rather than
``0 / 0``; Eq. 16's denominators floored at :data:`FLOOR` (an all-zero gradient: ``s = q = 0``); ``eta = 1`` while
``phi_{t-1} = 0`` (after an all-zero gradient), as the paper's Algorithm 3 limiter.

Each function is one line of the step on tensors; :class:`~lowmem.optim.recipes.racs.RacsMoments` keeps the
scalings and runs them over a whole tensor, over blocks of its rows (passes over the blocks: each fixed-point
iteration one, then the scalings' moving averages with the scaled gradient's norm, then the updates) or over an
FSDP2 shard of rows (the column sums and ``q . q`` of each iteration and the norm summed over the shards).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

#: Eq. 16's denominators ``||Q||_F^2`` and ``||S||_F^2`` are floored here (an all-zero gradient gives ``s = q = 0``
#: instead of ``0 / 0``); any nonzero float32 sum of squares above it is unaffected.
FLOOR = 1e-30


def matrix_dims(shape) -> tuple[int, int]:
    """The ``(rows, cols)`` a tensor of ``shape`` is stepped as: a matrix as itself; a tensor of more than 2
    dimensions as its ``[shape[0], -1]`` view (a 3-D batch of matrices, fused MoE experts, reaches the rule one
    matrix at a time: :meth:`~lowmem.optim.recipes.racs.RacsMoments.per_matrix`); a vector as a column ``[n, 1]`` and a 0-d tensor as ``[1, 1]`` (as
    pytorch_optimizer's ``RACS``: the paper defines RACS for matrices only)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], 1
    return shape[0], math.prod(shape[1:])


def racs_fixed_point(squares_of: Callable[[int, int], Tensor], bounds: list[tuple[int, int]], rows: int, cols: int,
                     iterations: int, device, dtype, column_sum: Callable[[Tensor], Tensor] | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 16, ``iterations`` times from ``q = 1``, by passes over blocks of rows (``squares_of(a, b)``: ``G_ij^2``
    of rows ``a:b``, a ``(b - a, cols)`` tensor). Each pass updates every block's ``q`` from the previous ``s``
    (``q = G^2 s / s . s``; the first pass keeps ``q = 1``) and adds the block's share of ``G^2^T q`` and ``q . q``;
    then ``s = G^2^T q / q . q``. ``column_sum`` (an FSDP2 shard of rows): sums those ``cols + 1`` numbers over the
    shards, once per iteration.

    Returns ``(q, s, ss)``: ``q`` the iterate before the last ``s`` (``rows`` values, a buffer the caller may
    overwrite), ``s`` (``cols`` values) and ``ss = max(s . s, FLOOR)`` (0-d), from which the last ``q`` of a block
    is :func:`racs_rows` of its squares."""
    q = torch.ones(rows, dtype=dtype, device=device)
    s = ss = None
    for _ in range(iterations):
        acc = torch.zeros(cols + 1, dtype=dtype, device=device)
        for a, b in bounds:
            sq = squares_of(a, b)
            if s is not None:
                racs_rows(sq, s, ss, out=q[a:b])
            acc[:cols].addmv_(sq.t(), q[a:b])
            del sq
        acc[cols:].copy_(q.dot(q) if s is not None else torch.full((), float(rows), dtype=dtype, device=device))
        if column_sum is not None:
            acc = column_sum(acc)
        s = acc[:cols].div_(acc[cols].clamp(min=FLOOR))
        ss = s.dot(s).clamp_(min=FLOOR)
        del acc
    return q, s, ss


#: On the CPU, :func:`stacked_mv` of a stack of more than one matrix of at least this many elements takes one ``mv``
#: per matrix: torch's CPU ``bmm`` of a ``(k, m, n)`` stack by ``(k, n, 1)`` vectors is a slow path there (one thread,
#: 16 x 512 x 256: 1.5 ms against 0.2 ms for 16 ``mv``; 16 x 128 x 128: 0.15 against 0.055), while below it one call
#: beats a loop's dispatches (64 x 24 x 1: 0.004 ms against 0.14; 8 x 32 x 128 equal). Off the CPU: one ``bmm``.
CPU_MV_NUMEL = 8192


def stacked_mv(a: Tensor, x: Tensor) -> Tensor:
    """``a[i] @ x[i]`` of each matrix of the stack ``a`` (``k x m x n``, a transposed view too) and vector of ``x``
    (``k x n``): a new ``k x m`` tensor. One ``bmm``, or on the CPU one ``mv`` per matrix into the result
    (:data:`CPU_MV_NUMEL`): the same products, equal up to the order of their additions."""
    k, m, n = a.shape
    if a.device.type == "cpu" and k > 1 and m * n >= CPU_MV_NUMEL:
        out = a.new_empty(k, m)
        for i in range(k):
            torch.mv(a[i], x[i], out=out[i])
        return out
    return torch.bmm(a, x.unsqueeze(-1)).view(k, m)


def racs_fixed_point_stacked(sq: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Eq. 16 for each matrix of a stack of squares ``sq`` (``k x m x n``), every matrix whole: the same iteration
    as :func:`racs_fixed_point` with one batched matrix-vector product per half-step (:func:`stacked_mv`) instead of
    one per matrix, so equal to it up to float32 rounding (another order of additions). Returns the last ``(q, s)``,
    ``k x m`` and ``k x n``."""
    k, m, n = sq.shape
    q = torch.ones(k, m, dtype=sq.dtype, device=sq.device)
    s = None
    for _ in range(iterations):
        s = stacked_mv(sq.transpose(1, 2), q)  # (k, n): G^2^T q
        s.div_(stacked_dot(q).clamp_(min=FLOOR))
        q = stacked_mv(sq, s)  # (k, m): G^2 s
        q.div_(stacked_dot(s).clamp_(min=FLOOR))
    return q, s


def stacked_dot(x: Tensor) -> Tensor:
    """``x[i] . x[i]`` of each row of ``x`` (``k x m``): a new ``k x 1`` tensor, one batched product (one kernel, where
    ``x.square().sum(1)`` is two)."""
    return torch.bmm(x.unsqueeze(1), x.unsqueeze(2)).view(x.shape[0], 1)


def racs_rows(sq: Tensor, s: Tensor, ss: Tensor, out: Tensor | None = None) -> Tensor:
    """Eq. 16's ``q_i = sum_j s_j G_ij^2 / sum_j s_j^2`` of the rows whose squares are ``sq`` (written to ``out``
    when given)."""
    q = torch.mv(sq, s, out=out) if out is not None else torch.mv(sq, s)
    return q.div_(ss)


def racs_ema_(stat: Tensor, sample: Tensor, beta: float) -> Tensor:
    """``stat <- beta stat + (1 - beta) sample`` in place (Algorithm 1, lines 6-7; a float64 sample of an FSDP2
    float64 shard, which the engine does not cast, rounded to a float32 ``stat``). Returns ``stat``."""
    return stat.lerp_(sample if sample.dtype == stat.dtype else sample.to(stat.dtype), 1.0 - beta)


def inv_sqrt(stat: Tensor, eps: float) -> Tensor:
    """``(stat + eps)^-1/2``: a scaling of line 8 (a new tensor)."""
    return stat.add(eps).rsqrt_()


def racs_scale(g: Tensor, row_factor: Tensor, col_factor: Tensor) -> Tensor:
    """Line 8, ``G~ = diag(row_factor) g diag(col_factor)`` of the 2-D ``g`` (a block of rows with its rows'
    factors): a new tensor of ``g``'s shape."""
    return (g * row_factor.unsqueeze(-1)).mul_(col_factor.unsqueeze(-2))


def scaled_square_norms_stacked(sq: Tensor, row_factor: Tensor, col_factor: Tensor) -> Tensor:
    """:func:`scaled_square_norm` of each matrix of a stack (``k x m x n`` squares, ``k x m`` and ``k x n`` factors):
    ``(k,)``."""
    return stacked_mv(sq, col_factor.square()).mul_(row_factor.square()).sum(dim=1)


def scaled_square_norm(sq: Tensor, row_factor: Tensor, col_factor: Tensor) -> Tensor:
    """``||G~||^2`` of a block of rows from its squares, without forming ``G~``: ``sum_i r_i^2 sum_j G_ij^2 c_j^2``
    (a 0-d tensor; float32 factors of a float64 block, an FSDP2 float64 shard's, read in float64)."""
    def squared(f):
        return f.square() if f.dtype == sq.dtype else f.to(sq.dtype).square()

    return torch.mv(sq, squared(col_factor)).dot(squared(row_factor))


def norm_growth_limit(norm: Tensor, previous: Tensor, gamma: float) -> Tensor:
    """Line 9's ``eta = gamma / max(||G~|| / phi_{t-1}, gamma)`` (a 0-d tensor): 1 while the update's norm grows by at
    most ``gamma`` over the previous step's, else the factor that makes it exactly ``gamma phi_{t-1}``; 1 while
    ``phi_{t-1} = 0`` (the previous gradient was all zero: the paper's own limiter of Algorithm 3, line 4, "if
    phi > 0 else 1"; Algorithm 1's literal ``||G~|| / 0`` would stop the tensor for good). (The first step of a tensor
    takes ``eta = 1``: the caller's.)"""
    limited = (norm / previous).clamp_(min=gamma).reciprocal_().mul_(gamma)  # (nan where previous = 0: replaced)
    return torch.where(previous > 0, limited, torch.ones_like(limited))
