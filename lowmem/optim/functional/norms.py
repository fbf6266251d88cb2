"""Reductions of low-precision tensors without a full-size float32 copy."""

from __future__ import annotations

import torch
from torch import Tensor


def float_norm(x: Tensor, block_numel: int = 2**19) -> Tensor:
    """``||x||_2`` in at least float32 precision, as a 0-d tensor.

    ``torch.linalg.vector_norm(x, dtype=torch.float32)`` converts a bfloat16 ``x`` whole first (a
    float32 copy of the tensor); here a contiguous low-precision ``x`` is converted ``block_numel``
    elements at a time and the blocks' squared norms are summed. float32 / float64 tensors are reduced
    directly (no copy).
    """
    if x.dtype in (torch.float32, torch.float64) or not x.is_contiguous() or x.numel() <= block_numel:
        return torch.linalg.vector_norm(x, dtype=torch.promote_types(x.dtype, torch.float32))
    flat = x.view(-1)
    sq = torch.zeros((), dtype=torch.float32, device=x.device)
    for a in range(0, flat.numel(), block_numel):
        sq.add_(torch.linalg.vector_norm(flat[a:a + block_numel].float()).square_())
    return sq.sqrt_()
