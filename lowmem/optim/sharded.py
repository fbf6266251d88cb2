"""Sharded (``DTensor``) parameters from FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 turns every parameter into a ``DTensor`` sharded on dimension 0 over a device mesh; after
``backward()`` its gradient is a ``DTensor`` with the same placements (reduce-scattered, averaged).
The engine steps such a parameter on its **local shard**: ``p.to_local()`` and
``p.grad.to_local()`` are plain tensors (views of the shard's storage), state is allocated to match
the local shard (plain tensors in ``optimizer.state``), and the update is written in place into the
shard. ``state_dict()`` returns that state as ``DTensor`` s (:func:`state_to_dtensor`) so that
``torch.distributed.checkpoint`` saves every rank's piece; they still load with
``torch.load(weights_only=True)``.

That is exact for element-wise recipes (every output element depends only on the same element of
the gradient and state). Per-tensor statistics are reduced across the shards where the recipe uses
them (Stable-SPAM's ``max |g|`` and gradient norm: one all-reduce of a scalar each, over the
parameter's mesh; Adafactor's (and AdaLomo's) column sums, row-statistic mean, update RMS and
parameter RMS;
rank-1 column maxima; SinkGD's / SCALE's / Subset-Norm's column norms; Adam-mini's whole-tensor
blocks and heads cut by the shard boundaries), or the whole matrix is gathered (a projection's refresh, Muon's Newton-Schulz), so the
result equals the unsharded step. Projected parameters: :class:`ShardedProjection` (bases kept
whole on every rank; right-side projections shard-local, left-side ones all-reduced). A batch of
matrices stepped per matrix (fused MoE experts ``[E, A, B]`` of a projected or Subset-Norm group)
sharded on its leading dimension (FSDP2's ``Shard(0)``): each rank steps its whole matrices as an
unsharded batch, no communication (:func:`matrices_refusal`, :func:`matrix_offsets`). Block-wise
statistics (quantization
absmax, MicroAdam's top-k and error blocks) are computed per shard: equal to the unsharded run when
every shard's number of elements is a multiple of the block size (then the blocks are the same);
otherwise the blocks at shard boundaries differ (still a valid optimizer, but not the same numbers).

Recipes that need information this module does not reduce (layerwise mode, which fuses the step
into the backward pass; row / flat coordinate subspaces; Subset-Norm's flat subsets cut by a shard
boundary; Adam-mini's heads cut by shards not sharded by rows, :func:`straddling_heads_refusal`) are
**refused** with a
``NotImplementedError`` naming the recipe and the supported ones, never run on a shard as if it
were the whole matrix. The check is an allow-list of engine parts (:func:`refusal`), so a new part
refuses until someone states that it is shard-local.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

try:  # torch.distributed is optional in some builds
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Replicate, Shard
except ImportError:  # pragma: no cover - builds without torch.distributed
    dist = None
    DTensor = None


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter or gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (a plain tensor sharing its storage), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


class ShardReduce:
    """All-reduces of per-shard statistics over the mesh dimensions a ``DTensor`` is sharded on.

    Replicated mesh dimensions (HSDP's outer dimension) hold equal values already and are skipped.
    Each method reduces in place and returns its argument.
    """

    def __init__(self, groups: list[Any], shape: torch.Size | None = None, rows: tuple[int, int] | None = None):
        self.groups = groups
        # the parameter's global shape and this rank's rows [start, stop) (one Shard(0): FSDP2), for
        # rules that gather the whole matrix (Muon's Newton-Schulz)
        self.shape, self.rows = shape, rows

    def _reduce(self, t: Tensor, op: Any) -> Tensor:
        for g in self.groups:
            dist.all_reduce(t, op=op, group=g)
        return t

    def sum_(self, t: Tensor) -> Tensor:
        return self._reduce(t, dist.ReduceOp.SUM)

    def max_(self, t: Tensor) -> Tensor:
        return self._reduce(t, dist.ReduceOp.MAX)

    def min_(self, t: Tensor) -> Tensor:
        return self._reduce(t, dist.ReduceOp.MIN)


    def gather_rows(self, t: Tensor, rows: int) -> Tensor:
        """The whole ``rows x ...`` tensor from every shard's block of rows (dimension 0 split as
        ``torch.chunk`` splits it, FSDP2's layout): one all-gather of ``ceil(rows / N)`` padded rows
        per shard. Only one sharded mesh dimension (plain FSDP2; HSDP's replicate dimension is
        skipped as everywhere here)."""
        if len(self.groups) != 1:
            raise NotImplementedError(f"gathering a tensor sharded over {len(self.groups)} mesh dimensions")
        group = self.groups[0]
        world = dist.get_world_size(group)
        chunk = -(-rows // world)
        padded = t.new_zeros((chunk, *t.shape[1:]))
        padded[: t.shape[0]] = t
        out = t.new_empty((world * chunk, *t.shape[1:]))
        # all_gather_single (torch >= 2.13) is all_gather_into_tensor renamed
        gather = dist.all_gather_single if hasattr(dist, "all_gather_single") else dist.all_gather_into_tensor
        gather(out, padded, group=group)
        return out[:rows]  # every shard but the trailing ones holds exactly `chunk` rows


def sharded_rms(x: Tensor, reduce: ShardReduce) -> Tensor:
    """``RMS(X) = sqrt(sum(X^2) / numel)`` of a whole parameter from its local shard ``x`` (a 0-d
    float tensor): the shard's sum of squares and element count summed over the shards (one
    all-reduce of 2 numbers); an empty shard contributes zeros."""
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    sums = reduce.sum_(torch.stack([torch.linalg.vector_norm(x).square(),
                                    torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)]))
    return (sums[0] / sums[1]).sqrt_()


def shard_rows(p: Tensor) -> tuple[int, int]:
    """``[start, stop)``: the rows of ``p`` (a ``DTensor`` sharded on dimension 0 over one mesh
    dimension) this rank holds, from ``torch.chunk``'s split (FSDP2's)."""
    dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
    if len(dims) != 1 or p.placements[dims[0]].dim != 0:
        raise NotImplementedError(f"placements {tuple(p.placements)}: expected one Shard(0) (FSDP2)")
    world, rank = p.device_mesh.size(dims[0]), p.device_mesh.get_local_rank(dims[0])
    chunk = -(-p.shape[0] // world)
    start, stop = min(rank * chunk, p.shape[0]), min((rank + 1) * chunk, p.shape[0])
    if stop - start != p.to_local().shape[0]:
        raise ValueError(f"local shard of {tuple(p.shape)} has {p.to_local().shape[0]} rows; expected {stop - start}")
    return start, stop


def shard_reduce(p: Tensor) -> ShardReduce:
    """The :class:`ShardReduce` over the mesh dimensions ``p`` (a ``DTensor``) is sharded on."""
    mesh = p.device_mesh
    dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
    rows = shard_rows(p) if len(dims) == 1 and p.placements[dims[0]].dim == 0 and p.dim() > 0 else None
    return ShardReduce([mesh.get_group(i) for i in dims], p.shape, rows)


def check_placements(p: Tensor, grad: Tensor | None, name: str) -> None:
    """Only ``Shard`` and ``Replicate`` placements, the gradient's equal to the parameter's.

    Raises:
        ValueError: A ``Partial`` placement, or a gradient sharded differently from its parameter.
    """
    for pl in p.placements:
        if not isinstance(pl, (Shard, Replicate)):
            raise ValueError(f"{name}: DTensor parameter with placement {pl}; expected Shard or Replicate (FSDP2)")
    if grad is not None and (not is_dtensor(grad) or tuple(grad.placements) != tuple(p.placements)):
        got = tuple(grad.placements) if is_dtensor(grad) else "a plain tensor"
        raise ValueError(
            f"{name}: the gradient of a DTensor parameter with placements {tuple(p.placements)} has {got};"
            " expected the same placements (FSDP2 reduce-scatters gradients to the parameter's sharding)"
        )


def refusal(recipe: Any, group: dict[str, Any], p: Tensor) -> str | None:
    """Why ``recipe`` cannot step the sharded parameter ``p`` of ``group`` on its local shard, or
    ``None`` when it can (every part of the chain is on the allow-list of shard-local parts)."""
    from .microadam import MicroAdamMoments
    from .moments import AdamMoments, FactoredMoments, constant_lr
    from .quantized import Quantized
    from .recipes.lomo import SGDMoments
    from .stabilizers import RestartBiasCorrection, SPAMStabilizer, StableSPAMStabilizer

    if recipe.projection is not None and group.get("rank") is not None and p.ndim == 2 and group["rank"] < min(p.shape):
        return projected_refusal(recipe, group, p)
    if recipe.lr_rule is not constant_lr and recipe.lr_rule not in sharded_lr_rules():
        return "its step size reads the whole parameter (relative step / RMS scaling)"
    moment = recipe.moment
    while isinstance(moment, (RestartBiasCorrection, Quantized)):
        if isinstance(moment, Quantized) and group.get("v_normalization", "block") == "rank1" and (
                p.ndim > 2 or (p.ndim == 2 and moment is not recipe.moment)):
            # (the chain's own Quantized reduces its column maxima in prepare_chunks; a wrapped one
            # or batched matrices would not)
            return "rank-1 normalization uses column maxima over all rows of the matrix"
        moment = moment.inner
    # element-wise rules, Adafactor's factored rule (row statistics local, column sums and the
    # update's RMS all-reduced in FactoredMoments.prepare_chunks), Muon (the whole momentum matrix
    # gathered for Newton-Schulz in MuonMoments.prepare_chunks; its other parameters AdamW)
    # and SinkGD / SCALE (rows local, column norms all-reduced in their prepare_chunks)
    from .recipes.normalized import MuonMoments, ScaleMoments, SinkGDMoments
    from .recipes.normuon import NorMuonMoments

    from .recipes.adam_mini import AdamMiniMoments

    if isinstance(moment, AdamMiniMoments):  # blocks: rows, elements local; one tensor block reduced
        if group["block"] == "row" and p.ndim < 2:
            return (f"its 'row' block of a {p.ndim}-D parameter is the whole vector, of which a shard holds only"
                    " a part; use block='tensor' (reduced over the shards) or 'element' for vectors")
        if group["block"] == "head" and p.ndim == 2:  # (a shard of a batched tensor holds whole matrices)
            why = straddling_heads_refusal(p, group["head_dim"])
            if why is not None:
                return why
        moment = AdamMoments()  # (stands for it below: its blocks are now shard-local or reduced)
    from .recipes.subset_norm import SubsetNormMoments

    if type(moment) is SubsetNormMoments:  # rows local, column sums all-reduced (prepare_chunks)
        from .functional.subset_norm import subset_dim

        if group.get("subset_norm") and group.get("subset_size") is not None and p.ndim >= 1:
            why = flat_subsets_refusal(p, group["subset_size"])
            if why is not None:
                return why
        elif group.get("subset_norm") and p.ndim == 2 and subset_dim(p.shape) == 0 and _one_row_shard(p):
            return "a one-row shard of a column-normalised weight would read as element-wise statistics"
        moment = AdamMoments()
    hybrid = type(moment) in (MuonMoments, NorMuonMoments, ScaleMoments, SinkGDMoments)
    if hybrid and moment.targets(p.shape, group) and (p.ndim > 2 or len([pl for pl in p.placements if pl.is_shard()]) != 1):
        return f"{type(moment).__name__} on a shard needs a matrix sharded by rows over one mesh dimension"
    from .recipes.came import CameMoments  # (Adafactor's reductions, and the instability's column sums)
    from .recipes.lion import LionMoments  # element-wise: one moment of the gradient's shape
    from .recipes.sm3 import Sm3Moments  # rows' accumulators local, the other dimensions' maxima all-reduced (max)
    from .recipes.ademamix import AdEMAMixMoments  # element-wise: three moments of the gradient's shape
    from .recipes.racs import RacsMoments  # rows' statistics local, the column sums with the row count and the norm's square all-reduced (sum)
    from .recipes.classic import AdagradMoments, MomentumSGDMoments, RMSpropMoments  # element-wise (torch's SGD / Adagrad / RMSprop)
    from .recipes.stable_adamw import StableAdamWMoments  # element-wise; the update's RMS all-reduced (prepare_chunks)

    if not isinstance(moment, (AdamMoments, MicroAdamMoments, FactoredMoments, SGDMoments, CameMoments, LionMoments, Sm3Moments, RacsMoments, AdEMAMixMoments,
                                   MomentumSGDMoments, AdagradMoments, RMSpropMoments, StableAdamWMoments)) and not hybrid:
        return f"its moment rule {type(moment).__name__} uses statistics of the whole tensor (e.g. row/column sums)"
    for s in recipe.stabilizers:
        if not isinstance(s, (SPAMStabilizer, StableSPAMStabilizer)):
            return f"its stabilizer {type(s).__name__} is not known to be shard-local"
    return None


def sharded_lr_rules() -> tuple[Any, ...]:
    """Learning-rate rules that read the parameter and take ``reduce=`` (a :class:`ShardReduce`),
    reducing what they read over the shards: Adafactor's and AdaLomo's parameter RMS
    (:func:`sharded_rms`); StableAdamW's clipped step size (a tensor its moment rule scales after the all-reduce)."""
    from .moments import adafactor_lr
    from .recipes.lomo import adalomo_lr
    from .recipes.stable_adamw import clipped_lr  # (its reduction is the moment rule's: prepare_chunks)

    return (adafactor_lr, adalomo_lr, clipped_lr)


def straddling_heads_refusal(p: Tensor, head_dim: int) -> str | None:
    """Why Adam-mini's ``head`` blocks of the matrix ``p`` cannot be stepped on its shards, or
    ``None``. Heads that straddle two shards (``ceil(rows / ranks) % head_dim != 0``) are summed over
    the shards (``recipes.adam_mini.straddling_heads_mean_square``); every non-empty shard keeps one
    ``v`` per row, also one holding whole heads among straddling ones (the trailing shard, e.g. 16
    rows of 4-row heads over 3 ranks: 6 / 6 / 4), which the rule tells from the ``DTensor`` the engine
    hands its ``init_state_sharded``. Refused: a sharding other than rows over one mesh dimension."""
    dims = [(i, pl.dim) for i, pl in enumerate(p.placements) if pl.is_shard()]
    shards = math.prod(p.device_mesh.size(i) for i, _ in dims)
    chunk = -(-p.shape[0] // shards)
    if chunk % head_dim == 0:
        return None
    if len(dims) != 1 or dims[0][1] != 0:
        return (f"its attention-head blocks ({head_dim} rows) straddle the shards of a {p.shape[0]}-row weight;"
                " summing them over the shards needs rows sharded over one mesh dimension")
    return None


def flat_subsets_refusal(p: Tensor, subset_size: int) -> str | None:
    """Why Subset-Norm's flat subsets (``subset_size``: contiguous runs of ``k`` elements of the
    flattened tensor, ``k`` chosen from the whole tensor's size,
    :func:`~lowmem.optim.functional.subset_norm.flat_subset_size`) cannot be kept per shard of ``p``,
    or ``None``: a shard of rows is a contiguous flat range of the whole tensor, so its subsets are
    the whole tensor's exactly when every shard starts on a subset boundary, i.e. when
    ``ceil(rows / ranks) * (elements per row)`` is a multiple of ``k`` (uneven and empty trailing
    shards then end on one too)."""
    from .functional.subset_norm import flat_subset_size

    if any(pl.is_shard() and pl.dim != 0 for pl in p.placements):
        return f"its flat subsets (subset_size={subset_size}) need a tensor sharded on dimension 0"
    shards = math.prod(p.device_mesh.size(i) for i, pl in enumerate(p.placements) if pl.is_shard())
    k = flat_subset_size(p.numel(), subset_size)
    per_row = math.prod(p.shape[1:])
    chunk = -(-p.shape[0] // shards) * per_row
    if chunk % k:
        return (f"its flat subsets of {k} elements (subset_size={subset_size}) are cut by the shard boundaries of a"
                f" {tuple(p.shape)} tensor over {shards} ranks (need ceil(rows / ranks) x {per_row} elements per shard"
                f" = {chunk} to be a multiple of the subset size {k})")
    return None


def _one_row_shard(p: Tensor) -> bool:
    """Whether some rank holds exactly one row of ``p`` (``torch.chunk``'s split over the shards)."""
    shards = math.prod(p.device_mesh.size(i) for i, pl in enumerate(p.placements) if pl.is_shard())
    chunk = -(-p.shape[0] // shards)
    return 1 in (min(chunk, max(0, p.shape[0] - i * chunk)) for i in range(shards))


def fsdp2_recipes() -> list[str]:
    """Registered engine optimizers that step FSDP2 parameters with their default settings: a
    small full-rank matrix and, for subspace recipes, a projected tall ``1024 x 512`` one (GaLore's
    default side for it is the right)."""
    from .registry import optimizer_entries

    names = []
    small, tall = torch.empty(2, 2, device="meta"), torch.empty(1024, 512, device="meta")
    for e in optimizer_entries():
        r = e.recipe
        if r is None:
            continue
        group = {h.name: h.default for h in r.hparams}
        group.update(e.example_hparams)
        probes = [({k: v for k, v in group.items() if k != "rank"}, small)]
        if r.projection is not None:
            projected = {h.name: h.default for h in r.group_hparams}
            projected.update(group)
            if projected.get("rank") is None:
                projected["rank"] = 4
            probes.append((projected, tall))
        if all(refusal(r, g, p) is None for g, p in probes):
            names.append(e.name)
    return sorted(names)


def cut_blocks(recipe: Any, group: dict[str, Any], p: Tensor) -> str | None:
    """How the per-shard block statistics of ``p`` (a ``DTensor`` sharded by rows) differ from the unsharded
    ones, or ``None`` when they are the same blocks: block-wise quantization (``block_size`` elements of the
    flattened tensor) and MicroAdam's top-k (``min(elements, topk_block_size)``) and error quantization
    (``quant_block_size``) blocks equal the unsharded ones exactly when every shard but the last holds whole
    blocks (``ceil(rows / ranks) x (elements per row)`` a multiple of the block; for the top-k the block is
    ``min(elements, topk_block_size)`` of the whole tensor, see "Per-shard statistics" in docs/distributed.md)."""
    from .microadam import MicroAdamMoments
    from .quantized import Quantized

    dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
    if p.ndim == 0 or p.numel() == 0 or len(dims) != 1 or p.placements[dims[0]].dim != 0:
        return None
    if recipe.projection is not None and group.get("rank") is not None and p.ndim == 2 and group["rank"] < min(p.shape):
        return None  # (projected: the moments are those of the projected gradient)
    world = p.device_mesh.size(dims[0])
    first = -(-p.shape[0] // world) * (p.numel() // p.shape[0])  # elements of every shard but the last
    if world == 1 or first >= p.numel():
        return None
    moment = recipe.moment
    while moment is not None:
        if isinstance(moment, MicroAdamMoments):
            whole = min(p.numel(), group["topk_block_size"])
            if first % math.lcm(whole, group["quant_block_size"]):  # (a shard smaller than the whole block too)
                return (f"MicroAdam's top-k blocks of {whole} and error-quantization blocks of {group['quant_block_size']} "
                        f"elements are cut at its shards of {first} elements")
        if (isinstance(moment, Quantized) and group.get("v_normalization", "block") != "rank1"
                and p.numel() >= group.get("min_quant_size", 0) and first % group["block_size"]):
            return f"its quantization blocks of {group['block_size']} elements are cut at its shards of {first} elements"
        moment = getattr(moment, "inner", None)
    return None


_CUT_WARNED: set[tuple] = set()


def warn_cut_blocks(recipe: Any, group: dict[str, Any], p: Tensor, where: str) -> None:
    """Warn once per recipe, shape and setting when :func:`cut_blocks` finds per-shard blocks: a valid step,
    but not the numbers of one process (nor of another number of processes)."""
    why = cut_blocks(recipe, group, p)
    key = (recipe.name, tuple(p.shape), why)
    if why is None or key in _CUT_WARNED:
        return
    _CUT_WARNED.add(key)
    from lowmem._warn import warn_user

    warn_user(f"{where}: a parameter of shape {tuple(p.shape)} under FSDP2: {why}, so its step differs from one "
              "process's (a valid step with per-shard statistics); choose block sizes that divide every shard "
              "(docs/distributed.md, 'Per-shard statistics')", UserWarning)


def check_supported(recipe: Any, group: dict[str, Any], p: Tensor, where: str) -> None:
    """Raise if ``recipe`` cannot step the ``DTensor`` parameter ``p`` of ``group``; warn (once) when its
    per-shard block statistics differ from the unsharded ones (:func:`warn_cut_blocks`).

    Raises:
        NotImplementedError: The recipe needs whole-matrix information; the message names the
            recipe, the reason and the optimizers that support FSDP2.
        ValueError: An unsupported placement (see :func:`check_placements`).
    """
    check_placements(p, None, where)
    why = refusal(recipe, group, p)
    if why is not None:
        raise NotImplementedError(
            f"{where}: '{recipe.name}' does not support sharded (FSDP2 / DTensor) parameters: {why}. "
            f"Optimizers that support FSDP2: {fsdp2_recipes()} (docs/distributed.md); under DDP every "
            "optimizer works."
        )
    warn_cut_blocks(recipe, group, p, where)


# ---- batches of matrices (fused MoE experts [E, A, B]) sharded on a leading dimension ----
#
# FSDP2 shards dimension 0. A batch of matrices [..., A, B] stepped per matrix (the engine's
# LowMemOptimizer._matrices: each matrix its own projection, moments, statistics) sharded on a
# leading (batch) dimension gives each rank whole matrices: each rank steps its own matrices as the
# unsharded engine steps a batch, with no communication, and their stacked state is sharded the
# same way as the parameter. Random draws are seeded by the matrix's index in the whole batch
# (matrix_offsets), so a run does not depend on the number of processes.


def matrices_refusal(p: Tensor) -> str | None:
    """Why the sharded batch of matrices ``p`` (a ``DTensor`` ``[..., A, B]``) cannot be stepped per
    matrix on its local shard, or ``None`` when it can: every ``Shard`` placement is a plain
    ``Shard(d)`` of a leading (batch) dimension ``d < p.ndim - 2``, so the local shard holds whole
    matrices (uneven and empty shards included). ``Replicate`` placements (HSDP) are fine."""
    for pl in p.placements:
        if isinstance(pl, Replicate):
            continue
        if type(pl) is not Shard:  # (Partial, _StridedShard of FSDP2 + tensor parallelism, ...)
            return f"placement {pl} (supported: Shard(d) of a leading dimension d < {p.ndim - 2}, Replicate)"
        if pl.dim % p.ndim >= p.ndim - 2:
            return (f"placement {pl} splits its {tuple(p.shape[-2:])} matrices (supported: Shard(d) of a leading"
                    f" dimension d < {p.ndim - 2}, e.g. FSDP2's default Shard(0) of the experts, and Replicate)")
    return None


def matrix_offsets(p: Tensor) -> tuple[int, ...]:
    """The index in the whole batch of the first matrix of ``p``'s local shard, per leading dimension
    (``p``: a ``DTensor`` batch of matrices :func:`matrices_refusal` admits; FSDP2's ``torch.chunk``
    split, as ``DTensor``'s own layout computes it).

    Raises:
        ValueError: The local shard's shape is not the one its placements give.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape) != tuple(p.to_local().shape):
        raise ValueError(f"the local shard of a {tuple(p.shape)} parameter with placements {tuple(p.placements)} has"
                         f" shape {tuple(p.to_local().shape)}; its placements give {tuple(shape)}")
    return tuple(offset[: p.ndim - 2])


def global_matrix(e: int, local_lead: torch.Size, offsets: tuple[int, ...], lead: torch.Size) -> int:
    """The row-major index in the whole batch (leading dimensions ``lead``) of the ``e``-th matrix (row-major)
    of a shard whose leading dimensions are ``local_lead``, starting at ``offsets``."""
    index, idx = 0, []
    for d in reversed(local_lead):
        idx.append(e % d)
        e //= d
    for i, off, size in zip(reversed(idx), offsets, lead):
        index = index * size + i + off
    return index


def matrices_state_to_dtensor(v: Any, p: Tensor) -> Any:
    """A state tensor of a sharded batch of matrices stepped per matrix on its shard (the matrices'
    entries stacked along the leading dimensions, ``[*local_lead, ...]``) as the ``DTensor`` of the
    whole batch's stack ``[*lead, ...]`` with the parameter's placements (a ``Shard(d)`` of a leading
    dimension is the same dimension of the stack): ``torch.distributed.checkpoint`` saves each
    rank's matrices and loads them onto any number of processes, as the parameter. 0-d entries (the
    step counters the matrices share, equal on every rank) stay plain. An entry the engine keeps on the
    CPU (``proj_meta``) is copied to the mesh's device (a CUDA mesh's collectives, e.g. a full state
    dict's gather, take no CPU tensors); loading puts it back on the CPU."""
    if not isinstance(v, Tensor) or v.dim() == 0:
        return v
    if v.device.type != p.device_mesh.device_type:
        v = v.to(p.to_local().device)
    k = p.ndim - 2
    shape = torch.Size((*p.shape[:k], *v.shape[k:]))
    stride, acc = [], math.prod(v.shape[k:])
    for d in reversed(p.shape[:k]):  # (each matrix's entry keeps its layout: the engine's _stack_like)
        stride.append(acc)
        acc *= d
    return DTensor.from_local(v, p.device_mesh, tuple(p.placements), run_check=False, shape=shape,
                              stride=(*reversed(stride), *v.stride()[k:]))


# ---- checkpoints: state of a sharded parameter as DTensors (torch.distributed.checkpoint) ----


def state_to_dtensor(v: Any, p: Tensor, key: str, reduced_dim: int | str | None = None) -> Any:
    """A state tensor of sharded parameter ``p`` (a plain tensor of its local shard) as the
    ``DTensor`` that :meth:`LowMemOptimizer.state_dict` returns, so that
    ``torch.distributed.checkpoint`` saves every rank's piece (a plain tensor would be taken as
    replicated: one rank's piece saved for all, silently).

    * 0-d tensors (``step``, Stable-SPAM's statistics, equal on every rank): unchanged.
    * Tensors of the local shard's shape (float32 moments): the parameter's placements and global
      shape, so a checkpoint reshards to any number of processes like the parameter does.
    * ``reduced_dim`` given (the moment rule's ``reduced_dims``: Adafactor's row / column statistics,
      the parameter's shape with that dimension reduced away): the parameter's placements with that
      dimension removed: the row statistics of a matrix sharded by rows are sharded the same way
      (they reshard like the parameter), its column statistics (equal on every rank, from
      all-reduced sums) are replicated.
    * ``reduced_dim="keepdim"``: the shard's shape with one dimension reduced to size 1 (Subset-Norm's
      per-row ``(m_s, 1)`` statistics: sharded like the rows; per-column ``(1, n)``: replicated);
      Subset-Norm's flat subsets ``(numel_s / k, 1)`` of even shards: rows of ``(numel / k, 1)``.
    * ``reduced_dim="rows"``: a 1-D state of one number per block of ``k`` consecutive rows of a
      shard of rows (Adam-mini's ``v`` of ``row`` blocks, ``k = 1``; of heads cut by the shards, one
      per row, ``k = 1``; of whole ``k``-row heads, one per head) is saved one number per row, each
      block's repeated ``k`` times (:func:`rows_of_blocks`): the rows of the whole ``(rows,)``,
      sharded like the parameter's rows, the same whatever the number of processes, so it reshards
      onto any other layout (:func:`state_from_dtensor` takes every ``k``-th row back and checks that
      the rows of a block agree). Other 1-D states (one per element): per-shard state (below).
    * Any other shape (quantization codes and scales, MicroAdam's window): one piece per shard,
      global shape ``(shards, *local_shape)``; loads back onto the same number of shards only (a
      different count is a shape error at load, not a wrong state). Needs equal shards.

    Raises:
        NotImplementedError: Such a per-shard tensor when ``p``'s shards are uneven (dimension 0 not
            divisible by the number of shards) or ``p`` is sharded on more than one mesh dimension.
    """
    lp = local(p)
    if not isinstance(v, Tensor) or v.dim() == 0:
        return v
    mesh, placements = p.device_mesh, tuple(p.placements)
    if v.shape == lp.shape:
        return DTensor.from_local(v, mesh, placements, run_check=False, shape=p.shape, stride=p.stride())
    if reduced_dim == "keepdim" and v.dim() == lp.dim():  # one dimension reduced to size 1 (Subset-Norm's v)
        dims = [i for i in range(v.dim()) if v.shape[i] == 1 != lp.shape[i]]
        if len(dims) == 1 and all(v.shape[i] == lp.shape[i] for i in range(v.dim()) if i != dims[0]):
            d = dims[0]
            shape = p.shape[:d] + (1,) + p.shape[d + 1:]
            kept = tuple(Replicate() if pl.is_shard() and pl.dim == d else pl for pl in placements)
            return DTensor.from_local(v, mesh, kept, run_check=False, shape=shape,
                                      stride=torch.empty(shape, device="meta").stride())
    shard_dims = [(i, pl.dim) for i, pl in enumerate(placements) if pl.is_shard()]
    if (reduced_dim == "rows" and v.dim() == 1 and lp.dim() >= 2 and len(shard_dims) == 1 and shard_dims[0][1] == 0
            and (lp.shape[0] == 0 or 0 < v.shape[0] <= lp.shape[0] and lp.shape[0] % v.shape[0] == 0)):
        # one number per block of k rows (Adam-mini's v: rows, heads cut by the shards, whole heads):
        # one per row, the rows of the whole (rows,), sharded like the parameter's rows (any layout)
        shape = torch.Size(p.shape[:1])
        return DTensor.from_local(rows_of_blocks(v, lp.shape[0]), mesh, placements, run_check=False, shape=shape,
                                  stride=(1,))
    if (reduced_dim == "keepdim" and v.dim() == 2 and v.shape[1] == 1 and 0 < v.shape[0] and lp.numel() % v.shape[0] == 0
            and len(shard_dims) == 1 and shard_dims[0][1] == 0 and p.shape[0] % mesh.size(shard_dims[0][0]) == 0):
        # Subset-Norm's flat subsets of k elements (one (numel_s / k, 1) statistic per subset of the
        # shard, which starts on a subset boundary): rows of the whole tensor's (numel / k, 1), even
        # shards split like the parameter's rows (reshards onto any aligned number of shards)
        shape = torch.Size((p.numel() // (lp.numel() // v.shape[0]), 1))
        return DTensor.from_local(v, mesh, placements, run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())
    if isinstance(reduced_dim, int):  # ("keepdim", "rows": above)
        d = reduced_dim % p.dim()
        if v.shape != lp.shape[:d] + lp.shape[d + 1:]:
            raise ValueError(f"state '{key}': shape {tuple(v.shape)} is not the shard's {tuple(lp.shape)} without dimension {d}")
        shape = p.shape[:d] + p.shape[d + 1:]
        # Shard(k): dimension k of the reduced tensor is k - 1 after d, gone (replicated) at d
        reduced = tuple(pl if not pl.is_shard() or pl.dim < d else Replicate() if pl.dim == d else Shard(pl.dim - 1)
                        for pl in placements)
        return DTensor.from_local(v, mesh, reduced, run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())
    if len(shard_dims) != 1 or p.shape[shard_dims[0][1]] % mesh.size(shard_dims[0][0]) != 0:
        raise NotImplementedError(
            f"state '{key}' of a sharded parameter of shape {tuple(p.shape)} with placements {placements}: per-shard"
            " state (quantized codes, MicroAdam, Subset-Norm's flat subsets) is checkpointed only for even shards on one mesh dimension"
            " (dimension 0 divisible by the number of shards)"
        )
    i = shard_dims[0][0]
    blob = tuple(Shard(0) if j == i else Replicate() for j in range(len(placements)))
    piece = v.unsqueeze(0)
    shape = (mesh.size(i), *v.shape)
    return DTensor.from_local(piece, mesh, blob, run_check=False, shape=shape, stride=torch.empty(shape, device="meta").stride())


def rows_of_blocks(v: Tensor, rows: int) -> Tensor:
    """One number per row from ``v``, one number per block of ``k = rows / len(v)`` consecutive rows
    (each repeated ``k`` times; ``v`` itself when ``k = 1`` or there are no rows)."""
    if rows == 0 or v.shape[0] == rows:
        return v
    return v.repeat_interleave(rows // v.shape[0])


def blocks_of_rows(t: Tensor, blocks: int, key: str, p: Tensor) -> Tensor:
    """Inverse of :func:`rows_of_blocks`: every ``k``-th of the ``rows`` numbers ``t`` (``k = rows /
    blocks``), after checking that the ``k`` rows of each block hold the same number.

    Raises:
        ValueError: The rows of a block differ: the state was saved with other blocks (e.g.
            Adam-mini's ``v`` of another ``head_dim``, or of ``row`` blocks).
    """
    rows = t.shape[0]
    if blocks == rows or rows == 0:
        return t
    k = rows // blocks
    grid = t.view(blocks, k)
    differ = (grid != grid[:, :1]).any(dim=1)
    if bool(differ.any()):
        i = int(differ.nonzero()[0, 0])
        raise ValueError(
            f"state '{key}' of a sharded parameter of shape {tuple(p.shape)}: this optimizer keeps one number per block"
            f" of {k} rows ({blocks} on this shard), but the loaded rows {i * k}..{i * k + k - 1} of this shard hold"
            f" different numbers {grid[i].tolist()}: the state was saved with other blocks (e.g. another head_dim)")
    return grid[:, 0]


def state_from_dtensor(v: Any, p: Tensor, local_shape: torch.Size, key: str) -> Any:
    """Inverse of :func:`state_to_dtensor`: the plain local tensor of shape ``local_shape`` (what the
    recipe allocates for ``p``'s shard) from a loaded ``DTensor`` (a plain tensor passes through;
    the engine then checks every entry with :func:`check_loaded_state`).

    Raises:
        ValueError: The loaded piece does not have the shard's shape (e.g. per-shard state saved
            with another number of processes), or one number per row does not repeat per block
            (:func:`blocks_of_rows`).
    """
    if not is_dtensor(v):
        return v
    if (v.shape == p.shape and tuple(v.placements) != tuple(p.placements) and is_dtensor(p)
            and v.device_mesh == p.device_mesh):
        # a state of the parameter's own layout (moments) saved under other placements (re-sharded between save and
        # load: Shard(0) -> Shard(1) or Replicate(), fully_shard applied again): exactly this shard's piece of it
        # (a collective: every rank loads the same entries in the same order)
        v = v.redistribute(p.device_mesh, p.placements)
    t = v.to_local()
    lp = local(p)
    if t.shape != local_shape:
        t = t[0] if t.dim() == len(local_shape) + 1 and t.shape[0] == 1 else t
    if (t.shape != local_shape and t.dim() == 1 == len(local_shape) and lp.dim() >= 2 and t.shape[0] == lp.shape[0]
            and 0 < local_shape[0] < t.shape[0] and t.shape[0] % local_shape[0] == 0):
        t = blocks_of_rows(t, local_shape[0], key, p)  # one number per row -> one per block of rows
    if t.shape != local_shape:
        placed = ""
        if is_dtensor(p) and tuple(v.placements) != tuple(p.placements):
            placed = (f"; saved under placements {tuple(v.placements)} over a mesh of shape {tuple(v.device_mesh.shape)},"
                      f" the parameter is {tuple(p.placements)} over {tuple(p.device_mesh.shape)}: re-sharded between"
                      " save and load")
        raise ValueError(
            f"state '{key}' of a sharded parameter of shape {tuple(p.shape)}: loaded piece {tuple(t.shape)},"
            f" expected {tuple(local_shape)} (per-shard state loads onto the same number of shards only{placed})"
        )
    return t


# ---- the placements a per-shard state was saved under (docs/distributed.md, "Re-sharded parameters") ----

#: The entry of a sharded parameter's state in :meth:`LowMemOptimizer.state_dict` that records the placements and
#: device mesh its per-shard state was saved under (:func:`placement_record`); written only where the parameter has
#: per-shard state (:func:`record_placement`), read and removed by ``load_state_dict`` (:func:`check_saved_placement`).
PLACEMENT_KEY = "shard_placement"

# the kinds of placement in a record (a row's second number)
_REPLICATE, _SHARD, _STRIDED, _PARTIAL, _OTHER = range(5)

#: The rows of a record (:func:`placement_record`): mesh dimensions at most. One shape for every mesh, so that DCP,
#: which loads a plain tensor into the target's tensor of the same shape, loads a record saved on another mesh (HSDP's
#: 2-D one onto a 1-D one) instead of refusing it as a "Size mismatch".
RECORD_ROWS = 8


def placement_record(p: Tensor) -> Tensor:
    """The placements and device mesh of sharded parameter ``p`` as an int64 tensor of shape ``(RECORD_ROWS, 4)``: one
    row ``[mesh size, kind, tensor dim, split factor]`` per mesh dimension (kind: 0 ``Replicate``, 1 ``Shard``, 2
    ``_StridedShard``, 3 ``Partial``, 4 another), then rows of zeros (a mesh size is never 0). A tensor, not a
    string: ``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint`` take it (its
    ``flatten_optimizer_state_dict`` takes tensors, ints, floats and dicts only); equal on every rank (DCP saves one
    copy).

    Raises:
        NotImplementedError: ``p``'s mesh has more than :data:`RECORD_ROWS` dimensions.
    """
    rows = []
    for size, pl in zip(p.device_mesh.shape, p.placements):
        factor = getattr(pl, "split_factor", None)
        if factor is not None or isinstance(pl, Shard):
            dim = pl.dim % p.dim() if p.dim() else pl.dim
            rows.append([size, _SHARD if factor is None else _STRIDED, dim, 1 if factor is None else int(factor)])
        else:
            rows.append([size, _REPLICATE if pl.is_replicate() else _PARTIAL if pl.is_partial() else _OTHER, 0, 1])
    if len(rows) > RECORD_ROWS:
        raise NotImplementedError(f"a sharded parameter of shape {tuple(p.shape)} on a device mesh of {len(rows)}"
                                  f" dimensions with per-shard state: its checkpoint records at most {RECORD_ROWS}")
    record = torch.zeros(RECORD_ROWS, 4, dtype=torch.int64)
    if rows:
        record[: len(rows)] = torch.tensor(rows, dtype=torch.int64)
    return record


def _rows(record: Tensor) -> list[list[int]]:
    """The mesh dimensions' rows of ``record`` (without its rows of zeros)."""
    return [r for r in record.tolist() if r[0] > 0]


def _record_text(record: Tensor) -> str:
    """A record of :func:`placement_record` as the parameter's placements read: ``(Shard(dim=0),) over a mesh of shape
    (2,)``."""
    rows = _rows(record)
    names = [("Replicate()", f"Shard(dim={d})", f"_StridedShard(dim={d}, sf={f})", "Partial()")[k] if 0 <= k < 4
             else "another placement" for _, k, d, f in rows]
    return f"({', '.join(names)}{',' if len(names) == 1 else ''}) over a mesh of shape {tuple(r[0] for r in rows)}"


def _pieces(record: Tensor) -> list[list[int]]:
    """The rows of ``record`` that cut the parameter into pieces, in mesh order (a ``Replicate`` mesh dimension, HSDP's
    outer one, holds copies of the same pieces: ``(Replicate(), Shard(0))`` over ``(2, 2)`` and ``(Shard(0),)``
    over ``(2,)`` give shard ``i`` the same piece, and DCP loads one checkpoint onto the other); empty when the
    piece is the whole parameter (every such dimension of size 1: one process)."""
    rows = [r for r in _rows(record) if r[1] != _REPLICATE]
    return [] if all(size == 1 for size, kind, _, _ in rows if kind in (_SHARD, _STRIDED)) else rows


def saved_per_shard(saved: Any, v: Any) -> bool:
    """Whether state tensor ``v`` of a sharded parameter was saved by :func:`state_to_dtensor` as one piece per shard
    (``saved``: a ``DTensor`` of one more dimension than ``v``, the shards stacked: quantized codes and scales,
    MicroAdam's window), which does not reshard with the parameter."""
    return is_dtensor(saved) and isinstance(v, Tensor) and saved.to_local().dim() == v.dim() + 1


def record_placement(saved: dict[str, Any], state: dict[str, Any], p: Tensor) -> dict[str, Any]:
    """``saved`` (``p``'s ``state`` converted for a checkpoint) with :data:`PLACEMENT_KEY` added when an entry is
    saved per shard (:func:`saved_per_shard`): what ``load_state_dict`` compares with the parameter's placements
    then (:func:`check_saved_placement`). State that reshards with the parameter carries its placements itself."""
    if any(saved_per_shard(saved[k], v) for k, v in state.items() if k in saved):
        saved[PLACEMENT_KEY] = placement_record(p)
    return saved


def check_saved_placement(record: Any, p: Tensor, entries: list[str], where: str, drop: str) -> None:
    """Refuse per-shard state (``entries``) of sharded parameter ``p`` saved under other placements or another device
    mesh (``record``: :func:`placement_record` at the save) than ``p``'s now: re-sharded between save and load
    (``Shard(0)`` -> ``Shard(1)``, ``fully_shard`` applied again), each shard's piece is that of another piece of the
    parameter even where it has the same size (an even split), and it cannot be moved onto the new shard exactly
    (quantization blocks and MicroAdam's window are made from the old piece's elements; rebuilding them would need
    every rank's piece, and re-quantize). Compared: the mesh dimensions that cut the parameter (:func:`_pieces`: a
    replicated one, HSDP's, only copies the pieces); a piece that was the whole parameter before and after (one
    process) is no change. ``where``: the parameter (its group, index and shape); ``drop``: how to drop its saved state.

    Raises:
        ValueError: ``record`` is not a record (naming what it is), or the placements differ: naming ``where``, the
            entries, both placements and meshes, and what to do.
    """
    if not isinstance(record, Tensor) or record.shape != (RECORD_ROWS, 4) or record.is_floating_point():
        raise ValueError(f"{where}: the loaded '{PLACEMENT_KEY}' is {_describe(record)}, expected an int64 tensor of"
                         f" shape ({RECORD_ROWS}, 4) (lowmem.optim.sharded.placement_record)")
    now = placement_record(p)
    record = record.detach().to("cpu", torch.int64)
    if _pieces(record) == _pieces(now):
        return
    raise ValueError(
        f"{where}: its per-shard state {sorted(entries)} (one piece per shard: quantized codes and scales, MicroAdam's"
        f" window) was saved with the parameter sharded as {_record_text(record)}, but it is sharded as"
        f" {_record_text(now)} now: it was re-sharded between save and load, and each shard's saved piece is that of"
        " another piece of it (it cannot be moved onto the new shard: it was made from the old piece's elements)."
        " Load the checkpoint with the parameter sharded as it was saved (the same placements and"
        f" mesh), or load it without this parameter's state ({drop}; its state is made afresh at its next step)")


def _describe(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return f"{type(v).__name__} {v!r:.60}"


# ---- older checkpoints through torch.distributed.checkpoint (saved before PLACEMENT_KEY) ----

_MISSING = "Missing key in checkpoint state_dict: "


def only_placement_missing(err: BaseException) -> bool:
    """Whether ``err``, a ``CheckpointException`` of ``torch.distributed.checkpoint.load``, says only that the
    checkpoint lacks :data:`PLACEMENT_KEY` entries the target state dict has: every failing rank's failure a
    ``RuntimeError`` "Missing key in checkpoint state_dict: <key>." whose key's last part is the record (a checkpoint
    saved before lowmem recorded it). Any other failure (another missing key, a size mismatch) is ``False``.
    DCP names the first missing key of each rank only: other keys missing as well fail the retry without the
    records (:func:`without_placement_record`) with their own name."""
    failures = getattr(err, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return False
    for failure in failures.values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        said = str(exc) if type(exc) is RuntimeError else ""
        if not (said.startswith(_MISSING) and said.rstrip(".").endswith("." + PLACEMENT_KEY)):
            return False
    return True


class without_placement_record:  # noqa: N801 - a context manager, named for what it does
    """``with without_placement_record(optimizer):`` its ``state_dict()`` leaves out :data:`PLACEMENT_KEY` (an
    instance attribute over the method, removed on exit): what a checkpoint saved before lowmem recorded the
    placements holds, so that ``torch.distributed.checkpoint`` loads such a checkpoint into a target built in the
    block (``get_optimizer_state_dict``, accelerate's ``load_fsdp_optimizer``) instead of refusing it ("Missing
    key"). ``load_state_dict`` then loads that per-shard state unchecked, with its one warning naming how many
    parameters (docs/distributed.md, "Re-sharded parameters")."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer

    def __enter__(self) -> Any:
        opt = self.optimizer
        if "state_dict" in vars(opt):
            raise RuntimeError(f"{type(opt).__name__}.state_dict is already replaced on this optimizer (nested"
                               " without_placement_record?)")
        original = opt.state_dict

        def state_dict() -> dict[str, Any]:
            sd = original()
            return {**sd, "state": {k: {e: v for e, v in s.items() if e != PLACEMENT_KEY}
                                    for k, s in sd["state"].items()}}

        opt.state_dict = state_dict
        return opt

    def __exit__(self, *exc: Any) -> None:
        del self.optimizer.__dict__["state_dict"]


def load_optimizer_dcp(model: Any, optimizer: Any, checkpoint_id: Any = None, *, key: str = "optimizer",
                       storage_reader: Any = None, options: Any = None) -> None:
    """Load ``optimizer``'s state saved with ``dcp.save({key: get_optimizer_state_dict(model, optimizer), ...})``:
    ``get_optimizer_state_dict`` (the target), ``torch.distributed.checkpoint.load`` of ``{key: target}`` from
    ``checkpoint_id`` / ``storage_reader``, ``set_optimizer_state_dict`` (``options``: their
    ``StateDictOptions``). A checkpoint saved before lowmem recorded the placements of per-shard state
    (:func:`only_placement_missing`) is loaded again from a target without the records
    (:func:`without_placement_record`): it loads unchecked, with ``load_state_dict``'s one warning. Every rank calls
    it (collectives); every other failure is raised as DCP raises it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def load() -> dict[str, Any]:
        target = {key: get_optimizer_state_dict(model, optimizer, options=options)}
        dcp.load(target, checkpoint_id=checkpoint_id, storage_reader=storage_reader)
        return target[key]

    try:
        osd = load()
    except CheckpointException as err:
        if not only_placement_missing(err):
            raise
        inner = getattr(optimizer, "optimizer", optimizer)  # (accelerate's AcceleratedOptimizer)
        with without_placement_record(inner):
            osd = load()
    set_optimizer_state_dict(model, optimizer, osd, options=options)


#: Recipes whose torch.optim counterpart keeps no step count (``torch.optim.SGD(momentum > 0)`` and
#: ``torch.optim.Muon``: ``momentum_buffer`` alone in a parameter's state) and whose update reads the count only as
#: "the first step or a later one" (SGD's undamped first buffer ``b_1 = g_1``; Muon's target step reads no count),
#: with the state entries such a checkpoint holds (:func:`torch_stepless_state`; AUDREF19 1).
TORCH_STEPLESS_STATE = {"sgd": frozenset({"momentum_buffer"}), "muon": frozenset({"momentum_buffer"})}


def torch_stepless_state(saved: dict[str, Any], expected: dict[str, Tensor], recipe: str) -> dict[str, Any]:
    """A parameter's loaded state ``saved`` of a torch.optim checkpoint that keeps no step count, completed with
    the ``'step'`` this optimizer keeps (``expected``: what it allocates, :func:`check_loaded_state`'s), for the
    recipes of :data:`TORCH_STEPLESS_STATE` when ``saved`` holds exactly their torch state (every other state is
    returned as it is, and a missing ``'step'`` stays refused: Adam's bias correction needs the true count).

    The number of steps torch took is not in its checkpoint: the count is set to 1, the least a momentum buffer
    implies (torch makes it at the first step), so the next step is a later one (``b <- mu b + (1 - dampening)
    g``, as torch's); these recipes' updates read nothing else of it. The count in this optimizer's state then
    counts from that load (1 + the steps since), not from the start of torch's run. A new dict: ``saved`` is
    the caller's checkpoint."""
    own = TORCH_STEPLESS_STATE.get(recipe)
    if own is None or "step" in saved or "step" not in expected or set(saved) != own or set(expected) != own | {"step"}:
        return saved
    return {**saved, "step": torch.ones((), dtype=expected["step"].dtype)}


def from_torch_muon_group(recipe: str, group: dict[str, Any], mine: dict[str, Any]) -> None:
    """A ``torch.optim.Muon`` checkpoint's parameter group (torch's ``load_state_dict`` made it the group's settings)
    under lowmem Muon's names, in place (AUDREF19 1): torch's ``eps`` is the Newton-Schulz floor, lowmem's
    ``ns_eps`` (lowmem's ``eps`` is its AdamW parameters' and keeps the constructor's value, ``mine``), and torch's
    ``adjust_lr_fn=None`` is ``'original'``. Recognised by torch's keys (``ns_steps``, ``eps``, ``adjust_lr_fn``)
    without lowmem Muon's own (``ns_eps``, ``betas``, ``adamw_lr_ratio``); any other group is left as it is."""
    if recipe != "muon" or not {"ns_steps", "eps", "adjust_lr_fn"} <= set(group) or {"ns_eps", "betas", "adamw_lr_ratio"} & set(group):
        return
    group["ns_eps"] = group.pop("eps")
    if "eps" in mine:
        group["eps"] = mine["eps"]
    if group["adjust_lr_fn"] is None:
        group["adjust_lr_fn"] = "original"


def kahan_default_load_hook(decided: list[int]) -> Any:
    """A ``load_state_dict`` pre-hook for the parameter groups whose ``kahan_summation`` the constructor decided from
    the parameters' dtype (``decided``: :func:`lowmem.optim.hparams.kahan_sum_groups`, torch-optimi's
    ``kahan_sum=None``), so that a checkpoint of the same run on parameters of another dtype loads with the state a
    fresh optimizer of these dtypes holds (tests/test_auditopt_robustness.py): a bfloat16 parameter whose saved state
    has no compensation (a float32 run's) starts one at zero (``kahan_comp``: what later write-backs round away), and
    a saved compensation of a parameter that is not bfloat16 now is dropped, with one warning (it holds less than
    half a bfloat16 ulp per element, what the bfloat16 weights had lost). The group takes its decided setting, not the
    checkpoint's. Groups of FSDP2 (DTensor) parameters, other group counts and settings given by the user are left
    to the load's own checks."""

    def hook(opt: Any, state_dict: dict[str, Any]) -> dict[str, Any] | None:
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(opt.param_groups):
            return None
        groups, state, dropped = [dict(g) for g in saved_groups], dict(state_dict.get("state", {})), 0
        for i in decided:
            mine, saved = opt.param_groups[i], groups[i]
            want = bool(mine.get("kahan_summation"))
            if (len(saved["params"]) != len(mine["params"]) or any(is_dtensor(p) for p in mine["params"])
                    or "kahan_summation" not in saved or saved["kahan_summation"] is want):
                continue
            saved["kahan_summation"] = want
            for pid, p in zip(saved["params"], mine["params"]):
                st = state.get(pid)
                if not st:
                    continue
                if want and p.dtype == torch.bfloat16 and "kahan_comp" not in st:
                    state[pid] = {**st, "kahan_comp": torch.zeros(p.shape, dtype=torch.bfloat16)}
                elif not want and "kahan_comp" in st:
                    state[pid] = {k: v for k, v in st.items() if k != "kahan_comp"}
                    dropped += 1
        if dropped:
            from lowmem._warn import warn_user

            warn_user(f"{opt.recipe.name}: load_state_dict: the checkpoint's Kahan compensation (kahan_comp) of {dropped}"
                      " parameter(s) that are not bfloat16 now is dropped (it holds less than half a bfloat16 ulp per"
                      " element, what the saved bfloat16 weights had lost)")
        return {**state_dict, "param_groups": groups, "state": state}

    return hook


def check_loaded_state(saved: dict[str, Any], expected: dict[str, Tensor], where: str) -> None:
    """A sharded parameter's loaded state, after :func:`state_from_dtensor`, against ``expected``
    (what the optimizer allocates for the shard, with the loaded settings: tensors, or shapes on the
    meta device): every entry present, a tensor of the same shape and dtype, and no other entry.

    A checkpoint passes through ``torch.distributed.checkpoint`` and torch's
    ``Optimizer.load_state_dict``, neither of which knows what a lowmem state must hold: an entry
    lost or ``None`` on the way, or a state saved by another optimizer, would otherwise load and
    fail (or train wrong) later.

    Raises:
        ValueError: Naming ``where`` (the parameter), the entry, what was expected and what was found.
    """
    for k, e in expected.items():
        want = f"{e.dtype} tensor of shape {tuple(e.shape)}"
        if k not in saved:
            raise ValueError(f"{where}: the loaded state has no '{k}' (expected a {want}): it was saved by another"
                             " optimizer or other settings, or lost on the way")
        v = saved[k]
        if not isinstance(v, Tensor) or v.shape != e.shape or v.dtype != e.dtype:
            hint = ""
            if k == "kahan_comp" and isinstance(v, Tensor) and v.shape == e.shape:
                hint = (" (kahan_summation's compensation is always bfloat16, as the bfloat16 parameter it compensates,"
                        " whatever state_dtype: the checkpoint's was saved or converted otherwise; cast it with"
                        " .to(torch.bfloat16) before loading)")
            elif isinstance(v, Tensor) and v.shape == e.shape and v.is_floating_point() and e.is_floating_point():
                # a torch.optim checkpoint of low-precision parameters keeps its moments in their dtype
                hint = (f" (state in another floating dtype: the optimizer's state_dtype chooses it, 'float32' /"
                        f" 'bfloat16' / 'param'; build it with the checkpoint's, e.g. state_dtype='param' for a"
                        f" torch.optim checkpoint of {v.dtype} parameters)")
            raise ValueError(f"{where}: loaded state '{k}' is {_describe(v)}, expected a {want}{hint}")
    extra = sorted(set(saved) - set(expected), key=str)
    if extra:
        raise ValueError(f"{where}: the loaded state has {extra}, which this optimizer does not keep for this"
                         f" parameter (it keeps {sorted(expected)}): it was saved by another optimizer or other settings")


def state_layout(init_state: Any, p: Tensor, group: dict[str, Any], projected: bool) -> dict[str, tuple]:
    """What the optimizer allocates for the sharded parameter ``p`` under ``group``'s settings
    (``init_state``: the engine's ``_init_state``, on the meta device, nothing allocated):
    ``{entry: (shape, dtype)}`` for the local shard and, when ``p`` is not projected, for the whole
    tensor too (a setting may shape the whole tensor's state but not this shard's: Adam-mini's
    ``head_dim`` when the shard keeps one ``v`` per row)."""
    shard: dict[str, Tensor] = {}
    init_state(torch.empty(local(p).shape, dtype=p.dtype, device="meta"), group, shard, key=p)
    out = {f"{k} (this shard)": (tuple(v.shape), v.dtype) for k, v in shard.items() if isinstance(v, Tensor)}
    if not projected:
        whole: dict[str, Tensor] = {}
        init_state(torch.empty(p.shape, dtype=p.dtype, device="meta"), group, whole)
        out.update({f"{k} (whole tensor)": (tuple(v.shape), v.dtype) for k, v in whole.items() if isinstance(v, Tensor)})
    return out


def check_same_settings(current: dict[str, Any], loaded: dict[str, Any], layout: Any, where: str) -> None:
    """The settings of a parameter group loaded from a checkpoint (torch's ``load_state_dict``
    replaces the group's with them) against the optimizer's own: the same keys (else it was saved by
    another optimizer), and the same state layout (``layout(group) -> {entry: (shape, dtype)}``,
    :func:`state_layout`): a checkpoint of another ``rank``, ``head_dim``, quantization or state
    dtype refuses instead of loading state of another shape or meaning. Settings that shape no state
    (the learning rate, betas, ...) load as torch loads them: the checkpoint's win.

    Raises:
        ValueError: Naming ``where``, the settings that differ and the state entries they change.
    """
    keys_now, keys_saved = set(current) - {"params"}, set(loaded) - {"params"}
    check_torch_flags(loaded, keys_now, where)
    keys_saved -= TORCH_GROUP_KEYS - keys_now  # (a torch.optim checkpoint's own flags, e.g. AdamW's amsgrad)
    # (keys no optimizer setting has, e.g. an LR scheduler's 'initial_lr', load as torch loads them)
    unknown, lacks = sorted((keys_saved - keys_now) & _setting_names()), sorted((keys_now - keys_saved) & _setting_names())
    if unknown or lacks:
        raise ValueError(
            f"{where}: the checkpoint's parameter group has settings {unknown} this optimizer does"
            f" not know and lacks {lacks}: it was saved by another optimizer")
    before, after = layout(current), layout(loaded)
    if before != after:
        entries = sorted(set(before) | set(after))
        diff = "; ".join(f"{e}: {after.get(e, 'none')} saved, {before.get(e, 'none')} here" for e in entries
                         if before.get(e) != after.get(e))
        _refuse_settings(current, loaded, where, f" ({diff})")


def _refuse_settings(current: dict[str, Any], loaded: dict[str, Any], where: str, diff: str) -> None:
    changed = {k: (loaded.get(k), current[k]) for k in sorted(set(current) - {"params"}) if _differs(loaded.get(k), current[k])}
    raise ValueError(
        f"{where}: the checkpoint was saved with other settings "
        + ", ".join(f"{k}={a!r} (this optimizer: {b!r})" for k, (a, b) in changed.items())
        + f" that change its state{diff}; build the optimizer with the checkpoint's settings")


_SETTINGS: set[str] = set()


#: Group keys of torch.optim's optimizers (AdamW's flags) that a torch checkpoint carries; resuming one
#: with the matching lowmem recipe (tests/test_optim_parity.py) is not "another optimizer's settings".
TORCH_GROUP_KEYS = frozenset({"amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
                              "decoupled_weight_decay"})


#: The values of torch.optim's flags under which a torch checkpoint's run is the lowmem recipe's update
#: (AdamW's defaults); another value changes the update and is refused on load (:func:`check_torch_flags`).
TORCH_FLAG_MEANING = {
    "maximize": (False, "torch's maximize=True ascends the objective (theta <- theta + lr * update); lowmem"
                        " optimizers minimize: negate the loss instead"),
    "amsgrad": (False, "torch's amsgrad=True divides by max_t sqrt(v_t) (Reddi et al. 2018); lowmem's Adam"
                       " divides by sqrt(v_t)"),
    "decoupled_weight_decay": (True, "torch.optim.Adam's weight_decay is L2 (g <- g + wd * theta, inside the"
                                     " moments); lowmem's is decoupled (theta <- theta - lr * wd * theta,"
                                     " Loshchilov & Hutter 2019)"),
}


def check_torch_flags(loaded: dict[str, Any], keys_now: set[str], where: str) -> None:
    """A torch.optim checkpoint's group flags that change the update (:data:`TORCH_FLAG_MEANING`) must
    have AdamW's default values when the recipe has no such setting: ``maximize=True`` would otherwise
    load and the run would descend where torch's ascended.

    Raises:
        ValueError: Naming the flag, its saved value and the only value this optimizer can honour.
    """
    for k, (ok, why) in TORCH_FLAG_MEANING.items():
        if k in keys_now or k not in loaded or loaded[k] == ok:
            continue
        if k == "decoupled_weight_decay" and not loaded.get("weight_decay"):
            continue  # coupled or decoupled, a zero decay is the same update
        raise ValueError(
            f"{where}: the checkpoint's parameter group has {k}={loaded[k]!r}, which this optimizer cannot"
            f" honour (valid: {k}={ok!r}, or a checkpoint without it): {why}")


def _setting_names() -> set[str]:
    """Every setting name of every registered optimizer (and the engine's)."""
    if not _SETTINGS:
        from .hparams import ENGINE_HPARAMS
        from .registry import optimizer_entries

        _SETTINGS.update(h.name for h in ENGINE_HPARAMS)
        for e in optimizer_entries():
            _SETTINGS.update(e.recipe.all_hparams() if e.recipe is not None else e.hparams)
    return _SETTINGS


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool((a == b).all()))
    return a != b


# ---- subspace projections of a shard of rows (GaLore, Fira, FRUGAL) ----
#
# FSDP2 gives each rank a block of rows G_s of the m x n gradient. The projector is replicated on
# every rank (computed from the whole G at a refresh, gathered once, or from the seed alone). Per
# step (GaLore, Algorithm 2, lines 6 and 10):
#   right side  R = G Q^T (m x r):   R_s = G_s Q^T, local; up: D_s Q, local;
#   left side   R = P^T G (r x n):   R = sum_s P_s^T G_s, one all-reduce of r x n; up: P_s D, local
#                                    (P_s: the shard's rows of P; "full" adds Q on the right: r x r);
#   columns     R = G[:, idx]:       R_s = G_s[:, idx], local (FRUGAL's column subspace).
# A row-sharded R keeps row-sharded moments (element-wise rules only); an all-reduced R is the
# same on every rank, and so are its moments (any rule: every rank does the same arithmetic).


def _projected_side(recipe: Any, group: dict[str, Any], shape: torch.Size) -> str:
    """``"right"`` / ``"left"`` / ``"full"`` for a basis, ``"columns"`` / ``"rows"`` / ``"flat"``
    for coordinates, from the parameter's **global** shape."""
    from .subspace import COORDINATE_METHODS

    P = recipe.projection
    if group["projection"] in COORDINATE_METHODS:
        dim = P._coordinates(shape, group)[0]
        return {1: "columns", 0: "rows", None: "flat"}[dim]
    return P._side(shape, group)


def low_is_sharded(recipe: Any, group: dict[str, Any], p: Tensor) -> bool:
    """Whether the projected gradient of sharded ``p`` is sharded by rows like ``p`` (right-side
    basis, columns) rather than all-reduced and replicated (left / full basis)."""
    return _projected_side(recipe, group, p.shape) in ("right", "columns")


def coordinate_refusal(recipe: Any, group: dict[str, Any], shape: torch.Size) -> str | None:
    """The part of :func:`projected_refusal` that reads only the whole ``shape`` of a projected 2-D parameter (a
    :class:`~lowmem.optim.subspace.SubspaceProjection`), so it can be asked before the model is sharded or loaded
    (``lowmem train``'s meta build, :func:`lowmem.train.check_optimizer_on_meta`): a row or flat coordinate subspace
    (FRUGAL's ``rows``, left ``blocks``, ``randk``) selects rows or elements of the whole matrix; a column subspace
    with ``moment_policy='rotate'`` scatters the whole matrix. ``None`` otherwise."""
    side = _projected_side(recipe, group, shape)
    if side in ("rows", "flat"):
        return (f"its coordinate subspace '{group['projection']}' selects rows or elements of the whole matrix"
                " (only column subspaces are shard-local)")
    if side == "columns" and group["moment_policy"] == "rotate":
        return "moment_policy='rotate' of a coordinate subspace scatters the whole matrix"
    return None


def projected_refusal(recipe: Any, group: dict[str, Any], p: Tensor) -> str | None:
    """Why the projected 2-D parameter ``p`` (sharded by rows) cannot be stepped, or ``None``."""
    from .moments import AdamMoments, FactoredMoments, constant_lr
    from .quantized import Quantized
    from .stabilizers import RestartBiasCorrection
    from .subspace import DropResidual, FiraResidual, ProjectBack, StateFreeResidual, SubspaceProjection

    if not isinstance(recipe.projection, SubspaceProjection):
        return f"its projection {type(recipe.projection).__name__} is not known to work on a shard of rows"
    why = coordinate_refusal(recipe, group, p.shape)
    if why is not None:
        return why
    side = _projected_side(recipe, group, p.shape)
    combine = recipe.combine
    from .recipes.alice import AliceCompensation
    from .recipes.apollo import ApolloScaling
    from .recipes.subset_norm import SubsetNormStep

    if isinstance(combine, SubsetNormStep):  # the Subset-Norm step of the combined direction (SNSM)
        from .functional.subset_norm import subset_dim

        if group["subset_norm"] and subset_dim(p.shape) == 0 and _one_row_shard(p):
            return "a one-row shard of a column-normalised weight would read as element-wise statistics"
        combine = combine.inner
    if not (isinstance(combine, (ApolloScaling, AliceCompensation)) or (isinstance(combine, ProjectBack) and isinstance(
            combine.residual, (DropResidual, StateFreeResidual, FiraResidual)))):
        return (f"its combine-back {type(combine).__name__} reads norms of the whole matrix and is not"
                " reduced over the shards yet")
    if recipe.stabilizers:
        return "stabilizers before a projection are not reduced over the shards"
    if recipe.lr_rule is not constant_lr and recipe.lr_rule not in sharded_lr_rules():
        return "its step size reads the whole parameter"
    moment = recipe.moment
    while isinstance(moment, (RestartBiasCorrection, Quantized)):
        if isinstance(moment, Quantized) and group.get("v_normalization", "block") == "rank1":
            return "rank-1 normalization uses column maxima over all rows"
        moment = moment.inner
    from .recipes.subset_norm import SubsetNormMoments

    if type(moment) is SubsetNormMoments:  # under a projection it keeps the momentum of R only: element-wise
        moment = AdamMoments()
    if side in ("right", "columns") and not isinstance(moment, AdamMoments) and not (
            isinstance(moment, FactoredMoments) and moment is recipe.moment):
        return (f"its moment rule {type(moment).__name__} would need statistics over the rows of the projected"
                f" gradient, which is sharded by rows for a {side} projection (use proj_type='left')")
    if not isinstance(moment, (AdamMoments, FactoredMoments)):
        return f"its moment rule {type(moment).__name__} is not known to work on a projected shard"
    return None


class ShardedProjection:
    """A :class:`~lowmem.optim.subspace.SubspaceProjection` seen from one rank's rows ``[start,
    stop)`` of an ``m x n`` parameter: the ``projection`` argument of the combine-back rules
    (``down`` / ``up`` of the shard) and the refresh's whole gradient (:meth:`whole_gradient`).
    Built per step; holds no tensors of its own (the bases are in the optimizer's state, whole)."""

    def __init__(self, inner: Any, reduce: ShardReduce, rows: tuple[int, int], shape: torch.Size, side: str):
        self.inner, self.reduce, self.rows, self.shape, self.side = inner, reduce, rows, shape, side

    def low_shape(self, group: dict[str, Any]) -> torch.Size:
        """Shape of this rank's projected gradient."""
        low = self.inner.low_shape(self.shape, group)
        return torch.Size((self.rows[1] - self.rows[0], low[1])) if self.side in ("right", "columns") else low

    def whole_gradient(self, g: Tensor, group: dict[str, Any]) -> Tensor:
        """The gradient a refresh reads: gathered from every shard for a data-dependent basis (svd,
        rsvd: one all-gather of the ``m x n`` matrix per refresh), else a zero-size stand-in of the
        whole shape (random bases and coordinates read only the shape and the seed)."""
        from .subspace import DATA_DEPENDENT

        if group["projection"] in DATA_DEPENDENT or self.inner.refresh_checks_usable(group):  # (alice's refresh)
            return self.reduce.gather_rows(g, self.shape[0])
        return g.new_zeros(()).expand(self.shape)

    def down(self, g: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> Tensor:
        from .functional import frugal as FR
        from .functional import galore as GL

        if self.side == "columns":
            return FR.select(g, 1, state["proj_index"])
        left, right = state.get("proj_left"), state.get("proj_right")
        low = GL.project_down(g, None if left is None else left[self.rows[0] : self.rows[1]], right)
        if left is not None:  # P^T G = sum over shards of P_s^T G_s
            self.reduce.sum_(low)
        return low

    def up(self, d: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> Tensor:
        from .functional import frugal as FR
        from .functional import galore as GL

        if self.side == "columns":
            return FR.scatter(d, 1, state["proj_index"], torch.Size((self.rows[1] - self.rows[0], self.shape[1])))
        left, right = state.get("proj_left"), state.get("proj_right")
        return GL.project_up(d, None if left is None else left[self.rows[0] : self.rows[1]], right)


def fira_factor(d_low: Tensor, low: Tensor, side: str, eps: float = 1e-8) -> Tensor:
    """Fira's norm-based scaling factor (Chen et al. 2024, eq. 7-8, column-wise as fira 1.0.2):
    ``||psi(R)|| / ||R||`` along the low-rank dimension, chosen from the **global** shape (a shard's
    ``m_s x r`` block may have fewer rows than ``r``): per row of a right-side ``m x r`` gradient
    (row-local), per column of a left-side ``r x n`` one (replicated). Broadcasts against the
    residual's rows."""
    if side in ("right", "columns"):
        return (d_low.norm(dim=1) / (low.norm(dim=1) + eps)).unsqueeze(1)
    return d_low.norm(dim=0) / (low.norm(dim=0) + eps)


def combine_direction(combine: Any, g: Tensor, low: Tensor, d_low: Tensor, state: dict[str, Tensor],
                      group: dict[str, Any], sp: ShardedProjection) -> Tensor:
    """The combine-back (``scale * P.up(d_low) + residual``) of a shard of rows: GaLore's and
    FRUGAL's residuals are row-local; Fira's scaling factor is too (:func:`fira_factor`), and its
    norm-growth limiter (eq. 9) reads the norm of the whole scaled residual: one all-reduce of its
    sum of squares."""
    from .functional import fira as FI
    from .recipes.apollo import ApolloScaling
    from .subspace import FiraResidual

    from .recipes.subset_norm import SubsetNormStep

    from .recipes.alice import AliceCompensation

    if isinstance(combine, AliceCompensation):  # (its reductions: AliceCompensation.sharded_direction)
        return combine.sharded_direction(g, low, d_low, state, group, sp)
    if isinstance(combine, ApolloScaling):
        return apollo_direction(combine, g, low, d_low, state, group, sp)
    if isinstance(combine, SubsetNormStep):
        return subset_norm_step_direction(combine, g, low, d_low, state, group, sp)
    rule = combine.residual
    if not isinstance(rule, FiraResidual):
        return combine.direction(g, low, d_low, state, group, sp)
    c = rule.unit_scale(state, group) if rule.unit_scale is not None else 1.0
    d = sp.up(d_low, state, group)
    if group["scale"] != 1.0:
        d.mul_(group["scale"])
    scaled = sp.up(low, state, group).mul_(-group["scale"]).add_(g).mul_(fira_factor(d_low / c, low, sp.side))
    sq = sp.reduce.sum_(torch.linalg.vector_norm(scaled).square().view(1))
    limiter = FI.growth_limiter_(sq.sqrt()[0], state["fira_prev_norm"], group["gamma"])
    return d.add_(scaled.div_(limiter).mul_(c))


def subset_norm_step_direction(combine: Any, g: Tensor, low: Tensor, d_low: Tensor, state: dict[str, Tensor],
                               group: dict[str, Any], sp: ShardedProjection) -> Tensor:
    """Subspace-Momentum's Subset-Norm step (``SubsetNormStep``) for a shard of rows: the inner
    combined direction of the shard's rows divided by the subset norms of ``G``: per row or per
    element (the shard's own statistics, allocated for its rows), or per column (the column sums of
    ``g^2`` all-reduced: ``n`` numbers per matrix per step)."""
    from .functional import subset_norm as SN
    from .recipes.subset_norm import _ema_stored_, _sn_update_, _subset_layout

    u = combine_direction(combine.inner, g, low, d_low, state, group, sp)
    v, beta2 = state["sn_exp_avg_sq"], combine._beta2(group)
    if _subset_layout(v, g.numel()) == "column":
        sq = sp.reduce.sum_(SN.subset_sq_norms(g, 0))
        denom, g2 = SN.sn_denominator(_ema_stored_(v, sq, beta2), group["eps"]), g
    else:
        denom, g2 = _sn_update_(v, g, beta2, group["eps"])
    return u.view(g2.shape).div_(denom).mul_(combine._scale(state, group)).view(g.shape)


def apollo_direction(combine: Any, g: Tensor, low: Tensor, d_low: Tensor, state: dict[str, Tensor],
                     group: dict[str, Any], sp: ShardedProjection, eps: float = 1e-8) -> Tensor:
    """APOLLO's combine-back (Zhu et al. 2024, Algorithm 1 lines 8-10; ``ApolloScaling``) for a
    shard of rows: ``d = sqrt(scale) * limit(G_s * s)``. The channel-wise factor ``s`` is per row of a
    right-side ``R`` (row-local) or per column of a left-side one (replicated), the side taken from
    the global shape; APOLLO-Mini's tensor-wise ``||R~|| / ||R||`` sums the squares over the shards
    when ``R`` is sharded by rows (one all-reduce of 2 numbers); the norm-growth limiter reads
    ``||G * s||`` over the shards (one all-reduce of 1 number)."""
    from .functional import apollo as AP
    from .functional import fira as FI

    c = combine.unit_scale(state, group) if combine.unit_scale is not None else 1.0
    if group["scale_type"] == "tensor":
        sums = torch.stack([torch.linalg.vector_norm(d_low / c).square(), torch.linalg.vector_norm(low).square()])
        if sp.side in ("right", "columns"):
            sp.reduce.sum_(sums)
        factor = sums[0].sqrt() / (sums[1].sqrt() + eps)  # AP.tensor_scaling from the reduced sums
    else:
        factor = AP.channel_scaling(d_low / c, low, "right" if sp.side in ("right", "columns") else "left", eps)
    d = torch.mul(g, factor)
    if group["gamma"] is not None:
        sq = sp.reduce.sum_(torch.linalg.vector_norm(d).square().view(1))
        d.div_(FI.growth_limiter_(sq.sqrt()[0], state["apollo_prev_norm"], group["gamma"]))
    return d.mul_(c * math.sqrt(group["scale"]))


def osd_basis_grad(basis: Tensor, g: Tensor, low: Tensor, side: str, sp: ShardedProjection, inv_norm: Tensor) -> Tensor:
    """The gradient of Online Subspace Descent's PCA loss (Liang et al. 2024, eq. 5) in the whole
    basis, from a shard of rows, in the factored form of
    :func:`~lowmem.optim.functional.osd.pca_loss_grad` (``G_n = G / ||G||``):

    * right ``Q`` (``r x n``): ``C = G_n Q^T`` (the shard's rows: the step's ``low``), ``D = C^T G_n``
      and ``C^T C`` are sums over the shards (all-reduces of ``r x n`` and ``r x r``);
      ``dL/dQ = 2 ((Q Q^T - 2 I) D + C^T C Q)``, the same on every rank;
    * left ``P`` (``m x r``): ``A = P^T G_n`` is the step's all-reduced ``low``; ``B = G_n A^T`` has
      the shard's rows, so does ``dL/dP = 2 (P A A^T + B (P^T P - 2 I))``: its rows are all-gathered
      (``m x r``) so every rank updates the whole basis alike."""
    eye = torch.eye(basis.shape[1] if side == "left" else basis.shape[0], dtype=basis.dtype, device=basis.device)
    if side == "right":
        c = low * inv_norm
        d = sp.reduce.sum_((c.t() @ g).mul_(inv_norm))
        cc = sp.reduce.sum_(c.t() @ c)
        return 2 * ((basis @ basis.t() - 2 * eye) @ d + cc @ basis)
    a = low * inv_norm
    b = (g @ a.t()).mul_(inv_norm)
    rows = basis[sp.rows[0] : sp.rows[1]]
    return sp.reduce.gather_rows(2 * (rows @ (a @ a.t()) + b @ (basis.t() @ basis - 2 * eye)), basis.shape[0])


def sharded_post_update(g: Tensor, low: Tensor, state: dict[str, Tensor], group: dict[str, Any],
                        sp: ShardedProjection) -> None:
    """:meth:`SubspaceProjection.post_update` for a shard of rows: Online Subspace Descent's basis
    step (SGD or Adam on the basis) from :func:`osd_basis_grad`, with ``||G||`` summed over the
    shards (1 number); nothing for other methods."""
    from .functional.adam import adam_direction, adam_moments_
    from .functional.osd import basis_step_settings

    if group["projection"] != "online_pca":
        return
    meta = state["proj_meta"]
    pca_steps = int(meta[3])
    if pca_steps < 0:  # the step right after an SVD takes no PCA step (as unsharded)
        meta[3] = 0
        return
    norm = sp.reduce.sum_(torch.linalg.vector_norm(g).square().view(1)).sqrt()[0]
    if not bool(torch.isfinite(norm) & (norm > 0)):
        return
    key = "proj_left" if "proj_left" in state else "proj_right"
    basis = state[key]
    grad = osd_basis_grad(basis, g, low, "left" if key == "proj_left" else "right", sp, 1.0 / norm)
    lr, wd = basis_step_settings(group["proj_lr"], group.get("proj_weight_decay"), group["proj_optimizer"],
                                 group.get("lr"), group.get("initial_lr"))
    if group["proj_optimizer"] == "sgd":
        if wd:
            grad.add_(basis, alpha=wd)  # torch.optim.SGD's weight decay (element-wise: per shard)
        basis.add_(grad, alpha=-lr)
    else:
        t = pca_steps + 1
        meta[3] = t
        if wd:
            basis.mul_(1.0 - lr * wd)  # torch.optim.AdamW's decoupled decay, before the moments
        adam_moments_(state["pca_exp_avg"], state["pca_exp_avg_sq"], grad, 0.9, 0.999)
        basis.add_(adam_direction(state["pca_exp_avg"], state["pca_exp_avg_sq"], t, 0.9, 0.999, 1e-8), alpha=-lr)


def projected_state_to_dtensor(v: Any, p: Tensor, key: str, sharded_rows: bool,
                               reduced_dims: dict[str, int] | None = None) -> Any:
    """A state tensor of a projected sharded parameter for checkpoints: the projection's bases and
    bookkeeping (``proj_*``, Online Subspace Descent's ``pca_*`` moments of the basis) and the
    moments of an all-reduced projected gradient are equal on every rank and stay plain tensors
    (``torch.distributed.checkpoint`` saves one copy; they load onto any number of processes); the
    moments of a row-sharded projected gradient (``sharded_rows``: ``m_s x r``, float32) are
    ``DTensor`` s sharded on dimension 0 like the parameter (global ``m x r``), so they reshard, and
    so are its row statistics (``reduced_dims`` of the moment rule: Adafactor's ``exp_avg_sq_row``,
    global ``m``, and Alice's ``alice_p`` of a right basis, one per row) while its column statistics (the row
    dimension reduced away) are equal on every rank (plain); other per-shard state (quantized codes) is saved per
    shard (:func:`state_to_dtensor`). ``kahan_summation``'s compensation ``kahan_comp`` has the shard's shape,
    whichever side is projected: the parameter's placements (:func:`state_to_dtensor`)."""
    if key == "sn_exp_avg_sq" and isinstance(v, Tensor):  # SNSM's statistics of G's rows (not of R)
        return state_to_dtensor(v, p, key, "keepdim")
    if key == "kahan_comp" and isinstance(v, Tensor):  # (the weight's own layout, never replicated: a left side's too)
        return state_to_dtensor(v, p, key)
    # Plain (replicated) entries are given contiguous: a full state dict loaded with ``broadcast_from_rank0`` (accelerate's
    # FULL_STATE_DICT) broadcasts rank 0's tensor into a contiguous buffer on the other ranks, and a basis stored
    # transposed (an SVD's factor) arrived there in the wrong element order (AUDDIST21 4: every rank but 0 resumed with
    # another basis; measured 4.3e-3 on LoRA adapters after 2 resumed steps). (No copy when already contiguous.)
    if not isinstance(v, Tensor) or v.dim() == 0:
        return v
    if not sharded_rows or key.startswith(("proj_", "pca_")):
        return v.contiguous()
    # (alice's p of a right basis: one number per row of the shard, a row statistic of global (m,))
    reduced = 1 if key == "alice_p" else (reduced_dims or {}).get(key)
    if reduced is not None and reduced % 2 == 0:  # statistics over the rows: the same on every rank
        return v.contiguous()
    start, stop = shard_rows(p)
    if v.dim() in (1, 2) and v.shape[0] == stop - start and (v.dim() == 2 or reduced is not None):
        mesh, placements = p.device_mesh, tuple(p.placements)
        shape = torch.Size((p.shape[0], *v.shape[1:]))
        return DTensor.from_local(v, mesh, placements, run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())
    return state_to_dtensor(v, p, key)


def check_state_saves(opt: Any, model: Any, save_strategy: Any) -> None:
    """Under FSDP2, a checkpoint's optimizer state (``optimizer.state_dict()``, which accelerate's
    ``get_optimizer_state_dict`` calls for ``FULL_STATE_DICT`` and ``SHARDED_STATE_DICT`` alike) refuses per-shard
    state (8-bit / 4-bit codes, MicroAdam's window, Subset-Norm's flat subsets) of a parameter whose dimension 0 does
    not divide by the processes (:func:`lowmem.optim.sharded.state_to_dtensor`). The Trainer met that refusal at the
    first checkpoint, ``save_steps`` steps into the run, as a traceback on every rank (AUDDIST21 1; e.g. ``lowmem
    train``'s tiny Llama, vocabulary 73, with ``adamw8bit`` on 2 processes). Called by ``LowMemTrainer.training_step``
    once the optimizer holds state (after the first step, or after a resume's load) when the run saves checkpoints
    (``save_strategy`` not ``"no"``): the same ``state_dict()``, its refusal re-raised naming the parameters and what
    to do.

    Raises:
        ValueError: (:class:`lowmem.config.ConfigError`) naming the parameters, the number of processes,
            ``save_strategy`` and the ways out."""
    from lowmem.config import ConfigError

    from .engine import LowMemOptimizer

    strategy = getattr(save_strategy, "value", save_strategy)  # (transformers' SaveStrategy, or its string)
    if strategy == "no" or not isinstance(opt, LowMemOptimizer):
        return
    params = [p for g in opt.param_groups for p in g["params"]]
    if not any(is_dtensor(p) for p in params):
        return
    try:
        opt.state_dict()
    except NotImplementedError as err:
        names = {id(p): n for n, p in model.named_parameters()}
        uneven = []
        for p in params:
            if not (is_dtensor(p) and opt.state.get(p)):
                continue
            for i, pl in enumerate(p.placements):
                if pl.is_shard() and p.shape[pl.dim] % p.device_mesh.size(i) != 0:
                    uneven.append(f"{names.get(id(p), '?')} {tuple(p.shape)} (dimension {pl.dim} over "
                                  f"{p.device_mesh.size(i)} shards)")
                    break
        raise ConfigError(
            f"the optimizer's state could not be saved in a checkpoint (save_strategy={strategy!r}): {err}. Parameters "
            f"whose shards are uneven: {', '.join(uneven) or 'none found'}. Pad that dimension to a multiple of the "
            "number of processes (a vocabulary: model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8 * "
            "processes)), run on a number of processes that divides it, use an optimizer whose state reshards "
            "(adamw, galore_adamw, adafactor, ...: docs/distributed.md, Checkpoints), or save no checkpoints "
            "(save_strategy: no); refused after the first step, before the first checkpoint"
        ) from None
