"""Adam (Kingma & Ba, 2015, Algorithm 1) and AdamW (Loshchilov & Hutter, 2019, Algorithm 2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def compute_float(x: Tensor) -> Tensor:
    """``x`` in the precision the step computes in: float32, or float64 for float64 tensors (a
    float64 parameter is never rounded to float32); lower precisions are converted to float32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def adam_moments_(m: Tensor, v: Tensor, g: Tensor, beta1: float, beta2: float) -> None:
    """Update Adam's moments in place.

    Algorithm 1, lines 7-8: ``m_t = beta1 m_{t-1} + (1 - beta1) g``;
    ``v_t = beta2 v_{t-1} + (1 - beta2) g^2``.
    """
    m.lerp_(g.to(m.dtype), 1.0 - beta1)
    g = g.to(v.dtype)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)


def adam_direction(m: Tensor, v: Tensor, t: float, beta1: float, beta2: float, eps: float) -> Tensor:
    """Bias-corrected Adam direction ``m_hat / (sqrt(v_hat) + eps)`` (Algorithm 1, lines 9-11).

    ``eps`` is added after the bias correction of ``v``, as in ``torch.optim.AdamW``. Returns a new
    float32 tensor (unitless: multiply by ``lr`` for a parameter step).
    """
    bias_correction1 = 1.0 - beta1**t
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
    denom = compute_float(v).sqrt().div_(bias_correction2_sqrt).add_(eps)
    return torch.div(compute_float(m), denom, out=denom).div_(bias_correction1)  # one temporary, reused


def adam_direction_hf(m: Tensor, v: Tensor, t: float, beta1: float, beta2: float, eps: float) -> Tensor:
    """Adam direction with ``eps`` added to the *uncorrected* ``sqrt(v)``.

    This is the "efficient" form of Algorithm 1 noted at the end of Section 2 of Kingma & Ba
    (``alpha_t = alpha sqrt(1 - beta2^t) / (1 - beta1^t)``, ``eps`` on ``sqrt(v_t)``), used by
    transformers' legacy ``AdamW`` and by galore-torch / fira. It differs from
    :func:`adam_direction` only in where ``eps`` enters.
    """
    step_scale = math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
    denom = compute_float(v).sqrt().add_(eps)
    return torch.div(compute_float(m), denom, out=denom).mul_(step_scale)



# ---- decoupled weight decay and the parameter step (Algorithm 2, line 12) ---------------------


def decoupled_weight_decay_(p: Tensor, lr: float | Tensor, weight_decay: float) -> None:
    """``theta <- theta - lr * lambda * theta``, in place, before (or after) the gradient step."""
    if weight_decay == 0:
        return
    if isinstance(lr, Tensor):
        p.sub_(p * (lr * weight_decay))
    else:
        p.mul_(1.0 - lr * weight_decay)


def apply_update_(p: Tensor, direction: Tensor, lr: float | Tensor) -> None:
    """``theta <- theta - lr * direction`` in place (``lr`` may be a 0-d tensor)."""
    if isinstance(lr, Tensor):
        p.sub_(direction * lr)
    else:
        p.add_(direction, alpha=-lr)


def adamw_foreach_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    t: float,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    *,
    eps_placement: str = "torch",
    step_lr: float | None = None,
) -> None:
    """Multi-tensor AdamW step for float32 tensors that share the step count ``t``.

    The same math as :func:`adam_moments_`, :func:`adam_direction` (``eps_placement="torch"``) or
    :func:`adam_direction_hf` (``"hf"``: ``eps`` on the uncorrected ``sqrt(v)``),
    :func:`decoupled_weight_decay_` and :func:`apply_update_` applied one tensor at a time (that path
    is the reference; they are tested equal), with one kernel launch per operation for the whole list.
    ``step_lr``: the step size of the update when it differs from the decay's ``lr`` (a hybrid's
    AdamW parameters step with ``lr * adamw_lr_ratio`` and decay with ``lr``); default ``lr``.
    """
    if eps_placement not in ("torch", "hf"):
        raise ValueError(f"eps_placement must be 'torch' or 'hf', got {eps_placement!r}")
    step_lr = lr if step_lr is None else step_lr
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**t
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if eps_placement == "torch":  # m_hat / (sqrt(v_hat) + eps)
        torch._foreach_div_(denom, math.sqrt(1.0 - beta2**t))
        value = -step_lr / bias_correction1
    else:  # m / (sqrt(v) + eps) * sqrt(1 - beta2^t) / (1 - beta1^t)
        value = -step_lr * (math.sqrt(1.0 - beta2**t) / bias_correction1)
    torch._foreach_add_(denom, eps)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=value)


def adam_moments_foreach_(ms: list[Tensor], vs: list[Tensor], gs: list[Tensor], beta1: float, beta2: float) -> None:
    """:func:`adam_moments_` of float32 tensors, one multi-tensor kernel per operation (the same
    operations in the same order: equal to the per-tensor form bit for bit on the CPU)."""
    torch._foreach_lerp_(ms, gs, 1.0 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)


def adam_direction_foreach(ms: list[Tensor], vs: list[Tensor], t: float, beta1: float, beta2: float, eps: float,
                           eps_placement: str = "torch") -> list[Tensor]:
    """:func:`adam_direction` (``eps_placement="torch"``) or :func:`adam_direction_hf` (``"hf"``) of
    float32 tensors sharing the step ``t``, one multi-tensor kernel per operation, the same operations
    in the same order. Returns new tensors (``sqrt(v)`` is freed once the quotient exists)."""
    if eps_placement not in ("torch", "hf"):
        raise ValueError(f"eps_placement must be 'torch' or 'hf', got {eps_placement!r}")
    denom = torch._foreach_sqrt(vs)
    if eps_placement == "torch":
        torch._foreach_div_(denom, math.sqrt(1.0 - beta2**t))
        torch._foreach_add_(denom, eps)
        d = torch._foreach_div(ms, denom)
        del denom
        torch._foreach_div_(d, 1.0 - beta1**t)
        return d
    torch._foreach_add_(denom, eps)
    d = torch._foreach_div(ms, denom)
    del denom
    torch._foreach_mul_(d, math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t))
    return d
