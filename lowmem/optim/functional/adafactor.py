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

#: Tensors of at least this many elements are stepped in a group of their own by
#: :func:`adafactor_foreach_` (torch's ``at::internal::GRAIN_SIZE``): below it every reduction of the
#: per-tensor step runs on one thread, so a row of a stacked group reduces in the same order as the
#: tensor alone, with any number of threads; above it torch may split a whole-tensor sum over threads.
STACK_NUMEL = 32768
#: A group of :func:`adafactor_foreach_` stacks at most this many elements (1 MiB of float32; a tensor is
#: never split): its stacks stay in a core's cache (measured on 32 x 128 x 128: one group 2.44 ms, groups of
#: 16 1.84 ms; issue 15). The groups' results do not depend on it (every reduction is per tensor, a row of
#: the stack).
GROUP_NUMEL = 2**18
#: Stack tensors of any size on the CPU too, as on other devices (:func:`stacks_large`). Off by default
#: (the CPU keeps :data:`STACK_NUMEL`: bits independent of the thread count, and cache-sized groups);
#: tests set it to check the other devices' grouping on the CPU.
STACK_LARGE_ON_CPU = False


def stacks_large(device: torch.device) -> bool:
    """Whether :func:`stack_groups` stacks same-shape tensors of any size on ``device``: every device but
    the CPU (where a step launches a kernel per operation, so a group's operations cost one launch for
    all its tensors instead of one per tensor: issue 15), the CPU with :data:`STACK_LARGE_ON_CPU`. The
    results equal the per-tensor step's up to the order of a reduction's additions (each tensor's
    reductions are a row of the stack's)."""
    return device.type != "cpu" or STACK_LARGE_ON_CPU


def group_cap(numels: list[int], large: bool) -> int:
    """The most elements a group of :func:`stack_groups` stacks, for tensors of ``numels`` elements:
    :data:`GROUP_NUMEL` (cache-sized stacks, the CPU), or with ``large`` stacking all of them (a group
    holds every same-shape tensor it is given: the engine's bucket, at most ``chunk_numel`` elements,
    is the unit of the transient, as for AdamW's multi-tensor step; ``chunk_numel=None`` makes the
    bucket every tensor, and the transient two float32 copies of the largest same-shape set)."""
    return max(1, sum(numels)) if large else GROUP_NUMEL


def adafactor_lr_foreach(params: list[Tensor], rho: float, scale_parameter: bool, eps2: float) -> list[float] | Tensor:
    """Step sizes ``alpha_t = max(eps2, RMS(X_{t-1})) rho_t`` (Section 8) of several parameters:
    the parameters' norms in one ``torch._foreach_norm``, then the operations of
    :func:`adafactor_param_scale` once on the stacked norms (no host synchronisation), returned as
    one float32 tensor (entry ``i``: parameter ``i``). Without the parameter scale: ``rho`` for each
    (a list of floats)."""
    if not scale_parameter:
        return [rho] * len(params)
    norms = torch._foreach_norm(params)
    torch._foreach_div_(norms, [math.sqrt(p.numel()) for p in params])  # (scalars: no tensor copied to the device)
    return torch.stack(norms).clamp_(min=eps2).mul_(rho)


def stack_groups(tensors: list[Tensor], kinds: list[int], large: bool | None = None) -> list[list[int]]:
    """Indices of the gradients ``tensors`` grouped for :func:`adafactor_foreach_`: the same shape and
    the same kind of second moment (``kinds[i]``: 2 factored, 1 full), each contiguous and, unless
    ``large`` (default: :func:`stacks_large` of the tensors' device), under :data:`STACK_NUMEL`
    elements; at most :func:`group_cap` elements a group (a larger set is split into consecutive
    groups); any other tensor is a group of its own (a non-contiguous gradient's ``g^2`` is reduced in
    its own layout, as the per-tensor step does). Groups in order of first appearance."""
    if large is None:
        large = bool(tensors) and stacks_large(tensors[0].device)
    cap = group_cap([x.numel() for x in tensors], large)
    groups: dict[tuple, list[int]] = {}
    for i, (x, kind) in enumerate(zip(tensors, kinds)):
        key = (tuple(x.shape), kind) if (large or x.numel() < STACK_NUMEL) and x.is_contiguous() else (i,)
        groups.setdefault(key, []).append(i)
    out = []
    for idx in groups.values():
        per = max(1, cap // max(1, tensors[idx[0]].numel()))
        out += [idx[a:a + per] for a in range(0, len(idx), per)]
    return out


def _stacked(xs: list[Tensor]) -> Tensor:
    """``xs`` as one tensor along a new first dimension: a view of a lone tensor (updates in place
    land in it), else a stacked copy (:func:`_write_back` returns its rows)."""
    return xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)


def _write_back(xs: list[Tensor], stacked: Tensor) -> None:
    if len(xs) > 1:
        torch._foreach_copy_(xs, list(stacked.unbind(0)))


def _group_update(grads: list[Tensor], second: list[tuple[Tensor, ...]], beta2: float, eps1: float) -> Tensor:
    """The unclipped updates ``G / sqrt(V_hat)`` of a group of same-shape gradients, stacked along a
    new first dimension, after updating their second-moment statistics (Algorithm 3, or Algorithm 4
    lines 5-7 on the last two dimensions): the per-tensor operations, each once on the stack.

    A group of several is stacked (contiguous gradients: :func:`stack_groups`); a lone tensor keeps
    its gradient's layout for ``g^2 + eps1`` and gets a new contiguous update, as in the per-tensor
    step, so a reduction over a non-contiguous gradient runs in the same order. Transient: ``g^2 +
    eps1`` of the group (a stack's turned into the updates; a lone tensor's next to its update), and
    the stacked gradients (a factored group's from the start, stacked once; a group of vectors' after
    its stacked second moments are freed)."""
    k, g = len(grads), None
    if k == 1:
        w = (grads[0] * grads[0]).add_(eps1).unsqueeze(0)  # g^2 + eps1
    elif len(second[0]) == 2:  # factored: the gradients stacked once, for g^2 and for the update (issue 15)
        g = torch.stack(grads)
        w = torch.mul(g, g).add_(eps1)
    else:  # vectors: in place on a copy (the stacked second moments come next: two tensors of the group)
        w = torch.stack(grads)
        w.mul_(w).add_(eps1)
    if len(second[0]) == 2:  # R <- beta2 R + (1 - beta2) mean_cols(g2); C likewise with mean_rows
        rows, cols = [s[0] for s in second], [s[1] for s in second]
        r, c = _stacked(rows), _stacked(cols)
        r.mul_(beta2).add_(w.mean(dim=-1), alpha=1.0 - beta2)
        c.mul_(beta2).add_(w.mean(dim=-2), alpha=1.0 - beta2)
        _write_back(rows, r)
        _write_back(cols, c)
        # U = (R / mean(R))^-1/2 C^-1/2 G (Algorithm 4, line 7: V_hat = R C / 1^T R)
        r_factor = (r / r.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        u = torch.mul(r_factor, c.unsqueeze(-2).rsqrt(), **({"out": w} if k > 1 else {}))
    else:  # V <- beta2 V + (1 - beta2) g2 (Algorithm 3); U = V^-1/2 G
        vs = [s[0] for s in second]
        v = _stacked(vs)
        v.mul_(beta2).add_(w, alpha=1.0 - beta2)
        _write_back(vs, v)
        u = torch.rsqrt(v, **({"out": w} if k > 1 else {}))
        del v
    del w
    return u.mul_(_stacked(grads) if g is None else g)


def _group_lr(lrs: list[float] | list[Tensor] | Tensor, idx: list[int]) -> tuple[float | Tensor, list[float] | Tensor]:
    """The step sizes of the group ``idx`` as ``(factor of the stacked update, what the decay
    uses)``: floats stay floats (one float when they are equal; the decay ``1 - lr wd`` is computed
    from the floats, as the per-tensor step does), tensors become one float32 tensor."""
    if isinstance(lrs, Tensor):  # (a slice or a stack of entries: no index tensor to copy to the device)
        if len(idx) == 1:
            lr = lrs[idx[0]]
        elif idx == list(range(idx[0], idx[0] + len(idx))):
            lr = lrs[idx[0]:idx[0] + len(idx)]
        else:
            lr = torch.stack([lrs[i] for i in idx])
        return lr, lr
    vals = [lrs[i] for i in idx]
    if all(isinstance(x, Tensor) for x in vals):
        lr = vals[0] if len(vals) == 1 else torch.stack(vals)
        return lr, lr
    if any(isinstance(x, Tensor) for x in vals):
        raise ValueError("adafactor_foreach_: step sizes must be all floats or all tensors")
    return (vals[0] if all(x == vals[0] for x in vals) else torch.tensor(vals, dtype=torch.float32)), vals


def _group_direction(grads: list[Tensor], second: list[tuple[Tensor, ...]], exp_avgs: list[Tensor] | None,
                     lr: float | Tensor, beta2: float, eps1: float, clip_threshold: float, beta1: float | None) -> Tensor:
    """The directions of a group of same-shape tensors, stacked: the unclipped updates
    (:func:`_group_update`), clipped by each tensor's RMS (Section 6, eq. 12), scaled by its step
    size ``lr`` (a float, or one per tensor) and, with ``beta1``, averaged into the first moments
    (the returned stack is then theirs: a view of the lone tensor's first moment in a group of one)."""
    u = _group_update(grads, second, beta2, eps1)
    k, lead = len(grads), (-1,) + (1,) * (u.dim() - 1)
    # U / max(1, RMS(U) / d)
    clip = torch.linalg.vector_norm(u.view(k, -1), dim=1)
    clip.div_(math.sqrt(u[0].numel())).div_(clip_threshold).clamp_(min=1.0)
    u.div_(clip.view(lead))
    del clip
    u.mul_(lr.view(lead) if isinstance(lr, Tensor) and lr.dim() == 1 else lr)
    if beta1 is None:
        return u
    m = _stacked(exp_avgs)  # M <- beta1 M + (1 - beta1) alpha U: the direction
    m.mul_(beta1).add_(u, alpha=1.0 - beta1)
    _write_back(exp_avgs, m)
    return m


def adafactor_foreach_(params: list[Tensor], grads: list[Tensor], second: list[tuple[Tensor, ...]],
                       exp_avgs: list[Tensor] | None, lrs: list[float] | list[Tensor] | Tensor, beta2: float, eps1: float,
                       clip_threshold: float, beta1: float | None, weight_decay: float) -> None:
    """One Adafactor step of several float32 parameters in place (Shazeer & Stern 2018, Algorithms
    3-4 with the update clipping of Section 6, the first moment of the lr-scaled update and the
    decoupled decay before the update), the same operations in the same order as the per-tensor
    step, so the results are equal bit for bit.

    The parameters are stepped a group at a time (:func:`stack_groups`: one shape, one kind of
    second moment; on the CPU small tensors only, on other devices every same-shape set of the bucket,
    so a step launches a kernel per operation and shape, not per tensor: :func:`stacks_large`): each
    operation runs once on the group's stacked tensors (the row and column
    means along a dimension of the stack, the norms of its rows), and only the state write-back, the
    decay and the update touch each tensor. A matrix (``ndim >= 2``, leading dimensions batch
    dimensions) has ``second[i] = (row, col)`` (factored, Algorithm 4), a vector ``(v,)``
    (Algorithm 3); its clipping RMS spans the whole tensor. ``lrs``: the step sizes, floats, 0-d
    tensors or one tensor (:func:`adafactor_lr_foreach`). Transient: two float32 tensors of the
    largest group (``g^2 + eps1`` turned into the updates, the stacked gradients, first moments or
    the decay), plus its row and column statistics.
    """
    kinds = [len(s) for s in second]
    for idx in stack_groups(grads, kinds):
        ps = [params[i] for i in idx]
        lr, decay_lr = _group_lr(lrs, idx)
        d = _group_direction([grads[i] for i in idx], [second[i] for i in idx],
                             [exp_avgs[i] for i in idx] if beta1 is not None else None, lr, beta2, eps1,
                             clip_threshold, beta1)
        if weight_decay != 0:  # X <- X - alpha wd X (decoupled, before the update)
            if isinstance(decay_lr, Tensor) and decay_lr.device == ps[0].device:
                # X - X (alpha wd) in place: decoupled_weight_decay_'s addcmul_ of each, the same bits, nothing allocated
                torch._foreach_addcmul_(ps, ps, list((decay_lr * weight_decay).view(-1).unbind()), value=-1.0)
            elif isinstance(decay_lr, Tensor):
                decay = torch._foreach_mul(ps, list((decay_lr * weight_decay).view(-1).unbind()))
                torch._foreach_sub_(ps, decay)
                del decay
            else:
                torch._foreach_mul_(ps, [1.0 - x * weight_decay for x in decay_lr])
        torch._foreach_sub_(ps, list(d.unbind(0)))
        del d


def adafactor_direction_foreach(grads: list[Tensor], second: list[tuple[Tensor, ...]], exp_avgs: list[Tensor] | None,
                                lrs: list[float] | list[Tensor], beta2: float, eps1: float, clip_threshold: float,
                                beta1: float | None) -> list[Tensor]:
    """The lr-scaled directions of several float32 gradients (a projected bucket's: GaLore with
    Adafactor), the second (and first) moments updated in place: :func:`adafactor_foreach_` without
    the parameters, a group of same-shape tensors at a time, each direction equal bit for bit to the
    per-tensor one (a new tensor, never a state's). ``lrs[i]``: the step size of gradient ``i``
    (floats or 0-d tensors). Transient: the directions, and while a group is computed one more
    float32 tensor of it (the stacked gradients or first moments)."""
    out: list[Tensor] = [None] * len(grads)  # type: ignore[list-item]
    for idx in stack_groups(grads, [len(s) for s in second]):
        d = _group_direction([grads[i] for i in idx], [second[i] for i in idx],
                             [exp_avgs[i] for i in idx] if beta1 is not None else None, _group_lr(lrs, idx)[0], beta2,
                             eps1, clip_threshold, beta1)
        if beta1 is not None and len(idx) == 1:
            d = d.clone()  # the lone tensor's first moment itself
        for i, x in zip(idx, d.unbind(0)):
            out[i] = x
    return out
