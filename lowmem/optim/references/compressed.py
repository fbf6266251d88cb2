"""Plain loops of the compressed-state and spike-aware recipes, written from their papers (see the
package docstring): SPAM, Stable-SPAM, AdamW with 8-bit / 4-bit / rank-1 4-bit moments, MicroAdam.

What is shared with the implementation, and why:

* 8-bit moments: bitsandbytes' block-wise codec and dynamic maps, called directly
  (``bitsandbytes.functional.quantize_blockwise`` / ``dequantize_blockwise``, ``create_dynamic_map``),
  not lowmem's wrapper of them. The storage format *is* bitsandbytes' (Dettmers et al. 2022,
  Section 2), and its CPU kernel picks the nearest code or its neighbour, which no plain nearest
  search reproduces; the Adam math around it is written here.
* 4-bit moments: only the 16 values of the signed dynamic-exponent map for ``m`` (bitsandbytes'
  ``create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)``, the same table Li et al.'s
  code builds: the format's definition). Block-wise absmax normalization, rank-1 normalization
  (Li et al. 2023, Section 4.2), the zero-free linear map (Section 4.1) and the nearest-code
  rounding are written here, so a change to any of them in the engine shows.
* MicroAdam: nothing. Top-k per block, the 4-bit min/max error codec and the window are written
  here from Algorithm 1 of Modoranu et al. 2024.

Bit compatibility: a quantized moment is a function of the gradients only, but a value one ulp
away from a rounding boundary of a code flips to the neighbouring code, which moves the step by a
whole code step. So the moments that are stored quantized are computed with the same float
operations as the implementation (``torch.lerp`` for ``b1 m + (1 - b1) g``, ``torch.addcmul`` for
``b2 v + (1 - b2) g^2``, MicroAdam's ``g + Q^{-1}(e)`` and ``floor((a - delta) / u + 1/2)``): the
same equations written in the one order that reproduces the stored codes bit for bit. Everything
downstream of the codes (the step) is written freely and compared at rtol 1e-5.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import Reference, register_reference


# ---- SPAM (Huang et al. 2025, "SPAM: Spike-Aware Adam with Momentum Reset") ------------------


def spam(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
         weight_decay: float, threshold: float, reset_interval: int, warmup_steps: int, grad_accu_steps: int,
         **_) -> list[Tensor]:
    """SPAM, Algorithm 1, as the authors' AdamW runs it (docs/compressed.md)::

        if t mod DeltaT == 0:  m <- 0, v <- 0                                   (momentum reset, l.4)
        if theta > 0 and t >= N and (DeltaT == 0 or t mod DeltaT >= N):      (N = grad_accu_steps)
            spikes: g_i^2 > theta v_i  ->  g_i <- sign(g_i) sqrt(theta v_i)    (spike clipping, l.6-8)
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        p <- p - lr s_c sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)       (eps on the raw sqrt(v))
        p <- p (1 - lr wd)                                                     (after the step, not warmed up)

    ``s_c = 1 - 0.99 (1 + cos(pi c / (W + 1))) / 2`` for ``c < W = warmup_steps`` steps since the
    last reset (``c = 0`` on the reset step; 1 before the first reset), the cosine warm-up of
    Section 3. Bias corrections count from the first step (they do not restart at a reset).
    """
    b1, b2 = betas
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    since_reset = None  # no warm-up before the first reset
    for t, g in enumerate(grads, start=1):
        if reset_interval > 0 and t % reset_interval == 0:
            m, v = torch.zeros_like(p), torch.zeros_like(p)
            since_reset = 0
        elif since_reset is not None:
            since_reset += 1
        history = t >= grad_accu_steps and (reset_interval == 0 or t % reset_interval >= grad_accu_steps)
        if threshold > 0 and history:
            spike = g * g > threshold * v
            g = torch.where(spike, torch.sign(g) * torch.sqrt(threshold * v), g)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if since_reset is not None and since_reset < warmup_steps:
            scale = 1.0 - 0.99 * (1.0 + math.cos(math.pi * since_reset / (warmup_steps + 1))) / 2.0
        else:
            scale = 1.0
        p = p - lr * scale * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
        p = p * (1 - lr * weight_decay)
        out.append(p)
    return out


register_reference("spam", Reference(spam, configs=(
    {},  # reset every 500, clipping after 20 steps: plain Adam (hf eps) over 12 steps
    # no clipping (threshold 0); resets at 4, 8, 12 with a 2-step warm-up; decay after the step
    {"threshold": 0.0, "reset_interval": 4, "warmup_steps": 2, "lr": 1e-2, "weight_decay": 0.1},
    # clipping from step 2, never a reset: the spike at step 5 is clipped
    {"grad_accu_steps": 2, "reset_interval": 0, "lr": 1e-2},
    # a small threshold (ordinary entries are clipped too) with resets at 6 and 12 and a 3-step warm-up
    {"threshold": 50.0, "reset_interval": 6, "warmup_steps": 3, "grad_accu_steps": 2, "betas": (0.8, 0.95),
     "eps": 1e-8, "weight_decay": 0.05},
)))


# ---- Stable-SPAM (Huang et al. 2025, "Stable-SPAM: How to Train in 4-Bit More Stably") --------


def stable_spam(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
                weight_decay: float, gamma1: float, gamma2: float, theta: float, reset_interval: int,
                t_max: int | None, stats_step: str, **_) -> list[Tensor]:
    """Stable-SPAM, Algorithm 1, with the authors' step counter and optional cosine decay::

        p <- p (1 - lr wd)                                                    (before the step)
        AdaClip (l.5-8):  m_max <- theta m_max + (1 - theta) max|g| ;  b = m_max / (1 - theta^k_s)
                          |g_i| > b  ->  g_i <- g_i b / max|g|
        AdaGN (l.9-12):   m_n <- g1 m_n + (1 - g1) ||g|| ;  v_n <- gamma2 v_n + (1 - gamma2) ||g||^2
                          g <- g / ||g|| (m_n / (1 - g1^k_s)) / (sqrt(v_n / (1 - gamma2^k_s)) + eps)
        MoRet:            t mod DeltaT == 0:  m <- 0, v <- 0, k <- 1 (the bias corrections restart)
        Adam:             m <- b1' m + (1 - b1') g ;  v <- b2 v + (1 - b2) g^2
                          p <- p - lr (m / (1 - b1'^k)) / (sqrt(v / (1 - b2^k)) + eps)

    ``k`` counts steps since the last reset (the authors' ``state['step']``, set to 1 on a reset
    step). The statistics' count ``k_s`` is the global step ``t`` (``stats_step="global"``,
    pytorch-optimizer's port) or, with ``"since_reset"``, that same counter *before* the reset sets
    it to 1 (the authors' code: the statistics' EMAs are never reset, their correction is).
    ``t_max`` (the reference's ``total_T``): ``b1' = b1 s_t`` and ``g1 = gamma1 s_t`` with
    ``s_t = 0.5 + 0.25 (1 + cos(pi t / (t_max + 1)))`` (torch's ``CosineAnnealingLR`` to 0.5 in
    closed form, not clamped after ``t_max + 1``); else ``s_t = 1``. A zero gradient stays zero and
    leaves the norm statistics unchanged (documented: the paper's ``g / ||g||`` is undefined there).
    """
    b1_base, b2 = betas
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    m_max = norm_m = norm_v = torch.tensor(0.0)
    k = 0
    for t, g in enumerate(grads, start=1):
        k += 1
        k_s = t if stats_step == "global" else k
        s = 1.0 if t_max is None else 0.5 + 0.25 * (1.0 + math.cos(math.pi * t / (t_max + 1)))
        b1, g1 = b1_base * s, gamma1 * s
        p = p * (1 - lr * weight_decay)
        # AdaClip
        g_max = g.abs().max()
        m_max = theta * m_max + (1 - theta) * g_max
        bound = m_max / (1 - theta**k_s)
        g = torch.where(g.abs() > bound, g / g_max * bound, g)
        # AdaGN
        norm = torch.linalg.vector_norm(g)
        if norm > 0:
            norm_m = g1 * norm_m + (1 - g1) * norm
            norm_v = gamma2 * norm_v + (1 - gamma2) * norm**2
            g = g / norm * (norm_m / (1 - g1**k_s)) / ((norm_v / (1 - gamma2**k_s)).sqrt() + eps)
        # MoRet
        if reset_interval > 0 and t % reset_interval == 0:
            m, v, k = torch.zeros_like(p), torch.zeros_like(p), 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
        out.append(p)
    return out


register_reference("stable_spam", Reference(stable_spam, configs=(
    {},  # no reset within 12 steps, no cosine decay; AdaClip clips the spike at step 5
    # resets at 4, 8, 12 with the authors' counter in AdaClip / AdaGN; weight decay before the step
    {"reset_interval": 4, "stats_step": "since_reset", "lr": 1e-2, "weight_decay": 0.1},
    # resets at 5 and 10 with the global count; t_max inside the run: s_t falls to 0.5 at t = 7, rises after
    {"reset_interval": 5, "t_max": 6, "theta": 0.9, "gamma1": 0.5, "gamma2": 0.95},
    # never reset, a fast max EMA (AdaClip bites often), slow cosine decay, since_reset without resets
    {"reset_interval": 0, "t_max": 20, "theta": 0.5, "betas": (0.8, 0.99), "eps": 1e-6, "stats_step": "since_reset"},
)))


# ---- AdamW with 8-bit / 4-bit moments (Dettmers et al. 2022; Li et al. 2023) -------------------


def _nearest(x: Tensor, code: Tensor) -> Tensor:
    """Index of the nearest entry of the sorted ``code`` for every value, ties to the lower entry
    (the number of midpoints between neighbouring entries strictly below the value)."""
    midpoints = (code[1:] + code[:-1]) / 2
    return torch.searchsorted(midpoints, x.contiguous(), right=False)


def _roundtrip_8bit(x: Tensor, signed: bool, block_size: int) -> Tensor:
    """Dettmers et al. 2022, Section 2: block-wise absmax with the dynamic (tree) map, signed for
    ``m`` and unsigned for ``v``, through bitsandbytes' own codec; returns the decoded value."""
    import bitsandbytes.functional as bnbF

    code = bnbF.create_dynamic_map(signed=signed)
    codes, qstate = bnbF.quantize_blockwise(x.reshape(-1).contiguous(), code=code, blocksize=block_size)
    return bnbF.dequantize_blockwise(codes, qstate).view(x.shape)


def _de_map_4bit() -> Tensor:
    """Li et al. 2023's 4-bit signed dynamic-exponent ("DE") map for ``m``: bitsandbytes' dynamic map
    with 3 exponent bits of 4 (its 16 distinct values, sorted)."""
    import bitsandbytes.functional as bnbF

    return bnbF.create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4).unique()


#: Li et al. 2023, Section 4.1: the linear map without zero, (i + 1) / 16, for the second moment
LINEAR_NO_ZERO = torch.arange(1, 17, dtype=torch.float32) / 16


def _roundtrip_4bit_blocks(x: Tensor, code: Tensor, block_size: int) -> Tensor:
    """Li et al. 2023, Section 3 (B128 normalization): each block of ``block_size`` consecutive values
    (the last one partial) is divided by its absolute maximum ``N_b`` and every value replaced by
    the nearest ``code`` entry: ``x ~ code[q] N_b``."""
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), block_size):
        block = flat[start : start + block_size]
        absmax = block.abs().max()
        q = _nearest(block / absmax.clamp(min=torch.finfo(torch.float32).tiny), code)
        out[start : start + block_size] = code[q] * absmax
    return out.view(x.shape)


def _roundtrip_4bit_rank1(x: Tensor, code: Tensor) -> Tensor:
    """Li et al. 2023, Section 4.2 (rank-1 normalization) of a non-negative ``x`` with ``ndim >= 2``:
    entry ``(i, j)`` of the last two dimensions is divided by ``min(r_i, c_j)``, its row maximum
    ``r_i = max_j x_ij`` and column maximum ``c_j = max_i x_ij``, and replaced by the nearest
    ``code`` entry: ``x_ij ~ code[q_ij] min(r_i, c_j)``."""
    r = x.amax(dim=-1, keepdim=True)
    c = x.amax(dim=-2, keepdim=True)
    scale = torch.minimum(r, c)
    q = _nearest(x / scale.clamp(min=torch.finfo(torch.float32).tiny), code)
    return code[q] * scale


def _quantized_adamw(p: Tensor, grads: list[Tensor], lr: float, betas: tuple[float, float], eps: float,
                     weight_decay: float, min_quant_size: int, state_dtype: str, store_m, store_v) -> list[Tensor]:
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2) whose moments are kept as their stored form:
    "dequantize, update, quantize" (Dettmers et al. 2022, Section 2). The step uses the moments
    updated in float32; what the next step sees is ``store(m)``, ``store(v)`` (the decoded codes).
    Tensors under ``min_quant_size`` elements keep plain moments in ``state_dtype``."""
    b1, b2 = betas
    if p.numel() < min_quant_size:
        dtype = torch.bfloat16 if state_dtype == "bfloat16" else torch.float32
        store_m = store_v = lambda x: x.to(dtype).float()  # noqa: E731 - plain storage, rounded to its dtype
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * weight_decay)
        m = torch.lerp(m, g, 1 - b1)  # b1 m + (1 - b1) g
        v = torch.addcmul(v * b2, g, g, value=1 - b2)  # b2 v + (1 - b2) g^2
        p = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        m, v = store_m(m), store_v(v)
        out.append(p)
    return out


def adamw8bit(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
              weight_decay: float, block_size: int, min_quant_size: int, state_dtype: str, **_) -> list[Tensor]:
    """AdamW with 8-bit block-wise moments, Dettmers et al. 2022 (Section 2: block-wise dynamic
    quantization, signed map for ``m``, unsigned for ``v``); torch's eps placement."""
    return _quantized_adamw(
        p, grads, lr, betas, eps, weight_decay, min_quant_size, state_dtype,
        store_m=lambda x: _roundtrip_8bit(x, True, block_size), store_v=lambda x: _roundtrip_8bit(x, False, block_size),
    )


def adamw4bit(p: Tensor, grads: list[Tensor], *, index: int, lr: float, betas: tuple[float, float], eps: float,
              weight_decay: float, block_size: int, min_quant_size: int, state_dtype: str, v_normalization: str,
              **_) -> list[Tensor]:
    """AdamW with 4-bit moments, Li et al. 2023: ``m`` block-wise (B128) on the signed DE map,
    ``v`` on the linear map without zero (Section 4.1), normalized block-wise or, with
    ``v_normalization="rank1"`` and ``ndim >= 2``, by ``min(row max, column max)`` (Section 4.2)."""
    de = _de_map_4bit()
    if v_normalization == "rank1" and p.dim() >= 2:
        store_v = lambda x: _roundtrip_4bit_rank1(x, LINEAR_NO_ZERO)  # noqa: E731
    else:
        store_v = lambda x: _roundtrip_4bit_blocks(x, LINEAR_NO_ZERO, block_size)  # noqa: E731
    return _quantized_adamw(
        p, grads, lr, betas, eps, weight_decay, min_quant_size, state_dtype,
        store_m=lambda x: _roundtrip_4bit_blocks(x, de, block_size), store_v=store_v,
    )


# shapes: one tensor above the default min_quant_size (4096), none a multiple of a block size (partial
# blocks; odd numels for the two-codes-per-byte packing), a vector quantized at small min_quant_size,
# and one (40,) that always keeps plain moments
_QUANT_SHAPES = ((70, 61), (30, 50), (301,), (40,))

register_reference("adamw8bit", Reference(adamw8bit, shapes=_QUANT_SHAPES, configs=(
    {},  # blocks of 256; only the 70 x 61 weight quantized
    {"min_quant_size": 64, "block_size": 64, "lr": 1e-2, "weight_decay": 0.1},  # all but (40,) quantized
    {"min_quant_size": 1000, "block_size": 512, "betas": (0.8, 0.95), "state_dtype": "bfloat16"},  # vectors: bf16
    {"min_quant_size": 200, "block_size": 4096, "eps": 1e-6, "weight_decay": 0.0},  # one partial block each
)))

register_reference("adamw4bit", Reference(adamw4bit, shapes=_QUANT_SHAPES, configs=(
    {},  # blocks of 128; only the 70 x 61 weight quantized
    {"min_quant_size": 64, "block_size": 64, "lr": 1e-2, "weight_decay": 0.1},
    {"min_quant_size": 1000, "block_size": 256, "betas": (0.8, 0.95), "state_dtype": "bfloat16"},
    {"min_quant_size": 200, "block_size": 4096, "eps": 1e-6, "weight_decay": 0.0},
)))

# rank-1 scales: a matrix whose rows are chunked (45 x 32: a chunk of whole rows and whole blocks of 64
# or 128 holds 2 or 4 rows) and a batched 3-D tensor (scales per leading index, stepped whole)
register_reference("adamw4bit_rank1", Reference(adamw4bit, shapes=((70, 61), (45, 32), (301,), (40,), (3, 20, 24)),
                                                configs=(
    {},  # rank-1 v on the 70 x 61 weight only
    {"min_quant_size": 64, "block_size": 64, "lr": 1e-2, "weight_decay": 0.1},  # all but (40,); (301,): block v
    {"min_quant_size": 1000, "block_size": 256, "betas": (0.8, 0.95), "state_dtype": "bfloat16"},
    {"min_quant_size": 1000, "block_size": 128, "eps": 1e-6, "weight_decay": 0.0},
)))


# ---- MicroAdam (Modoranu et al. 2024, Algorithm 1) --------------------------------------------


def _minmax_4bit_roundtrip(a: Tensor, block_size: int) -> Tensor:
    """Algorithm 1, lines 7-8 and the ``Q^{-1}`` of line 4: per block of ``block_size`` values (the
    last one partial) ``delta = min``, ``Delta = max``, ``u = (Delta - delta) / 15``,
    ``q = floor((a - delta) / u + 1/2)`` in ``[0, 15]`` (0 where ``u = 0``); decoded ``delta + q u``."""
    out = torch.empty_like(a)
    for start in range(0, a.numel(), block_size):
        x = a[start : start + block_size]
        lo, hi = x.min(), x.max()
        u = (hi - lo) / 15.0
        q = torch.floor((x - lo) / u + 0.5).clamp(0, 15) if u > 0 else torch.zeros_like(x)
        out[start : start + block_size] = lo + q * u
    return out


def microadam(p: Tensor, grads: list[Tensor], *, index: int, lr: float, m: int, quant_block_size: int,
              k_init: float, betas: tuple[float, float], weight_decay: float, eps: float, topk_block_size: int,
              **_) -> list[Tensor]:
    """MicroAdam, Modoranu et al. 2024, Algorithm 1, on the flat tensor of ``d`` entries::

        a    = g + Q^{-1}(e)                                   (l.4: error feedback, e = 0 at the start)
        I    = top-k of |a| in every block of min(d, topk_block_size) entries, k = ceil(k_init block)
               (a last partial block of r entries keeps ceil(k_init r))                       (l.5)
        G_t  = (I, bf16(a[I])) ;  a[I] = 0 ;  e = Q(a)  (4-bit min/max per quant_block_size)  (l.6-9)
        m_hat = (1 - b1)/(1 - b1^t) sum_{s in window} b1^(t - s) G_s                             (l.10)
        v_hat = (1 - b2)/(1 - b2^t) sum_{s in window} b2^(t - s) G_s^2                           (l.11)
        p <- p (1 - lr wd) - lr m_hat / (eps + sqrt(v_hat))                                     (l.12)

    The window holds the last ``m`` steps' sparse gradients (sums of several rows where they
    selected the same entry). The top-k is ``torch.topk`` over the blocks as rows, like the
    implementation's call: with a zero gradient ``|a|`` is the 16-level error alone and has ties,
    which ``topk`` breaks by position; nothing else is shared.
    """
    b1, b2 = betas
    d = p.numel()
    block = min(d, topk_block_size)
    full, rest = d // block, d % block
    k_block, k_rest = math.ceil(block * k_init), math.ceil(rest * k_init)
    error = torch.zeros(d)  # Q^{-1}(e)
    window: list[tuple[int, Tensor, Tensor]] = []  # (step, flat indices, bf16 values)
    out = []
    for t, g in enumerate(grads, start=1):
        a = g.reshape(-1) + error
        parts = []
        if full:
            local = torch.topk(a[: full * block].abs().view(full, block), k_block, dim=1, sorted=False).indices
            parts.append((local + block * torch.arange(full).unsqueeze(1)).reshape(-1))
        if rest:
            parts.append(torch.topk(a[full * block :].abs(), k_rest, sorted=False).indices + full * block)
        idx = torch.cat(parts)
        window = (window + [(t, idx, a[idx].to(torch.bfloat16))])[-m:]
        a = a.index_fill(0, idx, 0.0)
        error = _minmax_4bit_roundtrip(a, quant_block_size)
        m_hat, v_hat = torch.zeros(d), torch.zeros(d)
        for s, i, vals in window:
            m_hat[i] += (1 - b1) / (1 - b1**t) * b1 ** (t - s) * vals.float()
            v_hat[i] += (1 - b2) / (1 - b2**t) * b2 ** (t - s) * vals.float() ** 2
        p = p * (1 - lr * weight_decay) - lr * (m_hat / (eps + v_hat.sqrt())).view(p.shape)
        out.append(p)
    return out


register_reference("microadam", Reference(microadam, shapes=((24, 40), (40, 24), (40,), (37, 41)), configs=(
    {},  # m = 10 (never wraps in 12 steps), 1%; one partial error block of 2048, one top-k block per tensor
    # the window wraps (m = 4); top-k blocks of 128 with a partial last one; the fast path in chunks of 128
    {"m": 4, "k_init": 0.1, "quant_block_size": 64, "topk_block_size": 128, "lr": 1e-2, "weight_decay": 0.1},
    # everything kept every step (error stays 0), a window of one step; block sizes that are no powers of 2
    {"m": 1, "k_init": 1.0, "quant_block_size": 100, "topk_block_size": 50},
    {"m": 3, "k_init": 0.05, "quant_block_size": 48, "topk_block_size": 200, "betas": (0.8, 0.95), "eps": 1e-6},
)))
