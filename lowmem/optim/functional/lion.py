"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2 / Program 1).

Lion keeps one moment ``m`` and steps every coordinate by the same magnitude, the sign of an
interpolation between ``m`` and the gradient::

    c_t     = beta1 m_{t-1} + (1 - beta1) g_t                         (Algorithm 2, line 5)
    theta_t = theta_{t-1} - lr (sign(c_t) + lambda theta_{t-1})      (line 6: decoupled decay)
    m_t     = beta2 m_{t-1} + (1 - beta2) g_t                         (line 7)

The interpolation ``c_t`` is computed before ``m`` is updated (two different decay rates: ``beta1``
for the step, ``beta2`` for the memory). The decay and the parameter step are the engine's
(:func:`~lowmem.optim.functional.adam.decoupled_weight_decay_`, ``apply_update_``): the functions
here return the unitless direction ``sign(c_t)``.

Both EMAs are written ``x * beta + g * (1 - beta)`` (``mul`` then ``add(alpha=...)``), the form of
Program 1 and of bitsandbytes' and pytorch-optimizer's Lion, so a moment stored in 8 bits is rounded
from the same float32 value as bitsandbytes' ``Lion8bit`` computes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .subset_norm import cpu_scalar


def lion_direction_(m: Tensor, g: Tensor, beta1: float, beta2: float) -> Tensor:
    """Lion's direction ``sign(beta1 m + (1 - beta1) g)`` (Algorithm 2, line 5, and the sign of
    line 6) as a new tensor of ``m``'s dtype, then ``m <- beta2 m + (1 - beta2) g`` in place
    (line 7). ``g`` is read in ``m``'s dtype. Allocates the direction only (``m.numel()`` values)."""
    if g.dtype != torch.float64:  # (a float64 gradient is read in place, in float64, by the float32 moment's
        g = g.to(m.dtype)         # in-place ops: no float32 copy of it; rounded once, into m and the direction)
    c = torch.mul(m, beta1).add_(g, alpha=1.0 - beta1).sign_()
    m.mul_(beta2).add_(g, alpha=1.0 - beta2)
    return c


def lion_direction_foreach_reference(ms: list[Tensor], gs: list[Tensor], beta1: float, beta2: float) -> list[Tensor]:
    """:func:`lion_direction_` of float32 tensors, one multi-tensor kernel per operation (the same
    operations in the same order: equal to the per-tensor form bit for bit on the CPU), the decay rates
    passed as Python numbers. The reference of :func:`lion_direction_foreach`. Returns the new directions;
    the moments are updated in place."""
    cs = torch._foreach_mul(ms, beta1)
    torch._foreach_add_(cs, gs, alpha=1.0 - beta1)
    torch._foreach_sign_(cs)
    torch._foreach_mul_(ms, beta2)
    torch._foreach_add_(ms, gs, alpha=1.0 - beta2)
    return cs


def lion_direction_foreach(ms: list[Tensor], gs: list[Tensor], beta1: float, beta2: float) -> list[Tensor]:
    """:func:`lion_direction_foreach_reference`, equal bit for bit: on the CPU the two multiplications take
    ``beta1`` / ``beta2`` as 0-d tensors of the moments' dtype (the value a Python number is rounded to in the
    kernel). torch's CPU ``_foreach_mul`` with a Python number steps tensor by tensor and wraps the number in
    a new 0-d tensor for each one (~1 us a tensor: 3.5x the kernel's time on 1,024-element tensors); with a
    0-d tensor nothing is wrapped. Elsewhere (CUDA's fused multi-tensor kernels take the number) the
    reference. The two 0-d tensors (4 B each, kept from step to step by value: :func:`~lowmem.optim.functional.
    subset_norm.cpu_scalar`) stand for the reference's wrapped numbers (a float64, 8 B, beside the directions made
    so far): the step's real peak is the same. Outside a dispatch mode the first step makes them and later steps
    reuse them; under one (``measure_memory``'s tracker) they are made anew at each call and seen by it, and the
    estimator counts them (``lowmem.memory.estimate._foreach_scalar_bytes``, its
    ``details["optimizer_foreach_scalars"]``). Returns the new directions; the moments are updated in place."""
    if not ms or ms[0].device.type != "cpu":
        return lion_direction_foreach_reference(ms, gs, beta1, beta2)
    b1 = cpu_scalar(beta1, ms[0].dtype)  # (kept from step to step: made once per value)
    b2 = cpu_scalar(beta2, ms[0].dtype)
    cs = torch._foreach_mul(ms, b1)
    torch._foreach_add_(cs, gs, alpha=1.0 - beta1)
    torch._foreach_sign_(cs)
    torch._foreach_mul_(ms, b2)
    torch._foreach_add_(ms, gs, alpha=1.0 - beta2)
    return cs
