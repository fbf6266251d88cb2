"""Adam-mini (Zhang et al. 2024): one second moment per block of parameters, about 4 bytes/param.

Adam keeps a second moment ``v`` (a learning rate ``lr / sqrt(v)``) for every parameter; Adam-mini
keeps one per *block*, cut along the dense sub-blocks of the Transformer's Hessian, and the first
moment as Adam. The partition (the paper's Section 2, as adam-mini 1.1.1 implements it) is chosen
per parameter from its name:

=====================================================  =============  ===========================
parameter (lower-cased name contains)                  ``block``      one second moment per
=====================================================  =============  ===========================
``bias``                                               ``element``    element (Adam)
query / key: ``q_proj k_proj wq wk query key``         ``head``       attention head (its rows)
embedding ``embed embd wte``, output ``lm_head output  ``row``        token (embedding and head),
final_layer``, value ``v_proj wv value``, attention                   output neuron (the others)
output ``o_proj wo attn.proj``, MLP ``feed_forward
linear mlp``; also the model's input and output
embeddings by module
anything else (norm weights, unnamed weights)          ``tensor``     tensor
=====================================================  =============  ===========================

A weight needs two or more dimensions for ``head`` and ``row`` (a vector is one block); a query /
key weight whose row count is not a multiple of ``head_dim`` (a LoRA ``A`` matrix) gets ``row``.
``create_optimizer(model, "adam_mini")`` builds these groups (:func:`adam_mini_groups`); the head
size comes from ``head_dim=`` or the model's config (``head_dim``, else ``hidden_size //
num_attention_heads``). Given plain parameters (no names), each tensor is one block (``block``'s
default, adam-mini's rule for parameters it cannot name); groups may set ``block`` themselves.
:class:`AdamMini` takes ``named_parameters`` and adam-mini's constructor arguments.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..._warn import warn_user
from .. import functional as F
from ..engine import LowMemOptimizer, Recipe
from .. import moments
from ..functional import adam_mini as AM
from ..functional.adam_mini import BLOCKS, adam_mini_direction, block_numel, block_second_moment_, first_moment_
from ..hparams import BETAS, EPS, LR, WEIGHT_DECAY, HParam, one_of, optional, positive_int
from ..moments import ChunkState, MomentRule, grad_element_bytes, sharded_group, state_dtype
from ..registry import decay_parameter_names, register

logger = logging.getLogger(__name__)

#: adam-mini 1.1.1's name keywords (substrings of the lower-cased parameter name), checked in this
#: order after ``bias``: query / key one block per head, then one block per row.
QUERY_KEY_NAMES = ("k_proj", "q_proj", "wq", "wk", "query", "key")
ROW_NAMES = (
    "embed", "embd", "wte",  # embeddings: one per token
    "lm_head", "output", "final_layer",  # output head: one per token
    "v_proj", "wv", "value",  # value: one per output neuron
    "o_proj", "wo", "attn.proj",  # attention output: one per output neuron
    "feed_forward", "linear", "mlp",  # MLP: one per output neuron
)


def partition_block(name: str, shape: torch.Size | tuple[int, ...], head_dim: int | None = None) -> str:
    """The ``block`` of a parameter called ``name`` (adam-mini 1.1.1's name rules, see the module
    docstring): ``"element"`` for biases, ``"head"`` for query / key weights whose row count
    (``shape[-2]``) is a multiple of ``head_dim``, ``"row"`` for the other named weights (and query /
    key weights that are not), ``"tensor"`` for everything else and for vectors."""
    n = name.lower()
    if "bias" in n:
        return "element"
    if len(shape) < 2:
        return "tensor"
    if any(k in n for k in QUERY_KEY_NAMES):
        return "head" if head_dim is not None and shape[-2] % head_dim == 0 else "row"
    if any(k in n for k in ROW_NAMES):
        return "row"
    return "tensor"


def model_head_dim(model: nn.Module) -> int | None:
    """Rows per attention head from ``model.config``: ``head_dim`` if set, else ``hidden_size //
    num_attention_heads``; ``None`` without a config that says."""
    config = getattr(model, "config", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None:
        return int(head_dim)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return None


def _groups(named: list[tuple[str, Tensor]], head_dim: int | None, decayed: set[str], weight_decay: float | None,
            row_ids: set[int] = frozenset()) -> list[dict[str, Any]]:
    """Parameter groups keyed by (block, decayed), in order of first appearance; each carries its
    ``block`` (and ``head_dim`` for heads), undecayed ones ``weight_decay=0``."""
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in named:
        block = partition_block(name, p.shape, head_dim)
        if block == "tensor" and id(p) in row_ids and p.ndim >= 2:
            block = "row"  # the model's embedding / output head under another name
        decay = name in decayed
        group = groups.get((block, decay))
        if group is None:
            group = groups[(block, decay)] = {"params": [], "name": f"adam_mini:{block}" + ("" if decay else ":no_decay"),
                                              "block": block}
            if block == "head":
                group["head_dim"] = head_dim
            if not decay:
                group["weight_decay"] = 0.0
            elif weight_decay is not None:
                group["weight_decay"] = weight_decay
        group["params"].append(p)
    return list(groups.values())


def adam_mini_groups(model: nn.Module, *, head_dim: int | None = None, weight_decay: float | None = None,
                     block: str | None = None, **_: Any) -> list[dict[str, Any]]:
    """Adam-mini's parameter groups for ``model`` (the registry's ``group_builder``): the partition of
    the module docstring from parameter names, plus the weights of ``get_input_embeddings()`` /
    ``get_output_embeddings()`` one block per token; weight decay by the Trainer's rule (none on
    biases and norm weights, :func:`~lowmem.optim.registry.decay_parameter_names`). Tied weights
    appear once; frozen ones are left out.

    Args:
        model: The model.
        head_dim: Rows per attention head of the query / key projections; default from
            :func:`model_head_dim`.
        weight_decay: For the decayed groups (``None``: the optimizer's default).
        block: Not accepted with a model (the partition is per parameter); pass parameter groups
            with their own ``block`` instead.

    Raises:
        ValueError: ``block`` given, or query / key weights found and no head size known.
    """
    if block is not None:
        raise ValueError(
            f"adam_mini: block={block!r} cannot apply to a whole model; the block of each parameter comes from its "
            "name (lowmem.optim.recipes.adam_mini). Pass parameter groups, each with its own 'block', to choose yourself"
        )
    if head_dim is not None:
        ADAM_MINI.all_hparams()["head_dim"].validate(head_dim, where="optimizer 'adam_mini'")
    named, seen = [], set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            named.append((name, p))
    query_key = [n for n, p in named if p.ndim >= 2 and "bias" not in n.lower() and any(k in n.lower() for k in QUERY_KEY_NAMES)]
    if head_dim is None:
        head_dim = model_head_dim(model)
        if head_dim is None and query_key:
            raise ValueError(
                f"adam_mini: {query_key[0]!r} is a query / key projection (one block per attention head) but the "
                "head size is unknown: pass head_dim= (rows per head) or use a model whose config has head_dim, or "
                "hidden_size and num_attention_heads"
            )
    if not query_key and getattr(getattr(model, "config", None), "num_attention_heads", None):
        warn_user(
            f"adam_mini: no query / key projection found in {type(model).__name__} (names containing one of "
            f"{list(QUERY_KEY_NAMES)}); its attention weights get one block per row or per tensor, not per head "
            "(adam-mini's default partition, which its authors note can be unstable on large Transformers)",
        )
    row_ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        mod = fn() if callable(fn) else None
        if isinstance(getattr(mod, "weight", None), Tensor):
            row_ids.add(id(mod.weight))
    return _groups(named, head_dim, decay_parameter_names(model), weight_decay, row_ids)


# ---- the moment rule -----------------------------------------------------------------------------


def _block_numel(shape: torch.Size, group: dict[str, Any]) -> int:
    return block_numel(shape, group["block"], group.get("head_dim"))


def _n_blocks(shape: torch.Size, group: dict[str, Any]) -> int:
    b, numel = _block_numel(shape, group), shape.numel()
    return numel // b if b else 0


def _row_layout(shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor] | None = None) -> bool:
    """Whether ``shape`` is an FSDP2 shard of a matrix of ``head`` blocks whose heads are cut by the
    shard boundaries (a head straddles a shard and its neighbour): its ``v`` then holds one entry per
    row, the second moment of the row's head (equal across the head's rows,
    :func:`straddling_heads_mean_square`). Read from ``state``'s ``v`` once it exists (one entry per
    row: a shard of whole heads among cut ones has it too, :meth:`AdamMiniMoments.init_state_sharded`),
    else from the shard's rows (only a shard can have a row count that is not a multiple of
    ``head_dim``: ``_check_group`` asks ``rows % head_dim == 0``)."""
    if group["block"] != "head" or len(shape) != 2:
        return False
    v = state.get("exp_avg_sq") if state else None
    if v is not None and shape[0] > 0 and group["head_dim"] > 1:
        return v.numel() == shape[0]
    return shape[0] % group["head_dim"] != 0


def _whole_straddles(key: Tensor, group: dict[str, Any]) -> bool:
    """Whether the ``head`` blocks of the sharded matrix ``key`` (a ``DTensor``, rows sharded:
    :func:`~lowmem.optim.sharded.straddling_heads_refusal`) are cut by its shard boundaries,
    ``ceil(rows / shards) % head_dim != 0`` (``torch.chunk``'s split, as :func:`straddles`)."""
    shards = math.prod(key.device_mesh.size(i) for i, pl in enumerate(key.placements) if pl.is_shard())
    return -(-key.shape[0] // shards) % group["head_dim"] != 0


def _local_block_numel(shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor] | None = None) -> int:
    """Elements per entry of ``v`` for a tensor (or a shard) of ``shape``: a row in the row layout
    (:func:`_row_layout`), else the block's."""
    return shape[-1] if _row_layout(shape, group, state) else _block_numel(shape, group)


def straddles(reduce: Any, group: dict[str, Any]) -> bool:
    """Whether the ``head`` blocks of an FSDP2 matrix (``reduce``: its :class:`~lowmem.optim.sharded.ShardReduce`,
    global shape and this rank's rows) are cut by its shard boundaries: ``ceil(rows / shards) %
    head_dim != 0`` (``torch.chunk``'s split). The same answer on every rank, so every rank joins
    the all-reduce of :func:`straddling_heads_mean_square` or none does."""
    if group["block"] != "head" or reduce.rows is None or len(reduce.shape) != 2:
        return False
    import torch.distributed as dist

    shards = math.prod(dist.get_world_size(g) for g in reduce.groups)
    return -(-reduce.shape[0] // shards) % group["head_dim"] != 0


def straddling_heads_mean_square(row_sq: Tensor, rows: tuple[int, int], shape: torch.Size, head_dim: int,
                                 reduce: Any) -> Tensor:
    """``mean(g_b * g_b)`` of every head ``b`` of an ``m x n`` matrix sharded by rows (Zhang et al.
    2024, Algorithm 1, the second-moment line, for blocks a shard holds only in part): this rank's
    row sums of squares ``row_sq`` (its rows ``[start, stop)``) added into the ``m / head_dim``
    heads, summed over the shards (one all-reduce of ``m / head_dim`` numbers), divided by the
    head's ``head_dim * n`` elements. Returns the ``m / head_dim`` means (the same on every rank)."""
    m, n = shape
    heads = row_sq.new_zeros(m // head_dim)
    heads.index_add_(0, torch.arange(rows[0], rows[1], device=row_sq.device) // head_dim, row_sq)
    return reduce.sum_(heads).div_(head_dim * n)


class AdamMiniMoments(MomentRule):
    """Adam's first moment and one second moment per block (Zhang et al. 2024, Algorithm 1).

    State: ``exp_avg`` (the parameter's shape) and ``exp_avg_sq`` (one entry per block, flat, in
    block order). The group's ``block`` (:data:`~lowmem.optim.functional.adam_mini.BLOCKS`) and
    ``head_dim`` say how the tensor is cut (:func:`~lowmem.optim.functional.adam_mini.block_numel`).

    Chunked step: chunk boundaries fall on whole blocks (rows, heads, elements); a whole-tensor
    block is reduced over the chunks first (:meth:`prepare_chunks`), then each chunk is stepped.

    Multi-tensor step (:meth:`foreach_step_`, float32 parameters and state): every block kind,
    :func:`~lowmem.optim.functional.adam_mini.adam_mini_foreach_` for a bucket (one kernel per
    operation; block means of tensors that share a block length in one reduction); a tensor larger
    than the engine's ``chunk_numel`` arrives in flat pieces and is stepped whole, chunked, from its
    first one (:func:`~lowmem.optim.moments.step_whole_from_piece_`).
    """

    state_keys = ("exp_avg", "exp_avg_sq")
    # FSDP2 checkpoints (lowmem.optim.sharded.state_to_dtensor): a per-row v of uneven shards of rows
    # (6 / 6 / 4 rows of 4-row heads) is saved as the rows of (rows,); other per-block v per shard
    reduced_dims = {"exp_avg_sq": "rows"}

    def init_state(self, state, shape, group, param):
        dtype = state_dtype(group, param)
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=param.device)
        state["exp_avg_sq"] = torch.zeros(_n_blocks(torch.Size(shape), group), dtype=dtype, device=param.device)

    def chunk_align(self, shape, group, state):
        if group["block"] == "tensor":
            return 1  # reduced over the chunks first (prepare_chunks)
        return max(1, _local_block_numel(shape, group, state))

    # FSDP2 (lowmem.optim.sharded): prepare_chunks takes ``reduce``; rows, elements and the heads of
    # a shard that holds whole heads are shard-local blocks; heads cut by the shard boundaries are
    # summed over the shards (prepare_chunks)
    sharded_stats = True

    def init_state_sharded(self, state, shape, whole_shape, group, param, key=None):
        """FSDP2: the shard's first moment and blocks; a whole-tensor block keeps its one ``v`` on
        every rank, also on an empty shard (a tensor with fewer rows than ranks), whose own element
        count would give it none. Heads cut by the shard boundaries (``key``: the ``DTensor``,
        :func:`_whole_straddles`): one ``v`` per row on every non-empty shard, also on one that holds
        whole heads among cut ones (e.g. 6 / 6 / 4 rows of 4-row heads: its layout is then read from
        ``v``, :func:`_row_layout`)."""
        self.init_state(state, shape, group, param)
        if group["block"] == "tensor":
            v = state["exp_avg_sq"]
            state["exp_avg_sq"] = torch.zeros(1, dtype=v.dtype, device=v.device)
        elif _row_layout(shape, group) or (group["block"] == "head" and len(shape) == 2 and shape[0] > 0
                                           and key is not None and _whole_straddles(key, group)):
            # heads cut by the shards' boundaries: one v per row (its head's)
            v = state["exp_avg_sq"]
            state["exp_avg_sq"] = torch.zeros(shape[0], dtype=v.dtype, device=v.device)

    def replicated_state(self, key, group):
        return key == "exp_avg_sq" and group["block"] == "tensor"  # one v for the whole tensor

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized, reduce=None):
        """A whole-tensor block: ``v <- beta2 v + (1 - beta2) mean(g * g)`` from the sum of squares
        over the chunks (one chunk's ``g^2`` at a time); the chunks then only read ``v``. ``reduce``
        (an FSDP2 shard): the sum of squares and the element count summed over the shards (2 numbers).
        Heads cut by the shard boundaries (:func:`straddles`): every head's mean over the shards
        (:func:`straddling_heads_mean_square`: one all-reduce of ``rows / head_dim`` numbers), each
        entry of this shard's ``v`` updated from its head's."""
        if reduce is not None and straddles(reduce, group):
            return self._prepare_straddling_heads(state, shape, group, bounds, stabilized, reduce)
        if group["block"] != "tensor":
            return None
        v = state["exp_avg_sq"]
        total = torch.zeros((), dtype=torch.float64 if v.dtype == torch.float64 else torch.float32, device=v.device)
        for start, stop in bounds:
            g = stabilized(start, stop, self.chunk_state(state, start, stop, shape, group))
            total.add_(g.to(total.dtype).square().sum())
            del g
        count = max(1, shape.numel())
        if reduce is not None:
            sums = reduce.sum_(torch.stack([total, total.new_tensor(float(shape.numel()))]))
            total, count = sums[0], sums[1].clamp(min=1)
        v32 = F.compute_float(v)
        block_second_moment_(v32, None, group["betas"][1], mean_square=total / count)
        if v32 is not v:
            v.copy_(v32)
        return True

    def _prepare_straddling_heads(self, state, shape, group, bounds, stabilized, reduce):
        """:meth:`prepare_chunks` of a shard of a matrix whose heads straddle the shards: its rows'
        sums of ``g^2`` (one chunk at a time), every head's mean over the shards, then ``v`` (one
        entry per row in the row layout, per head of a shard that holds whole heads)."""
        v = state["exp_avg_sq"]
        dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
        n, hd = shape[-1], group["head_dim"]
        row_sq = torch.zeros(shape[0], dtype=dtype, device=v.device)
        for start, stop in bounds:
            g = stabilized(start, stop, self.chunk_state(state, start, stop, shape, group))
            row_sq[start // n : stop // n] = g.to(dtype).view(-1, n).square().sum(dim=1)
            del g
        mean_sq = straddling_heads_mean_square(row_sq, reduce.rows, reduce.shape, hd, reduce)
        first = reduce.rows[0]
        if _row_layout(shape, group, state):
            local = mean_sq[torch.arange(first, first + shape[0], device=v.device) // hd]
        else:
            local = mean_sq[first // hd : first // hd + v.numel()]
        v32 = F.compute_float(v)
        block_second_moment_(v32, None, group["betas"][1], mean_square=local)
        if v32 is not v:
            v.copy_(v32)
        return True

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        view = ChunkState(state, start, stop, {"second_moment_done": ctx is True, "parent": state, "shape": shape})
        view["exp_avg"] = state["exp_avg"].view(-1)[start:stop]
        if group["block"] != "tensor":
            b = _local_block_numel(shape, group, state)
            view["exp_avg_sq"] = state["exp_avg_sq"][start // b: stop // b]
        return view

    def transient_bytes(self, numel, shape, group, state):
        """For ``numel`` elements in ``nb`` blocks (one for a whole-tensor block): ``g^2`` and its
        block means, or the step's block factors (three block vectors at most) and the direction,
        whichever is larger; with low-precision storage also float32 copies of both moments."""
        dtype = state["exp_avg"].dtype if "exp_avg" in state else torch.float32
        b = _local_block_numel(shape, group, state)
        nb = 1 if group["block"] == "tensor" else (numel // b if b else 0)
        size = 8 if dtype == torch.float64 else 4
        cast = self._cast_bytes(group, state, dtype) * numel
        work = max(size * max(numel + nb, 3 * nb), cast + (size * (numel + nb) if nb < numel else 0))
        if dtype not in (torch.float32, torch.float64):
            work += 4 * (numel + nb)
        return work

    @staticmethod
    def _cast_bytes(group, state, dtype) -> int:
        """Bytes per element of a float64 gradient's copy in the moments' precision (``g.to(m.dtype)`` in
        :func:`~lowmem.optim.functional.adam_mini.first_moment_` and
        :func:`~lowmem.optim.functional.adam_mini.block_second_moment_`, the sum of squares' ``g.to(total.dtype)``):
        4 beside float32 / bfloat16 moments (:func:`~lowmem.optim.moments.grad_element_bytes`: a group holding a
        float64 parameter), else 0. (Before 2026-11-30 uncounted: a float64 64 x 24 weight's chunk of 600, 2,408 B
        reported, 4,804 traced.)"""
        if dtype == torch.float64 or "exp_avg" not in state:
            return 0
        return 4 if grad_element_bytes(group, state["exp_avg"]) == 8 else 0

    #: The chunked step's phases count a low-precision parameter's float32 gradient and parameter chunks
    #: themselves (:meth:`chunk_transient_bytes` with ``copy=4``): a whole-tensor block's sum of squares holds
    #: the gradient chunk's copy alone, and the direction frees it before the parameter chunk's copy is made.
    chunk_counts_copies = True

    def chunk_transient_bytes(self, numel, shape, group, state, copy: int = 0):
        """The chunked step (the engine's ``_update_chunked``) with chunks of at most ``numel`` elements in
        ``nb`` blocks, exact, phase by phase (``copy``: bytes per element of the gradient and parameter chunks'
        float32 copies, 4 for a low-precision parameter, else 0; ``s``: 8 for float64 moments, else 4):

        * a whole-tensor block's :meth:`prepare_chunks`: a chunk's gradient copy and ``g^2`` beside the running
          0-d sum and the chunk's (``c n + s n + 2 s``);
        * the statistics (other blocks): the gradient copy, low-precision moments' float32 copies
          (``4 (n + nb)``), ``g^2`` and its block means (``s (n + nb)``; none for one block per element);
        * the direction (:func:`~lowmem.optim.functional.adam_mini.adam_mini_direction`): the same copies, the
          blocks' ``denom``, its reciprocal and the factors (``3 s nb``) or the direction beside the factors (``s (n + nb)``);
        * the update: the direction beside the parameter chunk's copy (``s n + c n``; the gradient's is freed)."""
        dtype = state["exp_avg"].dtype if "exp_avg" in state else torch.float32
        s = 8 if dtype == torch.float64 else 4
        b = _local_block_numel(shape, group, state)
        tensor = group["block"] == "tensor"
        nb = 1 if tensor else (numel // b if b else 0)
        held = copy * numel + (4 * (numel + nb) if dtype not in (torch.float32, torch.float64) else 0)
        cast = self._cast_bytes(group, state, dtype) * numel  # (a float64 gradient chunk's float32 copy)
        # (the cast is freed once squared, before the chunk's sum: beside the running sum, then the sum beside it)
        prepare = copy * numel + s + max(cast + s * numel, s * numel + s) if tensor else 0
        stats = cast + (0 if tensor or nb == numel else s * (numel + nb))
        direction = max(3 * s * nb, s * (numel + nb))
        return max(prepare, held + stats, held + direction, s * numel + copy * numel)

    def sharded_transient_bytes(self, shape, whole_shape, shards, group, state):
        """FSDP2, a shard of a matrix whose heads the shard boundaries cut (:meth:`_prepare_straddling_heads`): a
        bound, not traced (the engine adds the shard's float32 gradient copy): the chunked step
        (:meth:`chunk_transient_bytes`, the whole shard as one chunk at most), the row pass (a chunk's ``g^2`` and
        its row sums beside the shard's row sums, ``4 n + 8 R``) and the update of ``v`` (the row sums, every
        head's mean over the shards and the all-reduce's buffers, ``12 H``, the rows' head indices in int64 and
        their quotients, ``v``'s entries and a low-precision ``v``'s copy: ``32 R + 12 H``). Other shards:
        ``None`` (their own chunked step, :meth:`chunk_transient_bytes`)."""
        if (group["block"] != "head" or len(shape) != 2 or len(whole_shape) != 2
                or -(-whole_shape[0] // shards) % group["head_dim"] == 0):
            return None
        numel, rows, heads = math.prod(shape), shape[0], -(-whole_shape[0] // group["head_dim"])
        return max(self.chunk_transient_bytes(numel, shape, group, state), 4 * numel + 8 * rows, 32 * rows + 12 * heads)

    # ---- the multi-tensor step ----

    def supports_foreach_for(self, shape, group, state):
        """Every block kind, but a whole-tensor block of an FSDP2 (sharded) group: its mean over the
        whole tensor needs the shards' sums (:meth:`prepare_chunks` all-reduces them); nor a shard of
        heads cut by the shard boundaries (:func:`_row_layout`) or an empty one (it joins the
        all-reduce of the straddling heads). (Called for every parameter every step: the partition
        is read from ``v``'s size, as :meth:`direction` does.)"""
        if group["block"] == "head" and len(shape) == 2 and (shape[0] == 0 or _row_layout(shape, group, state)):
            return not sharded_group(group)
        return group["block"] != "tensor" or not sharded_group(group)

    def steps_pieces_whole(self, shape, group, state):
        """Always: a tensor in pieces is stepped whole from its first one (:meth:`foreach_step_`)."""
        return True

    #: bfloat16 parameters join the multi-tensor buckets (the engine's ``_step_bf16_bucket``): whole ones (this rule
    #: is not ``pieces_elementwise``), with float32 moments, stepped by :meth:`foreach_step_` on their and their
    #: gradients' float32 copies (its decay and update are the per-parameter step's operations), then written back
    bf16_bucket_steps_copies = True
    bf16_bucket_state_dtypes = (torch.float32,)

    def foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """A bucket's whole step (moments, decay before the update, update): whole tensors by
        :func:`~lowmem.optim.functional.adam_mini.adam_mini_foreach_`; a tensor that arrives in
        pieces (larger than ``chunk_numel``) whole from its first piece, chunked
        (:func:`~lowmem.optim.moments.step_whole_from_piece_`)."""
        whole = []
        for p, g, s in zip(params, grads, states):
            if isinstance(s, ChunkState):
                if s.start == 0:
                    moments.step_whole_from_piece_(self, p, g, s, group, t, lr, decay_after=False)
                continue
            whole.append((p, g, s))
        if whole:
            beta1, beta2 = group["betas"]
            ps, gs, ss = zip(*whole)
            AM.adam_mini_foreach_(list(ps), list(gs), [s["exp_avg"] for s in ss], [s["exp_avg_sq"] for s in ss],
                               t, beta1, beta2, lr, group.get("weight_decay", 0.0), group["eps"])

    def foreach_transient_bytes(self, numel):
        """A bound without the bucket's members: two float32 tensors of the bucket (every block of its
        own, :func:`~lowmem.optim.functional.adam_mini.adam_mini_foreach_bytes`); a tensor stepped from its
        pieces allocates :meth:`transient_bytes` of one chunk, less."""
        return 8 * numel

    def foreach_bucket_transient_bytes(self, numel, members, group=None):
        """A bucket of whole tensors: exactly what :func:`~lowmem.optim.functional.adam_mini.adam_mini_foreach_`
        allocates for its members (their elements and blocks, ``exp_avg_sq``'s size:
        :func:`~lowmem.optim.functional.adam_mini.adam_mini_foreach_bytes`; 4.75 bytes per element for
        the Qwen2 tiny bucket measured 2026-11-30, where the bound counted 8). A member that is a piece
        of a tensor (stepped whole from its first one, :meth:`foreach_step_`) or has no state yet: the
        bound :meth:`foreach_transient_bytes`."""
        sizes = []
        for n, st in members:
            m, v = st.get("exp_avg"), st.get("exp_avg_sq")
            if m is None or v is None or n != m.numel() or (n and not v.numel()):
                return self.foreach_transient_bytes(numel)  # (a shard holding no whole block: FSDP2's uneven split)
            sizes.append((n, v.numel()))
        if not sizes:
            return self.foreach_transient_bytes(numel)
        return AM.adam_mini_foreach_bytes(sizes, members[0][1]["exp_avg"].element_size())

    def direction(self, g, state, group, t, lr):
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        done = isinstance(state, ChunkState) and state.extra.get("second_moment_done", False)
        m32, v32 = F.compute_float(m), F.compute_float(v)
        first_moment_(m32, g, beta1)
        if not done:
            block_second_moment_(v32, g, beta2)
        if m32 is not m:  # low-precision storage: the EMAs in float32, stored rounded
            m.copy_(m32)
            if not done:
                v.copy_(v32)
        return adam_mini_direction(m32, v32, t, beta1, beta2, group["eps"])


# ---- the recipe ------------------------------------------------------------------------------------


def _check_group(group: dict[str, Any]) -> None:
    if group["block"] != "head":
        return
    head_dim = group.get("head_dim")
    if head_dim is None:
        raise ValueError("adam_mini: a group with block='head' needs head_dim (rows per attention head)")
    for p in group["params"]:
        if p.ndim < 2 or p.shape[-2] % head_dim:
            raise ValueError(
                f"adam_mini: block='head' with head_dim={head_dim} needs weights of 2 or more dimensions whose row count "
                f"(shape[-2]) is a multiple of head_dim; got a parameter of shape {tuple(p.shape)}"
            )


BLOCK = HParam(
    "block", "tensor", one_of(*BLOCKS), f"one of {', '.join(repr(b) for b in BLOCKS)}",
    "the blocks that share one second moment: 'element' (Adam), 'row' (one per row of the last dimension),"
    " 'head' (head_dim rows), 'tensor' (the whole tensor)",
)
HEAD_DIM = HParam("head_dim", None, optional(positive_int), "None or an int > 0", "rows per attention head (block='head')")

ADAM_MINI = Recipe(
    name="adam_mini",
    summary="Adam-mini: Adam's first moment, one second moment per block (head, row, tensor); ~4 bytes/param",
    reference="Zhang et al. 2024, Adam-mini: Use Fewer Learning Rates To Gain More, Algorithm 1 (partition of adam-mini 1.1.1)",
    moment=AdamMiniMoments(),
    hparams=(LR(1e-3), BETAS(), EPS(1e-8), WEIGHT_DECAY(0.0), BLOCK, HEAD_DIM),
    validate_group=_check_group,
)


def _no_decay_by_name(name: str) -> bool:
    """adam-mini 1.1.1's weight-decay rule: none for names containing ``norm``, ``ln`` or ``bias``."""
    n = name.lower()
    return "norm" in n or "ln" in n or "bias" in n


class AdamMini(LowMemOptimizer):
    """Adam-mini (Zhang et al. 2024) with the constructor of the adam-mini 1.1.1 package
    (``adam_mini.Adam_mini``), on the lowmem engine.

    Partitions ``named_parameters`` with adam-mini's name rules (the module docstring; head size
    ``dim // n_heads``) and its weight-decay rule (none for names containing ``norm``, ``ln`` or
    ``bias``); follows the package's trajectory to float32 precision (tested on Llama and Qwen2).
    State is float32 by default (``state_dtype``), ``exp_avg`` per element and ``exp_avg_sq`` per
    block. ``create_optimizer(model, "adam_mini")`` builds the same partition from a model.

    Args:
        named_parameters (`Iterable[tuple[str, nn.Parameter]]`): ``model.named_parameters()``.
        lr (`float`, defaults to `1e-3`): Learning rate.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): Moment decay rates, each in [0, 1).
        eps (`float`, defaults to `1e-8`): Added to ``sqrt(v_hat)`` of each block.
        weight_decay (`float`, defaults to `0.0`): Decoupled weight decay, ``p *= 1 - lr *
            weight_decay`` before the step, for every parameter but norms and biases.
        model_sharding (`bool` or `None`, defaults to `None`): Accepted for compatibility (deprecated
            in adam-mini, where it has no effect); sharded parameters are recognised by their type.
        dim (`int`, defaults to `2048`): Hidden size; ``dim // n_heads`` rows make one head.
        n_heads (`int`, defaults to `32`): Attention heads.
        n_kv_heads (`int` or `None`, defaults to `None`): Key / value heads (grouped-query
            attention); must divide ``n_heads``. Only checked: a key projection's heads are its rows
            divided by the head size.
        verbose (`bool`, defaults to `True`): Log the partition (number of parameters per block kind).
        state_dtype (`str`, defaults to `"float32"`): Storage of the moments: ``"float32"``,
            ``"bfloat16"`` or ``"param"``.
        foreach (`bool` or `None`, defaults to `None`): ``False`` steps one tensor at a time; otherwise
            float32 parameters with float32 state take the multi-tensor path.

    Raises:
        ValueError: Invalid ``dim`` / ``n_heads`` / ``n_kv_heads``, or anything but (name, parameter)
            pairs as ``named_parameters``.
    """

    recipe = ADAM_MINI

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, nn.Parameter]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        model_sharding: bool | None = None,
        dim: int = 2048,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        verbose: bool = True,
        state_dtype: str = "float32",
        foreach: bool | None = None,
    ):
        for key, value in (("dim", dim), ("n_heads", n_heads)):
            if not positive_int(value):
                raise ValueError(f"Invalid {key}={value!r} for AdamMini: expected an int > 0")
        if dim % n_heads:
            raise ValueError(f"Invalid dim={dim} for AdamMini: not a multiple of n_heads={n_heads}")
        if n_kv_heads is not None and not (positive_int(n_kv_heads) and n_heads % n_kv_heads == 0):
            raise ValueError(f"Invalid n_kv_heads={n_kv_heads!r} for AdamMini: expected None or an int > 0 dividing n_heads={n_heads}")
        named, seen = [], set()
        for item in named_parameters:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Tensor)):
                raise ValueError(
                    "AdamMini takes (name, parameter) pairs: pass model.named_parameters() (the partition is read from "
                    f"the names); got {type(item).__name__}. For plain parameters or groups use "
                    "create_optimizer(params, 'adam_mini') (one block per tensor unless a group sets 'block')"
                )
            name, p = item
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                named.append((name, p))
        decayed = {n for n, _ in named if not _no_decay_by_name(n)}
        groups = _groups(named, dim // n_heads, decayed, weight_decay)
        if verbose:
            logger.info("AdamMini partition: %s", {g["name"]: len(g["params"]) for g in groups})
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype,
                         foreach=foreach)


register(ADAM_MINI, state_precision="fp32", second_moment="blockwise", group_builder=adam_mini_groups)
