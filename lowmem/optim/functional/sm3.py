"""SM3 (Anil, Gupta, Koren, Singer, NeurIPS 2019, "Memory-Efficient Adaptive Optimization").

SM3 keeps one accumulator ``mu(r)`` per *cover set* ``S_r`` (a set of coordinates; every coordinate is in
at least one set) instead of one per coordinate, and bounds Adagrad's per-coordinate sum of squared
gradients by the smallest accumulator of the sets that hold the coordinate. SM3-II (Algorithm 2)::

    nu_t(i) = min_{r : S_r contains i} mu_{t-1}(r) + g_t(i)^2          (Algorithm 2, line 6)
    w_{t+1}(i) = w_t(i) - eta g_t(i) / sqrt(nu_t(i))                   (line 7)
    mu_t(r) = max_{j in S_r} nu_t(j)     for every cover set r          (line 8)

The covers used here are the paper's (Section 4, "tensor" covers; the authors' TF code): for a tensor of
shape ``(n_1, ..., n_p)``, ``p >= 2``, the slices along each dimension, ``n_1 + ... + n_p`` accumulators
(the rows and the columns of a matrix: ``m + n``); for a vector or a scalar, one set per coordinate, which
is diagonal Adagrad. Around it, as the authors' TF code (google-research ``sm3/sm3.py``) and
pytorch_optimizer's ``SM3``: ``eps`` inside the square root (``rsqrt(nu + eps)``, 1e-30 there), momentum on
the preconditioned gradient (``m_t = b1 m_{t-1} + (1 - b1) g / sqrt(nu_t)``, the step ``eta m_t``), and
optionally ``beta2 < 1``, the exponential-moving-average form of the TF code's later version
(``nu = beta2 min mu + (1 - beta2) g^2``; ``beta2 = 1`` is the paper's sum).

Each function is one line of the algorithm on tensors; :class:`~lowmem.optim.recipes.sm3.Sm3Moments`
holds the accumulators and runs them over a whole tensor or blocks of its leading index.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def sm3_nu(covers: Sequence[Tensor], g: Tensor, beta2: float = 1.0) -> Tensor:
    """``nu_t = min_r mu_{t-1}(r) + g_t^2`` (Algorithm 2, line 6) as a new tensor of ``g``'s shape and dtype.
    ``covers``: each coordinate's accumulators, broadcastable to ``g`` (a matrix's ``mu_row[:, None]`` and
    ``mu_col[None, :]``; a vector's own full accumulator). ``beta2 < 1``: the
    moving-average form ``beta2 min_r mu(r) + (1 - beta2) g^2``."""
    nu = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    nu.copy_(covers[0])  # (broadcast; a low-precision accumulator read in g's precision)
    for c in covers[1:]:
        torch.minimum(nu, c, out=nu)
    if beta2 != 1.0:
        nu.mul_(beta2)
    return nu.addcmul_(g, g, value=1.0 - beta2 if beta2 != 1.0 else 1.0)


def sm3_cover_max(nu: Tensor, dim: int, lead: int = 0) -> Tensor:
    """``mu_t(r) = max_{j in S_r} nu_t(j)`` (line 8) for the covers along dimension ``dim`` (the slices
    ``nu[..., r, ...]``): the maximum over every other dimension, a 1-D tensor of ``nu.shape[dim]``. ``lead``:
    leading batch dimensions kept (a stack of tensors, ``dim`` counted after them): shape ``(*batch, n_dim)``."""
    dims = tuple(d for d in range(lead, nu.dim()) if d != dim + lead)
    return nu.amax(dim=dims) if dims else nu.clone()


def sm3_precondition_(nu: Tensor, g: Tensor, eps: float) -> Tensor:
    """``g_t / sqrt(nu_t + eps)`` (line 7 without ``eta``; ``eps`` inside the root, as the authors' code),
    written into ``nu`` (not needed after line 8). Returns ``nu``."""
    return nu.add_(eps).rsqrt_().mul_(g)


def sm3_momentum_(m: Tensor, u: Tensor, momentum: float) -> Tensor:
    """``m_t = b1 m_{t-1} + (1 - b1) u_t`` in place (``u``: the preconditioned gradient; the authors' TF
    code and pytorch_optimizer's ``lerp``). Returns ``m``."""
    return m.lerp_(u, 1.0 - momentum)
