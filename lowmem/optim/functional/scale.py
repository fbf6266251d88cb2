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
    A matrix with more than 2 dimensions is flattened to ``[size(0), -1]`` first. Returns a new tensor.

    ``column_sq`` (``dim=0`` on a block of rows of the matrix, e.g. an FSDP2 shard): sums the
    columns' squared norms over the blocks in place (an all-reduce); ``rows``: the whole row count."""
    shape = m.shape
    x = m.reshape(m.size(0), -1) if m.dim() > 2 else m
    if column_sq is not None and dim == 0:
        rms = column_sq(x.square().sum(dim=0, keepdim=True)).div_(rows).sqrt_().clamp_(min=RMS_FLOOR)
    else:
        rms = torch.linalg.vector_norm(x, dim=dim, keepdim=True).div_(math.sqrt(x.size(dim))).clamp_(min=RMS_FLOOR)
    return (x / rms).view(shape)


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


def last_layer_momentum_(buf: Tensor, g: Tensor, beta: float) -> Tensor:
    """``m_t = beta m_{t-1} + (1 - beta) g_t`` in place (the output layer's EMA); returns ``buf``."""
    return buf.lerp_(g, 1.0 - beta)


def scale_rows_foreach_(params: list[Tensor], ms: list[Tensor], lr: float, weight_decay: float) -> None:
    """SCALE's step of ``k`` float32 ``[out, in]`` matrices of one shape whose rows are normalised
    (``"hidden"``: ``ms`` the gradients; ``"head"``: the momentum buffers after their EMA)::

        p <- p (1 - lr wd) ;  p <- p - lr C(M)      (C: each row divided by max(RMS, 1e-8))

    with :func:`column_normalize`'s operations on the stack (row norms over the last dimension): equal to
    the per-matrix step bit for bit on the CPU. Transient: the stack (float32, ``4 k m n``) and the
    row RMS."""
    x = torch.stack(ms)
    rms = torch.linalg.vector_norm(x, dim=2, keepdim=True).div_(math.sqrt(x.size(2))).clamp_(min=RMS_FLOOR)
    x.div_(rms).mul_(lr)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_sub_(params, list(x.unbind(0)))
