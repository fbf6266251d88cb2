"""Plain loops of SGD (momentum, dampening, Nesterov), Adagrad and RMSprop, written from their papers' updates in
torch's documented form (the pseudocode of ``torch.optim.SGD`` / ``Adagrad`` / ``RMSprop``), with torch's coupled
(L2) weight decay ``g <- g + wd p`` before the statistics (lowmem/optim/recipes/classic.py).
tests/test_newopt18_classic.py compares the engine with the torch classes themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import Reference, register_reference


def sgd(p: Tensor, grads: list[Tensor], *, index: int, lr: float, momentum: float, dampening: float, nesterov: bool,
        weight_decay: float, **_) -> list[Tensor]:
    """``g <- g + wd p``; ``b_1 = g``, ``b_t = mu b + (1 - dampening) g``; ``d = g + mu b`` (Nesterov) or ``b``;
    ``p <- p - lr d`` (Polyak 1964; Sutskever et al. 2013)."""
    b, out = None, []
    for g in grads:
        g = g + weight_decay * p
        if momentum:
            b = g.clone() if b is None else momentum * b + (1 - dampening) * g
            g = g + momentum * b if nesterov else b
        p = p - lr * g
        out.append(p)
    return out


def adagrad(p: Tensor, grads: list[Tensor], *, index: int, lr: float, lr_decay: float, initial_accumulator_value: float,
            eps: float, weight_decay: float, **_) -> list[Tensor]:
    """``g <- g + wd p``; ``s <- s + g^2``; ``p <- p - lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)`` (Duchi et al. 2011)."""
    s, out = torch.full_like(p, initial_accumulator_value), []
    for t, g in enumerate(grads, start=1):
        g = g + weight_decay * p
        s = s + g * g
        p = p - lr / (1 + (t - 1) * lr_decay) * g / (s.sqrt() + eps)
        out.append(p)
    return out


def rmsprop(p: Tensor, grads: list[Tensor], *, index: int, lr: float, alpha: float, eps: float, momentum: float,
            centered: bool, weight_decay: float, **_) -> list[Tensor]:
    """``g <- g + wd p``; ``v <- alpha v + (1 - alpha) g^2``; centered ``c <- alpha c + (1 - alpha) g``, ``v~ = v - c^2``;
    ``u = g / (sqrt(v~) + eps)``; ``b <- mu b + u``; ``p <- p - lr b`` (``u`` without momentum)
    (Tieleman & Hinton 2012; Graves 2013, Eq. 38-41)."""
    v, c, b, out = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p), []
    for g in grads:
        g = g + weight_decay * p
        v = alpha * v + (1 - alpha) * g * g
        c = alpha * c + (1 - alpha) * g
        u = g / ((v - c * c if centered else v).sqrt() + eps)
        b = momentum * b + u
        p = p - lr * (b if momentum else u)
        out.append(p)
    return out


register_reference("sgd", Reference(sgd, configs=(
    {},
    {"lr": 0.05, "weight_decay": 0.1},  # no momentum: the decay (decoupled = torch's L2 here)
    {"lr": 0.05, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.3},
    {"lr": 0.05, "momentum": 0.8, "nesterov": True},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.1},  # L2 decay into the buffer
)))

register_reference("adagrad", Reference(adagrad, configs=(
    {},
    {"lr": 0.05, "lr_decay": 0.1, "initial_accumulator_value": 0.5},
    {"lr": 0.1, "eps": 1e-3},
    {"lr": 0.05, "lr_decay": 0.1, "weight_decay": 0.1},
)))

register_reference("rmsprop", Reference(rmsprop, configs=(
    {},
    {"lr": 1e-3, "alpha": 0.9, "centered": True},
    {"lr": 1e-3, "momentum": 0.9},
    {"lr": 1e-3, "alpha": 0.95, "momentum": 0.5, "centered": True, "eps": 1e-6},
    {"lr": 1e-3, "momentum": 0.9, "centered": True, "weight_decay": 0.1},
)))
