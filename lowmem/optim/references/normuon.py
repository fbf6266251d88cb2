"""Plain loop of NorMuon (Li et al. 2025, arXiv 2510.05491, Algorithm 1), written from the paper: Muon's
momentum and Newton-Schulz iterate (the Muon reference's iteration, :func:`.normalized._orthogonalize`), then the
neuron-wise second moment and the rescaled step, on the full matrix ``O^`` as the paper writes it. A hybrid like
Muon: in the suite's flat parameter list (one targeted group) the vector takes AdamW."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import DEFAULT_SHAPES, Reference, register_reference
from .normalized import _adamw, _orthogonalize


def normuon(p: Tensor, grads: list[Tensor], *, index: int, lr: float, weight_decay: float, momentum: float,
            nesterov: bool, ns_coefficients, ns_steps: int, ns_eps: float, beta2: float, row_eps: float,
            update_scale: str, betas, eps: float, adamw_lr_ratio: float, use_muon: bool = False, **_) -> list[Tensor]:
    """NorMuon on a 2-D parameter of a ``use_muon`` group (3 dimensions: each matrix over the last two as a
    parameter of its own; a 4-D convolution kernel ``[out, in, kh, kw]``: its matrix ``[out, in kh kw]``, as Muon's
    reference and Keller Jordan's muon.py, one ``v`` per output channel, the paper's neuron-wise rule)::

        M <- b1 M + (1 - b1) g ;  U = g + b1 (M - g) if nesterov else M       (Algorithm 1 uses M)
        O = NS5(U) ;  v <- b2 v + (1 - b2) mean_cols(O * O) ;  O^ = O / (sqrt(V) + eps)
        s = 0.2 sqrt(m n) / (||O^||_F + eps)                    (update_scale "match_rms": the paper's eta^ / eta)
          = ||O||_F sqrt(max(1, m/n)) / (||O^||_F + eps)        ("preserve_norm": the authors' code)
        p <- p (1 - lr wd) ;  p <- p - lr s O^

    AdamW otherwise, as the Muon reference."""
    if not (use_muon and p.dim() >= 2):
        adam_lr = lr * adamw_lr_ratio
        return _adamw(p, grads, adam_lr, betas[0], betas[1], eps, adam_lr * weight_decay)
    if p.dim() == 4:
        kw = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
              "ns_coefficients": ns_coefficients, "ns_steps": ns_steps, "ns_eps": ns_eps, "beta2": beta2,
              "row_eps": row_eps, "update_scale": update_scale, "betas": betas, "eps": eps,
              "adamw_lr_ratio": adamw_lr_ratio, "use_muon": True}
        mat = p.reshape(p.shape[0], -1)
        return [q.reshape(p.shape) for q in normuon(mat, [g.reshape(mat.shape) for g in grads], index=index, **kw)]
    if p.dim() == 3:
        kw = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
              "ns_coefficients": ns_coefficients, "ns_steps": ns_steps, "ns_eps": ns_eps, "beta2": beta2,
              "row_eps": row_eps, "update_scale": update_scale, "betas": betas, "eps": eps,
              "adamw_lr_ratio": adamw_lr_ratio, "use_muon": True}
        flat = p.reshape(-1, *p.shape[-2:])
        per = [normuon(flat[e], [g.reshape(flat.shape)[e] for g in grads], index=index, **kw)
               for e in range(flat.shape[0])]
        return [torch.stack([steps[t] for steps in per]).reshape(p.shape) for t in range(len(grads))]
    m, n = p.shape
    buf, v, out = torch.zeros_like(p), torch.zeros(m, 1), []
    for g in grads:
        buf = torch.lerp(buf, g, 1 - momentum)  # (as torch.lerp rounds: the bfloat16 cast follows; see muon)
        u = torch.lerp(g, buf, momentum) if nesterov else buf
        o = _orthogonalize(u, ns_coefficients, ns_steps, ns_eps)
        v = beta2 * v + (1 - beta2) * (o * o).mean(dim=1, keepdim=True)
        o_hat = o / (v.sqrt() + row_eps)
        if update_scale == "match_rms":
            s = 0.2 * math.sqrt(m * n) / (o_hat.norm() + row_eps)
        else:
            s = o.norm() * math.sqrt(max(1.0, m / n)) / (o_hat.norm() + row_eps)
        p = p * (1 - lr * weight_decay)
        p = p - lr * s * o_hat
        out.append(p)
    return out


register_reference("normuon", Reference(normuon, configs=(
    {"lr": 2e-2},
    {"lr": 2e-2, "update_scale": "preserve_norm", "weight_decay": 0.0, "momentum": 0.9, "beta2": 0.9},
    {"lr": 1e-2, "nesterov": False, "ns_steps": 3, "weight_decay": 0.05, "betas": (0.8, 0.99), "adamw_lr_ratio": 0.5,
     "beta2": 0.99, "row_eps": 1e-6},
), shapes=(*DEFAULT_SHAPES, (3, 7, 10), (4, 5, 3), (6, 2, 3, 3))))  # + batches of matrices, a conv kernel
