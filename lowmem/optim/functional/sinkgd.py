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
    of RMS 1). Returns a new float32 tensor (``g`` is not modified), contiguous for ``iters > 0``: a
    non-contiguous ``g`` gives the bits of its contiguous twin.

    ``column_sq``: ``g`` is a block of rows of the matrix (an FSDP2 shard): sums the columns'
    squared norms over the blocks in place (an all-reduce per iteration); ``rows``: the whole ``m``.
    """
    m, n = g.shape
    if column_sq is not None:
        m = rows
    # a strided g (a transposed weight, a matrix of a channels_last batch): its norms would be reduced in another
    # order than a contiguous twin's (float32 rounding, up to 2.4e-7 apart after 3 steps), so the result is first a
    # contiguous copy of it, normalised in place: the same bits, and no more memory (the copy is the result)
    x = g if g.is_contiguous() or iters <= 0 else g.contiguous()
    for i in range(iters):
        row_norms = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_(min=NORM_FLOOR)
        row_factor = row_norms.reciprocal_().mul_(math.sqrt(n))
        x = x * row_factor if i == 0 and x is g else x.mul_(row_factor)  # the first product is the new tensor
        if column_sq is None:
            cols = torch.linalg.vector_norm(x, dim=0, keepdim=True).clamp_(min=NORM_FLOOR)
        else:  # a block of rows: the columns' squared norms summed over the blocks
            cols = column_sq(x.square().sum(dim=0, keepdim=True)).sqrt_().clamp_(min=NORM_FLOOR)
        x.mul_(cols.reciprocal_().mul_(math.sqrt(m)))
    return x if iters > 0 else g.clone()


def sinkhorn_scalings(rows_of, row_bounds: list[tuple[int, int]], m_local: int, n: int, iters: int,
                      column_sq=None, rows: int | None = None, device=None,
                      batched: bool | None = None) -> tuple[Tensor, Tensor]:
    """:func:`sr_sinkhorn` as two diagonal scalings, from passes over blocks of rows.

    Every normalisation of Algorithm 3 only rescales rows or columns, so ``X_L = diag(r) G diag(c)``:
    a row's norm is ``r_i sqrt(sum_j G_ij^2 c_j^2)`` and a column's ``c_j sqrt(sum_i r_i^2 G_ij^2)``.
    One pass over ``G`` per iteration (``rows_of(a, b)``: rows ``a:b`` of ``G``, float32) updates the
    block's ``r`` and adds its share of the columns' squared norms; then ``c``. No temporary larger
    than a block of rows (equal to :func:`sr_sinkhorn` up to float32 rounding, tested).

    ``column_sq`` / ``rows``: as in :func:`sr_sinkhorn` (``G`` is an FSDP2 shard of ``m_local`` rows:
    the column sums are all-reduced each iteration, ``rows`` is the whole ``m``). Returns ``(r, c)``.

    ``batched`` (default: off the CPU, where the step is launch-bound, issue 15; not for FSDP2 shards):
    the squared scalings in closed form, :func:`_squared_scalings_rows` (5 kernels per block and
    iteration instead of 13); equal up to float32 rounding (tested).
    """
    m = m_local if rows is None else rows
    if device is None:  # the gradient's device (an empty shard: the default device)
        device = rows_of(*row_bounds[0]).device if row_bounds else None
    if batched is None:
        batched = column_sq is None and torch.device(device if device is not None else "cpu").type != "cpu"
    if batched:
        return _squared_scalings_rows(rows_of, row_bounds, m_local, n, iters, column_sq, m, device)
    r = torch.ones(m_local, dtype=torch.float32, device=device)
    c = torch.ones(n, dtype=torch.float32, device=device)
    for _ in range(iters):
        c2 = c.square()
        col = torch.zeros(n, dtype=torch.float32, device=device)
        for a, b in row_bounds:
            sq = rows_of(a, b).float().square()
            norms = (sq @ c2).sqrt_().mul_(r[a:b])
            # a zero row stays zero (sr_sinkhorn: 0 times its floored factor); its scaling is set to 0
            # rather than sqrt(n) / NORM_FLOOR, whose square would overflow float32
            r[a:b].mul_(torch.where(norms > 0, norms.clamp(min=NORM_FLOOR).reciprocal_().mul_(math.sqrt(n)), 0.0))
            col.addmv_(sq.t(), r[a:b].square())
            del sq, norms  # (the block's norms too: not beside the next block's copy and squares)
        del c2  # (freed before the column phase and the next iteration: sinkhorn_scalings_bytes)
        if column_sq is not None:
            col = column_sq(col)
        norms = col.sqrt_().mul_(c)
        c.mul_(torch.where(norms > 0, norms.clamp(min=NORM_FLOOR).reciprocal_().mul_(math.sqrt(m)), 0.0))
        del col, norms
    return r, c


def sinkhorn_scalings_bytes(m: int, n: int, block_rows: int, batched: bool, copy: int = 0) -> int:
    """The most memory :func:`sinkhorn_scalings` allocates alive together for an ``m x n`` float32 matrix in
    blocks of ``block_rows`` rows (``iters >= 1``), its returned ``(r, c)`` included (``4 (m + n)``):

    * ``batched=False``: in a block, ``c``'s square and the column sums (``8 n``), the block's squares
      (``4 b n``), its row norms, their mask, clamp and scaling (``13 b``) and ``torch.where``'s 0-d ``0.0`` (4);
      in the column phase the column norms, their mask, clamp and scaling (``13 n + 4``);
    * ``batched=True`` (:func:`_squared_scalings_rows`): the column sums and a block's squares (``4 n + 4 b n``).

    ``copy``: bytes per element of the block ``rows_of`` returns when it is a new tensor (the float32 copy of a
    low-precision gradient's rows: 4), alive beside the block's squares until they are made."""
    b = block_rows
    if batched:
        return 4 * (m + n) + 4 * n + (4 + copy) * b * n
    return 4 * (m + n) + max(8 * n + (4 + copy) * b * n, 8 * n + 4 * b * n + 13 * b + 4, 13 * n + 4)


def sr_sinkhorn_bytes(m: int, n: int, iters: int) -> int:
    """The most memory :func:`sr_sinkhorn` allocates alive together for an ``m x n`` float32 ``g`` (its result
    included, ``4 m n``): the row norms (``4 m``) and the column norms (``4 n``), and from the second iteration
    a new one beside its predecessor (``4 max(m, n)``)."""
    if iters <= 0:
        return 4 * m * n
    return 4 * m * n + 4 * (m + n) + (4 * max(m, n) if iters > 1 else 0)


def _squared_scalings_rows(rows_of, row_bounds: list[tuple[int, int]], m_local: int, n: int, iters: int,
                           column_sq, m: int, device) -> tuple[Tensor, Tensor]:
    """:func:`sinkhorn_scalings`' ``batched=True`` form: the closed form of :func:`_squared_scalings_batched`
    (``R_i = n / (sq C)_i``, ``C_j = m / (R^T sq)_j``, 0 for a zero or overflowing sum) from passes over
    the blocks of rows, one matrix, with ``C' = C / n`` kept so that ``R = 1 / (sq C')``: per block and
    iteration the squares, ``mv`` into the block's ``R``, its reciprocal and zeroing, and the block's
    ``addmv_`` into the column sums (5 kernels instead of 13); per iteration the column sums
    (all-reduced with ``column_sq``) into ``C' = (m / n) / sums``. Live: ``R`` (``m_local``), ``C'`` and
    the column sums (``2 n``), a block's squares. Returns ``(sqrt(R), sqrt(n C'))``."""
    big_r = torch.ones(m_local, dtype=torch.float32, device=device)
    big_c = torch.full((n,), 1.0 / n, dtype=torch.float32, device=device)
    for _ in range(iters):
        col = torch.zeros(n, dtype=torch.float32, device=device)
        for a, b in row_bounds:
            sq = rows_of(a, b).float().square()
            ra = big_r[a:b]
            torch.mv(sq, big_c, out=ra)  # sum_j G_ij^2 C_j / n
            ra.reciprocal_().nan_to_num_(nan=0.0, posinf=0.0)
            col.addmv_(sq.t(), ra)  # sum_i R_i G_ij^2
            del sq, ra
        if column_sq is not None:
            col = column_sq(col)
        big_c = col.reciprocal_().mul_(m / n).nan_to_num_(nan=0.0, posinf=0.0)
        del col
    return big_r.sqrt_(), big_c.mul_(n).sqrt_()


def sinkhorn_scalings_stacked(sq: Tensor, iters: int, batched: bool | None = None) -> tuple[Tensor, Tensor]:
    """:func:`sinkhorn_scalings` of each matrix of a stack, every matrix in one block of rows, from the
    squared entries ``sq`` (float32, ``k x m x n``: ``G_ij^2`` of each matrix). The element-wise work
    runs on the stack (one kernel per operation). The two matrix-vector products of an iteration
    (``sq c^2`` and ``sq^T r^2``):

    * ``batched=False`` (the CPU's default): per matrix, with the kernels :func:`sinkhorn_scalings` uses
      (``torch.mv``, ``addmv_``): equal to :func:`sinkhorn_scalings` of each matrix with one row block,
      bit for bit on the CPU (tested); ``2 k`` products per iteration, as fast as the batched ones on the CPU.
    * ``batched=True`` (the default off the CPU, where the step is launch-bound, issue 15): the stack's
      squared scalings ``R = r^2``, ``C = c^2`` in closed form, one ``bmm`` per half-iteration. With
      ``X = diag(r) G diag(c)``, normalising the rows sets ``r_i`` so that ``r_i^2 sum_j G_ij^2 c_j^2 = n``::

          R_i <- n / (sq C)_i ,   C_j <- m / (R^T sq)_j      (0 where the sum is 0: a zero row or column)

      (:func:`sinkhorn_scalings`'s ``r_i sqrt(n) / ||row_i||`` with ``||row_i|| = r_i sqrt((sq C)_i)``
      simplified), then ``r = sqrt(R)``, ``c = sqrt(C)``: 3 or 4 kernels per half-iteration whatever ``k``
      (against ~10 k). Another order of operations: equal up to float32 rounding (tested).

    Returns ``(r, c)``, ``k x m`` and ``k x n``."""
    k, m, n = sq.shape
    if batched is None:
        batched = sq.device.type != "cpu"
    if batched:
        return _squared_scalings_batched(sq, iters)
    r = torch.ones(k, m, dtype=torch.float32, device=sq.device)
    c = torch.ones(k, n, dtype=torch.float32, device=sq.device)
    norms = torch.empty(k, m, dtype=torch.float32, device=sq.device)
    for _ in range(iters):
        c2 = c.square()
        for i in range(k):
            torch.mv(sq[i], c2[i], out=norms[i])
        del c2  # (each temporary freed once used: sinkhorn_scalings_stacked_bytes)
        norms.sqrt_().mul_(r)
        r.mul_(torch.where(norms > 0, norms.clamp(min=NORM_FLOOR).reciprocal_().mul_(math.sqrt(n)), 0.0))
        r2 = r.square()
        col = torch.zeros(k, n, dtype=torch.float32, device=sq.device)
        for i in range(k):
            col[i].addmv_(sq[i].t(), r2[i])
        del r2
        cn = col.sqrt_().mul_(c)
        c.mul_(torch.where(cn > 0, cn.clamp(min=NORM_FLOOR).reciprocal_().mul_(math.sqrt(m)), 0.0))
        del col, cn
    return r, c


def sinkhorn_scalings_stacked_bytes(k: int, m: int, n: int, iters: int, batched: bool) -> int:
    """The most memory :func:`sinkhorn_scalings_stacked` allocates alive together for ``k`` float32 ``m x n``
    matrices (besides ``sq``), its returned ``(r, c)`` included (``4 k (m + n)``):

    * ``batched=False``: ``r``, ``c`` and the row norms (``4 k (2 m + n)``) throughout, and at most one of:
      ``c``'s square (``4 k n``); the row phase's mask, clamp, ``torch.where``'s 0-d ``0.0`` and result
      (``9 k m + 4``); ``r``'s square next to the column sums (``4 k (m + n)``); the column phase's mask,
      clamp, 0-d and result next to the column sums (``13 k n + 4``);
    * ``batched=True`` (:func:`_squared_scalings_batched`): ``C`` and ``R`` (``4 k (m + n)``), a new
      ``C`` beside the old (``4 k n``) and, from the second iteration, a new ``R`` beside the old (``4 k m``).
    """
    if batched:
        if iters <= 0:
            return 4 * k * (m + n)
        return 4 * k * (m + n) + max(4 * k * n, 4 * k * m if iters > 1 else 0)
    kept = 4 * k * (2 * m + n)
    if iters <= 0:
        return kept
    return kept + max(4 * k * n, 9 * k * m + 4, 4 * k * (m + n), 13 * k * n + 4)


def _squared_scalings_batched(sq: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """:func:`sinkhorn_scalings_stacked`'s ``batched=True`` form: ``R_i = n / (sq C)_i``, ``C_j = m / (R^T sq)_j``
    (0 for a zero sum: ``1 / 0 = inf`` set to 0 by ``nan_to_num_``, as :func:`sinkhorn_scalings` sets a zero
    row's scaling to 0; a sum so small that its reciprocal overflows float32 is also set to 0, where the
    per-matrix form's ``r^2`` overflows), ``iters`` times from ``C = 1``, with ``C' = C / n`` kept so that
    ``R = 1 / (sq C')`` and ``C' = (m / n) / (R^T sq)``; returns ``(sqrt(R), sqrt(n C'))``; per iteration
    the two ``bmm`` and 5 kernels besides (against 6 with ``C``)."""
    k, m, n = sq.shape
    big_c = torch.full((k, n, 1), 1.0 / n, dtype=torch.float32, device=sq.device)
    big_r = torch.ones(k, 1, m, dtype=torch.float32, device=sq.device) if iters == 0 else None
    for _ in range(iters):
        s = torch.bmm(sq, big_c)  # (k, m, 1): sum_j G_ij^2 C_j / n
        big_r = s.reciprocal_().nan_to_num_(nan=0.0, posinf=0.0).view(k, 1, m)
        s = torch.bmm(big_r, sq)  # (k, 1, n): sum_i R_i G_ij^2
        big_c = s.reciprocal_().mul_(m / n).nan_to_num_(nan=0.0, posinf=0.0).view(k, n, 1)
    return big_r.view(k, m).sqrt_(), big_c.view(k, n).mul_(n).sqrt_()


def sinkgd_foreach_(params: list[Tensor], grads: list[Tensor], iters: int, lr: float, weight_decay: float,
                    step: float, batched: bool | None = None) -> None:
    """SinkGD's whole step (Algorithm 4) for ``k`` float32 matrices of one shape::

        (r, c) = sinkhorn_scalings_stacked(G^2) ;  p <- p (1 - lr wd) ;  p <- p - step r_i G_ij c_j

    (``step = lr * scale``), the per-matrix chunked step's operations in its order (one block of
    rows): equal to it bit for bit on the CPU; off the CPU (``batched``, see
    :func:`sinkhorn_scalings_stacked`) up to float32 rounding. Transient (:func:`sinkgd_foreach_bytes`): the
    stack of squares (float32, ``4 k m n``) next to the scalings' work, freed before the stack of steps (the
    same size) next to ``r`` and ``c``."""
    d = sinkgd_foreach_direction(grads, iters, step, batched)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_sub_(params, list(d.unbind(0)))


def sinkgd_foreach_direction(grads: list[Tensor], iters: int, step: float, batched: bool | None = None) -> Tensor:
    """The float32 steps ``step r_i G_ij c_j`` of ``k`` float32 matrices of one shape (:func:`sinkgd_foreach_`'s, before
    the decay and the subtraction): a new ``k x m x n`` stack; allocates :func:`sinkgd_foreach_bytes`."""
    sq = torch.stack(grads)
    sq.square_()
    r, c = sinkhorn_scalings_stacked(sq, iters, batched)
    del sq
    d = torch.stack(grads)
    return d.mul_(r[:, :, None]).mul_(c[:, None, :]).mul_(step)


def sinkgd_foreach_bytes(k: int, m: int, n: int, iters: int, batched: bool) -> int:
    """The most memory :func:`sinkgd_foreach_` allocates alive together for ``k`` float32 ``m x n`` matrices:
    the stack of squares next to :func:`sinkhorn_scalings_stacked_bytes` (its returned ``r`` and ``c``
    included), then the stack of steps next to ``r`` and ``c``: ``4 k m n`` + the larger."""
    if k <= 0:
        return 0
    return 4 * k * m * n + max(sinkhorn_scalings_stacked_bytes(k, m, n, iters, batched), 4 * k * (m + n))
