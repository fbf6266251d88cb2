"""Adafactor (Shazeer & Stern, 2018): factored second moments, update clipping, relative step."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rms(x: Tensor) -> Tensor:
    """Root mean square, ``RMS(X) = sqrt(mean(X^2))`` (Section 5). A 0-d tensor: no host sync."""
    return x.norm(2) / math.sqrt(x.numel())


def adafactor_beta2(t: float, decay_rate: float) -> float:
    """Increasing second-moment decay ``beta2_t = 1 - t^c`` (Section 7.2, ``c = decay_rate = -0.8``)."""
    return 1.0 - math.pow(t, decay_rate)


def factored_second_moment_(row: Tensor, col: Tensor, g2: Tensor, beta2: float) -> None:
    """Update the factored second moment in place (Algorithm 4, lines 5-6).

    ``R_t = beta2 R_{t-1} + (1 - beta2) mean_cols(g^2 + eps1)``;
    ``C_t = beta2 C_{t-1} + (1 - beta2) mean_rows(g^2 + eps1)``. Mean instead of sum, as in the
    reference implementation: the ratio in :func:`factored_rsqrt` is the same.
    ``g2`` must already hold ``g^2 + eps1``. Works on the last two dimensions of any ``ndim >= 2``
    tensor (leading dimensions are batch dimensions).
    """
    row.mul_(beta2).add_(g2.mean(dim=-1), alpha=1.0 - beta2)
    col.mul_(beta2).add_(g2.mean(dim=-2), alpha=1.0 - beta2)


def factored_rsqrt(row: Tensor, col: Tensor) -> Tensor:
    """``1 / sqrt(V_hat)`` with ``V_hat = R C / (1^T R)`` (Algorithm 4, line 7), as an outer product.

    Normalizing ``R`` by its mean (not its sum) matches the mean-based statistics above.
    """
    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    c_factor = col.unsqueeze(-2).rsqrt()
    return torch.mul(r_factor, c_factor)


def clip_by_rms_(u: Tensor, threshold: float) -> Tensor:
    """Update clipping ``U / max(1, RMS(U) / d)`` (Section 6, eq. 12; ``d = clip_threshold``)."""
    return u.div_((rms(u) / threshold).clamp_(min=1.0))


def adafactor_relative_lr(t: float, warmup_init: bool) -> float:
    """Relative step size ``rho_t = min(1e-2, 1/sqrt(t))`` (Section 8; ``1e-6 t`` with warm-up init)."""
    min_step = 1e-6 * t if warmup_init else 1e-2
    return min(min_step, 1.0 / math.sqrt(t))


def adafactor_param_scale(p: Tensor, eps2: float) -> Tensor:
    """Parameter scale ``max(eps2, RMS(X_{t-1}))`` (Section 8), as a 0-d tensor."""
    return rms(p).clamp(min=eps2)




# ---- the multi-tensor forms (the engine's foreach buckets, float32) ----------------------------


def adafactor_lr_foreach(params: list[Tensor], rho: float, scale_parameter: bool, eps2: float) -> list[float] | list[Tensor]:
    """Step sizes ``alpha_t = max(eps2, RMS(X_{t-1})) rho_t`` (Section 8) of several parameters:
    the parameters' norms in one ``torch._foreach_norm``, then the operations of
    :func:`adafactor_param_scale` once on the stacked norms (no host synchronisation). Without the
    parameter scale: ``rho`` for each."""
    if not scale_parameter:
        return [rho] * len(params)
    scales = torch.stack(torch._foreach_norm(params))
    scales.div_(scales.new_tensor([math.sqrt(p.numel()) for p in params])).clamp_(min=eps2).mul_(rho)
    return list(scales.unbind())


def adafactor_foreach_(params: list[Tensor], grads: list[Tensor], second: list[tuple[Tensor, ...]],
                       exp_avgs: list[Tensor] | None, lrs: list[float] | list[Tensor], beta2: float, eps1: float,
                       clip_threshold: float, beta1: float | None, weight_decay: float) -> None:
    """One Adafactor step of several float32 parameters in place (Shazeer & Stern 2018, Algorithms
    3-4 with the update clipping of Section 6, the first moment of the lr-scaled update and the
    decoupled decay before the update), the same operations in the same order as the per-tensor
    step, one multi-tensor kernel per operation where torch has one.

    ``second[i]``: ``(row, col)`` of a matrix (factored, Algorithm 4) or ``(v,)`` of a vector
    (Algorithm 3). ``lrs[i]``: the step size of parameter ``i`` (floats, or 0-d tensors from
    :func:`adafactor_lr_foreach`). Per tensor (no multi-tensor form of a reduction along one
    dimension or of an outer product): the row and column means of ``g^2 + eps1``, the mean of
    ``R`` and the outer product ``R_factor C_factor``. Transient: ``g^2 + eps1`` (freed after the
    statistics), then the updates and (with weight decay) ``lr wd X``: two float32 tensors of the
    bucket, plus the row and column vectors.
    """
    mat = [i for i, s in enumerate(second) if len(s) == 2]
    vec = [i for i, s in enumerate(second) if len(s) == 1]
    g2 = torch._foreach_mul(grads, grads)  # g^2 + eps1
    torch._foreach_add_(g2, eps1)
    if mat:  # R <- beta2 R + (1 - beta2) mean_cols(g2); C likewise with mean_rows (Algorithm 4, lines 5-6)
        rows, cols = [second[i][0] for i in mat], [second[i][1] for i in mat]
        torch._foreach_mul_(rows, beta2)
        torch._foreach_add_(rows, [g2[i].mean(dim=-1) for i in mat], alpha=1.0 - beta2)
        torch._foreach_mul_(cols, beta2)
        torch._foreach_add_(cols, [g2[i].mean(dim=-2) for i in mat], alpha=1.0 - beta2)
    if vec:  # V <- beta2 V + (1 - beta2) g2 (Algorithm 3)
        vs = [second[i][0] for i in vec]
        torch._foreach_mul_(vs, beta2)
        torch._foreach_add_(vs, [g2[i] for i in vec], alpha=1.0 - beta2)
    del g2
    us: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    if mat:  # U = (R / mean(R))^-1/2 C^-1/2 G (Algorithm 4, line 7: V_hat = R C / 1^T R)
        r_factors = [r / r.mean(dim=-1, keepdim=True) for r in rows]
        torch._foreach_rsqrt_(r_factors)
        c_factors = torch._foreach_rsqrt(cols)
        for i, r, c in zip(mat, r_factors, c_factors):
            us[i] = torch.mul(r.unsqueeze(-1), c.unsqueeze(-2))
        del r_factors, c_factors
    if vec:
        for i, u in zip(vec, torch._foreach_rsqrt(vs)):
            us[i] = u
    torch._foreach_mul_(us, grads)
    # U / max(1, RMS(U) / d) (Section 6, eq. 12)
    clip = torch.stack(torch._foreach_norm(us))
    clip.div_(clip.new_tensor([math.sqrt(u.numel()) for u in us])).div_(clip_threshold).clamp_(min=1.0)
    torch._foreach_div_(us, list(clip.unbind()))
    del clip
    torch._foreach_mul_(us, lrs)
    if beta1 is not None:  # M <- beta1 M + (1 - beta1) alpha U: the direction
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, us, alpha=1.0 - beta1)
        del us
        us = exp_avgs
    if weight_decay != 0:  # X <- X - alpha wd X (decoupled, before the update)
        if isinstance(lrs[0], Tensor):
            decay = torch._foreach_mul(params, list((torch.stack(lrs) * weight_decay).unbind()))
            torch._foreach_sub_(params, decay)
            del decay
        else:
            torch._foreach_mul_(params, [1.0 - lr * weight_decay for lr in lrs])
    torch._foreach_sub_(params, us)
