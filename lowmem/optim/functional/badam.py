"""BAdam (Luo et al. 2024, "BAdam: A Memory Efficient Full Parameter Optimization Method for Large
Language Models"): block coordinate descent with Adam on the active block.

Algorithm 1: the parameters are partitioned into ``D`` blocks (by default the decoder layers); each
*block-epoch* visits every block once in an order ``pi`` and runs ``K`` Adam steps on the active block
only, the others fixed; Adam's state starts afresh for every visit (the authors' ``BlockOptimizer``
clears the base optimizer's state at every switch). The order is a random reshuffling per
block-epoch, ascending (input to output layer) or descending.
"""

from __future__ import annotations

import torch

ORDERS = ("random", "ascending", "descending")


def badam_block_position(period: int, n_blocks: int, order: str, start: int | None = None, seed: int = 0) -> int:
    """Position (in ``0 .. n_blocks - 1``) of the block active in the ``period``-th run of ``K`` steps.

    ``ascending``: ``(start + period) mod D`` (``start`` defaults to 0); ``descending``:
    ``(start - period) mod D`` (``start`` defaults to ``D - 1``); ``random``: block-epoch
    ``e = period // D`` visits the blocks in the permutation ``randperm(D)`` of a generator seeded
    with ``seed + e`` (Algorithm 1's random reshuffling; a function of the period alone, so a resumed
    run continues the same order).
    """
    if order == "ascending":
        return ((0 if start is None else start) + period) % n_blocks
    if order == "descending":
        return ((n_blocks - 1 if start is None else start) - period) % n_blocks
    if order == "random":
        epoch, pos = divmod(period, n_blocks)
        perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed + epoch))
        return int(perm[pos])
    raise ValueError(f"order must be one of {list(ORDERS)}, got {order!r}")
