"""Plain loops of the normalized-update recipes (Muon, SCALE, SinkGD), written from their papers
(see the package docstring). Each is a hybrid: in the suite's flat parameter list (one group,
targeted), the 2-D parameters take the paper's update and the vector takes AdamW."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import DEFAULT_SHAPES, Reference, register_reference


def _adamw(p: Tensor, grads: list[Tensor], lr: float, b1: float, b2: float, eps: float, decay: float,
           eps_on_raw_v: bool = False) -> list[Tensor]:
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2) for the parameters the hybrids do not target:
    ``p <- p (1 - decay)`` (``decay``: the AdamW learning rate times ``weight_decay``), then the Adam
    step with ``lr`` (the AdamW learning rate).
    ``eps_on_raw_v``: ``eps`` added to the uncorrected ``sqrt(v)`` (SCALE's authors' code)."""
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    for t, g in enumerate(grads, start=1):
        p = p * (1 - decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if eps_on_raw_v:
            p = p - lr * (m / (v.sqrt() + eps)) * (math.sqrt(1 - b2**t) / (1 - b1**t))
        else:
            p = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        out.append(p)
    return out


# ---- Muon ------------------------------------------------------------------------------------


def _orthogonalize(u: Tensor, coefficients, steps: int, eps: float) -> Tensor:
    """Keller Jordan's quintic Newton-Schulz iteration in bfloat16: ``X = U / ||U||`` (transposed if
    tall), then ``A = X X^T, B = b A + c A A, X = a X + B X``. Each of the last two lines is one
    bfloat16 rounding (``torch.addmm``, as in torch.optim.Muon; three separately rounded bfloat16 ops
    differ by a few percent of the step)."""
    a, b, c = coefficients
    x = u.bfloat16()
    tall = u.shape[0] > u.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return (x.T if tall else x).float()


def muon(p: Tensor, grads: list[Tensor], *, index: int, lr: float, weight_decay: float, momentum: float,
         nesterov: bool, ns_coefficients, ns_steps: int, ns_eps: float, adjust_lr_fn: str, betas, eps: float,
         adamw_lr_ratio: float, use_muon: bool = False, **_) -> list[Tensor]:
    """Muon (Jordan et al. 2024; torch.optim.Muon's form) on a 2-D parameter of a ``use_muon`` group (a 3-D
    parameter: on each matrix over its last two, as a parameter of its own; a 4-D convolution kernel ``[out, in, kh,
    kw]``: as the one matrix ``[out, in kh kw]``, Keller Jordan's muon.py ``muon_update``, ``update.view(len(update),
    -1)``, ``s`` from that matrix's rows and columns)::

        B <- mu B + (1 - mu) g ;  U = g + mu (B - g) if nesterov else B
        O = NewtonSchulz5(U) (bfloat16) ;  p <- p (1 - lr wd) ;  p <- p - lr s(A, B) O

    with ``s = sqrt(max(1, A/B))`` ("original") or ``0.2 sqrt(max(A, B))`` ("match_rms_adamw",
    Liu et al. 2025); AdamW otherwise, as an Adam group of Keller Jordan's ``MuonWithAuxAdam`` with
    ``lr * adamw_lr_ratio`` as its own ``lr``: step and decay ``p <- p (1 - adam_lr wd)`` with it
    (KellerJordan/Muon ``muon.py`` lines 222-223).
    """
    if not (use_muon and p.dim() >= 2):
        adam_lr = lr * adamw_lr_ratio
        return _adamw(p, grads, adam_lr, betas[0], betas[1], eps, adam_lr * weight_decay)
    if p.dim() == 4:  # a conv kernel: one linear map of in kh kw inputs, its matrix [out, in kh kw] (Keller Jordan)
        kw = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
              "ns_coefficients": ns_coefficients, "ns_steps": ns_steps, "ns_eps": ns_eps, "adjust_lr_fn": adjust_lr_fn,
              "betas": betas, "eps": eps, "adamw_lr_ratio": adamw_lr_ratio, "use_muon": True}
        mat = p.reshape(p.shape[0], -1)
        return [q.reshape(p.shape) for q in muon(mat, [g.reshape(mat.shape) for g in grads], index=index, **kw)]
    if p.dim() == 3:
        # a batch of matrices over the last two dimensions (fused MoE experts [E, A, B]): Muon's update is
        # per matrix, so each A x B matrix is a parameter of its own (its momentum, its iteration, s(A, B))
        kw = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
              "ns_coefficients": ns_coefficients, "ns_steps": ns_steps, "ns_eps": ns_eps, "adjust_lr_fn": adjust_lr_fn,
              "betas": betas, "eps": eps, "adamw_lr_ratio": adamw_lr_ratio, "use_muon": True}
        flat = p.reshape(-1, *p.shape[-2:])
        per = [muon(flat[e], [g.reshape(flat.shape)[e] for g in grads], index=index, **kw) for e in range(flat.shape[0])]
        return [torch.stack([steps[t] for steps in per]).reshape(p.shape) for t in range(len(grads))]
    rows, cols = p.shape
    s = math.sqrt(max(1.0, rows / cols)) if adjust_lr_fn == "original" else 0.2 * math.sqrt(max(rows, cols))
    buf, out = torch.zeros_like(p), []
    for g in grads:
        # the EMA and the Nesterov mix as torch.lerp computes them: the bfloat16 cast below turns a
        # one-ulp float32 difference into a different rounding, so the reference rounds alike
        buf = torch.lerp(buf, g, 1 - momentum)
        u = torch.lerp(g, buf, momentum) if nesterov else buf
        o = _orthogonalize(u, ns_coefficients, ns_steps, ns_eps)
        p = p * (1 - lr * weight_decay)
        p = p - lr * s * o
        out.append(p)
    return out


register_reference("muon", Reference(muon, configs=(
    {"lr": 2e-2},
    {"lr": 2e-2, "adjust_lr_fn": "original", "weight_decay": 0.0, "momentum": 0.9},
    {"lr": 1e-2, "nesterov": False, "ns_steps": 3, "weight_decay": 0.05, "betas": (0.8, 0.99), "adamw_lr_ratio": 0.5},
), shapes=(*DEFAULT_SHAPES, (3, 7, 10), (4, 5, 3), (6, 2, 3, 3), (20, 1, 2, 3)), rtol=1e-5, atol=1e-6))
# (+ batches of matrices, fused MoE experts; conv kernels, a wide [6, 18] and a tall [20, 6] matrix)


# ---- SinkGD ----------------------------------------------------------------------------------


def sinkgd(p: Tensor, grads: list[Tensor], *, index: int, lr: float, weight_decay: float, sinkhorn_iters: int,
           scale: float, betas, eps: float, use_sinkgd: bool = False, **_) -> list[Tensor]:
    """SinkGD (Scetbon et al. 2025, Algorithm 4 with SR-Sinkhorn, Algorithm 3) on a 2-D parameter of a
    ``use_sinkgd`` group, stateless::

        X <- G ;  L times:  X <- sqrt(n) Q(X)^-1 X ;  X <- sqrt(m) X R(X)^-1
        p <- p (1 - lr wd) ;  p <- p - lr scale X

    (``Q`` / ``R``: diagonals of the row / column l2 norms, floored at 1e-30 so a zero gradient stays
    zero); AdamW with ``lr`` otherwise. A parameter of more dimensions (fused MoE experts ``[E, m, n]``): each
    matrix over the last two on its own (the norms along the last two dimensions).
    """
    if not (use_sinkgd and p.dim() >= 2):
        return _adamw(p, grads, lr, betas[0], betas[1], eps, lr * weight_decay)
    m, n = p.shape[-2:]
    out = []
    for g in grads:
        x = g
        for _ in range(sinkhorn_iters):
            x = math.sqrt(n) * x / x.norm(dim=-1, keepdim=True).clamp(min=1e-30)
            x = math.sqrt(m) * x / x.norm(dim=-2, keepdim=True).clamp(min=1e-30)
        p = p * (1 - lr * weight_decay)
        p = p - lr * scale * x
        out.append(p)
    return out


register_reference("sinkgd", Reference(sinkgd, configs=(
    {},
    {"lr": 2e-2, "sinkhorn_iters": 1, "scale": 1.0, "weight_decay": 0.1},
    {"lr": 1e-2, "sinkhorn_iters": 3, "scale": 0.2, "betas": (0.8, 0.95), "eps": 1e-6},
), shapes=(*DEFAULT_SHAPES, (3, 7, 10), (2, 20, 16))))  # + batches of matrices: fused MoE experts


# ---- SCALE -----------------------------------------------------------------------------------


def scale(p: Tensor, grads: list[Tensor], *, index: int, lr: float, weight_decay: float, momentum: float, betas,
          eps: float, adamw_lr_ratio: float, scale_role: str | None = None, **_) -> list[Tensor]:
    """SCALE (Glentis et al. 2025, the SCALE update) on a matrix of a group with ``scale_role``::

        m_t = beta m_{t-1} + (1 - beta) g_t   on the output layer ("head"), else m_t = g_t
        p <- p (1 - lr wd) ;  p <- p - lr C(m_t)

    ``C`` divides each output unit's weights by their RMS (floored at 1e-8, the authors' code): the
    rows of an ``[out, in]`` weight, the columns of an ``[vocab, d]`` embedding. Vectors take AdamW
    with ``eps`` on the uncorrected ``sqrt(v)``, stepped and decayed with the authors' AdamW learning
    rate ``(adam_lr / max_lr) lr`` = ``lr * adamw_lr_ratio`` =: ``adam_lr``: ``p <- p (1 - adam_lr wd)``
    (OptimAI-Lab/Minimalist_LLM_Pretraining ``mem_eff_pt/pt_scale/scale_optimizer.py``, lines 136-139, 167).
    A parameter of 3 dimensions (fused MoE experts ``[E, A, B]``): each ``A x B`` matrix as a matrix of its own
    (the norms along its last two dimensions); of more (a conv kernel): its ``[size(0), -1]`` view.
    """
    if scale_role is None or p.dim() < 2:
        adam_lr = lr * adamw_lr_ratio
        return _adamw(p, grads, adam_lr, betas[0], betas[1], eps, adam_lr * weight_decay, eps_on_raw_v=True)
    dim = -2 if scale_role == "embedding" else -1
    buf, out = torch.zeros_like(p), []
    for g in grads:
        if scale_role == "head":
            buf = momentum * buf + (1 - momentum) * g
            g = buf
        x = g.reshape(g.size(0), -1) if g.dim() > 3 else g  # a conv kernel: its [out, -1] view
        rms = x.square().mean(dim=dim, keepdim=True).sqrt().clamp(min=1e-8)
        p = p * (1 - lr * weight_decay)
        p = p - lr * (x / rms).view(p.shape)
        out.append(p)
    return out


register_reference("scale", Reference(scale, configs=(
    {},
    {"scale_role": "head", "lr": 2e-2, "momentum": 0.8, "weight_decay": 0.1},
    # a large eps: the vector's AdamW step shows where eps enters (the authors' uncorrected sqrt(v))
    {"scale_role": "embedding", "lr": 1e-2, "betas": (0.8, 0.95), "eps": 0.1, "adamw_lr_ratio": 0.5, "weight_decay": 0.05},
    # adam_lr != lr with weight decay: the vector decays with adam_lr (the authors'), not lr
    {"scale_role": "hidden", "lr": 2e-2, "adamw_lr_ratio": 3.0, "weight_decay": 0.2},
)))
