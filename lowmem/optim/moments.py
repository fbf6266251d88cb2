"""Moment rules and learning-rate rules: the "how is the direction computed" seam of the engine.

A :class:`MomentRule` turns a (possibly projected) float32 gradient into an update direction and
owns the state tensors it needs. It holds configuration only; per-parameter tensors live in the
optimizer's ``state[p]`` dict under the names in ``state_keys``, so checkpoints stay plain tensors.

A learning-rate rule maps ``(group, state, param)`` to the step size: a constant (``group["lr"]``)
or Adafactor's relative, parameter-scaled step size.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

import torch
from torch import Tensor

from . import functional as F
from .functional import adam as FA
from .functional.subset_norm import foreach_scalar

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_DISTRIBUTED = torch.distributed.is_available()


def state_dtype(group: dict[str, Any], param: Tensor) -> torch.dtype:
    """Storage dtype of float states for ``param`` under the group's ``state_dtype`` setting."""
    choice = group.get("state_dtype", "float32")
    if choice == "param":
        return param.dtype if param.is_floating_point() else torch.float32
    return _DTYPES[choice]


class ChunkState(dict):
    """A parameter's state as seen by one chunk of the chunked step: flat elements ``[start, stop)``.

    Entries that hold one value per element of the parameter are views of that range (written in
    place by the moment rule); other entries (step counters, per-tensor scalars) are the state's
    own tensors. ``extra`` carries what a rule computed for the whole tensor before the chunks
    (:meth:`MomentRule.prepare_chunks`) or needs to interpret the views (a chunk's top-k layout,
    its rows).
    """

    def __init__(self, state: dict[str, Tensor], start: int, stop: int, extra: dict[str, Any] | None = None):
        super().__init__(state)
        self.start, self.stop = start, stop
        self.extra: dict[str, Any] = dict(extra or {})


class MomentRule:
    """Base class: computes a direction from a gradient and keeps the moments it needs.

    Attributes:
        state_keys: Names of the state tensors this rule owns (reset or rotated when a subspace
            changes).
        applies_lr: ``True`` if :meth:`direction` already returns an ``lr``-scaled step (Adafactor,
            whose first moment averages lr-scaled updates); the engine then does not scale again.

    Optional hooks the engine looks up by ``getattr`` (``LowMemOptimizer._matrix_blocks``) for an unprojected batch
    of matrices ``[..., A, B]`` (fused MoE experts), stepped in blocks of whole matrices instead of one matrix at a
    time: ``supports_batch_for(shape, group, state)``; ``batch_direction(g [k, A, B], state views, group, t, lr)
    -> [k, A, B]`` (updates the views of the batch's stacked state in place); ``batch_transient_bytes(k, (A, B),
    group, state views, copy)`` (exact, with the direction beside the parameter block's copy). Without them a batch
    is stepped per matrix (racs and Subset-Norm have them: tests/test_batch_matrices.py).

    ``coupled_gradient(g, p, group, state) -> g'``: a gradient the rule's statistics see in place of ``g`` (torch's
    L2 decay ``g + wd p``: sgd / adagrad / rmsprop, lowmem/optim/recipes/classic.py), called by the engine's chunked
    step (``p`` the parameter's chunk) and whole step before :meth:`direction`; a rule with it returns 0 from
    :meth:`weight_decay_for` where it couples and counts the new tensor in :meth:`transient_bytes`. The foreach
    buckets do not call it: the classic rules' ``foreach_step_`` couples its bucket itself, and the engine's bucket of
    bfloat16 parameters calls the rule's ``bf16_bucket_couple_(g32s, ps, group)`` (the decay into the gradients'
    float32 copies, in place) before ``bf16_bucket_direction``. ``step_whole_from_piece_``, the projected paths and
    the batches of matrices do not call it (no rule with the hook takes them today): a rule that has the hook and
    one of those paths must be refused there or call it.
    """

    state_keys: tuple[str, ...] = ()
    #: Whether the rule counts its steps again from 1 when ``moment_policy="reset"`` zeroes its state at
    #: a refresh (the engine's ``moment_start``, :func:`~lowmem.optim.engine.moment_step`): rules whose
    #: every statistic is zeroed and whose bias corrections (Adam) or decay schedule (Adafactor's
    #: ``1 - t^-0.8``) assume zero-initialised statistics at step 1.
    restarts_on_reset: bool = False
    applies_lr: bool = False
    supports_foreach: bool = False  # True if foreach_step_ implements the whole step for plain groups
    #: Whether the chunked step's ``direction`` returns a new tensor that holds no reference to the gradient
    #: chunk it was given, so that chunk's float32 copy (a low-precision parameter) is freed before the parameter
    #: chunk's copy is made: the engine then counts one copy, not two (``_param_transient_bytes``). Only for a rule
    #: whose chunked :meth:`transient_bytes` counts the direction itself (at least 4 B per element).
    chunk_direction_is_new: bool = False
    #: Whether the chunked step's transient (:meth:`transient_bytes`, or ``chunk_transient_bytes``) counts the float32
    #: copies of a low-precision parameter's gradient and parameter chunks itself, phase by phase: the engine then
    #: calls it with ``copy=`` (4 bytes per element for such a parameter, 0 otherwise) and adds no copies of its own
    #: (``_param_transient_bytes``; Muon: its Newton-Schulz phase holds no gradient chunk, a batch's iterate is
    #: computed beside the block's gradient copy; SinkGD, Adam-mini, Subset-Norm). Not with stabilizers (their
    #: chunks are counted by the engine, phase by phase: ``Stabilizer.chunk_bytes``).
    chunk_counts_copies: bool = False
    #: Whether the rule computes in its state's precision: a float64 parameter's gradient is cast to float32 once by
    #: the engine when the state is float32 / bfloat16 (``LowMemOptimizer._casts_float64_grad``, counted 4 B per
    #: element), so the rule's temporaries are those of a float32 gradient, as its ``transient_bytes`` counts (CAME,
    #: Adafactor: before 2026-11-30 their mixed float64 temporaries were uncounted, came's 200 x 128 206,400 B
    #: traced for 103,712 reported). A float64 state (``state_dtype="param"``) computes in float64, uncast.
    computes_in_state_precision: bool = False

    def float64_param_bytes(self, group: dict[str, Any]) -> int:
        """With :attr:`computes_in_state_precision`: what the step of a float64 parameter (its gradient cast to
        float32) allocates beyond a float32 parameter's step and the cast, alive through the step."""
        return 0
    #: A rule whose chunked step allocates other than :meth:`transient_bytes` of a chunk (the whole-tensor form: its
    #: direction and statistics of ``numel`` elements) gives ``chunk_transient_bytes(numel, shape, group, state)``,
    #: the chunked step's transient with chunks of at most ``numel`` elements (the engine's ``_param_transient_bytes``
    #: asks it for a chunked step; Adafactor's passes over the row blocks). ``None``: :meth:`transient_bytes`.
    chunk_transient_bytes: Any = None
    # FSDP2 (lowmem.optim.sharded): True if prepare_chunks takes ``reduce=`` (a ShardReduce) and
    # reduces its whole-tensor statistics over the shards itself; ``reduced_dims`` names state
    # tensors that are the parameter's shape with one dimension reduced away (for checkpoints)
    sharded_stats: bool = False
    # (or "keepdim": reduced to size 1; "rows": 1-D, one entry per row of the parameter, saved as the
    # rows of (rows,) when uneven shards hold different row counts: lowmem.optim.sharded.state_to_dtensor)
    reduced_dims: dict[str, int | str] = {}

    def supports_foreach_for(self, shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor]) -> bool:
        """Whether :meth:`foreach_step_` steps a plain full-rank float32 parameter of ``shape`` with
        this ``state`` (empty before its first step). The engine decides per parameter, so a hybrid
        rule can bucket the parameters of its element-wise part, and keeps the answer while the group's
        settings it read (those :meth:`route_settings` covers: their summary), the state dict and the
        parameter's dtype / shape are unchanged (``LowMemOptimizer._route``): the answer must not read ``lr``
        nor change with the values of the state's tensors (their dtypes and shapes are fixed at allocation).
        Default: :attr:`supports_foreach`."""
        return self.supports_foreach

    def route_settings(self, group: dict[str, Any]) -> dict[str, Any] | None:
        """What this rule's path decisions (:meth:`supports_foreach_for`, :meth:`supports_foreach_direction`,
        :meth:`foreach_bucket_class`, :meth:`steps_pieces_whole`, ``fused_whole``, ``per_matrix``) take from
        settings a scheduler may write at every step (torch's ``OneCycleLR`` / ``CyclicLR`` with
        ``cycle_momentum``: ``betas``, ``momentum``): ``{setting: value}``, each value (compared with ``==``)
        determining every answer of those decisions as far as they read that setting. The engine keys a
        group's cached paths on these values instead of the settings themselves (``LowMemOptimizer._route``,
        ``engine._GroupEntry``), so a path is decided again only when a value changes (Subset-Norm's
        ``betas[0] > 0``: ``0.95 -> 0.85`` keeps the paths, ``0.9 -> 0`` decides them again); the decisions'
        other reads are recorded by key as for any rule. ``None`` (default): no setting is summarized, every
        setting a decision reads is compared by its value. A rule returning a setting here must not read
        anything else of it in those decisions (``tests/test_route2_settings.py`` compares the cached paths with
        paths decided at every step under such a scheduler), nor when the state is made: its :meth:`init_state` /
        ``init_state_sharded``, and every other part of a recipe using it, read such a setting only through the
        summary (``lowmem.optim.group_layout`` compares a setting that fixes the state's layout by the summary
        when the rule gives one; ``tests/test_engfix_layout_summary.py`` traces the reads of every registered
        recipe whose rule summarizes)."""
        return None

    def fused_step_(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Tensor], t: float,
                    lr: Any, chunk_numel: int | None) -> bool:
        """The whole per-parameter step of ``p`` (moments, decay, update) by a fused kernel, in place;
        returns whether it ran (the engine's plain step otherwise). Default: never."""
        return False

    def steps_pieces_whole(self, shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor]) -> bool:
        """Whether :meth:`foreach_step_` steps a tensor of ``shape`` with this ``state`` that reaches a
        bucket in flat pieces (larger than the engine's ``chunk_numel``) whole from its first piece
        (:func:`step_whole_from_piece_`, or unchunked) and skips the others: its pieces then allocate
        nothing of the bucket's multi-tensor step, whose transient
        (:meth:`foreach_transient_bytes`) the engine sums without them; the whole step's transient is
        the per-parameter one, which it reports on its own (``step_transient_bytes``); a tensor in pieces
        this answers no for is counted by its pieces' share of the buckets alone (since 2026-11-30: before,
        its per-parameter step was added too, 2,097,152 B over for a hybrid's 2**21-element AdamW vector).
        Default: no (the pieces are stepped element-wise with the bucket). The answer must be exact: no
        where the pieces are stepped whole leaves the whole step uncounted, yes where they are not leaves
        the pieces out of their buckets' sums; both under-report."""
        return False

    # True if foreach_step_ applies the decoupled weight decay after the update (the recipes with
    # decay_after_update: the engine buckets a recipe's parameters only where the two agree)
    foreach_decays_after: bool = False
    # True if foreach_step_ takes ``step_lr=``: the update's step size when it differs from the decay's
    # ``lr`` (a stabilizer's lr scale, SPAM's warm-up); the engine buckets stabilized parameters only then
    foreach_step_lr: bool = False
    # a learning-rate rule that foreach_step_ evaluates itself for each tensor of the bucket (called with
    # ``lr_rule=`` that rule: Adafactor's parameter-scaled step size); the engine buckets a recipe whose
    # lr rule is not constant_lr only when it is this one
    foreach_lr_rule: Any = None

    def foreach_bucket_class(self, shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor]) -> Any:
        """The class of foreach buckets a tensor of ``shape`` with this ``state`` (empty before its first
        step) fills: tensors of one class share buckets (each at most ``chunk_numel`` elements), those of
        another class fill their own. ``None`` (default): one class. A rule whose multi-tensor step
        stacks the tensors of one shape (the normalized hybrids' targets) returns the shape, so that a
        bucket's stack is as large as the chunk allows instead of a fraction of a bucket of mixed
        shapes (issue 15: a stack per shape and bucket is a fixed number of kernels). The answer must
        not change while the engine keeps a parameter's route (as :meth:`supports_foreach_for`)."""
        return None

    def weight_decay_for(self, group: dict[str, Any], state: dict[str, Tensor]) -> float:
        """The decoupled weight decay coefficient of a parameter with this ``state``: the engine's
        per-parameter step decays it by ``p *= 1 - lr * weight_decay_for(...)`` (a rule's ``foreach_step_`` decays
        its own bucket). Default: the group's ``weight_decay`` (0 for a recipe without it)."""
        return group.get("weight_decay", 0.0)

    def foreach_transient_bytes(self, numel: int) -> int:
        """Bytes :meth:`foreach_step_` allocates for a bucket of ``numel`` elements (float32
        parameters and state). Default: one float32 tensor of the bucket (AdamW's ``sqrt(v)``)."""
        return 4 * numel

    def foreach_bucket_transient_bytes(self, numel: int, members: list[tuple[int, dict[str, Tensor]]],
                                       group: dict[str, Any] | None = None) -> int:
        """Bytes :meth:`foreach_step_` allocates for one bucket of ``numel`` elements, whose
        ``members`` are ``(elements, state)`` of each tensor or piece in it (a rule whose cost differs
        between members, e.g. quantized and float32 moments, looks at their states), in the parameter
        ``group`` of the bucket (its hyperparameters, e.g. MicroAdam's block sizes; ``None`` when not
        known). Default: the same per element for all, :meth:`foreach_transient_bytes` ``(numel)``."""
        return self.foreach_transient_bytes(numel)

    def supports_foreach_direction(self, group: dict[str, Any], state: dict[str, Tensor], param: Tensor) -> bool:
        """Whether :meth:`foreach_direction` gives the directions of several projected (low-rank,
        float32) gradients at once for a parameter ``param`` with this ``state`` (empty before its
        first step): the engine's multi-tensor step of projected parameters (its answer cached as
        :meth:`supports_foreach_for`'s is). Default: no."""
        return False

    # True if foreach_direction takes ``lr`` as a list, one step size per gradient (each parameter's
    # from the recipe's lr rule, evaluated before any update: Adafactor's parameter-scaled step size),
    # and applies it itself when applies_lr; False: one step size for the bucket (constant_lr)
    foreach_direction_lrs: bool = False

    def foreach_direction(self, gs: list[Tensor], states: list[dict[str, Tensor]], group: dict[str, Any], t: float,
                          lr: Any) -> list[Tensor]:
        """:meth:`direction` of each float32 ``gs[i]`` with ``states[i]`` (all at step ``t``), as
        multi-tensor kernels, equal to the per-tensor form (when :meth:`supports_foreach_direction`)."""
        raise NotImplementedError(f"{type(self).__name__} has no multi-tensor direction")

    def foreach_direction_transient_bytes(self, numel: int) -> int:
        """Bytes :meth:`foreach_direction` allocates for ``numel`` elements in all, the returned
        directions included. Default: two float32 tensors of that size."""
        return 8 * numel

    def foreach_direction_bucket_transient_bytes(self, members: list[tuple[torch.Size, dict[str, Tensor]]]) -> int:
        """Bytes :meth:`foreach_direction` allocates for one bucket whose ``members`` are ``(shape, state)``
        of each projected gradient (a rule whose statistics depend on the shapes, e.g. Adafactor's row
        and column statistics, looks at them). Default: :meth:`foreach_direction_transient_bytes` of
        their elements."""
        return self.foreach_direction_transient_bytes(sum(math.prod(shape) for shape, _ in members))

    def init_state_sharded(self, state: dict[str, Tensor], shape: torch.Size, whole_shape: torch.Size,
                           group: dict[str, Any], param: Tensor, key: Tensor | None = None) -> None:
        """FSDP2: allocate for a local shard of ``shape`` of a parameter of ``whole_shape``; a rule
        whose layout depends on the shape (Subset-Norm's partition) decides it from the whole one.
        ``key``: the sharded parameter (the ``DTensor``; the engine always passes it): its mesh and
        placements say how many shards there are and which rows this one holds
        (:func:`~lowmem.optim.sharded.shard_rows`), what a shard's own shape cannot tell (Adam-mini:
        a shard of whole heads among shards that cut heads). Default: :meth:`init_state` of the shard."""
        self.init_state(state, shape, group, param)

    def replicated_state(self, key: str, group: dict[str, Any]) -> bool:
        """FSDP2: whether state ``key`` of a sharded parameter is a statistic of the whole tensor,
        equal on every rank (saved once in checkpoints, loadable onto any number of ranks)."""
        return False

    def sharded_transient_bytes(self, shape: torch.Size, whole_shape: torch.Size, shards: int, group: dict[str, Any],
                                state: dict[str, Tensor]) -> int | None:
        """FSDP2: the transient of stepping a local shard of ``shape`` (``shards`` shards of a
        parameter of ``whole_shape``) when the rule's sharded step gathers more than the shard (Muon's
        Newton-Schulz on the whole matrix); ``None`` (default): the shard's own chunked step, as
        :meth:`transient_bytes` of its chunks reports it."""
        return None

    def init_state(self, state: dict[str, Tensor], shape: torch.Size, group: dict[str, Any], param: Tensor) -> None:
        """Allocate this rule's tensors for a (possibly projected) gradient of ``shape``."""
        raise NotImplementedError

    def direction(self, g: Tensor, state: dict[str, Tensor], group: dict[str, Any], t: float, lr: Any) -> Tensor:
        raise NotImplementedError

    def reset(self, state: dict[str, Tensor]) -> None:
        """Zero every moment (used by moment resets on a subspace change and by SPAM)."""
        for k in self.state_keys:
            if k in state:
                state[k].zero_()

    # ---- the chunked step (see LowMemOptimizer.chunk_numel) ----

    def chunk_align(self, shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor]) -> int | None:
        """Element-wise rules: the number of elements every chunk boundary must be a multiple of
        (whole quantization blocks, whole top-k blocks, whole rows). ``None`` (default): the rule
        needs the whole tensor at once and the engine steps it unchunked."""
        return None

    def chunk_state(
        self, state: dict[str, Tensor], start: int, stop: int, shape: torch.Size, group: dict[str, Any], ctx: Any = None
    ) -> ChunkState:
        """The state restricted to flat elements ``[start, stop)`` (views: updates land in ``state``)."""
        raise NotImplementedError(f"{type(self).__name__} has no chunked form")

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized) -> Any:
        """Whole-tensor quantities needed before the first chunk is updated (a pass over the chunks;
        ``stabilized(start, stop, chunk_state)`` gives a chunk's stabilized gradient). Returns a
        context handed to :meth:`chunk_state` and :meth:`finish_chunks`; default: none."""
        return None

    def finish_chunks(self, state: dict[str, Tensor], ctx: Any) -> None:
        """Write what could only be written after every chunk was updated; default: nothing."""

    def transient_bytes(self, numel: int, shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor]) -> int:
        """Upper bound of the bytes :meth:`direction` allocates for ``numel`` elements of a tensor
        of ``shape`` (the returned direction included; state excluded). Default: 3 float32 tensors."""
        return 12 * numel

    def chunk_kept_bytes(self, numel: int, shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor]) -> int:
        """What the chunked step keeps through a chunk's write-back once its direction is freed (what
        :meth:`prepare_chunks` made for all the chunks): beside the parameter chunk's float32 copy and the random
        bits of its stochastic rounding (the engine's ``bf16_stochastic_round`` phase). Default 0 (the direction,
        which the write-back's bits replace, is the larger)."""
        return 0

    def direction_bytes(self, numel: int, shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor]) -> int:
        """What of :meth:`transient_bytes` is still alive when :meth:`direction` has returned (a projected
        parameter's combine-back runs beside it): the float32 direction, ``4 numel``; a rule whose step size
        is a tensor adds it."""
        return 4 * numel


#: The dtype of the gradient whose step is being counted (:func:`counting_gradient`; ``None``: not told).
_COUNTED_GRAD_DTYPE: ContextVar[torch.dtype | None] = ContextVar("lowmem_counted_grad_dtype", default=None)


@contextmanager
def counting_gradient(dtype: torch.dtype | None) -> Iterator[None]:
    """Within it, :func:`grad_element_bytes` reads ``dtype`` as the gradient's (the engine's transient counts of
    one parameter: ``LowMemOptimizer._param_transient_bytes``, ``_projected_bytes`` and its stabilizers'), in
    place of the group's scan: a rule's count is handed ``(numel, shape, group, state)``, not the parameter."""
    token = _COUNTED_GRAD_DTYPE.set(dtype)
    try:
        yield
    finally:
        _COUNTED_GRAD_DTYPE.reset(token)


def grad_element_bytes(group: dict[str, Any], stored: Tensor | None = None) -> int:
    """Bytes per element of the gradient a rule's step computes in, for a count (``transient_bytes``): 8 (float64)
    for a float64 state tensor ``stored`` (``state_dtype="param"`` of a float64 parameter; ``None``: a stateless rule) or in a group holding a float64 parameter
    (its gradient stays float64 beside a float32 / bfloat16 state: a rule's temporaries made in the gradient's
    dtype, ``buf.to(g.dtype)``, ``o.to(g.dtype)``, are float64), else 4 (float32, the engine's copy of a
    low-precision gradient). The engine hands a rule the parameter's state, not the parameter: a float32 state
    reads the same for a float32 and a float64 parameter, so a float32 parameter in a group with a float64 one is
    counted at float64 (a bound, never under; exact for groups of one dtype, FOUND_FP64SWEEP 1) unless the engine
    names the counted parameter's gradient dtype (:func:`counting_gradient`), which it does for every count of one
    parameter: then 8 for a float64 gradient, else 4 (before 2026-12-01 the scan alone: a float32 48 x 24 weight
    beside a float64 one in one group, the sweep's tiny model, Muon 12,672 B reported for 11,904 traced, adamw_sn
    5,184 for 5,000, SinkGD 5,344 for 5,280; now equal, FOUND_EST12 1). Before 2026-11-30 Muon counted 4 B per
    element of a float64 gradient: a float64 200 x 128 weight 153,600 B reported, 460,800 traced."""
    if stored is not None and stored.dtype == torch.float64:
        return 8
    told = _COUNTED_GRAD_DTYPE.get()
    if told is not None:
        return 8 if told == torch.float64 else 4
    return 8 if any(getattr(p, "dtype", None) == torch.float64 for p in group.get("params", ())) else 4


def _rounds_its_own_way(p: Tensor, group: dict[str, Any], state: dict[str, Tensor]) -> bool:
    """Whether the write-back of bfloat16 ``p`` is the engine's own (``_store``: ``bf16_stochastic_round``, or
    ``kahan_summation``'s compensation): a fused kernel that writes ``p`` rounded to nearest must not step it."""
    return p.dtype == torch.bfloat16 and bool(
        group.get("bf16_stochastic_round") or group.get("kahan_summation") or "kahan_comp" in state)


def sharded_group(group: dict[str, Any]) -> bool:
    """Whether ``group`` holds an FSDP2 (``DTensor``) parameter. A rule whose multi-tensor step
    computes a statistic of the whole tensor (one the shards would have to all-reduce: Adam-mini's
    whole-tensor block, Subset-Norm's column norms) refuses such groups in
    :meth:`MomentRule.supports_foreach_for`, so their parameters take the per-parameter step, which
    reduces over the shards. Costs nothing unless ``torch.distributed`` is initialized."""
    if not (_DISTRIBUTED and torch.distributed.is_initialized()):
        return False
    from .sharded import is_dtensor

    return any(is_dtensor(q) for q in group["params"])


def step_whole_from_piece_(rule: MomentRule, p_piece: Tensor, g_piece: Tensor, view: ChunkState,
                           group: dict[str, Any], t: float, lr: float, decay_after: bool) -> None:
    """The step of a whole tensor that reached a foreach bucket as flat pieces, for a rule whose
    statistics span blocks of elements (rows, heads, columns, the whole tensor).

    The engine hands a float32 tensor larger than ``chunk_numel`` to :meth:`MomentRule.foreach_step_`
    as flat pieces of ``chunk_numel`` elements (``view`` is the piece's :meth:`MomentRule.chunk_state`,
    which must record the tensor's state and shape in ``extra["parent"]`` / ``extra["shape"]``); a
    piece boundary need not fall on a block boundary. So the rule steps the whole tensor when its
    first piece arrives (``view.start == 0``; the caller skips the others) with its own chunked
    step, in chunks of the piece's size rounded to whole blocks (:meth:`MomentRule.chunk_align`):
    the engine's chunked step without stabilizers (the foreach path has none), the same operations
    in the same order, so the result equals ``foreach=False`` with the same ``chunk_numel``. The
    whole tensor is reached from the piece (a contiguous view at offset ``view.start``, as the
    engine guarantees for a tensor it splits); transient: the rule's for one chunk."""
    if view.start != 0:
        raise ValueError(f"{type(rule).__name__}: a tensor is stepped from its first piece, got one starting at {view.start}")
    state, shape = view.extra["parent"], view.extra["shape"]
    numel = math.prod(shape)
    pflat = p_piece.as_strided((numel,), (1,), p_piece.storage_offset())
    gflat = g_piece.as_strided((numel,), (1,), g_piece.storage_offset())
    align = rule.chunk_align(shape, group, state)
    if align is None:
        raise ValueError(f"{type(rule).__name__} has no chunked form for a tensor of shape {tuple(shape)}")
    size = max(align, (view.stop - view.start) // align * align)
    bounds = [(a, min(a + size, numel)) for a in range(0, numel, size)]
    ctx = rule.prepare_chunks(state, shape, group, t, lr, bounds, lambda start, stop, _: gflat[start:stop])
    wd = rule.weight_decay_for(group, state)  # (the engine's: StableAdamW's decouple_lr divides it by max_lr)
    for start, stop in bounds:
        d = rule.direction(gflat[start:stop], rule.chunk_state(state, start, stop, shape, group, ctx), group, t, lr)
        pc = pflat[start:stop]
        if not decay_after:
            F.decoupled_weight_decay_(pc, lr, wd)
        if rule.applies_lr:  # the direction is lr-scaled already (Adafactor)
            pc.sub_(d)
        else:
            F.apply_update_(pc, d, lr)
        if decay_after:
            F.decoupled_weight_decay_(pc, lr, wd)
        del d
    rule.finish_chunks(state, ctx)


class AdamMoments(MomentRule):
    """Adam's first and second moments (Kingma & Ba 2015, Algorithm 1).

    Args:
        eps_placement: ``"torch"`` adds ``eps`` after the bias correction of ``v``
            (``torch.optim.AdamW``); ``"hf"`` adds it to the raw ``sqrt(v)`` and folds the
            correction into the step size (transformers' legacy AdamW, galore-torch, fira).
    """

    state_keys = ("exp_avg", "exp_avg_sq")
    restarts_on_reset = True

    def __init__(self, eps_placement: str = "torch"):
        if eps_placement not in ("torch", "hf"):
            raise ValueError(f"eps_placement must be 'torch' or 'hf', got {eps_placement!r}")
        # the multi-tensor path (float32 storage) for both placements. Decay order: torch's placement
        # is AdamW's (decay before the update); every recipe with the "hf" placement (GaLore, Fira,
        # OSD, APOLLO, SPAM) decays after it, so its foreach step does too. The engine buckets a
        # recipe's parameters only where its decay_after_update agrees, so any other pairing steps
        # one tensor at a time.
        self.supports_foreach = True
        self.foreach_decays_after = eps_placement == "hf"
        self.eps_placement = eps_placement
        self._direction = F.adam_direction if eps_placement == "torch" else F.adam_direction_hf

    def init_state(self, state, shape, group, param):
        dtype = state_dtype(group, param)
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=param.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=param.device)

    def chunk_align(self, shape, group, state):
        return 1  # element-wise

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        view = ChunkState(state, start, stop)
        for k in self.state_keys:
            if k in state:  # (a 0-d moment too: the engine passes its gradient as view(-1)[start:stop], [1])
                view[k] = state[k].view(-1)[start:stop]
        return view

    # the direction is a new tensor (``denom``); the gradient chunk is only read by the moments' EMA
    chunk_direction_is_new = True

    def direction_bytes(self, numel, shape, group, state):
        """The direction :meth:`direction` returns: float64 with float64 moments (``state_dtype="param"`` of a
        float64 parameter; a projected gradient's float32 ``low`` promotes to it), else float32. (Before
        2026-11-30 counted float32: a float64 APOLLO weight's combine-back ran beside a direction twice as large.)"""
        m = state.get("exp_avg")
        return (8 if m is not None and m.dtype == torch.float64 else 4) * numel

    def transient_bytes(self, numel, shape, group, state):
        """The direction (float32; ``denom`` is reused for it); with low-precision storage also the
        float32 copies of both moments."""
        dtype = state["exp_avg"].dtype if "exp_avg" in state else torch.float32
        if dtype == torch.float64:  # float64 moments (state_dtype="param"): a float64 direction
            return 8 * numel
        return (12 if dtype != torch.float32 else 4) * numel

    def direction(self, g, state, group, t, lr):
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if m.dtype in (torch.float32, torch.float64):
            F.adam_moments_(m, v, g, beta1, beta2)
        else:  # low-precision storage: do the EMA in float32, store rounded
            m32, v32 = m.float(), v.float()
            F.adam_moments_(m32, v32, g, beta1, beta2)
            m.copy_(m32)
            v.copy_(v32)
            m, v = m32, v32
        return self._direction(m, v, t, beta1, beta2, group["eps"])

    def supports_foreach_direction(self, group, state, param):
        dtype = state["exp_avg"].dtype if "exp_avg" in state else state_dtype(group, param)
        return dtype == torch.float32

    def foreach_direction(self, gs, states, group, t, lr):
        """The moments (:func:`~lowmem.optim.functional.adam_moments_foreach_`) and the direction
        (:func:`~lowmem.optim.functional.adam_direction_foreach`, this rule's ``eps`` placement) of
        float32 moments: the same operations as :meth:`direction`, one kernel each for the list."""
        beta1, beta2 = group["betas"]
        ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        F.adam_moments_foreach_(ms, vs, gs, beta1, beta2)
        return F.adam_direction_foreach(ms, vs, t, beta1, beta2, group["eps"], self.eps_placement)

    def foreach_direction_transient_bytes(self, numel):
        """The directions and ``sqrt(v)`` (freed once the quotient exists): two float32 tensors."""
        return 8 * numel

    #: bfloat16 parameters join the multi-tensor buckets (the engine's ``_step_bf16_bucket``) with moments of
    #: these dtypes: :meth:`bf16_bucket_direction` computes in float32 what :meth:`direction` computes
    bf16_bucket_state_dtypes = (torch.float32, torch.bfloat16)

    def bf16_bucket_direction(self, g32s: list[Tensor], states: list[dict[str, Tensor]], group: dict[str, Any],
                              t: float, lr: Any) -> list[Tensor]:
        """:meth:`direction` of a bucket of bfloat16 parameters (pieces), one multi-tensor kernel per operation, the
        same operations in the same order (bit for bit on the CPU): ``g32s`` are the gradients' float32 copies,
        emptied (freed) once the moments are updated. float32 moments:
        :func:`~lowmem.optim.functional.adam_moments_foreach_` in place, then
        :func:`~lowmem.optim.functional.adam_direction_foreach` (new tensors). bfloat16 moments:
        float32 copies of both, updated and stored rounded to nearest (as :meth:`direction`), the direction of the
        unrounded copies divided into the first moment's copy in place
        (:func:`~lowmem.optim.functional.adam.adam_direction_foreach_into_`). Returns the float32 directions;
        allocates :meth:`bf16_bucket_transient_bytes` at most."""
        beta1, beta2 = group["betas"]
        ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        dtypes = {m.dtype for m in ms} | {v.dtype for v in vs}
        if dtypes == {torch.float32}:
            F.adam_moments_foreach_(ms, vs, g32s, beta1, beta2)
            g32s.clear()
            return F.adam_direction_foreach(ms, vs, t, beta1, beta2, group["eps"], self.eps_placement)
        if dtypes != {torch.bfloat16}:
            raise ValueError(f"AdamMoments.bf16_bucket_direction: the moments of one bucket are all float32 or all"
                             f" bfloat16, got {sorted(map(str, dtypes))}")
        m32s, v32s = FA.float32_copies(ms), FA.float32_copies(vs)
        F.adam_moments_foreach_(m32s, v32s, g32s, beta1, beta2)
        g32s.clear()
        torch._foreach_copy_(ms, m32s)
        torch._foreach_copy_(vs, v32s)
        return FA.adam_direction_foreach_into_(m32s, v32s, t, beta1, beta2, group["eps"], self.eps_placement)

    def bf16_bucket_transient_bytes(self, numel: int, states: list[dict[str, Tensor]], members=None, group=None) -> int:
        """What :meth:`bf16_bucket_direction` allocates at most for ``numel`` elements, the gradients' float32
        copies included: float32 moments, ``sqrt(v)`` beside the directions (8 B per element; the copies, 4 B,
        are freed before); bfloat16 moments, the copies of both beside the gradients' (12 B), then beside
        ``sqrt(v)``."""
        low = any(s["exp_avg"].dtype != torch.float32 for s in states if "exp_avg" in s)
        return (12 if low else 8) * numel

    foreach_step_lr = True

    #: :meth:`foreach_step_` steps a tensor's pieces element-wise with their buckets, never whole from its
    #: first piece (the engine's bound then leaves the per-parameter step of a tensor in pieces out).
    pieces_elementwise = True
    #: The engine passes :meth:`foreach_bucket_transient_bytes` the elements of the bucket's members whose
    #: parameter is not contiguous (``outside``): torch's fused kernel leaves them to the operations.
    foreach_counts_outside = True

    def foreach_bucket_transient_bytes(self, numel, members, group=None, outside=0):
        """:meth:`foreach_transient_bytes` (``sqrt(v)`` of the bucket), or where the bucket takes torch's
        fused kernel, which allocates nothing (:func:`~lowmem.optim.functional.adam.adamw_fused_`: its
        moments on a device of :func:`~lowmem.optim.functional.adam.fused_device`, the CPU included unless
        :data:`~lowmem.optim.functional.adam.FUSED_ON_CPU` is off, and a float ``lr``), only the
        ``sqrt(v)`` of the ``outside`` elements: the members whose parameter is not contiguous, which the
        multi-tensor operations step (:func:`~lowmem.optim.functional.adam.fused_indices`; gradients
        assumed contiguous, as the engine's bound assumes). Meta tensors (the estimator's, whose device
        is not known) count the multi-tensor operations."""
        if members and group is not None and not isinstance(group.get("lr"), Tensor):
            devices = {st["exp_avg"].device for _, st in members if "exp_avg" in st}
            if len(devices) == 1:
                device = next(iter(devices))
                if device.type != "meta" and FA.fused_device(device):
                    return self.foreach_transient_bytes(outside)
        return self.foreach_transient_bytes(numel)

    def fused_whole(self, p, group, state) -> bool:
        """Whether every step of ``p`` in a bucket is torch's fused AdamW kernel, which allocates nothing
        (the engine's ``_fused_whole``: then ``p`` joins a bucket whole, uncapped by ``chunk_numel``): a
        device of :func:`~lowmem.optim.functional.adam.fused_device`, a float ``lr``, ``p`` and both
        moments contiguous and of its dtype (:func:`~lowmem.optim.functional.adam.fused_indices`' layout;
        the gradient is the engine's to check)."""
        m, v = state.get("exp_avg"), state.get("exp_avg_sq")
        return (m is not None and v is not None and not _rounds_its_own_way(p, group, state)
                and FA.fused_device(p.device) and not isinstance(group.get("lr"), Tensor)
                and p.is_contiguous() and m.is_contiguous() and v.is_contiguous() and m.dtype == v.dtype == p.dtype
                and m.device == p.device
                # (a decay after the update of a low-precision parameter rounds it twice: fused_step_ refuses it)
                and not (self.foreach_decays_after and group.get("weight_decay", 0.0) != 0
                         and p.dtype not in FA._FUSED_DTYPES_APART))

    def fused_step_allocates_nothing(self, p, group, state) -> bool:
        """Whether :meth:`fused_step_` steps ``p`` (its gradient assumed contiguous and of ``p``'s dtype, as the
        engine's ``_fused_whole``): then the per-parameter step allocates nothing."""
        after = self.foreach_decays_after and group.get("weight_decay", 0.0) != 0
        return (group.get("foreach") is not False and self.fused_whole(p, group, state)
                and not (after and p.dtype not in (torch.float32, torch.float64)))

    def fused_step_(self, p, grad, group, state, t, lr, chunk_numel) -> bool:
        """The per-parameter step of ``p`` by torch's fused AdamW kernel
        (:func:`~lowmem.optim.functional.adam.adamw_fused_`, this rule's ``eps`` placement and decay order:
        :attr:`foreach_decays_after`) where it applies: a device of
        :func:`~lowmem.optim.functional.adam.fused_device` (the CPU too by default), the parameter, its
        gradient and both moments of one dtype (a bf16 parameter with ``state_dtype="param"`` or
        ``"bfloat16"``; torch's kernel takes no float32 moments of a bf16 parameter; not where the group has
        ``bf16_stochastic_round`` or ``kahan_summation``: the kernel rounds to nearest, the engine's write-back
        ``_store`` applies the option) and contiguous, a float
        ``lr``, and not ``foreach=False`` (the single-tensor reference). The kernel computes in float32
        and rounds the parameter and moments once, as the per-parameter step does; a decay after the
        update of a low-precision parameter would round it twice, so that case stays on the engine's step.
        Allocates nothing (whole tensors: ``chunk_numel`` is not needed). Returns whether it ran."""
        if (group.get("foreach") is False or not FA.fused_device(p.device) or "exp_avg" not in state
                or _rounds_its_own_way(p, group, state)):
            return False
        m, v = state["exp_avg"], state["exp_avg_sq"]
        wd = group.get("weight_decay", 0.0)
        after = self.foreach_decays_after and wd != 0
        if after and p.dtype not in (torch.float32, torch.float64):
            return False
        if not FA.fused_indices([p], [grad], [m], [v], lr):
            return False
        beta1, beta2 = group["betas"]
        FA.adamw_fused_([p], [grad], [m], [v], t, beta1, beta2, lr, 0.0 if after else wd, group["eps"],
                        eps_placement=self.eps_placement)
        if after:
            p.mul_(1.0 - lr * wd)
        return True

    def foreach_step_(self, params, grads, states, group, t, lr, step_lr=None) -> None:
        """Whole AdamW step (moments, decoupled decay, update) for float32 tensors sharing ``t``;
        with ``eps_placement="hf"`` the decay comes after the update (:attr:`foreach_decays_after`).
        ``step_lr``: the update's step size (default ``lr``; the decay always uses ``lr``). On a device
        with torch's fused AdamW kernel (the CPU too by default) the kernel steps the bucket
        (:func:`~lowmem.optim.functional.adamw_foreach_`, :func:`~lowmem.optim.functional.adam.adamw_fused_`)."""
        beta1, beta2 = group["betas"]
        wd = group.get("weight_decay", 0.0)
        F.adamw_foreach_(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            t, beta1, beta2, lr, 0.0 if self.foreach_decays_after else wd, group["eps"],
            eps_placement=self.eps_placement, step_lr=step_lr,
        )
        if self.foreach_decays_after and wd != 0:
            torch._foreach_mul_(params, foreach_scalar(params, 1.0 - lr * wd))

    def foreach_prepare(self, params, grads, states, group, t, lr, step_lr=None, fused_bucket=False):
        """:meth:`foreach_step_` prepared ahead (the engine's ``_prepare_buckets``, before the step's device read):
        the per-tensor checks and lists now (:func:`~lowmem.optim.functional.adam.adamw_foreach_prepare`), the
        kernels when the returned function is called; the same operations in the same order. ``fused_bucket``:
        the engine's bucket of the fused kernel, every member of which :meth:`fused_whole` admitted with its
        cached path (the layout checks are not repeated per tensor: ``adamw_foreach_prepare``'s ``all_fit``)."""
        beta1, beta2 = group["betas"]
        wd = group.get("weight_decay", 0.0)
        launch = FA.adamw_foreach_prepare(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            t, beta1, beta2, lr, 0.0 if self.foreach_decays_after else wd, group["eps"],
            eps_placement=self.eps_placement, step_lr=step_lr, all_fit=fused_bucket)
        if not (self.foreach_decays_after and wd != 0):
            return launch

        def launch_and_decay():
            launch()
            torch._foreach_mul_(params, foreach_scalar(params, 1.0 - lr * wd))

        return launch_and_decay


class FactoredMoments(MomentRule):
    """Adafactor's factored second moment with optional first moment (Shazeer & Stern 2018).

    Matrices (``ndim >= 2``) keep a row and a column statistic of the last two dimensions
    (Algorithm 4); vectors keep a full second moment (Algorithm 3). The update is clipped by its
    RMS (Section 6) and scaled by the step size; the optional first moment (``beta1``) then
    averages these *lr-scaled* updates, exactly as transformers' ``Adafactor`` does, so this rule
    sets ``applies_lr``.

    Group keys used: ``eps`` ``(eps1, eps2)``, ``clip_threshold``, ``decay_rate``, ``beta1``.
    """

    applies_lr = True
    computes_in_state_precision = True  # (a float64 gradient with a float32 / bf16 state: cast once by the engine)
    # (a chunk's direction is a new tensor, the gradient chunk only read: a low-precision gradient chunk's float32
    # copy is freed before the parameter chunk's is made; the engine's count of a bfloat16 / float16 weight's chunks)
    chunk_direction_is_new = True
    state_keys = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")
    restarts_on_reset = True
    # FSDP2 (lowmem.optim.sharded): prepare_chunks takes ``reduce`` (all-reduces over the shards of
    # dimension 0), and the row / column statistics are the parameter's shape with one dimension
    # reduced away: checkpoints shard them like the parameter, or replicate them (the columns of a
    # matrix sharded by rows)
    sharded_stats = True
    reduced_dims = {"exp_avg_sq_row": -1, "exp_avg_sq_col": -2}

    def init_state(self, state, shape, group, param):
        dtype, device = state_dtype(group, param), param.device
        if group.get("beta1") is not None:
            state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
        if len(shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=dtype, device=device)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=dtype, device=device)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def _layout_bytes(shape, group, state) -> tuple[int, int, int, int]:
        """``(rows, cols, low, m1)`` of the float32 temporaries' sizes: a factored tensor's row and column
        statistic sizes (``prod(shape[:-1])``, ``prod(shape[:-2]) shape[-1]``; 0, 0 for a full second moment);
        ``low``: 1 with low-precision statistics (their float32 copies); ``m1``: the float32 tensors the first
        moment adds to the update (0 without ``beta1``; its clone, and a low-precision moment's copy)."""
        factored = len(shape) >= 2 and ("exp_avg_sq_row" in state or "exp_avg_sq" not in state)
        rows = math.prod(shape[:-1]) if factored else 0
        cols = math.prod(shape[:-2]) * shape[-1] if factored else 0
        key = "exp_avg_sq_row" if factored else "exp_avg_sq"
        low = int(key in state and state[key].dtype != torch.float32)
        m1 = 0
        if group.get("beta1") is not None:
            m1 = 1 + int("exp_avg" in state and state["exp_avg"].dtype != torch.float32)
        return rows, cols, low, m1

    @staticmethod
    def _lr_bytes(group) -> int:
        """The step size :func:`adafactor_lr` returns, alive through the step: a float32 0-d tensor with
        ``scale_parameter`` (a constant ``lr``: nothing)."""
        return 4 if group.get("scale_parameter") else 0

    def float64_param_bytes(self, group):
        """A float64 parameter's step size (:func:`adafactor_lr` reads the parameter) is a float64 0-d tensor:
        4 bytes beyond :meth:`_lr_bytes`' float32 one."""
        return self._lr_bytes(group)

    def direction_bytes(self, numel, shape, group, state):
        """The update and the step size's 0-d tensor (:meth:`_lr_bytes`)."""
        return 4 * numel + self._lr_bytes(group)

    def transient_bytes(self, numel, shape, group, state):
        """The whole-tensor step (:meth:`direction` of ``numel`` elements of ``shape``), exact on float32 and
        low-precision statistics: first ``g^2 + eps1`` (kept until the statistics are updated) beside
        :func:`~lowmem.optim.functional.factored_rsqrt`'s row and column factors (``4 R``, ``4 C``) and their
        outer product (the update), ``8 n + 4 (R + C)``, with float32 copies of low-precision statistics
        (``4 (R + C)``; a full second moment: ``g^2`` and ``V^-1/2``, ``8 n``, and its copy ``4 n``); then the
        update beside the first moment's clone (and copy), ``4 n (1 + m1)``; and the step size's 0-d tensor."""
        rows, cols, low, m1 = self._layout_bytes(shape, group, state)
        w = self._grad_bytes(state)
        if rows:
            first = (w + 4) * numel + 4 * (rows + cols) * (1 + low)
        else:
            first = (w + 4) * numel + 4 * numel * low
        return self._lr_bytes(group) * w // 4 + max(first, 4 * numel * (1 + m1))

    @staticmethod
    def _grad_bytes(state) -> int:
        """Bytes per element of the gradient the step reads: 8 with float64 statistics (``state_dtype="param"`` of a
        float64 parameter, uncast: ``g^2 + eps1`` float64; the statistics' ``.float()`` copies, the factors and the
        update float32), else 4 (a float64 gradient beside float32 / bf16 statistics is cast to float32 by the
        engine, :attr:`computes_in_state_precision`). The step size of a float64 parameter is a float64 0-d tensor.
        (Before 2026-11-30 float64 statistics were counted as low-precision ones with a float32 ``g^2``: a 64 x 24
        weight 12,992 B reported, 19,136 traced.)"""
        key = "exp_avg_sq_row" if "exp_avg_sq_row" in state else "exp_avg_sq"
        return 8 if key in state and state[key].dtype == torch.float64 else 4

    def chunk_transient_bytes(self, numel, shape, group, state):
        """The chunked step of a matrix (:meth:`prepare_chunks` and :meth:`_chunk_direction`) with chunks of at
        most ``numel`` elements (whole rows of ``shape (m, n)``), exact: beside the step size's 0-d tensor and
        float32 copies of low-precision statistics (``4 (m + n)``, in the two passes), the second pass holds
        the column sums, the row mean, ``(R / mean(R))^-1/2``, ``C^-1/2``, the sum of squares, a chunk's
        update and its norm (``8 n + 4 m + 12 + 4 c``; the first pass's ``g^2`` and column sums are less);
        the directions hold the two factors, the clip divisor, the update and the first moment's clone (and
        copy), ``4 (m + n) + 4 + 4 c (1 + m1)``. A vector (reached only as a sharded parameter's whole
        shard) or a batched matrix: :meth:`transient_bytes`."""
        if len(shape) != 2:
            return self.transient_bytes(numel, shape, group, state)
        m, n = shape
        _, _, low, m1 = self._layout_bytes(shape, group, state)
        prepare = 4 * (m + n) * low + 8 * n + 4 * m + 12 + 4 * numel
        direction = 4 * (m + n) + 4 + 4 * numel * (1 + m1)
        return self._lr_bytes(group) + max(prepare, direction)

    # ---- the chunked step: blocks of whole rows of a matrix ----

    def chunk_align(self, shape, group, state):
        if len(shape) != 2 or "exp_avg_sq_row" not in state:
            return None  # vectors (full second moment) and batched matrices: whole tensors
        return shape[1]

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        rows = (start // shape[1], stop // shape[1]) if len(shape) == 2 else None  # (a sharded vector: whole)
        view = ChunkState(state, start, stop, {"rows": rows, "factors": ctx, "parent": state, "shape": shape})
        if "exp_avg" in state:
            view["exp_avg"] = state["exp_avg"].view(-1)[start:stop]
        return view

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized, reduce=None):
        """The factored second moment (Algorithm 4, lines 5-6: row means per block of rows, column
        means summed over the blocks) and the RMS of the whole update (Section 6), from two passes
        over the row blocks; returns ``{"r": row factor, "c": column factor, "clip": clip divisor}``.

        ``reduce`` (an FSDP2 parameter's local shard of rows, :class:`~lowmem.optim.sharded.ShardReduce`):
        the row statistics of the shard's rows are local; the column sums, the row statistic's sum
        (its mean in ``V_hat = R C / mean(R)``) and the row count are summed over the shards (one
        all-reduce of ``n + 2`` numbers), the update's sum of squares too (one scalar), so the step
        equals the unsharded one. Vectors and batched matrices (a shard of whole matrices) are
        stepped whole (:meth:`_prepare_whole`).
        """
        if len(shape) != 2:
            return self._prepare_whole(state, shape, group, t, bounds, stabilized, reduce)
        eps1, (m, n) = group["eps"][0], shape
        beta2t = F.adafactor_beta2(t, group["decay_rate"])
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row32, col32 = row.float(), col.float()
        col_sum = torch.zeros_like(col32)
        for start, stop in bounds:
            g2 = stabilized(start, stop, self.chunk_state(state, start, stop, shape, group)).square().add_(eps1).view(-1, n)
            row32[start // n : stop // n].mul_(beta2t).add_(g2.mean(dim=-1), alpha=1.0 - beta2t)
            col_sum.add_(g2.sum(dim=-2))
            del g2
        if reduce is None:
            rows, row_mean = m, row32.mean(dim=-1, keepdim=True)
        else:  # sums over every shard's rows: [column sums, sum of R, number of rows]
            sums = reduce.sum_(torch.cat([col_sum, row32.sum().view(1), col_sum.new_full((1,), m)]))
            col_sum, rows = sums[:n], sums[n + 1]
            row_mean = sums[n : n + 1] / rows
        col32.mul_(beta2t).add_(col_sum.div_(rows), alpha=1.0 - beta2t)
        if row32 is not row:
            row.copy_(row32)
            col.copy_(col32)
        r_factor = (row32 / row_mean).rsqrt_().unsqueeze(-1)
        c_factor = col32.unsqueeze(-2).rsqrt()
        sq = torch.zeros((), dtype=torch.float32, device=row.device)
        for start, stop in bounds:
            g = stabilized(start, stop, self.chunk_state(state, start, stop, shape, group))
            u = torch.mul(r_factor[start // n : stop // n], c_factor).mul_(g.view(-1, n))
            sq.add_(torch.linalg.vector_norm(u).square_())
            del u
        if reduce is not None:
            reduce.sum_(sq)
        rms = sq.sqrt_() / (math.sqrt(m * n) if reduce is None else (rows * n).sqrt())
        return {"r": r_factor, "c": c_factor, "clip": (rms / group["clip_threshold"]).clamp_(min=1.0)}

    def _prepare_whole(self, state, shape, group, t, bounds, stabilized, reduce):
        """A vector (full second moment) or a batched matrix, reached here only as an FSDP2 local
        shard stepped whole (``bounds`` is ``[(0, numel)]`` or empty): its statistics are local
        (a vector's are element-wise; a batched matrix's shard holds whole matrices), only the
        update's RMS is summed over the shards. Returns ``{"u": unclipped update, "clip": ...}``."""
        numel = math.prod(shape)
        if [tuple(b) for b in bounds] not in ([], [(0, numel)]):
            raise ValueError(f"Adafactor: a {len(shape)}-D tensor is stepped whole, got chunks {bounds}")
        g = stabilized(0, numel, self.chunk_state(state, 0, numel, shape, group)).view(shape)
        u = self._unclipped_update(g, state, group, t)
        sums = torch.stack([torch.linalg.vector_norm(u).square(), torch.tensor(float(numel), device=u.device)])
        if reduce is not None:
            reduce.sum_(sums)
        rms = (sums[0] / sums[1]).sqrt_()
        return {"u": u, "clip": (rms / group["clip_threshold"]).clamp_(min=1.0)}

    def _chunk_direction(self, g, state, group, lr):
        f = state.extra["factors"]
        if "u" in f:  # stepped whole (_prepare_whole): the update is computed already
            u = f["u"].view(-1)[state.start : state.stop].div(f["clip"])
            return _adafactor_first_moment(u.mul_(lr), state, group)
        r0, r1 = state.extra["rows"]
        u = torch.mul(f["r"][r0:r1], f["c"]).mul_(g.view(r1 - r0, -1)).div_(f["clip"]).view(-1)
        return _adafactor_first_moment(u.mul_(lr), state, group)

    def direction(self, g, state, group, t, lr):
        if isinstance(state, ChunkState) and state.extra.get("factors") is not None:
            return self._chunk_direction(g, state, group, lr)
        u = self._unclipped_update(g, state, group, t)
        F.clip_by_rms_(u, group["clip_threshold"])
        return _adafactor_first_moment(u.mul_(lr), state, group)

    # ---- the multi-tensor step ----

    def supports_foreach_for(self, shape, group, state):
        """Every shape (vectors, matrices, batched matrices: factored on the last two dimensions,
        stacked with the others of their shape), not in an FSDP2 (sharded) group: its column
        statistics, the update's RMS and the parameter's RMS need the shards' sums
        (:meth:`prepare_chunks` and :func:`adafactor_lr` all-reduce them)."""
        return not sharded_group(group)

    def steps_pieces_whole(self, shape, group, state):
        """Always: a matrix in pieces is stepped from its first one by rows, a vector or a batched
        matrix whole (:meth:`foreach_step_`)."""
        return True

    def foreach_step_(self, params, grads, states, group, t, lr, lr_rule=None) -> None:
        """A bucket's whole step: the step sizes (``lr_rule``: :func:`adafactor_lr`, evaluated for
        every tensor by :func:`~lowmem.optim.functional.adafactor_lr_foreach`; ``None``: the constant
        ``lr``), then :func:`~lowmem.optim.functional.adafactor_foreach_`. A tensor larger than the
        engine's ``chunk_numel`` arrives in flat pieces and is stepped whole from its first one as
        the per-parameter step does: a matrix chunked by rows
        (:func:`~lowmem.optim.moments.step_whole_from_piece_`), a vector or a batched matrix unchunked."""
        if lr_rule is not None and lr_rule is not self.foreach_lr_rule:
            raise ValueError(f"{type(self).__name__}.foreach_step_: no multi-tensor form of the lr rule {lr_rule!r}")
        whole = []
        for p, g, s in zip(params, grads, states):
            if not isinstance(s, ChunkState):
                whole.append((p, g, s))
                continue
            if s.start != 0:
                continue
            state, shape = s.extra["parent"], s.extra["shape"]
            numel = math.prod(shape)
            pw = p.as_strided(shape, torch.empty(shape, device="meta").stride(), p.storage_offset())
            step_lr = lr if lr_rule is None else lr_rule(group, state, pw, t)
            if len(shape) == 2:
                step_whole_from_piece_(self, p, g, s, group, t, step_lr, decay_after=False)
            else:  # a vector or a batched matrix: whole (its update's RMS spans it), as the per-parameter step
                gw = g.as_strided((numel,), (1,), g.storage_offset()).view(shape)
                d = self.direction(gw, state, group, t, step_lr)
                F.decoupled_weight_decay_(pw, step_lr, group.get("weight_decay", 0.0))
                pw.sub_(d)
                del d
        if not whole:
            return
        ps, gs, ss = (list(x) for x in zip(*whole))
        if lr_rule is None:
            lrs = [lr] * len(ps)
        else:
            lrs = F.adafactor_lr_foreach(ps, *self.foreach_lr_form(group, t), eps2=group["eps"][1])
        second = [(s["exp_avg_sq_row"], s["exp_avg_sq_col"]) if "exp_avg_sq_row" in s else (s["exp_avg_sq"],)
                  for s in ss]
        beta1 = group.get("beta1")
        F.adafactor_foreach_(ps, gs, second, [s["exp_avg"] for s in ss] if beta1 is not None else None, lrs,
                             F.adafactor_beta2(t, group["decay_rate"]), group["eps"][0], group["clip_threshold"],
                             beta1, group.get("weight_decay", 0.0))

    # ---- bfloat16 parameters in the multi-tensor buckets (the engine's _step_bf16_bucket) ----

    #: the statistics' dtypes :meth:`bf16_bucket_direction` takes (bfloat16 ones on float32 copies)
    bf16_bucket_state_dtypes = (torch.float32, torch.bfloat16)
    # (bf16_bucket_lr_rule: :func:`adafactor_lr`, set with foreach_lr_rule below; the engine buckets bfloat16
    # parameters of a recipe whose lr rule is not constant_lr only when it is this one)

    def bf16_bucket_lrs(self, p32s: list[Tensor], states: list[dict[str, Tensor]], group: dict[str, Any],
                        t: float) -> float | Tensor:
        """The step sizes of a bucket of whole bfloat16 parameters from their float32 copies ``p32s`` (what the
        per-parameter step's :func:`adafactor_lr` reads, ``p.float()``): Section 8's ``max(eps2, RMS(X_{t-1}))
        rho_t`` by :func:`~lowmem.optim.functional.adafactor_lr_foreach` (the float32 buckets' form, equal bit for
        bit), one float32 tensor (entry ``i``: parameter ``i``'s); ``rho_t`` itself, a float, without
        ``scale_parameter``. Allocates :meth:`bf16_bucket_lr_bytes`."""
        lrs = F.adafactor_lr_foreach(p32s, *self.foreach_lr_form(group, t), eps2=group["eps"][1])
        return lrs[0] if isinstance(lrs, list) else lrs

    @staticmethod
    def bf16_bucket_lr_bytes(k: int, group: dict[str, Any]) -> tuple[int, int]:
        """``(peak, kept)`` of :meth:`bf16_bucket_lrs` for ``k`` parameters: with ``scale_parameter`` the ``k``
        0-d norms beside their stack (``8 k``), then the stack (``4 k``); else nothing (a float)."""
        return (8 * k, 4 * k) if group["scale_parameter"] else (0, 0)

    def bf16_bucket_direction(self, g32s, states, group, t, lr):
        """:meth:`direction` of a bucket of whole bfloat16 parameters:
        :func:`~lowmem.optim.functional.adafactor_direction_foreach` of the gradients' float32 copies ``g32s``
        (emptied at the end) with the step sizes ``lr`` (:meth:`bf16_bucket_lrs`' tensor, or a float), a group of
        same-shape tensors at a time, each direction the per-parameter step's bit for bit; bfloat16 statistics (and
        first moment) are updated on float32 copies and stored rounded to nearest, the direction the unrounded
        copies' (as :meth:`_unclipped_update` and :func:`_adafactor_first_moment`). Returns the lr-scaled float32
        directions; allocates :meth:`bf16_bucket_transient_bytes`."""
        beta1 = group.get("beta1")
        # (each statistic's members: a bucket holds factored matrices and vectors)
        stored = {k: [i for i, s in enumerate(states) if k in s] for k in self.state_keys}
        dtypes = {states[i][k].dtype for k, idx in stored.items() for i in idx}
        if dtypes not in ({torch.float32}, {torch.bfloat16}):
            raise ValueError(f"FactoredMoments.bf16_bucket_direction: the statistics of one bucket are all float32 or"
                             f" all bfloat16, got {sorted(map(str, dtypes))}")
        low = dtypes == {torch.bfloat16}
        work = [dict(s) for s in states]
        if low:  # (float32 copies of every statistic, in the states' stead)
            for k, idx in stored.items():
                for i, x32 in zip(idx, FA.float32_copies([states[i][k] for i in idx])):
                    work[i][k] = x32
        second = [(s["exp_avg_sq_row"], s["exp_avg_sq_col"]) if "exp_avg_sq_row" in s else (s["exp_avg_sq"],)
                  for s in work]
        ds = F.adafactor_direction_foreach(g32s, second, [s["exp_avg"] for s in work] if beta1 is not None else None,
                                           lr if isinstance(lr, Tensor) else [lr] * len(g32s),
                                           F.adafactor_beta2(t, group["decay_rate"]), group["eps"][0],
                                           group["clip_threshold"], beta1)
        g32s.clear()
        if low:
            for k, idx in stored.items():
                if idx:
                    torch._foreach_copy_([states[i][k] for i in idx], [work[i][k] for i in idx])
        return ds

    def bf16_bucket_transient_bytes(self, numel, states, members=None, group=None):
        """:meth:`bf16_bucket_direction` of ``members`` (``(elements, state)``, ``numel`` elements): the gradients'
        float32 copies (4 B per element) beside :func:`~lowmem.optim.functional.adafactor_direction_foreach`'s
        groups in order (the directions of the groups done and this one's, one more float32 tensor of it and its
        statistics, :func:`adafactor_groups_bytes`, and where the group's entries of a tensor of step sizes are
        not consecutive their stack, ``4 k``: :func:`_bf16_lr_stacks`); at the end every direction."""
        if members is None:  # (the groups need each member's elements: a state is empty before its first step)
            raise TypeError("FactoredMoments.bf16_bucket_transient_bytes needs members=, the bucket's"
                            " (elements, state)")
        # (bfloat16 statistics: their float32 copies, alive through the direction)
        copies = sum(4 * st[k].numel() for _, st in members for k in self.state_keys
                     if k in st and st[k].dtype == torch.bfloat16)
        layouts = [(_second_moment_layout(st), n) for n, st in members]
        out = 0
        for large in _stacking([st for _, st in members]):
            worst = done = 0
            for (n, stats), lr_stack in zip(adafactor_groups_bytes(layouts, large), _bf16_lr_stacks(layouts, large)):
                done += 4 * n
                worst = max(worst, done + 4 * n + stats + lr_stack)
            out = max(out, worst, done)
        return 4 * numel + copies + out

    # ---- the projected multi-tensor step (GaLore with Adafactor) ----

    foreach_direction_lrs = True

    def supports_foreach_direction(self, group, state, param):
        """Projected gradients with float32 statistics, not in an FSDP2 group (the engine's
        multi-tensor step of projected parameters; it also needs the engine to hand one step size per
        gradient: :attr:`~MomentRule.foreach_direction_lrs`)."""
        if sharded_group(group):
            return False
        if state:
            return all(state[k].dtype == torch.float32 for k in self.state_keys if k in state)
        return state_dtype(group, param) == torch.float32

    def foreach_direction(self, gs, states, group, t, lr):
        """:meth:`direction` of each projected gradient ``gs[i]`` (float32) with ``states[i]``, all at
        step ``t``; ``lr``: one step size per gradient (floats or 0-d tensors), or one for all:
        :func:`~lowmem.optim.functional.adafactor_direction_foreach`, equal bit for bit to
        :meth:`direction` of each."""
        lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(gs)
        second = [(s["exp_avg_sq_row"], s["exp_avg_sq_col"]) if "exp_avg_sq_row" in s else (s["exp_avg_sq"],)
                  for s in states]
        beta1 = group.get("beta1")
        return F.adafactor_direction_foreach(gs, second, [s["exp_avg"] for s in states] if beta1 is not None else None,
                                             lrs, F.adafactor_beta2(t, group["decay_rate"]), group["eps"][0],
                                             group["clip_threshold"], beta1)

    def foreach_lr_form(self, group: dict[str, Any], t: float) -> tuple[float, bool]:
        """:attr:`foreach_lr_rule` (:func:`adafactor_lr`) as ``(rho_t, scale_parameter)`` for
        :func:`~lowmem.optim.functional.adafactor_lr_foreach`: the step size is ``rho_t``, times
        ``max(eps2, RMS(X_{t-1}))`` when the second is set."""
        rho = F.adafactor_relative_lr(t, group["warmup_init"]) if group["relative_step"] else group["lr"]
        return rho, group["scale_parameter"]

    def foreach_transient_bytes(self, numel):
        """:func:`~lowmem.optim.functional.adafactor_foreach_`, a group of same-shape tensors at a
        time: two float32 tensors of the group (``g^2 + eps1`` turned into the updates, next to the
        stacked second moments, the stacked gradients, the stacked first moments or ``lr wd X``),
        at most two of the bucket; without the states (shapes) at hand, the statistics are left out
        (:meth:`foreach_bucket_transient_bytes` counts them). A tensor stepped from its pieces allocates
        its per-parameter step's transient (the engine reports that separately)."""
        return 8 * numel

    def foreach_bucket_transient_bytes(self, numel, members, group=None):
        """:func:`~lowmem.optim.functional.adafactor_foreach_` of a bucket whose ``members`` are
        ``(elements, state)``: the largest group's two float32 tensors and its statistics
        (:func:`adafactor_groups_bytes`, grouped as on the statistics' device: every same-shape set
        stacked off the CPU, :func:`_stacking`); each group's are freed before the next one's. Plus the step
        sizes, at most four float32 per member (:func:`~lowmem.optim.functional.adafactor_lr_foreach`'s
        norms, scales and step sizes, a group's copy of them and of ``lr wd``; measured 8-12 B)."""
        layouts = [(_second_moment_layout(st), n) for n, st in members]
        return max((8 * n + stats for large in _stacking([st for _, st in members])
                    for n, stats in adafactor_groups_bytes(layouts, large)), default=0) + 16 * len(members)

    def foreach_direction_bucket_transient_bytes(self, members):
        """:func:`~lowmem.optim.functional.adafactor_direction_foreach` of projected gradients
        ``(shape, state)``, its groups computed in order: the directions of the groups done (float32, kept)
        and of this one, one more float32 tensor of it (the stacked gradients or first moments) and its
        row and column statistics (:func:`adafactor_groups_bytes`); at the end every direction."""
        layouts = [(_second_moment_layout(st, shape), math.prod(shape)) for shape, st in members]
        out = 0
        for large in _stacking([st for _, st in members]):
            worst = done = 0
            for n, stats in adafactor_groups_bytes(layouts, large):
                done += 4 * n
                worst = max(worst, done + 4 * n + stats)
            out = max(out, worst, done)
        return out

    def _unclipped_update(self, g, state, group, t):
        """Update the second-moment statistics with ``g`` and return ``g / sqrt(V_hat)`` (Algorithms
        3-4 before the clipping)."""
        eps1 = group["eps"][0]
        beta2t = F.adafactor_beta2(t, group["decay_rate"])
        g2 = (g * g).add_(eps1)
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row32, col32 = row.float(), col.float()
            F.factored_second_moment_(row32, col32, g2, beta2t)
            if row32 is not row:
                row.copy_(row32)
                col.copy_(col32)
            u = F.factored_rsqrt(row32, col32).mul_(g)
        else:
            v = state["exp_avg_sq"]
            v32 = v.float()
            v32.mul_(beta2t).add_(g2, alpha=1.0 - beta2t)
            if v32 is not v:
                v.copy_(v32)
            u = v32.rsqrt().mul_(g)
        return u


def _second_moment_layout(state: dict[str, Tensor], shape: torch.Size | None = None) -> tuple:
    """``(kind, row shape, column shape)`` of a tensor's Adafactor statistics (kind 2: factored, 1: a
    full second moment of ``shape``), from its state (or, before its first step, its shape)."""
    if "exp_avg_sq_row" in state:
        return 2, tuple(state["exp_avg_sq_row"].shape), tuple(state["exp_avg_sq_col"].shape)
    if "exp_avg_sq" in state:
        return 1, tuple(state["exp_avg_sq"].shape), ()
    if shape is not None and len(shape) >= 2:
        return 2, tuple(shape[:-1]), tuple(shape[:-2]) + tuple(shape[-1:])
    return 1, tuple(shape or ()), ()


def _stacking(states: list[dict[str, Tensor]]) -> tuple[bool, ...]:
    """The groupings of :func:`~lowmem.optim.functional.adafactor.stack_groups` a bucket with these
    states may be stepped with (``large`` of :func:`adafactor_groups_bytes`): its statistics' device's
    (:func:`~lowmem.optim.functional.adafactor.stacks_large`), or both where it is not known (meta
    tensors, the estimator's; no state yet): the report is then the larger."""
    from .functional.adafactor import stacks_large

    devices = {st[k].device for st in states for k in ("exp_avg_sq_row", "exp_avg_sq") if k in st}
    if len(devices) == 1:
        device = next(iter(devices))
        if device.type != "meta":
            return (stacks_large(device),)
    return (False, True)


def adafactor_groups_bytes(members: list[tuple[tuple, int]], large: bool = False) -> list[tuple[int, int]]:
    """``(elements, statistics bytes)`` of each group :func:`~lowmem.optim.functional.adafactor.stack_groups`
    forms (in its order: first appearance; at most :func:`~lowmem.optim.functional.adafactor.group_cap`
    elements a group; ``large``: tensors of any size stacked, the grouping of every device but the CPU)
    from tensors given as ``(second-moment layout, elements)`` (:func:`_second_moment_layout`),
    assumed contiguous (stacked, the larger case; a non-contiguous one forms a group alone). A factored
    group of ``k`` tensors with ``R`` row and ``C`` column statistics each holds, next to its updates,
    the stacked statistics (``k > 1``; a lone tensor's are views), ``(R / mean(R))^-1/2`` and
    ``C^-1/2``: ``4 k (R + C)`` bytes twice (once for a lone tensor); a group of vectors only its stacked
    second moments, one float32 tensor of the group (counted with the group's second tensor)."""
    from .functional.adafactor import STACK_NUMEL, group_cap

    cap = group_cap([n for _, n in members], large)
    groups: dict[tuple, list[tuple]] = {}
    for i, (layout, n) in enumerate(members):
        groups.setdefault((layout, n) if large or n < STACK_NUMEL else (i,), []).append((layout, n))
    out = []
    for tensors in groups.values():
        (kind, rows, cols), n = tensors[0]
        per = max(1, cap // max(1, n))  # (at most group_cap elements a group)
        for a in range(0, len(tensors), per):
            k = len(tensors[a:a + per])
            stats = 4 * k * (math.prod(rows) + math.prod(cols)) * (2 if k > 1 else 1) if kind == 2 else 0
            out.append((k * n, stats))
    return out


def _bf16_lr_stacks(members: list[tuple[tuple, int]], large: bool = False) -> list[int]:
    """For each group of :func:`adafactor_groups_bytes` (same ``members``, order and grouping): the bytes of the
    stack :func:`~lowmem.optim.functional.adafactor._group_lr` makes of a tensor of step sizes' entries, ``4 k``
    where the group's ``k > 1`` tensors are not consecutive members (consecutive ones: a slice, nothing made)."""
    from .functional.adafactor import STACK_NUMEL, group_cap

    cap = group_cap([n for _, n in members], large)
    groups: dict[tuple, list[int]] = {}
    for i, (layout, n) in enumerate(members):
        groups.setdefault((layout, n) if large or n < STACK_NUMEL else (i,), []).append(i)
    out = []
    for idx in groups.values():
        per = max(1, cap // max(1, members[idx[0]][1]))
        for a in range(0, len(idx), per):
            part = idx[a:a + per]
            out.append(0 if part == list(range(part[0], part[0] + len(part))) else 4 * len(part))
    return out


def _adafactor_first_moment(u: Tensor, state: Any, group: dict[str, Any]) -> Tensor:
    """Adafactor's optional first moment of the scaled update (Shazeer & Stern 2018, Alg. 4 with
    beta1): ``m <- beta1 m + (1 - beta1) u``, returned as a new tensor; ``u`` itself without beta1."""
    beta1 = group.get("beta1")
    if beta1 is None:
        return u
    m = state["exp_avg"]
    m32 = m.float()
    m32.mul_(beta1).add_(u, alpha=1.0 - beta1)
    if m32 is not m:
        m.copy_(m32)
    return m32.clone()


# ---- learning-rate rules --------------------------------------------------------------------


def constant_lr(group: dict[str, Any], state: dict[str, Tensor], p32: Tensor, t: float) -> float:
    """The group's learning rate, as set by the user or a scheduler."""
    return group["lr"]


def adafactor_lr(group: dict[str, Any], state: dict[str, Tensor], p32: Tensor, t: float,
                 reduce: Any = None, p_rms: Tensor | None = None) -> float | Tensor:
    """Adafactor's step size ``alpha_t = max(eps2, RMS(X_{t-1})) rho_t`` (Section 8).

    ``rho_t`` is the relative step size when ``relative_step`` is set, else ``group["lr"]``; the
    parameter scale applies when ``scale_parameter`` is set. Returns a 0-d tensor in that case, so
    no host synchronisation is needed. ``reduce`` (an FSDP2 parameter's local shard,
    :class:`~lowmem.optim.sharded.ShardReduce`): the parameter's RMS over every shard (its sum of
    squares and element count summed: one all-reduce of 2 numbers). ``p_rms``: the parameter's RMS computed by
    the caller (the engine's chunked step of a bfloat16 / float16 parameter, ``engine.chunked_rms``: no float32
    copy of the whole parameter); ``p32`` is then not read.
    """
    rho = F.adafactor_relative_lr(t, group["warmup_init"]) if group["relative_step"] else group["lr"]
    if not group["scale_parameter"]:
        return rho
    if p_rms is not None:
        return p_rms.clamp(min=group["eps"][1]) * rho
    if reduce is None:
        return F.adafactor_param_scale(p32, group["eps"][1]) * rho
    x = p32 if p32.dtype in (torch.float32, torch.float64) else p32.float()
    sums = reduce.sum_(torch.stack([torch.linalg.vector_norm(x).square(), torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)]))
    return (sums[0] / sums[1]).sqrt_().clamp_(min=group["eps"][1]) * rho


def adafactor_lr_bytes(group: dict[str, Any]) -> int:
    """The peak :func:`adafactor_lr` allocates on a float32 parameter (unsharded): with ``scale_parameter``
    the parameter's norm and the returned 0-d step size alive together, 8 bytes; else nothing (a float)."""
    return 8 if group["scale_parameter"] else 0


adafactor_lr.step_bytes = adafactor_lr_bytes  # (read by subspace.projected_alone_bytes)
# the engine's chunked step of a low-precision parameter gives the RMS from its chunks (engine.chunked_rms) where
# the rule reads it (scale_parameter)
adafactor_lr.takes_p_rms = True
adafactor_lr.reads_param = lambda group: bool(group["scale_parameter"])

# Adafactor's multi-tensor step evaluates its lr rule itself (the parameters' norms in one kernel)
FactoredMoments.foreach_lr_rule = staticmethod(adafactor_lr)
FactoredMoments.bf16_bucket_lr_rule = staticmethod(adafactor_lr)  # (and of its bucket of bfloat16 parameters)
