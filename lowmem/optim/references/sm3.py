"""Plain loop of SM3-II (Anil, Gupta, Koren, Singer, NeurIPS 2019), written from the paper's Algorithm 2
with the cover sets listed explicitly (see the package docstring)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import Reference, register_reference


def _covers(shape: torch.Size) -> list[Tensor]:
    """The paper's covers of a tensor of ``shape`` (Section 4), as one ``(numel,)`` index per family: the set
    each coordinate belongs to. ``p >= 2`` dimensions: one family per dimension, the slices along it (a
    matrix's rows and columns); a vector or a scalar: one set per coordinate."""
    numel = max(1, torch.Size(shape).numel())
    if len(shape) < 2:
        return [torch.arange(numel)]
    index = torch.arange(numel).view(shape)
    out = []
    for d in range(len(shape)):
        size = [1] * len(shape)
        size[d] = shape[d]
        out.append((index * 0 + torch.arange(shape[d]).view(size)).reshape(-1))  # coordinate -> its slice along d
    return out


def sm3(p: Tensor, grads: list[Tensor], *, index: int, lr: float, momentum: float, beta2: float, eps: float,
        weight_decay: float, **_) -> list[Tensor]:
    """SM3-II, Algorithm 2, over the cover sets ``S_r`` of :func:`_covers` (``mu`` one value per set)::

        nu_t(i) = min_{r : i in S_r} mu_{t-1}(r) + g_t(i)^2            (line 6; beta2 < 1: beta2 min + (1 - beta2) g^2)
        mu_t(r) = max_{j in S_r} nu_t(j)                               (line 8)
        u_t(i) = g_t(i) / sqrt(nu_t(i) + eps)                          (line 7's step direction)
        m_t = b1 m_{t-1} + (1 - b1) u_t                                (momentum > 0, the authors' TF code)
        w_{t+1} = w_t - lr wd w_t - lr m_t                             (decoupled decay, before the update)
    """
    families = _covers(p.shape)
    mus = [torch.zeros(int(f.max()) + 1) for f in families]
    m = torch.zeros(max(1, p.numel()))
    out = []
    for g in grads:
        gf = g.reshape(-1)
        lower = torch.stack([mu[f] for mu, f in zip(mus, families)]).min(dim=0).values  # min over the sets of i
        nu = lower + gf * gf if beta2 == 1.0 else beta2 * lower + (1 - beta2) * gf * gf
        mus = [torch.zeros_like(mu).scatter_reduce(0, f, nu, reduce="amax", include_self=False)
               for mu, f in zip(mus, families)]
        u = gf / torch.sqrt(nu + eps)
        if momentum > 0:
            m = momentum * m + (1 - momentum) * u
            u = m
        p = p - lr * weight_decay * p - lr * u.view(p.shape)
        out.append(p)
    return out


register_reference("sm3", Reference(sm3, shapes=((24, 40), (40, 24), (40,), (3, 8, 10), ()), configs=(
    {},  # pytorch_optimizer's defaults: lr 0.1, no momentum, sums (beta2 = 1), eps 1e-30
    {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.1},  # the paper's experiments' momentum
    {"lr": 3e-2, "momentum": 0.5, "beta2": 0.9, "eps": 1e-3},  # moving averages; eps visible
    {"lr": 1e-2, "beta2": 0.0, "weight_decay": 0.5},  # no memory: nu = g^2, the step is sign(g) (0 at the zero step)
)))
