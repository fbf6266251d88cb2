"""Blockwise quantization of optimizer states: 8-bit (Dettmers et al. 2022) and 4-bit (Li et al. 2023).

* 8-bit: "8-bit Optimizers via Block-wise Quantization" (Dettmers et al., ICLR 2022), Section 2:
  the tensor is split into blocks of ``B`` values, each block is normalized by its absolute maximum
  ``N_b = max |x_b|`` and every normalized value is mapped to the nearest entry of a 256-value
  *dynamic* (dynamic tree) code; signed code for the first moment, unsigned for the second.
  bitsandbytes' ``quantize_blockwise`` / ``dequantize_blockwise`` implement this on CPU and CUDA
  and define the stored codes; on CPU the encoding runs bitsandbytes' own rule in torch operations
  (:func:`quantize_blockwise_8bit_table`, the same codes bit for bit, faster).
* 4-bit: "Memory Efficient Optimizers with 4-bit States" (Li et al., NeurIPS 2023): smaller
  blocks (``B = 128``, Section 3), a signed dynamic-exponent map for the first moment and, for the
  second moment, a *linear map without zero* (Section 4.1, the "zero-point problem": a second
  moment quantized to 0 blows the update ``m / sqrt(v)`` up). bitsandbytes has no 4-bit
  optimizer codec, so codes are computed here (nearest entry, two codes per byte).
* 4-bit *rank-1 normalization* of the second moment (Li et al. 2023, Section 4.2): a matrix is
  normalized entrywise by the smaller of its row maximum and its column maximum (``m + n``
  scales instead of one per block), then coded with the linear map without zero.
* 4-bit asymmetric min/max quantization, used by MicroAdam's error feedback
  (:mod:`.microadam`).

Codes are ``uint8`` tensors and scales ``float32`` tensors: plain tensors that checkpoint with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

VALID_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' CUDA kernels accept these


# ---- code maps ------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _code_map_cpu(name: str) -> Tensor:
    import bitsandbytes.functional as bnbF

    if name == "dynamic8_signed":  # Dettmers et al. 2022, Section 2 (dynamic tree quantization)
        return bnbF.create_dynamic_map(signed=True)
    if name == "dynamic8_unsigned":
        return bnbF.create_dynamic_map(signed=False)
    if name == "dynamic4_signed":  # Li et al. 2023, "DE" map for the first moment, 16 values
        return bnbF.create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4).unique()
    if name == "linear4_nozero":  # Li et al. 2023, Section 4.1: linear map (i + 1) / 16, zero excluded
        return torch.linspace(0.0, 1.0, 17)[1:].clone()  # (its own 16 values: kept_table_bytes)
    raise ValueError(f"unknown code map {name!r}; valid: dynamic8_signed, dynamic8_unsigned, dynamic4_signed, linear4_nozero")


def code_map(name: str, device: torch.device | str = "cpu") -> Tensor:
    """The sorted float32 code values of map ``name`` (256 for 8-bit maps, 16 for 4-bit maps), made once per
    device and kept (no host-to-device copy per step or chunk; read-only: callers must not write to it)."""
    return _code_map_on(name, str(torch.device(device)))


@lru_cache(maxsize=None)
def _code_map_on(name: str, device: str) -> Tensor:
    return _code_map_cpu(name).to(device)


@lru_cache(maxsize=None)
def lookup_pairs(name: str, device: str) -> Tensor:
    """The ``256 x 2`` table :func:`lookup_4bit` gathers from, for the 16 values of 4-bit code map ``name``
    (or ``"levels"``: the integers ``0..15`` as float32, :func:`dequantize_minmax_4bit`'s), made once per
    device and kept (read-only)."""
    values = _LEVELS if name == "levels" else _code_map_cpu(name)
    if values.numel() != 16:
        raise ValueError(f"lookup_pairs: map {name!r} has {values.numel()} values; a 4-bit map has 16")
    return _pairs(values).to(device)


_MAP_VALUES = {"dynamic8_signed": 256, "dynamic8_unsigned": 256, "dynamic4_signed": 16, "linear4_nozero": 16}


def kept_table_bytes(names, device: torch.device | str) -> int:
    """Bytes of the tables the codecs of the code maps ``names`` keep for the process once they have coded on
    ``device`` (each made at its first use and kept, ``lru_cache``; made once per process, not per step nor
    per optimizer): per map its float32 values (:func:`code_map`: 4 B per value; on the CPU :func:`_code_map_cpu`'s
    own tensor, elsewhere a copy on the device; the CPU's copy of a device run's maps is host memory, not
    counted), and

    * 8-bit maps on the CPU: the point table of :func:`quantize_blockwise_8bit_table` (:func:`_point_table`,
      :data:`TABLE_POINTS` bytes); elsewhere bitsandbytes' kernel reads the map itself;
    * 4-bit maps: the ``256 x 2`` float32 lookup pairs of the decode (:func:`lookup_pairs`, 2,048 B); on the CPU
      ``dynamic4_signed``'s cell table (:func:`_cell_table`: an int32 count per cell and the 15 midpoints and
      ``+inf``), elsewhere the midpoints the search reads (:func:`_midpoints`, 15 float32).

    ``device``: where the codecs run (a meta device: as off the CPU, :func:`launch_bound`, the forms the step's
    transient is counted with there). Measured: tests/test_quantexact_cached_tables.py."""
    cpu = not launch_bound(torch.device(device))
    total = 0
    for name in set(names):
        if name not in _MAP_VALUES:
            raise ValueError(f"unknown code map {name!r}; valid: {', '.join(_MAP_VALUES)}")
        values = _MAP_VALUES[name]
        total += 4 * values
        if values == 256:
            total += TABLE_POINTS if cpu else 0
            continue
        total += 4 * 2 * 256
        if not cpu:
            total += 4 * (values - 1)
        elif name == "dynamic4_signed":
            total += 4 * 2 * _CELLS_PER_UNIT + 4 * values
    return total


def clear_kept_tables() -> None:
    """Forget every table the codecs keep for the process (:func:`kept_table_bytes`'s: the code maps on each
    device, the 8-bit CPU point tables, the 4-bit lookup pairs (MicroAdam's ``"levels"`` too), cell tables and
    midpoints, and :func:`lowmem.optim.bnb_fused.code_maps`' references to the maps; MicroAdam's kept age weights
    and compiled divisor, ``MicroAdamMoments.cached_bytes``): the next step that codes a moment makes them again,
    as a process's first does. ``measure_memory`` calls it before it measures, so that a second measurement in one
    process counts them as a fresh process does. Tensors a caller still holds stay alive (the tables are
    read-only; a step fetches them anew)."""
    from .. import bnb_fused, microadam
    from . import microadam as MA

    for cache in (_code_map_cpu, _code_map_on, lookup_pairs, _point_table, _midpoints, _cell_table,
                  bnb_fused.code_maps, MA._age_weights, _minmax_top_on):
        cache.cache_clear()


def num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def packed_numel(n: int, bits: int) -> int:
    """Bytes of codes for ``n`` values: ``n`` at 8 bits, ``ceil(n / 2)`` at 4 bits."""
    return n if bits == 8 else -(-n // 2)


# ---- absmax blockwise codecs ----------------------------------------------------------------


def quantize_blockwise_8bit(x: Tensor, code: Tensor, block_size: int, name: str | None = None) -> tuple[Tensor, Tensor]:
    """8-bit blockwise quantization (Dettmers et al. 2022, Section 2): bitsandbytes' ``quantize_blockwise``.

    Returns ``(codes uint8 [n], absmax float32 [ceil(n / block_size)])`` for the flattened ``x``.
    ``name``: the map's name when ``code`` is :func:`code_map` of it; a CPU tensor then takes
    :func:`quantize_blockwise_8bit_table`, bitsandbytes' CPU rule (0.50) in torch operations (the same
    codes and absmax, bit for bit, as the installed bitsandbytes: tests/test_quant_table.py; about 2x
    faster than its unvectorized CPU loop); otherwise (CUDA, or ``None``) bitsandbytes is called.
    """
    flat = x.reshape(-1).float().contiguous()
    if name is not None and flat.device.type == "cpu":
        return quantize_blockwise_8bit_table(flat, name, block_size)
    import bitsandbytes.functional  # noqa: F401  (registers the torch.ops.bitsandbytes operators)

    # the operator bitsandbytes.functional.quantize_blockwise calls, without that wrapper's copy of the code
    # map into its QuantState (one kernel per call on a GPU): the same codes and absmax
    codes, absmax = torch.ops.bitsandbytes.quantize_blockwise.default(flat, code, block_size)
    return codes, absmax.float()


# bitsandbytes' CPU quantize_blockwise (0.50, csrc/cpu_ops.cpp, quantize_cpu_impl): the normalized value
# ``y = x * (1 / N_b)`` clamped to [-1, 1] is mapped to one of 65536 evenly spaced points,
# ``j = (int) fma((y + 1) * 0.5, 65535, 0.5)``, and ``j`` to a code by a table (build_quantize_lut:
# point ``-1 + 2j / 65535``'s nearest code, the lower one on a tie); a block of zeros gets code 0.
TABLE_POINTS = 65536
TABLE_PIECE = 1 << 17  # values per pass of quantize_blockwise_8bit_table (its workspace: TABLE_PIECE_BYTES)
TABLE_PIECE_BYTES = 8  # per value of a pass: the float32 normalized values and their int32 point indices


def table_workspace_bytes(n: int) -> int:
    """:func:`quantize_blockwise_8bit_table`'s workspace for ``n`` values, at most (any valid block size ``B``:
    ``min(TABLE_PIECE, ceil(n / B) B)`` values of :data:`TABLE_PIECE_BYTES`; the codes and absmax it returns
    are the caller's)."""
    return TABLE_PIECE_BYTES * min(TABLE_PIECE, n + max(VALID_BLOCK_SIZES) - 1) if n > 0 else 0


def table_quantize_bytes(n: int, block_size: int) -> int:
    """What :func:`quantize_blockwise_8bit_table` of ``n`` float32 values in blocks of ``block_size`` allocates
    at most, the codes and absmax it returns included (exact on the CPU; :func:`table_workspace_bytes` is a
    bound for any block size). One pass (``n <= TABLE_PIECE`` whole blocks): ``|x|`` (float32), the absmax,
    the int32 point indices and the uint8 codes, ``9 n + 4 nb``. Several passes: the codes and absmax first
    (``n + 4 nb``), then per pass of ``k`` whole-block values ``|x|`` and the indices (``8 k``; the reciprocal
    absmax, ``4 k / B``, is freed before the indices), and a partial last block's zero-padded copy beside its
    own (``12 B``)."""
    if n <= 0:
        return 0
    nb = num_blocks(n, block_size)
    if n <= TABLE_PIECE and n % block_size == 0:
        return 9 * n + 4 * nb
    whole = n - n % block_size
    step = max(TABLE_PIECE // block_size, 1) * block_size
    passes = max(8 * min(step, whole), 12 * block_size if whole < n else 0)
    return n + 4 * nb + passes


TABLE_BUILD_PIECE = 2048  # points per piece while a point table is made (its workspace: 8 B per point of a piece)


@lru_cache(maxsize=None)
def _point_table(name: str) -> Tensor:
    """uint8 [65536]: the code of each of bitsandbytes' 65536 points (build_quantize_lut, in float32 as
    there: midpoints ``(c_i + c_{i+1}) * 0.5``, points ``2j / 65535 - 1``, code = midpoints below the point).
    Made once per process, :data:`TABLE_BUILD_PIECE` points at a time (their float32 values and int32 codes,
    16 KiB, and the midpoints beside the table: not 768 KiB of all points' values and int64 codes at once)."""
    code = _code_map_cpu(name)
    midpoints = (code[:-1] + code[1:]) * 0.5
    table = torch.empty(TABLE_POINTS, dtype=torch.uint8)
    for start in range(0, TABLE_POINTS, TABLE_BUILD_PIECE):
        points = torch.arange(start, start + TABLE_BUILD_PIECE, dtype=torch.float32)
        points.mul_(2.0).div_(TABLE_POINTS - 1).sub_(1.0)
        table[start : start + TABLE_BUILD_PIECE] = torch.searchsorted(midpoints, points, right=False, out_int32=True)
    return table


def table_rows_(normalized: Tensor) -> Tensor:
    """bitsandbytes' point index ``j`` of every normalized value ``y`` (float32, in place; read as int32 by
    the caller): ``j = trunc(fma((clamp(y, -1, 1) + 1) * 0.5, 65535, 0.5))``.

    Computed as ``trunc(0.5 + 32767.5 u)``, ``u = y + 1`` rounded as there (``* 0.5`` is exact): for every
    float32 ``u`` in [0, 2], ``0.5 + 32767.5 u`` rounded once (fused) or twice truncates to the same integer
    (checked exhaustively over all 2^24 + 2^23 + 1 of them: tests/test_quant_table.py). Without the clamp:
    a finite ``y = x * (1 / N_b)`` with ``|x| <= N_b`` is within a rounding of [-1, 1], where ``j`` equals
    the clamped value's; :func:`quantize_blockwise_8bit_table` maps the rest (see there) before.
    """
    torch.add(_HALF, normalized.add_(1.0), alpha=32767.5, out=normalized)
    return normalized


_HALF = torch.tensor(0.5)


def quantize_blockwise_8bit_table(flat: Tensor, name: str, block_size: int) -> tuple[Tensor, Tensor]:
    """bitsandbytes' CPU ``quantize_blockwise`` of the flat float32 ``flat`` (codes and absmax bit for bit)
    for the map ``name``, in torch operations: per block ``N_b = max |x_b|`` (zero padding of the last
    block changes nothing), ``y = x * (1 / N_b)`` (a float32 reciprocal, then a product, as there), the
    point index of :func:`table_rows_` and its code from :func:`_point_table`. In a block where ``N_b`` or
    ``1 / N_b`` is not finite (a zero block: ``0 * inf`` is NaN; ``N_b`` below ~2.9e-39: +-inf; an infinite
    value: ``inf * 0``), ``nan_to_num`` plays bitsandbytes' clamp: +-inf to +-1, NaN to -1 (point 0, code 0:
    bitsandbytes' zeros of a zero block, and its code of a NaN). A NaN input is not matched: torch's maximum
    makes ``N_b`` NaN, bitsandbytes' skips it.

    Whole blocks of at most :data:`TABLE_PIECE` values a pass (:func:`_table_codes`: a float32 and an int32
    temporary, :data:`TABLE_PIECE_BYTES` per value), a partial last block on its own.
    """
    n = flat.numel()
    table = _point_table(name)
    if n <= TABLE_PIECE and n % block_size == 0:  # one pass (the fewest operations: small tensors)
        return _table_codes(flat.view(-1, block_size), table)
    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty(num_blocks(n, block_size), dtype=torch.float32)
    whole = n - n % block_size
    step = max(TABLE_PIECE // block_size, 1) * block_size
    pieces = [(start, min(start + step, whole)) for start in range(0, whole, step)] + ([(whole, n)] if whole < n else [])
    for start, stop in pieces:
        blocks = _blocks(flat[start:stop], block_size)  # (a view; the partial last block: padded)
        _table_codes(blocks, table, codes[start:stop], absmax[start // block_size : -(-stop // block_size)])
    return codes, absmax


def _table_codes(blocks: Tensor, table: Tensor, codes: Tensor | None = None,
                 absmax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One pass of :func:`quantize_blockwise_8bit_table` over ``blocks [nb, B]``: the codes of the first
    ``codes.numel()`` values (all when ``None``) and the blocks' absmax, written into ``codes`` / ``absmax``
    when given."""
    y = torch.abs(blocks)
    absmax = y.amax(dim=1) if absmax is None else torch.amax(y, dim=1, out=absmax)
    torch.mul(blocks, absmax.reciprocal().unsqueeze(1), out=y).nan_to_num_(-1.0, 1.0, -1.0)  # (no host read to skip it)
    rows = table_rows_(y).view(-1).to(torch.int32)  # trunc, as the float-to-int conversion there
    if codes is None:
        return table.index_select(0, rows), absmax
    torch.index_select(table, 0, rows[: codes.numel()], out=codes)
    return codes, absmax


def dequantize_blockwise_8bit(codes: Tensor, absmax: Tensor, code: Tensor, block_size: int) -> Tensor:
    """Inverse of :func:`quantize_blockwise_8bit`: ``x = code[q] * N_b`` (flat float32)."""
    import bitsandbytes.functional as bnbF

    return bnbF.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=block_size)


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """Flatten and zero-pad ``x`` to whole blocks: ``[num_blocks, block_size]``.

    Per-block scalars then broadcast along dim 1. (Gathering them by ``arange(n) // block_size``
    instead is miscompiled by torch 2.13's CPU inductor when ``n`` is not a multiple of a
    power-of-two ``block_size``: the last partial block reads block 0.)"""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def nearest_code(normalized: Tensor, code: Tensor, name: str | None = None) -> Tensor:
    """Index of the nearest entry of the sorted ``code`` for every value (ties go to the lower one).

    The reference is a search among the midpoints of ``code``: the index is the number of
    midpoints strictly below the value (``searchsorted(..., right=False)``; NaN gives the last
    index). ``name``, the map's name when ``code`` is :func:`code_map` of it, selects a faster form
    that returns the same int32 indices for every float32 input: arithmetic for
    ``"linear4_nozero"`` (:func:`nearest_linear4`), a table lookup for ``"dynamic4_signed"``
    (:func:`nearest_by_cells`); other maps (or ``None``) search. Those forms are faster on the CPU; on
    any other device (:func:`launch_bound`) a named map is searched, with its midpoints kept per device:
    one kernel instead of the arithmetic's five or the cell table's ten, the same indices.
    """
    if name is not None and launch_bound(normalized.device):
        return torch.searchsorted(_midpoints(name, str(normalized.device)), normalized.contiguous(), right=False,
                                  out_int32=True)
    if name == "linear4_nozero":
        return nearest_linear4(normalized)
    if name == "dynamic4_signed":
        return nearest_by_cells(normalized, name)
    return nearest_code_search(normalized, code)


def launch_bound(device: torch.device) -> bool:
    """Whether ``device`` pays per kernel launch (every device but the CPU): there the codecs take their forms
    with the fewest kernels (:func:`nearest_code`'s search, :func:`block_absmax`'s one reduction), on the CPU
    the fastest ones; the results are the same bits."""
    return device.type != "cpu"


@lru_cache(maxsize=None)
def _midpoints(name: str, device: str) -> Tensor:
    code = _code_map_cpu(name)
    return ((code[1:] + code[:-1]) / 2).to(device)


def nearest_code_search(normalized: Tensor, code: Tensor) -> Tensor:
    """:func:`nearest_code` by binary search among the midpoints (the reference form)."""
    midpoints = (code[1:] + code[:-1]) / 2
    return torch.searchsorted(midpoints, normalized.contiguous(), right=False, out_int32=True)


def nearest_linear4(normalized: Tensor) -> Tensor:
    """:func:`nearest_code` for the linear map ``(i + 1) / 16`` (Li et al. 2023, Section 4.1), arithmetically.

    The midpoints are ``(2i + 3) / 32``, ``i = 0..14``, so the number below ``x`` is
    ``clamp(ceil(16 x - 1.5), 0, 15)`` (a tie, ``x`` on a midpoint, gives ``i``: the lower code).
    Exact in float32: ``16 x`` is exact, and ``16 x - 1.5`` is exact for ``0.75 <= 16 x < 2**23``
    (both are multiples of ``16 x``'s last place); below, the rounded difference stays in
    ``[-1.5, 0]`` and above it stays above 15, which the clamp maps as the exact value would. NaN
    gives 15 (as the search), infinities 0 and 15. About 5x faster than the search on CPU.
    """
    return _nearest_linear4_float(normalized).to(torch.int32)


def _nearest_linear4_float(normalized: Tensor) -> Tensor:
    """:func:`nearest_linear4` before its int32 conversion: float32 integers ``0..15``."""
    return normalized.mul(16.0).sub_(1.5).ceil_().nan_to_num_(15.0).clamp_(0.0, 15.0)


_CELLS_PER_UNIT = 512  # cell width 1/512, below the smallest gap between dynamic4_signed's midpoints (0.0054)


@lru_cache(maxsize=None)
def _cell_table(name: str, device: str) -> tuple[Tensor, Tensor]:
    """For :func:`nearest_by_cells`: per cell ``c``, the number of midpoints whose cell is below ``c``,
    and the midpoints followed by ``+inf``; raises if two midpoints share a cell."""
    code = _code_map_cpu(name)
    midpoints = (code[1:] + code[:-1]) / 2
    k = _CELLS_PER_UNIT
    if midpoints.abs().max() >= 1:
        raise ValueError(f"code map {name!r}: midpoints outside (-1, 1) do not fit the cell table")
    cells = _cells(midpoints)
    if torch.bincount(cells.long()).max() > 1:
        raise ValueError(f"code map {name!r}: two midpoints share a cell of width 1/{k}")
    # (the cells are sorted, as the midpoints: the count below cell c is c's leftmost insertion point)
    table = torch.searchsorted(cells, torch.arange(2 * k, dtype=torch.int32), right=False, out_int32=True)
    mid_ext = torch.cat([midpoints, midpoints.new_full((1,), math.inf)])
    return table.to(device), mid_ext.to(device)


def _cells(x: Tensor) -> Tensor:
    """Cell ``floor(512 x) + 512`` of every value, clamped to ``[0, 1023]`` (NaN: the last cell), int32.
    Multiplying by 512 is exact, so the cell is a non-decreasing function of ``x``."""
    k = _CELLS_PER_UNIT
    return x.mul(float(k)).floor_().nan_to_num_(float(k - 1)).clamp_(-k, k - 1).add_(k).to(torch.int32)


def nearest_by_cells(normalized: Tensor, name: str) -> Tensor:
    """:func:`nearest_code` by a table over cells of width 1/512 (values outside ``[-1, 1)`` join the end cells).

    Midpoints in cells below ``x``'s cell are below ``x`` and those in cells above are above it
    (the cell is monotone in ``x``); at most one midpoint shares ``x``'s cell (checked when the
    table is built), and it is ``mid[table[c]]``. So the index is ``table[c] + (x > mid[table[c]])``:
    the search's count of midpoints below ``x``, ties and NaN included (NaN compares false and its
    cell's count is 15). Used for ``dynamic4_signed``; about 4x faster than the search on a chunk.
    """
    table, mid_ext = _cell_table(name, str(normalized.device))
    lo = table.index_select(0, _cells(normalized).reshape(-1)).view(normalized.shape)
    return lo.add_(torch.gt(normalized, mid_ext.index_select(0, lo.reshape(-1)).view(normalized.shape)))


def pack_4bit(idx: Tensor, out: Tensor | None = None) -> Tensor:
    """Two 4-bit codes per byte: element ``2i`` in the high nibble, ``2i + 1`` in the low nibble.

    ``idx``: codes ``0..15`` of any integer or float dtype (floats holding those integers), converted to
    ``uint8`` first; the byte ``16 idx[2i] + idx[2i + 1]`` (at most 255: exact in ``uint8``) is then one
    add, two operations in all (not a conversion, a shift and an or). ``out``: a ``uint8`` tensor of
    ``ceil(n / 2)`` bytes to write them to (e.g. the state's codes), else a new one. Integer codes on a
    device that pays per launch (:func:`launch_bound`: the search's int32 indices) are added in their own
    dtype and written as ``uint8`` (the byte is at most 255: the same bytes), one kernel instead of a
    conversion and an add (an even count: no padded copy of the wider codes)."""
    idx = idx.reshape(-1)
    if not idx.is_floating_point() and launch_bound(idx.device) and idx.numel() % 2 == 0:
        if out is None:
            out = torch.empty(idx.numel() // 2, dtype=torch.uint8, device=idx.device)
        return torch.add(idx[1::2], idx[0::2], alpha=16, out=out)
    idx = idx.to(torch.uint8)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    if out is None:
        return torch.add(idx[1::2], idx[0::2], alpha=16)
    return torch.add(idx[1::2], idx[0::2], alpha=16, out=out)


def unpack_4bit(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_4bit`: ``n`` codes as int32."""
    both = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)
    return both[:n].int()


def lookup_4bit(packed: Tensor, values: Tensor, n: int) -> Tensor:
    """``values[unpack_4bit(packed, n)]`` (16 values, e.g. a code map) without unpacking: one gather per
    byte from the 256 x 2 table of ``(values[b >> 4], values[b & 15])``, the same elements (about 4x
    faster on CPU than unpacking to int32 and indexing)."""
    return lookup_4bit_pairs(packed, _pairs(values), n)


def _pairs(values: Tensor) -> Tensor:
    """``[256, 2]``: row ``b`` is ``(values[b >> 4], values[b & 15])``."""
    return torch.stack([values.repeat_interleave(16), values.repeat(16)], dim=1)


def lookup_4bit_pairs(packed: Tensor, pairs: Tensor, n: int) -> Tensor:
    """:func:`lookup_4bit` with its ``256 x 2`` table given (:func:`lookup_pairs`: kept per device)."""
    return pairs.index_select(0, packed.int()).view(-1)[:n]


def quantize_blockwise_4bit(x: Tensor, code: Tensor, block_size: int, name: str | None = None,
                            out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """4-bit blockwise quantization (Li et al. 2023, Section 3: block-wise normalization ``B128``).

    Each block is divided by its absolute maximum and mapped to the nearest of the 16 ``code``
    values (``name``: the map's name, for :func:`nearest_code`'s fast forms).
    Returns ``(packed uint8 [ceil(n / 2)], absmax float32 [num_blocks])``, written into ``out`` (the
    state's codes and absmax, contiguous) when given: no copy of them afterwards.
    """
    n = x.numel()
    blocks = _blocks(x, block_size)
    absmax = block_absmax(blocks, None if out is None else out[1])
    normalized = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)
    return nearest_packed(normalized.reshape(-1)[:n], code, name, None if out is None else out[0]), absmax


def block_absmax(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    """``max |x|`` of each row of ``blocks [nb, B]``: ``abs().amax(dim=1)`` on the CPU, one
    ``vector_norm(ord=inf)`` elsewhere (:func:`launch_bound`; one kernel instead of two, no ``|x|`` copy; on
    the CPU it is about 16x slower). The same values, NaN and infinities included. ``out``: float32 ``[nb]``
    to write them to."""
    if launch_bound(blocks.device):
        return torch.linalg.vector_norm(blocks, ord=math.inf, dim=1, out=out)
    return blocks.abs().amax(dim=1) if out is None else torch.amax(blocks.abs(), dim=1, out=out)


def nearest_packed(normalized: Tensor, code: Tensor, name: str | None = None, out: Tensor | None = None) -> Tensor:
    """``pack_4bit(nearest_code(normalized, code, name), out)``: the packed codes of the flat ``normalized``.
    For ``"linear4_nozero"`` the codes stay float32 (:func:`nearest_linear4`'s value before its int32
    conversion, an integer ``0..15``) and are packed from there: the same bytes, two conversions fewer."""
    if name == "linear4_nozero" and not launch_bound(normalized.device):
        return pack_4bit(_nearest_linear4_float(normalized), out)
    return pack_4bit(nearest_code(normalized, code, name), out)


def dequantize_blockwise_4bit(packed: Tensor, absmax: Tensor, code: Tensor, block_size: int, n: int,
                              name: str | None = None) -> Tensor:
    """Inverse of :func:`quantize_blockwise_4bit`: ``x = code[q] * N_b`` (flat float32 of ``n`` values).
    ``name``: the map's name when ``code`` is :func:`code_map` of it (its lookup table is then kept per device,
    :func:`lookup_pairs`)."""
    pairs = lookup_pairs(name, str(packed.device)) if name is not None else _pairs(code)
    values = _blocks(lookup_4bit_pairs(packed, pairs, n), block_size)
    return (values * absmax.unsqueeze(1)).reshape(-1)[:n]


# ---- several tensors' blocks at once (the multi-tensor step) ---------------------------------


def dequantize_blockwise_cat(codes: list[Tensor], absmax: list[Tensor], code: Tensor, block_size: int, bits: int,
                             n: int, name: str | None = None) -> Tensor:
    """The blockwise codes of several tensors decoded in one call: flat float32 of their ``n`` values
    in all, one after another.

    Every tensor must hold whole blocks (its size a multiple of ``block_size``, which is even, so a
    4-bit tensor also holds whole bytes): the concatenation of the codes and of the absmax values is
    then the blockwise code of the concatenated values, and each value is decoded as alone
    (``code[q] * N_b``, Dettmers et al. 2022 Section 2; Li et al. 2023 Section 3), bit for bit.
    """
    cat_codes = codes[0] if len(codes) == 1 else torch.cat(codes)
    cat_absmax = absmax[0] if len(absmax) == 1 else torch.cat(absmax)
    if cat_absmax.numel() * block_size != n:
        raise ValueError(f"dequantize_blockwise_cat: {cat_absmax.numel()} blocks of {block_size} for {n} values;"
                         " every tensor must hold whole blocks")
    if bits == 8:
        return dequantize_blockwise_8bit(cat_codes, cat_absmax, code, block_size)
    return dequantize_blockwise_4bit(cat_codes, cat_absmax, code, block_size, n, name)


def quantize_blockwise_split(x: Tensor, code: Tensor, block_size: int, bits: int, numels: list[int],
                             name: str | None = None) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Inverse of :func:`dequantize_blockwise_cat`: the flat float32 ``x`` (tensors of ``numels``
    elements one after another, each whole blocks) quantized in one call (:func:`quantize_blockwise_8bit`
    or :func:`quantize_blockwise_4bit`; ``name``: the 4-bit map's, for :func:`nearest_code`), returned
    as each tensor's ``(codes, absmax)``: views of the one result, the same bits as each tensor alone."""
    if bits == 8:
        codes, absmax = quantize_blockwise_8bit(x, code, block_size, name)
    else:
        codes, absmax = quantize_blockwise_4bit(x, code, block_size, name)
    per_byte = 1 if bits == 8 else 2
    return codes.split([k // per_byte for k in numels]), absmax.split([k // block_size for k in numels])


def joint_codes(floats: list[Tensor], codes4: list[Tensor], codes8: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Copies of several tensors' float32 scales (absmax, rank-1 maxima, min / max) and ``uint8`` codes made by one
    ``torch.cat`` (one kernel off the CPU, instead of one concatenation per moment and kind), returned as three
    views of that buffer: ``(scales float32 [sum of numels], 4-bit codes uint8, 8-bit codes uint8)``, each the
    given tensors one after another. The scales are copied as their bytes (``view(torch.uint8)``): the same
    values. Layout: the 8-bit codes first (at the buffer's start, as bitsandbytes' codec got them from their own
    concatenation; whole blocks of at least 64 values each, so what follows starts on a 64-byte boundary), then
    the scales (a multiple of 4 bytes each: the float32 view is aligned), then the 4-bit codes."""
    parts = ([c.reshape(-1) for c in codes8] + [f.reshape(-1).view(torch.uint8) for f in floats]
             + [c.reshape(-1) for c in codes4])
    n8, nf = sum(c.numel() for c in codes8), 4 * sum(f.numel() for f in floats)
    if n8 % 4:
        raise ValueError(f"joint_codes: {n8} bytes of 8-bit codes; the scales after them need a multiple of 4")
    buf = torch.cat(parts)
    return buf[n8 : n8 + nf].view(torch.float32), buf[n8 + nf :], buf[:n8]


# ---- rank-1 normalization (Li et al. 2023, Section 4.2) --------------------------------------


def rank1_maxima(x: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column maxima of the last two dimensions of a non-negative ``x`` (``ndim >= 2``).

    Returns float32 ``(row_max [..., m], col_max [..., n])`` for ``x`` of shape ``[..., m, n]``
    (Li et al. 2023, Section 4.2: ``r_i = max_j x_ij``, ``c_j = max_i x_ij``).
    """
    x = x.float()
    return x.amax(dim=-1), x.amax(dim=-2)


def rank1_scale(row_max: Tensor, col_max: Tensor) -> Tensor:
    """Rank-1 normalization scale ``N_ij = min(r_i, c_j)`` (Li et al. 2023, Section 4.2), ``[..., m, n]``."""
    return torch.minimum(row_max.unsqueeze(-1), col_max.unsqueeze(-2))


def quantize_rank1_4bit(
    x: Tensor, code: Tensor, col_max: Tensor | None = None, name: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """4-bit quantization of a non-negative ``x`` (``ndim >= 2``) with rank-1 normalization.

    Li et al. 2023, Section 4.2: every entry is divided by ``min(r_i, c_j)`` (its row and column
    maxima over the last two dimensions; the quotient lies in ``[0, 1]``) and mapped to the nearest
    of the 16 ``code`` values (for the second moment, the linear map without zero, Section 4.1).
    Returns ``(packed uint8 [ceil(numel / 2)], row_max float32 [..., m], col_max float32 [..., n])``.

    ``col_max``: the column maxima of the whole matrix when ``x`` holds only some of its rows (the
    chunked step: row maxima are complete in a chunk of whole rows, column maxima come from a pass
    over all chunks); ``None`` computes them from ``x``. ``name``: the map's name, for
    :func:`nearest_code`'s fast forms.
    """
    x = x.float()
    row_max = x.amax(dim=-1)
    if col_max is None:
        col_max = x.amax(dim=-2)
    scale = rank1_scale(row_max, col_max).clamp(min=torch.finfo(torch.float32).tiny)
    return nearest_packed((x / scale).reshape(-1), code, name), row_max, col_max


def dequantize_rank1_4bit(packed: Tensor, row_max: Tensor, col_max: Tensor, code: Tensor,
                          name: str | None = None) -> Tensor:
    """Inverse of :func:`quantize_rank1_4bit`: ``x_ij = code[q_ij] min(r_i, c_j)``, shape ``[..., m, n]``.
    ``name``: as :func:`dequantize_blockwise_4bit`'s."""
    scale = rank1_scale(row_max, col_max)
    pairs = lookup_pairs(name, str(packed.device)) if name is not None else _pairs(code)
    return lookup_4bit_pairs(packed, pairs, scale.numel()).view(scale.shape) * scale


# ---- asymmetric min/max 4-bit (MicroAdam's error feedback) ----------------------------------


_LEVELS = torch.arange(16, dtype=torch.float32)


def quantize_minmax_4bit(x: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit quantization per block (MicroAdam, Modoranu et al. 2024, Algorithm 1 lines 7-8).

    ``delta = min(x_b)``, ``Delta = max(x_b)``, ``u = (Delta - delta) / 15``,
    ``q = round((x - delta) / u)`` clamped to ``[0, 15]`` (``q = 0`` where ``u = 0``).
    Returns ``(packed uint8 [ceil(n / 2)], delta float32 [num_blocks], Delta float32 [num_blocks])``.
    The padding of a partial last block does not enter its min/max.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % block_size

    def padded(value: float) -> Tensor:  # (whole blocks: the tensor itself, no copy)
        return (torch.nn.functional.pad(flat, (0, pad), value=value) if pad else flat).view(-1, block_size)

    lo, hi = padded(math.inf).amin(dim=1), padded(-math.inf).amax(dim=1)
    q = minmax_levels(padded(0.0), lo, hi)
    return pack_4bit(q.reshape(-1)[:n]), lo, hi


def minmax_top(device: torch.device | str) -> Tensor | float:
    """The ``15`` of ``u = (Delta - delta) / 15`` (:func:`minmax_levels`, :func:`dequantize_minmax_4bit_blocks`) as
    the divisor of tensors on ``device``: the number on the CPU; on any other device a 0-dim float32 tensor there
    (made once per device and kept, 4 B; read-only). CUDA's eager division by a number (a CPU scalar) is not a
    division: ATen's ``div_true_kernel_cuda`` multiplies by the reciprocal, ``fl(x fl(1/15))``, which differs from
    the correctly rounded ``x / 15`` by an ulp for part of the inputs, while the CPU's eager division and
    ``torch.compile``'d code (Triton with ``division_rounding``) divide. So MicroAdam's plain path on an H200 chose
    other error codes and top-k entries than its compiled path (the first session-14 run: state not equal,
    ``tests/test_microadam.py::test_compiled_path_equals_plain[*-cuda]``). By a tensor on the device every path
    divides (the CPU's bits are unchanged: the number is kept there)."""
    d = torch.device(device)
    return 15.0 if d.type == "cpu" else _minmax_top_on(str(d))


@lru_cache(maxsize=None)
def _minmax_top_on(device: str) -> Tensor:
    return torch.tensor(15.0, dtype=torch.float32, device=device)


def minmax_levels(blocks: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The levels ``q = round((x - delta) / u)`` clamped to ``[0, 15]`` (``0`` where ``u = 0``) of
    ``blocks [nb, B]`` with their per-block ``delta = lo``, ``Delta = hi`` (:func:`quantize_minmax_4bit`),
    float32 ``[nb, B]``: one new tensor, every later operation in place."""
    unit = ((hi - lo) / minmax_top(hi.device)).unsqueeze(1)
    q = (blocks - lo.unsqueeze(1)).div_(unit.clamp(min=torch.finfo(torch.float32).tiny))
    return q.add_(0.5).floor_().clamp_(0, 15).masked_fill_(~(unit > 0), 0.0)


def dequantize_minmax_4bit_blocks(packed: Tensor, lo: Tensor, hi: Tensor, block_size: int, n: int) -> Tensor:
    """:func:`dequantize_minmax_4bit` as ``[num_blocks, block_size]`` (the padding reads ``delta``)."""
    q = _blocks(lookup_4bit_pairs(packed, lookup_pairs("levels", str(packed.device)), n), block_size)  # 0..15, float32
    unit = (hi - lo) / minmax_top(hi.device)
    return lo.unsqueeze(1) + q * unit.unsqueeze(1)


def dequantize_minmax_4bit(packed: Tensor, lo: Tensor, hi: Tensor, block_size: int, n: int) -> Tensor:
    """Inverse of :func:`quantize_minmax_4bit`: ``x = delta + q u`` (Algorithm 1, line 4's ``Q^{-1}``)."""
    return dequantize_minmax_4bit_blocks(packed, lo, hi, block_size, n).reshape(-1)[:n]
