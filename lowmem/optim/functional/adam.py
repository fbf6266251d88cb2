"""Adam (Kingma & Ba, 2015, Algorithm 1) and AdamW (Loshchilov & Hutter, 2019, Algorithm 2)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from .rounding import padded_numel
from .subset_norm import foreach_scalar


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


def _in_place_lr(lr: Tensor, *tensors: Tensor) -> bool:
    """Whether a tensor ``lr`` can enter ``addcmul_`` with ``tensors``: a 0-d tensor on their device (a ternary
    operation takes no CPU scalar beside tensors of another device)."""
    return lr.dim() == 0 and all(t.device == lr.device for t in tensors)


def decoupled_weight_decay_(p: Tensor, lr: float | Tensor, weight_decay: float) -> None:
    """``theta <- theta - lr * lambda * theta``, in place, before (or after) the gradient step.

    A 0-d tensor ``lr`` (a scheduler's, StableAdamW's clipped one, Adafactor's relative step):
    ``p.addcmul_(p, lr lambda, value=-1)``, ``p - p (lr lambda)`` with nothing of ``p``'s size allocated (before,
    the temporary ``p * (lr lambda)``, which no transient count held; ``p * (1 - lr lambda)`` would round the
    factor's small term away in float32); a 0-d one on the CPU beside ``p`` on another device is read as its
    number (its value is in host memory: no device sync). A tensor of several step sizes through the temporary."""
    if weight_decay == 0:
        return
    if not isinstance(lr, Tensor):
        p.mul_(1.0 - lr * weight_decay)
    elif _in_place_lr(lr, p):
        p.addcmul_(p, lr * weight_decay, value=-1.0)
    elif lr.dim() == 0 and lr.device.type == "cpu":
        p.add_(p, alpha=-(lr.item() * weight_decay))
    else:
        p.sub_(p * (lr * weight_decay))


def apply_update_(p: Tensor, direction: Tensor, lr: float | Tensor) -> None:
    """``theta <- theta - lr * direction`` in place.

    A 0-d tensor ``lr``: ``addcmul_`` (one fused multiply-add where the kernel contracts it, as ``add_`` with a
    number), nothing of the direction's size allocated (before, the temporary ``direction * lr``, which no transient
    count held); a 0-d one on the CPU beside tensors of another device is read as its number (its value is in host
    memory: no device sync). A tensor of several step sizes (per row) through that temporary."""
    if not isinstance(lr, Tensor):
        p.add_(direction, alpha=-lr)
    elif _in_place_lr(lr, p, direction):
        p.addcmul_(direction, lr, value=-1.0)
    elif lr.dim() == 0 and lr.device.type == "cpu":
        p.add_(direction, alpha=-lr.item())
    else:
        p.sub_(direction * lr)


# ---- torch's fused AdamW kernel (the one behind torch.optim.AdamW(fused=True)) ------------------

#: Take torch's fused AdamW kernel on the CPU too (:func:`fused_device`). On by default: on the CPU the
#: kernel is one pass over parameter, gradient and moments that allocates nothing, where the
#: multi-tensor operations are about eight passes and a ``sqrt(v)`` of the bucket (docs/benchmarks.md,
#: "CPU step time": 2.1x faster on hidden-1024 with one thread). Set it to ``False`` for the
#: multi-tensor operations (the tests of their accounting do), before an optimizer's first step: the engine
#: decides once per parameter whether it joins an uncapped bucket of the kernel (``LowMemOptimizer._fused_whole``).
FUSED_ON_CPU = True
#: Device types with ``torch._fused_adamw_`` (torch's own list, ``torch.optim``'s ``fused=True``), and
#: ``meta`` (the CUDA code path without a GPU, for counting its launches: tests/test_fused_adamw.py).
_FUSED_DEVICE_TYPES = frozenset(_get_fused_kernels_supported_devices()) | {"meta"}
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FUSED_DTYPES_APART = (torch.float32, torch.float64)  # (a decay apart from the update rounds no further)
# the last step-count tensor made per device: a bucket's kernel reads t from a device tensor, and the
# buckets of one step share it (one fill per step and device, no host-to-device copy)
_STEP_TENSORS: dict[torch.device, tuple[float, Tensor]] = {}


def fused_device(device: torch.device) -> bool:
    """Whether steps on ``device`` take torch's fused AdamW kernel: every device type torch has it for
    (the CPU included), the CPU only while :data:`FUSED_ON_CPU`."""
    if device.type == "cpu":
        return FUSED_ON_CPU
    return device.type in _FUSED_DEVICE_TYPES


def fused_indices(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  lr: float | Tensor, step_lr: float | Tensor | None = None, all_fit: bool = False) -> list[int]:
    """The tensors :func:`adamw_fused_` can step (their indices): on a device of :func:`fused_device`
    (``params[0]``'s), with float step sizes, in the kernel's layout (``torch._fused_adamw_`` checks it
    and groups nothing itself here): parameter, gradient and moments on that device, of one floating
    dtype, contiguous, of the parameter's shape (a flat piece of a tensor included). A low-precision
    parameter only when the decay and the update share the step size (a separate decay would round the
    parameter twice). Empty when none can. (About 1 us of host time per tensor.)

    ``all_fit``: the caller vouches that every tensor is in the kernel's layout, of one dtype and device (the
    engine's buckets of the fused kernel, :func:`adamw_foreach_prepare`'s ``all_fit``): only what concerns the
    list as a whole is checked (the device's kernel, float step sizes, the dtype with a separate step size), and
    every index or none is answered, without the per-tensor checks."""
    p0 = params[0]
    if not fused_device(p0.device) or isinstance(lr, Tensor) or isinstance(step_lr, Tensor):
        return []
    device, apart = p0.device, step_lr is not None and step_lr != lr
    dtypes = _FUSED_DTYPES_APART if apart else _FUSED_DTYPES
    if all_fit:
        return list(range(len(params))) if p0.dtype in dtypes else []
    fit = []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        dtype = p.dtype
        if (dtype in dtypes and g.dtype is dtype and m.dtype is dtype and v.dtype is dtype
                and p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            shape = p.shape
            if (g.shape == shape and m.shape == shape and v.shape == shape and p.device == device
                    and g.device == device and m.device == device and v.device == device):
                fit.append(i)
    return fit


def _step_tensor(t: float, device: torch.device) -> Tensor:
    """The step count ``t`` as a float32 0-d tensor on ``device`` (what ``torch._fused_adamw_`` reads its
    bias corrections from), made once per step and device (:data:`_STEP_TENSORS`); never written."""
    hit = _STEP_TENSORS.get(device)
    if hit is not None and hit[0] == t:
        return hit[1]
    step = torch.full((), t, dtype=torch.float32, device=device)
    _STEP_TENSORS[device] = (t, step)
    return step


def clear_step_tensors() -> None:
    """Forget the kept step-count tensors (:data:`_STEP_TENSORS`): the next fused step makes its own, as a fresh
    process's first step does (``lowmem.memory.measure_memory`` calls it before measuring)."""
    _STEP_TENSORS.clear()


def adamw_fused_(
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
    """:func:`adamw_foreach_` by torch's fused AdamW kernel (``torch._fused_adamw_``, the kernel of
    ``torch.optim.AdamW(fused=True)``: one pass over parameters, gradients and moments, with its own
    float32 arithmetic, equal to the operations of :func:`adamw_foreach_` up to float32 rounding), for
    tensors in its layout (:func:`fused_indices`).

    The kernel computes ``theta <- theta - lr wd theta``, the moments (Algorithm 1, lines 7-8), and
    ``theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`` (Algorithm 2,
    ``eps`` after the correction: ``eps_placement="torch"``). The other forms are the same kernel:

    * ``"hf"`` (``eps`` on the uncorrected ``sqrt(v)``): ``m / (sqrt(v) + eps) sqrt(c2) / c1`` equals
      ``(m / c1) / (sqrt(v) / sqrt(c2) + eps / sqrt(c2))``, so the kernel runs with
      ``eps / sqrt(1 - beta2^t)``;
    * ``step_lr`` different from ``lr`` (the update's step size differs from the decay's): the decay
      ``theta <- theta (1 - lr wd)`` first, as its own multi-tensor operation, then the kernel with
      ``step_lr`` and no decay. (A decay after the update is the caller's, as for :func:`adamw_foreach_`:
      it passes ``weight_decay=0``.)

    The step count is one float32 tensor on the device for all (:func:`_step_tensor`)."""
    step_lr = lr if step_lr is None else step_lr
    if eps_placement == "hf":
        eps = eps / math.sqrt(1.0 - beta2**t)
    fused_wd = weight_decay
    if weight_decay != 0 and step_lr != lr:
        torch._foreach_mul_(params, foreach_scalar(params, 1.0 - lr * weight_decay))
        fused_wd = 0.0
    step = _step_tensor(float(t), params[0].device)
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], [step] * len(params), lr=float(step_lr),
                        beta1=float(beta1), beta2=float(beta2), weight_decay=float(fused_wd), eps=float(eps),
                        amsgrad=False, maximize=False, grad_scale=None, found_inf=None)


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

    On a device with torch's fused AdamW kernel (:func:`fused_device`: CUDA, the CPU unless
    :data:`FUSED_ON_CPU` is off), tensors that fit its layout (:func:`fused_indices`) take it instead
    (:func:`adamw_fused_`): one kernel for the list instead of about eight passes over memory.
    """
    adamw_foreach_prepare(params, grads, exp_avgs, exp_avg_sqs, t, beta1, beta2, lr, weight_decay, eps,
                          eps_placement=eps_placement, step_lr=step_lr)()


def adamw_foreach_prepare(
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
    all_fit: bool = False,
) -> Callable[[], None]:
    """:func:`adamw_foreach_` in two halves: now what reads no tensor's values and launches nothing (the
    ``eps_placement`` check, which tensors take torch's fused kernel: :func:`fused_indices`, about 1 us of host
    time per tensor, and their lists), the kernels when the returned function is called (the same operations in
    the same order: ``adamw_foreach_(...)`` is ``adamw_foreach_prepare(...)()``). The engine prepares a planned
    step's buckets before the non-finite check's device read, so that on a GPU the device does not wait for
    the host's per-tensor checks after it (issue 15); the tensors must not change between the two calls.

    ``all_fit``: the caller vouches that every tensor is in the kernel's layout (the engine's bucket of the fused
    kernel: each member's ``fused_whole`` decided with its cached path, which also keys the parameter's and the
    gradient's dtype and contiguity; torch's ``.grad`` setter keeps the gradient's shape and device the
    parameter's). Then :func:`fused_indices` checks only what concerns the list as a whole, where its per-tensor
    checks (~1 us of host time a tensor) would answer every index (tests/test_speed16_plan.py)."""
    if eps_placement not in ("torch", "hf"):
        raise ValueError(f"eps_placement must be 'torch' or 'hf', got {eps_placement!r}")
    step_lr = lr if step_lr is None else step_lr
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    fit = fused_indices(params, grads, exp_avgs, exp_avg_sqs, lr, step_lr, all_fit=all_fit) if params else []
    fused = rest = None
    if not fit:
        rest = lists
    elif len(fit) == len(params):
        fused = lists
    else:  # torch's fused kernel for the tensors in its layout, the operations for the others
        fused = tuple([x[i] for i in fit] for x in lists)
        others = sorted(set(range(len(params))) - set(fit))
        rest = tuple([x[i] for i in others] for x in lists)

    def launch() -> None:
        if fused is not None:
            adamw_fused_(*fused, t, beta1, beta2, lr, weight_decay, eps, eps_placement=eps_placement, step_lr=step_lr)
        if rest is not None:
            _adamw_operations_(*rest, t, beta1, beta2, lr, weight_decay, eps, eps_placement, step_lr)

    return launch


def _adamw_operations_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                       t: float, beta1: float, beta2: float, lr: float, weight_decay: float, eps: float,
                       eps_placement: str, step_lr: float) -> None:
    """:func:`adamw_foreach_`'s multi-tensor operations (the tensors outside torch's fused kernel)."""
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, foreach_scalar(exp_avg_sqs, beta2))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**t
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if eps_placement == "torch":  # m_hat / (sqrt(v_hat) + eps)
        torch._foreach_div_(denom, foreach_scalar(denom, math.sqrt(1.0 - beta2**t)))
        value = -step_lr / bias_correction1
    else:  # m / (sqrt(v) + eps) * sqrt(1 - beta2^t) / (1 - beta1^t)
        value = -step_lr * (math.sqrt(1.0 - beta2**t) / bias_correction1)
    torch._foreach_add_(denom, eps)
    if weight_decay != 0:
        torch._foreach_mul_(params, foreach_scalar(params, 1.0 - lr * weight_decay))
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=value)


def adam_moments_foreach_(ms: list[Tensor], vs: list[Tensor], gs: list[Tensor], beta1: float, beta2: float) -> None:
    """:func:`adam_moments_` of float32 tensors, one multi-tensor kernel per operation (the same
    operations in the same order: equal to the per-tensor form bit for bit on the CPU)."""
    torch._foreach_lerp_(ms, gs, 1.0 - beta1)
    torch._foreach_mul_(vs, foreach_scalar(vs, beta2))
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
        torch._foreach_div_(denom, foreach_scalar(denom, math.sqrt(1.0 - beta2**t)))
        torch._foreach_add_(denom, eps)
        d = torch._foreach_div(ms, denom)
        del denom
        torch._foreach_div_(d, foreach_scalar(d, 1.0 - beta1**t))
        return d
    torch._foreach_add_(denom, eps)
    d = torch._foreach_div(ms, denom)
    del denom
    torch._foreach_mul_(d, foreach_scalar(d, math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)))
    return d


def float32_copies(xs: list[Tensor], padded: bool = False) -> list[Tensor]:
    """float32 copies of ``xs`` (bfloat16 parameters, gradients, moments of a bucket): new tensors of their shapes
    (``torch.empty_like``: no kernel) filled by one multi-tensor copy (``torch._foreach_copy_``: one launch for the
    list on a GPU, where ``x.float()`` is one each); the values of ``x.float()``, exactly. ``padded``: the copies are
    contiguous views of one flat buffer (``xs`` on one device), each starting at a multiple of 4 elements
    (:func:`~lowmem.optim.functional.rounding.padded_numel` elements in all: 4 bytes each), the layout that
    :func:`~lowmem.optim.functional.rounding.stochastic_round_bucket_to_bf16_` rounds at once."""
    if padded and xs:
        flat = torch.empty(padded_numel([x.numel() for x in xs]), dtype=torch.float32, device=xs[0].device)
        out, o = [], 0
        for x in xs:
            out.append(flat[o : o + x.numel()].view(x.shape))
            o += 4 * ((x.numel() + 3) // 4)
        del flat  # (alive while any copy is: their base)
    else:
        out = [torch.empty_like(x, dtype=torch.float32) for x in xs]
    if out:
        torch._foreach_copy_(out, xs)
    return out


def adam_direction_foreach_into_(ms: list[Tensor], vs: list[Tensor], t: float, beta1: float, beta2: float, eps: float,
                                 eps_placement: str = "torch") -> list[Tensor]:
    """:func:`adam_direction_foreach` written into ``ms`` (float32 temporaries of the caller, e.g. the float32 copies of
    bfloat16 moments: overwritten) instead of new tensors; ``vs`` is emptied (its tensors freed, when the caller holds
    no other reference) once ``sqrt(v)`` is made. The same operations in the same order as :func:`adam_direction` /
    :func:`adam_direction_hf` (``torch.div(m, denom, out=denom)`` there, ``m /= denom`` here: the same quotients).
    Returns ``ms``; allocates ``sqrt(v)`` only."""
    if eps_placement not in ("torch", "hf"):
        raise ValueError(f"eps_placement must be 'torch' or 'hf', got {eps_placement!r}")
    denom = torch._foreach_sqrt(vs)
    vs.clear()
    if eps_placement == "torch":
        torch._foreach_div_(denom, foreach_scalar(denom, math.sqrt(1.0 - beta2**t)))
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(ms, denom)
        del denom
        torch._foreach_div_(ms, foreach_scalar(ms, 1.0 - beta1**t))
        return ms
    torch._foreach_add_(denom, eps)
    torch._foreach_div_(ms, denom)
    del denom
    torch._foreach_mul_(ms, foreach_scalar(ms, math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)))
    return ms
