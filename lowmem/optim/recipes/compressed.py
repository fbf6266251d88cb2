"""Compressed-state recipes: every coordinate kept, the statistics stored small.

* ``adamw8bit`` - AdamW with blockwise 8-bit moments (Dettmers et al. 2022), about 2 bytes/param.
* ``adamw4bit`` - AdamW with 4-bit moments (Li et al. 2023), about 1 byte/param.
* ``adamw4bit_rank1`` - ``adamw4bit`` with rank-1 normalization of ``v`` (Li et al. 2023, Section 4.2).
* ``microadam`` - MicroAdam (Modoranu et al. 2024): a window of sparse gradients plus 4-bit error
  feedback, under 1 byte/param.
* ``spam`` / ``stable_spam`` - AdamW with SPAM's / Stable-SPAM's stabilizers (Huang et al. 2025).

The quantized moments (:class:`~lowmem.optim.quantized.Quantized`) and the stabilizers
(:mod:`lowmem.optim.stabilizers`) compose with any recipe, e.g. a subspace recipe's moments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from ..engine import LowMemOptimizer, Recipe
from ..hparams import BETAS, EPS, LR, WEIGHT_DECAY, HParam, positive_int
from ..microadam import MicroAdamMoments
from ..bnb_fused import FUSED
from ..moments import AdamMoments
from ..quantized import M1_4BIT, M1_8BIT, M2_4BIT, M2_8BIT, V_NORMALIZATION, Quantized, quant_hparams
from ..registry import register
from .subspace import _EXAMPLE as _SUBSPACE_EXAMPLE
from .subspace import FIRA_ADAMW, FRUGAL, GALORE_ADAMW
from ..stabilizers import (
    SPAM_HPARAMS,
    STABLE_SPAM_HPARAMS,
    RestartBiasCorrection,
    SPAMStabilizer,
    StableSPAMStabilizer,
    check_spam_state_dtype,
)

# ---- 8-bit and 4-bit AdamW ------------------------------------------------------------------

ADAMW8BIT = Recipe(
    name="adamw8bit",
    summary="AdamW with blockwise 8-bit moments (dynamic maps, bitsandbytes' codec); ~2 bytes/param",
    reference="Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization, Section 2",
    moment=Quantized(AdamMoments("torch"), {"exp_avg": M1_8BIT, "exp_avg_sq": M2_8BIT}),
    hparams=(LR(1e-3), BETAS(), EPS(1e-8), WEIGHT_DECAY(1e-2), *quant_hparams(256), FUSED),
)

ADAMW4BIT = Recipe(
    name="adamw4bit",
    summary="AdamW with 4-bit moments (signed dynamic map for m, zero-free linear map for v); ~1 byte/param",
    reference="Li et al. 2023, Memory Efficient Optimizers with 4-bit States, Sections 3-4 (B128/DE m, Linear v)",
    moment=Quantized(AdamMoments("torch"), {"exp_avg": M1_4BIT, "exp_avg_sq": M2_4BIT}, rank1_key="exp_avg_sq"),
    hparams=(LR(1e-3), BETAS(), EPS(1e-8), WEIGHT_DECAY(1e-2), *quant_hparams(128), V_NORMALIZATION),
)

ADAMW4BIT_RANK1 = dataclasses.replace(
    ADAMW4BIT,
    name="adamw4bit_rank1",
    summary="adamw4bit with rank-1 normalization of v (min of row and column max); ~1 byte/param",
    reference="Li et al. 2023, Memory Efficient Optimizers with 4-bit States, Sections 4.1-4.2 (Rank-1/Linear v)",
    hparams=tuple(dataclasses.replace(h, default="rank1") if h.name == "v_normalization" else h
                  for h in ADAMW4BIT.hparams),
)

_QUANT_ARGS_DOC = """
        block_size (`int`): Values per quantization block (one float32 absmax each); one of
            64, 128, ..., 4096.
        min_quant_size (`int`, defaults to `4096`): Tensors with fewer elements keep float32 moments.
        state_dtype (`str`, defaults to `"float32"`): Storage of the moments that stay unquantized.
        foreach (`bool` or `None`, defaults to `None`): `None` steps float32 parameters (up to
            ``chunk_numel`` elements a bucket) together: one decode and one encode per moment for the
            tensors of whole blocks, the update as multi-tensor ops, equal bit for bit to `False`
            (one tensor at a time); FSDP2 groups and rank-1 tensors of more than 2 dimensions take
            the per-parameter step."""


class AdamW8bit(LowMemOptimizer):
    __doc__ = f"""AdamW whose moments are stored in 8 bits per value (Dettmers et al. 2022).

    Blockwise quantization with bitsandbytes' dynamic maps (signed for ``m``, unsigned for ``v``),
    CPU and GPU; the update itself is torch's AdamW in float32. State: 2 bytes per parameter plus
    8 bytes per block of 256.

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-3`), betas (`tuple`, defaults to `(0.9, 0.999)`), eps (`float`,
            defaults to `1e-8`), weight_decay (`float`, defaults to `1e-2`): as ``torch.optim.AdamW``.
        {_QUANT_ARGS_DOC.strip()} Defaults to 256 for ``block_size``.
        fused (`bool` or `None`, defaults to `None`): bitsandbytes' fused blockwise 8-bit Adam step
            (``optimizer_update_8bit_blockwise``, :mod:`lowmem.optim.bnb_fused`) on the 8-bit state
            itself (same format, same checkpoints), for the tensors with 8-bit moments, on the
            multi-tensor step and on the per-parameter one (``foreach=False``, bf16 / fp16
            parameters, layerwise mode); not on FSDP2 shards. `None`: on CUDA where it
            applies (``block_size=256``, a contiguous parameter and gradient of one dtype,
            ``weight_decay >= 0``); the kernel works in registers (0 transient bytes) but decays after
            the update and rounds its codes its own way, so results differ from the CPU path at
            rounding level (not tested without a GPU). CPU keeps the chunked PyTorch step. `True`:
            required, a `ValueError` naming the failing condition otherwise (also for an FSDP2
            shard); on CPU it runs bitsandbytes' CPU implementation, with float32
            temporaries of 20 bytes per value of each slice of whole blocks (at most ``chunk_numel``
            values, counted by ``step_transient_bytes``). `False`: never. Tensors below
            ``min_quant_size`` (float32 moments) always take the plain step.
    """

    recipe = ADAMW8BIT

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, block_size: int = 256, min_quant_size: int = 4096,
                 state_dtype: str = "float32", foreach: bool | None = None, fused: bool | None = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block_size=block_size,
                         min_quant_size=min_quant_size, state_dtype=state_dtype, foreach=foreach, fused=fused)


class AdamW4bit(LowMemOptimizer):
    __doc__ = f"""AdamW whose moments are stored in 4 bits per value (Li et al. 2023).

    First moment: blocks of 128, signed dynamic-exponent map; second moment: linear map without
    zero (avoids the zero-point blow-up of ``m / sqrt(v)``), normalized per block of 128 or, with
    ``v_normalization="rank1"``, by ``min(row max, column max)`` (the paper's rank-1
    normalization, Section 4.2; tensors with ``ndim >= 2``, last two dimensions). bitsandbytes has
    no 4-bit optimizer; the codes are lowmem's (two per byte). State: 1 byte per parameter plus
    8 bytes per block of 128 (block ``v``), or plus 4 bytes per block and ``4 (m + n)`` bytes per
    ``m x n`` matrix (rank-1 ``v``). The registered ``adamw4bit_rank1`` is this optimizer with
    ``v_normalization="rank1"`` as its default.

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-3`), betas (`tuple`, defaults to `(0.9, 0.999)`), eps (`float`,
            defaults to `1e-8`), weight_decay (`float`, defaults to `1e-2`): as ``torch.optim.AdamW``.
        {_QUANT_ARGS_DOC.strip()} Defaults to 128 for ``block_size``.
        v_normalization (`str`, defaults to `"block"`): Scales of the quantized second moment:
            ``"block"`` (absmax per block of ``block_size``) or ``"rank1"`` (``min(r_i, c_j)`` of
            the last two dimensions, Li et al. 2023 Section 4.2; 1-D tensors stay block-wise).
            The first moment is always block-wise.
    """

    recipe = ADAMW4BIT

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, block_size: int = 128, min_quant_size: int = 4096,
                 v_normalization: str = "block", state_dtype: str = "float32", foreach: bool | None = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block_size=block_size,
                         min_quant_size=min_quant_size, v_normalization=v_normalization, state_dtype=state_dtype,
                         foreach=foreach)


# ---- MicroAdam ------------------------------------------------------------------------------


def _density(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 1


def _topk_block(x: Any) -> bool:
    return positive_int(x) and x <= 32768  # block-relative indices are int16


MICROADAM_HPARAMS = (
    LR(1e-3),
    HParam("m", 10, positive_int, "an int > 0", "number of sparse gradients in the ring buffer (window)"),
    HParam("quant_block_size", 2048, positive_int, "an int > 0", "values per min/max block of the 4-bit error feedback"),
    HParam("k_init", 0.01, _density, "a float in (0, 1]", "density of the top-k selection per block"),
    BETAS(),
    WEIGHT_DECAY(0.0),
    EPS(1e-8),
    HParam("topk_block_size", 4096, _topk_block, "an int in [1, 32768]",
           "entries per top-k block (indices are stored block-relative as int16)"),
)

MICROADAM = Recipe(
    name="microadam",
    summary="MicroAdam: top-k window of sparse gradients + 4-bit error feedback; < 1 byte/param",
    reference="Modoranu et al. 2024, MicroAdam: Accurate Adaptive Optimization with Low Space Overhead, Algorithm 1",
    moment=MicroAdamMoments(),
    hparams=MICROADAM_HPARAMS,
)


class MicroAdam(LowMemOptimizer):
    """MicroAdam (Modoranu et al. 2024) on the lowmem engine; CPU and GPU, float32 and bf16 parameters.

    Accepts the reference implementation's arguments (``m, lr, quant_block_size, k_init, betas,
    weight_decay, eps``). Each step adds the 4-bit error feedback to the gradient, keeps the top
    ``k_init`` fraction of every block of ``topk_block_size`` entries in a ring buffer of ``m``
    sparse gradients (int16 indices, bf16 values), stores the rest as the new 4-bit error (min/max
    per ``quant_block_size`` block), and steps along Adam's direction rebuilt from the window.
    Weight decay is decoupled (``p *= 1 - lr * weight_decay``). On CUDA the step runs
    ``torch.compile``'d (set ``LOWMEM_MICROADAM_COMPILE=0`` for the plain path).

    State at the defaults: ``0.4 + 0.5 + 8 / quant_block_size`` bytes per parameter (0.904 for a
    4096 x 4096 weight); it is saved and loaded bit for bit.

    Args:
        params: Parameters or parameter groups.
        m (`int`, defaults to `10`): Ring-buffer length (number of sparse gradients kept).
        lr (`float`, defaults to `1e-3`): Learning rate.
        quant_block_size (`int`, defaults to `2048`): Entries per min/max block of the error
            feedback (the reference's scripts use 100000; smaller is more precise, 8 bytes/block).
        k_init (`float`, defaults to `0.01`): Fraction of each top-k block kept per step.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): Decay of the window weights.
        weight_decay (`float`, defaults to `0.0`): Decoupled weight decay.
        eps (`float`, defaults to `1e-8`): Added to ``sqrt(v_hat)``.
        topk_block_size (`int`, defaults to `4096`): Entries per top-k block (the reference derives
            it from the GPU's shared memory); at most 32768.
        state_dtype (`str`, defaults to `"float32"`): Accepted for uniformity; MicroAdam's buffers have
            fixed dtypes.
        foreach (`bool` or `None`, defaults to `None`): `None` steps float32 parameters (up to
            ``chunk_numel`` elements a bucket) together: the tensors of one size stacked as rows, one
            compression and one window rebuild per size, equal bit for bit to `False` (one tensor at a
            time); a tensor whose window outgrows half of it (``2 m k > d``) takes the per-parameter step, and
            so does each tensor where the compiled path is on (CUDA).
    """

    recipe = MICROADAM

    def __init__(self, params: Iterable[Any], m: int = 10, lr: float = 1e-3, quant_block_size: int = 2048,
                 k_init: float = 0.01, betas=(0.9, 0.999), weight_decay: float = 0.0, eps: float = 1e-8, *,
                 topk_block_size: int = 4096, state_dtype: str = "float32", foreach: bool | None = None):
        super().__init__(params, m=m, lr=lr, quant_block_size=quant_block_size, k_init=k_init, betas=betas,
                         weight_decay=weight_decay, eps=eps, topk_block_size=topk_block_size, state_dtype=state_dtype, foreach=foreach)


# ---- SPAM and Stable-SPAM -------------------------------------------------------------------

SPAM_RECIPE = Recipe(
    name="spam",
    summary="AdamW + SPAM: spike-aware clipping, periodic momentum reset, cosine lr warm-up after resets",
    reference="Huang et al. 2025, SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training, Algorithm 1",
    moment=AdamMoments("hf"),
    hparams=(LR(1e-3), BETAS(), EPS(1e-6), WEIGHT_DECAY(0.0), *SPAM_HPARAMS),
    stabilizers=(SPAMStabilizer(),),
    decay_after_update=True,
    validate_group=check_spam_state_dtype,
)

STABLE_SPAM_RECIPE = Recipe(
    name="stable_spam",
    summary="AdamW + Stable-SPAM: adaptive spike clipping, gradient-norm normalization, momentum reset",
    reference="Huang et al. 2025, Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam, Algorithm 1",
    moment=RestartBiasCorrection(AdamMoments("torch")),
    hparams=(LR(1e-3), BETAS(), EPS(1e-8), WEIGHT_DECAY(0.0), *STABLE_SPAM_HPARAMS),
    stabilizers=(StableSPAMStabilizer(),),
)


class SPAM(LowMemOptimizer):
    """SPAM (Huang et al. 2025): AdamW with spike-aware clipping and momentum reset.

    Follows the reference implementation: ``eps`` on the uncorrected ``sqrt(v)``, bias corrections
    counted from the first step, weight decay after the step (not warmed up).

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-3`), betas (`tuple`, defaults to `(0.9, 0.999)`), eps (`float`,
            defaults to `1e-6`), weight_decay (`float`, defaults to `0.0`): AdamW's.
        threshold (`float`, defaults to `5000`): Spike threshold ``theta`` (0 disables clipping).
        reset_interval (`int`, defaults to `500`): Momentum reset period ``Delta T`` (0 = never).
        warmup_steps (`int`, defaults to `150`): Cosine lr warm-up after each reset.
        grad_accu_steps (`int`, defaults to `20`): Steps of history before clipping applies.
        state_dtype (`str`, defaults to `"float32"`): Storage of the moments.
        foreach (`bool` or `None`, defaults to `None`): `None` steps float32 full-rank parameters in
            multi-tensor buckets (equal to the per-parameter step); `False` forces the per-parameter step.
    """

    recipe = SPAM_RECIPE

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, threshold: float = 5000.0, reset_interval: int = 500,
                 warmup_steps: int = 150, grad_accu_steps: int = 20, *, state_dtype: str = "float32", foreach: bool | None = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, threshold=threshold,
                         reset_interval=reset_interval, warmup_steps=warmup_steps, grad_accu_steps=grad_accu_steps,
                         state_dtype=state_dtype, foreach=foreach)


class StableSPAM(LowMemOptimizer):
    """Stable-SPAM (Huang et al. 2025): AdamW with AdaClip, AdaGN and momentum reset.

    Bias corrections restart at each momentum reset, as in the reference. A zero gradient stays
    zero and leaves AdaGN's statistics unchanged; the Adam step is still taken (docs/compressed.md
    compares this with the authors' code and pytorch-optimizer).

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-3`), betas (`tuple`, defaults to `(0.9, 0.999)`), eps (`float`,
            defaults to `1e-8`, also AdaGN's), weight_decay (`float`, defaults to `0.0`): AdamW's.
        gamma1 (`float`, defaults to `0.7`), gamma2 (`float`, defaults to `0.9`): AdaGN's norm EMAs.
        theta (`float`, defaults to `0.999`): AdaClip's max EMA.
        reset_interval (`int`, defaults to `1000`): Momentum reset period (0 = never).
        t_max (`int` or `None`, defaults to `None`): The reference implementation's optional cosine
            decay: ``beta1`` and ``gamma1`` are multiplied by ``0.5 + 0.25 (1 + cos(pi t / (t_max + 1)))``
            at step ``t`` (1 at the start, 0.5 at ``t_max + 1``; the cosine is not clamped after).
            Usually the total number of steps. ``None``: constant ``beta1``.
        stats_step (`str`, defaults to `"global"`): Step count in AdaClip's and AdaGN's bias
            corrections. ``"global"``: the optimizer step (as pytorch-optimizer's port).
            ``"since_reset"``: the authors' code, where one counter serves Adam and the statistics
            and restarts at each momentum reset while the statistics' EMAs do not, so AdaClip's
            bound is divided by ``1 - theta^2`` on the step after a reset (about 500x at
            ``theta = 0.999``: clipping is off for a while after each reset). Only matters with
            ``reset_interval > 0``.
        state_dtype (`str`, defaults to `"float32"`): Storage of the moments.
        foreach (`bool` or `None`, defaults to `None`): `None` steps float32 full-rank parameters in
            multi-tensor buckets (equal to the per-parameter step); `False` forces the per-parameter step.
    """

    recipe = STABLE_SPAM_RECIPE

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, gamma1: float = 0.7, gamma2: float = 0.9, theta: float = 0.999,
                 reset_interval: int = 1000, t_max: int | None = None, stats_step: str = "global", *,
                 state_dtype: str = "float32", foreach: bool | None = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma1=gamma1,
                         gamma2=gamma2, theta=theta, reset_interval=reset_interval, t_max=t_max,
                         stats_step=stats_step, state_dtype=state_dtype, foreach=foreach)


# ---- registry -------------------------------------------------------------------------------

_SMALL_QUANT = {"min_quant_size": 64, "block_size": 64}  # the toy's tensors are small: quantize them anyway

register(ADAMW8BIT, AdamW8bit, state_precision="8bit", second_moment="full", example_hparams=_SMALL_QUANT)
register(ADAMW4BIT, AdamW4bit, state_precision="4bit", second_moment="full", example_hparams=_SMALL_QUANT)
register(ADAMW4BIT_RANK1, state_precision="4bit", second_moment="full", example_hparams=_SMALL_QUANT)
register(MICROADAM, MicroAdam, state_precision="compressed", second_moment="full", example_hparams={"k_init": 0.1, "m": 4, "quant_block_size": 64, "topk_block_size": 128})
register(SPAM_RECIPE, SPAM, state_precision="fp32", second_moment="full", example_hparams={"reset_interval": 8, "warmup_steps": 3, "grad_accu_steps": 2, "threshold": 50.0})
register(STABLE_SPAM_RECIPE, StableSPAM, state_precision="fp32", second_moment="full", example_hparams={"reset_interval": 8, "t_max": 40})


# ---- 8-bit subspace variants ------------------------------------------------------------------


def _eight_bit(recipe: Recipe) -> Recipe:
    """``recipe`` with its Adam moments (the projected ones under a projection) stored in 8 bits.

    Rotating moments into a new basis would do arithmetic on the codes, so ``moment_policy="rotate"``
    is refused; ``keep`` and ``reset`` (codes zeroed, which decodes to zero) are exact.
    """

    def validate(group: dict[str, Any]) -> None:
        if group.get("moment_policy") == "rotate":
            raise ValueError(f"{recipe.name}8bit: moment_policy='rotate' is not supported on 8-bit moments; valid: 'keep', 'reset'")
        if recipe.validate_group is not None:
            recipe.validate_group(group)

    return dataclasses.replace(
        recipe, name=f"{recipe.name}8bit", summary=f"{recipe.summary}; its moments in 8 bits",
        reference=f"{recipe.reference}; 8-bit states: Dettmers et al. 2022",
        moment=Quantized(recipe.moment, {"exp_avg": M1_8BIT, "exp_avg_sq": M2_8BIT}),
        hparams=(*recipe.hparams, *quant_hparams(256)), validate_group=validate,
    )


GALORE_ADAMW8BIT = _eight_bit(GALORE_ADAMW)
FIRA_ADAMW8BIT = _eight_bit(FIRA_ADAMW)
FRUGAL8BIT = _eight_bit(FRUGAL)

register(GALORE_ADAMW8BIT, batched_targets=True, state_precision="8bit", second_moment="full", example_hparams={**_SUBSPACE_EXAMPLE, **_SMALL_QUANT, "scale": 1.0, "min_quant_size": 16})
register(FIRA_ADAMW8BIT, batched_targets=True, state_precision="8bit", second_moment="full", example_hparams={**_SUBSPACE_EXAMPLE, **_SMALL_QUANT, "min_quant_size": 16})
register(FRUGAL8BIT, batched_targets=True, state_precision="8bit", second_moment="full", example_hparams={**_SUBSPACE_EXAMPLE, **_SMALL_QUANT, "min_quant_size": 16, "projection": "columns"})
