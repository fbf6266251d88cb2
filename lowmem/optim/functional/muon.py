"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; Liu et al.
2025, "Muon is Scalable for LLM Training"): momentum SGD whose update of a 2-D weight is
orthogonalised by a Newton-Schulz iteration.

Notation as in ``torch.optim.Muon`` (torch 2.13, the implementation lowmem is tested equal to):
``B`` momentum buffer, ``mu`` momentum, ``(a, b, c)`` the quintic's coefficients, ``k`` steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Keller Jordan's quintic coefficients, chosen to maximise the slope at zero (the iteration then
#: maps singular values to roughly [0.5, 1.5] instead of exactly 1, which does not hurt training).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
#: ``adjust_lr_fn`` choices: Keller Jordan's ``sqrt(max(1, A/B))`` and Moonshot's ``0.2 sqrt(max(A, B))``.
ADJUST_LR_FNS = ("original", "match_rms_adamw")


def muon_momentum_(buf: Tensor, g: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """The momentum step and the matrix to orthogonalise (torch.optim.Muon's algorithm)::

        B_t = mu B_{t-1} + (1 - mu) g_t                 (the EMA form of Keller Jordan's code)
        U_t = g_t + mu (B_t - g_t)  if nesterov  else  B_t

    ``buf`` is updated in place; with ``nesterov`` a new tensor is returned, otherwise ``buf`` itself.
    """
    buf.lerp_(g, 1.0 - momentum)
    return g.lerp(buf, momentum) if nesterov else buf


def newton_schulz(u: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """The zeroth power (orthogonalisation) of the matrix ``u`` by ``steps`` quintic Newton-Schulz
    iterations in bfloat16, as in Keller Jordan's reference and ``torch.optim.Muon``::

        X_0 = U / max(||U||_F, eps)          (bfloat16; transposed when U is tall, so X X^T is small)
        A = X X^T ;  B = b A + c A A ;  X <- a X + B X      (k times)

    Returns a new bfloat16 tensor of ``u``'s shape (``u`` is not modified).
    """
    a, b, c = coefficients
    tall = u.size(0) > u.size(1)
    x = u.to(torch.bfloat16, copy=True)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def muon_lr_ratio(shape: torch.Size | tuple[int, ...], adjust_lr_fn: str) -> float:
    """The shape-based factor of Muon's step size for an ``A x B`` weight:

    * ``"original"`` (Keller Jordan): ``sqrt(max(1, A / B))``, with a learning rate tuned for Muon
      (about 0.02);
    * ``"match_rms_adamw"`` (Liu et al. 2025, the per-parameter update scale): ``0.2 sqrt(max(A, B))``, which gives the
      update the RMS of a typical AdamW update, so the learning rate and weight decay tuned for
      AdamW carry over (fine-tuning a model trained with AdamW).
    """
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be one of {list(ADJUST_LR_FNS)}, got {adjust_lr_fn!r}")
