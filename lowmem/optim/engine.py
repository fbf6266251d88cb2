"""The optimizer engine: one loop, composed from a recipe's parts.

A :class:`Recipe` is an ordered chain of small steps, each a part with its state declared as named
tensors: stabilizers (on the raw gradient), an optional projection (for 2-D parameters in groups
with a ``rank``), a moment rule (the direction), a combine-back rule (the full-size direction of a
projected parameter), decoupled weight decay and a learning-rate rule. :class:`LowMemOptimizer`
only allocates state and runs the chain, for each parameter with a gradient::

    g  = stabilizers(grad)                       # clip / normalize / reset moments
    r  = P.down(g)            if projected else g  (P refreshed on its schedule)
    d  = moment.direction(r)                     # e.g. m_hat / (sqrt(v_hat) + eps)
    d  = combine(g, r, d)     if projected       # GaLore: scale * P.up(d) + residual(g, r, d);
                                                 # APOLLO: scale * g * ||d||_col / ||r||_col, limited
    p <- p - lr * wd * p ;  p <- p - lr * d      # decoupled weight decay (AdamW, Algorithm 2)

A new optimizer is a new part or a new chain of existing parts, never an edit of this loop
(docs/ARCHITECTURE.md, "Adding an optimizer", walks through APOLLO).

Guarantees every optimizer built on the engine inherits:

* State holds tensors only; ``state_dict()`` loads with ``torch.load(weights_only=True)``.
* :meth:`LowMemOptimizer.load_state_dict` keeps each state tensor's dtype (torch would cast
  floating state to the parameter's dtype: quantized or float32 states must survive a bf16 model).
* :meth:`LowMemOptimizer.state_bytes` is the exact size of the optimizer state.
* Hyperparameters and parameter groups are validated, with errors naming the value and the
  valid range; unknown keyword arguments are rejected with the list of valid ones.
* A step whose gradients contain NaN or Inf, or a gradient whose squared norm overflows float32
  (norm >= :data:`MAX_GRAD_NORM`, about 1.8e19: second-moment statistics would become inf for
  good), is skipped as a whole (one host sync per step), with a warning, so optimizer state is never
  corrupted; ``skipped_steps`` counts them. On steps without refreshes GaLore's projected gradients
  are checked instead of their gradients (:meth:`LowMemOptimizer._checked_lows`).

Plain full-rank float32 parameters that the moment rule has a multi-tensor form for (decided per
parameter, ``MomentRule.supports_foreach_for``: AdamW and SPAM / Stable-SPAM, 8-bit / 4-bit quantized
moments, MicroAdam, Adafactor / AdaLomo (3-D tensors included), Adam-mini, Subset-Norm, the Muon /
SinkGD / SCALE hybrids' targets, stacked by shape, and their AdamW parameters) are stepped in buckets
with one kernel per operation (``MomentRule.foreach_step_``); projected parameters whose rule has a
multi-tensor direction (``MomentRule.supports_foreach_direction``: Adam's moments, also 8-bit, for
GaLore / Fira / FRUGAL / APOLLO / Online Subspace Descent; Adafactor's for GaLore-Adafactor; the
Subspace-Momentum recipes') are projected down and combined back one at a time around one
multi-tensor direction per bucket. ``foreach=False`` in a group keeps the per-parameter loop above,
the reference both are tested against.

**Batches of matrices.** A parameter ``[..., A, B]`` (fused MoE experts) of a projected group, or of a
group whose moment rule keeps per-matrix statistics (Subset-Norm), is stepped as its ``A x B`` matrices, each
a 2-D parameter of the group (:meth:`LowMemOptimizer._matrices`): its state is each matrix's stacked along
the leading dimensions (one state dict, ``step`` / ``moment_start`` shared), each matrix steps on views
``p[e]``, ``grad[e]``, ``state[k][e]`` (joining the projected buckets, or one at a time), equal bit for bit
to separate 2-D parameters (docs/subspace.md, "Fused MoE experts"). An unprojected batch whose rule has a
batched step (``batch_direction``: RACS, Subset-Norm) is stepped in blocks of whole matrices of at most
``chunk_numel`` elements, one set of kernels per block on the views ``state[k][e0:e1]``
(:meth:`LowMemOptimizer._matrix_blocks`, issue 15: racs on one Qwen3-30B-A3B layer's experts 20,998 -> 2,658
kernels a step on the CUDA path), equal to the per-matrix step (``foreach=False``) bit for bit for Subset-Norm,
to float32 rounding for RACS (batched products).

**Bounded transients.** A full-rank parameter whose chain is element-wise (Adam's moments, quantized
moments in whole blocks, MicroAdam in whole top-k blocks, SPAM / Stable-SPAM) is stepped in flat
chunks of at most :attr:`LowMemOptimizer.chunk_numel` elements (rounded to whole blocks): each
chunk's state is decoded, updated, encoded and applied to the parameter's chunk, so no full-size
float32 temporary exists; per-tensor statistics (Stable-SPAM's ``max |g|`` and norm) come from
reductions over the chunks first. ``chunk_numel = None`` steps every parameter whole (the
reference the chunked path is tested equal to). Foreach buckets hold at most ``chunk_numel``
elements. :meth:`LowMemOptimizer.step_transient_bytes` reports the largest transient of a step. The
default chunk depends on each parameter's device (:func:`default_chunk_numel`: 2^19 elements on the
CPU, 2^24 elsewhere, where smaller chunks make the step launch-bound).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

from .._warn import warn_user
from . import functional as F
from .functional import adam as _FA
from .functional.subset_norm import foreach_scalar
from .functional.rounding import (kahan_store_, padded_numel, stochastic_round_bucket_bytes,
                                  stochastic_round_bucket_to_bf16_, stochastic_round_bytes, stochastic_round_to_bf16_,
                                  stream_seed)
from .group_layout import (_MISSING, _Reads, check_group_layouts, check_resized, check_rounding, check_state_fits,
                           record_validated)
from .hparams import ENGINE_HPARAMS, HParam, check_group_keys
from .moments import _DISTRIBUTED, ChunkState, MomentRule, constant_lr, counting_gradient, state_dtype
from .sharded import DTensor as _DTensor
from .sharded import (ShardedProjection, ShardReduce, check_placements, check_supported, combine_direction,
                      is_dtensor, local, low_is_sharded, projected_state_to_dtensor, shard_reduce, shard_rows,
                      sharded_post_update, state_from_dtensor, state_to_dtensor)
from .sharded import check_loaded_state, check_same_settings, from_torch_muon_group, state_layout, torch_stepless_state
from .sharded import global_matrix, matrices_refusal, matrices_state_to_dtensor, matrix_offsets
from .stabilizers import Stabilizer
from .subspace import (CombineRule, DropResidual, ProjectBack, Projection, ResidualRule, all_usable_if_finite,
                       projected_alone_bytes, projected_back_bytes, rotate_moments)

LRRule = Callable[[dict, dict, Tensor, float], "float | Tensor"]

# Elements per chunk of the chunked step on the CPU: about 20 MiB of transients for AdamW8bit-4bit, at the
# step time of the unchunked step (measured on one 8192 x 8192 weight, docs/memory.md).
DEFAULT_CHUNK_NUMEL = 2**19
# Elements per chunk on any other device (CUDA; meta and fake CUDA tensors too, so that the estimator and the
# launch audit follow the GPU's path). On an H200 the CPU's chunks made the step launch-bound: AdamW 105.6 ms
# with 6,033 launches vs 10.2 ms with 177 (whole tensors), i.e. ~16 us per launch of this engine (kernel and the
# Python issuing it). An element-wise float32 pass moves ~8 B per element: ~28 us for 2^24 elements at the H200's
# ~4.8 TB/s, so from 2^24 on a kernel's work outweighs its launch (2^22: 7 us, still launch-bound; 2^26: launches
# <= 13% of the time, but 4x the transient). Kernels per step / step_transient_bytes() on a 368M Llama (meta
# tensors, CUDA's path; docs/memory.md, "The chunk on a GPU"), at 2^19 / 2^22 / 2^24 / 2^26 / whole: adamw4bit
# 42,015 / 6,187 / 1,375 / 357 / 72 kernels, 12.5 / 128 / 512 / 2,048 / 11,408 MiB; adamw8bit (its own path)
# 15,015 / 2,155 / 511 / 141 / 36, 8 / 73 / 289 / 1,153 / 6,418 MiB. 2^24 bounds the largest transient (4-bit
# moments, 32 B per element of a chunk) at 512 MiB: 0.4% of an H200, 2% of a 24 GB card.
DEVICE_CHUNK_NUMEL = 2**24
# Elements per block of whole matrices of a batch stepped together on the CPU (LowMemOptimizer._matrix_blocks;
# at most chunk_numel): blocks that stay in a core's cache, as functional.adafactor.GROUP_NUMEL's stacks. Measured
# on [16, 512, 256] and [8, 1024, 512], one thread (racs / adamw_sn / adagrad_sn): the whole batch at once was
# slower than one matrix at a time (0.5-0.7x: every pass of the block's temporaries through memory), blocks of
# <= 2^18 elements faster (docs/benchmarks.md, "Batches of matrices stepped in blocks"). Off the CPU a block is at
# most chunk_numel.
CPU_BLOCK_NUMEL = 2**18


def default_chunk_numel(device: torch.device | str) -> int:
    """The default :attr:`LowMemOptimizer.chunk_numel` of a parameter on ``device``:
    :data:`DEFAULT_CHUNK_NUMEL` on the CPU, :data:`DEVICE_CHUNK_NUMEL` on any other device."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return DEFAULT_CHUNK_NUMEL if kind == "cpu" else DEVICE_CHUNK_NUMEL


class _ByDevice:
    """The default of :attr:`LowMemOptimizer.chunk_numel`: each parameter's device's (:func:`default_chunk_numel`)."""

    def __repr__(self) -> str:
        return "BY_DEVICE"


BY_DEVICE = _ByDevice()


@dataclass(frozen=True)
class Recipe:
    """A named composition of engine parts: one paper's optimizer.

    Attributes:
        name: Registry name (``lowmem.create_optimizer(model, name)``).
        summary: One line for ``lowmem list``.
        reference: The paper (and the equations the parts implement).
        moment: How the direction is computed from the (projected) gradient.
        hparams: Hyperparameters with defaults, copied into every parameter group.
        group_hparams: Hyperparameters that only some groups carry (``rank`` and friends for
            projected groups). A group without ``rank`` gets none of them and trains full-rank
            (galore-torch's convention); a group with ``rank`` gets the defaults of the others.
            They are validated where present.
        projection: Subspace projection for 2-D parameters of groups with a ``rank``.
        residual: Rule for the gradient outside the subspace, used by the default combine-back
            (:class:`~lowmem.optim.subspace.ProjectBack`).
        combine: The combine-back step of projected parameters (default
            ``ProjectBack(residual)``: ``scale * P.up(d_low) + residual``). Give either ``combine``
            or ``residual``, not both.
        stabilizers: Gradient transforms applied first, in order.
        lr_rule: ``(group, state, param_fp32, t) -> step size``.
        decay_after_update: Apply decoupled weight decay after the gradient step instead of before
            (galore-torch and fira do this; torch's AdamW decays first).
        validate_group: Optional cross-field check of a complete parameter group; raises
            ``ValueError``.
    """

    name: str
    summary: str
    reference: str
    moment: MomentRule
    hparams: tuple[HParam, ...]
    group_hparams: tuple[HParam, ...] = ()
    projection: Projection | None = None
    residual: ResidualRule = field(default_factory=DropResidual)
    combine: CombineRule | None = None
    stabilizers: tuple[Stabilizer, ...] = ()
    lr_rule: LRRule = constant_lr
    decay_after_update: bool = False
    validate_group: Callable[[dict], None] | None = None

    def __post_init__(self) -> None:
        # a ProjectBack always carries this recipe's residual rule (also through dataclasses.replace)
        if self.combine is None or (isinstance(self.combine, ProjectBack) and self.combine.residual is not self.residual):
            object.__setattr__(self, "combine", ProjectBack(self.residual))
        elif not isinstance(self.combine, ProjectBack) and not isinstance(self.residual, DropResidual):
            raise ValueError(f"recipe {self.name!r}: a residual rule applies only with the ProjectBack combine-back;"
                             f" got combine={type(self.combine).__name__} and residual={type(self.residual).__name__}")

    def __repr__(self) -> str:
        return f"Recipe({self.name!r})"

    def chain(self) -> tuple[tuple[str, Any], ...]:
        """The steps in the order they run: ``(role, part)`` pairs (for ``lowmem list`` and docs)."""
        steps: list[tuple[str, Any]] = [("stabilize", s) for s in self.stabilizers]
        if self.projection is not None:
            steps.append(("project", self.projection))
        steps.append(("moment", self.moment))
        if self.projection is not None:
            steps.append(("combine", self.combine))
        steps += [("decay", "after update" if self.decay_after_update else "before update"), ("lr", self.lr_rule)]
        return tuple(steps)

    def all_hparams(self) -> dict[str, HParam]:
        return {h.name: h for h in (*self.hparams, *ENGINE_HPARAMS, *self.group_hparams)}

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickled, and deep-copied (``copy.deepcopy`` of a ``LowMemOptimizer(params, recipe)``), by its registry
        name when it is the recipe registered under that name: a recipe is configuration (frozen, its parts hold no
        tensors), the registered one is shared by every optimizer made from it, and its settings' checks may be
        local functions, which pickle cannot store. Any other recipe: by value, as a dataclass."""
        from .registry import get_entry  # (lowmem.optim.registry imports this module)

        try:
            registered = get_entry(self.name).recipe is self
        except ValueError:  # (not registered)
            registered = False
        if registered:
            return _registered_recipe, (self.name,)
        return super().__reduce_ex__(protocol)


def _registered_recipe(name: str) -> Recipe:
    """The recipe registered as ``name`` (:meth:`Recipe.__reduce_ex__`)."""
    from .registry import get_entry

    recipe = get_entry(name).recipe
    assert recipe is not None
    return recipe


# A gradient whose L2 norm reaches this has a squared norm that overflows float32: second-moment
# statistics (Adam's v, Adafactor's row / column sums, Stable-SPAM's moments) would become inf for good.
MAX_GRAD_NORM = math.sqrt(torch.finfo(torch.float32).max)  # about 1.8e19


def _all_finite(tensors: list[Tensor], prepare: Callable[[], Any] | None = None) -> bool:
    """Whether every gradient is finite and its squared norm fits in float32 (norm below
    :data:`MAX_GRAD_NORM`), with one host synchronisation.

    One multi-tensor norm per device (:func:`_norms`) proves both when every norm is finite and below
    the bound. A NaN norm, or an infinite or too large one in a dtype that holds :data:`MAX_GRAD_NORM`
    (float32, bfloat16, float64: its norm is the tensor's, within its rounding), fails the step at once;
    only a norm that overflowed a narrower dtype (float16: 65504) is recomputed in float32 a piece at a
    time (:func:`_norm_below`). What it allocates: :func:`_all_finite_bytes`.

    ``prepare`` (called once, without arguments) runs between the check's kernels and its host read: host
    work that does not depend on the answer (the engine's planning of the step, issue 15) is done while
    the device computes the norms instead of after the read, when the device would wait for it.
    """
    if not tensors:
        return True
    norms, tensors = _norms(tensors)  # (tensors in the norms' order: the zip below pairs each with its own)
    ok = (norms < MAX_GRAD_NORM).all()  # NaN compares False
    if prepare is not None:
        prepare()
    if bool(ok):
        return True
    if not any(_narrow(t.dtype) for t in tensors):
        return False
    values = norms.tolist()  # (a second host read, on a failing step only)
    del norms
    return all(v < MAX_GRAD_NORM or (_narrow(t.dtype) and not math.isnan(v) and _norm_below(t))
               for v, t in zip(values, tensors))


def _narrow(dtype: torch.dtype) -> bool:
    """Whether a norm in ``dtype`` overflows below :data:`MAX_GRAD_NORM` (float16 and the float8 types)."""
    return dtype.is_floating_point and torch.finfo(dtype).max < MAX_GRAD_NORM


def _norms(tensors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Every tensor's L2 norm, stacked in float32 on the first tensor's device, and the tensors in the order of
    the norms (``tensors`` itself when it is theirs).

    One multi-tensor norm per device and dtype (in the order each first appears), in that dtype; its norms
    stacked, and a stack of another dtype or device cast to float32 on the first device once (issue 15: a
    bfloat16 model's step cast each of its 219 norms alone, 219 of its 549 kernels); the groups' stacks
    concatenated when there are several (then the tensors are listed group by group: a failing step's recheck
    pairs each norm with its tensor). The values are the norms'
    ``.float().to(first)`` one by one, bit for bit (a stack and a cast copy values)."""
    first, f32 = tensors[0].device, torch.float32
    if all(t.dtype is f32 and t.device == first for t in tensors):
        # the common case, float32 on one device: one multi-tensor norm over the list as it is (no
        # grouping by device: the engine's own time on many small tensors, issue 15)
        return torch.stack(torch._foreach_norm(tensors)), tensors
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    parts = []
    for (device, dtype), ts in groups.items():
        ns = torch._foreach_norm(ts)
        stack = torch.stack(ns)
        del ns
        # (float32 norms on the first device are what .float().to(first) would give, themselves)
        parts.append(stack if dtype is f32 and device == first else stack.float().to(first))
        del stack
    if len(parts) == 1:
        return parts[0], tensors
    return torch.cat(parts), [t for ts in groups.values() for t in ts]


def _runs(tensors: list[Tensor], ids: set[int]) -> list[tuple[int, int]]:
    """The ``(start, stop)`` slices of ``tensors`` where the tensors whose ``id`` is in ``ids`` stand, each run
    of consecutive ones once (:func:`_norms` of a list led by them: one run per device and dtype)."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(tensors):
        if id(t) in ids:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
    return runs


# Elements of a tensor whose norm :func:`_norm_below` takes at once (vector_norm(dtype=float32) copies a
# float16 input to float32 first: 4 B per element, 256 KiB here instead of 4 B per element of the tensor)
NORM_PIECE = 2**16
# Elements per chunk of torch's multi-tensor norm kernel on CUDA (ATen's kChunkSize, MultiTensorApply.cuh):
# _foreach_norm allocates one partial sum per chunk of every tensor (ForeachReduceOp.cu, output_per_tensor)
_FOREACH_NORM_CHUNK = 65536


def _pieces(t: Tensor, n: int) -> list[Tensor]:
    """Views of ``t`` of at most ``n`` elements covering it (flat slices of a contiguous tensor, else
    blocks of whole rows, a row's own pieces when one row is longer)."""
    if t.numel() <= n:
        return [t]
    if t.is_contiguous():
        return list(t.view(-1).split(n))
    row = t.numel() // t.shape[0]
    if row <= n:
        return list(t.split(n // row))
    return [q for r in t.unbind(0) for q in _pieces(r, n)]


def _norm_below(t: Tensor) -> bool:
    """Whether ``||t||_2`` is below :data:`MAX_GRAD_NORM` (NaN compares False): the squared float32
    norms of :data:`NORM_PIECE`-element pieces summed in float64, in place."""
    acc = torch.zeros((), dtype=torch.float64, device=t.device)
    for piece in _pieces(t, NORM_PIECE):
        n = torch.linalg.vector_norm(piece, dtype=torch.float32).double()
        acc.addcmul_(n, n)
        del n  # (before the next piece's norm)
    return bool(acc < MAX_GRAD_NORM**2)


def _all_finite_bytes(tensors: list[tuple[int, torch.dtype, torch.device]]) -> int:
    """The most memory :func:`_all_finite` allocates alive together, for tensors given as ``(numel, dtype,
    device)`` in the order it reads them (a meta-device entry counts as a CUDA one).

    :func:`_norms`: the common case (all float32 on one device) the ``N`` 0-d float32 norms (``4 N``) beside
    the multi-tensor kernel's partial sums (``w``), then beside their stack: ``max(4 N + w, 8 N)``. Otherwise,
    for each group of ``N_g`` tensors of one device and dtype (``e`` bytes; in the order each first appears),
    beside the float32 stacks of the groups before it (``H``, 4 bytes per norm): its 0-d norms (``e N_g``) and
    partial sums (``w_g``), then their stack (``2 e N_g``), then, for a group of another dtype than float32,
    the stack's float32 copy (``e N_g + 4 N_g``) and, on another device than the first, its move there
    (``+ 4 N_g``; a float32 group on another device: ``8 N_g``); with several groups their concatenation
    (``8 N``). Then the stack's comparison mask (``N``) and its ``all`` (1): ``5 N + 1``. ``w``: on a
    device other than the CPU, torch's multi-tensor norm kernel's partial sums, ``4 N_g ceil(max numel_g
    / 65536)`` (8 for float64) for each call. Then, with a float16 (narrow) tensor,
    its piecewise recheck (:func:`_norm_below`, one tensor at a time, after the norms are freed): the
    float32 copy of one piece (``4 min(numel, NORM_PIECE)``) and 32 bytes (the accumulator, the piece's
    norm in float32 and float64, their product).
    """
    if not tensors:
        return 0
    n, (_, _, first) = len(tensors), tensors[0]
    f32, f64 = torch.float32, torch.float64
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for numel, dtype, device in tensors:
        groups.setdefault((device, dtype), []).append(numel)

    def partial_sums(device: torch.device, dtype: torch.dtype, numels: list[int]) -> int:
        if device.type == "cpu":
            return 0
        return (8 if dtype is f64 else 4) * len(numels) * -(-max(numels) // _FOREACH_NORM_CHUNK)

    if len(groups) == 1 and next(iter(groups)) == (first, f32):
        fast = max(4 * n + partial_sums(first, f32, groups[first, f32]), 8 * n)
    else:
        held = fast = 0
        for (device, dtype), numels in groups.items():
            k, e = len(numels), dtype.itemsize
            fast = max(fast, held + e * k + partial_sums(device, dtype, numels), held + 2 * e * k)
            if dtype is not f32:  # (its float32 copy beside the stack, then the copy's move)
                fast = max(fast, held + e * k + 4 * k + 4 * k * (device != first))
            elif device != first:
                fast = max(fast, held + 8 * k)
            held += 4 * k
        fast = max(fast, 8 * n if len(groups) > 1 else 0, 5 * n + 1)
    recheck = max((4 * min(numel, NORM_PIECE) + 32 for numel, dtype, _ in tensors if _narrow(dtype)), default=0)
    return max(fast, recheck)


# integers up to these are exact in the dtype: t + 1 computed in Python is the in-place add's result
_EXACT_INTEGERS = {torch.float32: 2**24, torch.float64: 2**53}


def chunked_rms(p: Tensor, bounds: list[tuple[int, int]], reduce: ShardReduce | None = None) -> Tensor:
    """``RMS(p) = sqrt(sum(p^2) / numel)`` of a low-precision parameter as a float32 0-d tensor, from its flat chunks
    ``bounds`` (each chunk's float32 copy, its norm squared added up; the copy freed before the next one's is made:
    :func:`chunked_rms_bytes`), so no float32 copy of the whole parameter is made (AUDMEM21 1). Equal to
    ``rms(p.float())`` up to float32 rounding (the sum of the chunks' squares in another order). ``reduce`` (an FSDP2
    parameter's local shard): the sum of squares and the element count summed over the shards (one all-reduce of
    2 numbers, as :func:`~lowmem.optim.sharded.sharded_rms`)."""
    flat = p.view(-1)
    sq = torch.zeros((), dtype=torch.float32, device=p.device)
    for start, stop in bounds:
        x = flat[start:stop].float()
        sq.add_(torch.linalg.vector_norm(x).square_())
        del x
    if reduce is not None:
        sums = reduce.sum_(torch.stack([sq, torch.tensor(float(p.numel()), dtype=torch.float32, device=p.device)]))
        return (sums[0] / sums[1]).sqrt_()
    return sq.sqrt_().div_(math.sqrt(max(p.numel(), 1)))


def chunked_rms_bytes(bounds: list[tuple[int, int]]) -> int:
    """What :func:`chunked_rms` allocates at most (unsharded): the sum (4 bytes) beside the largest chunk's float32
    copy (4 bytes per element) and its norm (4 bytes)."""
    return 8 + 4 * max((b - a for a, b in bounds), default=0)


def _advance_step(step: Tensor) -> float:
    """Advance a parameter's step counter (a 0-d CPU tensor) by one and return its new value,
    the values of ``step += 1; step.item()`` without turning the Python ``1`` into a tensor for the
    add (``fill_`` of ``item() + 1``): the same single rounding to ``step``'s dtype, read back where
    the sum may not be exact there (float32 beyond 2^24, low-precision dtypes)."""
    t = step.item() + 1
    step.fill_(t)
    if step.is_floating_point() and not (abs(t) <= _EXACT_INTEGERS.get(step.dtype, 0) and float(t).is_integer()):
        t = step.item()
    return t


def _step_view(step: Tensor) -> Any:
    """A NumPy view of a step counter's memory (a 0-d CPU float32 / float64 tensor), through which
    :func:`_advance_step_view` advances it; ``None`` for any other counter (:func:`_advance_step`)."""
    if step.device.type != "cpu" or step.dtype not in (torch.float32, torch.float64) or step.requires_grad or step.dim():
        return None
    return step.numpy()


def _advance_step_view(step: Tensor, view: Any, exact: int) -> float:
    """:func:`_advance_step` of a counter written through its NumPy view (:func:`_step_view`): the
    same value written (``item() + 1`` rounded once to the counter's dtype by the assignment, as by
    ``fill_``) and returned, without the dispatcher's cost of ``fill_`` on a 0-d tensor (issue 15: a
    few microseconds per parameter, most of the engine's own time on many small tensors). Read with
    ``item()`` as before (tests/test_speed_paths.py pins the host reads of a step). ``exact``: the
    counter's dtype's :data:`_EXACT_INTEGERS`."""
    t = step.item() + 1
    view[()] = t
    if not (abs(t) <= exact and float(t).is_integer()):
        t = step.item()
    return t


def _init_moment_start(state: dict[str, Tensor], group: dict[str, Any], moment: MomentRule) -> None:
    """A projected parameter whose moments are zeroed at each refresh (``moment_policy="reset"``) by
    a rule that counts again from there (:attr:`~lowmem.optim.moments.MomentRule.restarts_on_reset`:
    Adam's and Adafactor's moments, quantized or not) keeps ``moment_start``: the steps taken before
    its moments last restarted (a 0-d CPU float32 tensor, like ``step``; :func:`moment_step`)."""
    if group.get("moment_policy") == "reset" and moment.restarts_on_reset:
        state["moment_start"] = torch.zeros((), dtype=torch.float32)


def moment_step(state: dict[str, Tensor], t: float) -> float:
    """The step ``t`` as the moment rule counts it: ``t - moment_start`` where the moments were
    reset at a refresh (:func:`_init_moment_start`), else ``t``.

    Zeroed moments with a bias correction that kept counting would make the first step after a
    reset ``(1 - b1) sqrt(1 - b2^t) / ((1 - b1^t) sqrt(1 - b2))`` times Adam's restarted one (3.2
    for large ``t`` at ``betas=(0.9, 0.999)``); FRUGAL's authors restart the count with the moments (their ``_init_state`` sets
    ``state["step"] = 0`` at every refresh, ``reset_statistics=True``). The learning-rate rule and
    the refresh schedule keep counting from the first step."""
    start = state.get("moment_start")
    return t if start is None else t - start.item()


# State entries of a batch of matrices (:meth:`LowMemOptimizer._matrices`) shared by all its matrices: the
# engine's per-parameter counters (one step count; moments reset for every matrix at the same refresh)
MATRIX_SHARED_KEYS = ("step", "moment_start")
# the state dict's entry naming the recipe that wrote it (LowMemOptimizer.state_dict / _check_same_optimizer)
OPTIMIZER_KEY = "lowmem_optimizer"


def matrix_index(e: int, lead: torch.Size) -> tuple[int, ...]:
    """The index into the leading (batch) dimensions ``lead`` of the ``e``-th matrix of a ``[*lead, A, B]``
    tensor, in row-major order (``t[matrix_index(e, lead)]``: a view of matrix ``e``, never a copy)."""
    idx = []
    for d in reversed(lead):
        idx.append(e % d)
        e //= d
    return tuple(reversed(idx))


def matrix_of(t: Tensor, idx: tuple[int, ...]) -> Tensor:
    """``t[idx]``: a view of ``t``'s memory, detached (no autograd view of a parameter: the estimator's fake
    CUDA parameters take none outside ``no_grad``; the step writes into it under ``no_grad`` anyway)."""
    t = t.detach()
    for i in idx:
        t = t.select(0, i)
    return t


def matrix_state(state: dict[str, Tensor], idx: tuple[int, ...]) -> dict[str, Tensor]:
    """The state of one matrix of a batch (:meth:`LowMemOptimizer._matrices`): views ``state[k][idx]``
    of the stacked entries, the shared ones (:data:`MATRIX_SHARED_KEYS`) themselves."""
    return {k: v if k in MATRIX_SHARED_KEYS or not isinstance(v, Tensor) else matrix_of(v, idx)
            for k, v in state.items()}


def _stack_like(v: Tensor, lead: torch.Size) -> Tensor:
    """An uninitialised stack ``[*lead, *v.shape]`` of tensors laid out like ``v`` (a dense one): each
    matrix's entry keeps ``v``'s strides (a column-major basis stays column-major: the same GEMMs as a 2-D
    parameter's, bit for bit), the matrices one after another."""
    strides, acc = [], v.numel()
    for d in reversed(lead):
        strides.append(acc)
        acc *= d
    return v.new_empty_strided((*lead, *v.shape), (*reversed(strides), *v.stride()))


def _lead_flat(v: Tensor, lead: int) -> bool:
    """Whether the ``lead`` leading dimensions of the stacked state entry ``v`` can be viewed as one: then
    ``v.flatten(0, lead - 1)`` is a view (not a copy), which the batched step of a batch of matrices updates in place
    (:meth:`LowMemOptimizer._matrix_blocks`)."""
    if lead <= 1:
        return True
    try:
        v.view(-1, *v.shape[lead:])
    except RuntimeError:
        return False
    return True


def _no_data(t: Tensor) -> bool:
    """Whether ``t`` holds no values (a meta or fake tensor: the estimator's; a fake CUDA tensor's ``copy_`` needs
    a CUDA build)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return t.device.type == "meta" or isinstance(t, FakeTensor)


def _write_back(state: dict[str, Tensor], idx: tuple[int, ...], sub: dict[str, Tensor], views: dict[str, Tensor]) -> None:
    """After a matrix's step on ``sub`` (:func:`matrix_state`, ``views`` as it was built): an entry the
    step replaced instead of updating in place is copied into the stack (a shared one replaces the
    parameter's); a shared entry the step created (``moment_start`` of a checkpoint that predates it) joins
    the parameter's state."""
    for k, v in sub.items():
        if views.get(k) is v:
            continue
        if k in MATRIX_SHARED_KEYS:
            state[k] = v
        elif k in views:
            views[k].copy_(v)
        else:
            raise RuntimeError(f"the step of one matrix of a batched parameter created the state entry {k!r}; a batch of"
                               " matrices keeps only the entries allocated for every matrix at its first step")


class _Route:
    """The cached path of a parameter in :meth:`LowMemOptimizer.step` (:meth:`LowMemOptimizer._route`):
    ``path`` (``"low"``: the projected multi-tensor step, ``"foreach"``: the buckets, ``"alone"``: its
    per-parameter step), valid while ``token`` (the group's settings, :meth:`LowMemOptimizer._group_tokens`),
    ``state`` (the very state dict) and ``key`` (the parameter's and gradient's dtype, shape and
    contiguity, whether the state exists) are unchanged; with the state's step counter and its NumPy
    view (:func:`_step_view`), the flat pieces, the device and that device's chunk
    (:meth:`LowMemOptimizer._chunk`) of a parameter on the foreach path, and the class of buckets it
    fills (:meth:`~lowmem.optim.moments.MomentRule.foreach_bucket_class`)."""

    __slots__ = ("p", "token", "state", "key", "path", "step", "step_view", "pieces", "device", "chunk", "fused", "cls")

    def __init__(self, p: Tensor, token: object, state: dict, key: tuple, path: str, pieces: Any, device: Any,
                 chunk: int | None = None, fused: bool = False, cls: Any = None) -> None:
        self.p, self.token, self.state, self.key, self.path = p, token, state, key, path
        self.pieces, self.device, self.chunk, self.fused, self.cls = pieces, device, chunk, fused, cls
        self.step = self.step_view = None


_TAKES_FUSED_BUCKET: dict[Any, bool] = {}


def _takes_fused_bucket(prepare: Callable) -> bool:
    """Whether a moment rule's ``foreach_prepare`` takes ``fused_bucket`` (AdamW's: a bucket of torch's fused kernel,
    whose members' layout the engine decided with their cached paths), by its signature, once per function."""
    func = getattr(prepare, "__func__", prepare)
    hit = _TAKES_FUSED_BUCKET.get(func)
    if hit is None:
        try:
            hit = "fused_bucket" in inspect.signature(func).parameters
        except (TypeError, ValueError):
            hit = False
        _TAKES_FUSED_BUCKET[func] = hit
    return hit


def _route_key(p: Tensor, grad: Tensor, state: dict) -> tuple:
    """What a cached path (:class:`_Route`) is valid for besides its tokens and state dict: the dtype, shape, device
    and contiguity of ``p``, the dtype and contiguity of ``grad``, whether ``state`` has its step counter (the state
    exists)."""
    return (p.dtype, p.shape, p.device, p.is_contiguous(), grad.dtype, grad.is_contiguous(), "step" in state)


def _frozen(value: Any, keep: list) -> Any:
    """A group setting as a value compared with ``==`` (:meth:`LowMemOptimizer._group_tokens`): lists,
    tuples and dicts as tuples of their frozen items (a list changed in place is seen), a tensor by its
    identity and version (kept alive in ``keep``, so its id is not reused), anything else itself."""
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_frozen(v, keep) for v in value))
    if isinstance(value, dict):
        return (dict, tuple((k, _frozen(v, keep)) for k, v in value.items()))
    if isinstance(value, Tensor):
        keep.append(value)
        return (Tensor, id(value), value._version)
    return value


class _GroupEntry:
    """A parameter group's tokens (:meth:`LowMemOptimizer._group_tokens`): ``token``, new when any setting
    but ``lr`` changed (``sig``), and ``route_token``, the cached paths' (:meth:`LowMemOptimizer._route`),
    new only when what the group's path decisions read changed: the settings in ``keys`` by their values
    (recorded when a path is decided; a key first read then joins with the value it was decided on, so every
    cached path read only keys whose values are compared), ``lr`` by its type only (a float, a tensor or
    ``None``: AdamW's fused kernel takes a float; no decision reads its value, ``tests/test_engine_overhead.py``
    checks every recipe), and the settings the moment rule summarizes (``covered``) by its summary,
    :meth:`~lowmem.optim.moments.MomentRule.route_settings` (Subset-Norm's ``betas[0] > 0``: a scheduler
    cycling ``betas`` within ``(0, 1)`` decides no path again); a covered setting is not recorded."""

    __slots__ = ("group", "rule", "sig", "token", "keep", "keys", "covered", "route_sig", "route_token", "route_keep")

    def __init__(self, group: dict[str, Any], rule: MomentRule) -> None:
        self.group, self.rule, self.sig, self.token, self.keep = group, rule, None, None, []
        self.keys: tuple[str, ...] = ()
        self.covered: frozenset[str] = frozenset()
        self.route_sig, self.route_token, self.route_keep = None, None, []

    def _route_sig(self, base: tuple, keep: list) -> tuple:
        group = self.group
        settings = self.rule.route_settings(group)
        covered = self.covered = frozenset(settings or ())
        # (a key recorded while no summary covered it: by the summary while one does; the token is new when
        # the summary comes or goes, so no path cached under the one is kept under the other)
        return (base, type(group.get("lr")), None if settings is None else _frozen(settings, keep),
                tuple(_frozen(group.get(k, _MISSING), keep) for k in self.keys if k not in covered))

    def check_route(self, base: tuple) -> None:
        """A new ``route_token`` if a read setting, the rule's summary of the settings it covers, the
        parameters, ``chunk_numel`` or the distributed state (``base``) changed since the last step."""
        keep: list = []
        sig = self._route_sig(base, keep)
        if sig != self.route_sig:
            self.route_sig, self.route_token, self.route_keep = sig, object(), keep

    def add_route_keys(self, read: set[str]) -> None:
        """Settings a decision just read: the new ones join ``keys`` with their values now (the ones it
        was decided on; the paths cached before did not read them, so the token is kept); ``lr`` and the
        settings the rule's summary covers are keyed as they are (``route_sig``)."""
        new = read - {"params", "lr"} - self.covered
        if new.issubset(self.keys):
            return
        self.keys = tuple(sorted(new.union(self.keys)))
        keep: list = []
        self.route_sig = self._route_sig(self.route_sig[0], keep)
        self.route_keep = keep


class _Projected(NamedTuple):
    """A projected parameter between the phases of its step (:meth:`LowMemOptimizer._project_down`,
    the moment rule, :meth:`LowMemOptimizer._combine_back`): the gradient ``g`` the combine-back reads,
    the projected gradient ``low``, the learning rate, the parameter in the precision it is updated
    in (``p32``), whether it is combined back a block of rows at a time, and ``down_of_g``
    (``low`` when computed from this float32 ``g``: Online Subspace Descent reuses it); ``checked``: ``g`` is a
    float32 copy of a gradient the projection's ``pre_check`` found usable (its flag read ``True``)."""

    p: Tensor
    g: Tensor
    low: Tensor
    state: dict[str, Tensor]
    group: dict[str, Any]
    t: float
    lr: Any
    p32: Tensor
    rows: bool
    down_of_g: Tensor | None
    checked: bool = False


class _ProjectedBytes(NamedTuple):
    """The transient terms of a projected parameter's step (:meth:`LowMemOptimizer._projected_bytes`),
    in bytes except ``numel``: ``numel``, its projected gradient's elements (float32, as its moment
    rule's direction); ``held``, float32 copies of its gradient and parameter that live from its
    project-down to its combine-back (the unchunked multi-tensor path); ``down``, the peak of its
    project-down (the refresh, or the projected gradient), ``held`` included; ``back``, the peak of its
    combine-back beyond its projected gradient, direction and held copies; ``alone``, the peak of its
    per-parameter step (:meth:`LowMemOptimizer._update`); ``step_size``, what its step size holds from its
    project-down to its bucket's end beyond the direction (Adafactor's 0-d learning rate,
    :meth:`~lowmem.optim.moments.MomentRule.direction_bytes`); ``shape``, the parameter's; ``bounds``, the row
    blocks its combine-back visits; ``folds``, whether the engine may fold its bucket's combine-back
    (:meth:`LowMemOptimizer._fold_low_bucket`: float32, a float learning rate); ``back_alone``, below."""

    numel: int
    held: int
    down: int
    back: int
    alone: int
    low_shape: torch.Size = torch.Size()
    state: dict | None = None
    step_size: int = 0
    shape: torch.Size = torch.Size()
    bounds: list | None = None
    folds: bool = False
    #: its combine-back alone (:func:`~lowmem.optim.subspace.projected_back_bytes`) where ``back`` is its share of a
    #: folded bucket's: a bucket with a member that cannot fold combines every member back alone (``None``: ``back``)
    back_alone: int | None = None


def _as_allocated(v: Tensor, like: Tensor | None, device: Any) -> Tensor:
    """A loaded state tensor copied to ``device`` in the memory layout the optimizer allocates for it (``like``: its
    :meth:`LowMemOptimizer._probe_state` / ``_init_state`` probe; GaLore's bases are column-major,
    ``galore.basis_zeros``). A checkpoint may hold another layout (distributed checkpoints load contiguous
    tensors; older checkpoints row-major bases), and a BLAS may pick another kernel for another layout, so the
    resumed run would round otherwise than the uninterrupted one (seen on an AMD EPYC's MKL)."""
    if like is None or like.stride() == v.stride() or like.shape != v.shape or v.dim() < 2:
        return v.to(device=device, copy=True)
    out = torch.empty_strided(v.shape, like.stride(), dtype=v.dtype, device=device)
    return out.copy_(v)


def _refuse_complex(p: Tensor, where: str) -> None:
    """A complex parameter is refused (``add_param_group``, before it has state): the state is allocated real and
    the math is real (``exp_avg.lerp_`` of a complex gradient, ``g * g`` for ``|g|^2``, real projections,
    quantization), so it would train silently wrong. torch.optim steps one as ``torch.view_as_real``; so can the
    user, with a real parameter (``[..., 2]``: real and imaginary parts) viewed as complex in the forward.

    Raises:
        ValueError: Naming the parameter, its dtype and ``torch.view_as_real``.
    """
    if p.is_complex():
        raise ValueError(
            f"{where} of shape {tuple(p.shape)} is complex ({p.dtype}): lowmem's optimizer state and math are real,"
            " so it would train silently wrong. Keep the parameter real instead, torch.view_as_real(weight) (a"
            f" {(*p.shape, 2)} tensor of its real and imaginary parts), and take torch.view_as_complex of it in the"
            " forward")


#: engine settings (ENGINE_HPARAMS) that the drop-in classes' hand-written constructors do not list: each one takes
#: them keyword-only all the same (:meth:`LowMemOptimizer.__init_subclass__`), with these defaults
_ADDED_ENGINE_SETTINGS = {"bf16_stochastic_round": False, "kahan_summation": False}
_UNSET = object()


def _mesh_position(p: Tensor) -> int:
    """This rank's row-major position over the dimensions of ``p``'s device mesh (a DTensor's) that shard it
    (``Shard`` / ``_StridedShard`` placements): the ranks holding the same shard (HSDP's replicate dimension, a
    ``Replicate`` or ``Partial`` placement) share a position, so their copies round with the same bits."""
    coord, shape = p.device_mesh.get_coordinate() or (), p.device_mesh.shape
    pos = 0
    for c, n, placement in zip(coord, shape, p.placements):
        if placement.is_shard() or type(placement).__name__ == "_StridedShard":  # (not is_shard() in torch 2.13)
            pos = pos * n + c
    return pos


def _takes_added_settings(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` (a subclass's ``__init__``) taking the :data:`_ADDED_ENGINE_SETTINGS` it does not list as
    keyword-only arguments: a value given is handed to :meth:`LowMemOptimizer.__init__` (through the instance,
    before ``init`` runs; a value an outer subclass's constructor was given is kept), and the signature shows
    them. ``init`` itself where it lists them all or takes ``**kwargs``."""
    sig = inspect.signature(init)
    added = [k for k in _ADDED_ENGINE_SETTINGS if k not in sig.parameters]
    if not added or any(q.kind == q.VAR_KEYWORD for q in sig.parameters.values()):
        return init

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        given = {k: kwargs.pop(k) for k in added if kwargs.get(k, _UNSET) is not _UNSET}
        if given:
            pending = self.__dict__.setdefault("_added_settings", {})
            for k, v in given.items():
                pending.setdefault(k, v)
        init(self, *args, **kwargs)

    __init__.__signature__ = sig.replace(parameters=[
        *sig.parameters.values(),
        *(inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=_ADDED_ENGINE_SETTINGS[k]) for k in added)])
    return __init__


def refuse_untrainable(groups: list[dict[str, Any]], where: str) -> None:
    """Refuse a step of an optimizer none of whose parameters requires grad or has a gradient: it was built on
    parameters frozen since (peft's ``get_peft_model`` freezes the base weights and adds new adapter weights the
    optimizer does not hold), and would train nothing, silently, at every step. A parameter with a gradient is
    stepped whatever its ``requires_grad`` (torch's rule; a step with any gradient is not refused), and one
    parameter that requires grad is enough (its gradient may be absent this step: a frozen-then-unfrozen layer,
    BAdam's blocks). Called only for a step that found no gradient at all.

    Raises:
        ValueError: Naming the count of parameters and the likely cause."""
    params = [p for g in groups for p in g["params"]]
    if params and not any(p.requires_grad or p.grad is not None for p in params):
        raise ValueError(
            f"{where}: none of its {len(params)} parameter(s) requires grad (and none has a gradient): the step would "
            "train nothing. Built before peft froze them? Build the optimizer after get_peft_model, or on "
            "model.parameters() that require grad ([p for p in model.parameters() if p.requires_grad])")


class LowMemOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs a :class:`Recipe`.

    Args:
        params: Parameters or parameter groups, as for any torch optimizer.
        recipe: The recipe; subclasses set a class attribute instead.
        **hparams: Hyperparameters of the recipe (see ``recipe.all_hparams()``).
    """

    recipe: Recipe
    skip_nonfinite: bool = True
    #: what the projection's ``pre_check`` handed over for the step in progress, its flag read ``True`` with
    #: the non-finite check (``post_update`` / ``foreach_post_update`` take it as ``checked``); else ``None``
    _checked: Any = None
    #: the gradients (by ``id``) whose projection refresh this step the non-finite check's read found usable
    #: (:meth:`_finite_and_pre_check`; the refresh then reads nothing itself); else ``None``
    _usable: dict[int, Tensor] | None = None
    _chunk_numel: int | None | _ByDevice = BY_DEVICE
    #: project a batch of matrices down in one batched product on the CPU too (:meth:`_down_batched`; off the CPU
    #: always): for tests, the CPU's batched GEMM differs from its per-matrix GEMMs in the last bits
    batched_down_on_cpu: bool = False

    @property
    def chunk_numel(self) -> int | None:
        """Largest number of elements of a parameter stepped at once (rounded down to whole
        quantization / top-k blocks, at least one), and the largest foreach bucket. ``None``: every
        parameter in one piece (the reference path). A value set applies to every parameter.

        Default: by each parameter's device (:func:`default_chunk_numel`): :data:`DEFAULT_CHUNK_NUMEL`
        (``2**19``) on the CPU, :data:`DEVICE_CHUNK_NUMEL` (``2**24``) elsewhere (CUDA, and the meta /
        fake tensors the estimator sizes a GPU run on); :meth:`chunk_numel_for` gives a device's value.
        Read while unset, it is the value of the parameters' device; ``del opt.chunk_numel`` restores
        the default.

        Raises:
            ValueError: Read while unset on an optimizer whose parameters are on devices with
                different defaults (each parameter uses its own device's: :meth:`chunk_numel_for`).
        """
        value = self._chunk_numel
        if value is not BY_DEVICE:
            return value
        found = {local(p).device.type for g in self.param_groups for p in g["params"]}
        values = {default_chunk_numel(torch.device(kind)) for kind in found}
        if len(values) > 1:
            raise ValueError(f"chunk_numel of optimizer '{self.recipe.name}' is not set and its parameters are on"
                             f" devices {sorted(found)} with different defaults; each parameter is stepped with its"
                             " device's (chunk_numel_for(device)), or set one value for all")
        return values.pop() if values else DEFAULT_CHUNK_NUMEL

    @chunk_numel.setter
    def chunk_numel(self, value: int | None) -> None:
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"Invalid chunk_numel={value!r} for optimizer '{self.recipe.name}': expected None or an int > 0.")
        self._chunk_numel = value

    @chunk_numel.deleter
    def chunk_numel(self) -> None:
        self.__dict__.pop("_chunk_numel", None)  # back to the class's default: by device

    def chunk_numel_for(self, device: torch.device | str) -> int | None:
        """The :attr:`chunk_numel` a parameter on ``device`` is stepped with: the value set, else
        :func:`default_chunk_numel` of ``device``."""
        return self._chunk(device if isinstance(device, torch.device) else torch.device(device))

    def _chunk(self, device: torch.device) -> int | None:
        """:meth:`chunk_numel_for` of a ``torch.device`` (every use in the step and its accounting
        resolves the chunk by the parameter's own device here)."""
        value = self._chunk_numel
        if value is not BY_DEVICE:
            return value
        return DEFAULT_CHUNK_NUMEL if device.type == "cpu" else DEVICE_CHUNK_NUMEL

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's hand-written constructor (the drop-in classes' signatures, tests/test_migration_classes.py)
        takes the engine settings added after it was written too (:data:`_ADDED_ENGINE_SETTINGS`:
        ``bf16_stochastic_round``, ``kahan_summation``), keyword-only, shown in its signature
        (:func:`_takes_added_settings`)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:
            cls.__init__ = _takes_added_settings(init)

    def __init__(self, params: Iterable[Any], recipe: Recipe | None = None, **hparams: Any):
        recipe = recipe if recipe is not None else getattr(type(self), "recipe", None)
        if recipe is None:
            raise TypeError("LowMemOptimizer needs a recipe")
        for k, v in self.__dict__.pop("_added_settings", {}).items():  # (a subclass's constructor took them)
            hparams.setdefault(k, v)
        self.recipe = recipe
        known = recipe.all_hparams()
        unknown = sorted(set(hparams) - set(known))
        if unknown:
            raise ValueError(
                f"Unknown hyperparameter(s) {unknown} for optimizer '{recipe.name}'; valid: {sorted(known)}"
            )
        for name, value in hparams.items():
            known[name].validate(value, where=f"optimizer '{recipe.name}'")
        defaults = {h.name: h.default for h in (*recipe.hparams, *ENGINE_HPARAMS)}
        defaults.update(hparams)
        self.skipped_steps = 0
        super().__init__(params, defaults)
        self._built = True  # (add_param_group: a group added from now on is the caller's own)
        if any(is_dtensor(p) for g in self.param_groups for p in g["params"]):
            # torch.distributed.checkpoint's get/set_optimizer_state_dict "initialise" an optimizer
            # whose state is empty by stepping it once on zero gradients with lr 0: that would count
            # a step (bias corrections off by one, a checkpoint saved before training holding step 1)
            # and attempt projection refreshes. Sharded state exists from the start instead.
            self.materialize_state()

    # ---- parameter groups -----------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.__dict__.get("_built") and self.recipe.projection is not None and isinstance(param_group, dict):
            # a group added after construction with its own rank on 1-D parameters only would step AdamW (SILENT 12;
            # the construction's groups are checked by create_optimizer, before its default rank fills them in)
            from .registry import refuse_vector_only_targets

            param_group = refuse_vector_only_targets([param_group], "rank", first=len(self.param_groups))[0]
        # a misspelled key ('rnak') would otherwise be ignored and the group train with defaults
        check_group_keys(self.recipe, param_group, where=f"parameter group {len(self.param_groups)} of optimizer '{self.recipe.name}'")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"parameter group {len(self.param_groups) - 1} of optimizer '{self.recipe.name}'"
        try:
            for i, p in enumerate(group["params"]):
                _refuse_complex(p, f"{where}, parameter {i}")
            for h in (*self.recipe.hparams, *ENGINE_HPARAMS):
                h.validate(group[h.name], where=where)
            check_rounding(group, where)
            if group.get("rank") is not None:  # a projected group: its other settings get defaults
                for h in self.recipe.group_hparams:
                    if h.default is not None:
                        group.setdefault(h.name, h.default)
            for h in self.recipe.group_hparams:  # (any value given, None too: where None is valid, the check accepts it)
                if h.name in group:
                    h.validate(group[h.name], where=where)
            if self.recipe.validate_group is not None:
                try:
                    self.recipe.validate_group(group)
                except ValueError as e:  # name the group: a recipe's check sees only the group's dict
                    e.args = (f"{where}: {e}", *e.args[1:])  # (its type and attributes kept)
                    raise
            for i, p in enumerate(group["params"]):
                if is_dtensor(p):  # FSDP2: refuse recipes that need the whole matrix (lowmem.optim.sharded)
                    self._refuse_sharded_matrices(p, group, f"{where}, parameter {i}")
                    if not self._local_matrices(p, group):  # (whole matrices on each shard: stepped as unsharded)
                        check_supported(self.recipe, group, p, where)
        except (ValueError, NotImplementedError):
            self.param_groups.pop()
            raise
        record_validated(self, group, where)  # (a value written into the group later is validated at the next step)
        self._forget_routes()
        # said once per parameter, here (_is_projected is asked at every step, state_dict() and estimate)
        for p in group["params"]:
            if self._full_rank_by_rank(p, group):
                warn_user(
                    f"{self.recipe.name}: rank {group['rank']} >= smaller side of a {tuple(p.shape)} parameter;"
                    " training it full-rank instead"
                )

    #: attributes left out of a copy (:meth:`__getstate__`): caches keyed by ``id`` of the original's groups and
    #: parameters, rebuilt at the next step (:meth:`_forget_routes`' and ``group_layout``'s), and what one step
    #: hands to its own phases
    _NOT_COPIED = frozenset({"_routes", "_group_sigs", "_hold", "_layout_sigs", "_settings_sigs", "_checked", "_usable",
                             "_decided", "_devices", "_sr_cur", "_sr_index", "_sr_gens"})

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` keep: torch's ``defaults``, ``state`` and ``param_groups``, and every
        other attribute of the instance (``skipped_steps``, ``chunk_numel`` when set, the ``recipe`` given to the
        constructor, a subclass's own: BAdam's schedule), but the caches of :data:`_NOT_COPIED` (the copy rebuilds
        them from its own groups and state, so it shares nothing mutable with the original) and torch's hooks (torch
        drops those too). A recipe that is the class's own is the class's (not copied)."""
        state = super().__getstate__()
        for k, v in self.__dict__.items():
            if k in state or k in self._NOT_COPIED or k.startswith("_optimizer_"):
                continue
            if k == "step":  # torch's LRScheduler wraps step() per instance, closing over the ORIGINAL optimizer:
                continue     # the copy keeps its class's step (as torch.optim's copies do; a copied scheduler works)
            if k == "recipe" and v is getattr(type(self), "recipe", None):
                continue
            state[k] = v
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # (torch's adds "differentiable" to the defaults, and then to every group added later: a setting no recipe
        # has, which a checkpoint would carry; torch's load_state_dict calls this with state and groups only)
        added = "defaults" in state and "differentiable" not in state["defaults"]
        super().__setstate__(state)
        if added:
            self.defaults.pop("differentiable", None)

    def _forget_routes(self) -> None:
        """Drop the cached paths of the parameters (:meth:`_route`) and the groups' tokens."""
        self.__dict__.pop("_routes", None)
        self.__dict__.pop("_group_sigs", None)
        self.__dict__.pop("_hold", None)
        self.__dict__.pop("_sr_index", None)  # (the rounding's parameter positions: _param_index)

    def _full_rank_by_rank(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` (2-D, or a batch of matrices ``[..., m, n]``) of a projected group trains full-rank
        because ``rank >= min(m, n)``."""
        return (self.recipe.projection is not None and group.get("rank") is not None and p.ndim >= 2
                and group["rank"] >= min(p.shape[-2:]))

    def _is_projected(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` is stepped in a subspace: a 2-D parameter, or a batch of matrices ``[..., m, n]``
        (fused MoE experts; each matrix its own projection: :meth:`_matrices`), of a group with a ``rank``
        below the smaller side of its matrices (a pure predicate: :meth:`add_param_group` warns about the
        others)."""
        return (self.recipe.projection is not None and group.get("rank") is not None and p.ndim >= 2
                and group["rank"] < min(p.shape[-2:]))

    def _matrices(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` of more than two dimensions ``[..., A, B]`` is stepped as a batch of ``A x B``
        matrices, each as a 2-D parameter of ``group`` with its own state (its projection, moments and
        statistics; stacked along the leading dimensions in ``p``'s one state dict, :data:`MATRIX_SHARED_KEYS`
        shared): a projected one (:meth:`_is_projected`), or one whose moment rule keeps per-matrix
        statistics (``per_matrix``: Subset-Norm's rows of each matrix's longer side). Equal to stepping
        each matrix as a separate 2-D parameter of the group (tests/test_experts_subspace.py)."""
        if p.ndim <= 2:
            return False
        if self._is_projected(p, group):
            return True
        per_matrix = getattr(self.recipe.moment, "per_matrix", None)
        return per_matrix is not None and per_matrix(p.shape, group)

    def _local_matrices(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` is a sharded (FSDP2 ``DTensor``) batch of matrices stepped per matrix (:meth:`_matrices`)
        whose local shard holds whole matrices (sharded on leading dimensions only,
        :func:`~lowmem.optim.sharded.matrices_refusal`: FSDP2's ``Shard(0)`` of fused MoE experts ``[E, A, B]``):
        each rank steps its shard's matrices as an unsharded batch (no communication), their random draws
        seeded by their index in the whole batch (:meth:`_init_matrices`), their stacked state sharded as the
        parameter (:func:`~lowmem.optim.sharded.matrices_state_to_dtensor`)."""
        return is_dtensor(p) and self._matrices(p, group) and matrices_refusal(p) is None

    def _refuse_sharded_matrices(self, p: Tensor, group: dict[str, Any], where: str) -> None:
        """A sharded (FSDP2 ``DTensor``) batch of matrices stepped per matrix (:meth:`_matrices`) whose shards
        split its matrices (a ``Shard`` of ``A`` or ``B``) or with another placement than ``Shard`` of a
        leading dimension and ``Replicate`` (:func:`~lowmem.optim.sharded.matrices_refusal`): refused naming
        the parameter, its placements, the recipe and what is supported, never trained otherwise."""
        if not (is_dtensor(p) and self._matrices(p, group)):
            return
        why = matrices_refusal(p)
        if why is not None:
            raise NotImplementedError(
                f"{where}: a sharded (FSDP2 / DTensor) parameter of shape {tuple(p.shape)} with placements"
                f" {tuple(p.placements)} is a batch of matrices (fused MoE experts) that '{self.recipe.name}' steps"
                f" per matrix; its {why}. Shard it on a leading dimension (FSDP2's default Shard(0)), put it in a"
                " group without the recipe's target key (e.g. no 'rank'), or do not shard it"
            )

    # ---- state ----------------------------------------------------------------------------

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor], key: Tensor | None = None) -> None:
        """Allocate ``p``'s state. ``key``: the sharded (FSDP2) parameter when ``p`` is its local
        shard; a projected one keeps its bases whole (replicated) and moments of the shard's
        projected gradient (lowmem.optim.sharded.ShardedProjection)."""
        r = self.recipe
        local_batch = key is not None and self._local_matrices(key, group)
        if key is not None and is_dtensor(key) and self._is_projected(key, group) and not local_batch:
            state["step"] = torch.zeros((), dtype=torch.float32)
            r.projection.init_state(state, key, group)  # the whole m x n geometry
            _init_moment_start(state, group, r.moment)
            r.combine.init_state_sharded(state, p, key, group)
            # the rule sees the shard's projected shape and the whole one (8-bit moments: quantized
            # exactly when one process would quantize them, Quantized.init_state_sharded)
            r.moment.init_state_sharded(state, self._sharded_projection(key, group, None).low_shape(group),
                                        r.projection.low_shape(key.shape, group), group, p, key=key)
            if group.get("kahan_summation") and p.dtype == torch.bfloat16:  # (the shard's write-back: _store)
                state["kahan_comp"] = torch.zeros(p.shape, dtype=torch.bfloat16, device=p.device)
            return
        if (key is None or not is_dtensor(key) or local_batch) and self._matrices(p, group):
            self._init_matrices(p, group, state, key=key if local_batch else None)
            return
        self._init_matrix(p, group, state, key=key)

    def _init_matrices(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor], key: Tensor | None = None) -> None:
        """The state of a batch of matrices (:meth:`_matrices`): each matrix's, as :meth:`_init_state`
        allocates it for a 2-D parameter (its projection's seed by :meth:`~lowmem.optim.subspace.Projection.init_state`'s
        per-matrix rule), stacked along ``p``'s leading dimensions; :data:`MATRIX_SHARED_KEYS` once. One
        matrix's state is allocated at a time beside the stacks.

        An unprojected batch (a rule's ``per_matrix`` statistics: RACS, Subset-Norm) allocates the first
        matrix's state only and copies each entry into every matrix of its stack at once (a broadcast copy: one
        kernel per entry, not two per matrix; issue 15: racs on a Qwen3-MoE layer's experts, 768 fills and 768
        copies at its first step): a matrix's state is made from its shape, dtype and device alone (the rules'
        and stabilizers' ``init_state``: zeros, whatever the matrix's values; its number only seeds a
        projection's draws), so every matrix's is the first one's, bit for bit.

        ``key``: the sharded batch (:meth:`_local_matrices`) whose local shard ``p`` is: each matrix numbered by
        its index in the whole batch (:func:`~lowmem.optim.sharded.matrix_offsets`), so its seed, and every
        random draw, is the one-process run's whatever the number of processes. A shard with no matrix
        (fewer matrices than processes) keeps the entries with no matrix in them (empty stacks, the counters);
        on a meta shard (the checks of a loaded state) the stacks are meta tensors."""
        lead = p.shape[:-2]
        owner, number = p, (lambda e: e)
        if key is not None:
            owner, offsets = key, matrix_offsets(key)
            number = lambda e: global_matrix(e, lead, offsets, key.shape[:-2])  # noqa: E731
        meta = key is not None and p.device.type == "meta"
        with torch.no_grad():  # (the estimator's fake CUDA tensors: copies outside no_grad need a CUDA build)
            count = math.prod(lead)
            if count == 0:  # (an empty shard: the layout of one matrix's entries, none allocated but the counters)
                sub: dict[str, Tensor] = {}
                self._init_matrix(torch.empty(p.shape[-2:], dtype=p.dtype, device="meta"), group, sub, matrix=(owner, 0))
                for k, v in sub.items():
                    if k in MATRIX_SHARED_KEYS:
                        state[k] = v
                        continue
                    like = _stack_like(v.to("meta"), lead)
                    state[k] = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype,
                                                   device=p.device if v.device.type == "meta" else v.device)
                return
            if not self._is_projected(owner, group):  # (the first matrix's state, broadcast into every matrix's)
                sub = {}
                self._init_matrix(matrix_of(p, matrix_index(0, lead)), group, sub, matrix=(owner, number(0)))
                for k, v in sub.items():
                    if meta and k not in MATRIX_SHARED_KEYS:
                        v = v.to("meta")
                    state[k] = v if k in MATRIX_SHARED_KEYS else _stack_like(v, lead)
                    if k not in MATRIX_SHARED_KEYS and not _no_data(v):
                        state[k].copy_(v.expand(state[k].shape))
                del sub
                return
            for e in range(count):
                idx = matrix_index(e, lead)
                sub = {}
                self._init_matrix(matrix_of(p, idx), group, sub, matrix=(owner, number(e)))
                for k, v in sub.items():
                    if meta and k not in MATRIX_SHARED_KEYS:
                        v = v.to("meta")  # (the projection allocates on the parameter's device: a probe holds no data)
                    if e == 0:
                        state[k] = v if k in MATRIX_SHARED_KEYS else _stack_like(v, lead)
                    if k not in MATRIX_SHARED_KEYS and not _no_data(v):
                        matrix_of(state[k], idx).copy_(v)
                del sub

    def _init_matrix(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor], key: Tensor | None = None,
                     matrix: tuple[Tensor, int] | None = None) -> None:
        """:meth:`_init_state` of a parameter not projected as a shard, or of matrix ``e`` of a batch
        ``matrix = (param, e)`` (``p`` its 2-D view)."""
        r = self.recipe
        state["step"] = torch.zeros((), dtype=torch.float32)
        shape = p.shape
        if self._is_projected(p, group):
            if matrix is None:
                r.projection.init_state(state, p, group)
            else:
                r.projection.init_state(state, matrix[0], group, matrix=matrix[1])
            _init_moment_start(state, group, r.moment)
            shape = r.projection.low_shape(p.shape, group)
            r.combine.init_state(state, p, group)
        if key is not None and is_dtensor(key):  # a local shard: the rule may look at the whole shape
            # and at the DTensor (its mesh and placements: which rows this shard holds, how many shards)
            r.moment.init_state_sharded(state, shape, key.shape, group, p, key=key)
        else:
            r.moment.init_state(state, shape, group, p)
        for s in r.stabilizers:
            s.init_state(state, p, group)
        if group.get("kahan_summation") and p.dtype == torch.bfloat16:  # (the write-back's compensation: _store)
            state["kahan_comp"] = torch.zeros(p.shape, dtype=torch.bfloat16, device=p.device)

    def materialize_state(self) -> None:
        """Allocate the state of every parameter now (normally done lazily at its first step).

        On meta-device parameters this allocates nothing and lets :meth:`state_bytes` report the
        exact state size of a model that was never built: the memory estimator uses it.
        """
        made = False
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self._init_state(local(p), group, self.state[p], key=p)
                    made = True
        if made:  # (made for the parameters' shapes now, perhaps not those group_layout kept: checked afresh)
            self.__dict__.pop("_layout_sigs", None)

    def state_bytes(self) -> int:
        """Exact bytes held by the optimizer state (every tensor in ``self.state``)."""
        return sum(
            v.numel() * v.element_size()
            for st in self.state.values()
            for v in st.values()
            if isinstance(v, Tensor)
        )

    def step_transient_bytes(self, per_parameter: bool = False, first_step: bool = False) -> int:
        """Upper bound of the memory one :meth:`step` allocates beyond parameters, gradients and state.

        Parameters are stepped one after another and each one's temporaries are freed before the
        next, so this is the largest transient over parameters (and over foreach buckets): for a
        chunked parameter, that of its largest chunk (the gradient and parameter chunks in float32
        when stored in lower precision, the stabilizers' and the moment rule's temporaries); for a
        parameter stepped whole (projected, or a rule that is not element-wise), that of the whole
        tensor, including the projection's refresh workspace and the full-size combine-back. Each
        part reports its own term (``transient_bytes`` of the moment rule, stabilizers, projection
        and residual rule), computed from the same configuration the step uses (``chunk_numel``,
        block sizes, rank, projection method). Gradients are assumed in the parameter's dtype. A
        foreach bucket counts the rule's :meth:`~lowmem.optim.moments.MomentRule.foreach_bucket_transient_bytes`
        of its elements and members (a quantized rule decodes only its members with quantized moments), leaving out the pieces of a tensor the rule steps whole from its first piece
        (:meth:`~lowmem.optim.moments.MomentRule.steps_pieces_whole`: that tensor's per-parameter
        step is counted instead). A tensor a fused kernel steps whole in an uncapped bucket
        (:meth:`_fused_whole`: AdamW's, torch's fused AdamW kernel) allocates nothing and is left out of
        the buckets, as :meth:`step` leaves it out of the capped ones (not on meta tensors, whose device
        is not known: there the capped buckets' multi-tensor operations are counted).

        Projected parameters on the multi-tensor path (:meth:`_projected_foreach_ok`) are counted
        phase by phase as :meth:`step` runs them (:meth:`_low_bucket_bytes`): each one's project-down
        (its refresh) next to the projected gradients of the open bucket before it, the moment rule's
        multi-tensor direction next to the whole bucket's, each combine-back next to the projected
        gradients and directions not combined back yet. A parameter stepped alone while a bucket is
        open (the per-parameter step of another kind of parameter) is counted next to that bucket's
        projected gradients.

        Projected parameters on the CPU of a build with MKL (``torch.backends.mkl.is_available()``):
        the first combine-back of a basis leaves MKL's GEMM packing buffer, kept for the process and
        alive in every phase of every later step (:meth:`~lowmem.optim.subspace.Projection.kept_gemm_bytes`,
        ``4 min(r, 256) n`` bytes + 0.7 MiB): the largest one over these parameters is added once to
        the whole step (:meth:`_kept_gemm_bytes`; a ``rsvd`` refresh's own count of it is left out of
        its phase, :meth:`~lowmem.optim.subspace.Projection.refresh_kept_bytes`). CUDA (cuBLAS keeps
        no such buffer) and meta-device parameters (the estimator's, whose device is not known) do not
        count it.

        The non-finite check runs first, alone (:meth:`_check_bytes`: :func:`_all_finite_bytes` of the
        gradients, the multi-tensor norms and their stack, 8 bytes per float32 gradient on the CPU); the
        largest of it and the rest is reported. Torch's fused AdamW kernel's step count, a 0-d tensor per
        device cached from one step to the next (:meth:`_fused_step_bytes`), is alive in every phase, and
        the step's new one beside it while the buckets run.

        Works on meta-device parameters after :meth:`materialize_state` (as :meth:`state_bytes`):
        the memory estimator adds it to the state for the peak of a training step.

        Args:
            per_parameter: The largest transient of stepping one parameter alone
                (:meth:`step_param`, what layerwise mode does): no foreach or projected buckets.
            first_step: The bound of a step that makes its parameters' state (their first step without
                :meth:`materialize_state`, as the Trainer's first step): the fused route is decided there from
                the state that step makes (:meth:`_fused_whole`, :meth:`_state_to_be`), so a tensor torch's fused
                AdamW kernel steps later takes it at its first step too and the bound equals the default's
                (kept for callers that ask, BAdam's block switch and the estimator; from 2026-12-01, EST18, to
                FIRSTSTEP the route of no state was the capped buckets: a bfloat16 weight with bfloat16 moments
                took :meth:`_step_bf16_bucket`, 12 B per element of its capped bucket, 19,680 B for 1,640 such
                elements on the CPU against 8). The state is counted as materialized (call
                :meth:`materialize_state` first, or step once); the default (``False``) bounds the steps after
                the state exists.

        On a step without projection refreshes, the non-finite check may hold projected gradients
        (:meth:`_checked_lows`) within the difference between this bound and the same bound without
        the refresh phases (:meth:`_hold_budget`), so the bound covers that step too.
        """
        return self._transient_bytes(per_parameter, first_step=first_step)

    def _transient_bytes(self, per_parameter: bool = False, steady: bool = False, first_step: bool = False) -> int:
        """:meth:`step_transient_bytes`; ``steady``: of a step in which no projection refreshes; ``first_step``:
        of the step that makes the state (the fused kernel's uncapped bucket decided from the state it makes)."""
        worst = 0
        kept = self._kept_gemm_bytes()  # MKL's packing buffer, alive in every phase (CPU)
        sizes: dict[tuple, tuple[int, int]] = {}
        buckets: dict[tuple, int] = {}
        members: dict[tuple, list[tuple[int, dict[str, Tensor]]]] = {}  # (elements, state) of each bucket's pieces
        bucket_groups: dict[tuple, dict[str, Any]] = {}  # each bucket's parameter group (its hyperparameters)
        outside: dict[tuple, int] = {}  # each bucket's elements of non-contiguous parameters
        low16: dict[tuple, list[tuple[int, dict[str, Tensor]]]] = {}  # (elements, state) of its bfloat16 members
        many: set[tuple] = set()  # buckets whose whole tensors are stabilized together (_stabilizes_many)
        low_bucket: list[_ProjectedBytes] = []  # the open bucket of the projected multi-tensor step
        low_key: tuple | None = None
        low_where: tuple = (None, None)  # (the open bucket's group and device)
        for group in self.param_groups:
            for key in group["params"]:
                state, p = self.state[key], local(key)  # a sharded parameter: its local shard
                if not state:
                    if p.device.type != "meta":
                        raise RuntimeError("step_transient_bytes: call materialize_state() first (or step once)")
                    self._init_state(p, group, state, key=key)
                if per_parameter:
                    worst = max(worst, self._param_transient_bytes(p, group, state, steady))
                    continue
                open_bytes = sum(4 * b.numel + b.held for b in low_bucket)
                # (FSDP2, a batch whose shard holds whole matrices: counted as the unsharded batch of them)
                sharded = is_dtensor(key) and not self._local_matrices(key, group)
                if is_dtensor(key) and not sharded and p.numel() == 0:
                    continue  # (an empty shard: no matrix to step)
                if sharded:
                    shards = math.prod(key.device_mesh.size(i) for i, pl in enumerate(key.placements) if pl.is_shard())
                    if self._is_projected(key, group):
                        # FSDP2, projected: bounded by the unsharded step of the whole matrix (the refresh
                        # runs on the whole gradient) plus the gather's buffers (whole and padded shard)
                        m, n = key.shape
                        whole = torch.empty(key.shape, dtype=key.dtype, device="meta")
                        worst = max(worst, open_bytes + self._param_transient_bytes(whole, group, state, steady)
                                    + 4 * (m + -(-m // shards)) * n)
                        continue
                    # a rule whose sharded step gathers the whole tensor (Muon's Newton-Schulz), next
                    # to the float32 copy of a low-precision shard's gradient
                    with counting_gradient(p.dtype):
                        gathered = self.recipe.moment.sharded_transient_bytes(p.shape, key.shape, shards, group, state)
                        stab = sum(s.transient_bytes(p.numel(), group) for s in self.recipe.stabilizers)
                    if gathered is not None:
                        copy = 4 * p.numel() * (p.dtype not in (torch.float32, torch.float64))
                        worst = max(worst, open_bytes + gathered + copy + stab)
                        continue
                batch = not sharded and self._matrices_foreach_ok(p, group, state=state)
                if batch or (not is_dtensor(key) and self._projected_foreach_ok(p, group, state=state)):
                    # as step() fills them: one open bucket, a new one for another group or device or
                    # beyond chunk_numel projected elements; a batch of matrices: each matrix as a 2-D parameter
                    if batch:
                        idx = matrix_index(0, p.shape[:-2])
                        items = [self._projected_bytes(matrix_of(p, idx), group, matrix_state(state, idx), steady)
                                 ] * math.prod(p.shape[:-2])
                    else:
                        items = [self._projected_bytes(p, group, state, steady)]
                    chunk = self._chunk(p.device)
                    for item in items:
                        if low_bucket and (low_key != (id(group), p.device) or (
                                chunk is not None and sum(b.numel for b in low_bucket) + item.numel > chunk)):
                            worst = max(worst, self._low_bucket_bytes(low_bucket, *low_where))
                            low_bucket = []
                        low_key, low_where = (id(group), p.device), (group, p.device)
                        low_bucket.append(item)
                    continue
                if self._foreach_ok(p, group, state=state):
                    # (its uncapped bucket of torch's fused AdamW kernel allocates nothing; at the step that makes
                    # the state, first_step, the route is decided from the state it makes: _fused_whole)
                    if (not is_dtensor(key) and p.device.type != "meta"
                            and self._fused_whole(p, group, {} if first_step else state)):
                        continue
                    whole = False
                    if (len(self._foreach_pieces(p)) > 1 and not self.recipe.stabilizers
                            and not getattr(self.recipe.moment, "pieces_elementwise", False)):
                        # a tensor in pieces that the rule steps whole from its first one by its
                        # per-parameter step (steps_pieces_whole; moments.step_whole_from_piece_: Adafactor,
                        # Adam-mini, the hybrids' targets, quantized moments, MicroAdam, subset norms): that
                        # transient, and then its pieces allocate nothing of their buckets' step; pieces the
                        # rule steps element-wise (a hybrid's AdamW parameter) only their buckets' (before
                        # 2026-11-30 the per-parameter term was added for them too: 2,097,152 B over for a
                        # 2**21-element vector on torch's fused kernel)
                        # (its whole step runs in its bucket's step, after the projected buckets are stepped and
                        # their projected gradients freed: not beside an open one; before 2026-11-30 counted beside
                        # it, frugal8bit's tiny-model step 1,068 B over)
                        whole = self.recipe.moment.steps_pieces_whole(p.shape, group, state)
                        if whole:
                            worst = max(worst, self._param_transient_bytes(p, group, state, steady))
                    cls = self.recipe.moment.foreach_bucket_class(p.shape, group, state)
                    for start, stop in self._foreach_pieces(p):
                        # (the pieces still fill the buckets as step() fills them, by class)
                        key = self._bucket_key(sizes, (id(group), p.device, cls), stop - start, self._chunk(p.device))
                        bucket_groups[key] = group
                        if p.dtype == torch.bfloat16:  # (stepped apart from its float32 members: _step_bf16_bucket)
                            buckets.setdefault(key, 0)
                            low16.setdefault(key, []).append((stop - start, state))
                            continue
                        buckets[key] = buckets.get(key, 0) + (0 if whole else stop - start)
                        if not whole:
                            members.setdefault(key, []).append((stop - start, state))
                            if not p.is_contiguous():  # (outside torch's fused AdamW kernel's layout)
                                outside[key] = outside.get(key, 0) + stop - start
                        # stabilized pieces: their temporaries, and (below) the bucket's stabilized gradients
                        with counting_gradient(p.dtype):
                            worst = max(worst, sum(s.transient_bytes(stop - start, group) for s in self.recipe.stabilizers))
                        if stop - start == p.numel() and self._stabilizes_many(p.device):
                            many.add(key)  # (stabilized together: Stabilizer.transform_many, below)
                    continue
                worst = max(worst, open_bytes + self._param_transient_bytes(p, group, state, steady))
        if low_bucket:
            worst = max(worst, self._low_bucket_bytes(low_bucket, *low_where))
        # the foreach step allocates for its whole bucket (AdamW: sqrt(v), torch._foreach_sqrt; a
        # quantized rule decodes its members with quantized moments), after the projected buckets are
        # done; a stabilized bucket holds its stabilized gradients, float32, next to the foreach step's own
        moment, stab = self.recipe.moment, 4 * bool(self.recipe.stabilizers)
        # (a rule with torch's fused AdamW kernel, foreach_counts_outside: the elements the kernel leaves out;
        # a rule with foreach_counts_class: the bucket's class, foreach_bucket_class, e.g. the shape of the
        # hybrids' targets, whose stacks and scalings are sized by it)
        def extra(k: tuple) -> dict[str, Any]:
            kw: dict[str, Any] = {}
            if getattr(moment, "foreach_counts_outside", False):
                kw["outside"] = outside.get(k, 0)
            if getattr(moment, "foreach_counts_class", False):
                kw["bucket_class"] = k[2]  # (_bucket_key: (id(group), device, class, index))
            return kw

        foreach = max((max(moment.foreach_bucket_transient_bytes(n, members.get(k, []), bucket_groups[k], **extra(k))
                           + stab * n, self._bf16_bucket_bytes(low16.get(k, []), bucket_groups[k], k[2]),
                           # a bucket stabilized at once: the stabilizers' transient before the moment step
                           sum(s.transform_many_transient_bytes(n, bucket_groups[k]) for s in self.recipe.stabilizers)
                           if k in many else 0) for k, n in buckets.items()),
                      default=moment.foreach_transient_bytes(0))
        # torch's fused AdamW kernel reads the step count from a float32 0-d tensor per device, cached from one
        # step to the next (functional.adam._step_tensor): alive in every phase, and a new one beside it once a step
        steps = self._fused_step_bytes(first_step)
        held = 0 if per_parameter else self._pre_check_bytes()[0]  # (kept through the step: _finite_and_pre_check)
        return kept + steps + max(max(worst, foreach) + steps + held, self._check_bytes() if not per_parameter else 0)

    def _bf16_bucket_bytes(self, members: list[tuple[int, dict[str, Tensor]]], group: dict[str, Any],
                           bucket_class: Any = None) -> int:
        """What :meth:`_step_bf16_bucket` allocates for a bucket's bfloat16 ``members`` (elements, state), after its
        float32 members' step: the rule's direction phase (``bf16_bucket_transient_bytes``, the gradients' float32
        copies included; told the ``members`` and ``group`` too: SM3's stacks are sized per shape, the quantized
        rules' codec calls by the block size), the directions beside the parameters' float32 copies (8 B per
        element), and with
        ``bf16_stochastic_round`` the copies (then one flat buffer, each member padded to a multiple of 4 elements:
        :func:`~lowmem.optim.functional.rounding.padded_numel`) beside the whole bucket's random bits and NaN mask
        (:func:`~lowmem.optim.functional.rounding.stochastic_round_bucket_bytes`, 3 B per padded element: the bucket
        is capped at ``chunk_numel`` elements); Kahan's compensation and rounding to nearest allocate nothing more.
        ``bucket_class``: the bucket's (:meth:`~lowmem.optim.moments.MomentRule.foreach_bucket_class`), told to a rule
        with ``bf16_bucket_counts_class`` (the hybrids': an AdamW bucket or targets of one shape)."""
        if not members:
            return 0
        r, n = self.recipe, sum(k for k, _ in members)
        sr = group.get("bf16_stochastic_round")
        c = 4 * padded_numel([k for k, _ in members]) if sr else 4 * n  # (the parameters' float32 copies)
        rounding = c + stochastic_round_bucket_bytes([k for k, _ in members]) if sr else 0
        if getattr(r.moment, "bf16_bucket_steps_copies", False):  # (the copies beside the rule's float32 bucket step)
            return max(4 * n + c + r.moment.foreach_bucket_transient_bytes(n, members, group), rounding)
        told = {"bucket_class": bucket_class} if getattr(r.moment, "bf16_bucket_counts_class", False) else {}
        rule = r.moment.bf16_bucket_transient_bytes(n, [s for _, s in members], members=members, group=group, **told)
        if r.lr_rule is constant_lr:
            # (the directions kept beside the parameters' copies: 4 B per element, or the rule's count where a
            # direction may be its state itself, bf16_bucket_direction_bytes: SGD's and RMSprop's float32 buffers)
            kept_d = getattr(r.moment, "bf16_bucket_direction_bytes", None)
            worst = max(rule, (4 * n if kept_d is None else kept_d(n, [s for _, s in members], group)) + c)
        else:  # the parameters' copies first, the step sizes (peak, kept) beside them, then the direction phase
            peak, kept = r.moment.bf16_bucket_lr_bytes(len(members), group)
            wd = any(r.moment.weight_decay_for(group, s) != 0 for _, s in members)
            # (a tensor of step sizes: the decay's lr wd and p (lr wd) beside the directions and copies)
            worst = max(c + peak, c + kept + rule, 4 * n + c + kept + ((kept + 4 * n) if kept and wd else 0))
        return max(worst, rounding)

    def _fused_step_bytes(self, first_step: bool = False) -> int:
        """4 bytes per device whose parameters the moment rule may step with torch's fused AdamW kernel
        (its ``foreach_counts_outside``; full-rank, a float ``lr``, a device of
        :func:`~lowmem.optim.functional.adam.fused_device`, not meta): the kernel's step-count tensor
        (:func:`~lowmem.optim.functional.adam._step_tensor`). A bfloat16 parameter counts only where the kernel
        steps it (:meth:`_fused_whole`: bfloat16 moments, and ``foreach`` not ``False``; ``first_step``: decided from
        the state the first step makes, the same); before 2026-12-01 every device counted,
        8 B over for bfloat16 weights with float32 moments, which the kernel never steps."""
        moment = self.recipe.moment
        # (a wrapper whose multi-tensor step is its inner rule's, e.g. Stable-SPAM's RestartBiasCorrection around
        # AdamW: foreach_uses_fused_kernel; before 2026-11-30 its step count was left out, 4 B under)
        if not (getattr(moment, "foreach_counts_outside", False) or getattr(moment, "foreach_uses_fused_kernel", False)):
            return 0
        # (a rule whose AdamW parameters are some of its buckets' only, fused_kernel_buckets_only: the hybrids'; the
        # kernel steps their buckets of class None, foreach_bucket_class, on the multi-tensor path alone)
        only = getattr(moment, "fused_kernel_buckets_only", False)

        def steps_in_kernel(key: Tensor, group: dict[str, Any]) -> bool:
            p, state = local(key), self.state[key]
            if p.dtype == torch.bfloat16 and (group.get("foreach") is False
                                              or not self._fused_whole(p, group, {} if first_step else state)):
                return False  # (its buckets' float32 arithmetic, _step_bf16_bucket, or its own step: not the kernel)
            return not only or (self._foreach_ok(p, group, state=state)
                                and moment.foreach_bucket_class(p.shape, group, state) is None)

        devices = {local(key).device for group in self.param_groups if not isinstance(group.get("lr"), Tensor)
                   for key in group["params"] if not self._is_projected(key, group) and steps_in_kernel(key, group)}
        return 4 * sum(d.type != "meta" and _FA.fused_device(d) for d in devices)

    def _check_bytes(self) -> int:
        """What :meth:`step`'s non-finite check allocates (:func:`_all_finite_bytes`), before any other
        phase of the step: every parameter's (local) gradient, assumed in the parameter's dtype; 0 with
        ``skip_nonfinite`` off. The projected gradients it may read instead (:meth:`_checked_lows`:
        float32, never of a float64 parameter, fewer elements) cost no more per tensor; they are held
        within :meth:`_hold_budget`, which this term is part of (held + check <= the bound). With a projection,
        the check may be :meth:`_finite_and_pre_check`'s (a basis step's pre_check, a refresh reading its
        gradient): the same norms (:func:`_norms`), of the gradients reordered with the due refreshes' first, so
        its groups of one dtype may come in another order: the largest count over the groups' orders (a group's
        peak is largest last, beside every other group's float32 stack: the orders with each group last)."""
        if not self.skip_nonfinite:
            return 0
        specs = [(p.numel(), p.dtype, p.device) for group in self.param_groups for p in map(local, group["params"])]
        alone = _all_finite_bytes(specs)
        if self.recipe.projection is not None and specs and all(d == specs[0][2] for _, _, d in specs):
            # (several devices: _finite_and_pre_check leaves the check to _all_finite)
            groups: dict[tuple[torch.dtype, torch.device], list] = {}
            for spec in specs:
                groups.setdefault(spec[1:], []).append(spec)
            for last in groups if len(groups) > 1 else ():
                alone = max(alone, _all_finite_bytes([x for g, xs in groups.items() if g != last for x in xs]
                                                     + groups[last]))
        held, pre = self._pre_check_bytes()
        if not pre:
            return alone
        # with a projection's pre_check (_finite_and_pre_check): its own temporaries, then the norms of every
        # gradient and their float32 stack (then its mask and the flags, less: alone counts them) next to its
        # kept float32 norms and its flag (1 byte); when that read fails, _all_finite's alone
        return max(alone, pre, held + 1 + alone)

    def _pre_check_bytes(self) -> tuple[int, int]:
        """``(held, peak)`` of the projection's :meth:`~lowmem.optim.subspace.Projection.pre_check` read with the
        non-finite check (:meth:`_finite_and_pre_check`; Online Subspace Descent's,
        :meth:`~lowmem.optim.subspace.SubspaceProjection.pre_check`), for every projected parameter (not sharded)
        of an online-PCA group taking a basis step: ``held``, the float32 gradients' norms kept through the step
        (its ``checked``: 4 bytes each); ``peak``: per dtype (in the parameters' order) its 0-d norms and their
        stack (``2 e N_d``, then the stack ``e N_d`` kept), then every non-float32 stack's float32 copy
        (``4 N_d``), their concatenation when there are several dtypes (``4 N``), its log (``4 N``) and sum (4).
        ``(0, 0)`` without such a projection or with ``skip_nonfinite`` off."""
        P = self.recipe.projection
        if P is None or not self.skip_nonfinite or type(P).pre_check is Projection.pre_check:
            return 0, 0
        # (the parameters its pre_check may take: projected, of an online-PCA group, the filter of
        # SubspaceProjection.pre_check)
        method = getattr(P, "method", None)
        counts: dict[torch.dtype, int] = {}
        for group in self.param_groups:
            for key in group["params"]:
                if (not is_dtensor(key) and key.ndim == 2 and self._is_projected(key, group)
                        and (method is None or method(group) == "online_pca")):  # (a batch reads its own: _update_matrices)
                    counts[key.dtype] = counts.get(key.dtype, 0) + 1
        if not counts:
            return 0, 0
        n, stacks, peak = sum(counts.values()), 0, 0
        for dtype, k in counts.items():
            peak = max(peak, stacks + 2 * dtype.itemsize * k)
            stacks += dtype.itemsize * k
        copies = sum(4 * k for dtype, k in counts.items() if dtype is not torch.float32)
        peak = max(peak, stacks + copies + 4 * n * (len(counts) > 1) + 4 * n + 4)
        return 4 * counts.get(torch.float32, 0), peak

    @staticmethod
    def _mkl_keeps_packs(p: Tensor) -> bool:
        """Whether GEMMs on ``p``'s device leave MKL's packing buffers for the process: a CPU tensor
        on a build with MKL (not CUDA, whose cuBLAS keeps none; not meta: its device is not known)."""
        return p.device.type == "cpu" and torch.backends.mkl.is_available()

    def _kept_gemm_bytes(self) -> int:
        """The largest GEMM packing buffer MKL keeps after a combine-back
        (:meth:`~lowmem.optim.subspace.Projection.kept_gemm_bytes`) over the projected parameters
        whose step runs where MKL keeps it (:meth:`_mkl_keeps_packs`): one buffer, counted once."""
        P, kept = self.recipe.projection, 0
        for group in self.param_groups:
            for key in group["params"]:
                if self._is_projected(key, group) and self._mkl_keeps_packs(local(key)):
                    kept = max(kept, P.kept_gemm_bytes(key.shape[-2:], group))  # (a batch: each matrix's)
        return kept

    def _low_bucket_bytes(self, items: list[_ProjectedBytes], group: dict[str, Any] | None = None,
                          device: torch.device | None = None) -> int:
        """The peak of one bucket of the projected multi-tensor step, from its parameters' terms
        (:meth:`_projected_bytes`) in the order :meth:`step` fills it: each project-down (``down``)
        next to the projected gradients (and held copies) of the parameters before it; the moment
        rule's :meth:`~lowmem.optim.moments.MomentRule.foreach_direction` next to all of them
        (:meth:`~lowmem.optim.moments.MomentRule.foreach_direction_bucket_transient_bytes`, the directions
        included); then a bucket the engine folds (:meth:`_fold_low_bucket`) whose combine rule counts its fold
        (:meth:`~lowmem.optim.subspace.CombineRule.foreach_fold_bytes`): the fold next to every projected
        gradient and direction, then, the directions freed, the projection's
        :meth:`~lowmem.optim.subspace.Projection.foreach_post_update_bytes` (Online Subspace Descent's basis
        steps) next to the projected gradients; otherwise each combine-back (``back``) next to the projected
        gradients, directions and held copies of itself and the parameters after it (:meth:`_step_low_bucket`
        frees each one's as it is combined back)."""
        worst = alive = 0
        for b in items:
            worst = max(worst, alive + b.down)
            alive += 4 * b.numel + b.held + b.step_size  # (its step size, from its project-down to the bucket's end)
        numel = sum(b.numel for b in items)
        members = [(b.low_shape, b.state if b.state is not None else {}) for b in items]
        worst = max(worst, alive + self.recipe.moment.foreach_direction_bucket_transient_bytes(members))
        r, P = self.recipe, self.recipe.projection
        if group is not None and items and all(b.folds for b in items):
            folded = [(b.shape, b.low_shape, b.state if b.state is not None else {}, b.bounds) for b in items]
            fold = r.combine.foreach_fold_bytes(folded, group, P, device)
            if fold is not None:
                post = P.foreach_post_update_bytes(folded, group, self._pre_check_bytes()[1] > 0)
                return max(worst, alive + 4 * numel + fold, alive + post)
        alive += 4 * numel  # the directions, float32 of the projected gradients' sizes
        # (a bucket with a member that cannot fold, e.g. a bfloat16 one: every member combined back alone,
        # _fold_low_bucket; before 2026-11-30 a float32 member's share of a fold was counted, osd_adamw's mixed
        # tiny model 12,300 B reported for 9,676 traced)
        alone = not all(b.folds for b in items)
        for b in items:
            worst = max(worst, alive + (b.back_alone if alone and b.back_alone is not None else b.back))
            alive -= 8 * b.numel + b.held  # (the bucket's step sizes stay until its end)
        return worst

    def _casts_float64_grad(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether :meth:`_update_state` casts ``p``'s float64 gradient to float32 once before the step: a rule that
        computes in its state's precision (:attr:`MomentRule.computes_in_state_precision`: CAME, Adafactor) with a
        float32 / bfloat16 state of a float64 parameter (its statistics are float32 at best; the parameter itself
        stays float64). Unprojected, unstabilized, unsharded parameters only."""
        r = self.recipe
        return (p.dtype == torch.float64 and getattr(r.moment, "computes_in_state_precision", False)
                and not r.stabilizers and not self._is_projected(p, group) and not is_dtensor(p)
                and state_dtype(group, p) != torch.float64)

    def _param_transient_bytes(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor], steady: bool = False) -> int:
        """The transient of :meth:`_update` of ``p`` alone (its per-parameter step; ``steady``: without a refresh).
        A batch of matrices (:meth:`_matrices`): one matrix's, its step's temporaries freed before the next one's; or
        its largest block's, stepped by the rule's batched step (:meth:`_matrix_blocks_bytes`).
        A float64 gradient cast to float32 (:meth:`_casts_float64_grad`): that copy (4 B per element, held through
        the step) and the rule's ``float64_param_bytes`` beside the step of a float32 gradient. The rules' counts
        are told the gradient's dtype (:func:`~lowmem.optim.moments.counting_gradient`: ``p``'s, float32 once cast),
        not left to read it from the group (a float32 parameter beside a float64 one, FOUND_EST12 1)."""
        casts = self._casts_float64_grad(p, group)
        # (a batch of matrices casts one matrix's gradient at a time: _update_matrices steps each as a 2-D parameter)
        n = p.numel() // max(1, math.prod(p.shape[:-2])) if self._matrices(p, group) else p.numel()
        cast = 4 * n + self.recipe.moment.float64_param_bytes(group) if casts else 0
        with counting_gradient(torch.float32 if casts else p.dtype):
            return cast + self._step_transient_bytes_of(p, group, state, steady)

    def _step_transient_bytes_of(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor],
                                 steady: bool = False) -> int:
        """:meth:`_param_transient_bytes` less a float64 gradient's float32 copy (:meth:`_casts_float64_grad`)."""
        if self._matrices(p, group):
            if p.numel() == 0:  # (an FSDP2 shard with no matrix: nothing stepped)
                return 0
            blocks = self._matrix_blocks(p, group, state)
            if blocks is not None:  # (blocks of whole matrices stepped together: _update_matrix_blocks)
                return self._matrix_blocks_bytes(p, group, state, blocks)
            idx = matrix_index(0, p.shape[:-2])
            return self._step_transient_bytes_of(matrix_of(p, idx), group, matrix_state(state, idx), steady)
        r = self.recipe
        fused = getattr(r.moment, "fused_step_allocates_nothing", None)
        fused_bytes = getattr(r.moment, "fused_step_transient_bytes", None)
        plain = (not r.stabilizers and not self._is_projected(p, group) and not is_dtensor(p)
                 and p.device.type != "meta" and r.decay_after_update == r.moment.foreach_decays_after)
        if plain and fused is not None and fused(p, group, state):
            return 0  # (_update_state: torch's fused AdamW kernel steps it, AdamMoments.fused_step_)
        if plain and fused_bytes is not None:  # (a fused kernel that allocates: bitsandbytes' CPU implementation,
            b = fused_bytes(p, group, state, self._chunk(p.device))  # before any float32 copy is made)
            if b is not None:
                return b
        bounds = self._chunk_bounds(p, group, state)
        if bounds is None and self._is_projected(p, group):
            return self._projected_bytes(p, group, state, steady).alone
        worst = self._steps_bytes(p, group, state, bounds)
        if bounds is not None and self._rms_in_chunks(p, group):  # (the first pass, before anything else: _chunked_lr)
            worst = max(worst, chunked_rms_bytes(bounds))
        if p.dtype == torch.bfloat16 and group.get("bf16_stochastic_round"):
            # the write-back's phase (_store): the parameter (chunk)'s float32 copy and the rounding's random bits
            # and NaN mask, beside what the chunked rule keeps through its chunks (the direction is freed first)
            for n in sorted({b - a for a, b in bounds} if bounds is not None else {p.numel()}, reverse=True)[:1]:
                kept = r.moment.chunk_kept_bytes(n, p.shape, group, state) if bounds is not None else 0
                worst = max(worst, kept + 4 * n + stochastic_round_bytes(n))
        return worst

    def _steps_bytes(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor],
                     bounds: list[tuple[int, int]] | None) -> int:
        """:meth:`_step_transient_bytes_of` of an unprojected parameter stepped whole (``bounds`` ``None``) or in
        the chunks ``bounds``, but the write-back's stochastic rounding."""
        r = self.recipe
        lowp = p.dtype not in (torch.float32, torch.float64)
        whole = getattr(r.moment, "whole_transient_bytes", None)
        if bounds is None:
            n = p.numel()
            copies = 4 * n * lowp  # float32 copy of the gradient (and of the parameter)
            stab = sum(s.transient_bytes(n, group) for s in r.stabilizers)
            if whole is not None:
                # stepped whole (its direction sees the whole tensor, not a ChunkState): a rule whose whole-tensor
                # form differs from its chunked one of a single chunk (SinkGD's sr_sinkhorn) says which it allocates
                return 2 * copies + stab + whole(p.shape, group, state)
            return 2 * copies + stab + r.moment.transient_bytes(n, p.shape, group, state)
        # a chunked step of a rule whose direction is a new tensor (MomentRule.chunk_direction_is_new): the gradient
        # chunk's float32 copy is freed when the direction returns, before the parameter chunk's copy is made
        new = not r.stabilizers and getattr(r.moment, "chunk_direction_is_new", False)
        # a rule that counts those copies itself, phase by phase (MomentRule.chunk_counts_copies: Muon, whose
        # Newton-Schulz phase holds no gradient chunk; SinkGD, whose scalings' passes hold a block's copy only until
        # its squares are made): asked with copy=, the bytes per element of a float32 copy
        counts = not r.stabilizers and getattr(r.moment, "chunk_counts_copies", False)
        # a rule whose chunked step allocates other than its whole-tensor direction (Adafactor's two passes over
        # the row blocks, then the directions beside the factors) says it (MomentRule.chunk_transient_bytes)
        rule = getattr(r.moment, "chunk_transient_bytes", None) or r.moment.transient_bytes
        # every chunk size the step visits (the full chunks and the last, shorter one, whose partial quantization
        # block's padded copies may make its rule's term the larger while its float32 copies are the smaller):
        # the copies and the rule's transient of the same chunk
        worst = 0
        for n in sorted({b - a for a, b in bounds}, reverse=True) or [0]:
            if counts:
                worst = max(worst, rule(n, p.shape, group, state, copy=4 * lowp))
                continue
            copies = 4 * n * lowp
            if r.stabilizers:
                # stabilized chunks, phase by phase: the stabilizers' temporaries (their result included) beside the
                # gradient chunk's copy, freed but for their result (float32, 4 B per element; the copy is freed
                # when a new result replaces it); then the rule's direction beside that result, and the parameter
                # chunk's copy beside the direction when it is a new tensor (chunk_direction_is_new: the result is
                # freed when it returns), beside both otherwise. (Before 2026-11-30 all of them were added: SPAM's
                # 64 x 24 weight in chunks of 600, 16,800 B reported, 7,800 traced.)
                # (Stabilizer.chunk_bytes: a chunk's temporaries, and what its prepare keeps through the chunks)
                phases = [s.chunk_bytes(n, group, bounds, p.device) for s in r.stabilizers]
                stab, kept = sum(b for b, _ in phases), sum(k for _, k in phases)
                after = 0 if getattr(r.moment, "chunk_direction_is_new", False) else copies
                # (the stabilized chunk is in the gradient's dtype: 8 B per element for a float64 parameter)
                worst = max(worst, copies + stab, kept + (8 if p.dtype == torch.float64 else 4) * n + after
                            + rule(n, p.shape, group, state))
                continue
            worst = max(worst, copies + (0 if new else copies) + rule(n, p.shape, group, state))
        return worst

    def _projected_bytes(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor], steady: bool = False) -> _ProjectedBytes:
        """:meth:`_projected_bytes_of`, its rules told ``p``'s gradient dtype (:func:`~lowmem.optim.moments.counting_gradient`)."""
        with counting_gradient(p.dtype):
            return self._projected_bytes_of(p, group, state, steady)

    def _projected_bytes_of(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor], steady: bool = False) -> _ProjectedBytes:
        """The transient terms of projected ``p``'s step (:class:`_ProjectedBytes`): stepped alone
        (:meth:`_update`), or its phases on the multi-tensor path (:meth:`_low_bucket_bytes`);
        ``steady``: of a step without a refresh (:meth:`_hold_budget`); also when the projection refreshes this
        parameter's basis no more (:meth:`~lowmem.optim.subspace.Projection.refreshes_again`: Online Subspace
        Descent's basis, learned online after its first SVD; before 2026-11-30 every report held that SVD,
        osd_adamw's 48 x 24 weight 20,736 B for a traced 3,912)."""
        r, P = self.recipe, self.recipe.projection
        steady = steady or not P.refreshes_again(state, group)
        lowp = p.dtype != torch.float32
        stab = sum(s.transient_bytes(p.numel(), group) for s in r.stabilizers)
        copies = 4 * p.numel() * lowp  # float32 copy of the gradient
        low_shape = P.low_shape(p.shape, group)
        numel = low_shape.numel()
        plain = P.transient_bytes(p.shape, group, state, refresh=False)  # the projected gradient (and more)
        step = plain + r.moment.transient_bytes(numel, low_shape, group, state)
        chunk = self._chunk(p.device)
        rows = p.shape[0] if chunk is None else max(b - a for a, b in self._row_bounds(p.shape, chunk))
        if chunk is not None and not r.stabilizers:
            # low-precision gradients go down and come back a block of rows at a time; only a refresh
            # converts the whole gradient
            refresh_copy, copies = copies * P.refresh_reads_gradient(group), 4 * rows * p.shape[1] * lowp
        else:
            refresh_copy = 0
        combine = r.combine.transient_bytes(p.shape, group, state, P, rows)
        refresh = P.transient_bytes(p.shape, group, state, refresh=True) + refresh_copy
        if self._mkl_keeps_packs(p):  # (MKL's packing buffer: counted once for the step, _kept_gemm_bytes)
            refresh -= P.refresh_kept_bytes(p.shape, group)
        if steady:
            refresh = 0
        p_copy = 4 * rows * p.shape[1] * lowp  # a block of rows in float32 (all rows: the parameter's copy)
        alone = copies + p_copy + stab + max(step + combine, refresh)
        if not r.stabilizers:  # exact, phase by phase (issue 12); MKL's kept buffer is counted once by the caller
            alone = projected_alone_bytes(self, p, group, state, steady, kept=self._mkl_keeps_packs(p))
        # the multi-tensor path (no stabilizers): unchunked, the float32 copies of the gradient and the
        # parameter live from the project-down to the combine-back; chunked, a block of rows is converted
        extra = max(0, plain - 4 * numel)  # the projection's beyond the projected gradient (online PCA's basis step)
        back = combine + extra if chunk is None else copies + p_copy + combine + extra
        # the combine-back of the bucket as _step_low_bucket runs it (issue 12): a float32 bucket with one float
        # step size folds (_fold_low_bucket: the rule's foreach_fold_bytes for the whole bucket, _low_bucket_bytes;
        # GaLore's, Fira's, FRUGAL's, Online Subspace Descent's, APOLLO's, Subset-Norm's); otherwise each parameter's
        # combine-back phase by phase (subspace.projected_back_bytes); a rule that does not say (foreach_fold_offered
        # None, the base classes' default) keeps the per-phase sum above, a bound
        folds = (p.dtype == torch.float32 and r.lr_rule is constant_lr and not r.moment.applies_lr
                 and not r.moment.foreach_direction_lrs and not r.stabilizers and not isinstance(group["lr"], Tensor))
        fold = r.combine.fold_bytes(p.shape, group, state, P) if folds else None
        # (whether the rule folds its bucket: False, each parameter combined back alone; None, not known)
        bounds = self._row_bounds(p.shape, chunk) if chunk is not None else [(0, p.shape[0])]
        offered = r.combine.foreach_fold_offered([(p.shape, low_shape, state, bounds)], group, P) if folds else False
        back_alone = None
        if fold is not None:
            back, back_alone = fold + extra, projected_back_bytes(self, p, group, state)
        elif offered is False:
            back = projected_back_bytes(self, p, group, state)
        folds = folds and offered is True  # (its bucket's fold counted by the rule: foreach_fold_bytes)
        step_size = r.moment.direction_bytes(numel, low_shape, group, state) - 4 * numel
        # the project-down: a low-precision gradient a block of rows at a time (_down_in_rows), else the float32
        # gradient's P^T G / G Q^T (a two-sided basis's beside its first product: Projection.down_bytes)
        in_rows = chunk is not None and lowp and not r.stabilizers
        down = P.down_rows_bytes(p.shape, group, bounds) if in_rows else P.down_bytes(p.shape, group) + copies
        if chunk is None:
            held = copies + p_copy
            return _ProjectedBytes(numel, held, held + max(refresh, P.down_bytes(p.shape, group)), back, alone,
                                   low_shape, state, step_size, p.shape, bounds, folds, back_alone)
        return _ProjectedBytes(numel, 0, max(refresh, down), back, alone, low_shape, state, step_size,
                               p.shape, bounds, folds, back_alone)

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict()``; the state of a sharded (FSDP2 ``DTensor``) parameter, kept as
        plain tensors of its local shard, is returned as ``DTensor`` s
        (:func:`~lowmem.optim.sharded.state_to_dtensor`) so that ``torch.distributed.checkpoint``
        saves every rank's piece; next to per-shard state (one piece per shard: quantized codes, MicroAdam's window),
        the placements and mesh it was saved under (:data:`~lowmem.optim.sharded.PLACEMENT_KEY`,
        :func:`~lowmem.optim.sharded.record_placement`). Unsharded parameters: plain tensors, as always.
        A parameter whose state no
        longer fits it (resized or re-sharded since its state was made, without a step since: a step compares
        only the parameters it steps) is refused, nothing saved (:func:`~lowmem.optim.group_layout.check_state_fits`:
        every later load would refuse that state)."""
        from .sharded import record_placement

        check_state_fits(self)
        sd = super().state_dict()
        sd[OPTIMIZER_KEY] = self.recipe.name  # (refused by another optimizer's load_state_dict: _check_same_optimizer)
        params = [p for g in self.param_groups for p in g["params"]]
        if not any(is_dtensor(p) for p in params):
            return sd
        for pid, p in zip(chain.from_iterable(g["params"] for g in sd["param_groups"]), params):
            if is_dtensor(p) and pid in sd["state"]:
                group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
                state = sd["state"][pid]
                if self._local_matrices(p, group):  # the shard's matrices' stacks: sharded as the parameter
                    saved = {k: matrices_state_to_dtensor(v, p) for k, v in state.items()}
                elif self._is_projected(p, group):  # bases replicated; moments row-sharded or replicated
                    rows, dims = low_is_sharded(self.recipe, group, p), self.recipe.moment.reduced_dims
                    saved = {k: projected_state_to_dtensor(v, p, k, rows, dims) for k, v in state.items()}
                else:
                    # (reduced_dims: Adafactor's row / column statistics keep the parameter's sharding;
                    # whole-tensor statistics, equal on every rank, stay plain: saved once)
                    # (replicated entries go out contiguous, as projected_state_to_dtensor's: a FULL_STATE_DICT load
                    # broadcasts rank 0's tensor into a contiguous buffer on the others: AUDDIST21 4; no copy when
                    # already so)
                    dims, moment = self.recipe.moment.reduced_dims, self.recipe.moment
                    saved = {k: (v.contiguous() if isinstance(v, Tensor) else v) if moment.replicated_state(k, group)
                             else state_to_dtensor(v, p, k, dims.get(k)) for k, v in state.items()}
                # per-shard state (one piece per shard) does not reshard: the placements it was saved under
                sd["state"][pid] = record_placement(saved, state, p)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch does, but keep each state tensor's saved dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating-point state to the parameter's
        dtype; for a bf16 model that would silently round float32 moments (and break quantized
        codes). Step counters stay on the CPU. State of a sharded parameter saved as ``DTensor`` s
        (:meth:`state_dict`) comes back as plain tensors of the local shard. Every parameter's loaded
        state is checked against what this optimizer allocates for it (the shard's, or
        :meth:`_probe_state` on fake tensors; :func:`~lowmem.optim.sharded.check_loaded_state`); a
        checkpoint whose group settings give a parameter's state another layout than this optimizer's
        own settings (another rank, head_dim, quantization, state dtype) or come from another
        optimizer refuses (:func:`~lowmem.optim.sharded.check_same_settings`). A setting of this
        recipe the checkpoint's group lacks (it predates the setting) keeps the constructor's value.
        On an error the optimizer keeps its groups and state as they were. torch's hooks
        (``register_load_state_dict_pre_hook`` / ``_post_hook``) run as torch runs them: the pre-hooks first (a dict
        one returns is the one loaded), the post-hooks last, on the rebuilt and checked state (what one writes there
        stays), and not after a refused load.

        Raises:
            ValueError: The checkpoint has another number of parameter groups or of parameters in a group
                (the message names the group and both counts, before anything changes); a
                :class:`~lowmem.optim.layerwise.LayerwiseOptimizer` checkpoint taken inside an accumulation
                window (its partial sums would be dropped); a parameter's loaded
                state lacks an entry, holds one of another shape or dtype
                (or ``None``) or one this optimizer does not keep, or was saved with settings that
                change its layout or by another optimizer; the message names the parameter (or
                group) and the entry. A sharded parameter's per-shard state saved under other placements than
                the parameter's now (:func:`~lowmem.optim.sharded.check_saved_placement`; a checkpoint without that
                record loads unchecked, with one warning naming how many parameters).
        """
        kept = self.param_groups, self.state
        before = [dict(g) for g in self.param_groups]
        # torch's hooks, in torch's order around the whole load: the pre-hooks on a shallow copy (what one returns
        # is what loads, here too), the post-hooks once the state is rebuilt and checked (not for a refused load)
        state_dict = state_dict.copy()
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        for hook in pre.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            self._check_group_sizes(state_dict)  # (before torch's: its message names neither group nor counts)
            self._check_no_layerwise_window(state_dict)
            super().load_state_dict(state_dict)
        finally:  # (the same dicts: the hooks' handles remove from them)
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre, post
        try:
            self._load_state(state_dict, before)
        except Exception:
            self.param_groups, self.state = kept
            raise
        for hook in post.values():
            hook(self)

    def _check_same_optimizer(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint whose :data:`OPTIMIZER_KEY` (the recipe that wrote it, recorded by :meth:`state_dict`)
        names another optimizer, before anything changes. The settings' key check alone let through a checkpoint of an
        optimizer whose settings are a subset of this one's (``adamw`` into ``spam``, ``adalomo`` into ``adafactor``:
        the settings it lacks were taken as predating it; AUDIT-RESUME18 1). Run after the settings' and the state's
        checks (whose messages name the settings or entries that differ); :meth:`load_state_dict` restores the groups
        and state on the error. A checkpoint without the entry (older, or torch's) keeps the settings' key check;
        one of ``torch.optim.RAdam`` (its groups' keys: Adam's state, another update) is refused by name."""
        saved = state_dict.get(OPTIMIZER_KEY)
        for group in state_dict.get("param_groups", []) if saved is None else []:
            # torch.optim.RAdam's groups: torch's (differentiable), decoupled_weight_decay without Adam's amsgrad and
            # NAdam's momentum_decay; its state (step, exp_avg, exp_avg_sq) is Adam's, its rectified step is not
            if {"differentiable", "decoupled_weight_decay", "betas"} <= set(group) and not {"amsgrad", "momentum_decay"} & set(group):
                saved = "torch.optim.RAdam"
        if saved is not None and saved != self.recipe.name:
            raise ValueError(
                f"optimizer '{self.recipe.name}': the checkpoint was saved by another optimizer ({OPTIMIZER_KEY}:"
                f" checkpoint {saved!r}, this one {self.recipe.name!r}); resume with optim {saved!r} (or start"
                " without the checkpoint)")

    def _check_group_sizes(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint with another number of parameter groups, or of parameters in a group, naming the
        optimizer, the group and both counts (torch's own check names neither); nothing has changed yet."""
        saved = state_dict.get("param_groups", [])
        fix = ("build the optimizer on the model, target modules and frozen parameters that wrote the checkpoint"
               " (or start without it)")
        if len(saved) != len(self.param_groups):
            raise ValueError(f"optimizer '{self.recipe.name}': another number of parameter groups: the checkpoint has"
                             f" {len(saved)}, this optimizer {len(self.param_groups)}: {fix}")
        for i, (s, g) in enumerate(zip(saved, self.param_groups)):
            if len(s["params"]) != len(g["params"]):
                raise ValueError(f"optimizer '{self.recipe.name}': parameter group {i}: the checkpoint holds"
                                 f" {len(s['params'])} parameters, this optimizer {len(g['params'])}: {fix}")

    def _check_no_layerwise_window(self, state_dict: dict[str, Any]) -> None:
        """Refuse a :class:`~lowmem.optim.layerwise.LayerwiseOptimizer` checkpoint taken inside a gradient
        accumulation window: its ``"layerwise"`` entry holds the window's partial sums (micro-batch counts, the
        subspace accumulators of basis-projected parameters, the step's running squared norm), which this plain
        optimizer has no place for and would drop. A checkpoint at a window boundary (zero counts, nothing else)
        loads; its ``clip_coef`` (``clip_mode='global_prev'``) does not apply to a plain optimizer."""
        window = state_dict.get("layerwise")
        if not window:
            return
        micro = window.get("micro")
        seen = int((micro > 0).sum()) if micro is not None else 0
        low = len(window.get("low") or {})
        if seen or low or window.get("sq_norm_sum") is not None:
            total = micro.numel() if micro is not None else "?"
            raise ValueError(
                f"optimizer '{self.recipe.name}': the checkpoint was saved by a LayerwiseOptimizer inside a gradient"
                f" accumulation window ({seen} of {total} parameters have seen micro-batches since its last step,"
                f" {low} subspace accumulators): this plain optimizer would drop those partial sums. Load it into a"
                " LayerwiseOptimizer (lowmem.optim.layerwise) with the same accumulation_steps, or save the"
                " checkpoint at a window boundary (after step())")

    def _probe_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """What :meth:`_init_state` allocates for the unsharded parameter ``p`` under ``group``'s
        settings, as fake tensors (shapes and dtypes; nothing allocated, no random draw)."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        probe: dict[str, Tensor] = {}
        with FakeTensorMode(allow_non_fake_inputs=True):
            self._init_state(p, group, probe)
        return probe

    def _load_state(self, state_dict: dict[str, Any], before: list[dict[str, Any]]) -> None:
        """:meth:`load_state_dict` after torch's: the groups' settings and every parameter's state
        checked (``before``: the groups' settings before the load), the state's dtypes and devices,
        sharded state converted."""
        self._forget_routes()  # (new state dicts and groups: the cached paths would not match anyway)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_map = dict(zip(saved_ids, params))
        cpu_keys = {"step", "moment_start", *(self.recipe.projection.cpu_state_keys if self.recipe.projection is not None else ())}
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        own = set(self.recipe.all_hparams())
        for i, (mine, group) in enumerate(zip(before, self.param_groups)):
            from_torch_muon_group(self.recipe.name, group, mine)  # (torch.optim.Muon's names: eps, adjust_lr_fn=None)
            # torch replaced the group's settings with the checkpoint's; one of this recipe's settings the
            # checkpoint lacks (it predates the setting, e.g. adamw8bit's fused) keeps the constructor's value
            for k in own & set(mine) - set(group):
                group[k] = mine[k]
            for p in group["params"]:  # another optimizer's settings, or a layout other settings give the state
                if is_dtensor(p):
                    layout = lambda g, p=p: state_layout(self._init_state, p, g, self._is_projected(p, g))  # noqa: E731
                else:
                    layout = lambda g, p=p: {k: (tuple(v.shape), v.dtype) for k, v in self._probe_state(p, g).items()}  # noqa: E731
                check_same_settings(mine, group, layout, f"{self.recipe.name}: parameter group {i}")
        from .sharded import PLACEMENT_KEY, check_saved_placement, saved_per_shard

        unrecorded = 0  # sharded parameters with per-shard state and no record of its placements (older checkpoints)
        for pid, saved in state_dict["state"].items():
            p = id_map.get(pid)
            if p is None:
                continue
            where = f"{self.recipe.name}: parameter {pid!r} of shape {tuple(p.shape)}"
            record = saved.get(PLACEMENT_KEY) if isinstance(saved, dict) else None
            if record is not None:  # (not state: read here, for a sharded parameter)
                saved = {k: v for k, v in saved.items() if k != PLACEMENT_KEY}
            if is_dtensor(p):  # the shapes the recipe allocates for the local shard (nothing allocated)
                probe: dict[str, Tensor] = {}
                self._init_state(torch.empty(local(p).shape, dtype=p.dtype, device="meta"), group_of[p], probe, key=p)
                # per-shard state (one piece per shard) saved under other placements: refused before anything of it
                # is converted (a state of the parameter's own layout is redistributed below, a collective)
                pieces = [k for k, v in saved.items() if k in probe and saved_per_shard(v, probe[k])]
                if record is not None:
                    i, j = next((i, j) for i, g in enumerate(self.param_groups)
                                for j, q in enumerate(g["params"]) if q is p)
                    check_saved_placement(record, p, pieces or sorted(k for k in saved if k in probe),
                                          f"{self.recipe.name}: parameter {j} of parameter group {i} of shape"
                                          f" {tuple(p.shape)}", f"remove state_dict['state'][{pid!r}] before"
                                          " loading; through set_optimizer_state_dict with"
                                          " StateDictOptions(strict=False)")
                elif pieces:
                    unrecorded += 1
                saved = {k: state_from_dtensor(v, p, probe[k].shape, k) if k in probe else v for k, v in saved.items()}
                saved = torch_stepless_state(saved, probe, self.recipe.name)  # (torch.optim.SGD / Muon: no 'step')
                check_loaded_state(saved, probe, where)
            elif saved:  # (an empty state, e.g. BAdam's inactive blocks, is allocated at p's next step)
                probe = self._probe_state(p, group_of[p])
                if "moment_start" in probe and "moment_start" not in saved and "step" in saved:
                    # saved before moment_start existed: its moments count from step 1 until their next reset
                    saved = {**saved, "moment_start": torch.zeros((), dtype=torch.float32)}
                saved = torch_stepless_state(saved, probe, self.recipe.name)  # (torch.optim.SGD / Muon: no 'step')
                check_loaded_state(saved, probe, where)
            else:
                probe = {}
            device = local(p).device
            self.state[p] = {
                k: _as_allocated(v.detach(), probe.get(k), "cpu" if k in cpu_keys else device) if isinstance(v, Tensor) else v
                for k, v in saved.items()
            }
        self._check_same_optimizer(state_dict)  # (after the settings' and state's checks: they name what differs)
        if unrecorded:
            warn_user(
                f"{self.recipe.name}: load_state_dict: the per-shard state (quantized codes and scales, MicroAdam's"
                f" window: one piece per shard) of {unrecorded} sharded parameter(s) was loaded from a checkpoint that"
                f" does not record the placements it was saved under ('{PLACEMENT_KEY}': saved before lowmem recorded"
                " it, or the entry was removed: torch's set_optimizer_state_dict with flatten_optimizer_state_dict=True"
                " passes on only the entries the optimizer's state holds), so it loaded unchecked: if such a parameter"
                " was re-sharded between save and load at the same shard size (Shard(0) -> Shard(1) of an even"
                " split), its state is that of another piece of it. Save a new checkpoint to have it checked"
                " (docs/distributed.md, 'Re-sharded parameters')")

    # ---- the update -----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (torch's contract: optional closure, returns its loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # the path of each unsharded parameter (_route), decided before anything is stepped: a path decided
        # again (its parameter's shape or dtype among what changed) names its group in ``decided``, whose
        # parameters are then compared with the shapes their state was made for (group_layout.check_resized: a
        # resized one is refused, nothing stepped); a cached path means neither changed since that compare
        decided = self.__dict__["_decided"] = []
        try:
            # a setting that fixes the state's layout changed since: refused (lowmem.optim.group_layout; the
            # shapes are left to check_resized while ``_decided`` is set)
            check_group_layouts(self)
            tokens = self._group_tokens()
            # (key, tensor, gradient, group, reduce, state, route): a sharded (FSDP2 DTensor) parameter is stepped
            # on its local shard, its state keyed by the parameter; ``reduce`` all-reduces per-tensor statistics
            work = []
            # a cached path (_route's cache hit, inlined: the engine's own time on many small tensors, issue 15)
            routes = self.__dict__.setdefault("_routes", {})
            entries = None if tokens is None else self.__dict__["_group_sigs"]
            states, strided = self.state, torch.strided
            for group in self.param_groups:
                token = None if entries is None else entries[id(group)].route_token
                for p in group["params"]:
                    grad = p.grad
                    if grad is None:
                        continue
                    if grad.layout is not strided:  # before any state is touched
                        self._check_dense(grad)
                    if _DTensor is not None and isinstance(p, _DTensor):
                        item = self._work_item(p, group)
                        self._check_dense(item[2])  # (its local gradient)
                        decided.append(group)  # (a sharded parameter has no cached path: compared at every step)
                        work.append((*item, self.state[p], None))
                        continue
                    state = states[p]
                    route = None if token is None else routes.get(id(p))
                    if (route is None or route.p is not p or route.token is not token or route.state is not state
                            or route.key != _route_key(p, grad, state)):
                        route = self._route(p, grad, group, state, tokens)
                    work.append((p, p, grad, group, None, state, route))
        finally:
            del self.__dict__["_decided"]
        if decided:
            check_resized(self, decided)
        if not work:  # (no gradient at all: only then are the groups scanned, no cost to an ordinary step)
            refuse_untrainable(self.param_groups, f"optimizer '{self.recipe.name}'")
        # projected gradients computed before the check, which reads them instead of their gradients
        # (_checked_lows: no state is touched before the check)
        lows = self._checked_lows(work, tokens) if self.skip_nonfinite else {}
        # a step of foreach buckets only is planned between the check's kernels and its read (_plan_foreach;
        # on a GPU the device waits at the read for what the host does after it)
        plan: list = []
        if self.skip_nonfinite:
            self.__dict__["_before_read"] = lambda: plan.append(self._plan_foreach(work))
            try:
                finite = self._all_finite(work, lows, tokens)
            finally:
                self.__dict__.pop("_before_read", None)
        if self.skip_nonfinite and not finite:
            for w in work:  # (the empty state dicts the pass above made)
                if not w[5] and self.state.get(w[0]) is w[5]:
                    del self.state[w[0]]
            self.skipped_steps += 1
            warn_user(
                f"{self.recipe.name}: non-finite gradient (or a gradient norm >= {MAX_GRAD_NORM:.3g}, whose square"
                " overflows float32); step skipped, optimizer state unchanged "
                f"({self.skipped_steps} skipped so far)"
            )
            return loss
        planned = plan[0] if plan else self._plan_foreach(work)
        if planned is not None:
            buckets, counters, launches = planned
            for view, t in counters:  # (the counters' advance, _advance_step_view's write)
                view[()] = t
            for bkey in list(buckets):
                bucket, launch = buckets.pop(bkey), launches.pop(bkey, None)
                if launch is None:
                    self._step_bucket(bkey, bucket)
                else:
                    del bucket
                    launch()
                    del launch
            self._checked = self._usable = None
            return loss
        buckets: dict[tuple, tuple[dict[str, Any], list[tuple[Tensor, Tensor, dict[str, Tensor]]]]] = {}
        sizes: dict[tuple, tuple[int, int]] = {}
        low_bucket: list[_Projected] = []  # projected parameters waiting for their multi-tensor moment step
        low_used = 0  # (the elements of their projected gradients: _joins_low_bucket's running count)
        for key, p, grad, group, reduce, state, route in work:
            # (a sharded projected parameter: projected by its whole shape, not its shard's)
            if reduce is None:
                path = route.path
            elif self._local_matrices(key, group):  # FSDP2: its shard's whole matrices, as an unsharded batch
                route = None
                path = "matrices" if p.numel() and self._matrices_foreach_ok(p, group, grad, state) else "alone"
            else:  # (FSDP2 shards: decided at every step; a projected one is stepped alone)
                route = None
                path = "alone" if self._is_projected(key, group) or not self._foreach_ok(p, group, grad, state) else "foreach"
            if path == "low":
                if "step" not in state:
                    self._init_state(p, group, state)
                t = self._advance_counter(state, route)
                # the open bucket is stepped before this parameter is projected down (its refresh
                # does not run next to a full bucket's projected gradients: step_transient_bytes)
                numel = self.recipe.projection.low_shape(p.shape, group).numel()
                if low_bucket and not self._joins_low_bucket(low_bucket, group, t, p.device, numel, low_used):
                    self._step_low_bucket(low_bucket)
                    low_bucket, low_used = [], 0
                low_bucket.append(self._project_down(p, grad, group, state, t, low=lows.pop(id(p), None) if lows else None))
                low_used += low_bucket[-1].low.numel()
            elif path == "matrices":  # a batch of matrices: each one joins the projected buckets as a 2-D parameter
                if "step" not in state:
                    self._init_state(p, group, state, key=key)
                self._complete_shared(state, group)
                t = self._advance_counter(state, route)
                lead = p.shape[:-2]
                numel = self.recipe.projection.low_shape(p.shape[-2:], group).numel()
                count, e, chunk = math.prod(lead), 0, self._chunk(p.device)
                while e < count:
                    if low_bucket and not self._joins_low_bucket(low_bucket, group, t, p.device, numel, low_used):
                        self._step_low_bucket(low_bucket)
                        low_bucket, low_used = [], 0
                    # the matrices that fit the open bucket, projected down together where they can be
                    room = count - e if chunk is None else max(1, (chunk - low_used) // numel)
                    stop = min(count, e + room)
                    stacked = self._down_batched(p, grad, group, state, t, e, stop)
                    for j in range(e, stop):
                        idx = matrix_index(j, lead)
                        low_bucket.append(self._project_down(matrix_of(p, idx), matrix_of(grad, idx), group,
                                                             matrix_state(state, idx), t,
                                                             low=None if stacked is None else stacked[j - e]))
                        low_used += low_bucket[-1].low.numel()
                    del stacked
                    e = stop
            elif path == "foreach":
                if "step" not in state:
                    self._init_state(p, group, state)
                step = state["step"]
                if route is not None and route.step is step and route.step_view is not None and route.token is not None:
                    t = _advance_step_view(step, *route.step_view)  # (_advance_counter of a cached view, inlined)
                else:
                    t = self._advance_counter(state, route)
                if route is None:
                    pieces, device, chunk = self._foreach_pieces(p), p.device, self._chunk(p.device)
                    cls = self.recipe.moment.foreach_bucket_class(p.shape, group, state)
                else:
                    pieces, device, chunk, cls = route.pieces, route.device, route.chunk, route.cls
                    if route.fused:  # whole, in its group's uncapped bucket of the fused kernel (_fused_whole)
                        buckets.setdefault((id(group), t, device, 1, -1), (group, []))[1].append((p, grad, state))
                        continue
                if not self.recipe.stabilizers and len(pieces) == 1:  # the common case: a whole tensor, one piece
                    bkey = self._bucket_key(sizes, (id(group), t, device, 1, False, cls), pieces[0][1], chunk)  # (lr scale 1)
                    buckets.setdefault(bkey, (group, []))[1].append((p, grad, state))
                    continue
                if len(pieces) == 1 and self._stabilizes_many(device):
                    # a whole tensor stabilized with the rest of its bucket (_step_bucket: the
                    # stabilizers' transform_many, per-tensor statistics of all of them at once)
                    lr_scale = math.prod(s.lr_scale(state, group, int(t)) for s in self.recipe.stabilizers)
                    bkey = self._bucket_key(sizes, (id(group), t, device, lr_scale, True, cls), pieces[0][1], chunk)
                    if buckets and bkey not in buckets:  # (one bucket of stabilized gradients alive at a time)
                        self._step_bucket(*buckets.popitem())
                    buckets.setdefault(bkey, (group, []))[1].append((p, grad, state))
                    continue
                stabilize = self._foreach_stabilizers(grad, group, state, t, pieces) if self.recipe.stabilizers else None
                lr_scale = math.prod(s.lr_scale(state, group, int(t)) for s in self.recipe.stabilizers)
                for start, stop in pieces:  # a large tensor joins the buckets chunk by chunk
                    bkey = self._bucket_key(sizes, (id(group), t, device, lr_scale, False, cls), stop - start, chunk)
                    if stabilize is not None and buckets and bkey not in buckets:
                        # stabilized gradients are new tensors: one bucket of them alive at a time
                        self._step_bucket(*buckets.popitem())
                    piece = (p, grad, state) if stop - start == p.numel() else (
                        p.view(-1)[start:stop], grad.view(-1)[start:stop],
                        self.recipe.moment.chunk_state(state, start, stop, p.shape, group))
                    if stabilize is not None:
                        piece = (piece[0], stabilize(piece[1], piece[2]), piece[2])
                    buckets.setdefault(bkey, (group, []))[1].append(piece)
                    del piece
                del stabilize
            else:
                if self.recipe.stabilizers:  # (its transient is not added to an open bucket's)
                    while buckets:
                        self._step_bucket(*buckets.popitem())
                self._update(p, grad, group, key=key, reduce=reduce)
        if low_bucket:
            self._step_low_bucket(low_bucket)
            del low_bucket
        for bkey in list(buckets):
            self._step_bucket(bkey, buckets.pop(bkey))
        self._checked = self._usable = None
        return loss

    def _plan_foreach(self, work: list[tuple]) -> tuple[dict[tuple, tuple[dict[str, Any], list]], list[tuple[Any, float]],
                                                        dict[tuple, Callable[[], None]]] | None:
        """The buckets of a step whose every parameter is on the foreach path with a cached route and step counter
        view and no stabilizers (a steady step of AdamW, Lion, the 8-bit rules, ...), planned without touching
        any state: ``(buckets, counters, launches)``, the buckets the step's loop would build, with the same keys,
        members and order, each counter's NumPy view with its next value (read with ``item()`` as
        :func:`_advance_step_view` does), written by the step once the check has passed, and the buckets'
        launches the moment rule prepared (:meth:`_prepare_buckets`). ``None`` for any other
        step (then the loop plans and steps as it goes), a count not exact in its counter's dtype, or a counter
        tensor shared by two parameters (the loop advances it once for each).

        Called between the non-finite check's kernels and its read (:func:`_all_finite`'s ``prepare``), so
        that after the read the host only writes the counters and launches the buckets' kernels: on a GPU the
        device idles from that read until the next kernel (issue 15).

        Its own host time, about 0.6 us a tensor on the CPU (issue 15, many small tensors): one pass checks every
        route, one reads the counters and keys the pieces, a piece of the open bucket's group, step, device (one
        object per device, :meth:`_route`) and class that fits it joining it without a key (the answer
        :meth:`_bucket_key` would give: the same bucket), any other keyed as the loop keys it
        (``tests/test_speed16_plan.py``: equal to the plan that keyed every piece)."""
        if self.recipe.stabilizers or not work:
            return None
        steps = []
        for key, p, grad, group, reduce, state, route in work:
            if (reduce is not None or route is None or route.path != "foreach" or route.token is None
                    or route.step_view is None or route.step is not state.get("step")):
                return None
            view, exact = route.step_view
            t = float(view[()]) + 1  # (the next count, read through the view: exact?)
            if not (abs(t) <= exact and t.is_integer()):
                return None
            steps.append(route.step)
        if len(set(map(id, steps))) != len(steps):  # (a counter shared by parameters: advanced once each)
            return None
        buckets: dict[tuple, tuple[dict[str, Any], list]] = {}
        sizes: dict[tuple, tuple[int, int]] = {}
        counters = []
        chunk_state = self.recipe.moment.chunk_state
        # the open bucket: its group, step, device (the routes' are interned: _route), class and chunk, its
        # ``sizes`` entry and members; a piece of the same ones that fits joins it without a key (_bucket_key's
        # answer for it: the same bucket), any other piece is keyed as by the step's loop
        o_group = o_t = o_device = o_cls = o_base = o_members = None
        o_index = o_used = 0
        f_group = f_t = f_device = f_members = None  # (the open bucket of the fused kernel: uncapped)
        for (key, p, grad, group, reduce, state, route), step in zip(work, steps):
            t = step.item() + 1
            counters.append((route.step_view[0], t))
            device = route.device
            if route.fused:  # (as step's loop: whole, in its group's uncapped bucket of the fused kernel)
                if not (f_group is group and f_t == t and f_device is device):
                    bkey = (id(group), t, device, 1, -1)
                    bucket = buckets.get(bkey)
                    if bucket is None:
                        bucket = buckets[bkey] = (group, [])
                    f_group, f_t, f_device, f_members = group, t, device, bucket[1]
                f_members.append((p, grad, state))
                continue
            pieces, chunk, cls = route.pieces, route.chunk, route.cls
            whole = len(pieces) == 1
            same = o_group is group and o_t == t and o_device is device and (o_cls is cls or o_cls == cls)
            for start, stop in pieces:
                n = stop - start
                piece = (p, grad, state) if whole else (
                    p.view(-1)[start:stop], grad.view(-1)[start:stop], chunk_state(state, start, stop, p.shape, group))
                if same and (chunk is None or o_used + n <= chunk):  # (the open bucket's base: it fits)
                    o_used += n
                    o_members.append(piece)
                    continue
                # (_bucket_key: buckets of ``base`` fill up to ``chunk`` elements, then a new one starts)
                if o_base is not None:
                    sizes[o_base] = (o_index, o_used)
                base = (id(group), t, device, 1, False, cls)  # (no stabilizers: lr scale 1)
                index, used = sizes.get(base, (0, 0))
                if chunk is not None and used > 0 and used + n > chunk:
                    index, used = index + 1, 0
                bkey = (*base, index)
                bucket = buckets.get(bkey)
                if bucket is None:
                    bucket = buckets[bkey] = (group, [])
                bucket[1].append(piece)
                o_group, o_t, o_device, o_cls, o_base, o_index, o_used, o_members = (
                    group, t, device, cls, base, index, used + n, bucket[1])
                same = True
        return buckets, counters, self._prepare_buckets(buckets)

    def _prepare_buckets(self, buckets: dict[tuple, tuple[dict[str, Any], list]]) -> dict[tuple, Callable[[], None]]:
        """The launches of a planned step's buckets (:meth:`_plan_foreach`: no stabilizers, lr scale 1) that the
        moment rule prepares ahead (its optional ``foreach_prepare``, with :meth:`_step_bucket`'s arguments:
        the per-tensor decisions and argument lists made now, before the non-finite check's read; its returned
        function launches the kernels), by bucket key; a bucket without one is stepped by :meth:`_step_bucket`.
        Only a ``foreach_prepare`` of the class that defines the rule's ``foreach_step_`` or of a subclass of it:
        a rule that overrides ``foreach_step_`` does not inherit its base's preparation (nor does a rule object
        whose own attribute replaces ``foreach_step_``, a wrapped or patched step)."""
        prepare = getattr(self.recipe.moment, "foreach_prepare", None)
        if prepare is None or "foreach_step_" in getattr(self.recipe.moment, "__dict__", ()):
            return {}
        mro = type(self.recipe.moment).__mro__
        owner = [next(i for i, c in enumerate(mro) if name in c.__dict__) for name in ("foreach_prepare", "foreach_step_")]
        if owner[0] > owner[1]:
            return {}
        rule = {} if self.recipe.lr_rule is constant_lr else {"lr_rule": self.recipe.lr_rule}
        # (a bucket of the fused kernel, key ``(group, t, device, 1, -1)``: every member admitted by the rule's
        # fused_whole with its cached path (_fused_whole); told to a preparation that takes ``fused_bucket``)
        told = _takes_fused_bucket(prepare)
        launches = {}
        for bkey, (group, pieces) in buckets.items():
            ps, gs, ss = (list(x) for x in zip(*pieces))
            if bkey[4] != -1 and any(p.dtype == torch.bfloat16 for p in ps):
                continue  # (bfloat16 members: _step_bucket's _step_bf16_bucket)
            fused = {"fused_bucket": True} if told and bkey[4] == -1 else {}
            launch = prepare(ps, gs, ss, group, bkey[1], group["lr"], **rule, **fused)
            if launch is not None:
                launches[bkey] = launch
        return launches

    def _step_bucket(self, key: tuple, bucket: tuple[dict[str, Any], list[tuple[Tensor, Tensor, dict[str, Tensor]]]]) -> None:
        """The moment rule's multi-tensor step of one bucket ``(group, pieces)`` (its key: group, step,
        device, stabilizers' lr scale, then ``True`` when its gradients are still to be stabilized together
        (:meth:`_stabilizes_many`; ``False`` or absent otherwise), the bucket class
        (:meth:`~lowmem.optim.moments.MomentRule.foreach_bucket_class`; absent for a fused bucket), index)."""
        _, t, _, lr_scale = key[:4]
        many = key[4] is True
        group, pieces = bucket
        ps, gs, ss = (list(x) for x in zip(*pieces))
        pieces.clear()
        if key[4] != -1 and torch.bfloat16 in {p.dtype for p in ps}:  # (one comprehension: no per-tensor call)
            # bfloat16 members (_bf16_bucket_ok; not the fused kernel's bucket, key[4] -1): float32 ones first
            low = [i for i, p in enumerate(ps) if p.dtype == torch.bfloat16]
            lps, lgs, lss = [ps[i] for i in low], [gs[i] for i in low], [ss[i] for i in low]
            if len(low) < len(ps):
                rest = sorted(set(range(len(ps))) - set(low))
                self._step_bucket(key, (group, [(ps[i], gs[i], ss[i]) for i in rest]))
            del ps, gs, ss, low
            self._step_bf16_bucket(lps, lgs, lss, group, t)
            return
        if many:  # whole tensors: the stabilizers' statistics of the bucket at once (issue 15)
            for s in self.recipe.stabilizers:
                gs = s.transform_many(gs, ss, group, int(t), self.recipe.moment)
        if self.recipe.lr_rule is not constant_lr:  # (the rule's own: foreach_lr_rule, _foreach_ok)
            self.recipe.moment.foreach_step_(ps, gs, ss, group, t, group["lr"], lr_rule=self.recipe.lr_rule)
        elif lr_scale == 1.0:
            self.recipe.moment.foreach_step_(ps, gs, ss, group, t, group["lr"])
        else:  # (only rules with foreach_step_lr: _foreach_ok)
            self.recipe.moment.foreach_step_(ps, gs, ss, group, t, group["lr"], step_lr=group["lr"] * lr_scale)

    def _step_bf16_bucket(self, ps: list[Tensor], gs: list[Tensor], ss: list[dict[str, Tensor]], group: dict[str, Any],
                          t: float) -> None:
        """The multi-tensor step of a bucket of bfloat16 parameters (pieces) (:meth:`_bf16_bucket_ok`): what
        :meth:`_update_chunked` does to each of them, one multi-tensor kernel per operation and in the same order,
        so the result is the per-parameter step's bit for bit (``foreach=False``, the reference): the gradients'
        float32 copies, the rule's direction (``bf16_bucket_direction``, which frees the copies), the parameters'
        float32 copies, decay and update (:meth:`_apply`'s operations), then the write-back
        (:meth:`_store_bucket`). A rule with its own lr rule (``bf16_bucket_lrs``) reads its step sizes from the
        parameters' copies, made first; a rule with ``bf16_bucket_steps_copies`` steps the copies with its float32
        ``foreach_step_``. Allocates :meth:`_bf16_bucket_bytes`; the lists passed are emptied."""
        r, sr = self.recipe, bool(group.get("bf16_stochastic_round"))  # (sr: the copies padded, _store_bucket)
        if getattr(r.moment, "bf16_bucket_steps_copies", False):
            # a rule whose float32 multi-tensor step has no separate direction (Adam-mini's): that step on the
            # parameters' and gradients' float32 copies (the per-parameter step's operations on them, its decay and
            # update included), then the write-back
            p32s, g32s = _FA.float32_copies(ps, padded=sr), _FA.float32_copies(gs)
            gs.clear()
            r.moment.foreach_step_(p32s, g32s, ss, group, t, group["lr"])
            del g32s
            self._store_bucket(ps, p32s, ss, group)
            return
        lr, p32s = group["lr"], None
        if r.lr_rule is not constant_lr:  # (the rule's step sizes read the parameters: bf16_bucket_lrs, Adafactor's)
            p32s = _FA.float32_copies(ps, padded=sr)
            lr = r.moment.bf16_bucket_lrs(p32s, ss, group, t)
        g32s = _FA.float32_copies(gs)
        gs.clear()
        couple = getattr(r.moment, "bf16_bucket_couple_", None)  # (torch's L2 decay into the copies: classic.py's rules)
        if couple is not None:
            couple(g32s, ps, group)
        ds = r.moment.bf16_bucket_direction(g32s, ss, group, t, lr)
        del g32s
        if p32s is None:
            p32s = _FA.float32_copies(ps, padded=sr)
        wds = {r.moment.weight_decay_for(group, s) for s in ss}
        if len(wds) != 1:  # (one decay per bucket: a rule whose decay differs per parameter steps them alone)
            raise ValueError(f"{r.name}: a bucket of bfloat16 parameters with several weight decays {sorted(wds)}")
        wd = wds.pop()
        if isinstance(lr, Tensor):  # one step size per parameter: F.decoupled_weight_decay_'s p - p (lr wd)
            if not r.moment.applies_lr:
                raise ValueError(f"{r.name}: a bucket of bfloat16 parameters with step sizes of a rule that does not"
                                 " apply them (applies_lr)")

            def decay() -> None:
                if wd != 0:
                    dec = torch._foreach_mul(p32s, list((lr * wd).unbind()))
                    torch._foreach_sub_(p32s, dec)
        else:
            decay = ((lambda: torch._foreach_mul_(p32s, foreach_scalar(p32s, 1.0 - lr * wd))) if wd != 0
                     else (lambda: None))
        if not r.decay_after_update:
            decay()
        if r.moment.applies_lr:
            torch._foreach_sub_(p32s, ds)
        else:
            torch._foreach_add_(p32s, ds, alpha=-lr)
        if r.decay_after_update:
            decay()
        del ds, decay, lr  # (freed before the write-back: stochastic rounding's bits take their place)
        self._store_bucket(ps, p32s, ss, group)

    def _store_bucket(self, ps: list[Tensor], p32s: list[Tensor], ss: list[dict[str, Tensor]],
                      group: dict[str, Any]) -> None:
        """:meth:`_store` of a bucket of bfloat16 parameters (pieces: their ``ss`` are
        :class:`~lowmem.optim.moments.ChunkState` views of flat ``[start, stop)``): stochastically rounded, each
        member with the bits of its parameter's stream (:meth:`_piece_generator`: a piece draws where the
        parameter's previous piece stopped, as :meth:`_update_chunked`'s chunks do) drawn into its slice of one
        buffer, the rest once for the bucket (``p32s`` the padded views of one buffer:
        :func:`~lowmem.optim.functional.rounding.stochastic_round_bucket_to_bf16_`); with Kahan's
        compensation, or rounded to nearest, one multi-tensor operation each for the bucket
        (:func:`~lowmem.optim.functional.rounding.kahan_store_`'s operations). ``p32s`` are overwritten."""
        if group.get("bf16_stochastic_round"):  # (p32s: padded views of one buffer, _step_bf16_bucket's)
            stochastic_round_bucket_to_bf16_(ps, p32s, (self._piece_generator(s, p) for p, s in zip(ps, ss)))
            return
        kahan = ["kahan_comp" in s for s in ss]
        if any(kahan) and not all(kahan):  # (one group: every member keeps one, or none)
            raise RuntimeError(f"{self.recipe.name}: a bucket of bfloat16 parameters with and without kahan_comp")
        if not any(kahan):
            torch._foreach_copy_(ps, p32s)
            return
        comps = [s["kahan_comp"] if not isinstance(s, ChunkState) else s["kahan_comp"].view(-1)[s.start : s.stop]
                 for s in ss]
        torch._foreach_add_(p32s, comps)  # (kahan_store_: src + comp, rounded; comp <- what the rounding dropped)
        torch._foreach_copy_(ps, p32s)
        torch._foreach_sub_(p32s, ps)
        torch._foreach_copy_(comps, p32s)

    def _piece_generator(self, state: dict[str, Tensor], dst: Tensor) -> torch.Generator | None:
        """:meth:`_rounding_generator` of a bucket member: a parameter's first (or only) piece draws from its
        stream's seed, a later piece (``state`` a :class:`~lowmem.optim.moments.ChunkState` from ``start > 0``)
        where the previous piece stopped, as :meth:`_update_chunked`'s chunks do. That needs the previous
        rounding to have been that parameter's previous piece: it is (a tensor larger than ``chunk_numel`` opens a
        new bucket with each of its pieces, one after another, and buckets are stepped in the order they were
        opened); anything else is refused, not rounded with other bits."""
        if _no_data(dst):
            return None
        step = state["step"]
        if isinstance(state, ChunkState) and state.start > 0:
            cur = self.__dict__.get("_sr_cur")
            if not (cur is not None and cur[0] is step and cur[1] == (step.item(), self._rounding_epoch())
                    and cur[2].device == dst.device):
                raise RuntimeError(f"{self.recipe.name}: the piece [{state.start}, {state.stop}) of a bfloat16"
                                   " parameter is rounded after another parameter's rounding, not right after its"
                                   " previous piece:"
                                   " its random bits would differ from the per-parameter step's")
        else:
            self.__dict__.pop("_sr_cur", None)  # (a parameter's first piece: its stream from its seed)
        return self._rounding_generator(state, dst)

    def _stabilizes_many(self, device: torch.device) -> bool:
        """Whether whole tensors on the foreach path are stabilized a bucket at a time
        (:meth:`~lowmem.optim.stabilizers.Stabilizer.transform_many`): off the CPU, where the step is
        launch-bound (issue 15); on the CPU one at a time (:meth:`_foreach_stabilizers`; Stable-SPAM's
        clean-chunk skip reads the host there); only when a stabilizer has its own ``transform_many``
        (the default one loops over the tensors: nothing to gain). The same values up to float32
        rounding (tested)."""
        return device.type != "cpu" and any(type(s).transform_many is not Stabilizer.transform_many
                                            for s in self.recipe.stabilizers)

    def _foreach_stabilizers(self, grad: Tensor, group: dict[str, Any], state: dict[str, Tensor], t: float,
                             pieces: list[tuple[int, int]]) -> Callable[[Tensor, dict[str, Tensor]], Tensor]:
        """The stabilizers of a parameter on the foreach path, as in the chunked step: each one's
        ``prepare`` once for the whole gradient (SPAM's moment reset, whole-tensor statistics over
        ``pieces``), then ``transform_chunk`` of each piece with its state view (returned function)."""
        r = self.recipe
        ctxs = [s.prepare(grad.view(-1), state, group, int(t), r.moment, pieces) for s in r.stabilizers]

        def stabilize(g: Tensor, view: dict[str, Tensor]) -> Tensor:
            for s, ctx in zip(r.stabilizers, ctxs):
                g = s.transform_chunk(g, view, group, int(t), r.moment, ctx)
            return g

        return stabilize

    def _check_dense(self, grad: Tensor) -> None:
        """Refuse a sparse gradient with the optimizer's name (torch would fail deep inside aten)."""
        if grad.layout != torch.strided:
            raise RuntimeError(
                f"optimizer '{self.recipe.name}': sparse gradients are not supported (layout {grad.layout}, e.g."
                " from nn.Embedding(sparse=True)); use dense gradients (sparse=False)"
            )

    def _work_item(self, p: Tensor, group: dict[str, Any]) -> tuple:
        """``(key, tensor, gradient, group, reduce)`` of a parameter with a gradient: a ``DTensor``
        (FSDP2) is stepped on its local shard with the all-reduces of its mesh; the others as they are."""
        if not is_dtensor(p):
            return p, p, p.grad, group, None
        where = f"optimizer '{self.recipe.name}'"
        name = next((f"parameter {i}" for i, q in enumerate(group["params"]) if q is p), "a parameter")
        self._refuse_sharded_matrices(p, group, f"{where}, {name} of its group")  # (sharded after construction)
        if not self._local_matrices(p, group):  # (a batch whose shard holds whole matrices: stepped as unsharded)
            check_supported(self.recipe, group, p, where)  # also here: parameters sharded after construction
        check_placements(p, p.grad, where)
        return p, p.to_local(), p.grad.to_local(), group, shard_reduce(p)

    # ---- the cached path of each parameter (issue 15: the engine's own time on many small tensors) ----

    def _group_tokens(self) -> dict[int, object] | None:
        """One token per parameter group (by ``id``), new whenever any setting of the group but ``lr``
        changed, its list of parameters, ``chunk_numel``, or whether ``torch.distributed`` is initialized
        (:func:`~lowmem.optim.moments.sharded_group`): what is cached with them (:meth:`_hold_budget`) may
        read any setting. The cached paths (:meth:`_route`) have a token of their own (:class:`_GroupEntry`),
        new only when a setting that a path decision of the group read changed (so a scheduler writing
        ``betas`` or ``momentum`` at every step, torch's ``OneCycleLR``, does not decide every path again
        where no decision reads them, nor where the moment rule summarizes what its decisions take from them:
        :meth:`~lowmem.optim.moments.MomentRule.route_settings`). ``None`` for a subclass that overrides the decisions
        (:meth:`_foreach_ok`, :meth:`_projected_foreach_ok`: BAdam's active block): its paths are decided
        at every step."""
        cls = type(self)
        if cls._foreach_ok is not LowMemOptimizer._foreach_ok or cls._projected_foreach_ok is not LowMemOptimizer._projected_foreach_ok:
            return None
        known = self.__dict__.setdefault("_group_sigs", {})  # (not pickled: torch's __getstate__ drops it)
        dist = _DISTRIBUTED and torch.distributed.is_initialized()
        tokens = {}
        for group in self.param_groups:
            keep: list = [tuple(group["params"])]  # (their ids are in the signature: kept alive, not reused)
            base = (self._chunk_numel, dist, tuple(map(id, group["params"])))
            sig = (base, tuple((k, _frozen(v, keep)) for k, v in group.items() if k != "params" and k != "lr"))
            entry = known.get(id(group))
            if entry is None or entry.group is not group:
                entry = known[id(group)] = _GroupEntry(group, self.recipe.moment)
            if entry.sig != sig:
                entry.sig, entry.token, entry.keep = sig, object(), keep
            entry.check_route(base)
            tokens[id(group)] = entry.token
        return tokens

    def _route(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Tensor],
               tokens: dict[int, object] | None) -> _Route:
        """The path of unsharded ``p`` in this :meth:`step` (:class:`_Route`): :meth:`_projected_foreach_ok`
        (``"low"``), else :meth:`_foreach_ok` (``"foreach"``), else ``"alone"``, decided again only
        when its group's route token (:class:`_GroupEntry`: the settings the group's decisions read), its
        state dict, the presence of its state, or the dtype, shape, device or contiguity of ``p`` or
        ``grad`` changed (its state's tensors are the rule's, fixed from their allocation;
        :meth:`load_state_dict` and :meth:`add_param_group` start afresh). The decisions read the group
        through a mapping that records the keys they read (:class:`~lowmem.optim.group_layout._Reads`);
        those are added to the group's route keys, but the settings the moment rule's
        :meth:`~lowmem.optim.moments.MomentRule.route_settings` covers, which the token keys by that summary.
        A path decided within :meth:`step`'s pass before anything is stepped names its group in ``_decided``:
        its parameters' shapes are compared then (:func:`~lowmem.optim.group_layout.check_resized`)."""
        key = _route_key(p, grad, state)
        routes = self.__dict__.setdefault("_routes", {})
        entry = None if tokens is None else self.__dict__["_group_sigs"][id(group)]
        token = None if entry is None else entry.route_token
        route = routes.get(id(p)) if token is not None else None  # (by id: a tensor's __hash__ is Python code)
        if route is not None and route.p is p and route.token is token and route.state is state and route.key == key:
            return route
        seen = group if entry is None else _Reads(group)
        path = ("low" if self._projected_foreach_ok(p, seen, grad, state)
                else "matrices" if self._matrices_foreach_ok(p, seen, grad, state)
                else "foreach" if self._foreach_ok(p, seen, grad, state) else "alone")
        fused = path == "foreach" and self._fused_whole(p, seen, state, grad)
        cls = self.recipe.moment.foreach_bucket_class(p.shape, seen, state) if path == "foreach" else None
        old = route
        device = self.__dict__.setdefault("_devices", {}).setdefault(p.device, p.device)  # (one object per device)
        route = _Route(p, token, state, key, path, self._foreach_pieces(p) if path == "foreach" else None, device,
                       self._chunk(p.device), fused, cls)
        decided = self.__dict__.get("_decided")
        if decided is not None:  # (step's pass before anything is stepped: the group's shapes are compared)
            decided.append(group)
        if entry is not None:
            entry.add_route_keys(seen.read)
            routes[id(p)] = route
            if old is not None and old.p is p and old.state is state:  # (its counter's view: checked against the counter)
                route.step, route.step_view = old.step, old.step_view
        return route

    def _advance_counter(self, state: dict[str, Tensor], route: _Route | None) -> float:
        """:func:`_advance_step` of ``state["step"]``, through the NumPy view cached in ``route``
        (:func:`_advance_step_view`) where there is one."""
        step = state["step"]
        if route is None or route.token is None:
            return _advance_step(step)
        view = self._counter_view(step, route)
        if view is None:
            return _advance_step(step)
        return _advance_step_view(step, *view)

    @staticmethod
    def _counter_view(step: Tensor, route: _Route) -> tuple[Any, int] | None:
        """The NumPy view of the step counter ``step`` cached in ``route`` (:func:`_step_view`) and the
        exact integers of its dtype, or ``None``."""
        if route.step is not step:
            route.step, view = step, _step_view(step)
            route.step_view = None if view is None else (view, _EXACT_INTEGERS[step.dtype])
        return route.step_view

    def _all_finite(self, work: list[tuple], lows: dict[int, Tensor] | None = None,
                    tokens: dict[int, object] | None = None) -> bool:
        """:func:`_all_finite` of the local gradients, or of a parameter's projected gradient where
        ``lows`` (:meth:`_checked_lows`, by ``id`` of the parameter) has it; with sharded parameters
        the flag is reduced over their meshes (every rank skips together, or none does). The step's
        planning (``_before_read``, set by :meth:`step`) is :func:`_all_finite`'s ``prepare``: run between
        the check's kernels and its read (not at all when the projection's check decides,
        :meth:`_finite_and_pre_check`: the step then plans after the read)."""
        prepare = self.__dict__.pop("_before_read", None)
        tensors = [lows.get(id(w[1]), w[2]) for w in work] if lows else [w[2] for w in work]
        reduces = {id(w[4].groups[0]) if w[4].groups else None: w[4] for w in work if w[4] is not None}
        finite = self._finite_and_pre_check(work, tensors, tokens) or _all_finite(tensors, prepare)
        if not reduces:
            return finite
        device = next(w[2].device for w in work if w[4] is not None)
        flag = torch.tensor(1.0 if finite else 0.0, device=device)
        for r in reduces.values():
            r.min_(flag)
        return bool(flag.item())

    def _finite_and_pre_check(self, work: list[tuple], tensors: list[Tensor],
                              tokens: dict[int, object] | None = None) -> bool:
        """The non-finite check's common case read together with the projection's
        :meth:`~lowmem.optim.subspace.Projection.pre_check` flag (Online Subspace Descent: every basis
        step's gradient usable) and with whether every gradient of a refresh due this step that reads it
        is usable (:meth:`_refresh_checks`; GaLore's, Fira's, ... SVD: finite and not all zero, from the
        check's own norms, :func:`~lowmem.optim.subspace.all_usable_if_finite`), issue 15: one device read a step.
        ``True`` when every norm is below :data:`MAX_GRAD_NORM` (what :func:`_all_finite` passes at its
        first read) and the flags hold, then :attr:`_checked` holds what the projection handed over and
        :attr:`_usable` the refreshes' gradients. ``False`` otherwise (nothing to read with it, several
        devices, a failing norm or flag: then :func:`_all_finite` decides with its own read, and the basis
        steps and refreshes read their own flags)."""
        self._checked = self._usable = None
        P = self.recipe.projection
        if P is None or not tensors:
            return False
        pre = P.pre_check([(grad, self.state[key], group) for key, _, grad, group, r, _, _ in work
                           if r is None and key in self.state and grad.ndim == 2])  # (a batch: _update_matrices)
        due = self._refresh_checks(work, tensors, tokens)
        if pre is None and not due:
            return False
        device = pre[0].device if pre is not None else tensors[due[0]].device
        if any(t.device != device for t in tensors):
            return False
        if due:  # (the refreshes' gradients first: within each dtype's group of the stack, its first norms)
            first = set(due)
            tensors = [tensors[i] for i in due] + [t for i, t in enumerate(tensors) if i not in first]
            due = tensors[:len(due)]
        # (_all_finite's norms: one multi-tensor norm per dtype, its stack cast to float32 once, issue 15;
        # the tensors come back in the stack's order)
        stack, order = _norms(tensors)
        ok = (stack < MAX_GRAD_NORM).all()  # NaN compares False
        for a, b in _runs(order, {id(t) for t in due}):  # (one run per dtype of the due gradients)
            ok &= all_usable_if_finite(stack[a:b])  # (finite, from ok: usable when not zero; 1 byte)
        del stack, order
        if pre is not None:
            ok = ok & pre[0]
        if not bool(ok):
            return False
        self._checked = None if pre is None else pre[1]
        self._usable = {id(t): t for t in due} if due else None
        return True

    def _refresh_checks(self, work: list[tuple], tensors: list[Tensor], tokens: dict[int, object] | None) -> list[int]:
        """Indices into ``work`` of the parameters whose projection refresh is due this step and reads its
        gradient's usability (:meth:`~lowmem.optim.subspace.Projection.refresh_checks_usable`), checked in
        :meth:`_finite_and_pre_check`: unsharded, checked through the gradient itself (not a projected one),
        no stabilizers (the refresh reads that gradient in float32: exactly its values, so not a float64 one,
        whose float32 copy may round to zero). Whether due: the step count's next
        value read through the route's NumPy view (no host read), a first step's always; a count not read
        that way is taken as due (a usable gradient passes either way; an unusable one not due only makes
        the step read twice)."""
        r, P = self.recipe, self.recipe.projection
        if r.stabilizers:
            return []
        due = []
        for i, (key, p, grad, group, reduce, _, _) in enumerate(work):
            if (reduce is not None or tensors[i] is not grad or grad.dtype == torch.float64 or p.ndim != 2
                    or not self._is_projected(p, group) or not P.refresh_checks_usable(group)):
                continue
            state = self.state[key] if key in self.state else {}
            step = state.get("step")
            if step is not None and "proj_meta" in state and tokens is not None:
                view = self._counter_view(step, self._route(p, grad, group, state, tokens))
                t = None if view is None else float(view[0][()]) + 1
                if t is not None and abs(t) <= view[1] and t.is_integer() and not P.refresh_due(state, group, int(t)):
                    continue
            due.append(i)
        return due

    def _checked_lows(self, work: list[tuple], tokens: dict[int, object] | None) -> dict[int, Tensor]:
        """Projected gradients the non-finite check reads instead of their gradients (issue 15: one
        read of every gradient saved), by ``id`` of the parameter, computed before any state is touched.

        Sound because a NaN or +-Inf anywhere in ``G`` leaves ``P^T G`` / ``G Q^T`` non-finite
        (:meth:`~lowmem.optim.subspace.Projection.down_keeps_nonfinite`), and taken only where nothing
        else of the step reads ``G``: every projected parameter of the step is on the projected
        multi-tensor path (:meth:`_projected_foreach_ok`) of a projection that keeps non-finite
        values and a combine-back that reads only ``P^T G`` (GaLore's, not Fira's, FRUGAL's or
        APOLLO's: ``needs_full_gradient``), none is due for a refresh (which reads ``G``: then the
        gradients are checked, as before), no parameter is sharded; a float32 gradient, or a
        low-precision one projected a block of rows at a time. Each is the product :meth:`_project_down`
        computes (the same bits; it takes it instead of computing it again). The norm bound
        (:data:`MAX_GRAD_NORM`) then applies to the projected gradient, the tensor whose squares the
        moments hold.

        They stay alive until each parameter's project-down, so they are held only within
        :meth:`_hold_budget` (a step without refreshes stays within :meth:`step_transient_bytes`);
        the ones beyond it are checked through their gradients."""
        r, P = self.recipe, self.recipe.projection
        if P is None or tokens is None or r.combine.needs_full_gradient or r.stabilizers:
            return {}
        todo = []
        for key, p, grad, group, reduce, _, _ in work:
            if reduce is not None:
                return {}
            if not self._is_projected(p, group) or p.ndim != 2:  # (a batch of matrices: checked through its gradient)
                continue
            state = self.state[key]
            step = state.get("step")
            route = self._route(p, grad, group, state, tokens)
            if (step is None or route.path != "low" or not P.down_keeps_nonfinite(state, group)
                    or not (grad.dtype == torch.float32 or self._down_in_rows(p, grad)) or p.dtype == torch.float64):
                return {}
            view = self._counter_view(step, route)  # (its next value, read through the view: no host read)
            t = None if view is None else float(view[0][()]) + 1
            if t is None or not (abs(t) <= view[1] and t.is_integer()) or P.refresh_due(state, group, int(t)):
                return {}
            todo.append((p, grad, group, state))
        if not todo:
            return {}
        budget, lows = self._hold_budget(tokens), {}
        for p, grad, group, state in todo:
            numel = P.low_shape(p.shape, group).numel()
            if numel > budget:
                continue
            budget -= numel
            lows[id(p)] = (P.down_rows(grad, state, group, self._row_bounds(p.shape, self._chunk(p.device)))
                           if grad.dtype != torch.float32
                           else P.down(grad, state, group))
        return lows

    def _hold_budget(self, tokens: dict[int, object]) -> int:
        """How many projected-gradient elements :meth:`_checked_lows` may hold: what
        :meth:`step_transient_bytes` bounds beyond a step without refreshes (its refresh phases: the
        SVD's workspace for ``svd``), ``(whole - steady) / 4``, so that such a step with the held
        projected gradients stays within the reported bound. Cached with the groups' tokens
        (:meth:`_group_tokens`); 0 while a parameter has no state yet (the bound needs every one's)."""
        sig = (tuple(tokens.values()), self._chunk_numel, id(self.state))
        cached = self.__dict__.get("_hold")
        if cached is not None and cached[0] == sig:
            return cached[1]
        if any(not self.state.get(p) for g in self.param_groups for p in g["params"]):
            return 0
        budget = max(0, self._transient_bytes() - self._transient_bytes(steady=True)) // 4
        self.__dict__["_hold"] = (sig, budget)
        return budget

    def _foreach_pieces(self, p: Tensor) -> list[tuple[int, int]]:
        """Flat ``[start, stop)`` pieces ``p`` joins the foreach buckets in: at most ``chunk_numel``
        elements each (``p``'s device's, :meth:`_chunk`)."""
        n, chunk = p.numel(), self._chunk(p.device)
        if chunk is None or n <= chunk:
            return [(0, n)]
        return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]

    def _fused_whole(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor], grad: Tensor | None = None) -> bool:
        """Whether ``p`` (on the foreach path, unsharded) is stepped by a fused kernel that allocates nothing:
        the moment rule's ``fused_whole`` (AdamW's, torch's fused AdamW kernel:
        :meth:`~lowmem.optim.moments.AdamMoments.fused_whole`), no stabilizers, ``grad`` contiguous
        (``None``: assumed). Such a tensor joins, whole, one bucket of its group, step count and device with
        no ``chunk_numel`` cap (the cap bounds the multi-tensor operations' temporaries; the kernel has
        none): one kernel call for the bucket instead of one per ``chunk_numel`` elements. Decided with the
        route (:meth:`_route`). A parameter with no state yet (no ``step``: its first step without
        :meth:`materialize_state`, the Trainer's) is decided from the state its first step will make
        (:meth:`_state_to_be`), so that step takes the kernel as the later ones do (before 2026-12-01 it was
        decided as without moments: a bfloat16 weight with bfloat16 moments took the capped buckets' float32
        arithmetic at its first step, 12 B per element of the largest bucket, FOUND_EST18 5)."""
        rule = getattr(self.recipe.moment, "fused_whole", None)
        if rule is None or self.recipe.stabilizers or (grad is not None and not grad.is_contiguous()):
            return False
        return rule(p, group, state if "step" in state else self._state_to_be(p, group))

    def _state_to_be(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """What a route decision reads of the state :meth:`_init_matrix` will make for ``p`` (unprojected, no
        stabilizers: the fused kernel's candidates): the moment rule's ``init_state`` run on a meta twin of ``p``
        (its dtypes and layout, nothing allocated; outside any dispatch mode: no work of the step, which a tracer
        such as ``lowmem bench --launches``' would count as kernels, 2 zero fills per AdamW parameter), and the
        write-back's ``kahan_comp`` where it will be made; each tensor a 0-element stand-in of its dtype on
        ``p``'s device where it is contiguous (the meta one where not: its device is then not ``p``'s, no fused
        kernel)."""
        made: dict[str, Tensor] = {}
        with _disable_current_modes():
            twin = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="meta")
            self.recipe.moment.init_state(made, p.shape, group, twin)
            if group.get("kahan_summation") and p.dtype == torch.bfloat16:  # (as _init_matrix)
                made["kahan_comp"] = twin
        return {k: torch.empty((0,), dtype=v.dtype, device=p.device) if isinstance(v, Tensor) and v.is_contiguous()
                else v for k, v in made.items()}

    @staticmethod
    def _bucket_key(sizes: dict[tuple, int], base: tuple, numel: int, chunk: int | None) -> tuple:
        """The foreach bucket of a tensor of ``numel`` elements: buckets of ``base`` (its device
        included) fill up to ``chunk`` elements (that device's ``chunk_numel``), then a new one starts
        (the bucket's temporaries are its size)."""
        index, used = sizes.get(base, (0, 0))
        if chunk is not None and used > 0 and used + numel > chunk:
            index, used = index + 1, 0
        sizes[base] = (index, used + numel)
        return (*base, index)

    def _foreach_ok(self, p: Tensor, group: dict[str, Any], grad: Tensor | None = None,
                    state: dict[str, Tensor] | None = None) -> bool:
        """Whether ``p`` can take the moment rule's multi-tensor path: a plain full-rank float32 step (or a
        bfloat16 one the rule's buckets take: :meth:`_bf16_bucket_ok`) that the rule has a multi-tensor form for
        (decided per parameter, :meth:`~lowmem.optim.moments.MomentRule.supports_foreach_for`, e.g. a hybrid's
        AdamW parameters
        and its targets of a supported shape, quantized moments except batched rank-1 ones; ``state``:
        ``p``'s, empty before its first step), where a tensor larger than ``chunk_numel`` must be
        contiguous (it joins the buckets in chunks; a rule whose statistics span blocks steps it whole
        from its first piece: :meth:`~lowmem.optim.moments.MomentRule.steps_pieces_whole`).
        ``grad=None``: the gradient is assumed dense, contiguous and of the parameter's dtype."""
        r = self.recipe
        chunk = self._chunk(p.device)
        large = chunk is not None and p.numel() > chunk
        return (
            group.get("foreach") is not False
            and r.moment.supports_foreach_for(p.shape, group, {} if state is None else state)
            # stabilizers in pieces (prepare / transform_chunk, as the chunked step), when the rule's
            # foreach step takes their lr scale (SPAM's warm-up)
            and (not r.stabilizers or (r.moment.foreach_step_lr and all(s.chunkable for s in r.stabilizers)
                                       and p.is_contiguous() and (grad is None or grad.is_contiguous())))
            # a constant step size, or an lr rule the foreach step evaluates itself (Adafactor's RMS scale)
            and (r.lr_rule is constant_lr or r.lr_rule is r.moment.foreach_lr_rule)
            and r.decay_after_update == r.moment.foreach_decays_after
            and ((p.dtype == torch.float32
                  and (grad is None or (grad.dtype == torch.float32 and not grad.is_sparse))
                  # float32 state, or the state dtypes the rule's buckets take (Sm3Moments: bfloat16 too)
                  and state_dtype(group, p) in getattr(r.moment, "foreach_state_dtypes", (torch.float32,)))
                 or self._bf16_bucket_ok(p, group, grad))
            and not (large and not (p.is_contiguous() and (grad is None or grad.is_contiguous())))
            and not self._is_projected(p, group)
            and not self._matrices(p, group)  # (a batch of matrices: per matrix, _update_matrices)
        )

    def _bf16_bucket_ok(self, p: Tensor, group: dict[str, Any], grad: Tensor | None) -> bool:
        """Whether bfloat16 ``p`` may join the multi-tensor buckets (:meth:`_step_bf16_bucket`): a rule with a
        bucket direction of bfloat16 parameters (``bf16_bucket_direction``: AdamW's; or ``bf16_bucket_steps_copies``:
        Adam-mini's float32 bucket step on the copies) and moments of a dtype it takes (``bf16_bucket_state_dtypes``),
        a bfloat16 dense gradient, no stabilizers, a constant learning-rate rule (or the rule's
        ``bf16_bucket_lr_rule``, evaluated on the bucket by its ``bf16_bucket_lrs``: Adafactor's) and a float ``lr``
        (the operations of :meth:`_apply` with a number); not in a subclass whose
        per-parameter step is its own (BAdam's ``_update``: a float32 master copy takes the step); a tensor larger
        than ``chunk_numel`` only where the rule steps pieces element-wise (``pieces_elementwise``, or
        ``bf16_bucket_pieces_elementwise(shape, group)``: the hybrids' AdamW parameters; a rule whose statistics span
        blocks, SM3's, or a hybrid's target steps such a bfloat16 tensor alone, as before)."""
        r = self.recipe
        chunk = self._chunk(p.device)
        return (p.dtype == torch.bfloat16
                and (getattr(r.moment, "bf16_bucket_direction", None) is not None
                     or getattr(r.moment, "bf16_bucket_steps_copies", False))  # (Adam-mini's: _step_bf16_bucket)
                and (chunk is None or p.numel() <= chunk or getattr(r.moment, "pieces_elementwise", False)
                     # (a rule whose pieces are element-wise for some parameters: the hybrids' AdamW ones)
                     or getattr(r.moment, "bf16_bucket_pieces_elementwise", lambda shape, group: False)(p.shape, group))
                and type(self)._update is LowMemOptimizer._update
                and (grad is None or (grad.dtype == torch.bfloat16 and not grad.is_sparse))
                and state_dtype(group, p) in r.moment.bf16_bucket_state_dtypes
                and getattr(r.moment, "bf16_bucket_takes", lambda p, group: True)(p, group)  # (Lion's fused kernel)
                and not r.stabilizers and not isinstance(group.get("lr"), Tensor)
                # (or the rule's own lr rule that reads the parameters, evaluated on the bucket: bf16_bucket_lrs)
                and (r.lr_rule is constant_lr or r.lr_rule is getattr(r.moment, "bf16_bucket_lr_rule", None)))

    # ---- the multi-tensor step of projected parameters ---------------------------------------

    def _projected_foreach_ok(self, p: Tensor, group: dict[str, Any], grad: Tensor | None = None,
                              state: dict[str, Tensor] | None = None) -> bool:
        """Whether projected ``p`` takes the multi-tensor step (:meth:`step`): each parameter is
        projected down alone (:meth:`_project_down`, its refresh when due), the moment rule steps the
        projected gradients of a bucket together
        (:meth:`~lowmem.optim.moments.MomentRule.foreach_direction`), each is combined back alone
        (:meth:`_combine_back`). Needs a rule with a multi-tensor direction for ``p``'s state (AdamW's
        on float32 moments, or on their 8-bit codes; Adafactor's factored ones), no stabilizers, a
        learning-rate rule that does not read the parameter (one step size for the bucket) or a rule
        that takes one step size per gradient (:attr:`~lowmem.optim.moments.MomentRule.foreach_direction_lrs`:
        each parameter's, evaluated at its project-down), and a dense gradient; ``foreach=False`` in the group keeps the per-parameter step (the
        reference). FSDP2 shards take the per-parameter path (the caller checks)."""
        r = self.recipe
        return (
            group.get("foreach") is not False
            and not r.stabilizers
            # one step size for the bucket (constant_lr), or one per parameter from the recipe's lr
            # rule (evaluated at its project-down) that the rule's foreach_direction takes as a list
            and ((r.lr_rule is constant_lr and not r.moment.applies_lr) or r.moment.foreach_direction_lrs)
            and (grad is None or grad.layout == torch.strided)
            and self._is_projected(p, group)
            and p.ndim == 2  # (a batch of matrices: per matrix, _update_matrices)
            # (a float64 parameter: the per-parameter step, counted exactly and allocating less than the bucket's
            # float32 copies: apollo_adamw 10,856 B traced vs 14,888 on the float64 tiny model)
            and p.dtype != torch.float64
            and r.moment.supports_foreach_direction(group, {} if state is None else state, p)
        )

    def _matrices_foreach_ok(self, p: Tensor, group: dict[str, Any], grad: Tensor | None = None,
                             state: dict[str, Tensor] | None = None) -> bool:
        """Whether the matrices of projected batch ``p`` ``[..., A, B]`` (:meth:`_matrices`) take the projected
        multi-tensor step, each as a 2-D parameter (:meth:`_projected_foreach_ok` of its first matrix and its
        state's views: they all share the group, shapes and state layout), in order, as separate 2-D
        parameters would; else the batch is stepped a matrix at a time (:meth:`_update_matrices`)."""
        if p.ndim <= 2 or not self._is_projected(p, group):
            return False
        idx = matrix_index(0, p.shape[:-2])
        return self._projected_foreach_ok(matrix_of(p, idx), group, None if grad is None else matrix_of(grad, idx),
                                          matrix_state(state, idx) if state else {})

    def _down_batched(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Tensor], t: float,
                      start: int, stop: int) -> Tensor | None:
        """The projected gradients of the matrices ``start .. stop - 1`` (row-major over the leading dimensions)
        of batch ``p``, the ones that join the open projected bucket, in one batched product
        (:meth:`~lowmem.optim.subspace.Projection.down_batched`, issue 15: one product per bucket's share of an
        expert weight, not one per expert), stacked ``[stop - start, ...]``; or ``None`` for the per-matrix
        project-down: only where each matrix's :meth:`_project_down` would compute exactly ``P.down`` of its
        gradient (float32, no refresh due for any of them at step ``t``) and the gradient's matrices are a view
        ``[E, A, B]`` (no gradient copy: the batch's gradient is the stack). The stack lives no longer than the
        bucket; it is what the matrices' own projected gradients would be, allocated at once, within
        :meth:`_low_bucket_bytes`'s count of the per-matrix project-downs (each matrix's ``down`` >= its projected
        gradient); while the bucket is combined back the earlier matrices' projected gradients stay in the stack,
        so each combine-back has at most the first one's bytes alive (tests/test_experts_subspace.py traces it).

        Off the CPU only (where the step is launch-bound, as :meth:`_stabilizes_many`), unless
        :attr:`batched_down_on_cpu`: a batched product's bits may differ from the per-matrix products' (MKL's
        batched GEMM vs its GEMM / GEMV: to float32 rounding, tested), and on the CPU the batch stays equal to
        separate 2-D parameters bit for bit."""
        P = self.recipe.projection
        lead = p.shape[:-2]
        if ((p.device.type == "cpu" and not self.batched_down_on_cpu) or grad.dtype != torch.float32
                or stop - start < 2):
            return None
        if any(P.refresh_due(matrix_state(state, matrix_index(e, lead)), group, int(t)) for e in range(start, stop)):
            return None
        try:
            g = grad.view(-1, *grad.shape[-2:])[start:stop]
        except RuntimeError:  # (leading dimensions that do not flatten without a copy)
            return None
        view = {k: v if k in MATRIX_SHARED_KEYS or not isinstance(v, Tensor) else v.view(-1, *v.shape[len(lead):])[start:stop]
                for k, v in state.items()}
        return P.down_batched(g, view, group)

    def _complete_shared(self, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        """A batch's shared ``moment_start`` that a checkpoint predating it lacks, created before its matrices'
        views are taken (:func:`_init_moment_start`'s zeros; a 2-D parameter's first reset creates it): the
        projected buckets keep the views until they are combined back, with no :func:`_write_back`."""
        if "moment_start" not in state and group.get("moment_policy") == "reset" and self.recipe.moment.restarts_on_reset:
            state["moment_start"] = torch.zeros((), dtype=torch.float32)

    def _joins_low_bucket(self, bucket: list[_Projected], group: dict[str, Any], t: float, device: torch.device,
                          numel: int, used: int | None = None) -> bool:
        """Whether a parameter of ``group`` at step ``t`` on ``device`` whose projected gradient has
        ``numel`` elements joins the open bucket: the same group, step and device, and the bucket's
        projected gradients stay within ``chunk_numel`` elements (one larger than that fills a bucket
        alone; ``None``: no limit). Decided before the parameter is projected down; one bucket is open
        at a time, so at most one bucket's projected gradients and directions are alive
        (:meth:`step_transient_bytes`). ``used``: the elements of the bucket's projected gradients, as the
        step counts them while it fills the bucket (``None``: summed here; the sum at every join made filling
        a bucket quadratic in its members: issue 15, host time)."""
        first = bucket[0]
        if first.group is not group or first.t != t or first.low.device != device:
            return False
        chunk = self._chunk(device)
        return chunk is None or (sum(b.low.numel() for b in bucket) if used is None else used) + numel <= chunk

    def _step_low_bucket(self, bucket: list[_Projected]) -> None:
        """The moment rule on every projected gradient of ``bucket`` at once, then each parameter's
        combine-back (its projected gradient and direction freed as it is done)."""
        group = bucket[0].group
        ts = [moment_step(b.state, b.t) for b in bucket]
        if any(x != ts[0] for x in ts):  # moments reset at different steps (moment_policy="reset"):
            parts = [[b for b, x in zip(bucket, ts) if x == mt] for mt in dict.fromkeys(ts)]  # one per count
            bucket.clear()
            while parts:
                self._step_low_bucket(parts.pop(0))
            return
        t = ts[0]
        # one step size per parameter (each one's lr rule at its project-down: Adafactor's RMS scale)
        lr = [b.lr for b in bucket] if self.recipe.moment.foreach_direction_lrs else bucket[0].lr
        ds = list(self.recipe.moment.foreach_direction([b.low for b in bucket], [b.state for b in bucket], group, t, lr))
        if self._fold_low_bucket(bucket, ds):
            return
        ds.reverse()
        bucket.reverse()
        while bucket:
            self._combine_back(bucket.pop(), ds.pop())

    def _fold_low_bucket(self, bucket: list[_Projected], ds: list[Tensor]) -> bool:
        """The combine-back of a whole bucket at once, when the combine rule offers it
        (:meth:`~lowmem.optim.subspace.CombineRule.foreach_fold`: its statistics a few kernels per
        shape, not per parameter) and every parameter and gradient is float32 with a number as the
        learning rate: each parameter updated in place, ``p += a up(M) + g k`` (``addmm_``,
        ``addcmul_``: no full-size direction), the decoupled weight decay of the bucket in one
        multi-tensor kernel, then the projection's ``foreach_post_update`` (Online Subspace Descent's basis
        steps: one device read for the bucket, multi-tensor SGD / AdamW). Returns ``False`` (nothing done)
        otherwise; :meth:`_combine_back` of each parameter is the reference (equal to float32 rounding)."""
        r, P = self.recipe, self.recipe.projection
        group, lr = bucket[0].group, bucket[0].lr
        if (isinstance(lr, Tensor) or r.moment.applies_lr or r.moment.foreach_direction_lrs or r.stabilizers
                or any(b.p.dtype != torch.float32 or b.g.dtype != torch.float32 for b in bucket)):
            return False
        chunks = [self._chunk(b.p.device) for b in bucket]
        bounds = [self._row_bounds(b.p.shape, c) if c is not None else [(0, b.p.shape[0])] for b, c in zip(bucket, chunks)]
        folds = r.combine.foreach_fold([b.g for b in bucket], [b.low for b in bucket], ds, [b.state for b in bucket],
                                       group, P, -lr, bounds)
        if folds is None:
            return False
        ps, wd = [b.p for b in bucket], group.get("weight_decay", 0.0)
        if wd and not r.decay_after_update:
            torch._foreach_mul_(ps, 1.0 - lr * wd)  # (F.decoupled_weight_decay_ of each, before the update)
        for i, m, a, k in folds:
            b = bucket[i]
            if m is not None:
                P.add_up_rows_(b.p, m, b.state, group, 0, b.p.shape[0], a)
            if k is not None:
                b.p.addcmul_(b.g, k)
            del m, k
        # (what is neither: FRUGAL's state-free sign step, a batch of row blocks per multi-tensor kernel)
        r.combine.foreach_fold_rest(ps, [b.g for b in bucket], [b.low for b in bucket], [b.state for b in bucket],
                                    group, P, -lr, bounds)
        if wd and r.decay_after_update:
            torch._foreach_mul_(ps, 1.0 - lr * wd)
        del ds[:]
        P.foreach_post_update([b.g for b in bucket], [b.state for b in bucket], group, [b.down_of_g for b in bucket],
                              self._checked)
        bucket.clear()
        return True

    # ---- the chunked step -------------------------------------------------------------------

    def _chunk_bounds(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor],
                      grad: Tensor | None = None) -> list[tuple[int, int]] | None:
        """Flat ``[start, stop)`` ranges the chunked step visits ``p`` in, or ``None`` when ``p`` is
        stepped whole: ``chunk_numel`` is ``None``, ``p`` is projected, a part of the chain is not
        element-wise (the moment rule's :meth:`~lowmem.optim.moments.MomentRule.chunk_align` is
        ``None``, a stabilizer is not ``chunkable``, the learning-rate rule reads the parameter), or
        a tensor is not contiguous."""
        r, chunk = self.recipe, self._chunk(p.device)
        if chunk is None or self._is_projected(p, group):
            return None
        if not all(s.chunkable for s in r.stabilizers):
            return None
        if r.lr_rule is not constant_lr and p.dtype != torch.float32 and not (
                p.dtype in (torch.bfloat16, torch.float16) and getattr(r.lr_rule, "takes_p_rms", False)):
            # a rule that reads the whole parameter in float32 and cannot take its RMS from the chunks
            # (:meth:`_chunked_lr`: Adafactor's and AdaLomo's RMS scale can, AUDMEM21 1)
            return None
        if not p.is_contiguous() or (grad is not None and not grad.is_contiguous()):
            return None
        align = r.moment.chunk_align(p.shape, group, state)
        if align is None:
            return None
        n = p.numel()
        size = max(align, chunk // align * align)
        return [(a, min(a + size, n)) for a in range(0, n, size)]

    def _update_chunked(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Tensor], t: float,
                        bounds: list[tuple[int, int]], reduce: ShardReduce | None = None) -> None:
        """The step of :meth:`_update` for an element-wise chain, one chunk of ``bounds`` at a time.
        ``reduce``: the all-reduces of a sharded parameter's per-tensor statistics (stabilizers')."""
        r = self.recipe
        gflat, pflat = grad.view(-1), p.view(-1)
        ctxs = [s.prepare(gflat, state, group, int(t), r.moment, bounds, reduce) if reduce is not None
                else s.prepare(gflat, state, group, int(t), r.moment, bounds) for s in r.stabilizers]

        def stabilized(start: int, stop: int, view: dict[str, Tensor]) -> Tensor:
            g = gflat[start:stop]
            g = F.compute_float(g)
            for s, ctx in zip(r.stabilizers, ctxs):
                g = s.transform_chunk(g, view, group, int(t), r.moment, ctx)
            return g

        # a sharded parameter (FSDP2): a learning-rate rule that reads the parameter (Adafactor's RMS
        # scale) and a moment rule with whole-tensor statistics (sharded_stats: Adafactor's columns)
        # get the all-reduces over the shards (lowmem.optim.sharded.refusal admits only such parts)
        lr = self._chunked_lr(p, group, state, t, bounds, reduce)
        mctx = (r.moment.prepare_chunks(state, p.shape, group, t, lr, bounds, stabilized, reduce=reduce)
                if reduce is not None and r.moment.sharded_stats
                else r.moment.prepare_chunks(state, p.shape, group, t, lr, bounds, stabilized))
        lr_scale = math.prod(s.lr_scale(state, group, int(t)) for s in r.stabilizers)
        wd = r.moment.weight_decay_for(group, state)  # (the group's weight_decay; 0 for a recipe without it)
        couple = getattr(r.moment, "coupled_gradient", None)  # (L2 decay g + wd p: MomentRule's optional hooks)
        for start, stop in bounds:
            view = r.moment.chunk_state(state, start, stop, p.shape, group, mctx)
            d = r.moment.direction(stabilized(start, stop, view) if couple is None else
                                   couple(stabilized(start, stop, view), pflat[start:stop], group, state),
                                   view, group, t, lr)
            pc = pflat[start:stop]
            p32 = F.compute_float(pc)
            self._apply(p32, d, lr, lr_scale, wd)
            del d, view  # (before the write-back: stochastic rounding's bits take the direction's place)
            if p32 is not pc:
                self._store(pc, p32, group, state, (start, stop))
            del p32  # (before the next chunk's copies: LowMemOptimizer._param_transient_bytes)
        r.moment.finish_chunks(state, mctx)

    def _chunked_lr(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor], t: float,
                    bounds: list[tuple[int, int]], reduce: ShardReduce | None = None) -> Any:
        """The step size of :meth:`_update_chunked`. A low-precision (bfloat16 / float16) parameter whose lr rule reads
        its RMS (``takes_p_rms`` and ``reads_param(group)``: Adafactor's parameter scale, AdaLomo's): the RMS from a
        first pass over the chunks ``bounds`` (:func:`chunked_rms`: a float32 copy of one chunk at a time, not of the
        whole parameter; AUDMEM21 1), given to the rule as ``p_rms``. Else the rule on the parameter itself
        (``reduce``: a sharded parameter's all-reduces)."""
        r = self.recipe
        if self._rms_in_chunks(p, group):
            return r.lr_rule(group, state, p, t, p_rms=chunked_rms(p, bounds, reduce))
        return (r.lr_rule(group, state, p, t) if reduce is None or r.lr_rule is constant_lr
                else r.lr_rule(group, state, p, t, reduce=reduce))

    def _rms_in_chunks(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether :meth:`_chunked_lr` computes ``p``'s RMS in a first pass over its chunks (:func:`chunked_rms`)."""
        r = self.recipe
        return (r.lr_rule is not constant_lr and p.dtype in (torch.bfloat16, torch.float16)
                and getattr(r.lr_rule, "takes_p_rms", False) and bool(r.lr_rule.reads_param(group)))

    @staticmethod
    def _row_bounds(shape: torch.Size, chunk: int) -> list[tuple[int, int]]:
        """Row chunks of a projected parameter's combine-back: ``chunk // n`` rows each (at least 1;
        ``chunk``: the parameter's device's ``chunk_numel``)."""
        m, n = shape
        rows = max(1, chunk // max(n, 1))
        return [(a, min(a + rows, m)) for a in range(0, m, rows)]

    def _combine_rows(self, p: Tensor, g: Tensor, low: Tensor, d_low: Tensor, state: dict[str, Tensor],
                      group: dict[str, Any], lr: Any, t: int, down_of_g: Tensor | None = None,
                      checked: Any = None) -> None:
        """The combine-back step (:class:`~lowmem.optim.subspace.CombineRule`) and the update of
        ``p``, a block of rows at a time (no full-size direction): the rule's whole-tensor statistics
        come first (``prepare``), the basis is updated last (``post_update``, ``checked``: what it receives)."""
        r, P = self.recipe, self.recipe.projection
        bounds = self._row_bounds(p.shape, self._chunk(p.device))
        lr_scale = math.prod(s.lr_scale(state, group, t) for s in r.stabilizers)
        wd = group.get("weight_decay", 0.0)  # a recipe without the hyperparameter does not decay
        # a direction c * P.up(d_low) on a float32 parameter (GaLore): the step is one GEMM,
        # p += alpha * P.up(d_low) in place (addmm_, nothing of the direction's size; issue 15)
        c = r.combine.add_in_place_scale(state, group, P)
        if c is not None and p.dtype == torch.float32 and not isinstance(lr, Tensor):
            pr = p
            if not r.decay_after_update:
                F.decoupled_weight_decay_(pr, lr, wd)
            P.add_up_rows_(pr, d_low, state, group, 0, p.shape[0], -c * lr_scale * (1.0 if r.moment.applies_lr else lr))
            if r.decay_after_update:
                F.decoupled_weight_decay_(pr, lr, wd)
            P.post_update(g, state, group, down_of_g, checked)
            return
        ctx = r.combine.prepare(g, low, d_low, state, group, P, bounds)
        for start, stop in bounds:
            d = r.combine.direction_rows(g[start:stop].float(), low, d_low, state, group, P, start, stop, ctx)
            pr = p[start:stop]
            p32 = F.compute_float(pr)
            self._apply(p32, d, lr, lr_scale, wd)
            del d
            if p32 is not pr:
                self._store(pr, p32, group, state, (start * p.shape[1], stop * p.shape[1]))
            del p32  # (the block's float32 copy freed before the next block's are made)
        P.post_update(g, state, group, down_of_g, checked)

    def _store(self, dst: Tensor, src: Tensor, group: dict[str, Any], state: dict[str, Tensor],
                span: tuple[int, int] | None = None) -> None:
        """Write a step's float32 result ``src`` (a temporary of the step: overwritten) into the parameter (or its
        chunk, block of rows, shard) ``dst``: stochastically rounded where ``dst`` is bfloat16 and the group has
        ``bf16_stochastic_round`` (:func:`~lowmem.optim.functional.rounding.stochastic_round_to_bf16_`, its bits
        from :meth:`_rounding_generator`); with the compensation of ``kahan_summation`` (its flat elements
        ``span`` of the parameter's, ``None``: all) where the state keeps one
        (:func:`~lowmem.optim.functional.rounding.kahan_store_`); else ``copy_`` (round-to-nearest)."""
        if dst.dtype == torch.bfloat16 and group.get("bf16_stochastic_round"):
            stochastic_round_to_bf16_(dst, src, self._rounding_generator(state, dst), overwrite_src=True)
        elif "kahan_comp" in state and dst.dtype == torch.bfloat16:
            comp = state["kahan_comp"]
            kahan_store_(dst, src, comp if span is None else comp.view(-1)[span[0] : span[1]].view(dst.shape))
        else:
            dst.copy_(src)

    def _rounding_generator(self, state: dict[str, Tensor], dst: Tensor) -> torch.Generator | None:
        """The generator of the random bits that round the parameter whose state is ``state`` at its current step
        count ``t`` (the write-backs of one parameter's step follow one another: its chunks, row blocks, the
        matrices of a batch; the generator is kept from one to the next): seeded with
        :func:`~lowmem.optim.functional.rounding.stream_seed` of the parameter's position in the groups and
        ``t``, so a run draws the same bits again, and a run resumed from a checkpoint the bits the uninterrupted
        run drew; no state of its own (``state_bytes()`` unchanged). ``None`` on a meta or fake tensor (the
        estimator's and the traced step's: nothing is drawn)."""
        if _no_data(dst):
            return None
        step = state["step"]
        t, epoch = step.item(), self._rounding_epoch()
        cur = self.__dict__.get("_sr_cur")
        if cur is not None and cur[0] is step and cur[1] == (t, epoch) and cur[2].device == dst.device:
            return cur[2]
        gens = self.__dict__.setdefault("_sr_gens", {})  # (one generator per device, seeded again per parameter)
        gen = gens.get(dst.device)
        if gen is None:
            gen = gens[dst.device] = torch.Generator(device=dst.device)
        gen.manual_seed(stream_seed(self._param_index(step), t, epoch))
        self.__dict__["_sr_cur"] = (step, (t, epoch), gen)
        return gen

    def _rounding_epoch(self) -> int:
        """What tells apart the runs of a parameter's step count when it starts again (``stream_seed``'s
        ``epoch``): 0 here, where a count never restarts; BAdam's block period (its state freed at each switch)."""
        return 0

    def _param_index(self, step: Tensor) -> int:
        """The position, in the parameter groups' order, of the parameter whose step counter is ``step`` (a batch of
        matrices' shares one: :data:`MATRIX_SHARED_KEYS`; a sharded parameter's is its state's), plus, for an FSDP2
        parameter, ``2^32`` times its rank's position over the mesh dimensions that shard it (:func:`_mesh_position`:
        each distinct shard its own bits, its replicas the same; a run's rounding then depends on its sharding, as
        its shards do). A map of the counters seen, extended when a counter is not in
        it (a parameter's state made since: its first step, a load) by looking at the parameters from the one after
        the last found (one look per parameter on a first step); made anew when the groups change
        (:meth:`_forget_routes`)."""
        index = self.__dict__.get("_sr_index")
        if index is None:  # (made again after _forget_routes: groups added or loaded)
            index = self.__dict__["_sr_index"] = {"params": [p for g in self.param_groups for p in g["params"]], "next": 0}
        hit = index.get(id(step))
        if hit is not None and hit[0] is step:
            return hit[1]
        # a counter not seen yet: the parameters' states from where the last one was found on (a first step meets
        # them in order: one look each), noting each counter on the way
        params = index["params"]
        for k in range(len(params)):
            i = (index["next"] + k) % len(params)
            p = params[i]
            c = self.state[p].get("step") if p in self.state else None
            if isinstance(c, Tensor):
                index[id(c)] = (c, i + (_mesh_position(p) << 32 if is_dtensor(p) else 0))
                if c is step:
                    index["next"] = i + 1
                    return index[id(c)][1]
        raise RuntimeError(f"{self.recipe.name}: stochastic rounding of a parameter this optimizer does not hold")

    def _apply(self, p32: Tensor, d: Tensor, lr: Any, lr_scale: float, wd: float) -> None:
        """Decoupled weight decay and the step along ``d`` (in place on ``p32``)."""
        r = self.recipe
        if not r.decay_after_update:
            F.decoupled_weight_decay_(p32, lr, wd)
        if r.moment.applies_lr:
            p32.sub_(d if lr_scale == 1.0 else d.mul_(lr_scale))
        else:
            F.apply_update_(p32, d, lr if lr_scale == 1.0 else lr * lr_scale)
        if r.decay_after_update:
            F.decoupled_weight_decay_(p32, lr, wd)

    @torch.no_grad()
    def step_param(self, p: Tensor, grad: Tensor | None = None, *, group: dict[str, Any] | None = None,
                   projected_grad: Tensor | None = None) -> None:
        """Update a single parameter: the one public per-parameter step (layerwise mode's, and the
        memory measurement's through it). No whole-step non-finite check: the caller decides
        (:class:`~lowmem.optim.layerwise.LayerwiseOptimizer` ends the step at a non-finite gradient).

        Args:
            p: A parameter of one of this optimizer's groups.
            grad: Its gradient (default ``p.grad``; nothing happens when both are ``None``).
            group: Its parameter group (default: looked up).
            projected_grad: The gradient already projected into ``p``'s subspace (layerwise
                accumulation in the subspace, after :meth:`refresh_projection`); ``grad`` is then
                only used by the projection's ``post_update``.
        """
        self._checked = self._usable = None  # (no whole-step check: each basis step and refresh reads its own flag)
        grad = p.grad if grad is None else grad
        if grad is None:
            return
        if group is None:
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        self._update(p, grad, group, projected_grad)

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], projected_grad: Tensor | None = None, *,
                key: Tensor | None = None, reduce: ShardReduce | None = None) -> None:
        """One step of ``p``. ``projected_grad``: the gradient already projected (layerwise
        accumulation in the subspace, after :meth:`refresh_projection`); ``grad`` is then only used
        by :meth:`Projection.post_update` and stabilizers are not supported. ``key``: the parameter
        whose state this is when ``p`` is its local shard, with ``reduce`` the all-reduces over its
        mesh (:meth:`step` on FSDP2 parameters); the shard is always stepped in chunks (the chunked
        stabilizers reduce their per-tensor statistics)."""
        self._check_dense(grad)
        if is_dtensor(p):
            raise NotImplementedError(
                f"{self.recipe.name}: a sharded (FSDP2 / DTensor) parameter reached a per-parameter step"
                " (layerwise mode or step_param); only LowMemOptimizer.step() steps sharded parameters"
            )
        r = self.recipe
        # FSDP2, a batch of matrices whose shard holds whole ones: stepped as an unsharded batch of them
        local_batch = reduce is not None and self._local_matrices(key, group)
        if reduce is not None and not local_batch and self._is_projected(key, group):  # FSDP2: a projected shard of rows
            self._update_projected_sharded(key, p, grad, group, reduce)
            return
        state = self.state[p if key is None else key]
        if "step" not in state:  # (a sharded parameter's shard: the rule may read the whole shape)
            self._init_state(p, group, state, key=key if reduce is not None else None)
        t = _advance_step(state["step"])
        if (reduce is None or local_batch) and self._matrices(p, group):
            self._update_matrices(p, grad, group, state, t, projected_grad)
            return
        self._update_state(p, grad, group, state, t, projected_grad, reduce)

    def _update_matrices(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Tensor], t: float,
                         projected_grad: Tensor | None = None) -> None:
        """The step of a batch of matrices ``[..., A, B]`` (:meth:`_matrices`) at step ``t`` (its count
        advanced once): in blocks of whole matrices by the moment rule's batched step where
        :meth:`_matrix_blocks` gives them (:meth:`_update_matrix_blocks`), else each matrix ``e`` stepped as a
        2-D parameter (:meth:`_update_state`) on the views ``p[e]``, ``grad[e]`` and its state's
        (:func:`matrix_state`), one after another (each one's temporaries freed before the next:
        :meth:`_param_transient_bytes` counts one matrix). ``projected_grad``: the stacked projected gradients
        (layerwise accumulation, :meth:`project`)."""
        blocks = None if projected_grad is not None else self._matrix_blocks(p, group, state, grad)
        if blocks is not None:
            self._update_matrix_blocks(p, grad, group, state, t, blocks)
            return
        lead = p.shape[:-2]
        for e in range(math.prod(lead)):
            idx = matrix_index(e, lead)
            sub = matrix_state(state, idx)
            views = dict(sub)
            self._update_state(matrix_of(p, idx), matrix_of(grad, idx), group, sub, t,
                               None if projected_grad is None else matrix_of(projected_grad, idx))
            _write_back(state, idx, sub, views)
            del sub, views

    def _matrix_blocks(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor],
                       grad: Tensor | None = None) -> list[tuple[int, int]] | None:
        """The blocks of whole matrices ``[start, stop)`` (row-major over the leading dimensions) in which
        :meth:`_update_matrices` steps unprojected batch ``p`` ``[..., A, B]`` (:meth:`_matrices`, its state made)
        with the moment rule's batched step (``batch_direction``, issue 15: one set of kernels per block, not one
        per matrix): each block at most ``chunk_numel`` elements (all the matrices when it is ``None``), on the CPU
        at most :data:`CPU_BLOCK_NUMEL` too (cache-sized; one matrix at least). ``None``:
        the batch is stepped a matrix at a time, the same math on each matrix's views (not a fallback of a
        setting): the per-matrix step is kept for

        * ``foreach=False`` in the group (the reference the batched step is tested against),
        * a rule without a batched step, or whose state it does not take (``supports_batch_for``: RACS and
          Subset-Norm take float32 statistics only; bfloat16 ones are computed in float32 per matrix),
        * a projected batch (its own paths), stabilizers, an lr rule that reads the parameter, a rule that
          applies ``lr`` itself,
        * a float64 parameter (the per-matrix step casts its gradient and counts it: FOUND_RACS2 1),
        * a gradient of another dtype than the parameter's (the accounting's assumption), a parameter or
          gradient that is not contiguous (the blocks are views ``[k, A, B]`` of both), a stacked state entry
          whose leading dimensions cannot be viewed as one (:func:`_lead_flat`: its blocks must be views),
        * matrices of more than ``chunk_numel`` elements each: each is stepped in blocks of its rows by the
          chunked step, which bounds the transient by ``chunk_numel`` (issue 15's Qwen3 experts on the CPU's
          ``2**19``).

        ``grad=None`` (the accounting): a dense contiguous gradient of ``p``'s dtype."""
        r, moment = self.recipe, self.recipe.moment
        supports = getattr(moment, "supports_batch_for", None)
        if (supports is None or group.get("foreach") is False or self._is_projected(p, group) or r.stabilizers
                or r.lr_rule is not constant_lr or moment.applies_lr
                or p.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not p.is_contiguous()
                or (grad is not None and (grad.dtype != p.dtype or grad.layout != torch.strided
                                          or not grad.is_contiguous()))
                or not supports(p.shape, group, state)
                or not all(_lead_flat(v, p.ndim - 2) for k, v in state.items()
                           if k not in MATRIX_SHARED_KEYS and isinstance(v, Tensor))):
            return None
        count, n = math.prod(p.shape[:-2]), p.shape[-2] * p.shape[-1]
        chunk = self._chunk(p.device)
        if chunk is not None and n > chunk:
            return None
        if count == 0 or n == 0:
            return []
        k = count if chunk is None else chunk // n
        if p.device.type == "cpu":  # (cache-sized blocks: CPU_BLOCK_NUMEL)
            k = max(1, min(k, CPU_BLOCK_NUMEL // n))
        return [(e, min(e + k, count)) for e in range(0, count, k)]

    @staticmethod
    def _batch_views(p: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        """``p`` and its stacked state entries with the leading dimensions made one, ``[count, ...]`` (views);
        the shared entries (:data:`MATRIX_SHARED_KEYS`) as they are."""
        lead = len(p.shape) - 2
        flat = {k: v if k in MATRIX_SHARED_KEYS or not isinstance(v, Tensor) else v.flatten(0, lead - 1)
                for k, v in state.items()}
        return p.detach().flatten(0, lead - 1), flat

    def _update_matrix_blocks(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Tensor],
                              t: float, blocks: list[tuple[int, int]]) -> None:
        """:meth:`_update_matrices` by blocks of whole matrices (:meth:`_matrix_blocks`): for each block ``[e0,
        e1)``, its gradients ``[k, A, B]`` (a float32 copy of a low-precision one) and the views ``state[key][e0:e1]``
        of its stacked state go to the moment rule's ``batch_direction`` (which updates the state in place and
        returns the block's float32 direction, a new tensor), then decay and the step on the block of ``p`` (its
        float32 copy, written back by :meth:`_store`: stochastic rounding drawn on from the parameter's stream,
        Kahan's compensation of the block), as the chunked step does for a chunk. Equal to the per-matrix step
        (the rules' batched products may add in another order: float32 rounding)."""
        r = self.recipe
        p3, st3 = self._batch_views(p, state)
        g3 = grad.flatten(0, len(p.shape) - 3)
        lr = r.lr_rule(group, state, p3, t)  # (constant_lr: _matrix_blocks)
        wd = r.moment.weight_decay_for(group, state)
        for e0, e1 in blocks:
            view = {k: v if k in MATRIX_SHARED_KEYS or not isinstance(v, Tensor) else v[e0:e1] for k, v in st3.items()}
            # (the gradient's float32 copy is freed when the rule returns, before the parameter's is made)
            d = r.moment.batch_direction(F.compute_float(g3[e0:e1]), view, group, t, lr)
            pc = p3[e0:e1]
            p32 = F.compute_float(pc)
            self._apply(p32, d, lr, 1.0, wd)
            del d  # (before the write-back: stochastic rounding's bits take the direction's place)
            if p32 is not pc:
                self._store(pc, p32, group, view)
            del p32, view

    def _matrix_blocks_bytes(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor],
                             blocks: list[tuple[int, int]]) -> int:
        """What :meth:`_update_matrix_blocks` allocates at most, exact: its largest block's (the first) rule
        step, ``batch_transient_bytes`` (the rule's temporaries beside the gradient block's float32 copy, then
        the direction beside the parameter block's copy), and the write-back of a bfloat16 block with
        ``bf16_stochastic_round`` (the parameter block's float32 copy beside the rounding's random bits and NaN
        mask; Kahan's compensation allocates nothing)."""
        if not blocks:
            return 0
        k = blocks[0][1] - blocks[0][0]
        n = k * p.shape[-2] * p.shape[-1]
        copy = 4 if p.dtype != torch.float32 else 0
        _, st3 = self._batch_views(p, state)
        view = {key: v if key in MATRIX_SHARED_KEYS or not isinstance(v, Tensor) else v[:k] for key, v in st3.items()}
        with counting_gradient(torch.float32):  # (the block's gradient is float32: the parameter's or its copy)
            worst = self.recipe.moment.batch_transient_bytes(k, p.shape[-2:], group, view, copy)
        if p.dtype == torch.bfloat16 and group.get("bf16_stochastic_round"):
            worst = max(worst, 4 * n + stochastic_round_bytes(n))
        return worst

    def _update_state(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Tensor], t: float,
                      projected_grad: Tensor | None = None, reduce: ShardReduce | None = None) -> None:
        """:meth:`_update` after the state exists and its count is advanced to ``t``."""
        r = self.recipe
        # (a fused step decays in the rule's own order, foreach_decays_after: only where the recipe's agrees)
        if (projected_grad is None and reduce is None and not r.stabilizers and not self._is_projected(p, group)
                and r.decay_after_update == r.moment.foreach_decays_after
                and type(r.moment).fused_step_ is not MomentRule.fused_step_  # (the default: never; no lr evaluated)
                and r.moment.fused_step_(p, grad, group, state, t, r.lr_rule(group, state, p, t), self._chunk(p.device))):
            return  # (a fused kernel stepped p and its state: adamw8bit's fused, Quantized.fused_step_)
        if projected_grad is None and reduce is None and self._casts_float64_grad(p, group):
            grad = grad.float()  # (MomentRule.computes_in_state_precision: once, held through the step; counted)
        if projected_grad is None:
            bounds = self._chunk_bounds(p, group, state, grad)
            if bounds is None and reduce is not None:
                if not (p.is_contiguous() and grad.is_contiguous()):
                    raise ValueError(f"{r.name}: the local shard of a sharded parameter or its gradient is not contiguous")
                bounds = [(0, p.numel())] if p.numel() else []
            if bounds is not None:
                self._update_chunked(p, grad, group, state, t, bounds, reduce)
                return

        if self._is_projected(p, group):  # project down, the moment rule, combine back (the step's reference)
            item = self._project_down(p, grad, group, state, t, projected_grad)
            self._combine_back(item, r.moment.direction(item.low, state, group, moment_step(state, t), item.lr))
            return

        g = F.compute_float(grad)
        for s in r.stabilizers:
            g = s.transform(g, state, group, int(t), r.moment)
        couple = getattr(r.moment, "coupled_gradient", None)  # (L2 decay g + wd p, before the copy of p below)
        if couple is not None:
            g = couple(g, p, group, state)
        p32 = p if p.dtype in (torch.float32, torch.float64) else p.float()
        lr = r.lr_rule(group, state, p32, t)
        d = r.moment.direction(g, state, group, t, lr)
        lr_scale = math.prod(s.lr_scale(state, group, int(t)) for s in r.stabilizers)
        self._apply(p32, d, lr, lr_scale, r.moment.weight_decay_for(group, state))
        del g, d
        if p32 is not p:
            self._store(p, p32, group, state)

    def _down_in_rows(self, p: Tensor, grad: Tensor) -> bool:
        """Whether :meth:`_project_down` projects ``grad`` a block of rows at a time (a low-precision
        gradient, chunked step, no stabilizers)."""
        return (grad.dtype not in (torch.float32, torch.float64) and not self.recipe.stabilizers
                and self._chunk(p.device) is not None and p.is_contiguous() and grad.is_contiguous())

    def _project_down(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Tensor], t: float,
                      projected_grad: Tensor | None = None, low: Tensor | None = None) -> _Projected:
        """The first phase of a projected parameter's step (its step count already advanced to ``t``):
        the stabilizers, the refresh when due, the projected gradient and the learning rate; the
        moment rule's direction of ``low`` and :meth:`_combine_back` finish it. A low-precision
        gradient is projected a block of rows at a time (no full-size float32 copy of it; a refresh
        that reads the gradient's values still converts it whole: the exact SVD needs it whole anyway; a random
        basis or a choice of coordinates does not, :meth:`~lowmem.optim.subspace.Projection.refresh_reads_gradient`). ``low``: the projected
        gradient already computed by :meth:`_checked_lows` (no refresh due: the same product)."""
        r, P = self.recipe, self.recipe.projection
        checked = self._usable is not None and self._usable.get(id(grad)) is grad  # (_finite_and_pre_check)
        if projected_grad is None and self._down_in_rows(p, grad):
            if low is None:
                if P.refresh_due(state, group, int(t)):  # (a random basis reads no values: no whole copy, FIXAPOLLO21)
                    self._refresh(p, grad.float() if P.refresh_reads_gradient(group) else grad, state, group, int(t),
                                  checked)
                low = P.down_rows(grad, state, group, self._row_bounds(p.shape, self._chunk(p.device)))
            lr = r.lr_rule(group, state, p if r.lr_rule is constant_lr else p.float(), t)
            return _Projected(p, grad, low, state, group, t, lr, p, True, None)
        g = F.compute_float(grad)
        for s in r.stabilizers:
            g = s.transform(g, state, group, int(t), r.moment)
        g = g.float()  # the subspace math is float32 (a float64 parameter stays float64)
        if projected_grad is None:
            if low is None:
                self._refresh(p, g, state, group, int(t), checked and not r.stabilizers)
                low = P.down(g, state, group)
        else:
            low = projected_grad.float()
        rows = self._chunk(p.device) is not None and p.is_contiguous()
        # the chunked combine-back converts the parameter a block of rows at a time
        p32 = p if p.dtype in (torch.float32, torch.float64) or (rows and r.lr_rule is constant_lr) else p.float()
        lr = r.lr_rule(group, state, p32, t)
        # a low-precision gradient pre_check found usable: its float32 copy g is (issue 15: post_update reads nothing)
        copy_checked = (g is not grad and grad.dtype in (torch.bfloat16, torch.float16) and not r.stabilizers  # (exact copy)
                        and self._checked is not None
                        and (self._checked.get(id(grad)) or (None,))[0] is grad)
        return _Projected(p, g, low, state, group, t, lr, p32, rows, low if projected_grad is None else None,
                          copy_checked)

    def _combine_back(self, item: _Projected, d: Tensor) -> None:
        """The last phase of a projected parameter's step: the combine-back of the moment rule's
        direction ``d`` of ``item.low`` and the update (a block of rows at a time, or whole for the
        reference ``chunk_numel=None``), then the projection's ``post_update``."""
        r, P = self.recipe, self.recipe.projection
        p, g, low, state, group, t, lr, p32 = item.p, item.g, item.low, item.state, item.group, item.t, item.lr, item.p32
        checked = {id(g): (g, None)} if item.checked else self._checked  # (the copy's norm: post_update's own)
        if item.rows:
            self._combine_rows(p, g, low, d, state, group, lr, int(t), item.down_of_g, checked)
            return
        d = r.combine.direction(g, low, d, state, group, P)
        P.post_update(g, state, group, item.down_of_g, checked)
        lr_scale = math.prod(s.lr_scale(state, group, int(t)) for s in r.stabilizers)
        self._apply(p32, d, lr, lr_scale, group.get("weight_decay", 0.0))
        del d
        if p32 is not p:
            self._store(p, p32, group, state)

    def _sharded_projection(self, key: Tensor, group: dict[str, Any], reduce: ShardReduce | None) -> ShardedProjection:
        from .sharded import _projected_side

        return ShardedProjection(self.recipe.projection, reduce, shard_rows(key), key.shape,
                                 _projected_side(self.recipe, group, key.shape))

    def _update_projected_sharded(self, key: Tensor, p: Tensor, grad: Tensor, group: dict[str, Any],
                                  reduce: ShardReduce) -> None:
        """The projected step of an FSDP2 parameter's local rows ``p`` (``key``: the ``DTensor``):
        a refresh reads the whole gradient (gathered once: :meth:`ShardedProjection.whole_gradient`)
        and runs the unsharded refresh, so every rank holds the same bases; the projection of the
        shard is local (right side, columns) or one all-reduce (left side); the moment rule steps
        the shard's projected gradient; the combine-back gives the shard's rows of the direction
        (:func:`~lowmem.optim.sharded.combine_direction`). Whole-shard temporaries (the shard is
        ``1/N`` of the matrix). Which recipes: :func:`~lowmem.optim.sharded.projected_refusal`."""
        r, P = self.recipe, self.recipe.projection
        state = self.state[key]
        if "step" not in state:
            self._init_state(p, group, state, key=key)
        t = _advance_step(state["step"])
        sp = self._sharded_projection(key, group, reduce)
        g = F.compute_float(grad).float()  # the subspace math is float32, as unsharded
        if P.refresh_due(state, group, int(t)):
            self._refresh(key, sp.whole_gradient(g, group), state, group, int(t))
        low = sp.down(g, state, group)
        lr = r.lr_rule(group, state, p, t) if r.lr_rule is constant_lr else r.lr_rule(group, state, p, t, reduce=reduce)
        t = moment_step(state, t)  # (the moment rule's count; the schedule's was used above)
        if sp.side in ("right", "columns") and r.moment.sharded_stats:
            # statistics over the rows of a row-sharded R (Adafactor's columns): the rule's chunked
            # form with the all-reduces, R taken as one chunk
            flat, bounds = low.reshape(-1), ([(0, low.numel())] if low.numel() else [])
            ctx = r.moment.prepare_chunks(state, low.shape, group, t, lr, bounds, lambda a, b, view: flat[a:b], reduce=reduce)
            d = (r.moment.direction(flat, r.moment.chunk_state(state, 0, low.numel(), low.shape, group, ctx), group, t, lr)
                 .view(low.shape) if bounds else torch.zeros_like(low))
            r.moment.finish_chunks(state, ctx)
        else:
            d = r.moment.direction(low, state, group, t, lr)
        d = combine_direction(r.combine, g, low, d, state, group, sp)
        p32 = F.compute_float(p)
        self._apply(p32, d, lr, 1.0, group.get("weight_decay", 0.0))
        del d
        if p32 is not p:
            self._store(p, p32, group, state)
        sharded_post_update(g, low, state, group, sp)  # Online Subspace Descent's basis step

    def _refresh(self, p: Tensor, g: Tensor, state: dict[str, Tensor], group: dict[str, Any], t: int,
                 checked: bool = False) -> None:
        """Refresh ``p``'s projection from ``g`` if due at step ``t``, then apply the moment policy.
        ``checked``: ``g`` (the step's gradient in float32) found usable by :meth:`_finite_and_pre_check`."""
        P = self.recipe.projection
        if not P.refresh_due(state, group, t):
            return
        rotate = group["moment_policy"] == "rotate" and t > 1
        old = P.snapshot(state, group) if rotate else None
        if P.refresh(g, state, group, checked) and t > 1:
            self._on_subspace_change(state, group, old, t)

    @torch.no_grad()
    def refresh_projection(self, p: Tensor, g: Tensor, group: dict[str, Any]) -> bool:
        """Refresh ``p``'s projection for its *next* step from gradient ``g`` (if due), and return
        whether ``p`` is projected. Layerwise accumulation calls this on a window's first
        micro-batch, then accumulates ``project(p, g)`` and steps with ``projected_grad``. A batch of
        matrices: each matrix's projection from its gradient."""
        if not self._is_projected(p, group):
            return False
        state = self.state[p]
        if "step" not in state:
            self._init_state(p, group, state)
        t = int(state["step"].item()) + 1
        if p.ndim == 2:
            self._refresh(p, g if g.dtype == torch.float32 else g.float(), state, group, t)
            return True
        lead = p.shape[:-2]
        for e in range(math.prod(lead)):
            idx = matrix_index(e, lead)
            sub = matrix_state(state, idx)
            views = dict(sub)
            gm = matrix_of(g, idx)
            self._refresh(matrix_of(p, idx), gm if gm.dtype == torch.float32 else gm.float(), sub, group, t)
            _write_back(state, idx, sub, views)
        return True

    def project(self, p: Tensor, g: Tensor, group: dict[str, Any]) -> Tensor:
        """``g`` in ``p``'s current subspace (float32); a batch of matrices: each matrix's, stacked."""
        P, state = self.recipe.projection, self.state[p]
        if p.ndim == 2:
            return P.down(g if g.dtype == torch.float32 else g.float(), state, group)
        lead = p.shape[:-2]
        out = None
        for e in range(math.prod(lead)):
            idx = matrix_index(e, lead)
            gm = matrix_of(g, idx)
            low = P.down(gm if gm.dtype == torch.float32 else gm.float(), matrix_state(state, idx), group)
            if out is None:
                out = low.new_empty((*lead, *low.shape))
            matrix_of(out, idx).copy_(low)
        return out

    def _on_subspace_change(self, state: dict[str, Tensor], group: dict[str, Any], old: dict[str, Tensor] | None = None,
                            t: int | None = None) -> None:
        """What the moments do when the projection's basis changes at step ``t``: ``keep``, ``reset``
        (zeroed, and counted again from 1: :func:`moment_step`) or ``rotate`` (into the new basis,
        :func:`~lowmem.optim.subspace.rotate_moments`)."""
        policy = group["moment_policy"]
        if policy == "reset":
            self.recipe.moment.reset(state)
            if t is not None:
                # (a checkpoint saved before moment_start existed gets it at its first reset)
                if self.recipe.moment.restarts_on_reset:
                    state.setdefault("moment_start", torch.zeros((), dtype=torch.float32)).fill_(t - 1)
        elif policy == "rotate" and old is not None:
            rotate_moments(self.recipe.moment.state_keys, self.recipe.projection, state, group, old)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(recipe={self.recipe.name!r}, groups={len(self.param_groups)})"
