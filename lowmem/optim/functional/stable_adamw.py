"""StableAdamW (Wortsman et al. 2023, "Stable and low-precision training for large-scale vision-language models",
Algorithm 2): AdamW with Adafactor's debiased decay rates and per-tensor update clipping.

For a tensor at step ``t`` (from 1)::

    beta_hat(beta, t) = beta (1 - beta^(t-1)) / (1 - beta^t)                 (debiased rate: no bias correction after)
    m_t = beta1_hat m_{t-1} + (1 - beta1_hat) g_t
    v_t = beta2_hat v_{t-1} + (1 - beta2_hat) g_t^2
    RMS_t = sqrt(mean(g_t^2 / max(v_t, eps^2)))                              (Algorithm 2, line 8: the update's RMS)
    eta_t = lr / max(1, RMS_t)                                               (line 9: clipped step size)
    theta <- theta - eta_t lambda theta - eta_t m_t / (sqrt(v_t) + eps)       (line 10: decay with the clipped size)

The per-tensor ``RMS_t`` is a whole-tensor statistic; the functions here give its pieces (a chunk's sum of
``g^2 / max(v_t, eps^2)``, computed before the chunk's moments are written) and the element-wise update. The defaults
are torch-optimi's ``StableAdamW`` (betas (0.9, 0.99), eps 1e-6, weight decay 1e-2), which transformers' ``optim=
"stable_adamw"`` builds with TrainingArguments' betas, eps and weight decay.
"""

from __future__ import annotations

import torch
from torch import Tensor


def debiased_beta(beta: float, t: float) -> float:
    """``beta (1 - beta^(t-1)) / (1 - beta^t)`` (0 at ``t = 1``: the first moments are the first gradient)."""
    return beta * (1.0 - beta ** (t - 1)) / (1.0 - beta**t)


def update_rms_sum(g: Tensor, v: Tensor, beta2_hat: float, eps: float) -> Tensor:
    """``sum(g^2 / max(v_t, eps^2))`` of a chunk, ``v_t = beta2_hat v + (1 - beta2_hat) g^2`` computed aside (``v``
    is not written): a 0-d tensor. Allocates two temporaries of the chunk's size (``g^2`` and ``v_t``)."""
    g2 = g * g
    # (a bfloat16 v: its float32 copy, scaled in place; float32 / float64: the scaled copy. One buffer either way)
    vt = v.mul(beta2_hat) if v.dtype in (torch.float32, torch.float64) else v.float().mul_(beta2_hat)
    vt.add_(g2, alpha=1.0 - beta2_hat).clamp_min_(eps * eps)
    return g2.div_(vt).sum()


def clip_scale_(rms_sum: Tensor, numel: int) -> Tensor:
    """``1 / max(1, RMS)`` with ``RMS = sqrt(rms_sum / numel)`` (Algorithm 2, line 9's factor on ``lr``), in place on
    the 0-d ``rms_sum`` (no host read)."""
    return rms_sum.div_(max(numel, 1)).sqrt_().clamp_min_(1.0).reciprocal_()


def stable_adamw_moments_(m: Tensor, v: Tensor, g: Tensor, beta1_hat: float, beta2_hat: float) -> None:
    """``m <- beta1_hat m + (1 - beta1_hat) g`` (``lerp_``), ``v <- beta2_hat v + (1 - beta2_hat) g^2``, in place."""
    m.lerp_(g, 1.0 - beta1_hat)
    v.mul_(beta2_hat).addcmul_(g, g, value=1.0 - beta2_hat)


def stable_adamw_direction(m: Tensor, v: Tensor, eps: float) -> Tensor:
    """``m / (sqrt(v) + eps)``: a new tensor (one allocation, the denominator's buffer)."""
    d = v.sqrt().add_(eps)
    torch.div(m, d, out=d)
    return d
