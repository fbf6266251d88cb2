"""APOLLO and APOLLO-Mini (Zhu et al. 2024) as a chain of engine parts: the engine's worked example
of adding an optimizer without touching the loop (docs/ARCHITECTURE.md, "Adding an optimizer").

The chain: a random Gaussian projection ``R = P^T G`` (the existing
:class:`~lowmem.optim.subspace.SubspaceProjection`, ``projection="gaussian"``, as :class:`ApolloProjection`: MKL's
kept buffers without a combine-back GEMM), Adam's moments of
``R`` (the existing :class:`~lowmem.optim.moments.AdamMoments`), and one new combine-back step,
:class:`ApolloScaling`: the raw gradient ``G`` scaled channel-wise (or tensor-wise) by how much Adam
rescaled ``R``, passed through Fira's norm-growth limiter and multiplied by ``sqrt(scale)``. Weight
decay after the update and the bias correction in the step size, as apollo-torch 1.0.3.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import torch

from ..engine import LowMemOptimizer, Recipe
from ..functional import apollo as AP
from ..functional import fira as FI
from ..functional import galore as GL
from ..hparams import HParam, optional, positive
from ..moments import AdamMoments
from ..registry import register
from ..subspace import (CombineRule, SubspaceProjection, _metas, _Walk, fold_budget, limiter_walk, shape_batches,
                         stacked)
from .subspace import GALORE_ADAM_HPARAMS, LAZY_RECIPES, LAZY_REFRESH_HPARAMS, _choice, adam_hf_unit_scale, check_rank_applies, subspace_hparams

#: Projections APOLLO supports: random Gaussian (the paper's and apollo-torch's ``proj="random"``),
#: Haar-orthonormal, and GaLore's SVD (apollo-torch's ``proj="svd"``) or its randomized form.
APOLLO_PROJECTIONS = ("gaussian", "random", "svd", "rsvd")
#: apollo-torch's / transformers' ``proj`` values -> lowmem's ``projection``.
APOLLO_PROJ = {"random": "gaussian", "svd": "svd"}


class ApolloProjection(SubspaceProjection):
    """:class:`~lowmem.optim.subspace.SubspaceProjection` for APOLLO, whose update scales ``G``
    (:class:`ApolloScaling`): no combine-back GEMM, so MKL keeps only its project-down's packing buffers
    (:func:`~lowmem.optim.functional.galore.down_only_pack_bytes`: none at rank 1-3, APOLLO-Mini's rank 1 included,
    on an AMD CPU; the base class's count adds the combine-back's buffer, 1.75 MiB for APOLLO-Mini at
    2048 x 2048 that the step does not keep: growth 0 in a fresh process, 2048 x 2048 - 8192 x 8192)."""

    def kept_gemm_bytes(self, shape, group) -> int:
        return GL.down_only_pack_bytes(group["rank"], shape[1], self._side(shape, group))


def _direction_bytes(state: dict[str, Any]) -> int:
    """Bytes per element of the moment rule's subspace direction and so of the scaling and ``G * s``: 8 with float64
    moments (``state_dtype="param"`` of a float64 parameter: ``d_low`` float64, the scaling and a block's
    ``G * s`` promoted to it), else 4. (Before 2026-11-30 counted 4: a float64 48 x 24 weight, 8,744 B reported,
    12,108 traced.)"""
    m = state.get("exp_avg")
    return 8 if m is not None and m.dtype == torch.float64 else 4


class ApolloScaling(CombineRule):
    """APOLLO's combine-back (Algorithm 1 lines 8-10): ``d = sqrt(scale) * limit(G * s)``.

    ``s`` is :func:`~lowmem.optim.functional.apollo.channel_scaling` (``scale_type="channel"``) or
    :func:`~lowmem.optim.functional.apollo.tensor_scaling` (``"tensor"``, APOLLO-Mini) of the moment
    rule's subspace direction divided by ``unit_scale`` (Adam's bias correction, which
    ``eps_placement="hf"`` folds into the direction and apollo-torch applies in the step size) and
    of the projected gradient; ``limit`` is Fira's norm-growth limiter (eq. 9 of Chen et al. 2024:
    the norm of ``G * s`` grows at most by ``gamma`` per step; ``gamma=None`` turns it off, as
    apollo-torch's ``disable_nl``). The result is multiplied back by ``unit_scale``.

    Group keys: ``scale_type``, ``scale``, ``gamma``. State: ``apollo_prev_norm`` (0-d float32; -1
    until the first step).
    """

    state_keys = ("apollo_prev_norm",)
    needs_full_gradient = True

    def __init__(self, unit_scale: Callable[[dict, dict], float] | None = None):
        self.unit_scale = unit_scale

    def init_state(self, state, param, group):
        state["apollo_prev_norm"] = torch.full((), -1.0, dtype=torch.float32, device=param.device)

    def prepare(self, g, low, d_low, state, group, projection, bounds):
        c = self.unit_scale(state, group) if self.unit_scale is not None else 1.0
        if group["scale_type"] == "tensor":
            factor = AP.tensor_scaling(d_low / c, low)
        else:
            factor = AP.channel_scaling(d_low / c, low, GL.galore_side(tuple(g.shape), group["proj_type"]))
        limiter = None
        if group["gamma"] is not None:
            sq = torch.zeros((), dtype=torch.float32, device=g.device)
            for a, b in bounds:  # ||G * s||, a block of rows at a time
                rows = torch.mul(g[a:b], factor if factor.dim() < 2 else factor[a:b])  # out of place: g may be p.grad
                sq.add_(torch.linalg.vector_norm(rows).square_())
                del rows
            limiter = FI.growth_limiter_(sq.sqrt_(), state["apollo_prev_norm"], group["gamma"])
        return factor, limiter, c * math.sqrt(group["scale"])

    def direction_rows(self, g_rows, low, d_low, state, group, projection, start, stop, ctx):
        factor, limiter, out_scale = ctx
        d = g_rows.mul(factor if factor.dim() < 2 else factor[start:stop])
        if limiter is not None:
            d.div_(limiter)
        return d.mul_(out_scale)

    def foreach_fold(self, gs, lows, d_lows, states, group, projection, alpha, bounds):
        """:meth:`prepare` and :meth:`direction_rows` of a bucket, folded (``CombineRule.foreach_fold``):
        ``alpha * d = G * k`` with ``k = alpha c sqrt(scale) s / limiter``. Tensor-wise (APOLLO-Mini):
        every parameter at once, the norms of ``d_low``, ``low`` and ``G`` by ``torch._foreach_norm``
        (``||G s|| = ||G|| s``). Channel-wise: the parameters of one shape at once, the channel norms of
        their stacked ``d_low`` and ``low`` (one stack alive at a time, with the channel vectors within
        :func:`~lowmem.optim.subspace.fold_budget`) and of each ``G`` (its columns or rows:
        ``||G * s|| = sqrt(sum_j s_j^2 ||G_j||^2)``, no full-size product); the limiters of all of them at once
        (:func:`~lowmem.optim.functional.fira.growth_limiter_foreach_`)."""
        c = self.unit_scale(states[0], group) if self.unit_scale is not None else 1.0  # (one step count per bucket)
        out, gamma = alpha * c * math.sqrt(group["scale"]), group["gamma"]

        def limited(factor: torch.Tensor, norms: torch.Tensor | None, idx: list[int]) -> torch.Tensor:
            if gamma is None:
                return factor.mul_(out)
            limiter = FI.growth_limiter_foreach_(norms, [states[i]["apollo_prev_norm"] for i in idx], gamma)
            return factor.mul_(out).div_(limiter if factor.dim() == 1 else limiter.unsqueeze(1))

        def folds():
            if group["scale_type"] == "tensor":
                idx = list(range(len(gs)))
                factor = FI.factor_from_norms(torch.stack(torch._foreach_norm(d_lows)).div_(c),
                                              torch.stack(torch._foreach_norm(lows)))
                norms = torch.stack(torch._foreach_norm(gs)).mul_(factor) if gamma is not None else None
                k = limited(factor, norms, idx)
                for i in idx:
                    yield i, None, 0.0, k[i]
                return
            # one stack (4 B per element) and about 5 channel vectors per parameter within fold_budget
            for idx in shape_batches(lows, gs, fold_budget(lows), lambda low: 4 * low.numel() + 20 * max(low.shape)):
                dim = 0 if GL.galore_side(tuple(gs[idx[0]].shape), group["proj_type"]) == "left" else 1
                nd = torch.linalg.vector_norm(stacked([d_lows[i] for i in idx]), dim=dim + 1).div_(c)
                factor = FI.factor_from_norms(nd, torch.linalg.vector_norm(stacked([lows[i] for i in idx]), dim=dim + 1))
                norms = None
                if gamma is not None:
                    norms = FI.scaled_norms(stacked([torch.linalg.vector_norm(gs[i], dim=dim) for i in idx]), factor)
                k = limited(factor, norms, idx)
                for j, i in enumerate(idx):
                    yield i, None, 0.0, k[j] if dim == 0 else k[j].unsqueeze(1)
                del k, factor, nd, norms  # (before the next batch's stacks)

        return folds()

    def foreach_fold_offered(self, members, group, projection):
        """Every float32 bucket (:meth:`foreach_fold`'s term is ``G * k`` alone, on any projection)."""
        return True

    def foreach_fold_bytes(self, members, group, projection, device):
        """The peak of :meth:`foreach_fold` and the engine's ``addcmul_`` in place, beyond the bucket's projected
        gradients and directions, walked along it. Tensor-wise (APOLLO-Mini): the directions' 0-d norms then their
        stack, the projected gradients' likewise, the factor beside ``+ eps``, the gradients' norms and their stack
        (multiplied by the factor in place), the limiters (:func:`~lowmem.optim.subspace.limiter_walk`).
        Channel-wise, per batch of one shape (:func:`~lowmem.optim.subspace.shape_batches` within
        :func:`~lowmem.optim.subspace.fold_budget`; nothing of a batch outlives it): the directions' stack (a batch
        of one: a view) and their channel norms (kept to the batch's end), the projected gradients' stack and
        norms, the factor beside ``+ eps``, each gradient's channel norms and their stack, the scaled norms, the
        limiters. Exact against a trace (tests/test_folds_buckets.py); ``device`` does not change it."""
        k = len(members)
        limited = group["gamma"] is not None
        if group["scale_type"] == "tensor":
            w = _Walk()
            w.free(w.new(4 * k))  # (the directions' 0-d norms, then their stack)
            nd = w.new(4 * k)
            w.free(w.new(4 * k))
            nl = w.new(4 * k)
            eps = w.new(4 * k)
            w.new(4 * k)  # (the factor)
            w.free(eps, nd, nl)
            if limited:
                w.free(w.new(4 * k))
                w.new(4 * k)  # (the gradients' norms, then their stack, multiplied by the factor in place)
                limiter_walk(w, k)
            return w.peak
        lows = _metas([low for _, low, _, _ in members])
        gs = _metas([shape for shape, _, _, _ in members])
        worst = 0
        for idx in shape_batches(lows, gs, fold_budget(lows), lambda low: 4 * low.numel() + 20 * max(low.shape)):
            shape, low_shape = members[idx[0]][0], members[idx[0]][1]
            b, low = len(idx), 4 * low_shape.numel()
            ch = 4 * self._channels(shape, group)
            w = _Walk()
            stack = w.new(b * low) if b > 1 else 0  # (stacked: a batch of one is a view)
            w.new(b * ch)  # (the directions' channel norms, kept to the batch's end)
            w.free(stack)
            stack = w.new(b * low) if b > 1 else 0
            nl = w.new(b * ch)
            w.free(stack)
            eps = w.new(b * ch)
            w.new(b * ch)  # (the factor)
            w.free(eps, nl)
            if limited:
                vecs = [w.new(ch) for _ in idx]
                st = w.new(b * ch) if b > 1 else 0
                if b > 1:
                    w.free(*vecs)
                tmp = w.new(b * ch)
                w.new(4 * b)  # (the scaled norms)
                w.free(tmp)
                w.free(st if b > 1 else sum(vecs))
                w.free(limiter_walk(w, b))
            worst = max(worst, w.peak)
        return worst

    def direction(self, g, low, d_low, state, group, projection):
        ctx = self.prepare(g, low, d_low, state, group, projection, [(0, g.shape[0])])
        return self.direction_rows(g.float(), low, d_low, state, group, projection, 0, g.shape[0], ctx)

    def transient_bytes(self, shape, group, state, projection, rows):
        """The scaling (one per channel, or a scalar), computed from ``d_low / c`` (a float32 tensor of
        the projected gradient's size) and the channel norms; then one float32 block of rows at a time:
        ``G * s`` of the norm pass, freed before the next, or a block's direction."""
        m, n = shape
        low = 4 * projection.low_shape(shape, group).numel()
        if group["scale_type"] == "tensor":
            channels = 1
        else:
            channels = n if GL.galore_side(tuple(shape), group["proj_type"]) == "left" else m
        return 4 * channels + max(low + 3 * 4 * channels, 4 * rows * n)

    def _channels(self, shape, group) -> int:
        if group["scale_type"] == "tensor":
            return 1
        return shape[1] if GL.galore_side(tuple(shape), group["proj_type"]) == "left" else shape[0]

    def prepare_bytes(self, shape, group, state, projection, bounds, low_precision=False):
        """Exact (traced, the per-parameter step): ``d_low / c`` beside the scaling's norms (channel-wise: the
        two norm vectors and their denominator, ``L + 12 C``; tensor-wise: three 0-d tensors, ``C = 1``: the gradient's
        norm is freed once ``+ eps`` is made, before the quotient), then beside the
        scaling (``4 C``) the limiter's norm pass (its 0-d sum, a block's ``G * s`` and its norm) and
        :func:`~lowmem.optim.functional.fira.growth_limiter_` (:data:`~lowmem.optim.functional.fira.LIMITER_BYTES`).
        Held: the scaling and the limiter's 0-d divisor."""
        m, n = shape
        channels = self._channels(shape, group)
        w = _direction_bytes(state)
        low = w * projection.low_shape(shape, group).numel()
        # (the direction's channel norms (w), the gradient's and their denominator (float32), the quotient (w))
        peak = low + (2 * w + 4) * channels
        held = w * channels
        if group["gamma"] is None:
            return peak, held
        wb = w if channels > 1 else 4  # (G * s: a 0-d float64 scaling leaves a float32 block float32)
        block = wb * max(b - a for a, b in bounds) * n
        return max(peak, held + 4 + wb + block, held + FI.LIMITER_BYTES), held + 4

    def rows_bytes(self, shape, group, state, projection, rows):
        """A block's ``G * s`` (divided and scaled in place; float64 beside a float64 scaling per channel, not a 0-d one,
        which does not promote it)."""
        return (_direction_bytes(state) if self._channels(shape, group) > 1 else 4) * rows * shape[1]


def _check_apollo_group(group: dict[str, Any]) -> None:
    """``proj_type='full'`` has no channels; ``proj`` (apollo-torch's and transformers' name) sets
    ``projection``: ``'random'`` is the Gaussian projection, ``'svd'`` GaLore's."""
    proj = group.get("proj")
    if proj is not None:
        wanted = APOLLO_PROJ[proj]
        if group.get("projection") not in ("gaussian", wanted):
            raise ValueError(f"proj={proj!r} means projection={wanted!r}, but projection={group['projection']!r} was"
                             " given too; give one of them")
        group["projection"] = wanted
    if group.get("lazy_refresh_threshold") is not None:  # (the keys are APOLLO's only to refuse them by name)
        raise ValueError(
            f"lazy_refresh_threshold (Q-GaLore's lazy refresh) is not supported by APOLLO: it lengthens the refresh"
            f" interval of {list(LAZY_RECIPES)} (and their 8-bit variants), whose bases are SVDs of the gradient;"
            f" APOLLO's projection is refreshed by its own schedule; valid here: lazy_refresh_threshold=None")
    check_rank_applies(group)
    if group.get("rank") is not None and group.get("proj_type") == "full":
        raise ValueError("APOLLO scales channels of a one-sided projection: proj_type must be one of "
                         "['std', 'reverse_std', 'left', 'right'], got 'full'")


def apollo_hparams(rank: int, scale: float, scale_type: str) -> tuple[HParam, ...]:
    return (
        *subspace_hparams("gaussian", APOLLO_PROJECTIONS, scale=scale, moment_policy="keep", rank=rank),
        _choice("scale_type", scale_type, ("channel", "tensor"),
                "scaling factor per channel (APOLLO) or one per tensor (APOLLO-Mini)"),
        _choice("proj", None, (None, *APOLLO_PROJ), "apollo-torch's and transformers' name for the projection:"
                " 'random' sets projection='gaussian', 'svd' sets 'svd' (None: use projection)"),
        HParam("gamma", 1.01, optional(lambda x: positive(x) and x >= 1), "None or a finite float >= 1",
               "norm-growth limiter: ||G * s|| grows at most by this factor per step (None = off)"),
    )


APOLLO_ADAMW = Recipe(
    name="apollo_adamw",
    summary="APOLLO: AdamW-like scaling of the raw gradient, estimated from Adam moments of a random rank-r projection",
    reference="Zhu et al. 2024, APOLLO: SGD-like Memory, AdamW-level Performance, Algorithm 1 (apollo-torch 1.0.3)",
    moment=AdamMoments(eps_placement="hf"),
    hparams=GALORE_ADAM_HPARAMS,
    group_hparams=(*apollo_hparams(rank=256, scale=1.0, scale_type="channel"), *LAZY_REFRESH_HPARAMS),
    projection=ApolloProjection(),
    combine=ApolloScaling(unit_scale=adam_hf_unit_scale),
    decay_after_update=True,
    validate_group=_check_apollo_group,
)

APOLLO_MINI = dataclasses.replace(
    APOLLO_ADAMW,
    name="apollo_mini",
    summary="APOLLO-Mini: rank-1 random projection, one scaling factor per tensor, scale 128 (SGD-level memory)",
    reference="Zhu et al. 2024, APOLLO, Section 4.2 (APOLLO-Mini; apollo-torch 1.0.3 with rank=1, scale_type='tensor', scale=128)",
    group_hparams=(*apollo_hparams(rank=1, scale=128.0, scale_type="tensor"), *LAZY_REFRESH_HPARAMS),
)


class APOLLOAdamW(LowMemOptimizer):
    """Drop-in for ``apollo_torch.APOLLOAdamW`` (apollo-torch 1.0.3), on the lowmem engine.

    Parameter groups carry apollo-torch's keys: a group with ``rank`` is projected, with ``proj``
    (``"random"``: Gaussian ``N(0, 1/r)``, lowmem's ``projection="gaussian"``; ``"svd"``),
    ``scale_type`` (``"channel"`` / ``"tensor"``), ``scale``, ``update_proj_gap`` and ``proj_type``;
    other groups are plain AdamW (eps on the raw ``sqrt(v)``, bias correction in the step size, decay
    after the update). Same trajectory as apollo-torch on the same projection (tested to float32
    precision); the projection is drawn from lowmem's own seeds, so random bases differ from
    apollo-torch's draws (same distribution). State is plain tensors (``weights_only=True``).

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-3`): Learning rate.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): Moment decay rates.
        eps (`float`, defaults to `1e-6`): Added to ``sqrt(v)`` (before bias correction).
        weight_decay (`float`, defaults to `0.0`): Decoupled, applied after the update.
        correct_bias (`bool`, defaults to `True`): Only ``True`` is supported.
        scale_front (`bool`, defaults to `False`): Accepted; the result is the same either way (the
            limiter's ratio does not depend on a constant factor).
        disable_nl (`bool`, defaults to `False`): Turn the norm-growth limiter off (``gamma=None``
            in every projected group).
        no_deprecation_warning (`bool`, defaults to `True`): Accepted and ignored.
    """

    recipe = APOLLO_ADAMW

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        scale_front: bool = False,
        disable_nl: bool = False,
        no_deprecation_warning: bool = True,
        *,
        state_dtype: str = "float32",
        foreach: bool | None = None,
    ):
        if not correct_bias:
            raise ValueError("correct_bias=False is not supported; valid: correct_bias=True")
        self._disable_nl = disable_nl
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype, foreach=foreach)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        if getattr(self, "_disable_nl", False) and group.get("rank") is not None:
            group.setdefault("gamma", None)
        super().add_param_group(group)


_EXAMPLE = {"rank": 4, "update_proj_gap": 5}
register(APOLLO_ADAMW, APOLLOAdamW, batched_targets=True, state_precision="fp32", second_moment="full", example_hparams=_EXAMPLE)
register(APOLLO_MINI, batched_targets=True, state_precision="fp32", second_moment="full", example_hparams={"update_proj_gap": 5, "scale": 8.0})
