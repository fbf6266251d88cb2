"""SGD with momentum, Adagrad and RMSprop: the update math of ``torch.optim.SGD`` / ``Adagrad`` / ``RMSprop``.

Each function updates its statistics in place and returns the unitless direction ``d``; the engine applies
``p <- p - lr d``; the weight decay is torch's L2 form, :func:`l2_gradient` (``g + wd p``) before the statistics
(for SGD without momentum the engine's decoupled decay, the same update: see :mod:`lowmem.optim.recipes.classic`).

* SGD with momentum (Polyak 1964; Sutskever et al. 2013, "On the importance of initialization and momentum in
  deep learning", Eq. 1-2 for the Nesterov form), as ``torch.optim.SGD`` writes it::

      b_1 = g_1;   b_t = mu b_{t-1} + (1 - dampening) g_t        (the first step takes the gradient undamped)
      d_t = g_t + mu b_t  (nesterov)   or   d_t = b_t

* Adagrad (Duchi, Hazan, Singer 2011, "Adaptive Subgradient Methods", Eq. 1 / Figure 1's diagonal form) with
  torch's learning-rate decay and initial accumulator::

      s_t = s_{t-1} + g_t^2  (s_0 = initial_accumulator_value);   d_t = g_t / (sqrt(s_t) + eps) / (1 + (t - 1) lr_decay)

* RMSprop (Tieleman & Hinton 2012, Lecture 6e; the centered form and momentum of Graves 2013, "Generating
  Sequences With Recurrent Neural Networks", Eq. 38-41)::

      v_t = alpha v_{t-1} + (1 - alpha) g_t^2
      c_t = alpha c_{t-1} + (1 - alpha) g_t,   v~_t = v_t - c_t^2   (centered; else v~_t = v_t)
      u_t = g_t / (sqrt(v~_t) + eps);   b_t = mu b_{t-1} + u_t;   d_t = b_t  (momentum > 0)  or  u_t

The operations are torch's single-tensor ones in torch's order (``addcmul_``, ``lerp_``, ``sqrt``, ``add_``), so
the statistics equal torch's bit for bit on the CPU; the direction is ``g / denom`` where torch folds ``lr`` into
``addcdiv_`` (the parameter then differs by the rounding of one product).
"""

from __future__ import annotations

import torch
from torch import Tensor


def l2_gradient(g: Tensor, p: Tensor, weight_decay: float) -> Tensor:
    """torch's coupled (L2) weight decay, ``g <- g + weight_decay * p`` (the first line of the pseudocode of
    ``torch.optim.SGD`` / ``Adagrad`` / ``RMSprop``: "if lambda != 0: g_t <- g_t + lambda theta_{t-1}", the gradient
    of ``f + lambda / 2 |theta|^2``), before the statistics: a new tensor of ``g``'s dtype (``p`` may be bfloat16 or
    float64 beside a float32 ``g``); ``g`` (possibly ``p.grad``) is not modified."""
    out = torch.empty_like(g)
    return torch.add(g, p, alpha=weight_decay, out=out)


def sgd_momentum_(buf: Tensor, g: Tensor, momentum: float, dampening: float, first: bool) -> None:
    """The momentum buffer in place: ``b <- g`` on the first step, else ``b <- mu b + (1 - dampening) g``."""
    if first:
        buf.copy_(g)
    else:
        buf.mul_(momentum).add_(g, alpha=1.0 - dampening)


def sgd_direction(g: Tensor, buf: Tensor | None, momentum: float, nesterov: bool) -> Tensor:
    """SGD's direction: ``g`` without momentum (``buf`` ``None``), ``g + mu b`` (Nesterov, a new tensor), else
    ``b`` itself (no copy: the caller only reads it)."""
    if buf is None:
        return g
    return g.add(buf, alpha=momentum) if nesterov else buf


def adagrad_sum_(s: Tensor, g: Tensor) -> None:
    """``s <- s + g^2`` in place (Duchi et al. 2011, the diagonal ``G_t``)."""
    s.addcmul_(g, g, value=1.0)


def adagrad_direction(g: Tensor, s: Tensor, eps: float, t: float, lr_decay: float) -> Tensor:
    """``g / (sqrt(s) + eps)``, divided by ``1 + (t - 1) lr_decay`` (torch's ``clr``) when ``lr_decay`` is set: a new
    tensor of ``s``'s dtype (one allocation: the denominator's buffer holds the quotient)."""
    d = s.sqrt().add_(eps)
    torch.div(g, d, out=d)
    if lr_decay:
        d.div_(1.0 + (t - 1) * lr_decay)
    return d


def rmsprop_moments_(v: Tensor, c: Tensor | None, g: Tensor, alpha: float) -> None:
    """``v <- alpha v + (1 - alpha) g^2`` and, centered, ``c <- alpha c + (1 - alpha) g`` (``lerp_``, as torch)."""
    v.mul_(alpha).addcmul_(g, g, value=1.0 - alpha)
    if c is not None:
        c.lerp_(g, 1.0 - alpha)


def rmsprop_direction_(g: Tensor, v: Tensor, c: Tensor | None, buf: Tensor | None, momentum: float,
                       eps: float) -> Tensor:
    """RMSprop's direction ``g / (sqrt(v - c^2) + eps)`` (``c`` ``None``: ``sqrt(v)``); with a momentum buffer,
    ``b <- mu b + that`` in place and ``b`` returned (no copy), else the quotient (a new tensor)."""
    if c is not None:
        denom = v.addcmul(c, c, value=-1.0).sqrt_()
    else:
        denom = v.sqrt()
    denom.add_(eps)
    if buf is not None:
        buf.mul_(momentum).addcdiv_(g, denom)
        return buf
    torch.div(g, denom, out=denom)
    return denom


# ---- the multi-tensor forms (the engine's foreach buckets: lowmem.optim.recipes.classic) ----------------------------
#
# Each is the single-tensor function above on a list of float32 tensors, one multi-tensor operation per operation in
# the same order (torch's CPU multi-tensor operations step tensor by tensor with the same kernels: equal bit for bit;
# tests/test_foreach_classic.py). The multiplications by a Python number outside the step's peak take it as a 0-d tensor
# on the CPU (:func:`~lowmem.optim.functional.subset_norm.foreach_scalar`: the same bits, no number wrapped per tensor).


def _scalar(xs: list[Tensor], value: float):
    from .subset_norm import foreach_scalar

    return foreach_scalar(xs, value)


def l2_gradient_foreach(gs: list[Tensor], ps: list[Tensor], weight_decay: float) -> list[Tensor]:
    """:func:`l2_gradient` of each pair: new tensors ``g + weight_decay * p`` (the gradients are not modified)."""
    return torch._foreach_add(gs, ps, alpha=weight_decay)


def l2_gradient_foreach_(gs: list[Tensor], ps: list[Tensor], weight_decay: float) -> None:
    """:func:`l2_gradient` into ``gs`` in place (float32 copies the caller owns: a bucket's of bfloat16 gradients;
    ``ps`` may be bfloat16): ``g <- g + weight_decay * p``, the same values."""
    torch._foreach_add_(gs, ps, alpha=weight_decay)


def sgd_momentum_foreach_(bufs: list[Tensor], gs: list[Tensor], momentum: float, dampening: float,
                          first: bool) -> None:
    """:func:`sgd_momentum_` of each buffer in place."""
    if first:
        torch._foreach_copy_(bufs, gs)
    else:
        # (a Python number: a 0-d tensor here would be alive at the step's peak, beside the coupled gradients, where
        # the memory estimate does not count one; lowmem.memory.estimate._foreach_scalar_bytes counts Lion's)
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, gs, alpha=1.0 - dampening)


def sgd_direction_foreach(gs: list[Tensor], bufs: list[Tensor] | None, momentum: float,
                          nesterov: bool) -> list[Tensor]:
    """:func:`sgd_direction` of each: the gradients (no momentum), ``g + mu b`` (Nesterov: new tensors) or the
    buffers themselves."""
    if bufs is None:
        return list(gs)
    return torch._foreach_add(gs, bufs, alpha=momentum) if nesterov else list(bufs)


def adagrad_sum_foreach_(ss: list[Tensor], gs: list[Tensor]) -> None:
    """:func:`adagrad_sum_` of each sum in place."""
    torch._foreach_addcmul_(ss, gs, gs, value=1.0)


def _quotients(gs: list[Tensor], denoms: list[Tensor], into_grads: bool) -> list[Tensor]:
    """``g / denom`` of each pair (``torch.div``: the single-tensor forms' ``torch.div(g, d, out=d)``, the same
    values): into ``gs`` in place where the caller owns them (``into_grads``: the denominators are then dropped),
    else new tensors."""
    if into_grads:
        torch._foreach_div_(gs, denoms)
        return list(gs)
    return torch._foreach_div(gs, denoms)


def adagrad_direction_foreach(gs: list[Tensor], ss: list[Tensor], eps: float, t: float, lr_decay: float,
                              into_grads: bool = False) -> list[Tensor]:
    """:func:`adagrad_direction` of each: ``g / (sqrt(s) + eps)`` (``/ (1 + (t - 1) lr_decay)``). The quotient is a
    new tensor beside the denominators (two tensors of the list at most), or ``gs`` itself (``into_grads``: copies
    the caller owns, overwritten; one tensor of the list)."""
    denoms = torch._foreach_sqrt(ss)
    torch._foreach_add_(denoms, eps)
    ds = _quotients(gs, denoms, into_grads)
    del denoms
    if lr_decay:
        torch._foreach_div_(ds, _scalar(ds, 1.0 + (t - 1) * lr_decay))
    return ds


def rmsprop_moments_foreach_(vs: list[Tensor], cs: list[Tensor] | None, gs: list[Tensor], alpha: float) -> None:
    """:func:`rmsprop_moments_` of each in place."""
    torch._foreach_mul_(vs, _scalar(vs, alpha))
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - alpha)
    if cs is not None:
        torch._foreach_lerp_(cs, gs, 1.0 - alpha)


def rmsprop_direction_foreach_(gs: list[Tensor], vs: list[Tensor], cs: list[Tensor] | None,
                               bufs: list[Tensor] | None, momentum: float, eps: float,
                               into_grads: bool = False) -> list[Tensor]:
    """:func:`rmsprop_direction_` of each: with momentum buffers ``b <- mu b + g / denom`` in place and the buffers
    returned, else the quotients (new tensors beside the denominators, or ``gs`` itself with ``into_grads``)."""
    if cs is not None:
        denoms = torch._foreach_addcmul(vs, cs, cs, value=-1.0)
        torch._foreach_sqrt_(denoms)
    else:
        denoms = torch._foreach_sqrt(vs)
    torch._foreach_add_(denoms, eps)
    if bufs is not None:
        torch._foreach_mul_(bufs, momentum)  # (a Python number: beside the denominators, see sgd_momentum_foreach_)
        torch._foreach_addcdiv_(bufs, gs, denoms)
        return list(bufs)
    return _quotients(gs, denoms, into_grads)
