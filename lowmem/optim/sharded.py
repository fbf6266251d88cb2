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
parameter's mesh; Adafactor's column sums, row-statistic mean, update RMS and parameter RMS), so the
result equals the unsharded step. Block-wise statistics (quantization
absmax, MicroAdam's top-k and error blocks) are computed per shard: equal to the unsharded run when
every shard's number of elements is a multiple of the block size (then the blocks are the same);
otherwise the blocks at shard boundaries differ (still a valid optimizer, but not the same numbers).

Recipes that need whole-matrix information not reduced here (projections, rank-1 normalization,
Newton-Schulz / Sinkhorn) are **refused** with a
``NotImplementedError`` naming the recipe and the supported ones, never run on a shard as if it
were the whole matrix. The check is an allow-list of engine parts (:func:`refusal`), so a new part
refuses until someone states that it is shard-local.
"""

from __future__ import annotations

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

    def __init__(self, groups: list[Any]):
        self.groups = groups

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


def shard_reduce(p: Tensor) -> ShardReduce:
    """The :class:`ShardReduce` over the mesh dimensions ``p`` (a ``DTensor``) is sharded on."""
    mesh = p.device_mesh
    return ShardReduce([mesh.get_group(i) for i, pl in enumerate(p.placements) if pl.is_shard()])


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
    from .moments import AdamMoments, FactoredMoments, adafactor_lr, constant_lr
    from .quantized import Quantized
    from .stabilizers import RestartBiasCorrection, SPAMStabilizer, StableSPAMStabilizer

    if recipe.projection is not None and group.get("rank") is not None and p.ndim == 2:
        return ("it projects 2-D parameters onto a subspace computed from the whole gradient matrix"
                " (a shard holds only some rows)")
    if recipe.lr_rule not in (constant_lr, adafactor_lr):  # adafactor_lr reduces the RMS over the shards
        return "its step size reads the whole parameter (relative step / RMS scaling)"
    moment = recipe.moment
    while isinstance(moment, (RestartBiasCorrection, Quantized)):
        if isinstance(moment, Quantized) and group.get("v_normalization", "block") == "rank1" and p.ndim >= 2:
            return "rank-1 normalization uses column maxima over all rows of the matrix"
        moment = moment.inner
    # element-wise rules, and Adafactor's factored rule (row statistics local, column sums and the
    # update's RMS all-reduced in FactoredMoments.prepare_chunks)
    if not isinstance(moment, (AdamMoments, MicroAdamMoments, FactoredMoments)):
        return f"its moment rule {type(moment).__name__} uses statistics of the whole tensor (e.g. row/column sums)"
    for s in recipe.stabilizers:
        if not isinstance(s, (SPAMStabilizer, StableSPAMStabilizer)):
            return f"its stabilizer {type(s).__name__} is not known to be shard-local"
    return None


def fsdp2_recipes() -> list[str]:
    """Registered engine optimizers that step FSDP2 parameters (subspace recipes are not listed:
    only their full-rank groups could)."""
    from .registry import optimizer_entries

    names = []
    probe = torch.empty(2, 2, device="meta")
    for e in optimizer_entries():
        r = e.recipe
        if r is None or r.projection is not None:
            continue
        group = {h.name: h.default for h in r.hparams}
        group.update(e.example_hparams)
        if refusal(r, group, probe) is None:
            names.append(e.name)
    return sorted(names)


def check_supported(recipe: Any, group: dict[str, Any], p: Tensor, where: str) -> None:
    """Raise if ``recipe`` cannot step the ``DTensor`` parameter ``p`` of ``group``.

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


# ---- checkpoints: state of a sharded parameter as DTensors (torch.distributed.checkpoint) ----


def state_to_dtensor(v: Any, p: Tensor, key: str, reduced_dim: int | None = None) -> Any:
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
    if reduced_dim is not None:
        d = reduced_dim % p.dim()
        if v.shape != lp.shape[:d] + lp.shape[d + 1:]:
            raise ValueError(f"state '{key}': shape {tuple(v.shape)} is not the shard's {tuple(lp.shape)} without dimension {d}")
        shape = p.shape[:d] + p.shape[d + 1:]
        # Shard(k): dimension k of the reduced tensor is k - 1 after d, gone (replicated) at d
        reduced = tuple(pl if not pl.is_shard() or pl.dim < d else Replicate() if pl.dim == d else Shard(pl.dim - 1)
                        for pl in placements)
        return DTensor.from_local(v, mesh, reduced, run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())
    shard_dims = [(i, pl.dim) for i, pl in enumerate(placements) if pl.is_shard()]
    if len(shard_dims) != 1 or p.shape[shard_dims[0][1]] % mesh.size(shard_dims[0][0]) != 0:
        raise NotImplementedError(
            f"state '{key}' of a sharded parameter of shape {tuple(p.shape)} with placements {placements}: per-shard"
            " state (quantized codes, MicroAdam) is checkpointed only for even shards on one mesh dimension"
            " (dimension 0 divisible by the number of shards)"
        )
    i = shard_dims[0][0]
    blob = tuple(Shard(0) if j == i else Replicate() for j in range(len(placements)))
    piece = v.unsqueeze(0)
    shape = (mesh.size(i), *v.shape)
    return DTensor.from_local(piece, mesh, blob, run_check=False, shape=shape, stride=torch.empty(shape, device="meta").stride())


def state_from_dtensor(v: Any, p: Tensor, local_shape: torch.Size, key: str) -> Any:
    """Inverse of :func:`state_to_dtensor`: the plain local tensor of shape ``local_shape`` (what the
    recipe allocates for ``p``'s shard) from a loaded ``DTensor`` (a plain tensor passes through).

    Raises:
        ValueError: The loaded piece does not have the shard's shape (e.g. per-shard state saved
            with another number of processes).
    """
    if not is_dtensor(v):
        return v
    t = v.to_local()
    if t.shape != local_shape:
        t = t[0] if t.dim() == len(local_shape) + 1 and t.shape[0] == 1 else t
    if t.shape != local_shape:
        raise ValueError(
            f"state '{key}' of a sharded parameter of shape {tuple(p.shape)}: loaded piece {tuple(t.shape)},"
            f" expected {tuple(local_shape)} (per-shard state loads onto the same number of shards only)"
        )
    return t
