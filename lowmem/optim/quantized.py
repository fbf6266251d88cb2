"""Quantized storage of optimizer moments: 8-bit (Dettmers et al. 2022) and 4-bit (Li et al. 2023).

:class:`Quantized` wraps any :class:`~lowmem.optim.moments.MomentRule` (Adam's moments, or the
moments a subspace recipe keeps for its projected gradient) and stores the tensors it names in
low-bit form. Each step it decodes them to float32, lets the wrapped rule update them exactly as it
would in full precision, and encodes them again (Dettmers et al. 2022, Section 2: "dequantize,
update, quantize"). In ``state[p]`` a quantized moment ``k`` is two plain tensors:

* ``k``: the codes, ``uint8`` (``n`` bytes at 8 bits, ``ceil(n / 2)`` at 4 bits, flat);
* ``k + "_absmax"``: the per-block absolute maxima, ``float32`` (``ceil(n / block_size)`` values).

With rank-1 normalization (Li et al. 2023, Section 4.2; group key ``v_normalization="rank1"``,
for the key named by ``rank1_key``, tensors with ``ndim >= 2``) the scales are instead

* ``k + "_rowmax"`` and ``k + "_colmax"``: ``float32`` maxima over the last two dimensions
  (``shape[:-1]`` and ``shape[:-2] + shape[-1:]``, i.e. ``m + n`` values for a matrix).

So checkpoints stay tensors only, ``load_state_dict`` keeps the dtypes, and ``state_bytes()``
counts the compressed bytes. Tensors with fewer than ``min_quant_size`` elements stay float32
(bitsandbytes' ``min_8bit_size`` rule: tiny tensors gain nothing and lose the most precision).

Group keys read: ``block_size``, ``min_quant_size`` (see :func:`quant_hparams`) and, when the
wrapper has a ``rank1_key``, ``v_normalization`` (:data:`V_NORMALIZATION`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .functional import quant as Q
from .functional.subset_norm import foreach_scalar
from .hparams import HParam, one_of, positive_int
from . import functional as F
from .moments import ChunkState, MomentRule, sharded_group, step_whole_from_piece_
from . import bnb_fused


@dataclass(frozen=True)
class QuantSpec:
    """How one moment is stored.

    Attributes:
        bits: 8 or 4.
        code: Name of the code map (see :func:`lowmem.optim.functional.quant.code_map`).
    """

    bits: int
    code: str

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"QuantSpec bits must be 4 or 8, got {self.bits!r}")


# Dettmers et al. 2022 (bitsandbytes' Adam8bit): signed dynamic map for m, unsigned for v.
M1_8BIT = QuantSpec(8, "dynamic8_signed")
M2_8BIT = QuantSpec(8, "dynamic8_unsigned")
# Li et al. 2023: signed dynamic-exponent map for m; linear map without zero for v (Section 4.1).
M1_4BIT = QuantSpec(4, "dynamic4_signed")
M2_4BIT = QuantSpec(4, "linear4_nozero")


def block_size_hparam(default: int) -> HParam:
    return HParam(
        "block_size", default, one_of(*Q.VALID_BLOCK_SIZES), f"one of {Q.VALID_BLOCK_SIZES}",
        "values per quantization block (one float32 absmax each)",
    )


MIN_QUANT_SIZE = HParam(
    "min_quant_size", 4096, positive_int, "an int > 0",
    "tensors with fewer elements keep float32 moments (bitsandbytes' min_8bit_size)",
)


V_NORMALIZATION = HParam(
    "v_normalization", "block", one_of("block", "rank1"), "one of 'block', 'rank1'",
    "scales of the 4-bit second moment: per-block absmax, or rank-1 (min of row and column max,"
    " Li et al. 2023 Section 4.2) for tensors with ndim >= 2",
)


def quant_hparams(block_size: int) -> tuple[HParam, ...]:
    """The two hyperparameters every quantized-state recipe carries."""
    return (block_size_hparam(block_size), MIN_QUANT_SIZE)


# ---- storage helpers ------------------------------------------------------------------------


def is_quantized(state: dict[str, Tensor], key: str) -> bool:
    return key + "_absmax" in state or key + "_rowmax" in state


def is_rank1(state: dict[str, Tensor], key: str) -> bool:
    return key + "_rowmax" in state


def alloc_quantized(state: dict[str, Tensor], key: str, numel: int, spec: QuantSpec, block_size: int, device) -> None:
    """Zero codes and zero scales (decoding gives exact zeros, whatever the map)."""
    state[key] = torch.zeros(Q.packed_numel(numel, spec.bits), dtype=torch.uint8, device=device)
    state[key + "_absmax"] = torch.zeros(Q.num_blocks(numel, block_size), dtype=torch.float32, device=device)


def alloc_rank1(state: dict[str, Tensor], key: str, shape: torch.Size, device) -> None:
    """Zero 4-bit codes and zero row / column maxima (decoding gives exact zeros)."""
    state[key] = torch.zeros(Q.packed_numel(shape.numel(), 4), dtype=torch.uint8, device=device)
    state[key + "_rowmax"] = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
    state[key + "_colmax"] = torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32, device=device)


def decode(state: dict[str, Tensor], key: str, spec: QuantSpec, block_size: int, shape: torch.Size) -> Tensor:
    """The float32 value of quantized moment ``key``, in ``shape``."""
    code = Q.code_map(spec.code, state[key].device)
    if is_rank1(state, key):
        return Q.dequantize_rank1_4bit(state[key], state[key + "_rowmax"], state[key + "_colmax"], code,
                                       spec.code).view(shape)
    codes, absmax = state[key], state[key + "_absmax"]
    n = shape.numel()
    if spec.bits == 8:
        flat = Q.dequantize_blockwise_8bit(codes, absmax, code, block_size)
    else:
        flat = Q.dequantize_blockwise_4bit(codes, absmax, code, block_size, n, spec.code)
    return flat.view(shape)


def encode_(
    state: dict[str, Tensor], key: str, value: Tensor, spec: QuantSpec, block_size: int,
    rows: tuple[int, int] | None = None, col_max: Tensor | None = None,
) -> None:
    """Quantize ``value`` into the existing code and scale tensors of ``key`` (in place).

    Rank-1 storage in a chunk of whole rows: ``rows`` is the chunk's ``(rows, columns)`` shape
    and ``col_max`` the whole matrix's new column maxima; the stored column maxima are then left
    for the caller to write once every chunk is encoded (the other chunks still decode with them).
    """
    dst, src = encode_pending(state, key, value, spec, block_size, rows, col_max)
    if dst:
        torch._foreach_copy_(dst, src)  # (one multi-tensor kernel off the CPU, not one copy each)


def encode_pending(
    state: dict[str, Tensor], key: str, value: Tensor, spec: QuantSpec, block_size: int,
    rows: tuple[int, int] | None = None, col_max: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`encode_` without its final write: the state tensors and the new codes and scales to copy
    into them (empty when they were written in place: 4-bit blockwise codes into contiguous state), so that
    a caller encoding several moments writes them all back with one ``torch._foreach_copy_``."""
    code = Q.code_map(spec.code, value.device)
    if is_rank1(state, key):
        x = value if rows is None else value.view(rows)
        codes, row_max, new_col = Q.quantize_rank1_4bit(x, code, col_max, spec.code)
        dst = [state[key], state[key + "_rowmax"]] + ([state[key + "_colmax"]] if col_max is None else [])
        src = [codes, row_max.view(dst[1].shape)] + ([new_col] if col_max is None else [])
        return dst, src
    if spec.bits == 4 and state[key].is_contiguous() and state[key + "_absmax"].is_contiguous():
        Q.quantize_blockwise_4bit(value, code, block_size, spec.code, out=(state[key], state[key + "_absmax"]))
        return [], []  # (written in place: no copy of the codes and absmax)
    if spec.bits == 8:
        codes, absmax = Q.quantize_blockwise_8bit(value, code, block_size, spec.code)
    else:
        codes, absmax = Q.quantize_blockwise_4bit(value, code, block_size, spec.code)
    return [state[key], state[key + "_absmax"]], [codes, absmax]


def codec_bytes(numel: int, four: bool, rank1: bool, block_size: int | None = None) -> int:
    """The largest workspace of encoding one moment of ``numel`` values. 4-bit: float32 normalized values,
    then for the dynamic map's table lookup int32 table rows, float32 midpoints and a bool comparison,
    13 B per value; rank-1 normalization adds the broadcast ``min(r_i, c_j)`` scale, 16 B. 8-bit: the codes
    and absmax returned and, on CPU, the table quantizer's workspace (bitsandbytes' CUDA kernel needs none,
    so a CUDA report is that much high): with the group's ``block_size``, exactly what the CPU quantizer
    allocates (:func:`~lowmem.optim.functional.quant.table_quantize_bytes`: ``9 n + 4 nb`` in one pass);
    without it a bound for any block size (the codes and absmax at most 2 B per value, one pass of
    :func:`~lowmem.optim.functional.quant.table_workspace_bytes`, at most 1 MiB)."""
    if four:
        return (16 if rank1 else 13) * numel
    if block_size is not None:
        return Q.table_quantize_bytes(numel, block_size)
    return 2 * numel + Q.table_workspace_bytes(numel)


def apply_updates_foreach_(params: list[Tensor], directions: list[Tensor], lr: float | Tensor, weight_decay: float,
                           decay_after: bool) -> None:
    """The engine's per-parameter update of each tensor (decoupled weight decay before, or after, the step
    ``p -= lr d``: :func:`~lowmem.optim.functional.decoupled_weight_decay_`,
    :func:`~lowmem.optim.functional.apply_update_`) as multi-tensor ops, the same operations; a tensor
    ``lr`` (a scheduler's) takes the per-tensor forms."""
    if isinstance(lr, Tensor):
        for p, d in zip(params, directions):
            if not decay_after:
                F.decoupled_weight_decay_(p, lr, weight_decay)
            F.apply_update_(p, d, lr)
            if decay_after:
                F.decoupled_weight_decay_(p, lr, weight_decay)
        return
    if weight_decay != 0 and not decay_after:
        torch._foreach_mul_(params, foreach_scalar(params, 1.0 - lr * weight_decay))
    torch._foreach_add_(params, directions, alpha=-lr)
    if weight_decay != 0 and decay_after:
        torch._foreach_mul_(params, foreach_scalar(params, 1.0 - lr * weight_decay))


# ---- the moment-rule wrapper ----------------------------------------------------------------


def _table_pass_bytes(numel: int, block_size: int) -> int:
    """The workspace of :func:`~lowmem.optim.functional.quant.quantize_blockwise_8bit_table` on ``numel`` values that
    are not whole blocks of ``block_size``: its passes over the whole blocks (:data:`~lowmem.optim.functional.quant.
    TABLE_PIECE` values at most, ``TABLE_PIECE_BYTES`` each), then the partial last block on its own, padded (the
    padded copy, 4 B a value, beside the pass's ``TABLE_PIECE_BYTES``). Traced: 35 values in blocks of 64, 768 B;
    1,200 values, 9,216 B (before 2026-12-01 counted as one pass over the padded blocks: 512 and 9,728 B)."""
    whole = numel - numel % block_size
    step = max(Q.TABLE_PIECE // block_size, 1) * block_size
    tail = (Q.TABLE_PIECE_BYTES + 4) * block_size if numel % block_size else 0
    return max(Q.TABLE_PIECE_BYTES * min(step, whole), tail)


class Quantized(MomentRule):
    """Store some of a moment rule's tensors quantized; the math is the wrapped rule's, in float32.

    Args:
        inner: The moment rule whose tensors are stored compressed (e.g. ``AdamMoments()``).
        specs: State key -> :class:`QuantSpec`; keys not listed keep the inner rule's storage.
            Listed tensors must have the (projected) gradient's shape, as Adam's moments do.
        rank1_key: A key of ``specs`` (4-bit, non-negative: the second moment) whose tensors with
            ``ndim >= 2`` use rank-1 normalization when the group sets ``v_normalization="rank1"``
            (Li et al. 2023, Section 4.2); ``None`` (default): block-wise absmax only. The
            storage, not the group, decides how a tensor is decoded, so a checkpoint keeps its format.

    The wrapped rule allocates its tensors first (on the meta device, so nothing is spent);
    listed tensors with at least ``group["min_quant_size"]`` elements are then allocated as codes
    and scales on the parameter's device. :meth:`reset` zeroes codes and scales, which decodes to
    exact zeros. :meth:`second_moment` decodes Adam's ``exp_avg_sq`` for SPAM's spike clipping.
    """

    def __init__(self, inner: MomentRule, specs: dict[str, QuantSpec], rank1_key: str | None = None):
        unknown = set(specs) - set(inner.state_keys)
        if unknown:
            raise ValueError(f"keys {sorted(unknown)} are not state keys of {type(inner).__name__}: {inner.state_keys}")
        if rank1_key is not None and (rank1_key not in specs or specs[rank1_key].bits != 4):
            raise ValueError(f"rank1_key={rank1_key!r} must name a 4-bit entry of specs: {sorted(specs)}")
        self.inner = inner
        self.specs = dict(specs)
        self.rank1_key = rank1_key
        self.applies_lr = inner.applies_lr
        self.foreach_decays_after = inner.foreach_decays_after  # the update is the inner rule's
        # (direction returns the inner rule's direction, after the encode: it holds no reference to the gradient)
        self.chunk_direction_is_new = inner.chunk_direction_is_new
        self.restarts_on_reset = inner.restarts_on_reset  # (its statistics, stored in fewer bits)
        rank1_keys = (rank1_key + "_rowmax", rank1_key + "_colmax") if rank1_key is not None else ()
        self.state_keys = tuple(inner.state_keys) + tuple(k + "_absmax" for k in specs) + rank1_keys
        # FSDP2 checkpoints (lowmem.optim.sharded.state_to_dtensor): row maxima sharded like the rows,
        # column maxima (all-reduced, equal on every rank) replicated
        self.reduced_dims = {**inner.reduced_dims, **({rank1_key + "_rowmax": -1, rank1_key + "_colmax": -2} if rank1_key else {})}

    def __repr__(self) -> str:
        bits = sorted({s.bits for s in self.specs.values()})
        return f"Quantized({type(self.inner).__name__}, bits={bits})"

    def init_state(self, state, shape, group, param):
        self._init_state(state, shape, group, param, math.prod(shape))

    def init_state_sharded(self, state, shape, whole_shape, group, param, key=None):
        """FSDP2: a local shard's moments are quantized exactly when the whole tensor's would be
        (``min_quant_size`` is compared with the whole parameter's size, so every rank and one
        process store the same tensors as codes)."""
        self._init_state(state, shape, group, param, math.prod(whole_shape))

    def _init_state(self, state, shape, group, param, whole_numel: int) -> None:
        """Allocate for a gradient of ``shape``; ``whole_numel``: the size of the whole tensor the
        listed moments (the gradient's shape) are part of, which ``min_quant_size`` is compared with."""
        probe: dict[str, Tensor] = {}
        meta_param = torch.empty(0, dtype=param.dtype, device="meta")
        self.inner.init_state(probe, shape, group, meta_param)
        for key, t in probe.items():
            spec = self.specs.get(key)
            if spec is None or whole_numel < group["min_quant_size"]:
                state[key] = torch.zeros(t.shape, dtype=t.dtype, device=param.device)
            elif key == self.rank1_key and t.dim() >= 2 and group.get("v_normalization", "block") == "rank1":
                alloc_rank1(state, key, t.shape, param.device)
            else:
                alloc_quantized(state, key, t.numel(), spec, group["block_size"], param.device)

    def _decoded(self, g, state, group) -> tuple[dict[str, Tensor], list[str]]:
        view = dict(state)
        quantized = [k for k in self.specs if is_quantized(state, k)]
        for k in quantized:
            view[k] = decode(state, k, self.specs[k], group["block_size"], g.shape)
        return view, quantized

    def direction(self, g, state, group, t, lr):
        if group.get("fused") is True and self._fusable(state):
            raise ValueError(
                "fused=True: this parameter's step has no fused form (an FSDP2 shard, or a recipe with"
                " stabilizers: the kernel updates the whole local tensor with the recipe's plain step); use fused=None or"
                " fused=False")
        view, quantized = self._decoded(g, state, group)
        d = self.inner.direction(g, view, group, t, lr)
        extra = state.extra if isinstance(state, ChunkState) else {}
        # off the CPU every moment's codes and scales are written back by one multi-tensor copy; on the CPU
        # each moment's right after its encoding (while they are in cache); the same bytes
        joint = Q.launch_bound(g.device)
        dst, src = [], []
        for k in quantized:
            dk, sk = encode_pending(state, k, view[k], self.specs[k], group["block_size"], extra.get("rows"),
                                    extra.get(("colmax", k)))
            if dk and not joint:
                torch._foreach_copy_(dk, sk)
            elif dk:
                dst += dk
                src += sk
            view[k] = None  # (the decoded moment is no longer needed once encoded: freed before the next one's)
        if dst:
            torch._foreach_copy_(dst, src)
        return d

    # ---- the multi-tensor direction of projected gradients (LowMemOptimizer's buckets) ----

    def supports_foreach_direction(self, group, state, param):
        """Decoded moments are float32: the inner rule's multi-tensor form runs on them when it has
        one for the unquantized ones (rank-1 scales: per tensor)."""
        if any(is_rank1(state, k) for k in self.specs):
            return False
        plain = {k: v for k, v in state.items() if not is_quantized(state, k)}
        return self.inner.supports_foreach_direction(group, plain, param)

    def foreach_direction(self, gs, states, group, t, lr):
        """:meth:`direction` of each tensor with the inner rule's multi-tensor form: the bucket's moments
        decoded (:meth:`_decoded_many`: gradients of whole blocks in one call per moment, the rest one
        tensor at a time), the inner rule's :meth:`~MomentRule.foreach_direction` on all of them, encoded
        again (one call per moment, one ``torch._foreach_copy_``): the same codes as one tensor at a time,
        a constant number of codec kernels per bucket (issue 15: was two per parameter and moment)."""
        views, encode = self._decoded_many(gs, states, group)
        ds = self.inner.foreach_direction(gs, views, group, t, lr)
        encode()
        return ds

    def foreach_direction_transient_bytes(self, numel):
        """Every listed moment of the bucket decoded (4 B each per element), the codec's workspace of
        one call for the whole bucket (:func:`codec_bytes`) and the inner rule's: a bound (22 B per element
        on 8-bit AdamW moments for 18 allocated, 29 on 4-bit for 25; :meth:`foreach_direction_bucket_transient_bytes`
        counts a bucket of 8-bit blockwise moments exactly, and of 4-bit ones on the CPU)."""
        four = any(s.bits == 4 for s in self.specs.values())
        return 4 * len(self.specs) * numel + codec_bytes(numel, four, False) + self.inner.foreach_direction_transient_bytes(numel)

    def foreach_direction_bucket_transient_bytes(self, members, block_size: int | None = None):
        """What :meth:`foreach_direction` allocates for a bucket of ``(shape, state)`` members whose quantized
        moments are all 8-bit blockwise, or all 4-bit (blockwise or rank-1): on the CPU
        :meth:`_four_bit_bucket_bytes`, elsewhere :meth:`_four_bit_joint_bytes`; otherwise
        :meth:`foreach_direction_transient_bytes`, a bound. 8-bit, in its
        phases (:meth:`_decoded_many`): the decoded moments (4 B per quantized element and moment) are alive
        throughout; next to them the inner rule's multi-tensor direction
        (:meth:`~lowmem.optim.moments.MomentRule.foreach_direction_bucket_transient_bytes`), then, beside the
        returned float32 directions (``4 N``), the encode: each member decoded alone (a partial last block)
        encoded and written back in turn (its codes, absmax and the table quantizer's pass), then the members of
        whole blocks one moment at a time, each moment's new codes and absmax kept until the one
        ``torch._foreach_copy_`` (``n_k + 4 n_k / B`` bytes) beside the next one's and its table pass
        (:func:`~lowmem.optim.functional.quant.table_workspace_bytes` of ``n_k`` values in whole blocks:
        ``TABLE_PIECE_BYTES min(TABLE_PIECE, n_k)``; on CUDA bitsandbytes' kernel needs none, a bound there).
        ``block_size``: the group's (:meth:`foreach_bucket_transient_bytes` knows it), which decides which members
        are decoded alone and the table pass over their padded blocks; ``None`` (the engine's projected buckets):
        taken from each member's values and blocks, the largest that fits (a bound for a member of one block)."""
        quantized = [(shape, st, k) for shape, st in members for k in self.specs if is_quantized(st, k)]
        if quantized and all(self.specs[k].bits == 4 for _, st, k in quantized):
            if all(Q.launch_bound(st[k].device) for _, st, k in quantized):
                return self._four_bit_joint_bytes(members, block_size)
            if all(st[k].device.type == "cpu" for _, st, k in quantized):
                return self._four_bit_bucket_bytes(members, block_size)
        if any(self.specs[k].bits != 8 or is_rank1(st, k) for _, st, k in quantized):
            return self.foreach_direction_transient_bytes(sum(math.prod(shape) for shape, _ in members))
        total = sum(math.prod(shape) for shape, _ in members)

        def codes_bytes(numel: int, st: dict[str, Tensor], k: str) -> int:  # (the new codes and absmax)
            return numel + st[k + "_absmax"].numel() * st[k + "_absmax"].element_size()

        def whole_blocks(numel: int, st: dict[str, Tensor], k: str) -> bool:
            if block_size is not None:
                return numel % block_size == 0
            # (numel = blocks x a valid block size: the group's, which the state does not hold, is taken to be it)
            blocks = st[k + "_absmax"].numel()
            return blocks > 0 and numel % blocks == 0 and numel // blocks in Q.VALID_BLOCK_SIZES

        decoded = 4 * sum(math.prod(shape) for shape, _, _ in quantized)
        encode = alone = 0
        batched: dict[str, list[tuple[int, dict[str, Tensor]]]] = {}
        for shape, st, k in quantized:
            numel = math.prod(shape)
            if whole_blocks(numel, st, k):
                batched.setdefault(k, []).append((numel, st))
            else:  # decoded and encoded alone: its table pass over its blocks (the largest block size they fit)
                blocks = st[k + "_absmax"].numel()
                size = block_size or max((b for b in Q.VALID_BLOCK_SIZES if -(-numel // b) == blocks),
                                         default=max(Q.VALID_BLOCK_SIZES))
                alone = max(alone, codes_bytes(numel, st, k) + _table_pass_bytes(numel, size))
        pending = 0
        for k in self.specs:  # (_decoded_many's order: the specs', one call per moment)
            if k not in batched:
                continue
            n_k = sum(n for n, _ in batched[k])
            new = sum(codes_bytes(n, st, k) for n, st in batched[k])
            encode = max(encode, pending + new + Q.TABLE_PIECE_BYTES * min(Q.TABLE_PIECE, n_k))
            pending += new
        inner = self.inner.foreach_direction_bucket_transient_bytes(
            [(shape, {k: v for k, v in st.items() if not is_quantized(st, k)}) for shape, st in members])
        return decoded + max(inner, 4 * total + max(alone, encode))

    def _four_bit_bucket_bytes(self, members, block_size: int | None = None) -> int:
        """:meth:`foreach_direction_bucket_transient_bytes` of a bucket whose quantized moments are all 4-bit
        (blockwise or rank-1) on the CPU: :meth:`_decoded_many`'s calls walked in its order on a ledger of
        what each allocates and frees (:class:`_Ledger`; the codecs' CPU forms, ``Q.launch_bound`` false):
        the decodes (members alone: a partial last block or an odd / batched rank-1 matrix; each moment's
        whole-block members together; rank-1 matrices of one shape stacked), the inner rule's multi-tensor
        direction next to the decoded moments, then, beside them and the returned directions (``4 N``), the
        encodes (the members alone written back in turn; each moment's whole-block codes and absmax, and each
        stack's codes and maxima, kept for the one ``torch._foreach_copy_``)."""
        led = _Ledger()
        alone, batched, stacked = [], {}, {}
        block = block_size or _bucket_block_size([(math.prod(shape), st[k + "_absmax"].numel()) for shape, st in members
                                                  for k in self.specs if is_quantized(st, k) and not is_rank1(st, k)])
        for i, (shape, st) in enumerate(members):
            shape = torch.Size(shape)
            for k in self.specs:
                if not is_quantized(st, k):
                    continue
                n = shape.numel()
                if is_rank1(st, k) and len(shape) == 2 and n % 2 == 0:
                    stacked.setdefault((k, shape), []).append(i)
                    continue
                if not is_rank1(st, k):
                    nb, b = st[k + "_absmax"].numel(), block
                    if n % b == 0:
                        batched.setdefault(k, []).append((n, nb))
                        continue
                    led.keep(_dequantize_4bit_bytes(led, n, nb, b))
                    alone.append((k, n, nb, b, None))
                else:
                    led.keep(_dequantize_rank1_bytes(led, n))
                    alone.append((k, n, 0, 0, shape))
        for k, parts in batched.items():
            n, nb = sum(x for x, _ in parts), sum(y for _, y in parts)
            cats = led.alloc((n // 2 + 4 * nb) if len(parts) > 1 else 0)  # (the codes' and absmax' torch.cat)
            led.keep(_dequantize_4bit_bytes(led, n, nb, n // nb))
            led.free(cats)
        for (k, shape), idx in stacked.items():
            n, rows = len(idx) * shape.numel(), len(idx) * shape[0]
            cats = led.alloc(n // 2 + 4 * rows + 4 * len(idx) * shape[1])  # (torch.cat of codes, torch.stack of maxima)
            led.keep(_dequantize_rank1_bytes(led, n))
            led.free(cats)
        total = sum(math.prod(shape) for shape, _ in members)
        inner = self.inner.foreach_direction_bucket_transient_bytes(
            [(shape, {k: v for k, v in st.items() if not is_quantized(st, k)}) for shape, st in members])
        led.peak = max(led.peak, led.live + inner)
        led.keep(led.alloc(4 * total))  # (the directions)
        for k, n, nb, b, shape in alone:
            if shape is None:
                _quantize_4bit_bytes(led, n, nb, b, self.specs[k].code, out=True)
            else:
                # (rank1_maxima: a maximum per row over the last dimension, per column over the one before)
                led.free(_quantize_rank1_bytes(led, n, n // shape[-1], n // shape[-2], self.specs[k].code))
        for k in self.specs:
            if k in batched:
                n, nb = sum(x for x, _ in batched[k]), sum(y for _, y in batched[k])
                led.keep(_quantize_4bit_bytes(led, n, nb, n // nb, self.specs[k].code, out=False))
        for (k, shape), idx in stacked.items():
            n = len(idx) * shape.numel()
            led.keep(_quantize_rank1_bytes(led, n, len(idx) * shape[0], len(idx) * shape[1], self.specs[k].code))
        return led.peak

    def _four_bit_joint_bytes(self, members, block_size: int | None = None) -> int:
        """:meth:`foreach_direction_bucket_transient_bytes` of a bucket whose quantized moments are all 4-bit off the
        CPU (:func:`~lowmem.optim.functional.quant.launch_bound`: :meth:`_decoded_joint`'s forms), walked on a
        ledger in :meth:`_decoded_many`'s order: the members alone decoded (as on the CPU); the one buffer of every
        other member's codes and scales, their ``int32`` lookup index, the blockwise moments' decoded values (one
        buffer, multiplied in place) and the rank-1 stacks' (one lookup; each stack's scale in turn), the buffer
        and index then freed; the inner rule's multi-tensor direction beside the decoded moments; then, beside
        them and the directions (``4 N``), the encodes with the device's codec forms (no ``|x|`` copy, the
        search's ``int32`` indices packed straight into ``uint8``): the members alone written back in turn, the
        blockwise moments' block absmax and clamp once and per moment the normalized values, the indices and
        the new codes (kept for the one write-back), the stacks' maxima (kept), one scale buffer divided in
        place, the indices and the codes. Measured on the CPU with the device's forms forced
        (tests/test_quant_bucket_joint.py)."""
        led = _Ledger()
        block = block_size or _bucket_block_size([(math.prod(shape), st[k + "_absmax"].numel()) for shape, st in members
                                                  for k in self.specs if is_quantized(st, k) and not is_rank1(st, k)])
        alone, batched, stacked = [], {}, {}
        for shape, st in members:
            shape = torch.Size(shape)
            n = shape.numel()
            for k in self.specs:
                if not is_quantized(st, k):
                    continue
                if is_rank1(st, k) and len(shape) == 2 and n % 2 == 0:
                    stacked.setdefault((k, shape), []).append(n)
                elif is_rank1(st, k):
                    led.keep(_dequantize_rank1_bytes(led, n))
                    alone.append((k, n, 0, 0, shape))
                elif n % block:
                    nb = st[k + "_absmax"].numel()
                    led.keep(_dequantize_4bit_bytes(led, n, nb, block))
                    alone.append((k, n, nb, block, None))
                else:
                    batched.setdefault(k, []).append(n)
        n4 = sum(sum(v) for v in batched.values())
        nr = sum(sum(v) for v in stacked.values())
        scales = 4 * (n4 // block) + 4 * sum(len(v) * (shape[0] + shape[1]) for (_, shape), v in stacked.items())
        if batched or stacked:
            buf = led.alloc(scales + (n4 + nr) // 2)
            ints = led.alloc(4 * ((n4 + nr) // 2))
            led.keep(led.alloc(4 * n4))  # (the blockwise moments' values, multiplied in place)
            led.keep(led.alloc(4 * nr))  # (the stacks' values)
            for (_, shape), v in stacked.items():
                led.free(led.alloc(4 * sum(v)))  # (each stack's scale)
            led.free(buf)
            led.free(ints)
        total = sum(math.prod(shape) for shape, _ in members)
        inner = self.inner.foreach_direction_bucket_transient_bytes(
            [(shape, {k: v for k, v in st.items() if not is_quantized(st, k)}) for shape, st in members])
        led.peak = max(led.peak, led.live + inner)
        led.keep(led.alloc(4 * total))  # (the directions)
        for k, n, nb, b, shape in alone:
            if shape is None:
                _quantize_4bit_bytes_joint(led, n, nb, b)
            else:
                rows, cols = n // shape[-1], n // shape[-2]
                maxima = led.alloc(4 * rows + 4 * cols)
                scale = led.alloc(4 * n)  # (min(r_i, c_j), then its clamp)
                clamp = led.alloc(4 * n)
                led.free(scale)
                normalized = led.alloc(4 * n)
                led.free(_packed_bytes_joint(led, n, None))
                led.free(normalized)
                led.free(clamp)
                led.free(maxima)
        if batched:
            led.keep(led.alloc(4 * (n4 // block)))  # (the block absmax, kept for the write-back)
            led.keep(led.alloc(4 * (n4 // block)))  # (its clamp)
            for k, v in batched.items():
                normalized = led.alloc(4 * sum(v))
                led.keep(_packed_bytes_joint(led, sum(v), None))
                led.free(normalized)
        if stacked:
            scale = led.alloc(4 * nr)
            for (_, shape), v in stacked.items():
                led.keep(led.alloc(4 * len(v) * (shape[0] + shape[1])))  # (the maxima, kept for the write-back)
            led.keep(_packed_bytes_joint(led, nr, None))
            led.free(scale)
        return led.peak

    # ---- the full-rank multi-tensor step (LowMemOptimizer's foreach buckets) ----

    def supports_foreach_for(self, shape, group, state):
        """The inner rule's multi-tensor direction runs on decoded moments (:meth:`foreach_step_`) when
        it has one for the unquantized ones. Not for FSDP2 groups (their per-parameter step keeps the
        whole tensor's quantization decision, :meth:`init_state_sharded`), nor for a tensor of more
        than two dimensions with rank-1 scales (its chunked form is per tensor: :meth:`chunk_align`)."""
        if sharded_group(group) or type(self.inner).foreach_direction is MomentRule.foreach_direction:
            return False
        if (self.rank1_key is not None and len(shape) > 2 and group.get("v_normalization", "block") == "rank1"
                and math.prod(shape) >= group["min_quant_size"]):
            return False
        plain = {k: v for k, v in state.items() if k in self.inner.state_keys and not is_quantized(state, k)}
        return self.inner.supports_foreach_for(shape, group, plain)

    def steps_pieces_whole(self, shape, group, state):
        """A tensor in pieces with quantized moments is stepped whole from its first one; unquantized
        moments' pieces take the inner rule's element-wise direction (:meth:`foreach_step_`)."""
        return any(is_quantized(state, k) for k in self.specs)

    def foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """The step of every tensor of a bucket (float32 parameters sharing ``t``), equal bit for bit to
        :meth:`direction` of each one followed by the engine's decay and update (the per-parameter step):

        * a piece of a tensor larger than ``chunk_numel`` with quantized moments: the whole tensor from
          its first piece (:func:`~lowmem.optim.moments.step_whole_from_piece_`: the engine's chunked
          step; rank-1 column maxima need every row before any is encoded);
        * the others: every quantized moment decoded (tensors of whole blocks in one call per moment,
          :func:`~lowmem.optim.functional.quant.dequantize_blockwise_cat`; the rest and rank-1 scales
          one tensor at a time), the inner rule's multi-tensor direction
          (:meth:`~lowmem.optim.moments.MomentRule.foreach_direction`), every moment encoded again (one
          call per moment, :func:`~lowmem.optim.functional.quant.quantize_blockwise_split`, written back
          by one ``torch._foreach_copy_``; off the CPU every code and scale tensor copied by one ``cat`` and
          the 4-bit codecs' common work done once for the bucket, :meth:`_decoded_joint`), then the decoupled
          decay and the update as multi-tensor ops."""
        ps, gs, ss = [], [], []
        for p, g, st in zip(params, grads, states):
            if self._fused_member_(p, g, st, group, t, lr):
                continue
            if isinstance(st, ChunkState) and "parent" in st.extra and any(is_quantized(st, k) for k in self.specs):
                if st.start == 0:
                    step_whole_from_piece_(self, p, g, st, group, t, lr, self.foreach_decays_after)
                continue
            ps.append(p)
            gs.append(g)
            ss.append(st)
        if not ps:
            return
        self._step_rest_(ps, gs, ss, group, t, lr)

    # ---- bfloat16 parameters in the multi-tensor buckets (the engine's ``_step_bf16_bucket``) ----

    #: the dtypes of the moments left unquantized (below ``min_quant_size``) the bucket takes: float32
    bf16_bucket_state_dtypes = (torch.float32,)

    def bf16_bucket_takes(self, p, group) -> bool:
        """Whether bfloat16 ``p`` may join the buckets: not where the group's ``fused`` may send it to bitsandbytes'
        fused 8-bit kernel (``fused`` not ``False``, and ``None`` on a CUDA device:
        :func:`~lowmem.optim.bnb_fused.use_fused` decides per parameter and state, which the engine's per-parameter
        step asks)."""
        fused = group.get("fused", False)
        return fused is False or (fused is None and p.device.type != "cuda")

    def bf16_bucket_direction(self, g32s, states, group, t, lr):
        """:meth:`direction` of a bucket of whole bfloat16 parameters: :meth:`_step_rest_`'s decode
        (:meth:`_decoded_many`), the inner rule's multi-tensor direction and encode on the gradients' float32 copies
        ``g32s`` (emptied at the end), the same codes and directions as the per-parameter step's. Returns the float32
        directions; allocates :meth:`bf16_bucket_transient_bytes`."""
        views, encode = self._decoded_many(g32s, states, group)
        ds = self.inner.foreach_direction(g32s, views, group, t, lr)
        encode()
        del views, encode
        g32s.clear()
        return ds

    def bf16_bucket_transient_bytes(self, numel, states, members=None, group=None):
        """:meth:`bf16_bucket_direction` of ``members`` (``(elements, state)``, ``numel`` elements): the gradients'
        float32 copies (4 B per element, alive to the end) beside what :meth:`foreach_step_` allocates for them
        (:meth:`foreach_bucket_transient_bytes` with ``group``: the walk of the codec calls, the inner rule's
        directions)."""
        if members is None or group is None:  # (the walk needs each member's state and the group's block size)
            raise TypeError("Quantized.bf16_bucket_transient_bytes needs members= and group=")
        return 4 * numel + self.foreach_bucket_transient_bytes(numel, members, group)

    def _step_rest_(self, ps, gs, ss, group, t, lr) -> None:
        """:meth:`foreach_step_`'s multi-tensor part: decode, the inner direction, encode, decay and update."""
        views, encode = self._decoded_many(gs, ss, group)
        ds = self.inner.foreach_direction(gs, views, group, t, lr)
        encode()
        del views, encode
        apply_updates_foreach_(ps, ds, lr, group.get("weight_decay", 0.0), self.foreach_decays_after)

    def foreach_prepare(self, params, grads, states, group, t, lr):
        """:meth:`foreach_step_` prepared ahead (the engine's ``_prepare_buckets``, before the step's device read):
        the per-member decisions now (bitsandbytes' fused kernel: :meth:`_fused_member_plan`; a piece of a
        quantized tensor stepped whole from its first piece: ``is_quantized`` per moment), the kernels when the
        returned function is called: those members in the bucket's order, then the others together (the same
        operations in the same order)."""
        alone, ps, gs, ss = [], [], [], []
        for p, g, st in zip(params, grads, states):
            plan = self._fused_member_plan(p, g, st, group)
            if plan is not None:
                if plan:
                    alone.append((True, plan))
                continue
            if isinstance(st, ChunkState) and "parent" in st.extra and any(is_quantized(st, k) for k in self.specs):
                if st.start == 0:
                    alone.append((False, (p, g, st)))
                continue
            ps.append(p)
            gs.append(g)
            ss.append(st)

        def launch() -> None:
            for fused, args in alone:
                if fused:
                    self._fused_kernel_step_(*args[:3], group, t, lr, args[3])
                else:
                    step_whole_from_piece_(self, *args, group, t, lr, self.foreach_decays_after)
            if ps:
                self._step_rest_(ps, gs, ss, group, t, lr)

        return launch

    # ---- bitsandbytes' fused 8-bit Adam step (adamw8bit's ``fused``; lowmem.optim.bnb_fused) ----

    def _fusable(self, state) -> bool:
        """Whether ``state`` is AdamW's (``eps`` after the bias correction) with both moments in
        bitsandbytes' blockwise 8-bit format: the state the fused kernel updates in place."""
        from .moments import AdamMoments

        return (isinstance(self.inner, AdamMoments) and self.inner.eps_placement == "torch"
                and self.specs == {"exp_avg": M1_8BIT, "exp_avg_sq": M2_8BIT}
                and all(is_quantized(state, k) and not is_rank1(state, k) for k in self.specs))

    def _fused_member_(self, p, g, st, group, t, lr) -> bool:
        """Step one bucket member with :meth:`_fused_kernel_step_` (AdamW's:
        :func:`~lowmem.optim.bnb_fused.fused_adam8bit_step_`) when the group has ``fused`` (a recipe that declares it) and :func:`~lowmem.optim.bnb_fused.use_fused` says so;
        returns whether it did. A piece of a larger tensor: the whole tensor from its first piece (the
        others are skipped), on CPU in slices of the piece's size rounded to whole blocks."""
        plan = self._fused_member_plan(p, g, st, group)
        if plan:
            self._fused_kernel_step_(*plan[:3], group, t, lr, plan[3])
        return plan is not None

    def _fused_member_plan(self, p, g, st, group) -> tuple | None:
        """:meth:`_fused_member_`'s decision: ``None`` when the member is not the fused kernel's, ``()`` for a
        piece stepped with its tensor's first piece, else the kernel's ``(p, g, state, chunk)``."""
        if "fused" not in group or group["fused"] is False:
            return None
        piece = isinstance(st, ChunkState) and "parent" in st.extra
        state = st.extra["parent"] if piece else st
        if not self._fusable(state):
            return None
        chunk = None
        if piece:
            numel = math.prod(st.extra["shape"])
            chunk = st.stop - st.start
            p = p.as_strided((numel,), (1,), p.storage_offset() - st.start)
            g = g.as_strided((numel,), (1,), g.storage_offset() - st.start)
        if not bnb_fused.use_fused(p, g, state, group):
            return None
        if piece and st.start != 0:
            return ()  # (stepped with the first piece)
        return p, g, state, chunk

    def fused_step_(self, p, grad, group, state, t, lr, chunk_numel) -> bool:
        """The per-parameter step of ``p`` by :meth:`_fused_kernel_step_` (on CPU in
        slices of ``chunk_numel`` rounded down to whole blocks) when :meth:`_fused_member_`'s conditions
        hold; returns whether it ran. For the engine's per-parameter step (float32 / bf16 / fp16
        parameters, ``foreach=False``, layerwise mode), called by the engine's ``_update`` for a plain
        (unsharded, unprojected, unstabilized) parameter; :meth:`direction` refuses ``fused=True`` on the
        steps that do not call it (FSDP2 shards, stabilizers)."""
        if "fused" not in group or group["fused"] is False or not self._fusable(state):
            return False
        if not bnb_fused.use_fused(p, grad, state, group):
            return False
        self._fused_kernel_step_(p, grad, state, group, t, lr, chunk_numel)
        return True

    def _fused_kernel_step_(self, p, g, state, group, t, lr, chunk) -> None:
        """bitsandbytes' fused step of the whole of ``p`` (on CPU in slices of ``chunk`` elements rounded down to
        whole blocks; ``None``: one slice), the one call :meth:`_fused_member_` and :meth:`fused_step_` make once
        their conditions hold: here :func:`~lowmem.optim.bnb_fused.fused_adam8bit_step_`; a recipe whose
        :meth:`_fusable` state another kernel updates overrides this (lion8bit: ``fused_lion8bit_step_``)."""
        bnb_fused.fused_adam8bit_step_(p, g, state, group, t, lr, bnb_fused.code_maps(str(p.device)), chunk)

    def fused_step_allocates_nothing(self, p, group, state) -> bool:
        """Whether :meth:`fused_step_` steps ``p`` with bitsandbytes' CUDA kernel (its gradient assumed contiguous
        and of ``p``'s dtype, as the engine's ``_fused_whole``): the moments updated in registers, so the
        per-parameter step allocates nothing (the engine's ``_param_transient_bytes`` then reports 0, as for
        torch's fused AdamW kernel). bitsandbytes' CPU implementation (``fused=True`` on the CPU) allocates
        (:func:`~lowmem.optim.bnb_fused.fused_cpu_transient_bytes`): not this."""
        return ("fused" in group and group["fused"] is not False and p.device.type == "cuda" and self._fusable(state)
                and bnb_fused.ineligible_reason(p, p, state, group) is None)

    def fused_step_transient_bytes(self, p, group, state, chunk_numel) -> int | None:
        """What :meth:`fused_step_` allocates stepping ``p`` alone (the engine's per-parameter step; its gradient
        assumed contiguous and of ``p``'s dtype), or ``None`` when it does not step ``p``: bitsandbytes' CUDA
        kernel nothing; its CPU implementation (``fused=True`` on the CPU) its temporaries of the largest slice it
        is handed (:func:`~lowmem.optim.bnb_fused.fused_cpu_transient_bytes` with ``p``'s dtype: ``chunk_numel``
        rounded down to whole blocks, at least one, at most the tensor; ``None``: the whole tensor). The engine
        makes no float32 copy of the gradient or parameter around it (``_update_state`` calls :meth:`fused_step_`
        first), so its report is this alone: a bfloat16 weight stepped whole was reported 28 B per value (the
        engine's two float32 copies beside a float32 weight's 20 B) for 24 traced (tests/test_kept_fused.py)."""
        if ("fused" not in group or group["fused"] is False or not self._fusable(state)
                or (group["fused"] is None and p.device.type != "cuda")
                or bnb_fused.ineligible_reason(p, p, state, group) is not None):
            return None
        if p.device.type == "cuda":
            return 0
        n, b = p.numel(), bnb_fused.BNB_BLOCK_SIZE
        size = n if chunk_numel is None else min(n, max(b, chunk_numel // b * b))
        return bnb_fused.fused_cpu_transient_bytes(size, p.dtype)

    def _fused_bytes(self, numel, state, group) -> int | None:
        """The transient of a fused member of ``numel`` elements (float32 parameter, the foreach path),
        ``None`` when it is not fused: bitsandbytes' CPU implementation's float32 temporaries, or 0 (CUDA)."""
        if group is None or "fused" not in group or group["fused"] is False or not self._fusable(state):
            return None
        device = state["exp_avg"].device
        if group["fused"] is None and device.type != "cuda":
            return None
        if group["block_size"] != bnb_fused.BNB_BLOCK_SIZE:
            return None
        return 0 if device.type == "cuda" else bnb_fused.fused_cpu_transient_bytes(numel)

    def _decoded_many(self, gs, states, group):
        """Each state with its quantized moments decoded to float32 of its gradient's shape, and the
        function that encodes them all back. Tensors of whole blocks share one decode (and one encode)
        per moment; matrices of one shape with rank-1 scales (an even number of elements: whole bytes)
        share one per moment as a stack (the maxima are per matrix, over its last two dimensions); the
        rest (a partial last block, an odd rank-1 matrix) is decoded alone."""
        b = group["block_size"]
        views = [dict(st) for st in states]
        alone: list[tuple[int, str]] = []
        batched: dict[str, list[int]] = {}
        stacked: dict[tuple[str, torch.Size], list[int]] = {}
        for i, st in enumerate(states):
            shape = gs[i].shape
            for k in self.specs:
                if not is_quantized(st, k):
                    continue
                if is_rank1(st, k) and len(shape) == 2 and shape.numel() % 2 == 0:
                    stacked.setdefault((k, shape), []).append(i)
                elif is_rank1(st, k) or shape.numel() % b:
                    views[i][k] = decode(st, k, self.specs[k], b, shape)
                    alone.append((i, k))
                else:
                    batched.setdefault(k, []).append(i)
        if (batched or stacked) and Q.launch_bound(gs[0].device):
            return views, self._decoded_joint(gs, states, views, alone, batched, stacked, b)
        flats: dict[str, Tensor] = {}
        for k, idx in batched.items():
            spec = self.specs[k]
            numels = [gs[i].numel() for i in idx]
            flat = Q.dequantize_blockwise_cat([states[i][k] for i in idx], [states[i][k + "_absmax"] for i in idx],
                                              Q.code_map(spec.code, gs[idx[0]].device), b, spec.bits, sum(numels),
                                              spec.code)
            for i, part in zip(idx, flat.split(numels)):
                views[i][k] = part.view(gs[i].shape)
            flats[k] = flat
        stacks: dict[tuple[str, torch.Size], Tensor] = {}
        for (k, shape), idx in stacked.items():
            whole = Q.dequantize_rank1_4bit(
                torch.cat([states[i][k] for i in idx]), torch.stack([states[i][k + "_rowmax"] for i in idx]),
                torch.stack([states[i][k + "_colmax"] for i in idx]), Q.code_map(self.specs[k].code, gs[idx[0]].device),
                self.specs[k].code)
            for i, part in zip(idx, whole):
                views[i][k] = part
            stacks[(k, shape)] = whole

        def encode() -> None:
            for i, k in alone:
                encode_(states[i], k, views[i][k], self.specs[k], b)
            dst, src = [], []
            for k, idx in batched.items():
                spec = self.specs[k]
                codes, absmax = Q.quantize_blockwise_split(
                    flats.pop(k), Q.code_map(spec.code, gs[idx[0]].device), b, spec.bits,
                    [gs[i].numel() for i in idx], spec.code)
                dst += [states[i][k] for i in idx] + [states[i][k + "_absmax"] for i in idx]
                src += [*codes, *absmax]
            for (k, shape), idx in stacked.items():
                spec = self.specs[k]
                codes, rows, cols = Q.quantize_rank1_4bit(stacks.pop((k, shape)), Q.code_map(spec.code, gs[idx[0]].device),
                                                          None, spec.code)
                dst += ([states[i][k] for i in idx] + [states[i][k + "_rowmax"] for i in idx]
                        + [states[i][k + "_colmax"] for i in idx])
                src += [*codes.view(len(idx), -1), *rows, *cols]
            if dst:
                torch._foreach_copy_(dst, src)

        return views, encode

    def _decoded_joint(self, gs, states, views, alone, batched, stacked, b):
        """:meth:`_decoded_many`'s decode of the whole-block members and rank-1 stacks off the CPU (a device that
        pays per kernel launch, :func:`~lowmem.optim.functional.quant.launch_bound`), with fewer kernels and the
        same bits; fills ``views`` and returns the encode.

        Every scale and code tensor of the bucket is copied into one buffer by one ``torch.cat``
        (:func:`~lowmem.optim.functional.quant.joint_codes`: was one ``cat`` of codes and one of scales per
        moment, and a ``cat`` and two ``stack`` per rank-1 stack); all 4-bit codes are converted to the
        ``int32`` lookup index at once; each blockwise 4-bit moment's table lookup writes into one float32
        buffer of every such moment, which is multiplied by its absmax in place at once; the encode takes the
        block absmax (``vector_norm(inf)``) and its clamp once for all of them (a maximum per block: the same
        values whatever the rows around it), then per moment the division, the search and the pack, as
        :func:`~lowmem.optim.functional.quant.quantize_blockwise_4bit`. 8-bit moments keep bitsandbytes' codec
        per moment. Transient: the decode phase holds the codes buffer, its ``int32`` index (2 B per 4-bit
        code value) and the decoded values (no separate product: ``mul_`` in place), about 13 B per element of a
        bucket of Adam's two 4-bit moments, below the direction and encode phases; all of it walked by
        :meth:`_four_bit_joint_bytes` (4-bit buckets)."""
        dev = gs[0].device
        four = [k for k in batched if self.specs[k].bits == 4]
        eight = [k for k in batched if self.specs[k].bits == 8]
        stacks = list(stacked.items())
        floats = [states[i][k + "_absmax"] for k in four + eight for i in batched[k]]
        for (k, _), idx in stacks:
            floats += [states[i][k + "_rowmax"] for i in idx] + [states[i][k + "_colmax"] for i in idx]
        codes4 = ([states[i][k] for k in four for i in batched[k]]
                  + [states[i][k] for (k, _), idx in stacks for i in idx])
        codes8 = [states[i][k] for k in eight for i in batched[k]]
        fl, c4, c8 = Q.joint_codes(floats, codes4, codes8)
        ints = c4.int() if c4.numel() else None
        numels = {k: [gs[i].numel() for i in batched[k]] for k in batched}
        n4 = sum(sum(numels[k]) for k in four)
        values4 = torch.empty(n4, dtype=torch.float32, device=dev) if four else None
        fo = co = vo = 0  # (offsets: into fl, into the 4-bit codes, into values4)
        flats: dict[str, Tensor] = {}
        for k in four:  # (the table lookup of each moment into values4)
            n = sum(numels[k])
            torch.index_select(Q.lookup_pairs(self.specs[k].code, str(dev)), 0, ints[co : co + n // 2],
                               out=values4[vo : vo + n].view(n // 2, 2))
            flats[k] = values4[vo : vo + n]
            co, vo = co + n // 2, vo + n
        if four:
            absmax4 = fl[: n4 // b]
            values4.view(-1, b).mul_(absmax4.unsqueeze(1))
            fo = n4 // b
        o8 = 0
        for k in eight:
            n = sum(numels[k])
            flats[k] = Q.dequantize_blockwise_8bit(c8[o8 : o8 + n], fl[fo : fo + n // b],
                                                   Q.code_map(self.specs[k].code, dev), b)
            fo, o8 = fo + n // b, o8 + n
        for k in batched:
            for i, part in zip(batched[k], flats[k].split(numels[k])):
                views[i][k] = part.view(gs[i].shape)
        # rank-1 stacks (one key, the rank-1 one: one map): one lookup of every stack's codes, then per stack
        # its scale min(r_i, c_j) multiplied in place
        nr = sum(len(idx) * shape.numel() for (_, shape), idx in stacks)
        values_r = (Q.lookup_pairs(self.specs[stacks[0][0][0]].code, str(dev)).index_select(0, ints[co : co + nr // 2])
                    .view(-1) if stacks else None)
        ro = 0
        for (k, shape), idx in stacks:
            s, (m, n) = len(idx), shape
            rows, cols = fl[fo : fo + s * m].view(s, m), fl[fo + s * m : fo + s * m + s * n].view(s, n)
            fo += s * (m + n)
            whole = values_r[ro : ro + s * m * n].view(s, m, n)
            whole.mul_(Q.rank1_scale(rows, cols))
            ro += s * m * n
            for i, part in zip(idx, whole):
                views[i][k] = part
        del fl, c4, c8, ints

        def encode() -> None:
            for i, k in alone:
                encode_(states[i], k, views[i][k], self.specs[k], b)
            dst, src = [], []
            if four:
                absmax = Q.block_absmax(values4.view(-1, b))
                tiny = absmax.clamp(min=torch.finfo(torch.float32).tiny)
                start = 0
                for k in four:
                    spec, n = self.specs[k], sum(numels[k])
                    blocks = flats.pop(k).view(-1, b) / tiny[start : start + n // b].unsqueeze(1)
                    packed = Q.nearest_packed(blocks.view(-1), Q.code_map(spec.code, dev), spec.code)
                    del blocks
                    dst += [states[i][k] for i in batched[k]] + [states[i][k + "_absmax"] for i in batched[k]]
                    src += [*packed.split([x // 2 for x in numels[k]]),
                            *absmax[start : start + n // b].split([x // b for x in numels[k]])]
                    start += n // b
            for k in eight:
                spec = self.specs[k]
                codes, absmax8 = Q.quantize_blockwise_split(flats.pop(k), Q.code_map(spec.code, dev), b, spec.bits,
                                                            numels[k], spec.code)
                dst += [states[i][k] for i in batched[k]] + [states[i][k + "_absmax"] for i in batched[k]]
                src += [*codes, *absmax8]
            if stacks:  # (quantize_rank1_4bit of each stack; the clamp, division, search and pack once for all)
                spec = self.specs[stacks[0][0][0]]
                scale = torch.empty(nr, dtype=torch.float32, device=dev)
                start, sizes = 0, []
                for (k, shape), idx in stacks:
                    x = values_r[start : start + len(idx) * shape.numel()].view(len(idx), *shape)
                    rows, cols = x.amax(dim=-1), x.amax(dim=-2)
                    torch.minimum(rows.unsqueeze(-1), cols.unsqueeze(-2), out=scale[start : start + x.numel()].view(x.shape))
                    dst += ([states[i][k] for i in idx] + [states[i][k + "_rowmax"] for i in idx]
                            + [states[i][k + "_colmax"] for i in idx])
                    src += [None] * len(idx) + [*rows, *cols]
                    sizes += [shape.numel() // 2] * len(idx)
                    start += x.numel()
                scale.clamp_(min=torch.finfo(torch.float32).tiny)
                normalized = torch.div(values_r, scale, out=scale)
                codes = iter(Q.nearest_packed(normalized, Q.code_map(spec.code, dev), spec.code).split(sizes))
                del scale, normalized
                src = [next(codes) if t is None else t for t in src]
            if dst:
                torch._foreach_copy_(dst, src)

        return encode

    def foreach_transient_bytes(self, numel):
        """A bucket of ``numel`` elements: every listed moment decoded (4 B each per element), the codec's
        workspace (one call for the whole bucket at most: :meth:`transient_bytes`'s per-element bytes)
        and the inner rule's multi-tensor direction (the directions and ``sqrt(v)``). A tensor in pieces
        is stepped whole from its first piece, bounded by the engine's per-parameter term."""
        return self._decoded_bytes(numel) + self.inner.foreach_direction_transient_bytes(numel)

    def foreach_bucket_transient_bytes(self, numel, members, group=None):
        """What :meth:`foreach_step_` allocates for a bucket: with ``group`` and every quantized moment 4-bit
        (blockwise or rank-1), exactly, by :meth:`foreach_direction_bucket_transient_bytes`'s walk of the codec
        calls (the CPU's forms, :meth:`_four_bit_bucket_bytes`, or the device's, :meth:`_four_bit_joint_bytes`;
        tests/test_quant_bucket_joint.py); otherwise the bound :meth:`foreach_transient_bytes` for the members
        with quantized moments (decoded, and the codec's workspace); members below ``min_quant_size`` (float32
        moments, nothing decoded or encoded) allocate only the inner rule's multi-tensor direction, which counts
        every element."""
        fused = [(n, b) for n, state in members if (b := self._fused_bytes(n, state, group)) is not None]
        if fused:  # (each fused member alone, then the rest of the bucket together)
            rest = [(n, state) for n, state in members if self._fused_bytes(n, state, group) is None]
            return max(max(b for _, b in fused), self.foreach_bucket_transient_bytes(sum(n for n, _ in rest), rest, None)
                       if rest else 0)
        coded = sum(n for n, state in members if any(is_quantized(state, k) for k in self.specs))
        quantized = [k for _, st in members for k in self.specs if is_quantized(st, k)]
        if group is not None and quantized and len({self.specs[k].bits for k in quantized}) == 1:
            # 4-bit or 8-bit moments: foreach_step_ is _decoded_many, the inner rule's multi-tensor direction and
            # the encode (then the update, in place), what foreach_direction_bucket_transient_bytes walks; each
            # member's shape from its state (rank-1 maxima: shape[:-1] and shape[-1]; the others' flat size is all
            # that counts)
            shaped = [(_state_shape(n, st, self.specs), st) for n, st in members]
            return self.foreach_direction_bucket_transient_bytes(shaped, group["block_size"])
        return self._decoded_bytes(coded) + self.inner.foreach_direction_transient_bytes(numel)

    def _decoded_bytes(self, numel: int) -> int:
        """Every listed moment of ``numel`` quantized elements decoded (4 B each per element) and the
        codec's workspace (one call for the whole bucket at most: :meth:`transient_bytes`'s per-element bytes)."""
        four = any(s.bits == 4 for s in self.specs.values())
        return 4 * len(self.specs) * numel + codec_bytes(numel, four, self.rank1_key is not None)

    # ---- the chunked step: whole quantization blocks (or whole rows for rank-1 scales) ----

    def chunk_align(self, shape, group, state):
        align = self.inner.chunk_align(shape, group, state)
        if align is None:
            return None
        for k in self.specs:
            if is_rank1(state, k):
                if len(shape) != 2:
                    return None  # batched rank-1 scales: the whole tensor at once
                align = math.lcm(align, shape[-1], 2)  # whole rows, whole 4-bit bytes
            elif is_quantized(state, k):
                align = math.lcm(align, group["block_size"], 2)  # whole blocks, whole 4-bit bytes
        return align

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        view = self.inner.chunk_state(state, start, stop, shape, group)
        view.extra["parent"], view.extra["shape"] = state, shape  # (a foreach piece: step_whole_from_piece_)
        for k, spec in self.specs.items():
            if is_rank1(state, k):
                n = shape[-1]
                view[k] = state[k][start // 2 : -(-stop // 2)]
                view[k + "_rowmax"] = state[k + "_rowmax"][start // n : stop // n]
                view[k + "_colmax"] = state[k + "_colmax"]  # the old maxima: every chunk decodes with them
                view.extra["rows"] = ((stop - start) // n, n)
                if ctx is not None:
                    view.extra[("colmax", k)] = ctx[k]
            elif is_quantized(state, k):
                b = group["block_size"]
                view[k] = state[k][start // 2 : -(-stop // 2)] if spec.bits == 4 else state[k][start:stop]
                view[k + "_absmax"] = state[k + "_absmax"][start // b : -(-stop // b)]
        return view

    # FSDP2 (lowmem.optim.sharded): prepare_chunks takes ``reduce`` (the column maxima below)
    sharded_stats = True

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized, reduce=None):
        """Rank-1 scales: the new column maxima of the whole matrix, from a pass that updates every
        chunk's moments on decoded copies (the row maxima of a chunk of whole rows are its own).
        ``reduce`` (an FSDP2 shard of rows, :class:`~lowmem.optim.sharded.ShardReduce`): the column
        maxima are the maximum over the shards' (one all-reduce of ``n`` numbers per matrix)."""
        keys = [k for k in self.specs if is_rank1(state, k)]
        if not keys:
            return None
        col = {k: torch.zeros(shape[-1], dtype=torch.float32, device=state[k].device) for k in keys}
        for start, stop in bounds:
            view = self.chunk_state(state, start, stop, shape, group)
            g = stabilized(start, stop, view)
            scratch, quantized = self._decoded(g, view, group)
            for k in self.inner.state_keys:  # unquantized moments: update copies, not the state
                if k in scratch and k not in quantized and scratch[k].dim() > 0:
                    scratch[k] = scratch[k].clone()
            self.inner.direction(g, scratch, group, t, lr)
            for k in keys:
                torch.maximum(col[k], scratch[k].view(-1, shape[-1]).amax(dim=0), out=col[k])
            del scratch
        if reduce is not None:
            for k in keys:
                reduce.max_(col[k])
        return col

    def finish_chunks(self, state, ctx):
        if ctx is not None:
            for k, col in ctx.items():
                state[k + "_colmax"].copy_(col)

    def transient_bytes(self, numel, shape, group, state):
        """What :meth:`direction` of ``numel`` elements of a tensor of ``shape`` allocates, stepped whole: every
        quantized moment decoded to float32 and the inner rule's direction (its
        :meth:`~lowmem.optim.moments.MomentRule.transient_bytes`), then the moments encoded in turn, each beside
        the decoded moments not encoded yet (a decoded copy is freed once it is encoded). 4-bit moments:
        :meth:`_four_bit_direction_bytes`, the codec calls walked on a ledger in the CPU's forms or, off the CPU and
        on meta tensors, the device's (exact, partial blocks and odd counts included); otherwise the largest of
        ``4 n (moments left) + inner + codec`` over the moments (:meth:`_codec_bytes`; 8-bit: exact on the CPU with
        the group's ``block_size``, a bound off it). Traced: tests/test_transient_per_parameter.py."""
        return self._transient_bytes(numel, shape, group, state, chunked=False)

    def chunk_transient_bytes(self, numel, shape, group, state):
        """:meth:`transient_bytes` of a chunk of ``numel`` elements of the chunked step (the engine's
        ``_update_chunked``): rank-1 moments keep the whole matrix's new column maxima (:meth:`prepare_chunks`,
        4 B per column, alive through every chunk; they depend on the matrix's width, not only on the chunk),
        and its pass over the chunks (the moments decoded, the inner direction, freed, then the chunk's column
        maxima) comes before the encodes; each chunk of whole rows is encoded with the whole matrix's column
        maxima (:func:`~lowmem.optim.functional.quant.quantize_rank1_4bit`'s ``col_max``: none of its own).
        Of one chunk size: the engine (``_param_transient_bytes``) asks for every size its chunks have, the last,
        shorter chunk's too (a partial block padded to the chunk's size may make that chunk's term the larger,
        while its float32 copies are the smaller), and adds each one's copies to its own."""
        return self._transient_bytes(numel, shape, group, state, chunked=True)

    def _transient_bytes(self, numel, shape, group, state, chunked: bool) -> int:
        quantized = [k for k in self.specs if is_quantized(state, k)]
        if not quantized:
            inner = getattr(self.inner, "chunk_transient_bytes", None) if chunked else None
            return (inner or self.inner.transient_bytes)(numel, shape, group, state)
        fused = self._fused_bytes(numel, state, group) if group.get("fused") is True else None
        if fused is not None:  # (fused=True: a tensor in foreach pieces, stepped from its first piece; the
            return fused       # per-parameter step refuses it, and with None it is the chunked step's)
        if all(self.specs[k].bits == 4 for k in quantized):
            # (chunked: a chunk of numel values; the engine asks for each chunk size it visits, the last, shorter
            # one too, whose partial block's padded copies may make it the larger beside its smaller copies)
            return self._four_bit_direction_bytes(numel, torch.Size(shape), group, state, quantized,
                                                  self.inner.transient_bytes(numel, shape, group, {}), chunked)
        inner = self.inner.transient_bytes(numel, shape, group, {})
        encode = max(4 * (len(quantized) - i) * numel + self._codec_bytes(numel, shape, group, state, k, chunked)
                     for i, k in enumerate(quantized))
        cols = 4 * shape[-1] * sum(is_rank1(state, k) for k in quantized) if chunked else 0
        return cols + inner + encode

    def _codec_bytes(self, numel, shape, group, state, key, chunked: bool) -> int:
        """The largest workspace of encoding moment ``key`` of ``numel`` elements (:func:`codec_bytes`), for a rule
        whose moments are not all 4-bit (all 4-bit: :meth:`_four_bit_direction_bytes`); a rank-1 moment's: ``13 n``
        (the blockwise 4-bit encode's on the CPU) beside its new row maxima and, stepped whole, its new column
        maxima."""
        if not is_rank1(state, key):
            return codec_bytes(numel, self.specs[key].bits == 4, False, group.get("block_size"))
        return 13 * numel + 4 * (numel // shape[-1]) + (0 if chunked else 4 * (numel // shape[-2]))

    def _four_bit_direction_bytes(self, n: int, shape: torch.Size, group, state, quantized: list[str], inner: int,
                                  chunked: bool) -> int:
        """:meth:`transient_bytes` of 4-bit moments (blockwise or rank-1) for a tensor or a chunk of ``n`` values
        (the engine's largest chunk, or the last one), :meth:`direction`'s codec calls walked on a ledger
        (:class:`_Ledger`, the functions :meth:`_four_bit_bucket_bytes` / :meth:`_four_bit_joint_bytes` walk): chunked,
        the rank-1 moments' column maxima (``4 n_cols`` each) kept and :meth:`prepare_chunks`' pass (the decodes,
        the inner direction, freed, the chunk's column maxima beside the decoded moments); then the decodes in
        the specs' order (a blockwise moment of ``n`` values in ``ceil(n / B)`` blocks: a partial last block's
        padded copies), the inner direction next to them (``inner``; its direction, ``4 n``, kept), and the
        encodes in turn: a blockwise moment written into its state (contiguous), a rank-1 one's new codes and
        maxima copied in (on the CPU each encode's kept until the next one has returned: the loop's variables; off
        the CPU, :func:`~lowmem.optim.functional.quant.launch_bound`, all kept for the one write-back at the end,
        with the device's codec forms), each decoded moment freed after its encode."""
        led = _Ledger()
        b = group["block_size"]
        rows = n // shape[-1] if len(shape) >= 2 else 0
        whole_blocks = n == shape.numel()

        def blocks(k: str) -> int:  # (the tensor's whole block count stepped whole; a chunk's own)
            return state[k + "_absmax"].numel() if whole_blocks else Q.num_blocks(n, b)

        def decode_all() -> dict[str, int]:
            return {k: _dequantize_rank1_bytes(led, n) if is_rank1(state, k) else
                    _dequantize_4bit_bytes(led, n, blocks(k), b) for k in quantized}

        rank1 = [k for k in quantized if is_rank1(state, k)]
        if chunked and rank1:  # (prepare_chunks)
            for _ in rank1:
                led.keep(led.alloc(4 * shape[-1]))
            decoded = decode_all()
            led.peak = max(led.peak, led.live + inner)
            led.free(led.alloc(4 * shape[-1]))  # (a chunk's column maxima, then the running maximum)
            for token in decoded.values():
                led.free(token)
        decoded = decode_all()
        led.peak = max(led.peak, led.live + inner)
        led.keep(led.alloc(4 * n))  # (the direction)
        device = Q.launch_bound(state[quantized[0]].device)
        pending = None
        for k in quantized:
            cols = 0 if chunked else n // shape[-2]
            if device:  # (every moment's new codes and maxima kept for the one write-back at the end)
                if is_rank1(state, k):
                    led.keep(_quantize_rank1_bytes_joint(led, n, rows, cols))
                else:
                    _quantize_4bit_bytes_joint(led, n, blocks(k), b)
            else:
                if is_rank1(state, k):
                    new = _quantize_rank1_bytes(led, n, rows, cols, self.specs[k].code)
                else:
                    new = _quantize_4bit_bytes(led, n, blocks(k), b, self.specs[k].code, out=True)
                if pending is not None:
                    led.free(pending)
                pending = new
            led.free(decoded[k])
        return led.peak

    def cached_bytes(self, states, device) -> int:
        """Bytes of the code tables the codecs keep for the process once the moments quantized in ``states`` (the
        state dicts of parameters on ``device``) have been coded there
        (:func:`~lowmem.optim.functional.quant.kept_table_bytes` of their maps: on the CPU 66,560 B per 8-bit
        map, the point table and the map; 4-bit maps a few KiB). Made at the first step that codes a moment
        (with a workspace of at most 18 KiB, below the table quantizer's own for any tensor of more than
        2,048 values), kept from then on: alive through every phase of every later step, as MKL's packing buffer
        (the engine's ``_kept_gemm_bytes``), but neither state nor a step's new allocation, so not in
        :meth:`transient_bytes`. Once per process and device, whatever the number of parameters or optimizers
        (the caller sums over devices, once). 0 when no moment is quantized (every tensor below
        ``min_quant_size``)."""
        names = {self.specs[k].code for st in states for k in self.specs if is_quantized(st, k)}
        return Q.kept_table_bytes(names, device) if names else 0

    def reset(self, state):
        for k in self.state_keys:
            if k in state:
                state[k].zero_()

    def second_moment(self, state: dict[str, Tensor], shape: torch.Size, group: dict[str, Any]) -> Tensor | None:
        """Adam's uncorrected second moment as float32 of ``shape`` (decoded when quantized)."""
        key = "exp_avg_sq"
        if key not in state:
            return None
        if is_quantized(state, key):
            return decode(state, key, self.specs[key], group["block_size"], shape)
        return state[key].float()


def _state_shape(numel: int, state: dict[str, Tensor], specs: dict[str, QuantSpec]) -> tuple[int, ...]:
    """The shape of a bucket member of ``numel`` elements as far as its quantized step depends on it: a rank-1
    moment's matrix from its maxima (``rowmax``: ``shape[:-1]``, ``colmax``: ``shape[:-2] + shape[-1:]``), else
    flat."""
    for k in specs:
        if is_rank1(state, k):
            return tuple(state[k + "_rowmax"].shape) + (state[k + "_colmax"].shape[-1],)
    return (numel,)


# ---- the 4-bit codecs' CPU allocations, step by step (Quantized._four_bit_bucket_bytes) --------------------------


def _bucket_block_size(sizes: list[tuple[int, int]]) -> int:
    """The group's ``block_size`` (a bucket's members share their group), which a state does not hold, from its
    blockwise members' ``(values, blocks)``: every valid size ``b`` with ``ceil(values / b) = blocks`` for all of
    them (a member of 2 or more whole blocks fixes it; one of a single block only bounds it from below); the
    largest that fits (the most padding: a bound when several fit, exact otherwise)."""
    fits = [b for b in Q.VALID_BLOCK_SIZES if all(-(-n // b) == nb for n, nb in sizes)]
    return max(fits, default=max(Q.VALID_BLOCK_SIZES))


class _Ledger:
    """Bytes alive and their peak while a sequence of allocations and frees is walked."""

    def __init__(self):
        self.live = self.peak = 0
        self._next, self._sizes = 0, {}

    def alloc(self, nbytes: int) -> int:
        self._next += 1
        self._sizes[self._next] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        return self._next

    def free(self, token: int) -> None:
        self.live -= self._sizes.pop(token)

    def keep(self, token: int) -> None:
        """(alive to the end of the walk)"""


def _nearest_packed_bytes(led: _Ledger, n: int, code: str, out: bool) -> int | None:
    """:func:`~lowmem.optim.functional.quant.nearest_packed` of ``n`` normalized values on the CPU: the cells
    table's (``dynamic4_signed``: the scaled values and their int32 cells, the table rows, the midpoints and the
    comparison; 9 B per value at most) or the linear map's float32 codes (``linear4_nozero``), then
    :func:`~lowmem.optim.functional.quant.pack_4bit`'s ``uint8`` copy (a zero byte and a concatenation for an odd
    count) and the packed bytes (a new tensor unless ``out``). Returns the packed bytes' token (``None`` with ``out``)."""
    if code == "dynamic4_signed":
        scaled = led.alloc(4 * n)
        cells = led.alloc(4 * n)
        led.free(scaled)
        idx = led.alloc(4 * n)
        led.free(cells)
        mid = led.alloc(4 * n)
        gt = led.alloc(n)
        led.free(mid)
        led.free(gt)
    elif code == "linear4_nozero":
        idx = led.alloc(4 * n)
    else:  # (the search: int32 indices)
        idx = led.alloc(4 * n)
    small = led.alloc(n)
    led.free(idx)
    if n % 2:
        zero = led.alloc(1)
        joined = led.alloc(n + 1)
        led.free(zero)
        led.free(small)
        small = joined
    packed = None if out else led.alloc((n + 1) // 2)
    led.free(small)
    return packed


def _dequantize_4bit_bytes(led: _Ledger, n: int, nb: int, b: int) -> int:
    """:func:`~lowmem.optim.functional.quant.dequantize_blockwise_4bit` of ``n`` values in ``nb`` blocks of ``b``
    on the CPU: the codes as int32 and the pairs they select (``12`` B per packed byte), the zero-padded blocks of
    a partial last block, the product with the absmax (the result, ``4 nb b``). Returns the result's token."""
    p = (n + 1) // 2
    ints = led.alloc(4 * p)
    pairs = led.alloc(8 * p)
    led.free(ints)
    if n % b:
        padded = led.alloc(4 * nb * b)
        led.free(pairs)
        pairs = padded
    out = led.alloc(4 * nb * b)
    led.free(pairs)
    return out


def _dequantize_rank1_bytes(led: _Ledger, n: int) -> int:
    """:func:`~lowmem.optim.functional.quant.dequantize_rank1_4bit` of ``n`` values on the CPU: the broadcast
    scale ``min(r_i, c_j)``, the codes as int32 and the pairs they select, the product (the result, ``4 n``)."""
    p = (n + 1) // 2
    scale = led.alloc(4 * n)
    ints = led.alloc(4 * p)
    pairs = led.alloc(8 * p)
    led.free(ints)
    out = led.alloc(4 * n)
    led.free(pairs)
    led.free(scale)
    return out


def _quantize_4bit_bytes(led: _Ledger, n: int, nb: int, b: int, code: str, out: bool) -> int | None:
    """:func:`~lowmem.optim.functional.quant.quantize_blockwise_4bit` of ``n`` values in ``nb`` blocks of ``b`` on
    the CPU: the zero-padded blocks of a partial last block, ``|x|`` for the absmax (new unless ``out``: the state's),
    its clamp and the normalized blocks, then :func:`_nearest_packed_bytes`. ``out``: written into the state (a
    member alone: nothing kept); else the codes and absmax kept (their token)."""
    padded = led.alloc(4 * nb * b) if n % b else None
    absval = led.alloc(4 * nb * b)
    absmax = None if out else led.alloc(4 * nb)
    led.free(absval)
    clamp = led.alloc(4 * nb)
    normalized = led.alloc(4 * nb * b)
    led.free(clamp)
    packed = _nearest_packed_bytes(led, n, code, out)
    led.free(normalized)
    if padded is not None:
        led.free(padded)
    if out:
        return None
    kept = led.alloc(0)
    led._sizes[kept] = led._sizes.pop(packed) + led._sizes.pop(absmax)
    return kept


def _packed_bytes_joint(led: _Ledger, n: int, out: Tensor | None) -> int | None:
    """:func:`~lowmem.optim.functional.quant.nearest_packed` of ``n`` normalized values off the CPU: the search's
    ``int32`` indices packed by one add into ``uint8`` (new unless ``out``) for an even count; an odd one converts
    them to ``uint8`` first (the ``int32`` ones then freed: :func:`~lowmem.optim.functional.quant.pack_4bit` holds
    the only reference) and appends a zero byte. Returns the new codes' token (``None`` when written into ``out``)."""
    idx = led.alloc(4 * n)
    if n % 2:
        small = led.alloc(n)
        led.free(idx)
        zero = led.alloc(1)
        joined = led.alloc(n + 1)
        led.free(zero)
        led.free(small)
        packed = None if out is not None else led.alloc((n + 1) // 2)
        led.free(joined)
    else:
        packed = None if out is not None else led.alloc(n // 2)
        led.free(idx)
    return packed


def _quantize_4bit_bytes_joint(led: _Ledger, n: int, nb: int, b: int) -> None:
    """:func:`~lowmem.optim.functional.quant.quantize_blockwise_4bit` of a member alone off the CPU, written into
    its state: the zero-padded blocks of a partial last block, the absmax into the state (``vector_norm``: no
    ``|x|`` copy), its clamp, the normalized blocks, then :func:`_packed_bytes_joint` into the state's codes."""
    padded = led.alloc(4 * nb * b) if n % b else None
    clamp = led.alloc(4 * nb)
    normalized = led.alloc(4 * nb * b)
    led.free(clamp)
    _packed_bytes_joint(led, n, out=True)
    led.free(normalized)
    if padded is not None:
        led.free(padded)


def _quantize_rank1_bytes_joint(led: _Ledger, n: int, rows: int, cols: int) -> int:
    """:func:`~lowmem.optim.functional.quant.quantize_rank1_4bit` of ``n`` values off the CPU (``cols`` 0: the
    column maxima given): the maxima, the scale and its clamp, the normalized values, then
    :func:`_packed_bytes_joint` (the search's ``int32`` indices packed by one add). Returns the token of the codes
    and maxima (kept for the write-back)."""
    maxima = led.alloc(4 * rows + 4 * cols)
    scale = led.alloc(4 * n)
    clamp = led.alloc(4 * n)
    led.free(scale)
    normalized = led.alloc(4 * n)
    packed = _packed_bytes_joint(led, n, None)
    led.free(normalized)
    led.free(clamp)
    kept = led.alloc(0)
    led._sizes[kept] = led._sizes.pop(packed) + led._sizes.pop(maxima)
    return kept


def _quantize_rank1_bytes(led: _Ledger, n: int, rows: int, cols: int, code: str) -> int:
    """:func:`~lowmem.optim.functional.quant.quantize_rank1_4bit` of ``n`` values on the CPU (``rows`` row maxima,
    ``cols`` column maxima: a stack's ``k m`` and ``k n``): the maxima, the scale and its clamp, the normalized
    values, then :func:`_nearest_packed_bytes`. Returns the token of the codes and maxima (kept for the write)."""
    maxima = led.alloc(4 * rows + 4 * cols)
    scale = led.alloc(4 * n)
    clamp = led.alloc(4 * n)
    led.free(scale)
    normalized = led.alloc(4 * n)
    packed = _nearest_packed_bytes(led, n, code, False)
    led.free(normalized)
    led.free(clamp)
    kept = led.alloc(0)
    led._sizes[kept] = led._sizes.pop(packed) + led._sizes.pop(maxima)
    return kept
