"""FRUGAL (Zmushko et al. 2024, "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead
for Scalable Training"): a state-full update in a subspace, a state-free one outside it.

Coordinate and block subspaces are index sets; projecting is selecting (Algorithm 1 with the
RandK and blockwise projections of Section 3).
"""

from __future__ import annotations

import torch
from torch import Tensor


def state_free_direction(residual: Tensor, rule: str) -> Tensor:
    """Direction for the state-free part (Algorithm 1, line 9): ``sign(G - P P^T G)`` for signSGD,
    the residual itself for SGD."""
    if rule == "signsgd":
        return torch.sign(residual)
    if rule == "sgd":
        return residual.clone()
    raise ValueError(f"state-free rule must be 'signsgd' or 'sgd', got {rule!r}")


def scaled_state_free_direction(residual: Tensor, rule: str, scale: float) -> Tensor:
    """:func:`state_free_direction` times ``scale`` (the state-free part's ``free_lr_scale``, Algorithm 1's
    learning rate of that part over the subspace's), in place on the new direction; not multiplied when
    ``scale`` is 1 (``x * 1`` is ``x``: the same bits, one kernel fewer)."""
    d = state_free_direction(residual, rule)
    return d if scale == 1.0 else d.mul_(scale)


def state_free_step_foreach_(params: list[Tensor], residuals: list[Tensor], rule: str, alpha: float) -> None:
    """``p += alpha * state_free_direction(residual)`` for every pair (Algorithm 1, line 9, the state-free
    step), one multi-tensor kernel per operation: ``sign`` in place for signSGD; ``residuals`` are consumed
    (emptied)."""
    if rule == "signsgd":
        torch._foreach_sign_(residuals)
    elif rule != "sgd":
        raise ValueError(f"state-free rule must be 'signsgd' or 'sgd', got {rule!r}")
    torch._foreach_add_(params, residuals, alpha=alpha)
    del params[:], residuals[:]


def random_indices(size: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct indices of ``range(size)`` uniformly at random (RandK), sorted."""
    return torch.randperm(size, generator=generator)[:k].sort().values


def block_indices(size: int, k: int, block: int) -> Tensor:
    """The ``block``-th contiguous block of ``k`` indices, cycling (BAdam's ordered block switching,
    Luo et al. 2024); the last block wraps around so every block has ``k`` indices."""
    n_blocks = -(-size // k)
    start = (block % n_blocks) * k
    return torch.arange(start, start + k) % size


def select(g: Tensor, dim: int | None, index: Tensor) -> Tensor:
    """The coordinates in ``index`` along ``dim`` (``None``: of the flattened tensor)."""
    return g.reshape(-1)[index] if dim is None else g.index_select(dim, index)


def scatter(low: Tensor, dim: int | None, index: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`select`: a zero tensor of ``shape`` holding ``low`` at ``index``."""
    out = torch.zeros(shape, dtype=low.dtype, device=low.device)
    if dim is None:
        out.view(-1).index_copy_(0, index, low)
        return out
    return out.index_copy_(dim, index, low)


def scatter_rows(low: Tensor, dim: int | None, index: Tensor, shape: torch.Size, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of :func:`scatter` ``(low, dim, index, shape)``, without building the rest."""
    n = shape[1]
    out = torch.zeros((stop - start, n), dtype=low.dtype, device=low.device)
    if dim == 1:
        return out.index_copy_(1, index, low[start:stop])
    if dim == 0:
        keep = (index >= start) & (index < stop)
        return out.index_copy_(0, index[keep] - start, low[keep])
    keep = (index >= start * n) & (index < stop * n)
    out.view(-1).index_copy_(0, index[keep] - start * n, low[keep])
    return out


def scatter_rows_bytes(k: int, count: int, rows: int, n: int, dim: int | None) -> int:
    """The peak of :func:`scatter_rows` (float32 ``low``) of a block of ``rows`` rows of ``n`` columns holding
    ``count`` of the ``k`` indices (exact, traced: every new storage a dispatched operation returns): the block
    ``4 rows n``; along rows (``dim=0``) or flattened (``None``) also the masks of the indices in the block (two
    comparisons and their ``&``, ``k`` bytes each), the chosen indices (int64) and their offsets from the block's
    start, then the offsets beside the chosen values (``n`` per index along rows, one flattened). ``count`` depends
    on the selection: how many of the ``k`` indices fall in the block."""
    out = 4 * rows * n
    if dim == 1:
        return out
    width = n if dim == 0 else 1
    return out + max(3 * k, k + 16 * count, k + 8 * count + 4 * count * width)
