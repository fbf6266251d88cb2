"""Subset-Norm step size and Subspace-Momentum (Nguyen & Nguyen 2024, "Subset-Norm and
Subspace-Momentum: Faster Memory-Efficient Adaptive Optimization with Convergence Guarantees",
ICML 2025; the authors' code: timmytonga/sn-sm, timmytonga/adam-subset-norm).

Subset-Norm (SN, Section 3) shares one adaptive step size per subset ``Psi_i`` of coordinates::

    b_{t,i}^2 = b_{t-1,i}^2 + ||g_{t,Psi_i}||^2          (AdaGrad-SN; the Adam form keeps an EMA:
    v_{t,i}   = b2 v_{t-1,i} + (1 - b2) ||g_{t,Psi_i}||^2      as the authors' AdamSN does)
    x_{t+1,j} = x_{t,j} - lr m_{t,j} / (sqrt(v_{t,psi(j)}) + eps)

For a 2-D weight the authors' subsets (their "heuristics", the ``adamw_sn`` default) are the rows
of the longer side: the squared norm is summed over the *shorter* side, so ``v`` holds
``max(m, n)`` values (``torch.sum(g**2, dim=1 - reduce_dim)`` with ``reduce_dim = 0 if m >= n``).
It is the *sum* of squares over the subset (not its mean), so the step is about
``1 / sqrt(subset size)`` of Adam's: the authors advise a learning rate about 10x Adam's.

Subspace-Momentum (SM, Section 4) keeps momentum only in a rank-r subspace ``P`` and takes a plain
SGD step in its orthogonal complement::

    m_t = b1 m_{t-1} + (1 - b1) P^T g_t ;   r_t = g_t - P P^T g_t ;   x_{t+1} = x_t - lr (P m_t + r_t)

With SN on top (SNSM) the SM direction is divided by the subset norms of the raw gradient ``g_t``,
and the authors' step size ``lr sqrt(1 - b2^t) / (1 - b1^t)`` scales the whole direction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode


def subset_dim(shape: torch.Size | tuple[int, ...]) -> int | None:
    """The dimension a 2-D tensor's subset norms sum over: the shorter side (``1``, per row, when
    ``m >= n``; ``0``, per column, otherwise), as the authors' ``reduce_dim`` heuristic. ``None``
    for other tensors (one statistic per element, Adam's)."""
    if len(shape) != 2:
        return None
    return 1 if shape[0] >= shape[1] else 0


def subset_state_shape(shape: torch.Size | tuple[int, ...], subset_norm: bool,
                       subset_size: int | None = None) -> torch.Size:
    """Shape of the second-moment state: ``(m, 1)`` / ``(1, n)`` for a subset-normed 2-D tensor
    (keepdim, so it broadcasts), ``(numel / k, 1)`` for flat subsets of ``k`` (``subset_size``, any
    tensor), the tensor's own shape otherwise."""
    if subset_norm and subset_size is not None:
        numel = math.prod(shape)
        return torch.Size((numel // flat_subset_size(numel, subset_size), 1))
    dim = subset_dim(shape) if subset_norm else None
    if dim is None:
        return torch.Size(shape)
    return torch.Size((shape[0], 1) if dim == 1 else (1, shape[1]))


def flat_subset_size(numel: int, subset_size: int) -> int:
    """The authors' general partition (``adamw_sng.py``, pytorch_optimizer's ``AdamWSN``): contiguous
    flat subsets of ``k`` elements, ``k`` the largest divisor of ``numel`` not above the request
    (``subset_size > 0``; ``-d``: ``int(sqrt(numel) / d)``), at least 1 and at most ``numel``."""
    want = subset_size if subset_size > 0 else int(math.sqrt(numel) / -subset_size)
    want = min(max(want, 1), max(numel, 1))
    return next(k for k in range(want, 0, -1) if numel % k == 0)


def subset_sq_norms(g: Tensor, dim: int | None) -> Tensor:
    """``||g_{Psi_i}||^2`` for every subset (Section 3): the sum of squares over ``dim`` (keepdim);
    ``g^2`` element-wise when ``dim`` is ``None``."""
    if dim is None:
        return g * g
    return (g * g).sum(dim=dim, keepdim=True)


def subset_sq_norms_by_norm(g: Tensor, dim: int | None) -> Tensor:
    """:func:`subset_sq_norms` as the square of ``torch.linalg.vector_norm`` over ``dim`` (keepdim):
    no ``g^2`` of ``g``'s size (one pass over ``g``, not three), equal to float32 rounding (the
    square of a rounded norm). SNSM's statistic of the raw gradient in the combine-back's row
    blocks (:class:`~lowmem.optim.recipes.subset_norm.SubsetNormStep`); ``g^2`` element-wise when
    ``dim`` is ``None``."""
    if dim is None:
        return g * g
    return torch.linalg.vector_norm(g, dim=dim, keepdim=True).square_()


def ema_(x: Tensor, update: Tensor, beta: float) -> Tensor:
    """``x <- beta x + (1 - beta) update`` in place (the EMA of both moments, as the authors write it)."""
    return x.mul_(beta).add_(update, alpha=1.0 - beta)


def accumulate_(x: Tensor, update: Tensor) -> Tensor:
    """``b_t^2 = b_{t-1}^2 + ||g_{t,Psi_i}||^2`` in place: AdaGrad-SN's sum (Section 3, the paper's
    Algorithm; the authors' ``beta2 = 1``)."""
    return x.add_(update)


def step_scale(t: float, beta1: float, beta2: float) -> float:
    """The authors' bias correction folded into the step size: ``sqrt(1 - b2^t) / (1 - b1^t)``."""
    return math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


def sn_denominator(v: Tensor, eps: float) -> Tensor:
    """``sqrt(v) + eps``: eps on the raw (uncorrected) square root, as the authors and pytorch_optimizer."""
    return v.sqrt().add_(eps)


def foreach_scalar(xs: list[Tensor], value: float) -> float | Tensor:
    """``value`` as the scalar of torch's multi-tensor ``mul`` / ``div`` of ``xs``: on the CPU, when every
    tensor is float32 (or every one float64), a 0-d tensor of that dtype, else the number itself. torch's CPU
    ``_foreach_mul_(xs, number)`` steps tensor by tensor and wraps the number in a new 0-d tensor for each one
    (~1 us a tensor: 3.5x the kernel's time on 1,024-element tensors); with a 0-d tensor nothing is wrapped.
    The result is the same bit for bit: the kernel rounds the number to the tensors' float32 / float64 as the
    0-d tensor holds it (half-precision lists keep the number: their kernels compute in float32 and a 0-d
    tensor of their dtype would round it first). CUDA's fused multi-tensor kernels take the number. The 0-d
    tensor (4 or 8 B) stands for the wrapped numbers; kept from step to step by value outside a dispatch mode (the
    first call makes it), under one (``measure_memory``'s tracker) made anew at each call and seen by it: the
    estimator counts Lion's two (``lowmem.memory.estimate._foreach_scalar_bytes``; see
    :func:`~lowmem.optim.functional.lion.lion_direction_foreach`)."""
    if not xs or xs[0].device.type != "cpu":
        return value
    dtype = xs[0].dtype
    if dtype not in (torch.float32, torch.float64) or any(x.dtype != dtype for x in xs):
        return value
    return cpu_scalar(value, dtype)


# 0-d CPU tensors of the multi-tensor operations' scalars, by (value, dtype): :func:`cpu_scalar`
_CPU_SCALARS: dict[tuple[float, torch.dtype], Tensor] = {}
_CPU_SCALARS_KEPT = 64


def cpu_scalar(value: float, dtype: torch.dtype) -> Tensor:
    """``torch.tensor(value, dtype=dtype)`` on the CPU, one kept per value and dtype (at most
    :data:`_CPU_SCALARS_KEPT`, all dropped when full: a scheduled ``lr`` makes a new value every step): a step's
    constant scalars (``beta1``, ``beta2``, ``1 - lr wd``) are not made again at every step (~2 us each, issue 15).
    Only ever read (the scalar operand of a multi-tensor ``mul`` / ``div``); the same value as a new one, so the
    same bits of every result. Under a dispatch mode (a fake tensor mode, a tracer) a new one, as before: a tensor made
    there is that mode's."""
    key = (value, dtype)
    hit = _CPU_SCALARS.get(key)
    if hit is None or _get_current_dispatch_mode() is not None:
        if _get_current_dispatch_mode() is not None:
            return torch.tensor(value, dtype=dtype)
        if len(_CPU_SCALARS) >= _CPU_SCALARS_KEPT:
            _CPU_SCALARS.clear()
        with torch.inference_mode(False), torch.no_grad():
            hit = _CPU_SCALARS[key] = torch.tensor(value, dtype=dtype)
    return hit


def ema_foreach_(xs: list[Tensor], updates: list[Tensor], beta: float) -> None:
    """:func:`ema_` of several float32 tensors, ``x <- beta x + (1 - beta) update``, one multi-tensor
    kernel per operation: the same operations in the same order (bit for bit on the CPU). The
    momentum of every recipe here: ``m_t = b1 m_{t-1} + (1 - b1) g_t`` (Section 3), of ``P^T g_t``
    under a projection (Subspace-Momentum, Section 4)."""
    torch._foreach_mul_(xs, foreach_scalar(xs, beta))
    torch._foreach_add_(xs, updates, alpha=1.0 - beta)


def sgd_momentum_foreach_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor] | None, beta1: float,
                          lr: float, weight_decay: float) -> None:
    """Multi-tensor step of float32 tensors trained by SGD with momentum (``sgd_sm``'s parameters
    outside the subspace: vectors, the unprojected head), the authors' ``sgd`` configuration:
    ``m <- b1 m + (1 - b1) g`` (:func:`ema_foreach_`; ``exp_avgs=None``: plain SGD on ``g``),
    ``p <- p - lr m``, then decoupled decay ``p <- (1 - lr wd) p``. The single-tensor step's
    operations in its order (bit for bit on the CPU); no temporaries (the step reads ``m`` itself)."""
    if exp_avgs is not None:
        ema_foreach_(exp_avgs, grads, beta1)
    torch._foreach_add_(params, exp_avgs if exp_avgs is not None else grads, alpha=-lr)
    if weight_decay != 0:
        torch._foreach_mul_(params, foreach_scalar(params, 1.0 - lr * weight_decay))


def elementwise_foreach_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor] | None,
                         exp_avg_sqs: list[Tensor], t: float, beta1: float, beta2: float | None, lr: float,
                         weight_decay: float, eps: float, scale: float) -> None:
    """Multi-tensor step of float32 tensors whose second moment is one per element (Adam's ``v``:
    parameters outside the subset-normed groups), sharing ``t``: ``m <- b1 m + (1 - b1) g``
    (``exp_avgs=None``: the numerator is ``g``), ``v <- b2 v + (1 - b2) g^2`` (:func:`ema_`; ``beta2
    = None``: :func:`accumulate_`), ``p <- p - lr * scale * m / (sqrt(v) + eps)``, then decoupled
    decay ``p <- (1 - lr * wd) p``. The same operations, in the same order, as the single-tensor
    step (bit for bit), one kernel per operation for the whole list. Transient: two float32
    tensors of the bucket (``sqrt(v) + eps`` and the direction)."""
    if exp_avgs is not None:
        ema_foreach_(exp_avgs, grads, beta1)
    sq = torch._foreach_mul(grads, grads)
    if beta2 is None:
        torch._foreach_add_(exp_avg_sqs, sq)
    else:
        torch._foreach_mul_(exp_avg_sqs, foreach_scalar(exp_avg_sqs, beta2))
        torch._foreach_add_(exp_avg_sqs, sq, alpha=1.0 - beta2)
    del sq
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    d = torch._foreach_div(exp_avgs if exp_avgs is not None else grads, denom)
    del denom
    if scale != 1.0:
        torch._foreach_mul_(d, foreach_scalar(d, scale))
    torch._foreach_add_(params, d, alpha=-lr)
    if weight_decay != 0:
        torch._foreach_mul_(params, foreach_scalar(params, 1.0 - lr * weight_decay))


def subset_foreach_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor] | None,
                    exp_avg_sqs: list[Tensor], t: float, beta1: float, beta2: float | None, lr: float,
                    weight_decay: float, eps: float, scale: float) -> None:
    """Multi-tensor step of float32 tensors with a Subset-Norm second moment, sharing ``t``: each
    ``v`` is ``(rows, 1)`` (one per contiguous run of ``numel / rows`` elements: a row of the longer
    side, or a flat subset) or ``(1, n)`` (one per column of a wide matrix). ``m <- b1 m + (1 - b1) g``
    (``exp_avgs=None``: the numerator is ``g``), ``v <- b2 v + (1 - b2) ||g_Psi||^2``
    (:func:`subset_sq_norms`, :func:`ema_`; ``beta2=None``: :func:`accumulate_`),
    ``p <- p - lr * scale * m / (sqrt(v) + eps)``, then decoupled decay ``p <- (1 - lr * wd) p``
    (Section 3): the single-tensor step's operations in its order, one kernel per operation for the
    list, except the subset norms: one reduction per subset length over the concatenated squared
    gradients of the row-subset tensors that share it (per tensor for the columns).

    Transient (float32): the concatenated squares of one subset length, then the direction of every
    tensor next to the small ``sqrt(v) + eps``: about one tensor of the list's size."""
    keep = [i for i, p in enumerate(params) if p.numel() > 0]  # an empty tensor has nothing to step
    if len(keep) < len(params):
        params, grads, exp_avg_sqs = [params[i] for i in keep], [grads[i] for i in keep], [exp_avg_sqs[i] for i in keep]
        exp_avgs = None if exp_avgs is None else [exp_avgs[i] for i in keep]
    if not params:
        return
    if exp_avgs is not None:
        ema_foreach_(exp_avgs, grads, beta1)
    nums = exp_avgs if exp_avgs is not None else grads
    sq: list[Tensor | None] = [None] * len(grads)
    by_length: dict[int, list[int]] = {}
    for i, (g, v) in enumerate(zip(grads, exp_avg_sqs)):
        if v.shape[-1] == 1 and g.numel() > 0:  # (rows, 1): contiguous subsets
            by_length.setdefault(g.numel() // v.shape[0], []).append(i)
        else:  # (1, n): the sum over the rows of each column
            g2 = g.reshape(-1, v.shape[-1])
            sq[i] = subset_sq_norms(g2, 0)
    for length, idx in by_length.items():
        shape = grads[idx[0]].shape
        if all(grads[i].shape == shape for i in idx):
            flat = torch.stack([grads[i] for i in idx]).view(-1, length)
        else:
            flat = torch.cat([grads[i].reshape(-1) for i in idx]).view(-1, length)
        sums = subset_sq_norms(flat, 1)
        del flat
        for i, s in zip(idx, sums.split([exp_avg_sqs[i].shape[0] for i in idx])):
            sq[i] = s
        del sums
    if beta2 is None:
        torch._foreach_add_(exp_avg_sqs, sq)
    else:
        torch._foreach_mul_(exp_avg_sqs, foreach_scalar(exp_avg_sqs, beta2))
        torch._foreach_add_(exp_avg_sqs, sq, alpha=1.0 - beta2)
    del sq
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    # the numerator as (subsets, elements) against (subsets, 1), or (rows, n) against (1, n)
    d = torch._foreach_div([x if x.dim() == 2 and (x.shape[0] == v.shape[0] if v.shape[-1] == 1 else x.shape[1] == v.shape[1])
                            else x.reshape(v.shape[0], -1) if v.shape[-1] == 1 else x.reshape(-1, v.shape[-1])
                            for x, v in zip(nums, exp_avg_sqs)], denom)
    del denom
    if scale != 1.0:
        torch._foreach_mul_(d, foreach_scalar(d, scale))
    torch._foreach_add_(params, [x if x.shape == p.shape else x.view(p.shape) for x, p in zip(d, params)], alpha=-lr)
    if weight_decay != 0:
        torch._foreach_mul_(params, foreach_scalar(params, 1.0 - lr * weight_decay))


def sm_fold_foreach_(lows: list[Tensor], d_lows: list[Tensor], scale: float, free_lr_scale: float) -> list[Tensor]:
    """Subspace-Momentum's combined direction in folded form (Section 4: ``scale P d_low + f (G - P low)``
    is ``P M + f G``), ``M = scale d_low - f low`` of every projected parameter of a bucket, in place on
    ``d_lows`` (two multi-tensor kernels; one when ``scale = 1``): the per-tensor fold's
    ``torch.add(d_low * scale, low, alpha=-f)``, bit for bit. Returns ``d_lows``."""
    if scale != 1.0:
        torch._foreach_mul_(d_lows, foreach_scalar(d_lows, scale))
    torch._foreach_add_(d_lows, lows, alpha=-free_lr_scale)
    return d_lows


def sn_denominators_foreach_(exp_avg_sqs: list[Tensor], sq_norms: list[Tensor], beta2: float | None, eps: float,
                             scale: float) -> list[Tensor]:
    """The Subset-Norm step's denominators of several float32 statistics at once (Section 3): ``v <- b2 v +
    (1 - b2) ||G_Psi||^2`` in place (:func:`ema_`; ``beta2=None``: AdaGrad's :func:`accumulate_`), then
    ``(sqrt(v) + eps) / scale`` (:func:`sn_denominator`; ``scale``: the bias-corrected step scale the
    direction is multiplied by, folded into the denominator as the per-tensor step does; not divided when
    1). The per-tensor operations in their order, one multi-tensor kernel each: bit for bit."""
    if beta2 is None:
        torch._foreach_add_(exp_avg_sqs, sq_norms)
    else:
        ema_foreach_(exp_avg_sqs, sq_norms, beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    if scale != 1.0:
        torch._foreach_div_(denom, foreach_scalar(denom, scale))
    return denom
