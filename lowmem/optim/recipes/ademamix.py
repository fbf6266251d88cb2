"""AdEMAMix (Pagliardini, Ablin, Grangier 2024) and AdEMAMix with its three moments in 8 bits.

* ``ademamix`` - Algorithm 1 of "The AdEMAMix Optimizer: Better, Faster, Older" (arXiv 2409.03137): Adam's
  two moments plus a slow EMA ``m2`` of the gradient (decay ``beta3``) mixed into the numerator with weight
  ``alpha``, with the paper's warmup schedulers of ``alpha`` and ``beta3`` (``t_alpha``, ``t_beta3``,
  Section 3). Three float32 moments: 12 bytes/param. Defaults and update are bitsandbytes' ``AdEMAMix``'s
  (tested equal on the CPU).
* ``ademamix8bit`` - the same with the three moments in blockwise 8-bit codes (signed dynamic map for
  ``m1`` and ``m2``, unsigned for ``nu``, blocks of 256: bitsandbytes' ``AdEMAMix8bit`` format), 3 bytes/param
  plus 12 bytes per block.

The one new part is the moment rule :class:`AdEMAMixMoments` (math in
:mod:`lowmem.optim.functional.ademamix`); decay before the update, constant lr and the 8-bit storage
(:class:`~lowmem.optim.quantized.Quantized`) are the engine's. The settings are AdamW's with ``betas``
``(beta1, beta2)`` (the Trainer's ``adam_beta1`` / ``adam_beta2``) and ``beta3``, ``alpha``, ``t_alpha``,
``t_beta3`` beside them: the keys of transformers' ``optim_args`` for ``optim="ademamix"``; the classes also
take bitsandbytes' ``betas=(beta1, beta2, beta3)``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..engine import LowMemOptimizer, Recipe
from ..functional import adam as FAD
from ..functional import ademamix as FA
from ..hparams import BETAS, EPS, LR, WEIGHT_DECAY, HParam, in_unit_interval, nonneg, optional, positive_int
from ..moments import ChunkState, MomentRule, state_dtype
from ..quantized import M1_8BIT, M2_8BIT, Quantized, apply_updates_foreach_, is_quantized, is_rank1, quant_hparams
from ..registry import register


def _step_settings(group: dict[str, Any], t: float) -> tuple[float, float, float, float]:
    """``(beta1, beta2, beta3(t), alpha(t))`` of step ``t``: the schedulers of Section 3
    (:func:`~lowmem.optim.functional.ademamix.beta3_schedule`, :func:`~lowmem.optim.functional.ademamix.alpha_schedule`)."""
    beta1, beta2 = group["betas"]
    beta3 = FA.beta3_schedule(t, beta1, group["beta3"], group["t_beta3"])
    return beta1, beta2, beta3, FA.alpha_schedule(t, group["alpha"], group["t_alpha"])


class AdEMAMixMoments(MomentRule):
    """AdEMAMix's moments (Pagliardini et al. 2024, Algorithm 1): ``exp_avg`` (``m1``, decay ``beta1``),
    ``exp_avg_slow`` (``m2``, decay ``beta3``, scheduled by ``t_beta3``) and ``exp_avg_sq`` (``nu``, decay
    ``beta2``), each of the gradient's shape.

    :meth:`direction` updates the three EMAs and returns ``(m1_hat + alpha m2) / (sqrt(nu_hat) + eps)``
    (:mod:`lowmem.optim.functional.ademamix`) in float32 (float64 for float64 moments); low-precision storage
    (``state_dtype="bfloat16"`` / ``"param"``) is updated on float32 copies and stored rounded. Element-wise:
    chunks of any size, and a multi-tensor step for float32 parameters (:meth:`foreach_step_`, equal bit for
    bit on the CPU).
    """

    state_keys = ("exp_avg", "exp_avg_slow", "exp_avg_sq")
    restarts_on_reset = True  # (every statistic zeroed; the bias corrections assume zero-initialised EMAs)
    supports_foreach = True
    chunk_direction_is_new = True  # (the direction is a new tensor; the gradient chunk is only read)
    pieces_elementwise = True  # (a tensor in foreach pieces is stepped piece by piece with its buckets)
    computes_in_state_precision = True  # (a float64 gradient is cast to the float32 state's precision first)

    def init_state(self, state, shape, group, param):
        dtype = state_dtype(group, param)
        for k in self.state_keys:
            state[k] = torch.zeros(shape, dtype=dtype, device=param.device)

    def chunk_align(self, shape, group, state):
        return 1  # element-wise

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        view = ChunkState(state, start, stop)
        for k in self.state_keys:
            if k in state:  # (a 0-d moment too: the engine passes its gradient as view(-1)[start:stop], [1])
                view[k] = state[k].view(-1)[start:stop]
        return view

    @staticmethod
    def _dtype(state) -> torch.dtype:
        return state["exp_avg"].dtype if "exp_avg" in state else torch.float32

    def transient_bytes(self, numel, shape, group, state):
        """The direction and one more tensor of the moments' precision (``m1 / c1``, then ``sqrt(nu)``): 8 B per
        element (16 with float64 moments); low-precision moments add their three float32 copies (12 B)."""
        dtype = self._dtype(state)
        if dtype == torch.float64:
            return 16 * numel
        return (8 if dtype == torch.float32 else 20) * numel

    def direction_bytes(self, numel, shape, group, state):
        """The returned direction: float64 with float64 moments, else float32."""
        return (8 if self._dtype(state) == torch.float64 else 4) * numel

    def direction(self, g, state, group, t, lr):
        beta1, beta2, beta3, alpha = _step_settings(group, t)
        m1, m2, nu = state["exp_avg"], state["exp_avg_slow"], state["exp_avg_sq"]
        if m1.dtype in (torch.float32, torch.float64):
            FA.ademamix_moments_(m1, m2, nu, g, beta1, beta2, beta3)
            return FA.ademamix_direction(m1, m2, nu, t, beta1, beta2, alpha, group["eps"])
        m32, s32, v32 = m1.float(), m2.float(), nu.float()  # low-precision storage: the EMAs in float32, stored rounded
        FA.ademamix_moments_(m32, s32, v32, g, beta1, beta2, beta3)
        m1.copy_(m32)
        m2.copy_(s32)
        nu.copy_(v32)
        return FA.ademamix_direction(m32, s32, v32, t, beta1, beta2, alpha, group["eps"])

    def foreach_direction(self, gs, states, group, t, lr):
        """:meth:`direction` of float32 moments, one kernel per operation for the list
        (:func:`~lowmem.optim.functional.ademamix.ademamix_direction_foreach`)."""
        beta1, beta2, beta3, alpha = _step_settings(group, t)
        return FA.ademamix_direction_foreach([s["exp_avg"] for s in states], [s["exp_avg_slow"] for s in states],
                                             [s["exp_avg_sq"] for s in states], gs, t, beta1, beta2, beta3, alpha,
                                             group["eps"])

    #: bfloat16 parameters join the multi-tensor buckets (the engine's ``_step_bf16_bucket``) with moments of these
    #: dtypes: :meth:`bf16_bucket_direction` computes in float32 what :meth:`direction` computes
    bf16_bucket_state_dtypes = (torch.float32, torch.bfloat16)

    def bf16_bucket_direction(self, g32s, states, group, t, lr):
        """:meth:`direction` of a bucket of bfloat16 parameters (pieces), one multi-tensor kernel per operation in the
        same order (:func:`~lowmem.optim.functional.ademamix.ademamix_moments_foreach_` then
        :func:`~lowmem.optim.functional.ademamix.ademamix_direction_from_moments_foreach`: Algorithm 1's three EMAs
        and update, bit for bit on the CPU): ``g32s`` are the gradients' float32 copies, emptied (freed) once the
        moments are updated, before the directions are made; bfloat16 moments are updated on float32 copies, stored rounded to nearest, and the
        direction is the unrounded copies' (as :meth:`direction`). Returns the float32 directions; allocates
        :meth:`bf16_bucket_transient_bytes` at most."""
        beta1, beta2, beta3, alpha = _step_settings(group, t)
        keys = self.state_keys
        moments = [[s[k] for s in states] for k in keys]
        dtypes = {x.dtype for xs in moments for x in xs}
        if dtypes not in ({torch.float32}, {torch.bfloat16}):
            raise ValueError(f"AdEMAMixMoments.bf16_bucket_direction: the moments of one bucket are all float32 or all"
                             f" bfloat16, got {sorted(map(str, dtypes))}")
        low = dtypes == {torch.bfloat16}
        m32s = [FAD.float32_copies(xs) for xs in moments] if low else moments
        FA.ademamix_moments_foreach_(*m32s, g32s, beta1, beta2, beta3)
        g32s.clear()  # (their last read: the directions are made without them)
        ds = FA.ademamix_direction_from_moments_foreach(*m32s, t, beta1, beta2, alpha, group["eps"])
        if low:
            for xs, x32s in zip(moments, m32s):
                torch._foreach_copy_(xs, x32s)
        return ds

    def bf16_bucket_transient_bytes(self, numel, states, members=None, group=None):
        """What :meth:`bf16_bucket_direction` allocates at most for ``numel`` elements, the gradients' float32 copies
        included: they are freed once the moments are updated, so the peak is the directions and ``m1 / c1``'s
        quotients (then the denominators), 8 B per element (the copies alone before: 4; 12 until 2026-12-01, when the
        copies lived through the directions); bfloat16 moments add their three float32 copies (20 B)."""
        low = any(s["exp_avg"].dtype != torch.float32 for s in states if "exp_avg" in s)
        return (20 if low else 8) * numel

    def foreach_direction_transient_bytes(self, numel):
        """The directions and the quotients ``m1 / c1`` (then the denominators): two float32 tensors."""
        return 8 * numel

    def foreach_transient_bytes(self, numel):
        """:meth:`foreach_direction_transient_bytes`: the update is in place."""
        return 8 * numel

    def foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """Whole AdEMAMix step of float32 tensors: the directions (:meth:`foreach_direction`), then the decoupled
        decay and ``p -= lr d`` as multi-tensor ops (the engine's per-parameter decay and update, the same
        operations: :func:`~lowmem.optim.quantized.apply_updates_foreach_`)."""
        ds = self.foreach_direction(grads, states, group, t, lr)
        apply_updates_foreach_(params, ds, lr, group.get("weight_decay", 0.0), decay_after=False)


class AdEMAMixQuantized(Quantized):
    """:class:`~lowmem.optim.quantized.Quantized` AdEMAMix. Only the per-parameter transient differs from
    Quantized's: the inner direction's peak (8 B per element: the direction and ``m1 / c1`` or ``sqrt(nu)``) is
    larger than the direction it leaves (4 B) while the three decoded moments are alive, and the encodes run
    beside the direction alone (:meth:`_transient_bytes`)."""

    def _transient_bytes(self, numel, shape, group, state, chunked: bool) -> int:
        quantized = [k for k in self.specs if is_quantized(state, k)]
        if not quantized or any(self.specs[k].bits != 8 or is_rank1(state, k) for k in quantized):
            return super()._transient_bytes(numel, shape, group, state, chunked)
        inner = self.inner.transient_bytes(numel, shape, group, {})
        kept = self.inner.direction_bytes(numel, shape, group, {})
        encode = max(4 * (len(quantized) - i) * numel + self._codec_bytes(numel, shape, group, state, k, chunked)
                     for i, k in enumerate(quantized))
        return max(4 * len(quantized) * numel + inner, kept + encode)


def _check_schedule(group: dict[str, Any]) -> None:
    """``t_beta3`` interpolates between ``ln(beta1)`` and ``ln(beta3)``: both must be in (0, 1)."""
    if group.get("t_beta3") is None:
        return
    beta1, beta3 = group["betas"][0], group["beta3"]
    if not (0 < beta1 < 1 and 0 < beta3 < 1):
        raise ValueError(f"Invalid t_beta3={group['t_beta3']!r} with betas[0]={beta1!r}, beta3={beta3!r}: the beta3 "
                         "scheduler interpolates between ln(beta1) and ln(beta3), so both must be in (0, 1) (or "
                         "t_beta3=None)")


_BETA3_DEFAULT = 0.9999

_ADEMAMIX_HPARAMS = (
    LR(1e-3),
    BETAS((0.9, 0.999)),
    HParam("beta3", _BETA3_DEFAULT, in_unit_interval, "a float with 0 <= beta3 < 1", "decay rate of the slow EMA m2"),
    HParam("alpha", 5.0, nonneg, "a finite float >= 0", "weight of the slow EMA m2 in the update"),
    HParam("t_alpha", None, optional(positive_int), "None or an int > 0",
           "steps of alpha's linear warmup from 0 (Section 3); None: alpha from the start"),
    HParam("t_beta3", None, optional(positive_int), "None or an int > 0",
           "steps of beta3's warmup from beta1 (Section 3; half-life linear); None: beta3 from the start"),
    EPS(1e-8),
    WEIGHT_DECAY(1e-2),
)

ADEMAMIX = Recipe(
    name="ademamix",
    summary="AdEMAMix: Adam + a slow EMA of the gradient mixed in (alpha, beta3), three float32 moments; 12 bytes/param",
    reference="Pagliardini, Ablin, Grangier 2024, The AdEMAMix Optimizer: Better, Faster, Older, Algorithm 1",
    moment=AdEMAMixMoments(),
    hparams=_ADEMAMIX_HPARAMS,
    validate_group=_check_schedule,
)

ADEMAMIX8BIT = Recipe(
    name="ademamix8bit",
    summary="AdEMAMix with its three moments in blockwise 8-bit codes (bitsandbytes' AdEMAMix8bit format); ~3 bytes/param",
    reference="Pagliardini et al. 2024, Algorithm 1; Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization",
    moment=AdEMAMixQuantized(AdEMAMixMoments(), {"exp_avg": M1_8BIT, "exp_avg_slow": M1_8BIT, "exp_avg_sq": M2_8BIT}),
    hparams=(*_ADEMAMIX_HPARAMS, *quant_hparams(256)),
    validate_group=_check_schedule,
)


def _split_betas(betas: Any, beta3: float) -> tuple[Any, float]:
    """bitsandbytes' ``betas=(beta1, beta2, beta3)`` as the recipe's ``betas=(beta1, beta2)`` and ``beta3``; a pair
    keeps ``beta3``. With a triple, ``beta3`` other than its default (0.9999) and other than the triple's third is an
    error (given twice, disagreeing)."""
    if isinstance(betas, (tuple, list)) and len(betas) == 3:
        if beta3 != _BETA3_DEFAULT and beta3 != betas[2]:
            raise ValueError(f"Invalid betas={tuple(betas)!r} with beta3={beta3!r}: beta3 given twice, disagreeing (give "
                             "betas as a triple (beta1, beta2, beta3), or a pair and beta3)")
        return tuple(betas[:2]), betas[2]
    return betas, beta3


_ARGS_DOC = """
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-3`): Learning rate.
        betas (`tuple`, defaults to `(0.9, 0.999)`): ``(beta1, beta2)``, or bitsandbytes' triple ``(beta1, beta2,
            beta3)`` (stored as ``betas=(beta1, beta2)`` and ``beta3`` in the parameter groups); each in [0, 1).
        alpha (`float`, defaults to `5.0`): Weight of the slow EMA in the update.
        t_alpha (`int` or `None`, defaults to `None`): ``alpha`` rises linearly from 0 over this many steps.
        t_beta3 (`int` or `None`, defaults to `None`): ``beta3`` rises from ``beta1`` over this many steps (the
            half-life of the slow EMA linear in the step); needs ``beta1`` and ``beta3`` in (0, 1).
        eps (`float`, defaults to `1e-8`): Added to ``sqrt(nu_hat)``.
        weight_decay (`float`, defaults to `1e-2`): Decoupled weight decay, ``p *= 1 - lr * weight_decay`` before
            the step.
        beta3 (`float`, defaults to `0.9999`): The slow EMA's decay, in [0, 1) (with a ``betas`` triple: its third;
            a different ``beta3`` here, other than the default, is an error)."""


class AdEMAMix(LowMemOptimizer):
    __doc__ = f"""AdEMAMix (Pagliardini, Ablin, Grangier 2024) on the lowmem engine, a drop-in for
    ``bitsandbytes.optim.AdEMAMix`` (same defaults; tested equal on the CPU).

    Each step: ``m1 <- b1 m1 + (1 - b1) g``; ``m2 <- b3 m2 + (1 - b3) g``; ``nu <- b2 nu + (1 - b2) g^2``;
    ``p <- p (1 - lr wd) - lr (m1 / (1 - b1^t) + alpha m2) / (sqrt(nu / (1 - b2^t)) + eps)``. State: three
    float32 moments, 12 bytes per parameter (``state_dtype="bfloat16"``: 6).

    Args:{_ARGS_DOC}
        state_dtype (`str`, defaults to `"float32"`): Storage of the moments: ``"float32"``, ``"bfloat16"`` or
            ``"param"``.
        foreach (`bool` or `None`, defaults to `None`): Multi-tensor path for float32 parameters with float32 state
            (``None``: automatically; equal bit for bit to ``False``, the single-tensor reference).
    """

    recipe = ADEMAMIX

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple = (0.9, 0.999),
                 alpha: float = 5.0, t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, beta3: float = _BETA3_DEFAULT, state_dtype: str = "float32",
                 foreach: bool | None = None):
        betas, beta3 = _split_betas(betas, beta3)
        super().__init__(params, lr=lr, betas=betas, beta3=beta3, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3,
                         eps=eps, weight_decay=weight_decay, state_dtype=state_dtype, foreach=foreach)


class AdEMAMix8bit(LowMemOptimizer):
    __doc__ = f"""AdEMAMix (Pagliardini et al. 2024) with its three moments stored in 8 bits (Dettmers et al. 2022),
    like ``bitsandbytes.optim.AdEMAMix8bit`` (the same format: signed dynamic map for ``m1`` and ``m2``, unsigned for
    ``nu``, one float32 absmax per block of 256; the same defaults).

    The moments are decoded to float32, stepped as :class:`AdEMAMix`'s and encoded again. State: 3 bytes per
    parameter plus three float32 absmax per block; tensors under ``min_quant_size`` keep float32 moments.

    Args:{_ARGS_DOC}
        block_size (`int`, defaults to `256`): Values per quantization block; one of 64, 128, ..., 4096.
        min_quant_size (`int`, defaults to `4096`): Tensors with fewer elements keep float32 moments
            (bitsandbytes' ``min_8bit_size``).
        state_dtype (`str`, defaults to `"float32"`): Storage of the moments that stay unquantized.
        foreach (`bool` or `None`, defaults to `None`): `None` steps float32 parameters together (one decode and
            one encode per moment and bucket), equal bit for bit to `False` (one tensor at a time).
    """

    recipe = ADEMAMIX8BIT

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple = (0.9, 0.999),
                 alpha: float = 5.0, t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, beta3: float = _BETA3_DEFAULT, block_size: int = 256,
                 min_quant_size: int = 4096, state_dtype: str = "float32", foreach: bool | None = None):
        betas, beta3 = _split_betas(betas, beta3)
        super().__init__(params, lr=lr, betas=betas, beta3=beta3, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3,
                         eps=eps, weight_decay=weight_decay, block_size=block_size, min_quant_size=min_quant_size,
                         state_dtype=state_dtype, foreach=foreach)


register(ADEMAMIX, AdEMAMix, state_precision="fp32", second_moment="full")
register(ADEMAMIX8BIT, AdEMAMix8bit, state_precision="8bit", second_moment="full",
         example_hparams={"min_quant_size": 64, "block_size": 64})  # (the toy's tensors are small: quantized anyway)
