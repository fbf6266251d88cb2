"""SCALE (Glentis, Li, Han & Hong 2025, "A Minimalist Optimizer Design for LLM Pretraining",
arXiv:2506.16659): column-normalised SGD, with first-order momentum only on the output layer.

"Column" is the paper's ``d_in x d_out`` convention: each output unit's weights are normalised.
For torch's ``[out, in]`` linear weights that is each row; for an embedding ``[vocab, d]`` (the
input layer, ``d_in = vocab``) each column. The authors' code (OptimAI-Lab/Minimalist_LLM_Pretraining)
divides by the RMS of the slice, floored at 1e-8 (:data:`RMS_FLOOR`).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

RMS_FLOOR = 1e-8


def column_normalize(m: Tensor, dim: int, column_sq=None, rows: int | None = None) -> Tensor:
    """``C(M)``: ``M`` divided by the RMS of its slices along ``dim`` (``dim=1``: each row of an
    ``[out, in]`` weight; ``dim=0``: each column of an embedding), ``max(RMS, 1e-8)``.
    A batch of matrices ``[E, A, B]`` (3 dimensions: fused MoE experts) is normalised per matrix, each
    ``A x B`` matrix as a 2-D weight of its own (its rows over ``B``, or its columns over ``A``): the RMS
    ``[E, A, 1]`` or ``[E, 1, B]``. A tensor of more than 3 dimensions (a conv kernel ``[out, in, k, k]``) is
    flattened to ``[size(0), -1]`` first. Returns a new tensor (contiguous for a non-contiguous ``m``: the bits of its
    contiguous twin).

    ``column_sq`` (``dim=0`` on a block of rows of the matrix, e.g. an FSDP2 shard): sums the
    columns' squared norms over the blocks in place (an all-reduce); ``rows``: the whole row count."""
    # a strided m (a transposed weight, a channels_last kernel): its RMS would be reduced in another order than a
    # contiguous twin's (float32 rounding, up to 2.4e-7 apart after 3 steps), so the result is first a contiguous
    # copy of it, divided in place: the same bits, and no more memory (the copy is the result; a kernel's reshape
    # copied it before, beside the quotient)
    own = not m.is_contiguous()
    if own:
        m = m.contiguous()
    if m.dim() == 3 and column_sq is None:
        d = dim + 1
        rms = torch.linalg.vector_norm(m, dim=d, keepdim=True).div_(math.sqrt(m.size(d))).clamp_(min=RMS_FLOOR)
        return m.div_(rms) if own else m / rms
    shape = m.shape
    x = m.view(m.size(0), -1) if m.dim() > 2 else m
    if column_sq is not None and dim == 0:
        rms = column_sq(x.square().sum(dim=0, keepdim=True)).div_(rows).sqrt_().clamp_(min=RMS_FLOOR)
    else:
        rms = torch.linalg.vector_norm(x, dim=dim, keepdim=True).div_(math.sqrt(x.size(dim))).clamp_(min=RMS_FLOOR)
    return (x.div_(rms) if own else x / rms).view(shape)


def column_rms(blocks: Iterable[Tensor], n: int, rows: int, column_sq=None) -> Tensor:
    """The RMS of each of the ``n`` columns of a matrix given as blocks of whole rows (float32 ``[r_i, n]``),
    ``max(sqrt(sum_i ||col_i||^2 / rows), 1e-8)`` as a ``[1, n]`` float32 tensor: the divisor of
    :func:`column_normalize` (``dim=0``) from one pass over the blocks, each freed before the next (the
    squares of one block and its column sums beside the running sums). ``column_sq``: sums the squared
    norms over other blocks of the matrix in place (FSDP2 shards: an all-reduce); ``rows``: the whole
    row count."""
    acc = None
    for x in blocks:
        s = x.square().sum(dim=0, keepdim=True)
        acc = s if acc is None else acc.add_(s)
        del s, x
    if acc is None:
        acc = torch.zeros(1, n)
    if column_sq is not None:
        acc = column_sq(acc)
    return acc.div_(rows).sqrt_().clamp_(min=RMS_FLOOR)


def column_rms_bytes(rows: int, n: int, block_rows: int) -> int:
    """The most :func:`column_rms` allocates over the blocks of ``block_rows`` whole rows of a float32
    ``[rows, n]`` matrix (besides the blocks themselves): the first block's squares and column sums
    (``4 r n + 4 n``; the sums become the running sums), each later block's squares and sums beside the running
    sums (``4 r n + 8 n``)."""
    first = min(block_rows, rows)
    later = min(block_rows, rows - first)
    return max(4 * first * n + 4 * n, 4 * later * n + 8 * n if later > 0 else 0)


def last_layer_momentum_(buf: Tensor, g: Tensor, beta: float) -> Tensor:
    """``m_t = beta m_{t-1} + (1 - beta) g_t`` in place (the output layer's EMA); returns ``buf``."""
    return buf.lerp_(g, 1.0 - beta)


def scale_rows_direction(ms: list[Tensor], lr: float) -> Tensor:
    """``lr C(M)`` of ``k`` float32 ``[out, in]`` matrices of one shape (:func:`scale_rows_foreach_`'s step before the
    decay and the subtraction): a new ``k x out x in`` float32 stack, its rows' RMS (``4 k out`` bytes) alive
    beside it until it returns."""
    x = torch.stack(ms)
    rms = torch.linalg.vector_norm(x, dim=2, keepdim=True).div_(math.sqrt(x.size(2))).clamp_(min=RMS_FLOOR)
    return x.div_(rms).mul_(lr)


def scale_rows_foreach_(params: list[Tensor], ms: list[Tensor], lr: float, weight_decay: float) -> None:
    """SCALE's step of ``k`` float32 ``[out, in]`` matrices of one shape whose rows are normalised
    (``"hidden"``: ``ms`` the gradients; ``"head"``: the momentum buffers after their EMA)::

        p <- p (1 - lr wd) ;  p <- p - lr C(M)      (C: each row divided by max(RMS, 1e-8))

    with :func:`column_normalize`'s operations on the stack (row norms over the last dimension): equal to
    the per-matrix step bit for bit on the CPU. Transient: the stack (float32, ``4 k m n``) and the
    row RMS."""
    x = scale_rows_direction(ms, lr)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_sub_(params, list(x.unbind(0)))


# ---- tensors of more than 3 dimensions in chunks of any size ------------------------------------------------
# A target of shape (R, ...) (a conv kernel) is the matrix [R, C] (C = prod(shape[1:])) that column_normalize
# normalises; a chunk [start, stop) of its flat elements may begin and end inside a row (a row, one output channel,
# may be larger than a chunk), so it is taken as at most three segments: the end of a row, whole rows, the start of
# one.


def row_segments(start: int, stop: int, cols: int) -> list[tuple[int, int, bool]]:
    """The flat elements ``[start, stop)`` of a ``[rows, cols]`` matrix as ``(a, b, whole_rows)`` segments: the rest
    of a row begun before ``start``, the whole rows, the start of the row ``stop`` falls in (each only if not
    empty)."""
    out, a = [], start
    if a % cols and a < stop:
        b = min(stop, (a // cols + 1) * cols)
        out.append((a, b, False))
        a = b
    end = stop // cols * cols
    if a < end:
        out.append((a, end, True))
        a = end
    if a < stop:
        out.append((a, stop, False))
    return out


def add_squares_(acc: Tensor, x: Tensor, start: int, cols: int, dim: int, squared: bool = False) -> Tensor:
    """Adds the squares of ``x`` (float32, the flat elements ``start ..`` of a ``[rows, cols]`` matrix) to ``acc``
    in place: to each row's sum (``dim=1``, ``acc`` of ``rows``) or each column's (``dim=0``, ``acc`` of ``cols``).
    One pass of the chunked :func:`column_normalize`: the squares of a segment (and its sums) at a time
    (``squared``: ``x`` holds the squares already, only their sums are taken)."""
    for a, b, whole in row_segments(start, start + x.numel(), cols):
        seg = x[a - start : b - start]
        if whole:
            v = seg.view(-1, cols)
            s = (v if squared else v.square()).sum(dim=dim)
            (acc[a // cols : b // cols] if dim == 1 else acc).add_(s)
        elif dim == 1:
            s = (seg if squared else seg.square()).sum()
            acc[a // cols].add_(s)
        else:
            s = seg if squared else seg.square()
            acc[a % cols : a % cols + (b - a)].add_(s)
        del s
    return acc


def rms_from_squares_(acc: Tensor, count: int) -> Tensor:
    """``max(sqrt(acc / count), 1e-8)`` in place: the RMS :func:`column_normalize` divides by, from the summed
    squares of :func:`add_squares_` (``count``: the elements summed per row, or the rows per column)."""
    return acc.div_(count).sqrt_().clamp_(min=RMS_FLOOR)


def normalize_flat(x: Tensor, start: int, cols: int, rms: Tensor, dim: int) -> Tensor:
    """The chunk ``x`` (flat elements ``start ..`` of a ``[rows, cols]`` matrix) divided by its rows' (``dim=1``)
    or columns' (``dim=0``) RMS ``rms`` (a vector, :func:`rms_from_squares_`), segment by segment into one new
    tensor: :func:`column_normalize` of the whole matrix, restricted to the chunk."""
    out = torch.empty_like(x)
    for a, b, whole in row_segments(start, start + x.numel(), cols):
        seg, o = x[a - start : b - start], out[a - start : b - start]
        if whole:
            d = rms[a // cols : b // cols, None] if dim == 1 else rms[None, :]
            torch.div(seg.view(-1, cols), d, out=o.view(-1, cols))
        else:
            torch.div(seg, rms[a // cols] if dim == 1 else rms[a % cols : a % cols + (b - a)], out=o)
    return out


def flat_chunks_bytes(numel: int, chunk: int, cols: int, dim: int, head: bool, low_buffer: bool) -> int:
    """The most memory the chunked step of a ``[numel / cols, cols]`` target in chunks of ``chunk`` elements
    allocates besides its statistics vector (the summed squares, then the RMS: ``4 rows`` or ``4 cols``), over its
    chunks. The first pass (:func:`add_squares_`), per segment: its squares and their sums (``4 len + 4 rows``,
    a part of a row ``4 len + 4``; per column ``4 len + 4 cols``, a part of a row ``4 len``); ``head``: the chunk's
    momentum EMA (``4 chunk``, squared in place) and the segments' sums. The step: :func:`normalize_flat`'s result
    (``4 chunk``), next to a low-precision momentum buffer's float32 copy (``low_buffer``, the head)."""
    worst = 0
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        n = stop - start
        for a, b, whole in row_segments(start, stop, cols):
            seg = b - a
            sums = 4 * ((seg // cols if whole else 1) if dim == 1 else (cols if whole else 0))
            worst = max(worst, (4 * n if head else 4 * seg) + sums)
        worst = max(worst, 4 * n * (1 + (head and low_buffer)))
    return worst
