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


# ---- the multi-tensor forms (the engine's foreach buckets: lowmem.optim.recipes.stable_adamw) -----------------------
#
# The single-tensor functions above on lists of float32 tensors, one multi-tensor operation per operation in the same
# order (equal bit for bit on the CPU, tests/test_foreach_classic.py); the RMS stays per tensor: each tensor's sum is its
# own ``.sum()`` (the single-tensor reduction), the clip factors one small tensor for the bucket.


def update_rms_sums_foreach(gs: list[Tensor], vs: list[Tensor], beta2_hat: float, eps: float) -> list[Tensor]:
    """:func:`update_rms_sum` of each pair (float32 ``vs``, not written): the 0-d sums. Allocates two tensors of the
    list (``g^2`` and ``v_t``), then the sums."""
    g2s = torch._foreach_mul(gs, gs)
    vts = torch._foreach_mul(vs, beta2_hat)
    torch._foreach_add_(vts, g2s, alpha=1.0 - beta2_hat)
    torch._foreach_clamp_min_(vts, eps * eps)
    torch._foreach_div_(g2s, vts)
    del vts
    return [x.sum() for x in g2s]


def clip_lrs(sums: list[Tensor], numels: list[int], lr: float) -> Tensor:
    """The clipped step sizes ``lr / max(1, RMS_i)`` of a bucket (:func:`clip_scale_` of each sum, in place, then
    ``lr`` times it in float64, as the single-tensor step's 0-d float64 ``lr`` multiplied in place): a float64 tensor,
    one entry per tensor (no host read)."""
    torch._foreach_div_(sums, [max(n, 1) for n in numels])
    torch._foreach_sqrt_(sums)
    torch._foreach_clamp_min_(sums, 1.0)
    torch._foreach_reciprocal_(sums)
    scales = torch.stack(sums)
    sums.clear()
    lrs = scales.double()
    del scales
    return lrs.mul_(lr)


def stable_adamw_moments_foreach_(ms: list[Tensor], vs: list[Tensor], gs: list[Tensor], beta1_hat: float,
                                  beta2_hat: float) -> None:
    """:func:`stable_adamw_moments_` of each in place."""
    torch._foreach_lerp_(ms, gs, 1.0 - beta1_hat)
    torch._foreach_mul_(vs, beta2_hat)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2_hat)


def stable_adamw_direction_foreach(ms: list[Tensor], vs: list[Tensor], eps: float) -> list[Tensor]:
    """:func:`stable_adamw_direction` of each: new tensors, beside the denominators until they are made."""
    denoms = torch._foreach_sqrt(vs)
    torch._foreach_add_(denoms, eps)
    return torch._foreach_div(ms, denoms)


def step_foreach_(ps: list[Tensor], ds: list[Tensor], lrs: Tensor, weight_decay: float) -> None:
    """The engine's decay and update of each tensor with its step size ``lrs[i]`` (a float64 0-d view), in the
    tensor-lr forms of :func:`~lowmem.optim.functional.adam.decoupled_weight_decay_` and ``apply_update_``:
    ``p <- p - p (lr_i wd)``, then ``p <- p - d lr_i``, each one ``addcmul_`` per tensor (nothing of a tensor's size
    allocated; bit for bit the per-tensor step)."""
    if weight_decay != 0:
        coefs = lrs * weight_decay
        torch._foreach_addcmul_(ps, ps, list(coefs.unbind()), value=-1.0)
        del coefs
    torch._foreach_addcmul_(ps, ds, list(lrs.unbind()), value=-1.0)
