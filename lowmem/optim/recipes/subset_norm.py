"""Subset-Norm and Subspace-Momentum (Nguyen & Nguyen 2024 / ICML 2025) as engine parts that
compose with the existing projections.

* ``adamw_sn`` - AdamSN: Adam whose second moment is kept per *subset* of coordinates: one value
  per row of the longer side of a 2-D weight (the squared norm summed over the shorter side), the
  authors' default partition (``subset_size=k``: their general one, contiguous flat subsets, as
  pytorch_optimizer's ``AdamWSN``); ``betas=(0, b2)`` is their RMSPropSN (no first moment at all).
* ``adamw_snsm`` - AdamSNSM: Subspace-Momentum (momentum of ``P^T G`` in a rank-r subspace, SVD by
  default, refreshed every ``update_proj_gap`` steps and reset then; plain SGD on ``G - P P^T G``)
  with the Subset-Norm step size of the raw gradient on top.
* ``sgd_sm`` - SGD with Subspace-Momentum only (the authors' ``sgd_sm``: no adaptive step size).
* ``adagrad_sn``, ``adagrad_snsm`` - the same with AdaGrad's running sum of squared subset norms
  (the paper's analysed AdaGrad-SN; the authors' ``beta2 = 1``, no bias correction), with momentum.

The chain of ``adamw_snsm``: the existing :class:`~lowmem.optim.subspace.SubspaceProjection`, the
moment rule :class:`SubsetNormMoments` (under a projection it keeps only the momentum of ``P^T G``),
the existing ``ProjectBack`` with FRUGAL's :class:`~lowmem.optim.subspace.StateFreeResidual`
(``free_rule="sgd"``: the complement ``G - P P^T G`` itself; :class:`SubspaceMomentumResidual` folds
it into the subspace's product in the row blocks), and one new combine-back step,
:class:`SubsetNormStep`, which divides that direction by the subset norms of ``G``. ``sgd_sm`` is
the same chain without the last step; ``adamw_sn`` is the moment rule alone. Neither part touches
the engine's loop (docs/optimizers.md, "Subset-Norm and Subspace-Momentum").

Multi-tensor paths (issue 15): full-rank parameters in buckets (:meth:`SubsetNormMoments.foreach_step_`),
projected ones in the engine's projected buckets (:meth:`SubsetNormMoments.foreach_direction`: the
momenta of ``P^T G``), both equal to ``foreach=False`` bit for bit (tests/test_foreach_subset_norm.py); the
projected buckets combined back at once where the statistics commute with the projection
(:meth:`SubsetNormStep.foreach_fold`, :meth:`SubspaceMomentumResidual.foreach_fold`: the state bit for
bit, the weights to float32 rounding).

A batch of matrices ``[..., A, B]`` (fused MoE experts) of a ``subset_norm`` group: stepped by the engine in blocks
of whole matrices (:meth:`SubsetNormMoments.batch_direction`; each matrix's rows, or columns, of the longer side),
equal to the per-matrix step (``foreach=False``) bit for bit (tests/test_batch_matrices.py).

Parameter groups: :func:`~lowmem.optim.create_optimizer` marks the weights of the projection layers
(``target_modules``, default all but the output head) and the output head (its own group, as the
authors apply SN to every ``nn.Linear``) with ``subset_norm=True``; the input embedding, norms and
biases keep Adam's element-wise second moment, as in the authors' runs. For the SM recipes the
projection layers get ``rank`` (the head is not projected: lowmem's subspace rule).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from ..engine import LowMemOptimizer, Recipe
from ..functional import subset_norm as SN
from ..hparams import BETAS, EPS, LR, WEIGHT_DECAY, HParam, in_unit_interval, is_bool, nonneg
from .. import moments
from ..moments import ChunkState, MomentRule, grad_element_bytes, sharded_group, state_dtype
from ..registry import register
from .. import subspace
from ..subspace import COORDINATE_METHODS, CombineRule, ProjectBack, StateFreeResidual, SubspaceProjection, _Walk
from .subspace import LAZY_REFRESH_HPARAMS, SVD_LIKE, _check_subspace_group, _choice, subspace_hparams

SUBSET_NORM = HParam(
    "subset_norm", True, is_bool, "a bool",
    "2-D parameters of the group keep one second moment per row of their longer side (Subset-Norm);"
    " False: one per element (Adam's); groups without the key: one per element",
)


def _subset_size_ok(x: Any) -> bool:
    return x is None or (isinstance(x, int) and not isinstance(x, bool) and x != 0)


SUBSET_SIZE = HParam(
    "subset_size", None, _subset_size_ok, "None or a non-zero int",
    "None: the authors' partition (a row of the longer side of a 2-D parameter, vectors element-wise); k > 0:"
    " contiguous flat subsets of the largest divisor of the size <= k, for every parameter of a subset_norm group;"
    " -d: of about sqrt(size) / d (adamw_sng.py's and pytorch_optimizer's AdamWSN partition)",
)


def _low_precision(x: Tensor) -> bool:
    return x.dtype not in (torch.float32, torch.float64)


def _ema_stored_(x: Tensor, update: Tensor, beta: float | None) -> Tensor:
    """The EMA of a stored moment (``beta=None``: AdaGrad's running sum), computed in float32 when it
    is stored in lower precision; returns the float32 (or float64) value."""
    x32 = x.float() if _low_precision(x) else x
    if beta is None:
        SN.accumulate_(x32, update)
    else:
        SN.ema_(x32, update, beta)
    if x32 is not x:
        x.copy_(x32)
    return x32


def _subset_layout(v: Tensor, numel: int) -> str:
    """How a second-moment tensor ``v`` covers ``numel`` gradient elements: ``"element"`` (one
    value each), ``"row"`` (``(rows, 1)``: one per contiguous run of ``numel / rows`` elements, a row
    or a flat subset) or ``"column"`` (``(1, n)``)."""
    if v.numel() == numel:
        return "element"
    return "row" if v.shape[-1] == 1 else "column"


def _sn_update_(v: Tensor, g: Tensor, beta2: float | None, eps: float,
                sq_norms: Any = SN.subset_sq_norms) -> tuple[Tensor, Tensor]:
    """Update the subset-norm second moment ``v`` from ``g`` (its rows ``(rows, n)``, or the whole
    tensor) and return ``(denominator, g viewed like v broadcasts)``: ``sqrt(v) + eps``. ``sq_norms``:
    how the squared subset norms are computed (the moment rule's ``g^2`` sums, which its multi-tensor
    kernels repeat bit for bit; SNSM's combine-back: from ``vector_norm``, no ``g^2``)."""
    layout = _subset_layout(v, g.numel())
    if layout == "element":
        g2, dim = g.view(v.shape), None
    elif layout == "row":
        g2, dim = g.reshape(v.shape[0], -1), 1
    else:
        g2, dim = g.reshape(-1, v.shape[1]), 0
    sq = sq_norms(g2, dim)
    v32 = _ema_stored_(v, sq, beta2)
    del sq
    return SN.sn_denominator(v32, eps), g2


def _div_scaled_(u: Tensor, denom: Tensor, scale: float) -> Tensor:
    """``u scale / denom`` in place on ``u`` (SNSM's step: the direction over the subset norms, times
    the bias-corrected step scale), one pass over ``u``: the scale folded into a denominator smaller
    than ``u`` (one per row or column), none when it is 1 (AdaGrad-SNSM); a per-element one is
    divided by, then multiplied."""
    if scale == 1.0:
        return u.div_(denom)
    if denom.numel() < u.numel():
        return u.div_(denom / scale)
    return u.div_(denom).mul_(scale)


class SubsetNormMoments(MomentRule):
    """Adam with the Subset-Norm second moment (AdamSN), or momentum alone.

    On a parameter trained full-rank: ``m <- b1 m + (1 - b1) g`` (no state when ``b1 = 0``: the
    numerator is ``g``, the authors' RMSPropSN), ``v <- b2 v + (1 - b2) ||g_Psi||^2`` per subset
    (:func:`~lowmem.optim.functional.subset_norm.subset_sq_norms`: per row of the longer side of a
    2-D parameter of a ``subset_norm`` group, per element otherwise), direction
    ``sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)``. Under a projection (the parameter's state
    is for ``P^T G``) it keeps only the momentum of ``P^T G`` and returns it: Subspace-Momentum's
    subspace part, combined back by ``ProjectBack`` and scaled by :class:`SubsetNormStep`.

    Args:
        adaptive: ``False``: no second moment anywhere (``sgd_sm``: SGD with momentum, the group's
            ``momentum`` as ``b1``, no bias correction, as the authors' ``sgd`` configuration).
        accumulate: AdaGrad-SN: ``v <- v + ||g_Psi||^2`` (the authors' ``beta2 = 1``), the group's
            ``momentum`` as ``b1``, no bias correction (their ``adagrad`` configuration).
    """

    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, adaptive: bool = True, accumulate: bool = False):
        if accumulate and not adaptive:
            raise ValueError("accumulate=True needs adaptive=True")
        self.adaptive, self.accumulate = adaptive, accumulate

    def _beta1(self, group: dict[str, Any]) -> float:
        return group["betas"][0] if self.adaptive and not self.accumulate else group["momentum"]

    def route_settings(self, group: dict[str, Any]) -> dict[str, Any] | None:
        """The engine's cached paths (:meth:`~lowmem.optim.moments.MomentRule.route_settings`): this rule's
        decisions (:meth:`supports_foreach_for`, :meth:`supports_foreach_direction`) read ``b1`` (``betas[0]``;
        ``momentum`` for ``sgd_sm`` and the AdaGrad rules) only as ``b1 > 0`` and ``b1 == 0`` (whether there is a
        first moment), so a scheduler cycling it within ``(0, 1)`` (``OneCycleLR``'s ``cycle_momentum``) keeps
        the paths and one switching it to 0 or back decides them again. ``None`` (the setting compared by its
        value) when ``b1`` is not a plain number (a tensor) or the group lacks it."""
        key = "betas" if self.adaptive and not self.accumulate else "momentum"
        b1 = group.get(key)
        if key == "betas":
            b1 = b1[0] if isinstance(b1, (tuple, list)) and b1 else None
        if isinstance(b1, bool) or not isinstance(b1, (int, float)):
            return None
        return {key: (b1 > 0, b1 == 0)}

    def _beta2(self, group: dict[str, Any]) -> float | None:
        return None if self.accumulate else group["betas"][1]

    def _scale(self, t: float, group: dict[str, Any]) -> float:
        return 1.0 if self.accumulate else SN.step_scale(t, self._beta1(group), group["betas"][1])

    def init_state(self, state, shape, group, param):
        dtype, device = state_dtype(group, param), param.device
        projected = tuple(shape) != tuple(param.shape)  # the state is for P^T G
        if self._beta1(group) > 0:
            state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
        if self.adaptive and not projected:
            sn = bool(group.get("subset_norm"))  # a group without the key: Adam's element-wise v
            # (subset_size: only the recipes that have it; the others use the authors' rows)
            v_shape = SN.subset_state_shape(shape, sn, group.get("subset_size"))
            state["exp_avg_sq"] = torch.zeros(v_shape, dtype=dtype, device=device)

    def per_matrix(self, shape, group):
        """A batch of matrices ``[..., A, B]`` (fused MoE experts) of a ``subset_norm`` group with the
        authors' partition (no ``subset_size``) keeps the subset norms of each ``A x B`` matrix, one per
        row of its longer side, stepped by the engine as a separate 2-D parameter
        (:meth:`~lowmem.optim.engine.LowMemOptimizer._matrices`; ``v`` stacked ``[..., A, 1]`` /
        ``[..., 1, B]``). Flat subsets (``subset_size``) and Adam's element-wise ``v`` need no matrices."""
        return self.adaptive and len(shape) > 2 and bool(group.get("subset_norm")) and group.get("subset_size") is None

    # ---- the batched step of a batch of matrices (fused MoE experts [E, A, B]) ----

    def supports_batch_for(self, shape, group, state):
        """The engine's batched step of a batch of matrices (:meth:`~lowmem.optim.engine.LowMemOptimizer._matrix_blocks`):
        each matrix's subset norms stacked ``[..., A, 1]`` (per row) or ``[..., 1, B]`` (per column), float32
        moments (updated in place; low-precision ones are computed in float32 by the per-matrix step)."""
        v, m = state.get("exp_avg_sq"), state.get("exp_avg")
        return (v is not None and v.dtype == torch.float32 and (m is None or m.dtype == torch.float32)
                and len(shape) > 2 and tuple(v.shape[-2:]) in ((shape[-2], 1), (1, shape[-1])))

    def batch_direction(self, g, state, group, t, lr):
        """The step of a block of ``k`` matrices (``g``: their float32 gradients ``[k, A, B]``; ``state``: views
        of the stacked moments, ``exp_avg`` ``[k, A, B]``, ``exp_avg_sq`` ``[k, A, 1]`` or ``[k, 1, B]``, updated
        in place): a new ``[k, A, B]`` direction, each matrix's as :meth:`direction`'s. Per row: the block is one
        ``k A x B`` matrix's rows (:meth:`direction` on that view: the same reductions, bit for bit); per column:
        the sums over each matrix's rows (:func:`~lowmem.optim.functional.subset_norm.subset_sq_norms` over
        dimension 1)."""
        k, rows, cols = g.shape
        v = state["exp_avg_sq"]
        if v.shape[-1] == 1:
            flat = {"exp_avg_sq": v.view(k * rows, 1)}
            if "exp_avg" in state:
                flat["exp_avg"] = state["exp_avg"].view(k * rows, cols)
            return self.direction(g.view(k * rows, cols), flat, group, t, lr).view(g.shape)
        num = self._numerator(g, state, group)
        sq = SN.subset_sq_norms(g, 1)
        v32 = _ema_stored_(v, sq, self._beta2(group))
        del sq
        denom = SN.sn_denominator(v32, group["eps"])
        d = num / denom
        del denom
        scale = self._scale(t, group)
        return d if scale == 1.0 else d.mul_(scale)

    def batch_transient_bytes(self, k, shape, group, state, copy=0):
        """:meth:`batch_direction` of ``k`` ``A x B`` matrices beside the engine's float32 copy of a low-precision
        gradient block (``copy`` bytes per element), then the direction beside the parameter block's copy, exact:
        per row, :meth:`chunk_transient_bytes` of the ``k A x B`` rows; per column, ``g^2`` beside its ``k B`` sums, then the
        ``k B`` denominators beside the direction (both ``c n + 4 n + 4 k B``), then ``4 n + c n``."""
        rows, cols = shape[0], shape[1]
        n = k * rows * cols
        v = state["exp_avg_sq"]
        if v.shape[-1] == 1:
            flat = {"exp_avg_sq": v.reshape(k * rows, 1)}
            if "exp_avg" in state:
                flat["exp_avg"] = state["exp_avg"].reshape(k * rows, cols)
            return self.chunk_transient_bytes(n, (k * rows, cols), group, flat, copy)
        return max(copy * n + 4 * (n + k * cols), 4 * n + copy * n)

    # FSDP2 (lowmem.optim.sharded): the partition is chosen from the whole shape (a shard of a square
    # weight is wide), a shard keeps its rows' statistics, and the column sums are all-reduced
    sharded_stats = True

    def init_state_sharded(self, state, shape, whole_shape, group, param, key=None):
        self.init_state(state, shape, group, param)
        if "exp_avg_sq" in state and group.get("subset_norm") and group.get("subset_size") is not None:
            # flat subsets of k elements, k from the whole size; the shard starts on a subset
            # boundary (lowmem.optim.sharded.flat_subsets_refusal): (numel_s / k, 1) of its own
            k, numel = SN.flat_subset_size(math.prod(whole_shape), group["subset_size"]), math.prod(shape)
            if numel % k:
                raise ValueError(f"subset_size={group['subset_size']}: a shard of {numel} elements of a"
                                 f" {tuple(whole_shape)} tensor is not a whole number of its {k}-element subsets")
            v = state["exp_avg_sq"]
            state["exp_avg_sq"] = torch.zeros((numel // k, 1), dtype=v.dtype, device=v.device)
        elif "exp_avg_sq" in state and len(shape) == 2:
            whole = SN.subset_state_shape(whole_shape, bool(group.get("subset_norm")), group.get("subset_size"))
            v_shape = torch.Size((shape[0], 1)) if whole == torch.Size((whole_shape[0], 1)) else (
                whole if whole == torch.Size((1, whole_shape[1])) else torch.Size(shape))
            v = state["exp_avg_sq"]
            state["exp_avg_sq"] = torch.zeros(v_shape, dtype=v.dtype, device=v.device)

    # checkpoints: per-row (m_s, 1) statistics sharded like the rows, per-column (1, n) replicated
    reduced_dims = {"exp_avg_sq": "keepdim"}

    def _numerator(self, g: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> Tensor:
        beta1 = self._beta1(group)
        if beta1 == 0:
            return g
        if "exp_avg" not in state:
            raise ValueError(f"{'betas[0]' if 'betas' in group else 'momentum'}={beta1} > 0 but this parameter's state has"
                             " no first moment (it was allocated with 0); set it before the first step")
        return _ema_stored_(state["exp_avg"], g, beta1)

    def direction(self, g, state, group, t, lr):
        num = self._numerator(g, state, group)
        if "exp_avg_sq" not in state:  # momentum only: SM's subspace part, or SGD with momentum
            return num.clone()
        extra = state.extra if isinstance(state, ChunkState) else {}
        if "denom" in extra:  # one statistic per column: updated over every row chunk first
            denom = extra["denom"]
            d = num.view(-1, denom.shape[-1]) / denom
        else:
            denom, g2 = _sn_update_(state["exp_avg_sq"], g, self._beta2(group), group["eps"])
            d = num.view(g2.shape) / denom
        scale = self._scale(t, group)
        return (d if scale == 1.0 else d.mul_(scale)).view(g.shape)

    # ---- the multi-tensor step ----

    foreach_decays_after = True  # every Subset-Norm recipe decays after the update (the authors')

    def supports_foreach_for(self, shape, group, state):
        """Adaptive rules (a second moment) on a full-rank parameter: one ``v`` per element (groups
        without ``subset_norm``, vectors), per row / flat subset, or per column. Not per column in a
        group with FSDP2 (sharded) parameters: the column sums span the shards, which the
        per-parameter step all-reduces (:meth:`prepare_chunks`); the layout is decided from the
        state's ``v`` once it exists (the whole shape's, on a shard), else from the group and shape.
        Momentum alone (``adaptive=False``, ``sgd_sm``'s full-rank parameters) is element-wise: any
        parameter whose state holds a first moment exactly when ``momentum > 0``."""
        if not self.adaptive:
            return not state or ("exp_avg" in state) == (self._beta1(group) > 0)
        if state:
            v = state.get("exp_avg_sq")
            if v is None or ("exp_avg" in state) != (self._beta1(group) > 0):
                return False
            layout = _subset_layout(v, math.prod(shape))
        else:
            v_shape = SN.subset_state_shape(shape, bool(group.get("subset_norm")), group.get("subset_size"))
            layout = "element" if v_shape == shape else ("row" if v_shape[-1] == 1 else "column")
        return layout != "column" or not sharded_group(group)

    def steps_pieces_whole(self, shape, group, state):
        """A subset-normed tensor in pieces is stepped whole from its first one; one ``v`` per element
        (or momentum alone) is element-wise (:meth:`foreach_step_`)."""
        return self.adaptive and "exp_avg_sq" in state and state["exp_avg_sq"].numel() != math.prod(shape)

    def foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """A bucket's step (moments, update, decay after it): tensors with one ``v`` per element by
        :func:`~lowmem.optim.functional.subset_norm.elementwise_foreach_` (pieces of a large one too),
        subset-normed ones by :func:`~lowmem.optim.functional.subset_norm.subset_foreach_`, a
        subset-normed tensor larger than ``chunk_numel`` (it arrives in pieces) whole from its first
        piece, chunked (:func:`~lowmem.optim.moments.step_whole_from_piece_`); this rule's betas,
        step scale and ``eps``. Momentum alone (``adaptive=False``): SGD with momentum by
        :func:`~lowmem.optim.functional.subset_norm.sgd_momentum_foreach_` (pieces are element-wise)."""
        beta1, wd = self._beta1(group), group.get("weight_decay", 0.0)
        if not self.adaptive:
            ms = [s["exp_avg"] for s in states] if beta1 > 0 else None
            SN.sgd_momentum_foreach_(params, grads, ms, beta1, lr, wd)
            return
        beta2, scale = self._beta2(group), self._scale(t, group)
        element, subsets = [], []
        for p, g, s in zip(params, grads, states):
            v = s["exp_avg_sq"]
            if v.numel() == p.numel() and (not isinstance(s, ChunkState) or s.extra["parent"]["exp_avg_sq"].numel() == math.prod(s.extra["shape"])):
                element.append((p, g, s))
            elif isinstance(s, ChunkState):
                if s.start == 0:
                    moments.step_whole_from_piece_(self, p, g, s, group, t, lr, decay_after=True)
            else:
                subsets.append((p, g, s))
        for items, step in ((element, SN.elementwise_foreach_), (subsets, SN.subset_foreach_)):
            if items:
                ps, gs, ss = (list(x) for x in zip(*items))
                vs = [s["exp_avg_sq"] for s in ss]
                if step is SN.elementwise_foreach_:  # flat subsets of one element keep v as (numel, 1)
                    vs = [v.view(g.shape) for v, g in zip(vs, gs)]
                step(ps, gs, [s["exp_avg"] for s in ss] if beta1 > 0 else None, vs,
                     t, beta1, beta2, lr, wd, group["eps"], scale)

    def foreach_transient_bytes(self, numel):
        """Element-wise tensors: ``sqrt(v) + eps`` and the direction; subset-normed ones: their
        concatenated squares, then the direction (:meth:`transient_bytes` of one chunk for a tensor
        stepped from its pieces): two float32 tensors of the bucket. Momentum alone: none (the
        update reads ``m`` itself)."""
        return 8 * numel if self.adaptive else 0

    # ---- the multi-tensor step of projected parameters (Subspace-Momentum's P^T G) ----

    def supports_foreach_direction(self, group, state, param):
        """Under a projection this rule keeps only the momentum of ``P^T G`` (no second moment: the
        Subset-Norm step of SNSM is :class:`SubsetNormStep`'s, on the combined direction), so the
        projected gradients of a bucket take one EMA kernel (:meth:`foreach_direction`): float32
        moments (or none, ``b1 = 0``), the state holding a first moment exactly when ``b1 > 0``."""
        beta1 = self._beta1(group)
        if not state:
            return beta1 == 0 or state_dtype(group, param) == torch.float32
        if "exp_avg_sq" in state or ("exp_avg" in state) != (beta1 > 0):
            return False
        return beta1 == 0 or state["exp_avg"].dtype == torch.float32

    def foreach_direction(self, gs, states, group, t, lr):
        """:meth:`direction` of several projected gradients: ``m <- b1 m + (1 - b1) P^T G``
        (:func:`~lowmem.optim.functional.subset_norm.ema_foreach_`, the per-tensor operations in their
        order) and a copy of each ``m`` (of ``P^T G`` when ``b1 = 0``), as the per-tensor form returns: one
        ``torch._foreach_copy_`` for the bucket (the combine-back's bucket fold writes into them)."""
        beta1 = self._beta1(group)
        if beta1 != 0:
            ms = [s["exp_avg"] for s in states]
            SN.ema_foreach_(ms, gs, beta1)
        src = gs if beta1 == 0 else ms
        out = [torch.empty_like(x) for x in src]  # (copies in one kernel: torch < 2.13 has no _foreach_clone)
        torch._foreach_copy_(out, src)
        return out

    def foreach_direction_transient_bytes(self, numel):
        """The returned directions (copies of the momenta): one float32 tensor of ``numel``."""
        return 4 * numel

    # ---- the chunked step: whole rows of a subset-normed matrix, elements otherwise ----

    def chunk_align(self, shape, group, state):
        v = state.get("exp_avg_sq")
        numel = math.prod(shape)
        layout = None if v is None else _subset_layout(v, numel)
        if layout in (None, "element"):
            return 1
        return numel // v.shape[0] if layout == "row" else shape[1]  # whole subsets / whole rows

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        view = ChunkState(state, start, stop, {"parent": state, "shape": shape})
        if "exp_avg" in state:
            view["exp_avg"] = state["exp_avg"].view(-1)[start:stop]
        v = state.get("exp_avg_sq")
        if v is not None:
            layout = _subset_layout(v, math.prod(shape))
            if layout == "element":
                view["exp_avg_sq"] = v.view(-1)[start:stop]
            elif layout == "row":
                k = math.prod(shape) // v.shape[0]
                view["exp_avg_sq"] = v[start // k : stop // k]
            elif ctx is not None:
                view.extra["denom"] = ctx
        return view

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized, reduce=None):
        """One statistic per column: the column sums of ``g^2`` over every row chunk, then the EMA
        and the denominator (handed to each chunk). ``reduce`` (an FSDP2 shard of rows): the column
        sums summed over the shards (one all-reduce of ``n`` numbers)."""
        v = state.get("exp_avg_sq")
        if v is None or _subset_layout(v, math.prod(shape)) != "column":
            return None
        n = shape[1]
        sq = torch.zeros((1, n), dtype=torch.float32, device=v.device)
        for start, stop in bounds:
            g = stabilized(start, stop, self.chunk_state(state, start, stop, shape, group))
            sq.add_(SN.subset_sq_norms(g.view(-1, n), 0))
        if reduce is not None:
            reduce.sum_(sq)
        v32 = _ema_stored_(v, sq, self._beta2(group))
        return SN.sn_denominator(v32, group["eps"])

    def transient_bytes(self, numel, shape, group, state):
        """The direction and ``g^2`` (float32); per element also ``sqrt(v) + eps``; float32 copies of
        low-precision moments."""
        m = state.get("exp_avg")
        low_m = 4 * numel if m is not None and _low_precision(m) else 0
        v = state.get("exp_avg_sq")
        if v is None:
            return 4 * numel + low_m
        element = _subset_layout(v, math.prod(shape)) == "element"
        low_v = 4 * numel if element and _low_precision(v) else 0
        return (12 if element else 8) * numel + low_m + low_v


    #: The chunked step's phases count a low-precision parameter's float32 gradient and parameter chunks
    #: themselves (:meth:`chunk_transient_bytes` with ``copy=4``): the direction is a new tensor, the gradient
    #: chunk's copy freed before the parameter chunk's is made.
    chunk_counts_copies = True

    def chunk_transient_bytes(self, numel, shape, group, state, copy: int = 0):
        """The chunked step (the engine's ``_update_chunked``) with chunks of at most ``numel`` elements, exact,
        phase by phase (``copy``: bytes per element of the gradient and parameter chunks' float32 copies, 4 for a
        low-precision parameter, else 0; ``m``: a low-precision first moment's float32 copy, ``4 n``):

        * subsets of whole rows or flat runs (``r`` of them in the chunk): the gradient copy, ``m``, ``g^2`` and
          its subset sums (``c n + m + 4 n + 4 r``; the denominators beside the direction, ``4 r + 4 n``, no more);
        * one statistic per column (``C`` columns): :meth:`prepare_chunks`' column sums beside a chunk's gradient
          copy, ``g^2`` and its sums (``c n + 4 n + 8 C``), then the kept denominators beside the gradient copy,
          ``m`` and the direction (``c n + m + 4 C + 4 n``);
        * one per element: ``g^2``, then ``sqrt(v) + eps`` beside the direction (``c n + m + 8 n``; a low-precision
          ``v``'s copy is freed before the direction is made);
        * momentum only (no second moment): the direction, a clone (``c n + m + 4 n``);
        * then the direction beside the parameter chunk's copy (``4 n + c n``, the column denominators too)."""
        m = state.get("exp_avg")
        low_m = 4 * numel if m is not None and _low_precision(m) and self._beta1(group) != 0 else 0
        v = state.get("exp_avg_sq")
        w, dv, dn, dd = self._widths(group, state)
        held = copy * numel + low_m
        if v is None:
            return max(held + dn * numel, dn * numel + copy * numel)
        layout = _subset_layout(v, math.prod(shape))
        if layout == "element":  # (a low-precision v's float32 copy beside g^2)
            low_v = 4 * numel if _low_precision(v) else 0
            return max(held + w * numel + low_v, held + (dv + dd) * numel, dd * numel + copy * numel)
        if layout == "row":
            rows = numel // (math.prod(shape) // v.shape[0])
            return max(held + w * (numel + rows), held + dv * rows + dd * numel, dd * numel + copy * numel)
        cols = shape[1]
        return max(copy * numel + w * numel + (w + 4) * cols, held + dv * cols + dd * numel,
                   dv * cols + dd * numel + copy * numel)

    def _widths(self, group, state) -> tuple[int, int, int, int]:
        """Bytes per element of ``(g, v's compute copy, the numerator, the direction)``: ``g^2`` and its subset sums
        are in the gradient's dtype (8 for a float64 one, :func:`~lowmem.optim.moments.grad_element_bytes`), the
        denominators in ``v``'s (float32, or float64 moments), the numerator is the first moment's compute copy (the
        gradient itself with ``beta1 = 0``), the direction the wider of the numerator and the denominators. All 4
        for a float32 or low-precision parameter. (Before 2026-11-30 counted 4: a float64 48 x 24 weight in chunks
        of 600, 2,500 B reported, 5,000 traced.)"""
        m, v = state.get("exp_avg"), state.get("exp_avg_sq")
        w = grad_element_bytes(group, v if v is not None else m)
        dv = 8 if v is not None and v.dtype == torch.float64 else 4
        dn = (8 if m.dtype == torch.float64 else 4) if m is not None and self._beta1(group) != 0 else w
        return w, dv, dn, max(dn, dv)

    def whole_transient_bytes(self, shape, group, state):
        """The step of the whole tensor (the engine's unchunked step; it adds the float32 copies of a low-precision
        gradient and parameter), exact: :meth:`chunk_transient_bytes` of one chunk of every element, but one
        statistic per column takes no pass of its own (``g^2`` and its column sums, then the denominators beside
        the direction: ``m + 4 n + 4 C``). (:meth:`transient_bytes`, the bound it replaces here, counted 8 bytes
        per element: 48 x 24 float32 9,216 for 4,800 traced.)"""
        numel = math.prod(shape)
        v = state.get("exp_avg_sq")
        if v is None or len(shape) != 2 or _subset_layout(v, numel) != "column":
            return self.chunk_transient_bytes(numel, shape, group, state)
        m = state.get("exp_avg")
        low_m = 4 * numel if m is not None and _low_precision(m) and self._beta1(group) != 0 else 0
        w, dv, _, dd = self._widths(group, state)
        return low_m + max(w * (numel + shape[1]), dv * shape[1] + dd * numel)


class SubspaceMomentumResidual(StateFreeResidual):
    """Subspace-Momentum's complement step (Section 4): FRUGAL's state-free rule on ``G - P P^T G``
    (:class:`~lowmem.optim.subspace.StateFreeResidual`), with the SGD rule folded into the subspace's
    product (issue 15). The combined direction ``alpha P d_low + f (G - P low)`` (``alpha = scale``,
    ``f = free_lr_scale``, ``low = P^T G``) is ``P (alpha d_low - f low) + f G``: one GEMM per row
    block of the chunked combine-back instead of two, and no row block of the residual
    (:meth:`fold`); the same with ``Q`` on the right side. The whole-tensor :meth:`update` (the
    reference, ``chunk_numel=None``) and ``free_rule="signsgd"`` (not linear) stay unfolded; equal
    to the unfolded rows to float32 rounding (tests/test_foreach_subset_norm.py)."""

    def fold(self, low, d_low, state, group, projection, ctx):
        """``(M, k)`` with ``M = scale d_low - free_lr_scale low`` and ``k = [free_lr_scale]``, so that
        rows of the combined direction are ``up_rows(M) + G_rows k``; ``None`` for signSGD or a
        projection without a basis (coordinates scatter)."""
        if group["free_rule"] != "sgd" or not projection.can_add_up_rows(state):
            return None
        f, alpha = group["free_lr_scale"], group["scale"]
        m = torch.add(d_low if alpha == 1.0 else d_low * alpha, low, alpha=-f)
        return m, torch.full((1,), f, dtype=m.dtype, device=m.device)

    def foreach_fold(self, gs, lows, d_lows, states, group, projection, alpha, bounds):
        """:meth:`fold` of a bucket at once (the engine's projected multi-tensor step, issue 15): every
        ``M = scale d_low - free_lr_scale low`` in two multi-tensor kernels
        (:func:`~lowmem.optim.functional.subset_norm.sm_fold_foreach_`), written into the bucket's
        directions (the copies :meth:`SubsetNormMoments.foreach_direction` returned, which nothing reads
        after the fold: no allocation), and one 0-d ``k = alpha free_lr_scale`` for all; yields
        ``(i, M_i, alpha, k)``. ``None`` for signSGD (:class:`ProjectBack` checks the basis)."""
        if group["free_rule"] != "sgd":
            return None
        ms = SN.sm_fold_foreach_(lows, d_lows, group["scale"], group["free_lr_scale"])
        f = group["free_lr_scale"]
        k = torch.full((), alpha * f, dtype=torch.float32, device=lows[0].device) if f != 0 else None
        return ((i, m, alpha, k) for i, m in enumerate(ms))

    def foreach_fold_offered(self, group):
        """:meth:`foreach_fold` folds with the SGD complement; signSGD does not (each parameter combined back
        alone). (:class:`ProjectBack` asks on a basis projection only.)"""
        return group["free_rule"] == "sgd"

    def foreach_fold_bytes(self, members, group, projection, device):
        """:meth:`foreach_fold` (exact, traced): ``M`` written into the directions (nothing allocated), the 0-d
        ``k`` (none when ``free_lr_scale`` is 0), beside each update's ``addmm_`` (a two-sided basis's ``P N``,
        :meth:`~lowmem.optim.subspace.Projection.add_up_rows_bytes`) and ``addcmul_`` in place."""
        if not self.foreach_fold_offered(group):
            return None
        k = 4 * (group["free_lr_scale"] != 0)
        return k + max(projection.add_up_rows_bytes(shape, group, shape[0]) for shape, *_ in members)

    def foreach_fold_rest(self, ps, gs, lows, states, group, projection, alpha, bounds):
        """Nothing: :meth:`foreach_fold`'s ``M`` and ``k`` hold the whole state-free part (FRUGAL's batched
        ``sign`` step, :meth:`StateFreeResidual.foreach_fold_rest`, is not this rule's)."""

    def transient_bytes(self, shape, group, state, projection, rows):
        """All rows at once (the unfolded :meth:`update`): 3 float32 blocks of the rows. Fewer rows
        (:meth:`fold`): ``M`` and ``scale d_low`` (2 tensors of ``low``'s size) and ``k``."""
        if rows >= shape[0] or group["free_rule"] != "sgd" or not projection.can_add_up_rows(state):
            return super().transient_bytes(shape, group, state, projection, rows)
        return 8 * projection.low_shape(shape, group).numel() + 4

    def _folds(self, group, projection, state) -> bool:
        return group["free_rule"] == "sgd" and projection.can_add_up_rows(state)

    def prepare_bytes(self, shape, group, state, projection, bounds, low_precision=False):
        """:meth:`fold` (exact, traced): ``scale d_low`` (unless ``scale`` is 1) beside ``M``, then ``k``
        (4 bytes); ``M`` and ``k`` held through the blocks."""
        if not self._folds(group, projection, state):
            return 0, 0
        low = 4 * projection.low_shape(shape, group).numel()
        return max(low * (1 + (group["scale"] != 1.0)), low + 4), low + 4

    def rows_bytes(self, shape, group, state, projection, rows):
        """Folded: nothing beside the subspace part's block (``addcmul_`` into it); else FRUGAL's."""
        return 0 if self._folds(group, projection, state) else super().rows_bytes(shape, group, state, projection, rows)

    def whole_bytes(self, shape, group, state, projection):
        """The unfolded :meth:`update` (FRUGAL's)."""
        return StateFreeResidual.whole_bytes(self, shape, group, state, projection)


class SubsetNormStep(CombineRule):
    """The Subset-Norm step size on a projected parameter's combined direction (SNSM): ``inner``'s
    full-size direction ``u`` (Subspace-Momentum: ``P m + (G - P P^T G)``) divided by the subset
    norms of the raw gradient ``G``, ``v <- b2 v + (1 - b2) ||G_Psi||^2``, and scaled by
    ``sqrt(1 - b2^t) / (1 - b1^t)``: ``u sqrt(1 - b2^t) / ((1 - b1^t)(sqrt(v) + eps))``, as the
    authors' ``GenericOptim`` with ``momentum_type="sm", second_moment_type="sn"``.

    State: ``sn_exp_avg_sq`` (``(m, 1)`` or ``(1, n)``; ``(m, n)`` when the group's
    ``subset_norm`` is ``False``), not reset when the subspace changes (only the momentum is).
    """

    def __init__(self, inner: CombineRule, accumulate: bool = False):
        self.inner, self.accumulate = inner, accumulate
        self.state_keys = (*inner.state_keys, "sn_exp_avg_sq")

    def init_state(self, state, param, group):
        self.inner.init_state(state, param, group)
        shape = SN.subset_state_shape(param.shape, group["subset_norm"])
        state["sn_exp_avg_sq"] = torch.zeros(shape, dtype=state_dtype(group, param), device=param.device)

    def init_state_sharded(self, state, shard, param, group):
        """FSDP2: the inner rule's state, and the statistics of the shard's rows of ``G`` (per row or
        element), or of every column (``(1, n)``, from all-reduced sums), by the whole shape."""
        self.inner.init_state_sharded(state, shard, param, group)
        whole = SN.subset_state_shape(param.shape, group["subset_norm"])
        shape = whole if whole == torch.Size((1, param.shape[1])) else torch.Size((shard.shape[0], *whole[1:]))
        state["sn_exp_avg_sq"] = torch.zeros(shape, dtype=state_dtype(group, shard), device=shard.device)

    def _scale(self, state: dict[str, Tensor], group: dict[str, Any]) -> float:
        if self.accumulate:  # AdaGrad-SNSM: no bias correction
            return 1.0
        beta1, beta2 = group["betas"]
        return SN.step_scale(state["step"].item(), beta1, beta2)

    def _beta2(self, group: dict[str, Any]) -> float | None:
        return None if self.accumulate else group["betas"][1]

    def direction(self, g, low, d_low, state, group, projection):
        u = self.inner.direction(g, low, d_low, state, group, projection)
        denom, g2 = _sn_update_(state["sn_exp_avg_sq"], g, self._beta2(group), group["eps"],
                                SN.subset_sq_norms_by_norm)
        return _div_scaled_(u.view(g2.shape), denom, self._scale(state, group)).view(g.shape)

    def prepare(self, g, low, d_low, state, group, projection, bounds):
        inner = self.inner.prepare(g, low, d_low, state, group, projection, bounds)
        v = state["sn_exp_avg_sq"]
        denom = None
        if _subset_layout(v, g.numel()) == "column":  # column sums over every row block first
            sq = torch.zeros((1, g.shape[1]), dtype=torch.float32, device=v.device)
            for a, b in bounds:
                sq.add_(SN.subset_sq_norms_by_norm(g[a:b].float(), 0))
            denom = SN.sn_denominator(_ema_stored_(v, sq, self._beta2(group)), group["eps"])
        return inner, denom, self._scale(state, group)

    def direction_rows(self, g_rows, low, d_low, state, group, projection, start, stop, ctx):
        inner, denom, scale = ctx
        u = self.inner.direction_rows(g_rows, low, d_low, state, group, projection, start, stop, inner)
        if denom is None:  # per row or per element: the rows' own statistics
            denom, _ = _sn_update_(state["sn_exp_avg_sq"][start:stop], g_rows, self._beta2(group), group["eps"],
                                   SN.subset_sq_norms_by_norm)
        return _div_scaled_(u, denom, scale)

    def foreach_fold(self, gs, lows, d_lows, states, group, projection, alpha, bounds):
        """The combine-back of a bucket at once (issue 15), when the inner rule is Subspace-Momentum's
        folded SGD complement (:meth:`SubspaceMomentumResidual.foreach_fold`) and every statistic divides
        along the side the projection keeps: one per column (``(1, n)``) of a left-projected gradient
        (``low`` of ``(r, n)``: ``(P M) / d = P (M / d)``) or one per row (``(m, 1)``) of a right-projected
        one (``(M Q) / d = (M / d) Q``), the defaults (the statistics run along the longer side, the
        projection reduces the shorter one); float32 statistics. Per parameter the subset norms of ``G`` (the
        row blocks of ``bounds`` for columns, as :meth:`prepare`); then for the bucket their squares, the
        statistics' update and ``(sqrt(v) + eps) / scale``
        (:func:`~lowmem.optim.functional.subset_norm.sn_denominators_foreach_`), ``M`` in place
        (:func:`~lowmem.optim.functional.subset_norm.sm_fold_foreach_`) divided by them, and
        ``k = alpha free_lr_scale / denominator``: yields ``(i, M_i / d_i, alpha, k_i)``, so the update
        ``alpha (P M + f G) / d`` is one ``addmm_`` and one ``addcmul_`` per parameter. Beyond the
        arguments: two vectors per parameter (a side's length). ``None`` otherwise (each parameter
        combined back alone, :meth:`direction_rows`, the reference)."""
        dims = self._fold_dims([(g.shape, low.shape, st, b) for g, low, st, b in zip(gs, lows, states, bounds)],
                               group, projection)
        if dims is None:
            return None
        vs = [st["sn_exp_avg_sq"] for st in states]
        stacked = self._stacked_norms(gs, dims, bounds, states, group, projection)
        sq, norms = [], []
        for i, (g, dim, b) in enumerate(zip(gs, dims, bounds)):
            if dim == 0 and (len(b) > 1 or b[0] != (0, g.shape[0])):
                sq.append(self._column_sq_norms(g, b))  # (summed over the row blocks, as prepare)
            else:  # the rows' or the one block's norms, squared below for the bucket
                sq.append(stacked[i] if i in stacked else torch.linalg.vector_norm(g, dim=dim, keepdim=True))
                norms.append(sq[-1])
        del stacked
        if norms:  # one kernel: square_ is x * x (subset_sq_norms_by_norm's bits)
            torch._foreach_mul_(norms, norms)
        del norms
        denom = SN.sn_denominators_foreach_(vs, sq, self._beta2(group), group["eps"], self._scale(states[0], group))
        del sq
        f = group["free_lr_scale"]
        ms = SN.sm_fold_foreach_(lows, d_lows, group["scale"], f)
        torch._foreach_div_(ms, denom)
        ks = None
        if f != 0:
            ks = torch._foreach_reciprocal(denom)
            torch._foreach_mul_(ks, alpha * f)
        del denom
        return ((i, m, alpha, None if ks is None else ks[i].view(-1) if dims[i] == 0 else ks[i])
                for i, m in enumerate(ms))

    def _fold_dims(self, members, group, projection) -> list[int] | None:
        """:meth:`foreach_fold`'s conditions on a bucket (``members``: ``(shape, low_shape, state, row bounds)`` of
        each parameter): the side of each member's statistic (0: per column of a left-projected gradient, 1: per
        row of a right-projected one), or ``None`` when it does not fold (each parameter combined back alone)."""
        inner = self.inner
        if not (isinstance(inner, ProjectBack) and isinstance(inner.residual, SubspaceMomentumResidual)
                and group["free_rule"] == "sgd" and all(projection.can_add_up_rows(st) for _, _, st, _ in members)):
            return None
        dims = []
        for shape, low, st, _ in members:
            v = st["sn_exp_avg_sq"]
            if v.dtype != torch.float32 or len(shape) != 2:
                return None
            layout = _subset_layout(v, math.prod(shape))
            if layout == "column" and low[1] == shape[1] and low[0] != shape[0]:
                dims.append(0)
            elif layout == "row" and v.shape[0] == shape[0] == low[0] and low[1] != shape[1]:
                dims.append(1)
            else:
                return None
        return dims

    def foreach_fold_offered(self, members, group, projection):
        """Whether :meth:`foreach_fold` folds the bucket (its conditions: :meth:`_fold_dims`)."""
        return self._fold_dims(members, group, projection) is not None

    def foreach_fold_bytes(self, members, group, projection, device):
        """:meth:`foreach_fold` walked (exact against a trace, tests/test_folds_buckets.py): where
        :func:`~lowmem.optim.subspace.stacks_by_shape` on ``device`` (:meth:`_stacked_norms`), each part's stack of
        whole gradients of one shape and side beside its norms (kept); per parameter its norms (per column over
        several row blocks: the running sums beside each block's); the denominators (one per statistic); then, the
        norms freed, ``k`` beside them (none when ``free_lr_scale`` is 0); ``M`` and the updates in place."""
        dims = self._fold_dims(members, group, projection)
        if dims is None:
            return None
        w = _Walk()
        kept, stacked = [], set()
        if device is not None and subspace.stacks_by_shape(torch.device(device)):  # (_stacked_norms' parts)
            shape0, _, st0, b0 = members[0]
            rows = max(b - a for a, b in b0)
            room = self.transient_bytes(shape0, group, st0, projection, rows) - 16 * sum(max(s) for s, *_ in members)
            shapes: dict[tuple, list[int]] = {}
            for i, ((shape, _, _, b), dim) in enumerate(zip(members, dims)):
                if b == [(0, shape[0])]:
                    shapes.setdefault((tuple(shape), dim), []).append(i)
            for (shape, dim), idx in shapes.items():
                size = room // (4 * math.prod(shape) + 4 * shape[1 - dim]) if len(idx) >= subspace.MIN_STACK else 0
                if size < subspace.MIN_STACK:
                    continue
                for a in range(0, len(idx), size):
                    part = idx[a:a + size]
                    if len(part) < subspace.MIN_STACK:
                        continue
                    stack = w.new(4 * len(part) * math.prod(shape))
                    kept.append(w.new(4 * len(part) * shape[1 - dim]))
                    w.free(stack)
                    stacked.update(part)
        for i, ((shape, _, _, b), dim) in enumerate(zip(members, dims)):
            n = shape[1]
            if dim == 0 and (len(b) > 1 or b[0] != (0, shape[0])):  # (_column_sq_norms: the sums beside a block's)
                kept.append(w.new(4 * n))
                for _ in b:
                    w.free(w.new(4 * n))
            elif i not in stacked:
                kept.append(w.new(4 * (n if dim == 0 else shape[0])))
        denom = [w.new(4 * st["sn_exp_avg_sq"].numel()) for _, _, st, _ in members]
        w.free(*kept)
        if group["free_lr_scale"] != 0:
            for d in denom:
                w.new(d)  # (k: the reciprocals of the denominators)
        return w.peak

    def _stacked_norms(self, gs, dims, bounds, states, group, projection) -> dict[int, Tensor]:
        """Off the CPU (:func:`~lowmem.optim.subspace.stacks_by_shape`; issue 15): the norms :meth:`foreach_fold`
        takes of whole gradients (the rows' of a right-projected one, the columns' of a left-projected one in
        one block of rows), for gradients of one shape and side :data:`~lowmem.optim.subspace.MIN_STACK` or
        more at a time, each part copied into a stack and reduced by one ``vector_norm`` (keepdim): ``{index:
        its norms}``, views of the part's, the rest left to one ``vector_norm`` each. Within the room the
        engine counts for the bucket's first parameter's combine-back (:meth:`transient_bytes` of its rows, the
        unfolded step's full-size blocks, which the fold does not allocate; ``step_transient_bytes()``
        counts it next to the bucket's projected gradients and directions, which the fold holds) less 16 bytes
        per channel of every parameter of the bucket (the fold's vectors: the norms, denominators and ``k``):
        each part's stack and its norms."""
        if not gs or not subspace.stacks_by_shape(gs[0].device):
            return {}
        rows = max(b - a for a, b in bounds[0])
        room = (self.transient_bytes(gs[0].shape, group, states[0], projection, rows)
                - 16 * sum(max(g.shape) for g in gs))
        shapes: dict[tuple, list[int]] = {}
        for i, (g, dim, b) in enumerate(zip(gs, dims, bounds)):
            if g.dtype == torch.float32 and b == [(0, g.shape[0])]:
                shapes.setdefault((tuple(g.shape), dim), []).append(i)
        out: dict[int, Tensor] = {}
        for (shape, dim), idx in shapes.items():
            size = room // (4 * math.prod(shape) + 4 * shape[1 - dim]) if len(idx) >= subspace.MIN_STACK else 0
            if size < subspace.MIN_STACK:
                continue
            for a in range(0, len(idx), size):
                part = idx[a:a + size]
                if len(part) < subspace.MIN_STACK:
                    continue  # (a rest of one or two: one vector_norm each)
                stack = torch.stack([gs[i] for i in part])
                norms = torch.linalg.vector_norm(stack, dim=dim + 1, keepdim=True)
                del stack
                out.update((i, norms[j]) for j, i in enumerate(part))
        return out

    @staticmethod
    def _column_sq_norms(g: Tensor, bounds: list[tuple[int, int]]) -> Tensor:
        """The squared norms of ``g``'s columns, ``(1, n)``, summed over the row blocks ``bounds`` as
        :meth:`prepare` sums them (one block: the block's own, ``0 + x`` being ``x``: :meth:`foreach_fold`
        takes it without this sum)."""
        sq = torch.zeros((1, g.shape[1]), dtype=torch.float32, device=g.device)
        for a, b in bounds:
            sq.add_(SN.subset_sq_norms_by_norm(g[a:b], 0))
        return sq

    def _sn_bytes(self, shape, state, rows: int) -> tuple[int, int]:
        """``(peak, denominator)`` of :func:`_sn_update_` of ``rows`` rows of a gradient of ``shape`` (the
        squared norms, the float32 copy of a low-precision ``v``'s rows, then ``sqrt(v) + eps``), per row or
        element (a column statistic is :meth:`prepare`'s)."""
        n = shape[1]
        v = state["sn_exp_avg_sq"]
        size = rows * n if _subset_layout(v, math.prod(shape)) == "element" else rows
        return 4 * size * (1 + _low_precision(v)), 4 * size

    def _div_bytes(self, shape, state, group, rows: int) -> int:
        """:func:`_div_scaled_`'s ``denom / scale`` (a statistic smaller than the direction, scale not 1)."""
        if self.accumulate:
            return 0
        v = state["sn_exp_avg_sq"]
        layout = _subset_layout(v, math.prod(shape))
        return 0 if layout == "element" else 4 * (rows if layout == "row" else shape[1])

    def prepare_bytes(self, shape, group, state, projection, bounds, low_precision=False):
        """The inner rule's, then per column (exact, traced): beside its context, the column sums (``4 n``)
        and a block's norms (``4 n``, of its float32 copy when the gradient is 16-bit), then
        ``sqrt(v) + eps`` (held) beside the sums and a low-precision ``v``'s float32 copy."""
        peak, held = self.inner.prepare_bytes(shape, group, state, projection, bounds, low_precision)
        v = state["sn_exp_avg_sq"]
        if _subset_layout(v, math.prod(shape)) != "column":
            return peak, held
        n = shape[1]
        block = 4 * max(b - a for a, b in bounds) * n if low_precision else 0
        return max(peak, held + 8 * n + block, held + 8 * n + 4 * n * _low_precision(v)), held + 4 * n

    def rows_bytes(self, shape, group, state, projection, rows):
        """The inner rule's rows (the direction ``u``), then beside ``u`` the rows' statistic
        (:meth:`_sn_bytes`, per row or element) and the division's scaled denominator."""
        inner = self.inner.rows_bytes(shape, group, state, projection, rows)
        u = 4 * rows * shape[1]
        v = state["sn_exp_avg_sq"]
        if _subset_layout(v, math.prod(shape)) == "column":
            return max(inner, u + self._div_bytes(shape, state, group, rows))
        sn, denom = self._sn_bytes(shape, state, rows)
        return max(inner, u + sn, u + denom + self._div_bytes(shape, state, group, rows))

    def whole_bytes(self, shape, group, state, projection):
        """:meth:`direction`: the inner rule's whole direction ``u``, then beside it the statistic of all of
        ``G`` (per column: the column norms and a low-precision ``v``'s copy, then the denominator) and the
        division's scaled denominator."""
        inner = self.inner.whole_bytes(shape, group, state, projection)
        m, n = shape
        u = 4 * m * n
        v = state["sn_exp_avg_sq"]
        if _subset_layout(v, math.prod(shape)) == "column":
            sn, denom = 4 * n * (1 + _low_precision(v)), 4 * n
        else:
            sn, denom = self._sn_bytes(shape, state, m)
        return max(inner, u + sn, u + denom + self._div_bytes(shape, state, group, m))

    def transient_bytes(self, shape, group, state, projection, rows):
        """``inner``'s, plus the statistics' own: per row or column the squared norms and
        ``sqrt(v) + eps`` (small: :func:`~lowmem.optim.functional.subset_norm.subset_sq_norms_by_norm`
        makes no ``G^2``) and, per column, a float32 copy of a low-precision gradient's rows in the
        column pass; per element ``G^2``, ``sqrt(v) + eps`` and a float32 copy of a low-precision ``v``."""
        n = shape[1]
        v = state["sn_exp_avg_sq"]
        layout = _subset_layout(v, math.prod(shape))
        if layout == "element":
            extra = (8 + 4 * _low_precision(v)) * rows * n
        else:
            extra = 8 * (rows if layout == "row" else n) + (4 * rows * n if layout == "column" else 0)
        return self.inner.transient_bytes(shape, group, state, projection, rows) + extra


# ---- recipes ---------------------------------------------------------------------------------

SN_REFERENCE = ("Nguyen & Nguyen 2024 (ICML 2025), Subset-Norm and Subspace-Momentum: Faster Memory-Efficient"
                " Adaptive Optimization with Convergence Guarantees")
SN_HPARAMS = (LR(1e-3), BETAS(), EPS(1e-6), WEIGHT_DECAY(0.0))
# the flat partition is for the full-rank recipes (a projected combine-back steps in blocks of rows)
SM_PROJECTIONS = (*SVD_LIKE, *COORDINATE_METHODS)


def sm_hparams() -> tuple[HParam, ...]:
    """Subspace-Momentum's per-group settings: the shared subspace ones (SVD, rank 128, moments
    reset at a refresh as the authors do, scale 1), Q-GaLore's opt-in lazy refresh (the refresh is an SVD of the
    gradient: :func:`~lowmem.optim.subspace.lazy_interval`, the same rule and state as GaLore's) and the
    complement's rule (FRUGAL's keys)."""
    return (
        *subspace_hparams("svd", SM_PROJECTIONS, scale=1.0, moment_policy="reset", refresh_phase="multiples"),
        *LAZY_REFRESH_HPARAMS,
        _choice("free_rule", "sgd", ("sgd", "signsgd"),
                "step of the complement G - P P^T G: 'sgd' (Subspace-Momentum) or 'signsgd' (FRUGAL's)"),
        HParam("free_lr_scale", 1.0, nonneg, "a finite float >= 0", "the complement's step / the subspace's (1 in the paper)"),
    )


ADAMW_SN = Recipe(
    name="adamw_sn",
    summary="AdamSN: Adam with one second moment per row of the longer side of each 2-D weight (Subset-Norm)",
    reference=f"{SN_REFERENCE}, Section 3 (AdamSN; timmytonga/sn-sm adamw_sn.py)",
    moment=SubsetNormMoments(),
    hparams=(*SN_HPARAMS, SUBSET_SIZE),
    group_hparams=(SUBSET_NORM,),
    decay_after_update=True,
)

ADAMW_SNSM = Recipe(
    name="adamw_snsm",
    summary="AdamSNSM: momentum in a rank-r SVD subspace, SGD on the complement, Subset-Norm step size",
    reference=f"{SN_REFERENCE}, Sections 3-4 (AdamSNSM; timmytonga/sn-sm GenericOptim, momentum_type='sm',"
              " second_moment_type='sn')",
    moment=SubsetNormMoments(),
    hparams=SN_HPARAMS,
    group_hparams=(*sm_hparams(), SUBSET_NORM),
    projection=SubspaceProjection(),
    combine=SubsetNormStep(ProjectBack(SubspaceMomentumResidual())),
    decay_after_update=True,
    validate_group=_check_subspace_group,
)

MOMENTUM = HParam("momentum", 0.9, in_unit_interval, "a float in [0, 1)",
                  "b1 of the momentum m <- b1 m + (1 - b1) g (of P^T g under a projection; 0: no momentum state)")

SGD_SM = Recipe(
    name="sgd_sm",
    summary="SGD with Subspace-Momentum: momentum of P^T G in a rank-r SVD subspace, plain SGD on the complement",
    reference=f"{SN_REFERENCE}, Section 4 (Subspace-Momentum; timmytonga/sn-sm GenericOptim, sgd with momentum_type='sm')",
    moment=SubsetNormMoments(adaptive=False),
    hparams=(LR(1e-3), MOMENTUM, WEIGHT_DECAY(0.0)),
    group_hparams=sm_hparams(),
    projection=SubspaceProjection(),
    residual=SubspaceMomentumResidual(),
    decay_after_update=True,
    validate_group=_check_subspace_group,
)

ADAGRAD_HPARAMS = (LR(1e-3), MOMENTUM, EPS(1e-6), WEIGHT_DECAY(0.0))

ADAGRAD_SN = Recipe(
    name="adagrad_sn",
    summary="AdaGrad-SN: AdaGrad's running sum of squared subset norms (one per row of the longer side), with momentum",
    reference=f"{SN_REFERENCE}, Section 3 (AdaGrad-SN; timmytonga/sn-sm GenericOptim 'adagrad', beta2 = 1)",
    moment=SubsetNormMoments(accumulate=True),
    hparams=(*ADAGRAD_HPARAMS, SUBSET_SIZE),
    group_hparams=(SUBSET_NORM,),
    decay_after_update=True,
)

ADAGRAD_SNSM = Recipe(
    name="adagrad_snsm",
    summary="AdaGrad-SNSM: Subspace-Momentum with AdaGrad's Subset-Norm step size (running sums, no bias correction)",
    reference=f"{SN_REFERENCE}, Sections 3-4 (AdaGradSNSM; timmytonga/sn-sm GenericOptim 'adagrad_snsm')",
    moment=SubsetNormMoments(accumulate=True),
    hparams=ADAGRAD_HPARAMS,
    group_hparams=(*sm_hparams(), SUBSET_NORM),
    projection=SubspaceProjection(),
    combine=SubsetNormStep(ProjectBack(SubspaceMomentumResidual()), accumulate=True),
    decay_after_update=True,
    validate_group=_check_subspace_group,
)


class AdamWSN(LowMemOptimizer):
    """Drop-in for the authors' ``AdamWSN`` (timmytonga/sn-sm ``adamw_sn.py``), on the lowmem engine.

    A parameter group with ``sn=True`` (the authors' key; lowmem's is ``subset_norm``) keeps one
    second moment per row of the longer side of each 2-D parameter; other groups are AdamW with the
    same step: ``eps`` on the raw ``sqrt(v)``, step size ``lr sqrt(1 - b2^t) / (1 - b1^t)``, decoupled
    decay after the update. ``betas=(0, b2)`` keeps no first moment (RMSPropSN).
    ``create_optimizer(model, "adamw_sn")`` builds the groups the authors recommend.

    Args:
        params: Parameters or parameter groups (``sn`` / ``subset_norm`` per group).
        lr (`float`, defaults to `1e-3`): Learning rate (the authors use about 10x Adam's).
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): Moment decay rates.
        eps (`float`, defaults to `1e-6`): Added to ``sqrt(v)`` (before bias correction).
        weight_decay (`float`, defaults to `0.0`): Decoupled, applied after the update.
        correct_bias (`bool`, defaults to `True`): Only ``True`` is supported.
        no_deprecation_warning (`bool`, defaults to `False`): Accepted and ignored.
        subset_size (`int` or `None`, defaults to `None`): ``None``: the authors' rows of the longer side;
            ``k > 0``: contiguous flat subsets of the largest divisor of the size ``<= k``; ``-d``: of about
            ``sqrt(size) / d`` (the authors' ``adamw_sng.py`` and pytorch_optimizer's partition).
        state_dtype (`str`, defaults to `"float32"`): Storage of the moments.
        foreach (`bool` or `None`, defaults to `None`): ``False`` steps every parameter one at a time
            instead of in multi-tensor buckets (float32 parameters and state).
    """

    recipe = ADAMW_SN

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True,
                 no_deprecation_warning: bool = False, *, subset_size: int | None = None, state_dtype: str = "float32",
                 foreach: bool | None = None):
        if not correct_bias:
            raise ValueError("correct_bias=False is not supported; valid: correct_bias=True")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, subset_size=subset_size,
                         state_dtype=state_dtype, foreach=foreach)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "sn" in param_group:  # the authors' name for subset_norm
            if "subset_norm" in param_group:
                raise ValueError("give either 'sn' (the authors' key) or 'subset_norm', not both")
            param_group = {**{k: v for k, v in param_group.items() if k != "sn"}, "subset_norm": param_group["sn"]}
        super().add_param_group(param_group)


_HEAD = {"output": {"subset_norm": True}}  # the authors apply SN to every nn.Linear, the head included
register(ADAMW_SN, AdamWSN, batched_targets=True, state_precision="fp32", second_moment="blockwise", target_key="subset_norm",
         embedding_groups=_HEAD, example_hparams={"lr": 1e-2})
register(ADAMW_SNSM, batched_targets=True, state_precision="fp32", second_moment="blockwise", embedding_groups=_HEAD,
         example_hparams={"rank": 4, "update_proj_gap": 5, "lr": 1e-2})
register(SGD_SM, batched_targets=True, state_precision="fp32", second_moment="none", example_hparams={"rank": 4, "update_proj_gap": 5, "lr": 1e-1})
register(ADAGRAD_SN, batched_targets=True, state_precision="fp32", second_moment="blockwise", target_key="subset_norm", embedding_groups=_HEAD,
         example_hparams={"lr": 3e-2})
register(ADAGRAD_SNSM, batched_targets=True, state_precision="fp32", second_moment="blockwise", embedding_groups=_HEAD,
         example_hparams={"rank": 4, "update_proj_gap": 5, "lr": 3e-2})

__all__ = ["ADAGRAD_SN", "ADAGRAD_SNSM", "ADAMW_SN", "ADAMW_SNSM", "SGD_SM", "AdamWSN", "SubspaceMomentumResidual",
           "SubsetNormMoments", "SubsetNormStep"]
