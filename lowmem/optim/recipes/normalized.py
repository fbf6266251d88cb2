"""Normalized-update recipes: Muon, SCALE and SinkGD (hybrids with AdamW).

Each normalizes the update of the 2-D hidden weights instead of keeping Adam's second moment, and
trains every other parameter (embeddings, output head, norms, biases) with AdamW, in the same
optimizer:

* ``muon`` - Muon (Jordan et al. 2024): Nesterov momentum orthogonalised by a Newton-Schulz
  iteration in bfloat16, equal to ``torch.optim.Muon`` on the 2-D weights; 4 bytes/param there.
* ``scale`` - SCALE (Glentis et al. 2025): column-normalised SGD, momentum only on the output
  layer; no state on the hidden weights.
* ``sinkgd`` - SinkGD (Scetbon et al. 2025): SR-Sinkhorn row/column multi-normalisation, no state
  on the hidden weights.

One moment rule per recipe dispatches per parameter on a parameter-group key (``use_muon``,
``scale_role``, ``use_sinkgd``): :func:`~lowmem.optim.create_optimizer` puts the 2-D weights of
the projection layers (``target_modules``; default all but the output head) in a group carrying
it, everything else in groups without it (AdamW moments). A flat parameter list is one targeted
group: its 2-D parameters are normalized, the others get AdamW.

Every rule returns the lr-scaled step (``applies_lr``): the shape-based learning-rate factors
(Muon's ``adjust_lr_fn``, SinkGD's ``scale``) multiply the step, while decoupled weight decay is
``lr * weight_decay`` with the group's ``lr`` on the normalized weights (as in ``torch.optim.Muon``).
The AdamW parameters step and decay with their own learning rate, ``lr * adamw_lr_ratio``
(:meth:`HybridMoments.weight_decay_for`: ``p *= 1 - lr * adamw_lr_ratio * weight_decay``), as the
authors' code does: SCALE's (OptimAI-Lab/Minimalist_LLM_Pretraining, ``mem_eff_pt/pt_scale/scale_optimizer.py``
at f5bd4e7, lines 136-139 and 167: ``lr = (adam_lr / max_lr) * lr; p.data.mul_(1 - lr * weight_decay)``) and
Keller Jordan's ``MuonWithAuxAdam`` (KellerJordan/Muon ``muon.py`` at 857d1ad, lines 222-223: an Adam
group decays with its own ``lr``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from ..._warn import warn_user
from .. import functional as F
from ..engine import LowMemOptimizer, Recipe
from ..functional.galore import blas_device
from ..functional.adam import float32_copies
from ..functional.muon import (ADJUST_LR_FNS, NS_COEFFICIENTS, matrices, matrix_index, muon_foreach_, muon_matrices,
                              muon_matrix_shape,
                              bf16_gemm_workspace_bytes, muon_foreach_direction, muon_foreach_iterate,
                              muon_foreach_transient_bytes, muon_lr_ratio, muon_momentum_, muon_whole_step_bytes, newton_schulz,
                              newton_schulz_,
                              newton_schulz_transient_bytes, ns_column_block_numel, ns_rows, ns_shape, row_block_spans)
from ..functional.scale import (add_squares_, column_normalize, column_rms, column_rms_bytes, flat_chunks_bytes,
                                last_layer_momentum_, normalize_flat, rms_from_squares_, scale_rows_direction,
                                scale_rows_foreach_)
from ..functional.sinkgd import (sinkgd_foreach_, sinkgd_foreach_bytes, sinkgd_foreach_direction, sinkhorn_scalings, sinkhorn_scalings_bytes, sr_sinkhorn,
                                 sr_sinkhorn_bytes)
from ..hparams import BETAS, EPS, LR, WEIGHT_DECAY, HParam, in_unit_interval, is_bool, nonneg, one_of, positive, positive_int
from ..moments import (AdamMoments, ChunkState, MomentRule, grad_element_bytes, sharded_group, state_dtype,
                       step_whole_from_piece_)
from ..registry import register, takes_the_default
from ..sharded import local


def flat_as_targeted(params: Iterable[Any], key: str, value: Any) -> list[Any]:
    """Parameters given to :class:`Muon`, :class:`SinkGD` or :class:`Scale` with the recipe's documented
    default for its key (``use_muon=True``, ``use_sinkgd=True``, ``scale_role="hidden"``), as
    :func:`~lowmem.optim.create_optimizer` gives it (``registry._apply_group_defaults``) and as
    ``torch.optim.Muon`` treats its parameters: a flat list is one group carrying it; parameter groups
    (dicts) none of which has the key each take it; when some group has the key (set either way), the
    groups without it take AdamW (galore-torch's rule for ``rank``). Before, groups none of which had the key
    trained every parameter with AdamW after a warning, while ``create_optimizer`` targeted them."""
    params = list(params)
    if not params:
        return params
    if isinstance(params[0], dict):
        if any(key in g for g in params):
            return params
        return [{**g, key: value} for g in params]
    return [{"params": params, key: value}]


class DefaultTargetGroups:
    """Mixin of :class:`Muon`, :class:`SinkGD` and :class:`Scale`: a parameter group added later
    (``add_param_group``, e.g. layers unfrozen during training) without the key takes the default the groups
    given at construction took (``target_default``, set when they took it: a flat list, or groups none of
    which had the key; ``create_optimizer`` sets it the same way), as ``torch.optim.Muon`` steps every group it
    is given. When some group set the key itself, a group without it stays untargeted (AdamW), the rule of
    :func:`flat_as_targeted`. Before 2026-11-30 an added group always took AdamW."""

    target_default: dict[str, Any] | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        default = self.target_default
        if isinstance(param_group, dict) and self.__dict__.get("_built"):  # (SILENT 13: the caller's own key, checked
            from ..registry import refuse_vector_only_targets  # before the default is merged in)

            for key in {h.name for h in self.recipe.group_hparams} & {"use_muon", "use_sinkgd"}:
                param_group = refuse_vector_only_targets([param_group], key, first=len(self.param_groups))[0]
        if default is not None and isinstance(param_group, dict) and not set(default) & set(param_group):
            param_group = {**param_group, **default}
        super().add_param_group(param_group)  # type: ignore[misc]


_NO_CLASS = object()  # (HybridMoments.foreach_bucket_transient_bytes not told its bucket's class)


#: ``weight_layout`` of a targeted group: how its 2-D weights are stored. ``"out_in"`` (the default): ``[out, in]``,
#: nn.Linear's layout, rows are output neurons; ``"in_out"``: ``[in, out]``, transformers' ``Conv1D`` (GPT-2 family).
#: :func:`~lowmem.optim.create_optimizer` (model) puts the ``Conv1D`` weights of muon, normuon and scale in a group of
#: their own with ``"in_out"``; the rules that depend on which side is the output (Muon's ``adjust_lr_fn="original"``
#: ratio ``sqrt(max(1, out / in))``, NorMuon's per-output-neuron second moment, SCALE's per-output-unit normalization)
#: read it, so such a weight steps as the transposed nn.Linear weight would (tests/test_conv1d_layout21.py).
WEIGHT_LAYOUTS = ("out_in", "in_out")


def in_out(group: dict[str, Any], shape: Any = None) -> bool:
    """Whether ``group``'s weights are stored ``[in, out]`` (``weight_layout="in_out"``). A value other than
    :data:`WEIGHT_LAYOUTS` is refused, and so is ``"in_out"`` on a target of other than 2 dimensions (``shape``: a
    ``Conv1D`` weight is a matrix; a batch of matrices ``[E, A, B]`` is read as ``E`` matrices ``[out, in]``)."""
    v = group.get("weight_layout", "out_in")
    if v not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout must be one of {list(WEIGHT_LAYOUTS)}, got {v!r}")
    if v == "in_out" and shape is not None and len(shape) != 2:
        raise ValueError(f"weight_layout='in_out' applies to 2-D weights (transformers' Conv1D, [in, out]); a parameter"
                         f" of shape {list(shape)} is in the group")
    return v == "in_out"


def semantic_shape(shape: Any, group: dict[str, Any]) -> tuple[int, int]:
    """The ``(out, in)`` of a 2-D weight of stored ``shape`` in ``group`` (:func:`in_out`: swapped for ``[in, out]``)."""
    a, b = shape[-2], shape[-1]
    return (b, a) if in_out(group) else (a, b)


def layout_lr_ratio(shape: Any, group: dict[str, Any]) -> float:
    """Muon's shape-based step factor (:func:`~lowmem.optim.functional.muon.muon_lr_ratio`) of the ``(out, in)`` a
    weight of stored ``shape`` has in ``group`` (:func:`semantic_shape`): ``"original"``'s ``sqrt(max(1, out / in))``
    by the output side, not by the stored rows."""
    return muon_lr_ratio(semantic_shape(shape, group), group["adjust_lr_fn"])


class HybridMoments(MomentRule):
    """Base class: a normalized rule for the targeted parameters of a group, AdamW for the rest.

    Subclasses say which parameters they target (:meth:`targets`, from the group and the shape)
    and implement the ``target_*`` methods; everything else is delegated to :class:`AdamMoments`,
    whose step and decoupled weight decay are scaled by ``lr``, times the group's ``adamw_lr_ratio`` for
    recipes that have it (``lr_ratio_key``; :meth:`weight_decay_for`).
    Which rule a parameter's state belongs to is read back from its state (``exp_avg`` present:
    AdamW), so a chunk's view and a loaded checkpoint dispatch the same way.
    """

    applies_lr = True
    target_keys: tuple[str, ...] = ()
    lr_ratio_key: str | None = "adamw_lr_ratio"  # the hyperparameter scaling the AdamW parameters' lr

    def __init__(self, eps_placement: str = "torch"):
        self.adam = AdamMoments(eps_placement=eps_placement)
        self.state_keys = (*self.target_keys, *self.adam.state_keys)

    def targets(self, shape: torch.Size, group: dict[str, Any]) -> bool:
        raise NotImplementedError

    # ---- the target rule (subclasses) ----

    def target_init_state(self, state, shape, group, param) -> None:
        """Allocate the target rule's state (default: none, a stateless rule)."""

    def target_direction(self, g: Tensor, state, group, t, lr) -> Tensor:
        raise NotImplementedError

    def target_transient_bytes(self, numel: int, shape: torch.Size, group, state) -> int:
        raise NotImplementedError

    def target_chunk_align(self, shape: torch.Size, group, state) -> int | None:
        """Elements a chunk of a target must be a multiple of; ``None`` (default): stepped whole."""
        return None

    def target_chunk_state(self, state, start, stop, shape, group) -> ChunkState:
        raise NotImplementedError(f"{type(self).__name__} has no chunked form")

    # ---- dispatch ----

    @staticmethod
    def _is_adam(state: dict[str, Tensor]) -> bool:
        return "exp_avg" in state

    def init_state(self, state, shape, group, param):
        if self.targets(shape, group):
            self.target_init_state(state, shape, group, param)
        else:
            self.adam.init_state(state, shape, group, param)

    def direction(self, g, state, group, t, lr):
        if isinstance(state, ChunkState) and state.extra.get("sharded_step") is not None:
            return state.extra["sharded_step"].reshape(-1)[state.start : state.stop].clone()
        if self._is_adam(state):
            return self.adam.direction(g, state, group, t, lr).mul_(lr * self._adam_ratio(group))
        return self.target_direction(g, state, group, t, lr)

    def _adam_ratio(self, group: dict[str, Any]) -> float:
        """The AdamW parameters' learning rate over the group's: ``adamw_lr_ratio`` (1 without it)."""
        return group[self.lr_ratio_key] if self.lr_ratio_key is not None else 1.0

    def weight_decay_for(self, group, state):
        """The decoupled weight decay coefficient the engine multiplies by the group's ``lr``: the
        AdamW parameters (``exp_avg`` in the state) decay with their own step size,
        ``lr * adamw_lr_ratio * weight_decay`` (the authors' AdamW learning rate, module docstring);
        the targets with ``lr * weight_decay``."""
        wd = group.get("weight_decay", 0.0)
        return wd * self._adam_ratio(group) if self._is_adam(state) else wd

    def supports_foreach_for(self, shape, group, state):
        """The AdamW parameters (state with ``exp_avg``, or before the first step: not targeted) take
        the engine's foreach buckets (:meth:`foreach_step_`); the targeted ones do where the target
        rule has a multi-tensor step (:meth:`target_supports_foreach`)."""
        if self._is_adam(state) if state else not self.targets(shape, group):
            return True
        return self.target_supports_foreach(shape, group)

    def foreach_bucket_class(self, shape, group, state):
        """The targets fill buckets of their own shape (their multi-tensor step stacks the targets of one
        shape: one stack per bucket, as large as the chunk allows); the AdamW parameters share theirs
        (``None``: element-wise, any shapes)."""
        targeted = not self._is_adam(state) if state else self.targets(shape, group)
        return ("target", tuple(shape)) if targeted else None

    def steps_pieces_whole(self, shape, group, state):
        """A target in pieces is stepped whole from its first one (:meth:`_whole_by_shape`); the AdamW
        parameters' pieces are element-wise."""
        return not self._is_adam(state) if state else self.targets(shape, group)

    def target_supports_foreach(self, shape: torch.Size, group: dict[str, Any]) -> bool:
        """Whether a float32 target of ``shape`` in ``group`` takes the engine's foreach buckets
        (:meth:`target_foreach_step_`). Default: no, each is stepped alone."""
        return False

    def target_foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """The targets' whole step for the targets of a bucket (float32; a tensor larger than the
        engine's ``chunk_numel`` arrives as flat pieces, :meth:`target_chunk_state`)."""
        raise NotImplementedError(f"{type(self).__name__} has no multi-tensor step of its targets")

    def target_foreach_transient_bytes(self, numel: int) -> int:
        """Bytes :meth:`target_foreach_step_` allocates for a bucket of ``numel`` elements. Default: 0."""
        return 0

    def _whole_by_shape(self, params, grads, states, group, t, lr) -> dict[tuple[int, ...], list[int]]:
        """The targets of a bucket by shape (indices), after stepping each target that came in flat
        pieces (larger than the engine's ``chunk_numel``; :meth:`target_chunk_state` records its state
        and shape) whole from its first piece with the rule's chunked step, as ``foreach=False`` steps
        it (:func:`~lowmem.optim.moments.step_whole_from_piece_`; the transient is its own, which the
        engine reports)."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(states):
            if isinstance(s, ChunkState):
                if s.start == 0:
                    step_whole_from_piece_(self, params[i], grads[i], s, group, t, lr, decay_after=False)
                continue
            by_shape.setdefault(tuple(params[i].shape), []).append(i)
        return by_shape

    def foreach_transient_bytes(self, numel):
        """A bucket's AdamW parameters (``sqrt(v)``: ``4 numel``), then its targets (their own
        bound): one after the other, so the larger."""
        return max(4 * numel, self.target_foreach_transient_bytes(numel))

    #: the engine hands :meth:`foreach_bucket_transient_bytes` each bucket's class (:meth:`foreach_bucket_class`)
    foreach_counts_class = True
    #: and the elements of each bucket's non-contiguous members (``outside``), which torch's fused AdamW kernel
    #: leaves to the multi-tensor operations (:meth:`~lowmem.optim.moments.AdamMoments.foreach_bucket_transient_bytes`;
    #: the engine then also counts the kernel's step-count tensor, ``_fused_step_bytes``)
    foreach_counts_outside = True
    #: torch's fused kernel (its step-count tensor, the engine's ``_fused_step_bytes``) steps only the buckets of
    #: AdamW parameters (class ``None``) on the multi-tensor path, not the targets' nor a bfloat16 parameter's step
    fused_kernel_buckets_only = True

    def foreach_bucket_transient_bytes(self, numel, members, group=None, bucket_class=_NO_CLASS, outside=None):
        """A bucket of targets (``bucket_class`` ``("target", shape)``: every member a whole target of that shape,
        :meth:`foreach_bucket_class`) allocates :meth:`target_foreach_bucket_transient_bytes`; a bucket of AdamW
        parameters (``bucket_class`` ``None``), which :meth:`foreach_step_` steps with
        :func:`~lowmem.optim.functional.adamw_foreach_` alone, AdamW's own count
        (:meth:`~lowmem.optim.moments.AdamMoments.foreach_bucket_transient_bytes`: nothing where torch's fused kernel
        steps it, else ``sqrt(v)`` of the ``outside`` elements, or of all of them when ``outside`` is not told); a
        bucket whose class is not told: :meth:`foreach_transient_bytes`, the bound of both. (Before 2026-11-30 an
        AdamW bucket was counted at the targets' bound too: Muon's 6 B per element, for a tiny Qwen2's embedding
        and head 393,216 B where the step allocated nothing.)"""
        if bucket_class is None:
            return self.adam.foreach_bucket_transient_bytes(numel, members, group, outside=numel if outside is None
                                                            else outside)
        if bucket_class is _NO_CLASS or group is None:
            return self.foreach_transient_bytes(numel)
        return self.target_foreach_bucket_transient_bytes(numel, torch.Size(bucket_class[1]), group)

    def target_foreach_bucket_transient_bytes(self, numel: int, shape: torch.Size, group: dict[str, Any] | None) -> int:
        """Bytes :meth:`target_foreach_step_` allocates for a bucket of ``numel`` elements of targets of
        ``shape`` (``numel / prod(shape)`` of them). Default: :meth:`target_foreach_transient_bytes`."""
        return self.target_foreach_transient_bytes(numel)

    def whole_transient_bytes(self, shape, group, state):
        """The transient of a parameter stepped whole (``chunk_numel=None``, or a tensor the engine does not
        chunk; its :meth:`direction` sees the whole tensor, no :class:`ChunkState`): the AdamW parameters'
        :meth:`transient_bytes`, the targets' :meth:`target_whole_transient_bytes` (the engine asks for it
        instead of ``transient_bytes(numel=prod(shape))``, which is also a single chunk's)."""
        numel = math.prod(shape)
        if self._is_adam(state):
            return self.adam.transient_bytes(numel, shape, group, state)
        return self.target_whole_transient_bytes(shape, group, state)

    def target_whole_transient_bytes(self, shape: torch.Size, group: dict[str, Any], state) -> int:
        """A target's whole step. Default: :meth:`target_transient_bytes` of all of it."""
        return self.target_transient_bytes(math.prod(shape), shape, group, state)

    def foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """A bucket's whole step: the AdamW parameters first, with the same math as :meth:`direction`
        and :meth:`weight_decay_for` (this rule's eps placement; a step and a decoupled decay of
        ``lr * adamw_lr_ratio``), one kernel per operation (torch's fused kernel where it fits); then
        the targets (:meth:`target_foreach_step_`)."""
        adam = [i for i, s in enumerate(states) if self._is_adam(s)]
        if adam:
            beta1, beta2 = group["betas"]
            F.adamw_foreach_(
                [params[i] for i in adam], [grads[i] for i in adam], [states[i]["exp_avg"] for i in adam],
                [states[i]["exp_avg_sq"] for i in adam], t, beta1, beta2, lr * self._adam_ratio(group),
                group.get("weight_decay", 0.0), group["eps"], eps_placement=self.adam.eps_placement,
            )
        if len(adam) < len(states):
            rest = [i for i, s in enumerate(states) if not self._is_adam(s)]
            self.target_foreach_step_([params[i] for i in rest], [grads[i] for i in rest], [states[i] for i in rest],
                                      group, t, lr)

    # ---- bfloat16 parameters in the multi-tensor buckets (the engine's _step_bf16_bucket; issue 15) ----

    #: the state dtypes :meth:`bf16_bucket_direction` takes: the AdamW moments' and the targets' buffers, float32 or
    #: bfloat16 (computed in float32 copies and stored rounded, as the per-parameter step)
    bf16_bucket_state_dtypes = (torch.float32, torch.bfloat16)
    #: the engine tells :meth:`bf16_bucket_transient_bytes` each bucket's class (AdamW's or the targets' of a shape)
    bf16_bucket_counts_class = True

    def bf16_bucket_takes(self, p: Tensor, group: dict[str, Any]) -> bool:
        """A bfloat16 AdamW parameter joins the buckets (any shape; in pieces too, element-wise:
        :meth:`bf16_bucket_pieces_elementwise`); a bfloat16 target where the target rule has a bucket direction
        (:meth:`target_bf16_bucket_direction`) and it is a 2-D weight or a contiguous batch of matrices ``[E, A, B]``
        (fused MoE experts: its matrices stacked as 2-D weights, as in the float32 buckets) no larger than a bucket (a
        weight in pieces and one of more dimensions: the per-parameter step, as before)."""
        if not self.targets(p.shape, group):
            return True
        return ((p.dim() == 2 or (p.dim() == 3 and p.is_contiguous()))
                and type(self).target_bf16_bucket_direction is not HybridMoments.target_bf16_bucket_direction)

    def bf16_bucket_pieces_elementwise(self, shape: torch.Size, group: dict[str, Any]) -> bool:
        """Whether a bfloat16 parameter larger than ``chunk_numel`` joins the buckets in pieces: the AdamW ones
        (element-wise: an embedding, a head), not the targets (stepped whole: alone)."""
        return not self.targets(shape, group)

    def bf16_bucket_direction(self, g32s: list[Tensor], states: list[dict[str, Tensor]], group: dict[str, Any],
                              t: float, lr: Any) -> list[Tensor]:
        """The float32 directions of a bucket of bfloat16 parameters (their gradients' float32 copies ``g32s``,
        emptied), the per-parameter step's (:meth:`direction`) bit for bit on the CPU; the engine then decays and
        steps the parameters' float32 copies and writes them back. A bucket holds one class
        (:meth:`foreach_bucket_class`): AdamW parameters, :meth:`~lowmem.optim.moments.AdamMoments.bf16_bucket_direction`
        times ``lr * adamw_lr_ratio`` (:meth:`direction`'s scaling); targets of one shape,
        :meth:`target_bf16_bucket_direction`. Allocates :meth:`bf16_bucket_transient_bytes`."""
        adam = {self._is_adam(s) for s in states}
        if len(adam) != 1:
            raise ValueError(f"{type(self).__name__}.bf16_bucket_direction: a bucket holds AdamW parameters or targets,"
                             " not both")
        if adam.pop():
            ds = self.adam.bf16_bucket_direction(g32s, states, group, t, lr)
            torch._foreach_mul_(ds, lr * self._adam_ratio(group))
            return ds
        shapes = {tuple(g.shape) for g in g32s}
        if len(shapes) != 1 or len(next(iter(shapes))) not in (2, 3):
            raise ValueError(f"{type(self).__name__}.bf16_bucket_direction: a bucket of targets holds 2-D weights"
                             f" (or batches [E, A, B]) of one shape, got {sorted(shapes)}")
        return self.target_bf16_bucket_direction(g32s, states, group, t, lr)

    def target_bf16_bucket_direction(self, g32s: list[Tensor], states: list[dict[str, Tensor]],
                                     group: dict[str, Any], t: float, lr: Any) -> list[Tensor]:
        """The float32 directions of ``k`` bfloat16 targets of one shape (2-D, or batches ``[E, A, B]``; ``g32s`` their
        gradients' float32 copies, emptied once read): :meth:`direction`'s, with ``lr`` applied. Default: none (each
        stepped alone)."""
        raise NotImplementedError(f"{type(self).__name__} has no bucket direction of bfloat16 targets")

    @staticmethod
    def _members_of(d: Tensor, shape: tuple[int, ...], transposed: bool = False) -> list[Tensor]:
        """The directions of a bucket's members of ``shape`` (``[A, B]`` or ``[E, A, B]``) from the stack ``d`` of their
        matrices, in order (``E`` per member): views; ``transposed``: the stack holds each matrix's transpose (Muon's
        iterate of a tall matrix, :func:`~lowmem.optim.functional.muon.ns_shape`)."""
        per = math.prod(shape[:-2])
        out = []
        for i in range(d.size(0) // max(per, 1)):
            blk = d[i * per : (i + 1) * per]
            out.append((blk.mT if transposed else blk).view(shape))
        return out

    def bf16_bucket_transient_bytes(self, numel: int, states: list[dict[str, Tensor]], members=None, group=None,
                                    bucket_class=_NO_CLASS) -> int:
        """What :meth:`bf16_bucket_direction` allocates for a bucket of ``numel`` elements, the gradients' float32
        copies included: an AdamW bucket (``bucket_class`` ``None``) AdamW's
        (:meth:`~lowmem.optim.moments.AdamMoments.bf16_bucket_transient_bytes`: its scaling is in place); a bucket
        of targets (``("target", shape)``) :meth:`target_bf16_bucket_transient_bytes`. The engine tells the class
        (``foreach_counts_class``); without it the states say it (an AdamW state has ``exp_avg``)."""
        if bucket_class is _NO_CLASS:
            if states and all(self._is_adam(s) for s in states):
                bucket_class = None
            else:
                raise TypeError(f"{type(self).__name__}.bf16_bucket_transient_bytes needs bucket_class= for a bucket"
                                " of targets")
        if bucket_class is None:
            return self.adam.bf16_bucket_transient_bytes(numel, states)
        return self.target_bf16_bucket_transient_bytes(numel, torch.Size(bucket_class[1]), states, group)

    def target_bf16_bucket_transient_bytes(self, numel: int, shape: torch.Size, states: list[dict[str, Tensor]],
                                           group: dict[str, Any]) -> int:
        """What :meth:`target_bf16_bucket_direction` allocates for ``numel / prod(shape)`` targets of ``shape``."""
        raise NotImplementedError(f"{type(self).__name__} has no bucket direction of bfloat16 targets")

    @staticmethod
    def _low_buffers(states: list[dict[str, Tensor]], group: dict[str, Any], key: str = "momentum_buffer") -> bool:
        """Whether the targets' ``key`` buffers are stored in bfloat16 (their state's, or before the first step the
        group's ``state_dtype``); one dtype for a bucket, else an error."""
        dtypes = {s[key].dtype for s in states if key in s}
        if not dtypes:
            return group is not None and group.get("state_dtype", "float32") == "bfloat16"
        if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.bfloat16}:
            raise ValueError(f"a bucket of bfloat16 targets with {key} of dtypes {sorted(map(str, dtypes))}:"
                             " all float32 or all bfloat16")
        return dtypes == {torch.bfloat16}

    def chunk_align(self, shape, group, state):
        return 1 if self._is_adam(state) else self.target_chunk_align(shape, group, state)  # AdamW: element-wise

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        if self._is_adam(state):
            return self.adam.chunk_state(state, start, stop, shape, group, ctx)
        if ctx is not None:  # FSDP2: the shard's whole step, computed by prepare_chunks (sharded_stats)
            return ChunkState(state, start, stop, {"sharded_step": ctx})
        return self.target_chunk_state(state, start, stop, shape, group)

    def transient_bytes(self, numel, shape, group, state):
        if self._is_adam(state):
            return self.adam.transient_bytes(numel, shape, group, state)  # the lr scaling is in place
        return self.target_transient_bytes(numel, shape, group, state)


# ---- Muon ------------------------------------------------------------------------------------


class MuonMoments(HybridMoments):
    """Muon on the 2-D parameters of groups with ``use_muon=True``; AdamW (torch's eps placement)
    on the others. State: ``momentum_buffer`` (one tensor of the weight's shape) for Muon.

    A 3-D parameter in such a group (a fused MoE expert weight ``[E, A, B]``)
    is a batch of matrices over its last two dimensions: each ``A x B`` matrix gets exactly the step of a
    2-D parameter of its own (its slice of the momentum, its own Newton-Schulz iteration, the ratio of
    ``adjust_lr_fn`` from ``A x B``), as ``E`` separate parameters would (Liu et al. 2025 apply Muon per
    matrix). A 4-D parameter is a convolution kernel ``[out, in, kh, kw]``, stepped in every path as the one
    matrix ``[out, in kh kw]`` (:func:`~lowmem.optim.functional.muon.muon_matrix_shape`, Keller Jordan's rule; its
    ratio from those rows and columns; its momentum buffer keeps the kernel's shape); 5 or more dimensions are
    refused (:func:`check_muon_group`). Chunked: blocks of whole rows of the ``[-1, B]`` view, each matrix's iterate computed when its
    first row is reached (:meth:`_batched_rows`), one matrix's iterate alive at a time; whole: one matrix
    after the other; foreach buckets: the matrices stacked with the 2-D ones of their shape.

    Chunked (the engine's default): the lean step of :meth:`prepare_chunks` (momentum and the
    bfloat16 cast a block of rows at a time, Newton-Schulz in place on one bfloat16 matrix,
    :func:`~lowmem.optim.functional.muon.newton_schulz_`), then each block of rows' step; the same
    numbers as the whole-tensor step (``chunk_numel=None``: :func:`~lowmem.optim.functional.muon.newton_schulz`,
    the reference), with about half its memory."""

    target_keys = ("momentum_buffer",)

    #: the chunked step's transient counts the float32 copies of a low-precision parameter's chunks itself
    #: (:meth:`transient_bytes` with ``copy=4``; the engine's ``_param_transient_bytes`` adds none then): every chunked
    #: direction is a new tensor holding no reference to the gradient chunk (AdamW's; a block of rows read from the
    #: iterate, :meth:`target_direction`; a batch's rows, :meth:`_batched_rows`), so the gradient chunk's copy is freed
    #: before the parameter chunk's is made (what ``chunk_direction_is_new`` says for SinkGD and SCALE), the lean
    #: step's Newton-Schulz phase holds no gradient chunk, and a batch's iterate is computed inside the direction,
    #: beside the block's gradient copy, with copies of its own rows. (Before 2026-11-30 two copies were counted in
    #: every phase: a bfloat16 tiny Qwen2's embedding chunk 393,216 B reported for 262,144 traced;
    #: ``chunk_direction_is_new`` alone would under-report a bfloat16 batch of matrices, 11,840 B for 14,400 traced.)
    chunk_counts_copies = True

    def transient_bytes(self, numel, shape, group, state, copy: int = 0):
        """The chunked step of ``numel`` elements, with ``copy`` bytes per element of the float32 copies of a
        low-precision parameter's gradient and parameter chunks (``chunk_counts_copies``): an AdamW parameter's
        gradient copy freed when its new direction returns, before the parameter's copy is made (one copy beside
        AdamW's transient); a target's lean step (:meth:`_lean_bytes`: the engine's chunked step of a target is
        always the lean one, a weight of one chunk too)."""
        if self._is_adam(state):
            return copy * numel + self.adam.transient_bytes(numel, shape, group, state)
        return self._lean_bytes(numel, shape, group, state, copy)

    def targets(self, shape, group):
        """The 2-D parameters of a ``use_muon`` group, and those of more dimensions (batches of matrices over
        the last two; in FSDP2 groups stepped by the engine one matrix at a time: :meth:`per_matrix`)."""
        return bool(group.get("use_muon")) and len(shape) >= 2

    def per_matrix(self, shape, group):
        """A batch of matrices ``[E, A, B]`` of an FSDP2 group (fused MoE experts): stepped by the engine as
        separate ``A x B`` parameters, each rank its shard's whole matrices (FSDP2's ``Shard(0)``; no communication:
        :meth:`~lowmem.optim.engine.LowMemOptimizer._local_matrices`), their state stacked, equal to one process's
        batched step (each matrix's Newton-Schulz on its own). Unsharded groups step the batch themselves. Not a
        conv kernel (one matrix ``[out, in kh kw]``: a shard of it is refused, ``sharded.refusal``)."""
        return len(shape) == 3 and self.targets(shape, group) and sharded_group(group)

    def target_init_state(self, state, shape, group, param):
        in_out(group, shape)  # (a weight_layout other than 2-D 'in_out' / 'out_in' refused before any state)
        state["momentum_buffer"] = torch.zeros(shape, dtype=state_dtype(group, param), device=param.device)

    def target_chunk_align(self, shape, group, state):
        # blocks of whole rows (the iteration itself runs on the whole matrix in prepare_chunks); a conv kernel's rows
        # are those of its matrix [out, in kh kw] (muon_matrix_shape)
        return muon_matrix_shape(shape)[-1]

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        if self._is_adam(state) or not isinstance(ctx, dict):  # AdamW, or an FSDP2 shard's step (a tensor)
            return super().chunk_state(state, start, stop, shape, group, ctx)
        n = muon_matrix_shape(shape)[-1]
        return ChunkState(state, start, stop, {"muon": ctx, "rows": (start // n, stop // n)})

    def target_chunk_state(self, state, start, stop, shape, group):
        """A flat piece of a weight larger than ``chunk_numel`` in a foreach bucket (the engine's
        pieces carry no context): the weight is stepped whole from its first piece."""
        return ChunkState(state, start, stop, {"parent": state, "shape": shape})

    # ---- the multi-tensor step ----

    def target_supports_foreach(self, shape, group):
        """Muon weights take the foreach buckets, except in FSDP2 groups (a shard's step gathers the
        whole matrix, per parameter: :meth:`prepare_chunks`)."""
        return self.targets(shape, group) and not sharded_group(group)

    def target_foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """The Muon weights of a bucket: those of one shape stacked and stepped together
        (:func:`~lowmem.optim.functional.muon.muon_foreach_`: batched Newton-Schulz), one shape at a
        time; a weight larger than the engine's ``chunk_numel`` (in flat pieces) is stepped whole from
        its first piece by the lean per-matrix step (:func:`~lowmem.optim.moments.step_whole_from_piece_`,
        which runs :meth:`prepare_chunks`), as with ``foreach=False``. Equal to the per-parameter step
        bit for bit on the CPU (tests/test_foreach_normalized.py)."""
        for shape, idx in self._whole_by_shape(params, grads, states, group, t, lr).items():
            # a batch of matrices [E, A, B] (fused experts): its A x B matrices, each stepped as a 2-D weight; a conv
            # kernel: whole, one matrix [out, in kh kw] (muon_matrices)
            ps = [m for i in idx for m in muon_matrices(params[i])]
            gs = [m for i in idx for m in muon_matrices(grads[i])]
            bs = [m for i in idx for m in muon_matrices(states[i]["momentum_buffer"])]
            mat = muon_matrix_shape(shape)[-2:]
            muon_foreach_(ps, gs, bs, mat, group["momentum"], group["nesterov"], group["ns_coefficients"],
                          group["ns_steps"], group["ns_eps"], lr, group.get("weight_decay", 0.0),
                          lr * layout_lr_ratio(mat, group))

    def target_foreach_transient_bytes(self, numel):
        """:func:`~lowmem.optim.functional.muon.muon_foreach_transient_bytes` of the bucket, with the
        workspace of every CPU thread (the device is not known here: an upper bound elsewhere)."""
        return muon_foreach_transient_bytes(numel, threads=torch.get_num_threads())

    def target_bf16_bucket_direction(self, g32s, states, group, t, lr):
        """The float32 steps of ``k`` bfloat16 Muon weights of one shape: the momentum on the buffers (their float32
        copies when stored in bfloat16, written back rounded, ``U`` from the unrounded copies: the per-parameter
        step's ``rows.to(float32)``) and the bfloat16 stack of ``U``
        (:func:`~lowmem.optim.functional.muon.muon_foreach_iterate`), then the batched iteration and
        ``O.to(float32) * lr * ratio`` (:meth:`_bf16_stack_direction`); views of one float32 stack in the weights'
        layout. Allocates :meth:`target_bf16_bucket_transient_bytes`."""
        shape = tuple(g32s[0].shape)
        mat = shape[-2:]  # (a batch [E, A, B]: its matrices stacked as 2-D weights)
        gs = [x for g in g32s for x in matrices(g)]
        g32s.clear()
        bufs = [x for s in states for x in matrices(s["momentum_buffer"])]
        low = self._low_buffers(states, group)
        b32s = float32_copies(bufs) if low else bufs
        stack = [muon_foreach_iterate(gs, b32s, mat, group["momentum"], group["nesterov"], overwrite_grads=True)]
        del gs
        if low:
            torch._foreach_copy_(bufs, b32s)
        del b32s, bufs
        d = self._bf16_stack_direction(stack, states, shape, group, lr)
        return self._members_of(d, shape, transposed=mat[0] > mat[1])

    def _bf16_stack_direction(self, stack: list[Tensor], states, shape: tuple[int, ...], group, lr) -> Tensor:
        """Muon's float32 steps of a stack of iterates (:func:`~lowmem.optim.functional.muon.muon_foreach_direction`;
        the ratio of a matrix's ``A x B``)."""
        return muon_foreach_direction(stack, group["ns_coefficients"], group["ns_steps"], group["ns_eps"],
                                      lr * layout_lr_ratio(shape[-2:], group))

    def target_bf16_bucket_transient_bytes(self, numel, shape, states, group):
        """:meth:`target_bf16_bucket_direction`: the momentum phase, the gradients' float32 copies (``4 numel``,
        overwritten by the Nesterov matrices) beside the buffers' copies (``4 numel``, stored in bfloat16) and the
        bfloat16 stack (``2 numel``); then the iteration and the float32 steps beside the stack
        (:meth:`_bf16_stack_bytes`); plus the products' workspace, as the float32 bucket's. (Before 2026-12-02 the
        Nesterov matrices were new tensors beside the copies: 4 B per element more, llama-368m's Muon step at the
        default chunk 163 MiB instead of 128.)"""
        low = self._low_buffers(states, group)
        body = max((6 + 4 * low) * numel, self._bf16_stack_bytes(numel, shape))
        # (the workspace sized for the step's device, as the per-parameter step's: per CPU thread on the CPU, once
        # elsewhere, and not by the host CPU's vendor for a CUDA step; the buffers' device, else the group's)
        bufs = [s["momentum_buffer"] for s in states if "momentum_buffer" in s]
        params = (group or {}).get("params") or []
        device = bufs[0].device.type if bufs else local(params[0]).device.type if params else "cpu"
        threads = torch.get_num_threads() if device == "cpu" else 1
        with blas_device(device):
            return body + bf16_gemm_workspace_bytes(math.isqrt(numel), threads)

    def _bf16_stack_bytes(self, numel: int, shape: torch.Size) -> int:
        """The iteration and Muon's float32 steps beside the stack (``6 numel``: the float32 bucket's bound)."""
        return 6 * numel

    # FSDP2 (lowmem.optim.sharded): a Muon weight's local shard of rows is stepped whole and
    # prepare_chunks gathers the whole momentum matrix for the Newton-Schulz iteration
    sharded_stats = True

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized, reduce=None):
        """The orthogonalised update before the blocks of rows are stepped.

        Unsharded (``reduce=None``), the lean step: the momentum step and the cast of ``U`` to
        bfloat16 a block of rows at a time, written straight into the iterate (transposed for a tall
        weight, :func:`~lowmem.optim.functional.muon.ns_shape`), then
        :func:`~lowmem.optim.functional.muon.newton_schulz_` in place on it. Returns
        ``{"x": iterate, "scale": lr * ratio}``; each block's step is read from it (:meth:`target_direction`).

        A sharded Muon weight (``reduce``: an FSDP2 shard of rows): the momentum step on the shard,
        then the whole ``U`` (bfloat16, what the iteration starts from) all-gathered from every
        shard, the unsharded Newton-Schulz iteration on it on every rank, and this shard's rows of
        the step, scaled by the whole shape's ratio; so the step equals the unsharded one. Returns
        the shard's step (``None`` for AdamW parameters)."""
        if self._is_adam(state):
            return None
        numel = math.prod(shape)
        if reduce is None and len(shape) == 3:
            return self._batched_prepare(state, shape, group, lr, bounds, stabilized)
        if reduce is None:  # (a conv kernel: its matrix [out, in kh kw], muon_matrix_shape)
            return self._lean_prepare(state, muon_matrix_shape(shape), group, lr, bounds, stabilized)
        g = stabilized(0, numel, ChunkState(state, 0, numel)).view(shape)
        buf = state["momentum_buffer"]
        buf32 = buf if buf.dtype == g.dtype else buf.to(g.dtype)
        u = muon_momentum_(buf32, g, group["momentum"], group["nesterov"])
        if buf32 is not buf:
            buf.copy_(buf32)
        whole = reduce.gather_rows(u.to(torch.bfloat16), reduce.shape[0])
        o = newton_schulz(whole, group["ns_coefficients"], group["ns_steps"], group["ns_eps"])[reduce.rows[0] : reduce.rows[1]]
        return o.to(g.dtype).mul_(lr * layout_lr_ratio(reduce.shape, group))

    def _lean_prepare(self, state, shape, group, lr, bounds, stabilized, buf: Tensor | None = None) -> dict[str, Any]:
        m, n = shape
        # (one matrix of a batch: _matrix_iterate; a conv kernel's buffer as its matrix [out, in kh kw], a view)
        buf = state["momentum_buffer"].view(m, n) if buf is None else buf
        x = torch.empty(ns_shape(shape), dtype=torch.bfloat16, device=buf.device)
        for a, b in bounds:
            r0, r1 = a // n, b // n
            g = stabilized(a, b, ChunkState(state, a, b)).view(r1 - r0, n)
            rows = buf[r0:r1]
            rows32 = rows if rows.dtype == g.dtype else rows.to(g.dtype)
            u = muon_momentum_(rows32, g, group["momentum"], group["nesterov"])
            if rows32 is not rows:
                rows.copy_(rows32)
            ns_rows(x, shape, r0, r1).copy_(u)  # the bfloat16 cast, element-wise as U.to(bfloat16)
            del u, rows32, g
        block = ns_column_block_numel(buf.device, max((b - a for a, b in bounds), default=0))
        newton_schulz_(x, group["ns_coefficients"], group["ns_steps"], group["ns_eps"], column_block_numel=block)
        return {"x": x, "shape": shape, "scale": lr * layout_lr_ratio(shape, group)}

    def _batched_prepare(self, state, shape, group, lr, bounds, stabilized) -> dict[str, Any]:
        """A batch of matrices ``[..., A, B]`` stepped in blocks of whole rows of its ``[-1, B]`` view:
        nothing is computed here; each matrix's iterate is computed when the first of its rows is stepped
        (:meth:`_matrix_iterate`), the one before it dropped, so one matrix's iterate is alive at a time."""
        size = max((b - a for a, b in bounds), default=0)
        return {"batch": tuple(shape[-2:]), "state": state, "group": group, "lr": lr, "stabilized": stabilized,
                "size": size, "index": None, "x": None,
                "scale": lr * layout_lr_ratio(shape[-2:], group)}

    def _matrix_iterate(self, ctx: dict[str, Any], e: int) -> Tensor:
        """The orthogonalised momentum of matrix ``e`` of a batch (bfloat16, in :func:`ns_shape`): the lean
        step of a 2-D weight (:meth:`_lean_prepare`) on its rows, ``size`` elements of them at a time."""
        if ctx["index"] == e:
            return ctx["x"]
        ctx["x"] = ctx["index"] = None  # (the previous matrix's iterate is freed first)
        (m, n), state, group, size = ctx["batch"], ctx["state"], ctx["group"], ctx["size"]
        buf = matrix_index(state["momentum_buffer"], e)
        base, step = e * m * n, max(n, size // n * n)
        ctx["x"] = self._lean_prepare(state, (m, n), group, ctx["lr"], [(a, min(a + step, m * n)) for a in range(0, m * n, step)],
                                      lambda a, b, _: ctx["stabilized"](base + a, base + b, ChunkState(state, base + a, base + b)),
                                      buf=buf)["x"]
        ctx["index"] = e
        return ctx["x"]

    def _batched_rows(self, g: Tensor, ctx: dict[str, Any], r0: int, r1: int) -> Tensor:
        """Rows ``r0:r1`` of the ``[-1, B]`` view of a batch's step: each matrix's rows read from its iterate
        (:meth:`_matrix_iterate`), times its ``lr * ratio``. A block within one matrix is its rows' step, as
        a 2-D weight's lean step returns it; a block over several is filled matrix by matrix."""
        m, n = ctx["batch"]
        if r0 // m == (r1 - 1) // m:  # within one matrix
            o = ns_rows(self._matrix_iterate(ctx, r0 // m), (m, n), r0 % m, r0 % m + r1 - r0)
            return o.to(g.dtype, memory_format=torch.contiguous_format).mul_(ctx["scale"]).view(-1)
        out = None
        r = r0
        while r < r1:
            e = r // m
            stop = min(r1, (e + 1) * m)
            x = self._matrix_iterate(ctx, e)
            if out is None:
                out = torch.empty((r1 - r0, n), dtype=g.dtype, device=g.device)
            out[r - r0 : stop - r0].copy_(ns_rows(x, (m, n), r - e * m, stop - e * m)).mul_(ctx["scale"])
            del x
            r = stop
        return out.view(-1)

    def target_direction(self, g, state, group, t, lr):
        if isinstance(state, ChunkState) and "muon" in state.extra:  # a block of rows of the lean step
            ctx, (r0, r1) = state.extra["muon"], state.extra["rows"]
            if "batch" in ctx:
                return self._batched_rows(g, ctx, r0, r1)
            o = ns_rows(ctx["x"], ctx["shape"], r0, r1)
            return o.to(g.dtype, memory_format=torch.contiguous_format).mul_(ctx["scale"]).view(-1)
        if g.dim() == 3:  # a batch of matrices stepped whole: one matrix after the other
            out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
            buf = state["momentum_buffer"]
            for e in range(math.prod(g.shape[:-2])):
                out_e = matrix_index(out, e)
                out_e.copy_(self._whole_matrix(matrix_index(g, e), matrix_index(buf, e), group, lr))
            return out
        return self._whole_matrix(g, state["momentum_buffer"], group, lr)

    def _whole_matrix(self, g: Tensor, buf: Tensor, group, lr) -> Tensor:
        """The whole-tensor step of one matrix (the reference: :func:`~lowmem.optim.functional.muon.newton_schulz`); a
        conv kernel as its matrix ``[out, in kh kw]`` (the momentum on the kernel, ``U`` in the buffer's layout viewed
        as the matrix, the step viewed back)."""
        buf32 = buf if buf.dtype == g.dtype else buf.to(g.dtype)
        u = muon_momentum_(buf32, g, group["momentum"], group["nesterov"])
        if buf32 is not buf:
            buf.copy_(buf32)
        mat = muon_matrix_shape(g.shape)
        o = newton_schulz(u.reshape(mat), group["ns_coefficients"], group["ns_steps"], group["ns_eps"])
        del u, buf32
        return o.to(g.dtype).mul_(lr * layout_lr_ratio(mat, group)).view(g.shape)

    def target_transient_bytes(self, numel, shape, group, state):
        """A target's step of blocks of ``numel`` elements: the lean step (:meth:`_lean_bytes`); a weight of one chunk
        (``numel`` its size) may be stepped either way (an FSDP2 shard's gathered step, :meth:`sharded_transient_bytes`,
        runs the whole-tensor form): the larger of the lean and :meth:`_whole_matrix_bytes` is reported. The engine's
        chunked step asks :meth:`transient_bytes`, the lean step alone."""
        shape = torch.Size(muon_matrix_shape(shape))  # (a conv kernel: its matrix)
        lean = self._lean_bytes(numel, shape, group, state)
        if len(shape) > 2 or numel < math.prod(shape):
            return lean
        return max(lean, self._whole_matrix_bytes(shape, group, state))

    def _lean_bytes(self, numel, shape, group, state, copy: int = 0) -> int:
        """Chunked (``numel`` a block of rows; the lean step): the bfloat16 iterate (``2 m n``) for the
        whole step, and at most one of: the momentum pass's block of ``U`` (float32, with Nesterov)
        and a low-precision buffer's float32 rows, beside the block's gradient copy; the iteration's ``A`` and
        ``P`` (``4 r^2``, ``r`` the smaller side) or ``P`` and a column block's result (the blocks of
        :func:`~lowmem.optim.functional.muon.ns_column_block_numel`: as large as a block of rows off
        the CPU), with the bfloat16 products' workspace
        (:func:`~lowmem.optim.functional.muon.newton_schulz_transient_bytes`: per CPU thread for a
        buffer on the CPU, once elsewhere), no gradient chunk alive; the block's float32 step beside its gradient
        copy, then beside the parameter's. ``copy``: bytes per element of a low-precision parameter's float32
        chunk copies (4; 0 for float32, ``chunk_counts_copies``). A batch of matrices (more than 2 dimensions):
        :meth:`_batched_transient_bytes`. (Before 2026-11-30 the engine added its gradient copy to every phase, the
        iteration's too: 16,384 B over for a bfloat16 8 x 4096 weight in rows of 4096; and the engine's step of a
        weight of one chunk was reported at the larger of the lean and the whole step: a float32 64 x 96 weight,
        Nesterov, 65,536 B for 36,864 traced.)"""
        shape = torch.Size(muon_matrix_shape(shape))  # (a conv kernel: its matrix [out, in kh kw])
        if len(shape) > 2:
            return self._batched_transient_bytes(numel, shape, group, state, copy)
        total = math.prod(shape)
        buf = state["momentum_buffer"]
        w, low = self._widths(group, buf)
        threads = torch.get_num_threads() if buf.device.type == "cpu" else 1  # CPU GEMMs pack panels per thread
        with blas_device(buf.device.type):  # (a CUDA buffer's workspace does not read the host CPU's vendor)
            ns = newton_schulz_transient_bytes(shape, ns_column_block_numel(buf.device, numel), threads=threads)
        return 2 * total + max(numel * (copy + w * (group["nesterov"] + low)), ns, numel * (copy + w))

    @staticmethod
    def _widths(group, buf: Tensor) -> tuple[int, bool]:
        """The bytes per element of the step's gradient (:func:`~lowmem.optim.moments.grad_element_bytes`: 8 for a
        float64 one, 4 else), which ``U``, the rows' step and the buffer's copy take (``buf.to(g.dtype)``,
        ``o.to(g.dtype)``), and whether the buffer is copied (stored in another dtype: bfloat16, or float32 beside a
        float64 gradient)."""
        w = grad_element_bytes(group, buf)
        return w, buf.element_size() != w

    @staticmethod
    def _whole_matrix_bytes(shape, group, state) -> int:
        """The whole-tensor step of one ``m x n`` matrix (:meth:`_whole_matrix`):
        :func:`~lowmem.optim.functional.muon.muon_whole_step_bytes` (the traced tensors exactly, plus the products'
        workspace bound, per CPU thread for a buffer on the CPU, as the lean step's). Before 2026-11-30 the
        workspace was bounded by one float32 copy of the weight inside the iteration's phase, and a low-precision
        buffer's copy was added to the step's phase too: fresh-process peak RSS (two steps, one thread, float32,
        ``--live``) was 0.78-1.05x the report on sides up to 768 (below it: not a bound) and 1.15-1.52x on
        1024-4096 sides; then 1.02-1.25x (docs/optimizers.md, Muon). On an AMD EPYC, with its workspace bound of
        3 MiB per thread (2026-11-30, first step of a shape): report / growth 1.00-1.07 for weights of 1024 x 1024 and
        more; up to 1.2-2.4 under 8 MiB of tensors, where the BLAS's 0.4-2.6 MiB of buffers dominate and vary by
        layout (tall weights the most) and run (tests/test_muonmicro_muon_workspace.py)."""
        buf = state["momentum_buffer"]
        w, low = MuonMoments._widths(group, buf)
        threads = torch.get_num_threads() if buf.device.type == "cpu" else 1
        with blas_device(buf.device.type):
            return muon_whole_step_bytes(muon_matrix_shape(shape), group["nesterov"], low, threads, width=w)

    def _batched_transient_bytes(self, numel, shape, group, state, copy: int = 0) -> int:
        """A batch of matrices ``[..., A, B]``. Chunked (blocks of ``numel`` elements, whole rows): one
        matrix's lean step (:meth:`_matrix_iterate`: its bfloat16 iterate ``2 A B`` and at most one of the
        momentum pass's float32 rows with their gradient copy and the iteration's temporaries, as a 2-D weight's)
        computed inside the block's direction, beside the block's gradient copy (``copy`` bytes per element: a
        low-precision parameter's) and, in a block over several matrices, the block's float32 step (``4 numel``;
        after the iteration in a block within one matrix); exact in the tensors
        (:func:`~lowmem.optim.functional.muon.row_block_spans`; a bound by the block's gradient copy where no
        block inside one matrix computes an iterate), the products' workspace a bound as for a 2-D weight. Stepped
        whole (``chunk_numel=None``) the engine asks :meth:`target_whole_transient_bytes`."""
        m, n = shape[-2:]
        mat, total = m * n, math.prod(shape)
        buf = state["momentum_buffer"]
        w, low = self._widths(group, buf)
        threads = torch.get_num_threads() if buf.device.type == "cpu" else 1
        size = max(n, numel // n * n)
        piece = min(size, mat)
        with blas_device(buf.device.type):
            ns = newton_schulz_transient_bytes((m, n), ns_column_block_numel(buf.device, piece), threads=threads)
        iterate = 2 * mat + max(piece * (copy + w * (group["nesterov"] + low)), ns)
        within, spanning = row_block_spans(shape, size)
        return max(copy * within + iterate, 2 * mat + (w + copy) * within,
                   (w + copy) * spanning + iterate if spanning else 0)

    def target_whole_transient_bytes(self, shape, group, state):
        """Stepped whole (``chunk_numel=None``): a 2-D weight's :meth:`target_transient_bytes` of all of it (either
        form); a batch of matrices its float32 step beside one matrix's whole-tensor step (a bound, as a 2-D
        weight's)."""
        if len(shape) == 3:
            return (self._widths(group, state["momentum_buffer"])[0] * math.prod(shape)  # (the step: g's dtype)
                    + self._whole_matrix_bytes(shape[-2:], group, state))
        return self._whole_matrix_bytes(shape, group, state)  # (a conv kernel: its matrix's, muon_matrix_shape)

    def sharded_transient_bytes(self, shape, whole_shape, shards, group, state):
        """FSDP2 (:meth:`prepare_chunks` with ``reduce``): the momentum step on the shard, then the
        whole ``U`` gathered in bfloat16 and the unsharded Newton-Schulz iteration on it: bounded by
        the whole matrix's unchunked step (:meth:`target_transient_bytes` of all of it, which counts a
        whole Nesterov matrix, more than the shard's) plus the gather's buffers (bfloat16: the whole
        padded matrix and this shard's padded rows), as the engine bounds a sharded projected step.
        ``None`` for AdamW parameters (their shard's own chunked step)."""
        if self._is_adam(state) or not self.targets(whole_shape, group):
            return None
        m, n = whole_shape
        rows = -(-m // shards)  # each shard's padded rows (ShardReduce.gather_rows)
        total = m * n
        return self.target_transient_bytes(total, torch.Size(whole_shape), group, state) + 2 * (shards * rows + rows) * n


def _ns_coefficients(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 3 and all(
        isinstance(c, (int, float)) and not isinstance(c, bool) and c == c and abs(c) != float("inf") for c in x)


def _ns_steps(x: Any) -> bool:
    return positive_int(x) and x < 100


MUON_HPARAMS = (
    LR(1e-3),
    WEIGHT_DECAY(0.1),
    HParam("momentum", 0.95, in_unit_interval, "a float in [0, 1)", "momentum mu of the buffer B <- mu B + (1 - mu) g"),
    HParam("nesterov", True, is_bool, "a bool", "orthogonalise g + mu (B - g) (Nesterov) instead of B"),
    HParam("ns_coefficients", NS_COEFFICIENTS, _ns_coefficients, "a tuple of 3 finite floats (a, b, c)",
           "coefficients of the quintic Newton-Schulz iteration X <- a X + (b A + c A^2) X, A = X X^T"),
    HParam("ns_steps", 5, _ns_steps, "an int in [1, 99]", "Newton-Schulz iterations"),
    HParam("ns_eps", 1e-7, positive, "a finite float > 0", "floor of ||U||_F before the iteration (torch.optim.Muon's eps)"),
    HParam("adjust_lr_fn", "match_rms_adamw", one_of(*ADJUST_LR_FNS),
           f"one of {list(ADJUST_LR_FNS)} (torch.optim.Muon's adjust_lr_fn=None is 'original')",
           "shape-based step factor: 0.2 sqrt(max(A, B)) (match_rms_adamw, reuses AdamW's lr) or sqrt(max(1, A/B)) (original)"),
    BETAS((0.9, 0.95)),
    EPS(1e-8),
    HParam("adamw_lr_ratio", 1.0, nonneg, "a finite float >= 0",
           "AdamW parameters step and decay with lr * adamw_lr_ratio (MuonWithAuxAdam's Adam-group lr / lr)"),
)
WEIGHT_LAYOUT = HParam("weight_layout", "out_in", one_of(*WEIGHT_LAYOUTS), f"one of {list(WEIGHT_LAYOUTS)}",
                       "how the group's 2-D weights are stored: 'out_in' (nn.Linear's [out, in]) or 'in_out' (transformers'"
                       " Conv1D, GPT-2: the output side is the columns); create_optimizer(model) sets it per layer")
USE_MUON = HParam("use_muon", True, is_bool, "a bool",
                  "the group's 2-D parameters take Muon, 3-D ones per matrix over the last two (fused MoE experts),"
                  " 4-D conv kernels [out, in, kh, kw] as one [out, in*kh*kw] matrix (normuon refuses them; 5-D and more"
                  " are refused); the 1-D ones in it take AdamW, and so do groups without the key"
                  " when another group has it; when none has it, every group takes the default)")


def check_muon_group(group: dict[str, Any]) -> None:
    """A ``use_muon`` group's parameters of 5 or more dimensions are refused, naming each's index and shape: Muon
    steps 2-D weights, batches of matrices ``[E, A, B]`` (each matrix on its own) and 4-D conv kernels ``[out, in,
    kh, kw]`` (the one matrix ``[out, in kh kw]``, Keller Jordan's muon.py); for more dimensions (a Conv3d kernel)
    no reference says which matrices they are (Keller Jordan's code flattens only ``ndim == 4`` and would batch the
    last two dimensions of a 5-D tensor; his docstring's reason, the kernel as one linear map, would flatten it)."""
    if not group.get("use_muon"):
        return
    for i, p in enumerate(group["params"]):
        if p.dim() >= 5:
            raise ValueError(
                f"parameter {i} of shape {list(p.shape)} in a use_muon group: Muon takes 2-D weights [out, in], batches"
                " of matrices [E, A, B] (each matrix on its own) and 4-D convolution kernels [out, in, kh, kw] (one"
                " [out, in*kh*kw] matrix, Keller Jordan's muon.py); a tensor of 5 or more dimensions has no reference"
                " reading (its trailing matrices, or one [out, rest] matrix): reshape it, or put it in a group with"
                " use_muon=False (AdamW)")


MUON = Recipe(
    name="muon",
    summary="Muon: Nesterov momentum orthogonalised by Newton-Schulz (bf16) on 2-D hidden weights, AdamW elsewhere",
    reference="Jordan et al. 2024, Muon: An optimizer for hidden layers in neural networks (torch.optim.Muon);"
              " Liu et al. 2025, Muon is Scalable for LLM Training (weight decay, the match_rms_adamw update scale)",
    moment=MuonMoments(eps_placement="torch"),
    hparams=MUON_HPARAMS,
    group_hparams=(USE_MUON, WEIGHT_LAYOUT),
    validate_group=check_muon_group,
)


class Muon(DefaultTargetGroups, LowMemOptimizer):
    """Muon (Jordan et al. 2024) for 2-D hidden weights with AdamW for everything else, on the engine.

    On a parameter of a group with ``use_muon=True`` and two dimensions the step equals
    ``torch.optim.Muon`` (tested): ``B <- mu B + (1 - mu) g``, the Nesterov matrix ``g + mu (B - g)``
    orthogonalised by ``ns_steps`` quintic Newton-Schulz iterations in bfloat16, decoupled weight
    decay ``lr * weight_decay``, then a step of ``lr * ratio`` with the shape-based ``ratio`` of
    ``adjust_lr_fn``. Other parameters (and groups without ``use_muon``) are stepped by AdamW
    (``torch.optim.AdamW``'s update, with ``betas`` / ``eps`` and ``lr * adamw_lr_ratio``, its decay
    ``lr * adamw_lr_ratio * weight_decay`` as in Keller Jordan's ``MuonWithAuxAdam``).
    State: 4 bytes/param on Muon weights (the momentum buffer, float32), 8 on AdamW ones.

    Unlike ``torch.optim.Muon``: the default ``adjust_lr_fn`` is ``"match_rms_adamw"`` (an AdamW
    learning rate and weight decay carry over, Liu et al. 2025), non-2-D parameters are accepted
    (AdamW), and the Newton-Schulz floor is called ``ns_eps`` (``eps`` is AdamW's).

    Args:
        params: Parameters or parameter groups (``create_optimizer(model, "muon")`` builds them). A flat
            list is one group with ``use_muon=True`` (its 2-D parameters take Muon, as in ``torch.optim.Muon``);
            so is each group when none has ``use_muon``; when some group has it, those without take AdamW.
        lr (`float`, defaults to `1e-3`): Learning rate.
        weight_decay (`float`, defaults to `0.1`): Decoupled weight decay, ``p *= 1 - lr * weight_decay``
            (AdamW parameters: ``p *= 1 - lr * adamw_lr_ratio * weight_decay``).
        momentum (`float`, defaults to `0.95`): Momentum ``mu``, in [0, 1).
        nesterov (`bool`, defaults to `True`): Orthogonalise the Nesterov matrix ``g + mu (B - g)``.
        ns_coefficients (`tuple[float, float, float]`, defaults to `(3.4445, -4.7750, 2.0315)`): The quintic's coefficients.
        ns_steps (`int`, defaults to `5`): Newton-Schulz iterations, in [1, 99].
        ns_eps (`float`, defaults to `1e-7`): Floor of the Frobenius norm before the iteration.
        adjust_lr_fn (`str`, defaults to `"match_rms_adamw"`): ``"match_rms_adamw"`` (``0.2 sqrt(max(A, B))``,
            for AdamW-tuned learning rates) or ``"original"`` (``sqrt(max(1, A / B))``, Keller Jordan's, with lr ~0.02).
        betas (`tuple[float, float]`, defaults to `(0.9, 0.95)`): AdamW's moment decay rates.
        eps (`float`, defaults to `1e-8`): AdamW's ``eps``.
        adamw_lr_ratio (`float`, defaults to `1.0`): AdamW parameters step and decay with ``lr * adamw_lr_ratio``.
        state_dtype (`str`, defaults to `"float32"`): Storage of the momentum buffer and moments.
        foreach (`bool` or `None`, defaults to `None`): ``False`` steps every parameter one at a time
            instead of in multi-tensor buckets (float32 weights of one shape stacked, bit for bit the same).
    """

    recipe = MUON

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, ns_steps: int = 5,
                 ns_eps: float = 1e-7, adjust_lr_fn: str = "match_rms_adamw", betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, adamw_lr_ratio: float = 1.0, *, state_dtype: str = "float32",
                 foreach: bool | None = None):
        params = list(params)
        default = {"use_muon": True} if takes_the_default(params, "use_muon") else None
        super().__init__(flat_as_targeted(params, "use_muon", True), lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                         ns_coefficients=ns_coefficients, ns_steps=ns_steps, ns_eps=ns_eps,
                         adjust_lr_fn=adjust_lr_fn, betas=betas, eps=eps, adamw_lr_ratio=adamw_lr_ratio,
                         state_dtype=state_dtype, foreach=foreach)
        self.target_default = default
        if eps != 1e-8 and all(g.get("use_muon") and p.ndim >= 2 for g in self.param_groups for p in g["params"]):
            # torch.optim.Muon's eps is the Newton-Schulz floor; here it is AdamW's, which no parameter takes
            warn_user(f"eps={eps!r} is AdamW's eps in lowmem's Muon and every parameter here takes Muon, so it"
                      f" changes nothing; torch.optim.Muon's eps (the Newton-Schulz floor) is ns_eps here"
                      f" (ns_eps={ns_eps!r})")


# ---- SinkGD ----------------------------------------------------------------------------------


class SinkGDMoments(HybridMoments):
    """SinkGD on the 2-D parameters of groups with ``use_sinkgd=True`` (no state); AdamW on the others
    (with ``lr``: SinkGD's own factor is ``scale``).

    Chunked (the engine's default, and FSDP2 shards): SR-Sinkhorn as the two diagonal scalings of
    :func:`~lowmem.optim.functional.sinkgd.sinkhorn_scalings`, from passes over blocks of whole rows,
    then each block's step ``lr scale r_i G_ij c_j``: no temporary of the matrix's size. Whole
    (``chunk_numel=None``): :func:`~lowmem.optim.functional.sinkgd.sr_sinkhorn`, the reference.

    A parameter of more than two dimensions (a fused MoE expert weight ``[E, A, B]``) is a batch of matrices
    over its last two: each ``A x B`` matrix is normalized on its own, exactly as a 2-D parameter of its own
    (its scalings from blocks of its own rows; ``r`` of every row and ``c`` per matrix kept for the blocks;
    whole: one matrix after the other; foreach buckets: stacked with the 2-D weights of their shape)."""

    #: the chunked step's transient counts the float32 copies of a low-precision parameter's chunks itself
    #: (:meth:`transient_bytes` with ``copy=4``; the engine's ``_param_transient_bytes`` adds none then): every chunked
    #: direction is a new float32 tensor holding no reference to the gradient chunk (AdamW's; a block of the
    #: targets' step from the scalings prepare_chunks computed), so the gradient chunk's copy is freed before the
    #: parameter chunk's is made, and the scalings' passes hold a block's copy only until its squares are made
    #: (:func:`~lowmem.optim.functional.sinkgd.sinkhorn_scalings_bytes`). (Before 2026-11-30 the engine added the copy
    #: beside the whole pass, ``chunk_direction_is_new``: a bfloat16 48 x 24 weight in blocks of 25 rows 5,609 B
    #: reported for 5,280 traced.)
    chunk_counts_copies = True

    def transient_bytes(self, numel, shape, group, state, copy: int = 0):
        """The chunked step of ``numel`` elements with ``copy`` bytes per element of a low-precision parameter's
        float32 chunk copies (``chunk_counts_copies``): an AdamW parameter's gradient copy freed before its
        parameter's (one copy beside AdamW's transient); a target's :meth:`target_transient_bytes`."""
        if self._is_adam(state):
            return copy * numel + self.adam.transient_bytes(numel, shape, group, state)
        return self.target_transient_bytes(numel, shape, group, state, copy)

    lr_ratio_key = None

    def targets(self, shape, group):
        """The 2-D parameters of a ``use_sinkgd`` group, and those of more dimensions (batches of matrices over
        the last two; in FSDP2 groups stepped by the engine one matrix at a time: :meth:`per_matrix`)."""
        return bool(group.get("use_sinkgd")) and len(shape) >= 2

    def per_matrix(self, shape, group):
        """A batch of matrices of an FSDP2 group: each rank steps its shard's whole matrices as separate 2-D
        parameters (as :meth:`MuonMoments.per_matrix`), equal to one process's per-matrix SR-Sinkhorn."""
        return len(shape) > 2 and self.targets(shape, group) and sharded_group(group)

    def target_direction(self, g, state, group, t, lr):
        if isinstance(state, ChunkState) and state.extra.get("sinkgd") is not None:
            r, c = state.extra["sinkgd"]
            r0, r1 = state.extra["rows"]
            if c.dim() > 1:  # a batch of matrices: c of each (_batched_scalings)
                return self._batched_rows(g, r, c, r0, r1, lr * group["scale"])
            return g.view(r1 - r0, -1).mul(r[r0:r1, None]).mul_(c).mul_(lr * group["scale"]).view(-1)
        if g.dim() > 2:  # a batch of matrices stepped whole: one matrix after the other
            out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
            for e in range(math.prod(g.shape[:-2])):
                matrix_index(out, e).copy_(sr_sinkhorn(matrix_index(g, e), group["sinkhorn_iters"]).mul_(lr * group["scale"]))
            return out
        return sr_sinkhorn(g, group["sinkhorn_iters"]).mul_(lr * group["scale"])

    @staticmethod
    def _batched_rows(g: Tensor, r: Tensor, c: Tensor, r0: int, r1: int, scale: float) -> Tensor:
        """Rows ``r0:r1`` of the ``[-1, B]`` view of a batch's step ``scale r_i G_ij c_j``, ``c`` the row's
        matrix's (``c``: ``[matrices, B]``), each element computed as a 2-D weight's block computes it."""
        m, n = r.numel() // c.size(0), c.size(1)
        gv = g.view(r1 - r0, n)
        if r0 // m == (r1 - 1) // m:  # within one matrix
            return gv.mul(r[r0:r1, None]).mul_(c[r0 // m]).mul_(scale).view(-1)
        out = torch.empty((r1 - r0, n), dtype=g.dtype, device=g.device)
        a = r0
        while a < r1:
            e = a // m
            b = min(r1, (e + 1) * m)
            torch.mul(gv[a - r0 : b - r0], r[a:b, None], out=out[a - r0 : b - r0]).mul_(c[e]).mul_(scale)
            a = b
        return out.view(-1)

    def target_chunk_align(self, shape, group, state):
        return shape[-1]  # blocks of whole rows

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        if self._is_adam(state):
            return self.adam.chunk_state(state, start, stop, shape, group, ctx)
        n = shape[-1]
        # (ctx None: a flat piece of a weight larger than chunk_numel in a foreach bucket, stepped
        # whole from its first piece: HybridMoments._whole_by_shape)
        return ChunkState(state, start, stop, {"sinkgd": ctx, "rows": (start // n, stop // n), "parent": state,
                                               "shape": shape})

    # ---- the multi-tensor step ----

    #: the smallest side of a weight that takes the foreach buckets: then ``m + n <= m n / 8``, which
    #: bounds the scalings' vectors by the bucket's size (:meth:`target_foreach_transient_bytes`)
    foreach_min_side = 16

    def target_supports_foreach(self, shape, group):
        """SinkGD weights with both sides at least :attr:`foreach_min_side` take the foreach buckets,
        except in FSDP2 groups (the column sums are all-reduced over the shards, per parameter:
        :meth:`prepare_chunks`)."""
        return self.targets(shape, group) and min(shape[-2:]) >= self.foreach_min_side and not sharded_group(group)

    def target_foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """The SinkGD weights of a bucket, those of one shape stacked
        (:func:`~lowmem.optim.functional.sinkgd.sinkgd_foreach_`: the scalings of the stack), one
        shape at a time; a weight in pieces (larger than ``chunk_numel``) by the per-parameter chunked
        step from its first piece. Equal to the chunked per-parameter step bit for bit on the CPU; to the
        whole-tensor one (``chunk_numel=None``: :func:`~lowmem.optim.functional.sinkgd.sr_sinkhorn`)
        up to float32 rounding, as the chunked step is (tests/test_foreach_normalized.py)."""
        for _, idx in self._whole_by_shape(params, grads, states, group, t, lr).items():
            # a batch of matrices [..., A, B] (fused experts): its A x B matrices, each stepped as a 2-D weight
            sinkgd_foreach_([x for i in idx for x in matrices(params[i])], [x for i in idx for x in matrices(grads[i])],
                            group["sinkhorn_iters"], lr, group.get("weight_decay", 0.0), lr * group["scale"])

    def target_foreach_transient_bytes(self, numel):
        """:func:`~lowmem.optim.functional.sinkgd.sinkgd_foreach_`: a float32 stack of the bucket's
        weights of one shape (squares, then steps) and the scalings' vectors (``r``, the row norms,
        ``r^2``; ``c``, ``c^2``, the column sums, a clamp and a factor: at most ``6 (m + n)`` float32
        numbers per matrix, ``<= 0.75 m n`` with both sides at least :attr:`foreach_min_side`): the bound
        for a bucket whose shape is not known."""
        return 4 * numel + 3 * numel

    def target_foreach_bucket_transient_bytes(self, numel, shape, group):
        """:func:`~lowmem.optim.functional.sinkgd.sinkgd_foreach_bytes` of the bucket's ``numel / (m n)``
        weights of ``shape``, in the form :func:`~lowmem.optim.functional.sinkgd.sinkgd_foreach_` chooses from
        the device (closed form off the CPU; a meta parameter counts as one off the CPU); a batch ``[..., m, n]``
        its matrices."""
        m, n = shape[-2:]
        params = (group or {}).get("params") or []
        off_cpu = bool(params) and local(params[0]).device.type != "cpu"
        return sinkgd_foreach_bytes(numel // max(m * n, 1), m, n, group["sinkhorn_iters"], off_cpu)

    def target_bf16_bucket_direction(self, g32s, states, group, t, lr):
        """The float32 steps ``lr scale r_i G_ij c_j`` of ``k`` bfloat16 SinkGD weights of one shape
        (:func:`~lowmem.optim.functional.sinkgd.sinkgd_foreach_direction` of their gradients' float32 copies, freed
        after): the float32 bucket's operations. Allocates :meth:`target_bf16_bucket_transient_bytes`."""
        shape = tuple(g32s[0].shape)
        gs = [x for g in g32s for x in matrices(g)]  # (a batch [E, A, B]: its matrices, each as a 2-D weight)
        d = sinkgd_foreach_direction(gs, group["sinkhorn_iters"], lr * group["scale"])
        g32s.clear()
        del gs
        return self._members_of(d, shape)

    def target_bf16_bucket_transient_bytes(self, numel, shape, states, group):
        """The gradients' float32 copies (``4 numel``) beside the float32 bucket's step
        (:meth:`target_foreach_bucket_transient_bytes`: the squares and the scalings, then the steps)."""
        return 4 * numel + self.target_foreach_bucket_transient_bytes(numel, shape, group)

    # FSDP2 (lowmem.optim.sharded): a shard of rows; the columns' squared norms are summed over the
    # shards in every Sinkhorn iteration (one all-reduce of n numbers), the row count is the whole one
    sharded_stats = True

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized, reduce=None):
        """The scalings ``(r, c)`` of the weight (of the shard's rows, with ``reduce``), from passes
        over the row blocks ``bounds``; ``None`` for AdamW parameters."""
        if self._is_adam(state):
            return None
        if reduce is None and len(shape) > 2:
            return self._batched_scalings(state, shape, group, bounds, stabilized)
        m, n = shape

        def rows_of(a: int, b: int) -> Tensor:
            return stabilized(a * n, b * n, ChunkState(state, a * n, b * n)).view(b - a, n)

        row_bounds = [(a // n, b // n) for a, b in bounds]
        if reduce is None:
            return sinkhorn_scalings(rows_of, row_bounds, m, n, group["sinkhorn_iters"])
        return sinkhorn_scalings(rows_of, row_bounds, m, n, group["sinkhorn_iters"], column_sq=reduce.sum_,
                                 rows=reduce.shape[0])

    def _batched_scalings(self, state, shape, group, bounds, stabilized) -> tuple[Tensor, Tensor]:
        """A batch of matrices ``[..., m, n]``: each matrix's scalings (:func:`sinkhorn_scalings` over blocks of
        its own rows, as a 2-D weight of its own at this chunk), gathered into ``r`` (every row of the ``[-1, n]``
        view) and ``c`` (``[matrices, n]``)."""
        m, n = shape[-2:]
        count = math.prod(shape[:-2])
        size = max((b - a for a, b in bounds), default=n)
        step = max(n, size // n * n)
        row_bounds = [(a // n, min(a + step, m * n) // n) for a in range(0, m * n, step)]
        r_all = c_all = None
        for e in range(count):
            base = e * m * n

            def rows_of(a: int, b: int, base: int = base) -> Tensor:
                return stabilized(base + a * n, base + b * n, ChunkState(state, base + a * n, base + b * n)).view(b - a, n)

            r, c = sinkhorn_scalings(rows_of, row_bounds, m, n, group["sinkhorn_iters"])
            if r_all is None:
                r_all = torch.empty(count * m, dtype=r.dtype, device=r.device)
                c_all = torch.empty((count, n), dtype=c.dtype, device=c.device)
            r_all[e * m : (e + 1) * m].copy_(r)
            c_all[e].copy_(c)
            del r, c
        return r_all, c_all

    def _batched_transient_bytes(self, numel, shape, group, copy: int = 0) -> int:
        """A batch ``[..., m, n]`` in blocks of ``numel`` elements (:meth:`_batched_scalings`): one matrix's
        scalings' passes (as a 2-D weight's at this chunk) beside the batch's ``r`` and ``c`` (``4 E (m + n)``,
        allocated after the first matrix's), then a block's step beside them, with its gradient copy (``copy``
        bytes per element, as :meth:`target_transient_bytes`). Stepped whole (``chunk_numel=None``) the engine asks
        :meth:`target_whole_transient_bytes`."""
        m, n = shape[-2:]
        count, total = math.prod(shape[:-2]), math.prod(shape)
        params = group.get("params") or []
        off_cpu = bool(params) and local(params[0]).device.type != "cpu"
        step = max(n, numel // n * n)
        w, rows_copy = self._widths(group, copy)
        one = sinkhorn_scalings_bytes(m, n, max(1, min(step, m * n) // n), off_cpu and not sharded_group(group), rows_copy)
        kept = 4 * count * (m + n)
        return max(one, kept + 4 * (m + n), kept + (w + copy) * min(numel, total), kept + one if count > 1 else 0)

    @staticmethod
    def _widths(group, copy: int) -> tuple[int, int]:
        """``(bytes per element of the step, of the block the scalings' passes copy)``: a float64 gradient
        (:func:`~lowmem.optim.moments.grad_element_bytes`; SinkGD's targets keep no state, so read from the group)
        gives a float64 step (``g * r * c``) and its blocks a float32 copy in the passes (``rows.float()``, as a
        low-precision parameter's chunk copy ``copy``); else 4 and ``copy``. (Before 2026-11-30 counted at 4: a
        float64 48 x 24 weight in chunks of 600, 3,209 B reported, 5,280 traced; whole, 5,088 for 10,176.)"""
        w = grad_element_bytes(group)
        return w, copy + (4 if w == 8 else 0)

    def target_transient_bytes(self, numel, shape, group, state, copy: int = 0):
        """A block of rows (``numel`` its elements; the chunked step): the scalings' passes
        (:func:`~lowmem.optim.functional.sinkgd.sinkhorn_scalings_bytes`, in the closed form off the CPU as
        :func:`~lowmem.optim.functional.sinkgd.sinkhorn_scalings` chooses it from the device, the group's
        parameters'; a meta parameter counts as one off the CPU; not for FSDP2 shards), then each block's step
        next to ``r`` and ``c`` (``4 numel + 4 (m + n)``). ``copy``: bytes per element of a low-precision
        parameter's float32 chunk copies (4; 0 for float32): a block's gradient copy in the passes until its
        squares are made, and beside its step (then the parameter's copy, the gradient's freed). Stepped whole
        (``chunk_numel=None``), the engine asks :meth:`target_whole_transient_bytes` instead. A batch of matrices:
        :meth:`_batched_transient_bytes`."""
        if len(shape) > 2:
            return self._batched_transient_bytes(numel, shape, group, copy)
        m, n = shape
        params = group.get("params") or []
        off_cpu = bool(params) and local(params[0]).device.type != "cpu"
        w, rows_copy = self._widths(group, copy)
        block = sinkhorn_scalings_bytes(m, n, max(1, numel // max(n, 1)), off_cpu and not sharded_group(group), rows_copy)
        return max(block, (w + copy) * numel + 4 * (m + n))

    def target_whole_transient_bytes(self, shape, group, state):
        """The whole-tensor step (:func:`~lowmem.optim.functional.sinkgd.sr_sinkhorn`, ``chunk_numel=None``):
        :func:`~lowmem.optim.functional.sinkgd.sr_sinkhorn_bytes` (the step is scaled in place); a batch of
        matrices: its float32 step beside one matrix's."""
        w = self._widths(group, 0)[0]  # (sr_sinkhorn_bytes: of a float32 g; every tensor is in g's dtype)
        if len(shape) > 2:
            return w * math.prod(shape) + sr_sinkhorn_bytes(shape[-2], shape[-1], group["sinkhorn_iters"]) * w // 4
        return sr_sinkhorn_bytes(shape[0], shape[1], group["sinkhorn_iters"]) * w // 4


SINKGD_HPARAMS = (
    LR(1e-3),
    WEIGHT_DECAY(0.0),
    HParam("sinkhorn_iters", 5, positive_int, "an int > 0", "L: alternating row / column normalisations (Algorithm 3)"),
    HParam("scale", 0.05, positive, "a finite float > 0", "SinkGD weights step with lr * scale (AdamW ones with lr)"),
    BETAS(),
    EPS(1e-8),
)
USE_SINKGD = HParam("use_sinkgd", True, is_bool, "a bool",
                    "the group's 2-D parameters take SinkGD, 3-D ones per matrix over the last two (fused MoE experts;"
                    " 4-D and more are refused; the 1-D ones in it take AdamW, and so do groups without the key"
                    " when another group has it; when none has it, every group takes the default)")

def check_sinkgd_group(group: dict[str, Any]) -> None:
    """A ``use_sinkgd`` group's parameters of 4 or more dimensions are refused, naming each's index and shape: SinkGD
    (Scetbon et al. 2025) normalises the rows and columns of a 2-D weight's gradient and lowmem a 3-D batch ``[E, A, B]``
    (fused MoE experts) per matrix; for a convolution kernel ``[out, in, kh, kw]`` neither the paper (LLMs' linear
    layers) nor any code of its authors says which matrix it is (its ``out x in`` kernels of ``kh x kw``, which lowmem
    stepped until AUDMATH21 1, or the ``[out, in kh kw]`` map Muon's convention and SCALE's and RACS's code read)."""
    if not group.get("use_sinkgd"):
        return
    for i, p in enumerate(group["params"]):
        if p.dim() >= 4:
            raise ValueError(
                f"parameter {i} of shape {list(p.shape)} in a use_sinkgd group: SinkGD takes 2-D weights [out, in] and"
                " batches of matrices [E, A, B] (each matrix on its own); a tensor of 4 or more dimensions (a"
                " convolution kernel) has no reference reading (its trailing kh x kw matrices, or one [out, in*kh*kw]"
                " matrix): reshape it, or put it in a group with use_sinkgd=False (AdamW)")


SINKGD = Recipe(
    name="sinkgd",
    summary="SinkGD: stateless SR-Sinkhorn row/column normalisation of 2-D hidden-weight gradients, AdamW elsewhere",
    reference="Scetbon, Ma, Gong & Meeds 2025, Gradient Multi-Normalization for Stateless and Scalable LLM Training,"
              " Algorithms 3-4",
    moment=SinkGDMoments(eps_placement="torch"),
    hparams=SINKGD_HPARAMS,
    group_hparams=(USE_SINKGD,),
    validate_group=check_sinkgd_group,
)


class SinkGD(DefaultTargetGroups, LowMemOptimizer):
    """SinkGD (Scetbon et al. 2025) for 2-D hidden weights with AdamW for everything else.

    A 2-D parameter of a group with ``use_sinkgd=True`` keeps no state: its gradient is normalised
    by ``sinkhorn_iters`` alternating passes (rows to norm ``sqrt(n)``, then columns to ``sqrt(m)``)
    and stepped with ``lr * scale``. Other parameters take AdamW with ``lr``, as in the paper's
    setup (embeddings, output head and norms trained by Adam). Row and column norms are floored at
    1e-30 so that a zero row stays zero.

    Args:
        params: Parameters or parameter groups (``create_optimizer(model, "sinkgd")`` builds them). A flat
            list is one group with ``use_sinkgd=True``; so is each group when none has ``use_sinkgd``; when some
            group has it, those without take AdamW.
        lr (`float`, defaults to `1e-3`): Learning rate (AdamW's; SinkGD steps with ``lr * scale``).
        weight_decay (`float`, defaults to `0.0`): Decoupled weight decay, ``p *= 1 - lr * weight_decay``.
        sinkhorn_iters (`int`, defaults to `5`): ``L``, the alternating normalisations.
        scale (`float`, defaults to `0.05`): Factor of the SinkGD weights' learning rate.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): AdamW's moment decay rates.
        eps (`float`, defaults to `1e-8`): AdamW's ``eps``.
        state_dtype (`str`, defaults to `"float32"`): Storage of the AdamW moments.
        foreach (`bool` or `None`, defaults to `None`): ``False`` steps every parameter one at a time
            instead of in multi-tensor buckets (float32 weights of one shape stacked, bit for bit the same).
    """

    recipe = SINKGD

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0, sinkhorn_iters: int = 5,
                 scale: float = 0.05, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, *,
                 state_dtype: str = "float32", foreach: bool | None = None):
        params = list(params)
        default = {"use_sinkgd": True} if takes_the_default(params, "use_sinkgd") else None
        super().__init__(flat_as_targeted(params, "use_sinkgd", True), lr=lr, weight_decay=weight_decay,
                         sinkhorn_iters=sinkhorn_iters, scale=scale,
                         betas=betas, eps=eps, state_dtype=state_dtype, foreach=foreach)
        self.target_default = default


# ---- SCALE -----------------------------------------------------------------------------------

SCALE_ROLES = ("hidden", "head", "embedding")


def by_columns(group: dict[str, Any]) -> bool:
    """Whether SCALE normalizes the columns of the group's matrices (its output units are the columns): the input
    embedding ``[vocab, d]`` (``scale_role="embedding"``) and a hidden weight stored ``[in, out]``
    (``weight_layout="in_out"``, transformers' ``Conv1D``: :func:`in_out`), which so gets the step its nn.Linear twin
    ``[out, in]`` gets, transposed (the same RMS, reduced over the blocks of rows: equal to float rounding)."""
    return group["scale_role"] == "embedding" or (group["scale_role"] == "hidden" and in_out(group))


class ScaleMoments(HybridMoments):
    """SCALE: by the group's ``scale_role``, parameters with 2 or more dimensions are column-normalised
    (``"hidden"``: each row of ``[out, in]``, no state; ``"head"``: the same after the momentum
    EMA, state ``momentum_buffer``; ``"embedding"``: each column of ``[vocab, d]``, no state).
    Parameters of fewer dimensions, and groups without ``scale_role``, take AdamW with the authors'
    eps placement (``eps`` on the uncorrected ``sqrt(v)``).

    A parameter of 3 dimensions (a fused MoE expert weight ``[E, A, B]``, each ``A x B`` matrix one expert's
    ``[out, in]`` weight) is a batch of matrices: each matrix gets exactly the step of a 2-D weight of its own in
    the same role (its rows' RMS over ``B``; the embedding role: its columns' over ``A``), as Muon and SinkGD step
    such weights per matrix (:func:`~lowmem.optim.create_optimizer` targets them, ``batched_targets``). Chunked: in
    blocks of whole rows of the ``[E A, B]`` view (a matrix may span many blocks, a block several matrices); the
    rows are normalised on their own, the embedding role's columns by their matrix's RMS from a first pass over
    each matrix's blocks (:meth:`_batched_column_rms`). Foreach buckets: a row role's matrices stacked. A
    parameter of more than 3 dimensions (a conv kernel ``[out, in, k, k]``) is normalised as its ``[out, -1]`` view
    (:meth:`_flat_prepare`)."""

    target_keys = ("momentum_buffer",)

    #: the chunked step's direction is a new float32 tensor of the chunk (every path: AdamW's, the normalised
    #: block, :func:`~lowmem.optim.functional.scale.normalize_flat`'s) that holds no reference to the gradient
    #: chunk: a low-precision gradient chunk's float32 copy is freed before the parameter chunk's is made, so the
    #: two copies are never alive together (:meth:`~lowmem.optim.engine.LowMemOptimizer._param_transient_bytes`)
    chunk_direction_is_new = True

    def targets(self, shape, group):
        return group.get("scale_role") is not None and len(shape) >= 2

    def per_matrix(self, shape, group):
        """A batch of matrices ``[E, A, B]`` of an FSDP2 group: each rank steps its shard's whole matrices as
        separate 2-D parameters (as :meth:`MuonMoments.per_matrix`), equal to one process's batched step (rows, or
        the embedding role's columns, of each matrix). A tensor of more dimensions (``[rows, cols]`` flat) is not a
        batch of matrices here: refused on shards (:func:`~lowmem.optim.sharded.refusal`)."""
        return len(shape) == 3 and self.targets(shape, group) and sharded_group(group)

    def target_init_state(self, state, shape, group, param):
        if in_out(group, shape) and group["scale_role"] != "hidden":
            raise ValueError(f"scale: weight_layout='in_out' (transformers' Conv1D, [in, out]) applies to"
                             f" scale_role='hidden' weights, got scale_role={group['scale_role']!r}")
        if group["scale_role"] == "head":
            state["momentum_buffer"] = torch.zeros(shape, dtype=state_dtype(group, param), device=param.device)

    def target_direction(self, g, state, group, t, lr):
        role = group["scale_role"]
        if role == "head":
            buf = state["momentum_buffer"]
            buf32 = buf if buf.dtype == g.dtype else buf.to(g.dtype)
            g = last_layer_momentum_(buf32, g, group["momentum"])
            if buf32 is not buf:
                buf.copy_(buf32)
        if isinstance(state, ChunkState) and state.extra.get("flat_rms") is not None:
            # a chunk of a tensor of more than 2 dimensions, [rows, cols] flat: divided by its rows' (or the
            # embedding's columns') RMS over the whole tensor (prepare_chunks), segment by segment
            x = state.extra
            return normalize_flat(g, state.start, x["cols"], x["flat_rms"], x["dim"]).mul_(lr)
        if isinstance(state, ChunkState) and state.extra.get("column_rms") is not None:
            # a block of whole rows of the embedding: divided by its columns' RMS over every row (prepare_chunks)
            rms = state.extra["column_rms"]
            if "matrix_rows" in state.extra:  # a batch of matrices: each row divided by its matrix's columns' RMS
                return self._batched_columns(g, rms, state.extra["matrix_rows"], state.start // state.extra["cols"],
                                             state.stop // state.extra["cols"]).mul_(lr)
            return g.view(-1, state.extra["cols"]).div(rms).view(-1).mul_(lr)
        if isinstance(state, ChunkState):  # a block of whole rows, flat: each row normalised on its own
            return column_normalize(g.view(-1, state.extra["cols"]), dim=1).view(-1).mul_(lr)
        return column_normalize(g, dim=0 if by_columns(group) else 1).mul_(lr)

    # FSDP2 (lowmem.optim.sharded): row-normalised matrices are row-local; the embedding's columns
    # are normalised by their RMS over every shard's rows (column_normalize's column_sq)
    sharded_stats = True

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized, reduce=None):
        """The embedding (``scale_role="embedding"``, stepped in blocks of whole rows ``bounds``): its
        columns' RMS (:func:`~lowmem.optim.functional.scale.column_rms`, a pass over the blocks; sharded, the
        squared norms summed over the shards, one all-reduce of ``n`` numbers, and the RMS over the whole
        row count). ``None`` otherwise: row-normalised matrices need nothing of other rows.

        A batch of matrices ``[E, A, B]`` (blocks of whole rows of its ``[E A, B]`` view): the embedding role's
        columns' RMS of each matrix (:meth:`_batched_column_rms`), ``None`` for the row roles. A tensor of more
        than 3 dimensions (``[rows, cols]`` flat, ``cols = prod(shape[1:])``; stepped in chunks of any size, a row
        may span several): :meth:`_flat_prepare`."""
        if self._is_adam(state):
            return None
        if len(shape) > 3:
            return self._flat_prepare(state, shape, group, bounds, stabilized, reduce)
        if not by_columns(group):
            return None
        if len(shape) == 3:  # (FSDP2: the engine steps a shard's matrices one by one, per_matrix)
            return self._batched_column_rms(state, shape, bounds, stabilized)
        n = shape[1]
        blocks = (stabilized(a, b, ChunkState(state, a, b)).view(-1, n) for a, b in bounds)
        if reduce is None:
            return column_rms(blocks, n, shape[0])
        return column_rms(blocks, n, reduce.shape[0], column_sq=reduce.sum_)

    @staticmethod
    def _batched_column_rms(state, shape, bounds, stabilized) -> Tensor:
        """The columns' RMS of each matrix of a batch ``[E, A, B]`` (``[E, B]`` float32): matrix by matrix,
        :func:`~lowmem.optim.functional.scale.column_rms` over blocks of the matrix's own rows of the engine's
        block size (``bounds``), so each equals a 2-D weight's of its own at this chunk bit for bit; gathered
        into one tensor after the first matrix's."""
        count, m, n = shape
        size = max((b - a for a, b in bounds), default=n)
        step = max(n, size // n * n)
        out = None
        for e in range(count):
            base = e * m * n

            def blocks(base: int = base):
                for a in range(0, m * n, step):
                    b = min(a + step, m * n)
                    yield stabilized(base + a, base + b, ChunkState(state, base + a, base + b)).view(-1, n)

            rms = column_rms(blocks(), n, m)
            if out is None:
                out = torch.empty((count, n), dtype=rms.dtype, device=rms.device)
            out[e].copy_(rms.view(-1))
            del rms
        return out

    @staticmethod
    def _batched_columns(g: Tensor, rms: Tensor, m: int, r0: int, r1: int) -> Tensor:
        """Rows ``r0:r1`` of the ``[E A, B]`` view of a batch's gradient divided by their matrix's columns' RMS
        (``rms``: ``[E, B]``; ``m``: the rows of a matrix), each element as a 2-D embedding's block divides it;
        a new tensor (flat)."""
        n = rms.size(1)
        gv = g.view(r1 - r0, n)
        if r0 // m == (r1 - 1) // m:  # within one matrix
            return gv.div(rms[r0 // m]).view(-1)
        out = torch.empty_like(gv)
        a = r0
        while a < r1:
            e = a // m
            b = min(r1, (e + 1) * m)
            torch.div(gv[a - r0 : b - r0], rms[e], out=out[a - r0 : b - r0])
            a = b
        return out.view(-1)

    def _flat_prepare(self, state, shape, group, bounds, stabilized, reduce=None) -> dict[str, Any]:
        """The RMS :func:`~lowmem.optim.functional.scale.column_normalize` divides a tensor of more than 3
        dimensions by (its ``[rows, cols]`` view's rows, or the embedding's columns), from one pass over the
        chunks ``bounds`` (:func:`~lowmem.optim.functional.scale.add_squares_`, a segment of a row at a time; the
        head's momentum EMA of a chunk computed as its step computes it, without writing the buffer); sharded
        (FSDP2 shards of rows), the columns' sums all-reduced and the RMS over the whole row count (rows are the
        shard's own). Returns the context of :meth:`chunk_state`."""
        rows, cols = shape[0], math.prod(shape[1:])
        dim = 0 if by_columns(group) else 1
        head = group["scale_role"] == "head"
        acc = None
        for a, b in bounds:
            g = stabilized(a, b, ChunkState(state, a, b))
            if acc is None:
                acc = torch.zeros(rows if dim == 1 else cols, dtype=torch.float32, device=g.device)
            if head:  # m_t of the chunk (last_layer_momentum_'s lerp, out of place), squared in place
                buf = state["momentum_buffer"].view(-1)[a:b]
                w = 1.0 - group["momentum"]
                m = torch.lerp(buf, g, w) if buf.dtype == g.dtype else buf.to(g.dtype).lerp_(g, w)
                add_squares_(acc, m.square_(), a, cols, dim, squared=True)
                del m
            else:
                add_squares_(acc, g, a, cols, dim)
            del g
        if acc is None:  # (an empty shard: its gradient's device)
            acc = torch.zeros(rows if dim == 1 else cols, dtype=torch.float32,
                              device=stabilized(0, 0, ChunkState(state, 0, 0)).device)
        count = cols if dim == 1 else rows
        if reduce is not None and dim == 0:
            acc, count = reduce.sum_(acc), reduce.shape[0]
        return {"flat_rms": rms_from_squares_(acc, count), "dim": dim, "cols": cols}

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        if isinstance(ctx, dict) and "flat_rms" in ctx and not self._is_adam(state):  # (more than 2 dimensions)
            view = ChunkState(state, start, stop, dict(ctx))
            if "momentum_buffer" in state:
                view["momentum_buffer"] = state["momentum_buffer"].view(-1)[start:stop]
            return view
        if ctx is not None and not self._is_adam(state):  # the embedding's column RMS (prepare_chunks)
            if len(shape) == 3:  # each matrix's (_batched_column_rms)
                return ChunkState(state, start, stop, {"cols": shape[-1], "column_rms": ctx, "matrix_rows": shape[1]})
            return ChunkState(state, start, stop, {"cols": shape[1], "column_rms": ctx})
        return super().chunk_state(state, start, stop, shape, group, ctx)

    def target_chunk_align(self, shape, group, state):
        """2-D matrices step in blocks of whole rows: the normalisation of a row (``"hidden"``, ``"head"``)
        needs only that row; the embedding's columns need their RMS over every row, from a first pass over
        the blocks (:meth:`prepare_chunks`). A batch of matrices ``[E, A, B]``: blocks of whole rows of its
        ``[E A, B]`` view (``B``), as each matrix's own. Tensors of more than 3 dimensions (a conv kernel) step in
        chunks of any size (``1``): a row of their ``[rows, cols]`` view may be larger than a chunk, so the RMS
        comes from a first pass over the chunks for every role (:meth:`_flat_prepare`)."""
        return shape[-1] if len(shape) <= 3 else 1

    def target_chunk_state(self, state, start, stop, shape, group):
        # (parent / shape: a flat piece of a weight larger than chunk_numel in a foreach bucket,
        # stepped whole from its first piece: HybridMoments._whole_by_shape)
        view = ChunkState(state, start, stop, {"cols": shape[-1], "parent": state, "shape": shape})
        if "momentum_buffer" in state:
            view["momentum_buffer"] = state["momentum_buffer"].view(-1)[start:stop]
        return view

    # ---- the multi-tensor step ----

    #: the fewest columns of a matrix that takes the foreach buckets: then its rows' RMS are at most
    #: 1/16 of its elements (:meth:`target_foreach_transient_bytes`)
    foreach_min_cols = 16

    def target_supports_foreach(self, shape, group):
        """Row-normalised matrices (``"hidden"``, ``"head"``; 2-D or batches ``[E, A, B]``, at least
        :attr:`foreach_min_cols` columns) take the foreach buckets, except in FSDP2 groups; the embedding
        (columns) and tensors of more than 3 dimensions are stepped alone."""
        return (self.targets(shape, group) and len(shape) in (2, 3) and not by_columns(group)
                and shape[-1] >= self.foreach_min_cols and not sharded_group(group))

    def target_foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """The row-normalised matrices of a bucket, those of one shape stacked
        (:func:`~lowmem.optim.functional.scale.scale_rows_foreach_`; ``"head"``: after the momentum
        EMA of every buffer, ``torch._foreach_lerp_``), one shape at a time; a matrix in pieces (larger
        than ``chunk_numel``) by the per-parameter chunked step from its first piece. Equal to the
        per-parameter step bit for bit on the CPU (tests/test_foreach_normalized.py). A batch ``[E, A, B]``: its
        ``A x B`` matrices, each stacked as a 2-D weight."""
        head = group["scale_role"] == "head"
        for _, idx in self._whole_by_shape(params, grads, states, group, t, lr).items():
            ms = [m for i in idx for m in matrices(grads[i])]
            if head:
                bufs = [m for i in idx for m in matrices(states[i]["momentum_buffer"])]
                torch._foreach_lerp_(bufs, ms, 1.0 - group["momentum"])  # last_layer_momentum_
                ms = bufs
            scale_rows_foreach_([m for i in idx for m in matrices(params[i])], ms, lr, group.get("weight_decay", 0.0))

    def target_bf16_bucket_direction(self, g32s, states, group, t, lr):
        """The float32 steps ``lr C(M)`` of ``k`` bfloat16 row-normalised matrices of one shape
        (:func:`~lowmem.optim.functional.scale.scale_rows_direction`): ``"hidden"`` of the gradients' float32
        copies; ``"head"`` of the buffers after their EMA (float32 copies of bfloat16 buffers, written back rounded,
        the step from the unrounded copies: the per-parameter step's ``buf.to(float32)``), the gradients' copies
        freed before the stack. Allocates :meth:`target_bf16_bucket_transient_bytes`."""
        shape = tuple(g32s[0].shape)
        gs = [x for g in g32s for x in matrices(g)]  # (a batch [E, A, B]: its matrices, each as a 2-D weight)
        if group["scale_role"] == "head":
            bufs = [x for s in states for x in matrices(s["momentum_buffer"])]
            low = self._low_buffers(states, group)
            ms = float32_copies(bufs) if low else bufs
            torch._foreach_lerp_(ms, gs, 1.0 - group["momentum"])  # last_layer_momentum_
            g32s.clear()
            del gs
            if low:
                torch._foreach_copy_(bufs, ms)
            del bufs
        else:
            ms = gs
            del gs
        d = scale_rows_direction(ms, lr)
        g32s.clear()
        del ms
        return self._members_of(d, shape)

    def target_bf16_bucket_transient_bytes(self, numel, shape, states, group):
        """The stack and its rows' RMS (:meth:`target_foreach_bucket_transient_bytes`) beside the rows it is
        stacked from when they are copies: the gradients' (``"hidden"``) or the bfloat16 buffers' (``"head"``,
        ``4 numel``; the gradients' copies, freed before, were beside them in the EMA)."""
        head = group["scale_role"] == "head"
        copies = 4 * numel if not head or self._low_buffers(states, group) else 0
        return max(copies + self.target_foreach_bucket_transient_bytes(numel, shape, group), 4 * numel + copies)

    def target_foreach_transient_bytes(self, numel):
        """:func:`~lowmem.optim.functional.scale.scale_rows_foreach_`: the float32 stack and its row RMS
        (one float32 per row: at most ``numel / 16`` with :attr:`foreach_min_cols`)."""
        return 4 * numel + numel // 4

    def target_foreach_bucket_transient_bytes(self, numel, shape, group):
        """A bucket of ``[out, in]`` matrices of ``shape``: the float32 stack and its rows' RMS (``4 numel + 4 k out``,
        every operation after them in place)."""
        return 4 * numel + 4 * (numel // max(shape[-1], 1))

    def target_transient_bytes(self, numel, shape, group, state):
        """A block of ``numel`` elements (whole rows; the chunked step): the normalised block (float32) and the
        per-slice RMS (one per row of the block), next to a low-precision momentum buffer's float32 copy. The
        embedding: the first pass's squares of a block next to its column sums and the running sums
        (:func:`~lowmem.optim.functional.scale.column_rms_bytes`), then each block's step next to the RMS
        (``4 numel + 4 n``). A batch of matrices ``[E, A, B]``: the row roles as a 2-D weight's block; the
        embedding role each matrix's first pass (as a 2-D weight's, next to the batch's RMS ``4 E B`` from the
        second matrix on) and a block's step next to the batch's RMS. A tensor of more than 3 dimensions in chunks
        of ``numel`` (:meth:`_flat_prepare`): its RMS vector (``4 rows``, or ``4 cols`` for the embedding) next to
        the most of its chunks' first pass and steps (:func:`~lowmem.optim.functional.scale.flat_chunks_bytes`).
        Stepped whole (``chunk_numel=None``), the engine asks :meth:`target_whole_transient_bytes` instead."""
        w, low = self._widths(group, state)
        embedding = by_columns(group)
        if len(shape) > 3:  # (the summed squares float32; the chunks' squares and steps in the gradient's dtype)
            rows, cols = shape[0], math.prod(shape[1:])
            stats = 4 * (cols if embedding else rows)
            return stats + flat_chunks_bytes(math.prod(shape), max(numel, 1), cols, 0 if embedding else 1,
                                             group["scale_role"] == "head", low) * w // 4
        m, n = shape[-2], max(1, shape[-1])
        if not embedding:
            return w * numel * low + w * numel + w * (numel // n)
        block_rows = max(1, numel // n)
        first_pass = column_rms_bytes(m, n, block_rows) * w // 4  # (column_rms_bytes: of float32 blocks)
        if len(shape) == 2:
            return max(first_pass, w * numel + w * n)
        kept = w * shape[0] * n  # the batch's RMS, [E, B]
        return max(first_pass, kept + w * n, kept + first_pass if shape[0] > 1 else 0, kept + w * numel)

    @staticmethod
    def _widths(group, state) -> tuple[int, bool]:
        """The bytes per element of the step's gradient (:func:`~lowmem.optim.moments.grad_element_bytes`: 8 for a
        float64 one, 4 else), which the normalised step, its RMS and the head's buffer copy take (``buf.to(g.dtype)``,
        ``column_normalize`` of ``g``), and whether the head's buffer is copied (stored in another dtype). (Before
        2026-11-30 counted at 4 B: a float64 tiny model 2,500 B reported, 5,000 traced.)"""
        buf = state.get("momentum_buffer")
        w = grad_element_bytes(group, buf)
        return w, buf is not None and buf.element_size() != w

    def target_whole_transient_bytes(self, shape, group, state):
        """The whole-tensor step (:func:`~lowmem.optim.functional.scale.column_normalize`): the RMS of every row
        (``4 rows``; the embedding's columns, ``4 cols``) and the normalised tensor (``4 numel``), next to a
        low-precision momentum buffer's float32 copy (``4 numel``). The rows and columns are those of each
        matrix of a batch ``[E, A, B]`` (``E A`` rows, ``E B`` columns) and of the ``[size(0), -1]`` view of a
        tensor of more than 3 dimensions."""
        w, low = self._widths(group, state)
        numel = math.prod(shape)
        if len(shape) == 3:
            rows, cols = shape[0] * shape[1], shape[0] * shape[2]
        else:
            rows, cols = shape[0], numel // max(shape[0], 1)
        return w * numel * low + w * numel + w * (cols if by_columns(group) else rows)


SCALE_HPARAMS = (
    LR(1e-3),
    WEIGHT_DECAY(0.0),
    HParam("momentum", 0.9, in_unit_interval, "a float in [0, 1)", "beta of the output layer's EMA m <- beta m + (1 - beta) g"),
    BETAS(),
    EPS(1e-8),
    HParam("adamw_lr_ratio", 1.0, nonneg, "a finite float >= 0",
           "AdamW parameters step and decay with lr * adamw_lr_ratio (the authors' adam_lr / lr)"),
)
SCALE_ROLE = HParam("scale_role", "hidden", one_of(*SCALE_ROLES), f"one of {list(SCALE_ROLES)}",
                    "what the group's matrices are: 'hidden' (column-normalised SGD), 'head' (with momentum),"
                    " 'embedding' (normalised per embedding dimension); groups without it take AdamW when another"
                    " group has it (when none has it, every group takes the default 'hidden')")

SCALE = Recipe(
    name="scale",
    summary="SCALE: column-normalised SGD, momentum only on the output layer, AdamW for vectors",
    reference="Glentis, Li, Han & Hong 2025, A Minimalist Optimizer Design for LLM Pretraining (arXiv:2506.16659),"
              " the SCALE update; the authors' code (OptimAI-Lab/Minimalist_LLM_Pretraining) for the normalisation",
    moment=ScaleMoments(eps_placement="hf"),
    hparams=SCALE_HPARAMS,
    group_hparams=(SCALE_ROLE, WEIGHT_LAYOUT),
)


class Scale(DefaultTargetGroups, LowMemOptimizer):
    """SCALE (Glentis et al. 2025): column-normalised SGD with momentum only on the output layer.

    ``create_optimizer(model, "scale")`` gives the hidden linear weights ``scale_role="hidden"``
    (no state), the output head ``"head"`` (a momentum buffer, 4 bytes/param) and the input
    embedding ``"embedding"`` (no state), as the authors' code does; vectors (norms, biases) take
    AdamW with ``lr * adamw_lr_ratio``. Each output unit's weights are divided by their RMS (floored at
    1e-8) and stepped with ``lr``; decoupled weight decay ``p *= 1 - lr * weight_decay`` (the AdamW
    parameters': ``p *= 1 - lr * adamw_lr_ratio * weight_decay``, as the authors' code). Fused MoE experts
    ``[E, A, B]`` (3-D) are stepped per ``A x B`` matrix, as ``E`` 2-D weights of the group's role, and
    ``create_optimizer`` puts them in the ``"hidden"`` group; a tensor of more than 3 dimensions (a conv kernel)
    is normalised as its ``[size(0), -1]`` view.

    Args:
        params: Parameters or parameter groups (groups carry ``scale_role``). A flat list is one group
            with ``scale_role="hidden"``; so is each group when none has ``scale_role``; when some group has
            it, those without take AdamW.
        lr (`float`, defaults to `1e-3`): Learning rate.
        weight_decay (`float`, defaults to `0.0`): Decoupled weight decay, ``p *= 1 - lr * weight_decay``
            (AdamW parameters: ``p *= 1 - lr * adamw_lr_ratio * weight_decay``).
        momentum (`float`, defaults to `0.9`): The output layer's EMA ``beta``.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): AdamW's moment decay rates.
        eps (`float`, defaults to `1e-8`): AdamW's ``eps`` (on the uncorrected ``sqrt(v)``, as the authors').
        adamw_lr_ratio (`float`, defaults to `1.0`): AdamW parameters step and decay with
            ``lr * adamw_lr_ratio`` (the authors' ``adam_lr / lr``).
        state_dtype (`str`, defaults to `"float32"`): Storage of the momentum buffer and moments.
        foreach (`bool` or `None`, defaults to `None`): ``False`` steps every parameter one at a time
            instead of in multi-tensor buckets (float32 weights of one shape stacked, bit for bit the same).
    """

    recipe = SCALE

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.9,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, adamw_lr_ratio: float = 1.0, *,
                 state_dtype: str = "float32", foreach: bool | None = None):
        params = list(params)
        default = {"scale_role": "hidden"} if takes_the_default(params, "scale_role") else None
        super().__init__(flat_as_targeted(params, "scale_role", "hidden"), lr=lr, weight_decay=weight_decay,
                         momentum=momentum, betas=betas, eps=eps, adamw_lr_ratio=adamw_lr_ratio,
                         state_dtype=state_dtype, foreach=foreach)
        self.target_default = default


register(MUON, Muon, state_precision="fp32", second_moment="none", target_key="use_muon", batched_targets=True,
         example_hparams={"lr": 2e-2})
register(SINKGD, SinkGD, state_precision="fp32", second_moment="none", target_key="use_sinkgd", batched_targets=True,
         example_hparams={"lr": 1e-2, "scale": 0.5})
register(SCALE, Scale, state_precision="fp32", second_moment="none", target_key="scale_role", batched_targets=True,
         embedding_groups={"input": {"scale_role": "embedding"}, "output": {"scale_role": "head"}},
         example_hparams={"lr": 1e-2})
