"""MicroAdam's moment rule: Adam's statistics rebuilt from a ring buffer of sparse gradients.

The math is in :mod:`lowmem.optim.functional.microadam` (Modoranu et al. 2024, Algorithm 1);
this class allocates the state and calls it. State per parameter of ``d`` entries (``k`` about
``density * d``, ``m`` ring rows):

* ``microadam_indices``: ``int16 [m, k]``, block-relative top-k indices (2 m k bytes);
* ``microadam_values``: ``bfloat16 [m, k]``, the kept values (2 m k bytes);
* ``microadam_error``: ``uint8 [ceil(d / 2)]``, the 4-bit error feedback (d / 2 bytes);
* ``microadam_error_min`` / ``microadam_error_max``: ``float32 [ceil(d / quant_block_size)]``.

At the defaults (``m = 10``, ``k_init = 0.01``) that is ``0.4 + 0.5 + 8 / quant_block_size``
bytes per parameter. The ring position is ``(t - 1) mod m``, derived from the step count, so
resuming from a checkpoint is exact.

Group keys: ``m``, ``k_init``, ``quant_block_size``, ``topk_block_size``, ``betas``, ``eps``.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import torch
from torch import Tensor

from .functional import microadam as MA
from .functional import quant as Q
from .moments import ChunkState, MomentRule, step_whole_from_piece_
from .quantized import apply_updates_foreach_


# The inductor's settings that keep eager's float32 arithmetic off the CPU (on it they change nothing: the C++
# backend compiles with -ffp-contract=off and divides exactly): no fused multiply-add (Triton's
# enable_fp_fusion, off under emulate_precision_casts: ``a.mul_(u).add_(lo)`` would round once instead of
# twice), a correctly rounded division (Triton's ``/`` is div.full, approximate, without division_rounding)
# and no flushing of subnormals to zero. The first GPU run's bf16 difference (169 of 60,000 weights one bf16
# ulp apart, docs/benchmarks.md "First GPU run") came from such roundings moving a 4-bit error code or a
# top-k choice; on the CPU the one difference was the quotient's sqrt (:func:`MA.direction_from_sums_`).
EAGER_NUMERICS = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True,
                  "eager_numerics.disable_ftz": True}


def _error_sum_rows(g, error, lo, hi, top, quant_block_size):
    """:func:`MA.error_sum_rows` (line 4), compiled on its own: its inputs, the stacked gradients among them,
    are released when it returns (:func:`_compiled`)."""
    return MA.error_sum_rows(g, error, lo, hi, quant_block_size, top)


def _sparsify_rows(a, top, d, block, k_block, k_last, quant_block_size):
    """:func:`MA.sparsify_rows_` (lines 5-8) with the layout's numbers as arguments (symbolic under
    ``dynamic=True``: one graph for every size of joined row, instead of a recompile per :class:`MA.TopKLayout`)."""
    return MA.sparsify_rows_(a, MA.TopKLayout(d, block, d // block, k_block, k_last), quant_block_size, top)


def _window_sums_rows(indices, values, w1, w2, d, block, k_block, k_last):
    """:func:`MA.window_sums_rows` with the layout's numbers as arguments (as :func:`_sparsify_rows`)."""
    return MA.window_sums_rows(indices, values, w1, w2, MA.TopKLayout(d, block, d // block, k_block, k_last))


@lru_cache(maxsize=None)
def _compiled(device_type: str):
    """The fused path: ``(compress, window_sums)``, the row functions (a tensor alone is a group of one row)
    under :func:`torch.compile` with :data:`EAGER_NUMERICS`, the quotient of line 12 left eager
    (:func:`MA.direction_from_sums_`).

    ``compress(g, error, lo, hi, top, block, k_block, k_last, quant_block_size)`` is
    :func:`MA.compress_rows_` as two compiled functions, line 4 (:func:`_error_sum_rows`) and lines 5-8
    (:func:`_sparsify_rows`, in place in line 4's sum), with ``g`` the stacked gradients or a function that makes
    them (as :func:`MA.compress_rows_` takes them): they are dropped between the two calls. One compiled function
    of both held the joined gradients through the whole compression (4 B per element; the caller made them, since a
    compiled function takes tensors) and its sum next to the scattered copy the inductor made of it.

    Symbolic shapes (``dynamic=True``) on every device: the joined rows of the buckets have many sizes.
    On CPU they are needed anyway: with static shapes torch 2.13's C++ inductor splits a loop over
    ``i // block_size`` without its remainder when a tensor's length is not a multiple of the block
    (``try_loop_split``), leaving the last partial block unwritten.
    """
    error_sum = torch.compile(_error_sum_rows, dynamic=True, options=EAGER_NUMERICS)
    sparsify = torch.compile(_sparsify_rows, dynamic=True, options=EAGER_NUMERICS)

    def compress(g, error, lo, hi, top, block, k_block, k_last, quant_block_size):
        g = g() if callable(g) else g
        d = g.shape[1]
        a = error_sum(g, error, lo, hi, top, quant_block_size)
        del g  # (the caller's function made it: freed here, before the top-k and the quantization)
        return sparsify(a, top, d, block, k_block, k_last, quant_block_size)

    return compress, torch.compile(_window_sums_rows, dynamic=True, options=EAGER_NUMERICS)


def _top(device: str) -> Tensor:
    """15 (the 4-bit levels' top) as a 0-dim float32 tensor per device, the compiled path's divisor
    (:func:`MA.minmax_levels`): the one the plain path divides by off the CPU
    (:func:`~lowmem.optim.functional.quant.minmax_top`), kept per device; read-only."""
    return Q._minmax_top_on(str(torch.device(device)))


def _stacked(xs: list[Tensor], dim: int = 0) -> Tensor:
    """Tensors of one layout as the rows of a stack (``dim``: where :func:`_one_row` joins them)."""
    return torch.stack(xs)


def _one_row(xs: list[Tensor], dim: int = 0) -> Tensor:
    """Tensors of whole blocks one after another along ``dim`` (the ring buffer's ``[m, k]``: its entries),
    as a stack of one row."""
    return torch.cat(xs, dim=dim).unsqueeze(0)


def _joined_errors(states: list[dict[str, Tensor]], rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """The error feedback's codes, minima and maxima of ``states`` joined as ``rows`` rows (a stack: one per
    tensor; one row: one after another), as :func:`_stacked` / :func:`_one_row` join them, the same values, by
    one ``torch.cat`` of their bytes (:func:`~lowmem.optim.functional.quant.joint_codes`; three before)."""
    lo, hi = [s["microadam_error_min"] for s in states], [s["microadam_error_max"] for s in states]
    fl, codes, _ = Q.joint_codes(lo + hi, [s["microadam_error"] for s in states], [])
    n_lo = sum(t.numel() for t in lo)
    return codes.view(rows, -1), fl[:n_lo].view(rows, -1), fl[n_lo:].view(rows, -1)


def eager_direction_bytes(numel: int, width: int, kept: int, ring_entries: int, quant_blocks: int) -> int:
    """Bytes the plain (eager) :meth:`MicroAdamMoments.direction` of ``numel`` elements allocates, phase
    by phase as :func:`~lowmem.optim.functional.microadam.compress_` and
    :func:`~lowmem.optim.functional.microadam.window_direction` run (Algorithm 1, lines 4-12), with
    ``width`` the elements padded to whole quantization blocks (``quant_blocks`` of them), ``kept`` the
    top-k's ``k`` and ``ring_entries`` the window's ``m k``; measured with the live-tensor tracker:

    * line 4, the error feedback decoded (:func:`~lowmem.optim.functional.quant.dequantize_minmax_4bit_blocks`:
      its levels, ``q u`` and ``delta + q u``, 12 B per padded element) and added to the gradient (the
      decoded error, the sum, and the gradient's padded copy when ``width > numel``);
    * line 5, the top-k: ``a``, ``|a|`` and the top-k's values and int64 indices (12 B per kept entry);
    * lines 7-8, ``a`` quantized (:func:`~lowmem.optim.functional.quant.quantize_minmax_4bit`: a padded
      copy of ``a`` when ``width > numel``, the levels, their uint8 codes and packing, 2 B per element)
      next to the kept entries' int16 indices, bfloat16 values and int64 global indices (12 B per entry);
    * lines 10-12, the window (:func:`~lowmem.optim.functional.microadam.window_direction`): the two sums
      (8 B per element, the direction is one of them) and per ring entry its global index, float value
      and weighted copy (16 B), next to the compression's outputs (the new codes, 0.5 B per element,
      the kept entries and the per-block min / max) and the top-k offsets (8 B per entry).

    At the defaults the decoding is the peak: 12 B per element (6.29 MB for a chunk of 2^19, measured
    6.29; a 300-element bias in one block of 2,048: 24,576, measured 24,692). 1 KiB more for the step's
    small tensors (the 4-bit table, the age weights)."""
    padded = width > numel
    decode = 12 * width + 8 * quant_blocks  # (and then the gradient's padded copy, the decoded error, the sum)
    topk = 4 * width + 4 * numel + 12 * kept
    quantize = (12 * width if padded else 8 * width + 2 * numel) + 12 * kept + 16 * quant_blocks
    window = 8 * numel + 16 * ring_entries + -(-numel // 2) + 12 * kept + 8 * quant_blocks
    return max(decode, topk, quantize, window) + 1024


def stacked_compress_bytes(numel: int, width: int, kept: int) -> int:
    """Bytes :func:`~lowmem.optim.functional.microadam.compress_rows_` allocates per row (tensor) of
    ``numel`` elements padded to ``width`` (whole quantization blocks) keeping ``kept`` (``k``) entries,
    measured on CPU with the live-tensor tracker. The stacked gradient is made inside and dropped once added
    to the decoded error, which is decoded in place in its levels (session 8; before: 16.5 B per element),
    so the peak is the decoding (the gradient, the error codes and their levels with the lookup's int32
    index, 10.3-10.5 B per element when no row is padded: 10.5 counted) or the quantization, with the kept
    entries' indices and values (14 B per kept entry); a padded row also copies the gradient, levels and ``a``
    at the padded width (24.5 B per element at 2,100 elements in blocks of 2,048, 14.4 at 3,000 in blocks of
    64: counted as 3 B per element + 11 B per padded element). When many entries are kept, the top-k's phase:
    ``a``, ``|a|`` and the top-k's int64 indices (made global in place) and values (8.5 B per element and
    28 B per kept entry)."""
    if width == numel:
        return max(21 * numel // 2 + 14 * kept, 17 * numel // 2 + 28 * kept)
    return max(3 * numel + 11 * width + 14 * kept, 17 * width // 2 + 28 * kept)


def stacked_window_bytes(numel: int, ring_entries: int) -> int:
    """Bytes :func:`~lowmem.optim.functional.microadam.window_direction_rows` allocates per row of
    ``numel`` elements with ``ring_entries`` (``m k``) entries in its window: the two sums (8 B per
    element, the direction is one of them) and per entry the stacked ring rows, their global indices,
    float and weighted values (20 B); measured 18.0 B per element at ``m k = d / 2``."""
    return 8 * numel + 20 * ring_entries


#: The 256 x 2 float32 table of the 4-bit levels' pairs that the compiled line 4 builds per call (its output code:
#: a buffer of the graph, not the eager path's cached ``Q.lookup_pairs``).
COMPILED_TABLE_BYTES = 2048


def compiled_compress_bytes(rows: int, lay: MA.TopKLayout, width: int, quant_blocks: int, joined: bool = True) -> int:
    """Bytes the compiled compression (:func:`_compiled`'s ``compress``: line 4, :func:`_error_sum_rows`, then
    lines 5-8, :func:`_sparsify_rows`) allocates for ``rows`` rows of top-k layout ``lay`` (``d`` elements, ``k``
    kept, ``k_last`` of them in a partial last block of ``rest`` elements), each padded to ``width`` (whole
    quantization blocks, ``quant_blocks`` of them), buffer by buffer as torch 2.13's inductor allocates and frees
    them (its output code on the CPU, dynamic shapes; dynamo specializes a size of 1, so one row and a stack of
    rows are different graphs):

    * ``joined`` (the bucket path): the error codes and minima / maxima joined by the caller (``ceil(d / 2)`` and
      ``8 nb`` per row), alive throughout, and the joined gradients (``4 d``), dropped once line 4 returns;
    * line 4: the sum ``a`` (``4 width``; one fused kernel) and the levels' pairs table (2 KiB); a stack of rows
      of several quantization blocks also writes the levels, in blocks, beside it (``4 width``);
    * the top-k: ``a``, ``|a|`` of the full blocks (``4 (d - rest)``; a stack of rows of several full blocks
      reshapes it by a copy, beside it), then the top-k's values and int64 indices (12 B per entry); with a
      partial last block, then ``|a|`` of it and its top-k beside the first one's indices;
    * the quantization (one fused kernel): ``a``, the int64 indices (``8 k``; with a partial last block both
      top-k's and their concatenation, ``16 k``), the scattered copy of ``a`` (``4 d``), the kept entries' int16
      indices and bfloat16 values (``4 k``), the new codes (``ceil(d / 2)``) and minima / maxima (``8 nb``).

    Before, one compiled function of lines 4-8 took the joined gradients from the caller, who held them through the
    whole compression, and kept the levels beside the sum: 6 B per element above the eager count (16.2-16.4 B per
    element measured on a bucket at the defaults)."""
    d, k, k_last = lay.d, lay.k, lay.k_last
    kf, full_end, stacked = k - k_last, d - lay.rest, rows > 1
    inputs = rows * (-(-d // 2) + 8 * quant_blocks) if joined else 0
    line4 = rows * (4 * d * joined + 4 * width * (1 + (stacked and quant_blocks > 1))) + COMPILED_TABLE_BYTES
    abs_copy = stacked and lay.full_blocks > 1 and full_end < width
    topk = rows * (4 * width + max(4 * full_end * (1 + abs_copy), 4 * full_end + 12 * kf))
    last = rows * (4 * width + 8 * kf + 4 * lay.rest + 12 * k_last) if k_last else 0
    quantize = rows * (4 * width + 8 * k * (1 + (k_last > 0)) + 4 * d + 4 * k + -(-d // 2) + 8 * quant_blocks)
    return inputs + max(line4, topk, last, quantize)


def compiled_window_bytes(rows: int, numel: int, ring_entries: int, joined: bool = True) -> int:
    """Bytes of the compiled window (:func:`_window_sums_rows`, lines 10-11, and the eager in-place quotient of
    line 12) for ``rows`` rows: the two sums (``8 d``; the direction is one of them) beside the ring rows the caller
    joined (``joined``, the bucket path: 4 B per entry, int16 indices and bfloat16 values). The global indices and
    weighted values are computed inside the one fused kernel (no buffer)."""
    return rows * (8 * numel + 4 * ring_entries * joined)


def stacked_bucket_transient_bytes(layouts: list[tuple[int, ...]], compiled: bool = False, on_cpu: bool = True) -> int:
    """Bytes of :meth:`MicroAdamMoments.foreach_step_`'s stacked path on a bucket whose tensors of one top-k
    layout are stacked as rows, a layout at a time in the order they first appear: ``layouts`` gives
    ``(rows, elements, padded width, kept k, ring entries m k)`` per layout (the last four per row), and for the
    ``compiled`` path also ``(top-k layout, quantization blocks)`` of a row. Each layout's compression (:func:`stacked_compress_bytes`; ``compiled``:
    :func:`compiled_compress_bytes`; off the CPU, ``on_cpu=False``, at least the former count, :data:`CUDA_UNMEASURED`)
    or window (:func:`stacked_window_bytes`; :func:`compiled_window_bytes`) next
    to the directions of the layouts done before it (4 B per element, kept for the multi-tensor update);
    then all the directions (the update itself is in place). 64 B per layout: the step's scalars."""
    worst = alive = 0
    for rows, numel, width, kept, ring_entries, *compiled_layout in layouts:
        if compiled:
            lay, quant_blocks = compiled_layout
            phase = max(compiled_compress_bytes(rows, lay, width, quant_blocks),
                        compiled_window_bytes(rows, numel, ring_entries))
            if not on_cpu and CUDA_UNMEASURED:  # (the former single graph's count: a bound of the new graphs' buffers)
                phase = max(phase, rows * max(stacked_compress_bytes(numel, width, kept) + 6 * numel,
                                              stacked_window_bytes(numel, ring_entries)))
        else:
            phase = rows * max(stacked_compress_bytes(numel, width, kept), stacked_window_bytes(numel, ring_entries))
        worst = max(worst, alive + phase + 64)
        alive += 4 * rows * numel
    return max(worst, alive)


#: The compiled counts (:func:`compiled_compress_bytes`, :func:`compiled_window_bytes`) are the CPU inductor's
#: buffers, measured there. With this flag on, the report off the CPU is at least the former single graph's count
#: (measured on an H200, 2026-11-29: a 2^19 chunk 6,578,176 B for 6,619,648 counted), a bound for the two-graph
#: form of 2026-11-30 until a GPU measured it. Session 14's H200 run (torch 2.11) did, through
#: ``max_memory_allocated``: a bucket of 8 x 256 x 256 4,521,984 B (the CPU count 4,785,728; the bound 8,724,288),
#: a 4000 x 256 tensor 8,968,704 B (count 8,832,024, the difference under the allocator's block rounding; the bound
#: 12,928,024): the bound over-reported by 1.4-1.9x (the GPU report's MicroAdam estimate / later step 1.26 and 1.37),
#: so it is off and CUDA takes the CPU inductor's count (tests/test_microadam.py's CUDA test checks it against the
#: allocator's requested bytes).
CUDA_UNMEASURED = False


def compiled_direction_bytes(lay: MA.TopKLayout, width: int, ring_entries: int, quant_blocks: int,
                             on_cpu: bool = True) -> int:
    """Bytes the compiled :meth:`MicroAdamMoments.direction` of a tensor (or chunk) allocates: its compression as
    one row of views (:func:`compiled_compress_bytes`, nothing joined) or its window (:func:`compiled_window_bytes`
    on the ring's views), and 1 KiB for the step's small tensors (the age weights), as
    :func:`eager_direction_bytes` counts them. Off the CPU (``on_cpu=False``) at least the former count
    (:data:`CUDA_UNMEASURED`): the eager count + 0.5 B per element + 12 B per kept entry."""
    counted = max(compiled_compress_bytes(1, lay, width, quant_blocks, joined=False),
                  compiled_window_bytes(1, lay.d, ring_entries, joined=False)) + 1024
    if on_cpu or not CUDA_UNMEASURED:
        return counted
    eager = eager_direction_bytes(lay.d, width, lay.k, ring_entries, quant_blocks)
    return max(counted, eager + -(-lay.d // 2) + 12 * lay.k)


def use_compiled(device: torch.device, mode: str) -> bool:
    if mode == "never":
        return False
    if mode == "always":
        return True
    return device.type == "cuda" and os.environ.get("LOWMEM_MICROADAM_COMPILE", "1") != "0"


class MicroAdamMoments(MomentRule):
    """Moment rule of MicroAdam (Algorithm 1); returns ``m_hat / (eps + sqrt(v_hat))``.

    Args:
        compile: ``"auto"`` (``torch.compile``'d functions on CUDA, plain ones elsewhere;
            ``LOWMEM_MICROADAM_COMPILE=0`` turns it off), ``"never"`` or ``"always"``.
    """

    state_keys = ("microadam_indices", "microadam_values", "microadam_error", "microadam_error_min", "microadam_error_max")

    def __init__(self, compile: str = "auto"):
        if compile not in ("auto", "never", "always"):
            raise ValueError(f"compile must be 'auto', 'never' or 'always', got {compile!r}")
        self.compile = compile

    @staticmethod
    def layout(numel: int, group) -> MA.TopKLayout:
        return MA.topk_layout(numel, group["topk_block_size"], group["k_init"])

    def init_state(self, state, shape, group, param):
        d, dev = shape.numel(), param.device
        lay = self.layout(d, group)
        m = group["m"]
        state["microadam_indices"] = torch.zeros((m, lay.k), dtype=torch.int16, device=dev)
        state["microadam_values"] = torch.zeros((m, lay.k), dtype=torch.bfloat16, device=dev)
        state["microadam_error"] = torch.zeros(Q.packed_numel(d, 4), dtype=torch.uint8, device=dev)
        nq = Q.num_blocks(d, group["quant_block_size"])
        state["microadam_error_min"] = torch.zeros(nq, dtype=torch.float32, device=dev)
        state["microadam_error_max"] = torch.zeros(nq, dtype=torch.float32, device=dev)

    # ---- the chunked step: whole top-k blocks and whole error-quantization blocks ----

    def chunk_align(self, shape, group, state):
        lay = self.layout(shape.numel(), group)
        return math.lcm(lay.block, group["quant_block_size"], 2)

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        lay = self.layout(shape.numel(), group)
        qbs = group["quant_block_size"]
        full = (stop - start) // lay.block
        last = stop == lay.d and lay.k_last > 0
        chunk_lay = MA.TopKLayout(stop - start, lay.block, full, lay.k_block, lay.k_last if last else 0)
        k0 = (start // lay.block) * lay.k_block
        view = ChunkState(state, start, stop, {"layout": chunk_lay, "parent": state, "shape": shape})
        view["microadam_indices"] = state["microadam_indices"][:, k0 : k0 + chunk_lay.k]
        view["microadam_values"] = state["microadam_values"][:, k0 : k0 + chunk_lay.k]
        view["microadam_error"] = state["microadam_error"][start // 2 : -(-stop // 2)]
        view["microadam_error_min"] = state["microadam_error_min"][start // qbs : -(-stop // qbs)]
        view["microadam_error_max"] = state["microadam_error_max"][start // qbs : -(-stop // qbs)]
        return view

    def cached_bytes(self, states, device) -> int:
        """Bytes the step keeps for the process once the parameters of ``states`` (their state dicts, on ``device``)
        have been stepped there, as :meth:`~lowmem.optim.quantized.Quantized.cached_bytes` (neither state nor a
        later step's allocation; the estimator adds them once per device, ``estimate._kept_table_bytes``):

        * the eager path's 4-bit levels' lookup pairs (``Q.lookup_pairs("levels", device)``, ``256 x 2`` float32,
          2,048 B: the error feedback's decode, line 4), and on a device other than the CPU (and meta, which allocates
          nothing) the divisor 15 as a float32 scalar there (4 B, ``Q.minmax_top``: CUDA's eager division by a number
          multiplies by its reciprocal); where the
          compiled path is on (:func:`use_compiled`), that divisor alone (:func:`_top`; its graph builds the pairs
          per call, :data:`COMPILED_TABLE_BYTES`, a transient);
        * the age weights (:func:`~lowmem.optim.functional.microadam.age_weights`: two ``m``-float32 vectors per
          step, the last :data:`~lowmem.optim.functional.microadam.AGE_WEIGHTS_KEPT` kept), counted full
          (``16 x 4 m`` bytes, ``m`` the largest ring: 640 B at ``m = 10``; a run's first 7 steps keep fewer).

        0 when no state is MicroAdam's. Measured on the CPU (eager): tests/test_kept_microadam.py (the compiled
        path's graphs' own constants are not measured)."""
        rings = [st["microadam_indices"].shape[0] for st in states if "microadam_indices" in st]
        if not rings:
            return 0
        dev = torch.device(device)
        table = 4 if use_compiled(dev, self.compile) else 4 * 2 * 256 + 4 * (dev.type not in ("cpu", "meta"))
        return table + MA.AGE_WEIGHTS_KEPT * 4 * max(rings)

    def transient_bytes(self, numel, shape, group, state):
        """:meth:`direction` of a chunk of ``numel`` elements (its ``m k`` ring entries): the eager
        path's phases (:func:`eager_direction_bytes`, the chunk padded to whole quantization blocks),
        or where the compiled path is on for the state's device (:func:`use_compiled`: CUDA by default,
        the estimator's fake CUDA tensors too) :func:`compiled_direction_bytes`."""
        lay, qbs = self.layout(numel, group), group["quant_block_size"]
        nq = -(-numel // qbs)
        if state and use_compiled(state["microadam_indices"].device, self.compile):
            return compiled_direction_bytes(lay, nq * qbs, group["m"] * lay.k, nq,
                                            on_cpu=state["microadam_indices"].device.type == "cpu")
        return eager_direction_bytes(numel, nq * qbs, lay.k, group["m"] * lay.k, nq)

    def direction(self, g, state, group, t, lr):
        t = int(t)
        m, qbs = group["m"], group["quant_block_size"]
        beta1, beta2 = group["betas"]
        lay = state.extra["layout"] if isinstance(state, ChunkState) else self.layout(g.numel(), group)
        compiled = use_compiled(g.device, self.compile)
        err, e_lo, e_hi = state["microadam_error"], state["microadam_error_min"], state["microadam_error_max"]
        if compiled:  # (the compiled row functions, one row)
            idx, vals, codes, lo, hi = (x[0] for x in _compiled(g.device.type)[0](
                g.reshape(1, -1), err.view(1, -1), e_lo.view(1, -1), e_hi.view(1, -1), _top(str(g.device)),
                lay.block, lay.k_block, lay.k_last, qbs))
        else:
            idx, vals, codes, lo, hi = MA.compress_(g.reshape(-1), err, e_lo, e_hi, lay, qbs)
        row = (t - 1) % m
        state["microadam_indices"][row].copy_(idx)
        state["microadam_values"][row].copy_(vals)
        err.copy_(codes)
        e_lo.copy_(lo)
        e_hi.copy_(hi)
        del idx, vals, codes, lo, hi
        w1 = MA.age_weights(t, m, beta1, g.device)
        w2 = MA.age_weights(t, m, beta2, g.device)
        if compiled:
            sums = _compiled(g.device.type)[1](state["microadam_indices"].unsqueeze(0), state["microadam_values"].unsqueeze(0),
                                               w1, w2, lay.d, lay.block, lay.k_block, lay.k_last)
            return MA.direction_from_sums_(*sums, group["eps"]).view(g.shape)
        u = MA.window_direction(state["microadam_indices"], state["microadam_values"], w1, w2, group["eps"], lay)
        return u.view(g.shape)

    # ---- the multi-tensor step (LowMemOptimizer's foreach buckets) ----

    def supports_foreach_for(self, shape, group, state):
        """Tensors whose window holds at most one entry per two elements (``2 m k <= d``: the bucket's
        temporaries are then bounded per element, :meth:`foreach_transient_bytes`). FSDP2 shards too:
        a shard's layout is its own in the per-parameter sharded step as well (no whole-tensor statistic)."""
        d = math.prod(shape)
        return d > 0 and 2 * group["m"] * self.layout(d, group).k <= d

    def steps_pieces_whole(self, shape, group, state):
        """Always: a tensor in pieces is stepped whole from its first one (:meth:`foreach_step_`)."""
        return True

    @staticmethod
    def joint_key(lay: MA.TopKLayout, quant_block_size: int) -> MA.TopKLayout | tuple[str, int, int]:
        """How :meth:`foreach_step_` groups a tensor of top-k layout ``lay``: a tensor of whole top-k blocks
        and whole error-quantization blocks (and whole bytes of 4-bit codes) joins every such tensor of the
        bucket with the same top-k ``block`` and ``k_block``, whatever its size: ``("blocks", block,
        k_block)`` (one row of them all, :func:`~lowmem.optim.functional.microadam.joint_layout`: every
        block is still one tensor's own); any other tensor is grouped by its layout (stacked rows)."""
        if lay.d > 0 and lay.k_last == 0 and lay.d % quant_block_size == 0 and lay.d % 2 == 0:
            return ("blocks", lay.block, lay.k_block)
        return lay

    def foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """The step of a bucket, equal bit for bit to :meth:`direction` of each tensor and the engine's
        decay and update (the per-parameter step): a piece of a tensor larger than ``chunk_numel`` steps
        the whole tensor from its first piece (:func:`~lowmem.optim.moments.step_whole_from_piece_`);
        the others are grouped by :meth:`joint_key`: tensors of whole top-k and quantization blocks with
        the same top-k block, whatever their sizes, one after another in one row
        (:func:`~lowmem.optim.functional.microadam.joint_layout`; a Llama layer's shapes: one group, not
        one per shape), the rest by top-k layout (same size) stacked as rows; each group goes through
        :func:`~lowmem.optim.functional.microadam.compress_rows_` and
        :func:`~lowmem.optim.functional.microadam.window_direction_rows` once (the age weights once per
        bucket), the ring rows and error feedback written back by one ``torch._foreach_copy_``;
        then the decay and update as multi-tensor ops. Where the compiled path is on (CUDA by default), each
        group goes through the same row functions compiled (:func:`_compiled`: one compression and one window call
        per group, the group's gradients joined inside the compression and dropped after line 4, as the eager path
        does) and the quotient of line 12 eager, the same bits."""
        t = int(t)
        m, qbs, eps = group["m"], group["quant_block_size"], group["eps"]
        beta1, beta2 = group["betas"]
        ps, ds, rows = [], [], {}
        for p, g, st in zip(params, grads, states):
            if isinstance(st, ChunkState) and "parent" in st.extra:
                if st.start == 0:
                    step_whole_from_piece_(self, p, g, st, group, t, lr, self.foreach_decays_after)
                continue
            ps.append(p)
            ds.append(None)
            rows.setdefault((self.joint_key(self.layout(g.numel(), group), qbs), g.device), []).append((len(ps) - 1, g, st))
        weights = {}
        for (key, device), items in rows.items():
            if device not in weights:
                weights[device] = (MA.age_weights(t, m, beta1, device), MA.age_weights(t, m, beta2, device))
            ss = [st for _, _, st in items]
            if isinstance(key, MA.TopKLayout):  # one layout: the tensors stacked as rows
                lay, sizes, join = key, None, _stacked
            else:  # whole blocks: the tensors one after another in one row
                sizes = [g.numel() for _, g, _ in items]
                lay, join = MA.joint_layout(sizes, key[1], key[2]), _one_row
            compiled = use_compiled(device, self.compile)
            if compiled or len(ss) == 1 or not Q.launch_bound(device):
                errors = (join([s["microadam_error"] for s in ss]), join([s["microadam_error_min"] for s in ss]),
                          join([s["microadam_error_max"] for s in ss]))
            else:  # (eager off the CPU: the three joined by one torch.cat of their bytes, read-only views of it;
                # on the CPU the three joins, ~30 us faster a group)
                errors = _joined_errors(ss, 1 if sizes is not None else len(ss))
            if compiled:  # (the joined gradients made inside and dropped after line 4, as the plain path does)
                idx, vals, codes, lo, hi = _compiled(device.type)[0](
                    lambda: join([g.reshape(-1) for _, g, _ in items]), *errors, _top(str(device)),
                    lay.block, lay.k_block, lay.k_last, qbs)
            else:
                idx, vals, codes, lo, hi = MA.compress_rows_(lambda: join([g.reshape(-1) for _, g, _ in items]),
                                                             *errors, lay, qbs)
            del errors
            if sizes is not None:  # (each tensor's part of the row: views)
                ks, nq = [n // lay.block * lay.k_block for n in sizes], [n // qbs for n in sizes]
                idx, vals = idx[0].split(ks), vals[0].split(ks)
                codes, lo, hi = codes[0].split([n // 2 for n in sizes]), lo[0].split(nq), hi[0].split(nq)
            row = (t - 1) % m
            dst = ([s["microadam_indices"][row] for s in ss] + [s["microadam_values"][row] for s in ss]
                   + [s[k] for k in ("microadam_error", "microadam_error_min", "microadam_error_max") for s in ss])
            torch._foreach_copy_(dst, [*idx, *vals, *codes, *lo, *hi])
            del idx, vals, codes, lo, hi
            ring = join([s["microadam_indices"] for s in ss], 1), join([s["microadam_values"] for s in ss], 1)
            if compiled:
                sums = _compiled(device.type)[1](*ring, *weights[device], lay.d, lay.block, lay.k_block, lay.k_last)
                del ring
                u = MA.direction_from_sums_(*sums, eps).view(-1, lay.d)
                del sums
            else:
                u = MA.window_direction_rows(*ring, *weights[device], eps, lay)
                del ring
            for (i, g, _), row_u in zip(items, u if sizes is None else u[0].split(sizes)):
                ds[i] = row_u.view(g.shape)
            del u
        if ps:
            apply_updates_foreach_(ps, ds, lr, group.get("weight_decay", 0.0), self.foreach_decays_after)

    def foreach_transient_bytes(self, numel):
        """A bucket of ``numel`` elements stacked by layout, measured 15.8 B per element at the defaults
        and 22.1 B with blocks of 64 / 128 (``m k = 0.7 d``) before session 8 (10.3-10.5 B at the defaults
        since: :func:`stacked_compress_bytes`): the directions of the groups done so far
        (4 B), then either a group's compression (its stacked gradients, ``a``, its levels and codes:
        about 14 B) or its window (the two sums, 8 B, and per entry the stacked ring rows, global indices,
        float and weighted values: 20 B, at most one entry per two elements, :meth:`supports_foreach_for`):
        at most 24 bytes per element."""
        return 24 * numel

    def foreach_bucket_transient_bytes(self, numel, members, group=None):
        """With the bucket's ``group`` (its block sizes give each layout's padded width):
        :func:`stacked_bucket_transient_bytes` of its groups (:meth:`joint_key`) in bucket order, with the
        compiled compression and window (:func:`compiled_compress_bytes`, :func:`compiled_window_bytes`) where the
        compiled path is on for the members' device (:func:`use_compiled`: CUDA by default; the state's device, so
        that the estimator's fake CUDA tensors count it too). Without it, the bound :meth:`foreach_transient_bytes`
        (which padded rows exceed; the compiled path allocates less than the eager one since 2026-11-30)."""
        if not members or group is None:
            return self.foreach_transient_bytes(numel)
        compiled = use_compiled(members[0][1]["microadam_indices"].device, self.compile)
        qbs = group["quant_block_size"]
        # as foreach_step_ groups them (joint_key), in the order they first appear: a layout's stacked rows
        # (rows, elements, padded width, kept k, ring entries per row), or whole-block tensors in one row
        layouts: dict[object, list[int]] = {}
        for n, st in members:
            lay = self.layout(n, group)
            key = self.joint_key(lay, qbs)
            if isinstance(key, MA.TopKLayout):
                layouts.setdefault(key, [0, n, -(-n // qbs) * qbs, lay.k, st["microadam_indices"].numel(), lay,
                                         -(-n // qbs)])[0] += 1
            else:
                row = layouts.setdefault(key, [1, 0, 0, 0, 0, None, 0])
                row[1] += n
                row[2] += n
                row[3] += lay.k
                row[4] += st["microadam_indices"].numel()
                row[6] += n // qbs
                row[5] = MA.TopKLayout(row[1], key[1], row[1] // key[1], key[2], 0)  # (MA.joint_layout of them)
        on_cpu = members[0][1]["microadam_indices"].device.type == "cpu"
        return stacked_bucket_transient_bytes([tuple(v) for v in layouts.values()], compiled, on_cpu)
