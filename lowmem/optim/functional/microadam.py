"""MicroAdam (Modoranu et al. 2024, "MicroAdam: Accurate Adaptive Optimization with Low Space
Overhead and Provable Convergence", NeurIPS 2024), Algorithm 1.

Per step, for a flat gradient ``g`` of ``d`` entries::

    a   = g + Q^{-1}(e)                      # line 4: add the decompressed error feedback
    I,V = TopK_per_block(|a|)                # line 5: k entries per block of the flat tensor
    a[I] = 0                                 # line 6
    e   = Q(a)  (4-bit, min/max per block)   # lines 7-8: what was not kept is the new error
    G[(t - 1) mod m] = (I, V)                # line 9: ring buffer of the last m sparse gradients
    m_hat = (1 - b1)/(1 - b1^t) sum_i b1^{r_i} G_i        # line 10, r_i = age of row i
    v_hat = (1 - b2)/(1 - b2^t) sum_i b2^{r_i} G_i^2      # line 11
    u   = m_hat / (eps + sqrt(v_hat))        # line 12 (the caller applies lr and weight decay)

Indices are stored relative to their top-k block as ``int16`` and values as ``bfloat16``, as in
the reference implementation (IST-DASLab/ISTA-DASLab-Optimizers); rows that select the same
index add up. These functions are pure (no state, no host synchronisation) and shape-static, so
:func:`torch.compile` can fuse them on the GPU; the plain calls are the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from . import quant as Q


@dataclass(frozen=True)
class TopKLayout:
    """How a flat tensor of ``d`` entries is split for the blockwise top-k.

    ``full_blocks`` blocks of ``block`` entries keep ``k_block`` entries each; a last partial block
    of ``d - full_blocks * block`` entries keeps ``k_last = ceil(rest * density)``.
    """

    d: int
    block: int
    full_blocks: int
    k_block: int
    k_last: int

    @property
    def k(self) -> int:
        return self.full_blocks * self.k_block + self.k_last

    @property
    def rest(self) -> int:
        return self.d - self.full_blocks * self.block


def topk_layout(d: int, block_size: int, density: float) -> TopKLayout:
    """Top-k blocks as in the reference: ``block = min(d, block_size)``, ``k = ceil(block * density)``.
    ``d = 0`` (an empty shard of an FSDP2 parameter): no blocks, ``k = 0``."""
    block = min(d, block_size) or block_size
    full = d // block
    rest = d - full * block
    return TopKLayout(d, block, full, math.ceil(block * density), math.ceil(rest * density) if rest else 0)


def global_indices(local: Tensor, layout: TopKLayout) -> Tensor:
    """Flat positions of block-relative indices ``local`` (``[..., k]``) as int64: entry ``j`` of the full
    blocks gets its block's start ``(j // k_block) block``, the last partial block's ``full_blocks block``.
    Added in place to the int64 copy of ``local`` (a new tensor), the starts broadcast over each block's
    ``k_block`` entries (three operations, no ``[k]`` offset tensor)."""
    return add_block_starts_(local.long(), layout)


def add_block_starts_(flat: Tensor, layout: TopKLayout) -> Tensor:
    """:func:`global_indices` of block-relative int64 indices ``flat``, added in place (e.g. the top-k's own
    indices, whose int16 copy is the state's: no int64 copy of them)."""
    fb, kb = layout.full_blocks, layout.k_block
    if torch.compiler.is_compiling():  # (one fused kernel; the unflatten of a slice of symbolic size
        # failed in the inductor's view lowering, IndexError in aten.reshape, on chunk views)
        flat[..., : fb * kb].add_(torch.arange(fb * kb, device=flat.device).div(kb, rounding_mode="floor") * layout.block)
    else:
        starts = torch.arange(0, fb * layout.block, layout.block, device=flat.device)
        flat[..., : fb * kb].unflatten(-1, (fb, kb)).add_(starts.unsqueeze(1))
    if layout.k_last:
        flat[..., fb * kb :].add_(fb * layout.block)
    return flat


def blockwise_topk(a: Tensor, layout: TopKLayout) -> Tensor:
    """Block-relative indices (``int16 [k]``) of the ``k_block`` largest ``|a|`` of every block (line 5)."""
    return blockwise_topk_indices(a, layout).to(torch.int16)


def blockwise_topk_indices(a: Tensor, layout: TopKLayout) -> Tensor:
    """:func:`blockwise_topk` as the top-k's own int64 tensor (no copy when there is no partial last block)."""
    full_end = layout.full_blocks * layout.block
    idx = torch.topk(a[:full_end].abs().view(layout.full_blocks, layout.block), layout.k_block, dim=1, sorted=False).indices
    if not layout.k_last:
        return idx.reshape(-1)
    return torch.cat([idx.reshape(-1), torch.topk(a[full_end:].abs(), layout.k_last, sorted=False).indices])


def compress_(g: Tensor, error: Tensor, err_lo: Tensor, err_hi: Tensor, layout: TopKLayout, quant_block_size: int):
    """Lines 4-8: returns ``(indices int16 [k], values bf16 [k], new error codes, new min, new max)``.

    ``g`` is the flat float32 gradient; ``error``/``err_lo``/``err_hi`` the current 4-bit error
    feedback (packed codes and per-block min/max).
    """
    # In [blocks, block_size] space: no flat ``i // block_size`` index for torch.compile to split
    # (torch 2.13's CPU inductor drops the partial last block when it splits such a loop).
    blocks = Q.dequantize_minmax_4bit_blocks(error, err_lo, err_hi, quant_block_size, layout.d)
    a = (Q._blocks(g, quant_block_size) + blocks).reshape(-1)[: layout.d]
    del blocks
    idx = blockwise_topk_indices(a, layout)
    local = idx.to(torch.int16)
    flat = add_block_starts_(idx, layout)  # (the top-k's own int64 indices, made global in place)
    del idx
    values = a[flat].to(torch.bfloat16)
    a.index_fill_(0, flat, 0.0)  # (a is this function's own sum: zeroed in place, no copy)
    codes, lo, hi = Q.quantize_minmax_4bit(a, quant_block_size)
    return local, values, codes, lo, hi


def age_weights(t: int, m: int, beta: float, device) -> Tensor:
    """``(1 - beta)/(1 - beta^t) * beta^{r_i}`` for ring rows ``i < m`` (zero for rows not yet written).

    Row ``i`` was written at the last step ``s <= t`` with ``(s - 1) mod m = i``; its age is
    ``r_i = (t - 1 - i) mod m`` (the reference kernel's exponent). Lines 10-11's coefficients.
    Computed on ``device`` from Python numbers (no host-to-device copy) and kept for the step's other
    tensors and chunks (the last :data:`AGE_WEIGHTS_KEPT` ``(t, m, beta, device)``, for the process: ``4 m`` bytes
    each, two per step; read-only).
    """
    return _age_weights(int(t), int(m), float(beta), str(torch.device(device)))


#: How many age-weight vectors :func:`age_weights` keeps (its cache; kept for the process, full after 8 steps of
#: one ``(m, betas)``: ``MicroAdamMoments.cached_bytes``).
AGE_WEIGHTS_KEPT = 16


@lru_cache(maxsize=AGE_WEIGHTS_KEPT)
def _age_weights(t: int, m: int, beta: float, device: str) -> Tensor:
    rows = torch.arange(m, device=device, dtype=torch.float64)
    age = torch.remainder(t - 1 - rows, m)
    w = torch.pow(beta, age) * ((1 - beta) / (1 - beta**t))  # (the base a float64 scalar, as a 0-dim tensor was)
    return torch.where(rows < min(t, m), w, torch.zeros_like(w)).float()


def window_direction(indices: Tensor, values: Tensor, w1: Tensor, w2: Tensor, eps: float, layout: TopKLayout) -> Tensor:
    """Lines 10-12 from the ring buffer: ``m_hat / (eps + sqrt(v_hat))`` as a flat float32 tensor.

    ``w1``/``w2`` come from :func:`age_weights` (bias corrections folded in). Entries no row
    selected get 0.
    """
    return direction_from_sums_(*window_sums(indices, values, w1, w2, layout), eps)


def window_sums(indices: Tensor, values: Tensor, w1: Tensor, w2: Tensor, layout: TopKLayout) -> tuple[Tensor, Tensor]:
    """Lines 10-11: the two weighted sums ``m_hat``, ``v_hat`` (flat float32, bias corrections in ``w1`` /
    ``w2``) of :func:`window_direction`, each position's entries added in ring-row order."""
    flat = global_indices(indices, layout).reshape(-1)
    vals = values.to(torch.float32, copy=True)  # (squared in place below: never the state's own values)
    m_acc = torch.zeros(layout.d, dtype=torch.float32, device=values.device)
    v_acc = torch.zeros_like(m_acc)
    m_acc.index_add_(0, flat, (vals * w1.unsqueeze(1)).reshape(-1))
    v_acc.index_add_(0, flat, vals.square_().mul_(w2.unsqueeze(1)).reshape(-1))
    return m_acc, v_acc


def direction_from_sums_(m_acc: Tensor, v_acc: Tensor, eps: float) -> Tensor:
    """Line 12, ``m_hat / (eps + sqrt(v_hat))``, in place in ``m_acc`` (``v_acc`` overwritten): no temporaries.

    Kept out of :func:`torch.compile` (``lowmem.optim.microadam._compiled``): the CPU's eager ``sqrt`` of
    float32 is not always correctly rounded (torch 2.13, AVX-512: 0.7% of random inputs one ulp off), the
    inductor's is, so a compiled quotient would differ from the plain one by an ulp here and there."""
    return m_acc.div_(v_acc.sqrt_().add_(eps))


# ---- several tensors of one layout at once (the multi-tensor step) ---------------------------
#
# ``T`` flat tensors of the same top-k layout stacked as rows ``[T, d]``: every top-k block and every
# error-quantization block is one row's own (each row is padded to whole quantization blocks, as
# :func:`compress_` pads its tensor), so each row goes through the same operations on the same values
# as :func:`compress_` / :func:`window_direction` of that tensor alone, bit for bit; the ring buffer's
# contributions to a position are still added in row order (one tensor's rows stay in order).


def joint_layout(sizes: list[int], block: int, k_block: int) -> TopKLayout:
    """The layout of tensors of ``sizes`` elements, each whole top-k blocks of ``block`` keeping ``k_block``,
    laid one after another in one row: every block is one tensor's own, so each block's top-k, error
    quantization (whole quantization blocks) and window entries are that tensor's alone, in the same order."""
    if any(n <= 0 or n % block for n in sizes):
        raise ValueError(f"joint_layout: sizes {sizes} must be positive multiples of the top-k block {block}")
    d = sum(sizes)
    return TopKLayout(d, block, d // block, k_block, 0)


def _padded_rows(x: Tensor, width: int, value: float = 0.0) -> Tensor:
    """``x [T, d]`` padded with ``value`` on the right to ``[T, width]`` (no copy when ``width == d``)."""
    return x if x.shape[1] == width else torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def minmax_levels(blocks: Tensor, lo: Tensor, hi: Tensor, top: Tensor | float | None = None) -> Tensor:
    """:func:`~lowmem.optim.functional.quant.minmax_levels` (``q = round((x - delta) / u)``, ``u = (Delta -
    delta) / 15``, clamped to ``[0, 15]``, 0 where ``u = 0``) with the 15 given as ``top`` (``None``:
    :func:`~lowmem.optim.functional.quant.minmax_top` of the device, a 0-dim tensor off the CPU). Never a number
    off the CPU: there the inductor turns a division by a constant into a multiplication by its reciprocal
    (``torch._inductor.lowering.div_prim``), and CUDA's eager division by a number is one too (ATen's
    ``div_true_kernel_cuda``); by a tensor both divide, with the CPU's bits."""
    top = Q.minmax_top(hi.device) if top is None else top
    unit = ((hi - lo) / top).unsqueeze(1)
    q = (blocks - lo.unsqueeze(1)).div_(unit.clamp(min=torch.finfo(torch.float32).tiny))
    return q.add_(0.5).floor_().clamp_(0, 15).masked_fill_(~(unit > 0), 0.0)


def quantize_minmax_4bit_rows(x: Tensor, block_size: int, top: Tensor | float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`~lowmem.optim.functional.quant.quantize_minmax_4bit` of every row of ``x [T, d]``: returns
    ``(packed uint8 [T, ceil(d / 2)], delta float32 [T, nb], Delta float32 [T, nb])``, ``nb = ceil(d / B)``
    (``top``: :func:`minmax_levels`)."""
    rows, d = x.shape
    nb = -(-d // block_size)
    width = nb * block_size
    lo = _padded_rows(x, width, math.inf).reshape(-1, block_size).amin(dim=1)
    hi = _padded_rows(x, width, -math.inf).reshape(-1, block_size).amax(dim=1)
    q = minmax_levels(_padded_rows(x, width).reshape(-1, block_size), lo, hi, top).view(rows, width)
    q = _padded_rows(q[:, :d], d + d % 2)  # a zero code after an odd row, as pack_4bit pads a tensor
    return Q.pack_4bit(q).view(rows, -1), lo.view(rows, nb), hi.view(rows, nb)


def compress_rows_(g: Tensor, error: Tensor, err_lo: Tensor, err_hi: Tensor, layout: TopKLayout,
                   quant_block_size: int, top: Tensor | float | None = None):
    """:func:`compress_` (lines 4-8) of ``T`` tensors of one ``layout`` stacked as rows: ``g [T, d]``
    float32, ``error [T, ceil(d / 2)]``, ``err_lo`` / ``err_hi [T, nb]``. Returns ``(indices int16
    [T, k], values bf16 [T, k], codes, min, max)``, each row equal to :func:`compress_` of its tensor.

    ``g`` may be a function that returns the stacked gradients (made here and dropped once added: the
    caller holds no copy through the top-k and the quantization). Line 4 is :func:`error_sum_rows`, lines 5-8
    :func:`sparsify_rows_` (the compiled path compiles the two apart, so that the gradients are dropped between
    them: ``lowmem.optim.microadam._compiled``)."""
    a = error_sum_rows(g, error, err_lo, err_hi, quant_block_size, top)
    return sparsify_rows_(a, layout, quant_block_size, top)


def error_sum_rows(g: Tensor, error: Tensor, err_lo: Tensor, err_hi: Tensor, quant_block_size: int,
                   top: Tensor | float | None = None) -> Tensor:
    """Line 4 of :func:`compress_rows_`, ``a = g + Q^{-1}(e)`` for ``T`` rows, as ``[T, width]`` float32
    (``width``: whole quantization blocks; past ``d`` the padding's decoded error, which
    :func:`sparsify_rows_` does not read). ``g``: the stacked gradients ``[T, d]``, or a function that returns
    them (made here and dropped once added).

    Eager, the decoded error ``delta + q u`` and then the sum are computed in place in the levels (a tensor of
    this function's own; addition commutes: the same bits as ``lo + q u`` and ``g + decoded``). Compiled
    (``lowmem.optim.microadam._compiled``), out of place with every operand padded to whole blocks, the same
    roundings in the same order: the inductor then writes the sum alone (one fused kernel); the in-place form made
    it keep the levels, reshaped to blocks, beside the sum (4 B per element more)."""
    g = g() if callable(g) else g
    rows, d = g.shape
    b = quant_block_size
    width = -(-d // b) * b
    levels = Q.lookup_4bit_pairs(error.reshape(-1), Q.lookup_pairs("levels", str(error.device)),
                                 error.numel() * 2).view(rows, -1)[:, :d]
    top = Q.minmax_top(error.device) if top is None else top
    unit = (err_hi - err_lo).reshape(-1) / top  # (top: 15, :func:`minmax_levels`)
    if torch.compiler.is_compiling():
        def blocks(x):
            return torch.nn.functional.pad(x, (0, width - d)).reshape(-1, b)
        return (blocks(levels) * unit.unsqueeze(1) + err_lo.reshape(-1).unsqueeze(1) + blocks(g)).view(rows, width)
    a = _padded_rows(levels, width).reshape(-1, b)  # (the lookup's new tensor, or a padded / reshaped copy)
    del levels
    a = a.mul_(unit.unsqueeze(1)).add_(err_lo.reshape(-1).unsqueeze(1)).add_(_padded_rows(g, width).reshape(-1, b))
    return a.view(rows, width)


def sparsify_rows_(a: Tensor, layout: TopKLayout, quant_block_size: int, top: Tensor | float | None = None):
    """Lines 5-8 of :func:`compress_rows_` on ``a`` (:func:`error_sum_rows`, ``[T, width]``, its first
    ``layout.d`` columns read; modified in place): the blockwise top-k, the kept entries zeroed, the rest
    quantized as the new error feedback. Returns ``(indices int16 [T, k], values bf16 [T, k], codes, min,
    max)``."""
    rows, d = a.shape[0], layout.d
    a = a[:, :d]
    full_end = layout.full_blocks * layout.block
    idx = torch.topk(a[:, :full_end].abs().reshape(rows * layout.full_blocks, layout.block), layout.k_block,
                     dim=1, sorted=False).indices.reshape(rows, -1)
    if layout.k_last:
        idx = torch.cat([idx, torch.topk(a[:, full_end:].abs(), layout.k_last, dim=1, sorted=False).indices], dim=1)
    local = idx.to(torch.int16)
    flat = add_block_starts_(idx, layout)  # (the top-k's own int64 indices: no copy of them)
    del idx
    values = a.gather(1, flat).to(torch.bfloat16)
    a.scatter_(1, flat, 0.0)  # (in place, as compress_)
    codes, lo, hi = quantize_minmax_4bit_rows(a, quant_block_size, top)
    return local, values, codes, lo, hi


def window_direction_rows(indices: Tensor, values: Tensor, w1: Tensor, w2: Tensor, eps: float,
                          layout: TopKLayout) -> Tensor:
    """:func:`window_direction` (lines 10-12) of ``T`` tensors of one ``layout``: ``indices`` /
    ``values [T, m, k]``; returns ``[T, d]`` float32, each row equal to its tensor's direction."""
    return direction_from_sums_(*window_sums_rows(indices, values, w1, w2, layout), eps).view(indices.shape[0], layout.d)


def window_sums_rows(indices: Tensor, values: Tensor, w1: Tensor, w2: Tensor, layout: TopKLayout) -> tuple[Tensor, Tensor]:
    """:func:`window_sums` of ``T`` tensors of one ``layout`` (``indices`` / ``values [T, m, k]``): flat
    ``[T d]`` float32 sums, row ``i``'s at ``i d`` (what the compiled path compiles, lines 10-11)."""
    rows = indices.shape[0]
    flat = global_indices(indices, layout)  # (a new int64 tensor: each row's start added in place)
    if rows > 1:  # (one row, e.g. tensors of whole blocks joined: every start is 0)
        flat = flat.add_(torch.arange(0, rows * layout.d, layout.d, device=indices.device).view(rows, 1, 1))
    flat = flat.reshape(-1)
    vals = values.to(torch.float32, copy=True)
    m_acc = torch.zeros(rows * layout.d, dtype=torch.float32, device=values.device)
    v_acc = torch.zeros_like(m_acc)
    m_acc.index_add_(0, flat, (vals * w1.view(1, -1, 1)).reshape(-1))
    v_acc.index_add_(0, flat, vals.square_().mul_(w2.view(1, -1, 1)).reshape(-1))
    return m_acc, v_acc
