"""NorMuon (Li et al. 2025, "NorMuon: Making Muon more efficient and scalable", arXiv 2510.05491).

Algorithm 1 of the paper, for an ``m x n`` weight (rows = output neurons)::

    M_t = b1 M_{t-1} + (1 - b1) G_t                              (Muon's momentum)
    O_t = NS5(M_t)                                               (Muon's Newton-Schulz iteration)
    v_t = b2 v_{t-1} + (1 - b2) mean_cols(O_t * O_t)             (one number per row: v_t in R^m)
    O^_t = O_t / (sqrt(V_t) + eps)                               (V_t: v_t broadcast over the columns)
    eta^ = 0.2 eta sqrt(m n) / ||O^_t||_F                        (the update's RMS matched to 0.2)
    W_t = W_{t-1} - eta lambda W_{t-1} - eta^ O^_t

The first two lines are Muon's (:mod:`.muon`: :func:`~.muon.muon_momentum_`, :func:`~.muon.newton_schulz`;
with ``nesterov`` the matrix orthogonalised is ``G + b1 (M - G)``, as the authors' code
``zichongli5/NorMuon`` ``normuon.py`` does). The functions here are lines 3-5, written on the rows' L2 norms
``||O_i||`` only (``mean_cols(O * O)_i = ||O_i||^2 / n`` and ``||O^||_F^2 = sum_i ||O_i||^2 / (sqrt(v_i) + eps)^2``):
so the step is ``O_t`` times one factor per row, ``c_i = eta^ / (sqrt(v_i) + eps)``, which a step in blocks of
rows applies with no second matrix-sized tensor.

Two places where the paper and the authors' code differ, both offered (``update_scale``):

* ``"match_rms"`` (the paper's line 5): ``eta^ = 0.2 eta sqrt(m n) / (||O^||_F + eps)``;
* ``"preserve_norm"`` (the authors' code, ``normuon_update``): ``O^`` rescaled to ``O``'s Frobenius norm, times
  Keller Jordan's ``sqrt(max(1, m / n))``: ``eta^ = eta ||O||_F sqrt(max(1, m/n)) / (||O^||_F + eps)``.

The ``+ eps`` on ``||O^||_F`` is the authors' code's (``vnorm_new.add_(1e-10)``) and pytorch_optimizer's; the
paper's line 5 has none, which a zero gradient (``O = 0``, so ``O^ = 0``) turns into 0 / 0.

Lines 3-5 work on stacks: ``v`` and the rows' norms of ``k`` matrices as ``k x m`` tensors (one matrix: ``1 x m``,
a view of its state), each operation one kernel whatever ``k``, and every reduction over a row of a stack, so a
bucket of matrices and a single matrix give the same bits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

#: ``update_scale`` choices (module docstring): the paper's RMS match and the authors' code's norm preservation.
UPDATE_SCALES = ("match_rms", "preserve_norm")


def row_norms(o_rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``||O_i||`` of each row of ``o_rows`` (``[..., r, n]``, any layout, e.g. the bfloat16 iterate's rows or a
    stack of ``k`` matrices' rows), computed in ``dtype`` on a contiguous copy: ``[..., r]``. The copy makes every path
    (a block of rows of the lean step, a whole matrix, a bucket's stack) reduce each row's ``n`` contiguous values in
    the same order."""
    rows = o_rows.to(dtype, memory_format=torch.contiguous_format, copy=True)
    return torch.linalg.vector_norm(rows, dim=-1)


def row_norms_bytes(rows: int, n: int, itemsize: int) -> int:
    """Bytes :func:`row_norms` allocates at its peak: the rows' copy beside its result."""
    return itemsize * (rows * n + rows)


def neuron_second_moment_(v: Tensor, norms: Tensor, n: int, beta2: float) -> None:
    """``v_t = b2 v_{t-1} + (1 - b2) mean_cols(O_t * O_t)`` in place (line 3), from the rows' norms
    (``mean_cols(O * O) = ||O_i||^2 / n``); ``v`` and ``norms`` are ``k x m`` in one dtype. Allocates ``k m``."""
    sq = norms * norms
    sq.div_(float(n))
    v.lerp_(sq, 1.0 - beta2)


def neuron_row_factors(v: Tensor, norms: Tensor, shape: tuple[int, int], eps: float, update_scale: str,
                       lr: float | Tensor, reduce: Any = None) -> Tensor:
    """The step's factor of each row, ``c_i = lr * s / (sqrt(v_i) + eps)`` (lines 4-5), from the updated ``v_t`` and
    the rows' norms ``||O_i||`` (both ``k x m``: ``k`` matrices of ``shape = (m, n)``)::

        d_i = sqrt(v_i) + eps ;  ||O^||_F = || ||O_i|| / d_i ||_2
        s = 0.2 sqrt(m n) / (||O^||_F + eps)                                         ("match_rms")
        s = ||O||_F sqrt(max(1, m / n)) / (||O^||_F + eps)                           ("preserve_norm")

    Returns a new ``k x m`` tensor (the step is ``c_i O_i``). ``reduce`` (an FSDP2 shard's
    :class:`~lowmem.optim.sharded.ShardReduce`; one matrix, ``v`` and ``norms`` its shard's rows): ``||O^||_F`` and
    ``||O||_F`` from their squares summed over the shards (one all-reduce of two numbers)."""
    if update_scale not in UPDATE_SCALES:
        raise ValueError(f"update_scale must be one of {list(UPDATE_SCALES)}, got {update_scale!r}")
    m, n = shape
    factors = v.sqrt()
    factors.add_(eps)
    factors.reciprocal_()  # 1 / (sqrt(v_i) + eps)
    hat = norms * factors  # ||O^_i||
    if reduce is None:
        scale = torch.linalg.vector_norm(hat, dim=-1, keepdim=True)  # ||O^||_F
    else:  # sums of squares of the shard's rows, summed over the shards
        sums = torch.stack([hat.square().sum(), norms.square().sum()])
        reduce.sum_(sums).sqrt_()
        scale, whole_norm = sums[0].view(1, 1), sums[1].view(1, 1)
    del hat
    scale.add_(eps)
    if update_scale == "match_rms":
        scale.reciprocal_()
        scale.mul_(0.2 * math.sqrt(m * n))
    else:
        target = torch.linalg.vector_norm(norms, dim=-1, keepdim=True) if reduce is None else whole_norm  # ||O||_F
        target.div_(scale)
        scale = target
        scale.mul_(math.sqrt(max(1.0, m / n)))
    scale.mul_(lr)
    factors.mul_(scale)
    return factors


def neuron_factors_bytes(k: int, m: int, itemsize: int) -> int:
    """Bytes :func:`neuron_second_moment_` and :func:`neuron_row_factors` allocate at their peak for ``k`` matrices
    of ``m`` rows (``itemsize`` the vectors' bytes per element): the factors beside the rows' ``||O^_i||`` and the
    0-d ``||O^||_F`` of each matrix, ``k (2 m + 1)`` elements (more than the second moment's ``k m`` squares before
    them, and than the factors beside two norms per matrix after)."""
    return itemsize * k * (2 * m + 1)
