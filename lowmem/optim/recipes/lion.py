"""Lion (Chen et al. 2023) and Lion with its momentum in 8 bits.

* ``lion`` - Algorithm 2 / Program 1 of "Symbolic Discovery of Optimization Algorithms": one float32
  momentum (4 bytes/param), the update ``sign(beta1 m + (1 - beta1) g)``.
* ``lion8bit`` - the same with the momentum in blockwise 8-bit codes (signed dynamic map, blocks of
  256: bitsandbytes' ``Lion8bit`` format), 1 byte/param plus 4 bytes per block. ``fused`` (as
  ``adamw8bit``'s) steps it with bitsandbytes' fused blockwise kernel on that same state
  (:func:`lowmem.optim.bnb_fused.fused_lion8bit_step_`): ``None`` on CUDA, ``True`` also on the CPU
  (bitsandbytes' CPU implementation, bit for bit the chunked step), ``False`` never.

The one new part is the moment rule :class:`LionMoments` (math in
:mod:`lowmem.optim.functional.lion`); decay before the update, constant lr and the 8-bit storage
(:class:`~lowmem.optim.quantized.Quantized`) are the engine's.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from .. import bnb_fused
from ..bnb_fused import FUSED
from ..engine import LowMemOptimizer, Recipe
from ..functional import lion as FL
from ..hparams import BETAS, LR, WEIGHT_DECAY
from ..moments import ChunkState, MomentRule, state_dtype
from ..quantized import M1_8BIT, Quantized, apply_updates_foreach_, is_quantized, is_rank1, quant_hparams
from ..registry import register


class LionMoments(MomentRule):
    """Lion's momentum (Chen et al. 2023, Algorithm 2): ``exp_avg``, of the gradient's shape.

    :meth:`direction` returns ``sign(beta1 m + (1 - beta1) g)`` and updates
    ``m <- beta2 m + (1 - beta2) g`` (:func:`~lowmem.optim.functional.lion.lion_direction_`), in float32
    (float64 for float64 moments); low-precision storage (``state_dtype="bfloat16"`` / ``"param"``) is
    updated on a float32 copy and stored rounded. Element-wise: chunks of any size, and a multi-tensor
    step for float32 parameters (:meth:`foreach_step_`, equal bit for bit on the CPU).
    """

    state_keys = ("exp_avg",)
    supports_foreach = True
    chunk_direction_is_new = True  # (the sign is a new tensor; the gradient chunk is only read)
    pieces_elementwise = True  # (a tensor in foreach pieces is stepped piece by piece with its buckets)

    def init_state(self, state, shape, group, param):
        state["exp_avg"] = torch.zeros(shape, dtype=state_dtype(group, param), device=param.device)

    def chunk_align(self, shape, group, state):
        return 1  # element-wise

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        view = ChunkState(state, start, stop)
        if "exp_avg" in state and state["exp_avg"].dim() > 0:
            view["exp_avg"] = state["exp_avg"].view(-1)[start:stop]
        return view

    def transient_bytes(self, numel, shape, group, state):
        """The direction (float32, float64 for float64 moments); low-precision moments add their float32 copy."""
        dtype = state["exp_avg"].dtype if "exp_avg" in state else torch.float32
        if dtype == torch.float64:
            return 8 * numel
        return (4 if dtype == torch.float32 else 8) * numel

    def direction(self, g, state, group, t, lr):
        beta1, beta2 = group["betas"]
        m = state["exp_avg"]
        if m.dtype in (torch.float32, torch.float64):
            return FL.lion_direction_(m, g, beta1, beta2)
        m32 = m.float()  # low-precision storage: the EMA in float32, stored rounded
        d = FL.lion_direction_(m32, g, beta1, beta2)
        m.copy_(m32)
        return d

    def foreach_direction(self, gs, states, group, t, lr):
        """:meth:`direction` of float32 moments, one kernel per operation for the list
        (:func:`~lowmem.optim.functional.lion.lion_direction_foreach`)."""
        beta1, beta2 = group["betas"]
        return FL.lion_direction_foreach([s["exp_avg"] for s in states], gs, beta1, beta2)

    def foreach_direction_transient_bytes(self, numel):
        """The directions only (float32)."""
        return 4 * numel

    def foreach_transient_bytes(self, numel):
        """The bucket's directions (float32)."""
        return 4 * numel

    def foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """Whole Lion step of float32 tensors: the directions (:meth:`foreach_direction`), then the decoupled
        decay and ``p -= lr d`` as multi-tensor ops (the engine's per-parameter decay and update, the same
        operations: :func:`~lowmem.optim.quantized.apply_updates_foreach_`)."""
        ds = self.foreach_direction(grads, states, group, t, lr)
        apply_updates_foreach_(params, ds, lr, group.get("weight_decay", 0.0), decay_after=False)


class Lion8bitQuantized(Quantized):
    """:class:`~lowmem.optim.quantized.Quantized` Lion with the group's ``fused`` routed to bitsandbytes'
    fused Lion step (:func:`~lowmem.optim.bnb_fused.fused_lion8bit_step_`) instead of its Adam step: the
    same conditions (``bnb_fused.use_fused``, pieces stepped whole from the first, CPU slices of whole
    blocks), the same transient bytes (``fused_cpu_transient_bytes``: Lion's CPU temporaries count as
    Adam's). :meth:`_fused_member_` and :meth:`fused_step_` are Quantized's with the Lion kernel
    (FOUND_FUSEDLION 1: a kernel hook in Quantized would leave only :meth:`_fusable` here)."""

    def _fusable(self, state) -> bool:
        """The momentum in bitsandbytes' blockwise 8-bit format (signed dynamic map, not rank-1)."""
        return (self.specs == {"exp_avg": M1_8BIT} and is_quantized(state, "exp_avg")
                and not is_rank1(state, "exp_avg"))

    def _fused_member_(self, p, g, st, group, t, lr) -> bool:
        if "fused" not in group or group["fused"] is False:
            return False
        piece = isinstance(st, ChunkState) and "parent" in st.extra
        state = st.extra["parent"] if piece else st
        if not self._fusable(state):
            return False
        chunk = None
        if piece:
            numel = math.prod(st.extra["shape"])
            chunk = st.stop - st.start
            p = p.as_strided((numel,), (1,), p.storage_offset() - st.start)
            g = g.as_strided((numel,), (1,), g.storage_offset() - st.start)
        if not bnb_fused.use_fused(p, g, state, group):
            return False
        if piece and st.start != 0:
            return True  # (stepped with the first piece)
        bnb_fused.fused_lion8bit_step_(p, g, state, group, t, lr, bnb_fused.code_maps(str(p.device))[0], chunk)
        return True

    def fused_step_(self, p, grad, group, state, t, lr, chunk_numel) -> bool:
        if "fused" not in group or group["fused"] is False or not self._fusable(state):
            return False
        if not bnb_fused.use_fused(p, grad, state, group):
            return False
        bnb_fused.fused_lion8bit_step_(p, grad, state, group, t, lr, bnb_fused.code_maps(str(p.device))[0],
                                       chunk_numel)
        return True


_LION_HPARAMS = (
    LR(1e-4),
    BETAS((0.9, 0.99)),
    WEIGHT_DECAY(0.0),
)

LION = Recipe(
    name="lion",
    summary="Lion: sign of an interpolated momentum, one float32 moment; 4 bytes/param",
    reference="Chen et al. 2023, Symbolic Discovery of Optimization Algorithms, Algorithm 2 / Program 1",
    moment=LionMoments(),
    hparams=_LION_HPARAMS,
)

LION8BIT = Recipe(
    name="lion8bit",
    summary="Lion with its momentum in blockwise 8-bit codes (bitsandbytes' Lion8bit format); ~1 byte/param",
    reference="Chen et al. 2023, Algorithm 2; Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization",
    moment=Lion8bitQuantized(LionMoments(), {"exp_avg": M1_8BIT}),
    hparams=(*_LION_HPARAMS, *quant_hparams(256), FUSED),
)


class Lion(LowMemOptimizer):
    """Lion (Chen et al. 2023) on the lowmem engine, a drop-in for ``pytorch_optimizer.Lion`` /
    ``bitsandbytes.optim.Lion`` (tested equal on the CPU).

    Each step: ``c = beta1 m + (1 - beta1) g``; ``p <- p (1 - lr wd) - lr sign(c)``;
    ``m <- beta2 m + (1 - beta2) g``. Every coordinate moves by ``lr``, so the paper advises an ``lr``
    3-10x smaller than AdamW's and a weight decay 3-10x larger (keeping ``lr * wd``). State: one float32
    moment, 4 bytes per parameter (also for bf16 parameters; ``state_dtype="param"`` stores it in theirs).

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-4`): Learning rate (the size of every coordinate's step).
        betas (`tuple[float, float]`, defaults to `(0.9, 0.99)`): ``beta1`` interpolates the update,
            ``beta2`` is the momentum's decay; each in [0, 1).
        weight_decay (`float`, defaults to `0.0`): Decoupled weight decay, ``p *= 1 - lr * weight_decay``
            before the step.
        state_dtype (`str`, defaults to `"float32"`): Storage of the moment: ``"float32"``,
            ``"bfloat16"`` or ``"param"``.
        foreach (`bool` or `None`, defaults to `None`): Multi-tensor path for float32 parameters with
            float32 state (``None``: automatically); ``False`` forces the single-tensor reference.
    """

    recipe = LION

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, state_dtype: str = "float32", foreach: bool | None = None):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, state_dtype=state_dtype,
                         foreach=foreach)


class Lion8bit(LowMemOptimizer):
    """Lion (Chen et al. 2023) with its momentum stored in 8 bits (Dettmers et al. 2022), like
    ``bitsandbytes.optim.Lion8bit`` (same codes: signed dynamic map, blocks of 256; tested equal on the CPU).

    The momentum is decoded to float32, stepped as :class:`Lion`'s and encoded again. State: 1 byte per
    parameter plus one float32 absmax per block; tensors under ``min_quant_size`` keep a float32 moment.

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-4`), betas (`tuple`, defaults to `(0.9, 0.99)`), weight_decay (`float`,
            defaults to `0.0`): as :class:`Lion`.
        block_size (`int`, defaults to `256`): Values per quantization block (one float32 absmax each); one of
            64, 128, ..., 4096.
        min_quant_size (`int`, defaults to `4096`): Tensors with fewer elements keep a float32 moment
            (bitsandbytes' ``min_8bit_size``).
        state_dtype (`str`, defaults to `"float32"`): Storage of the moments that stay unquantized.
        foreach (`bool` or `None`, defaults to `None`): `None` steps float32 parameters together (one decode
            and one encode per bucket), equal bit for bit to `False` (one tensor at a time).
        fused (`bool` or `None`, defaults to `None`): bitsandbytes' fused blockwise 8-bit Lion step
            (``optimizer_update_8bit_blockwise("lion", ...)``, :mod:`lowmem.optim.bnb_fused`) on the 8-bit
            momentum in place: ``None`` where it applies (CUDA, ``block_size=256``), ``True`` required (on the
            CPU bitsandbytes' CPU implementation; a tensor it cannot take is an error naming the reason),
            ``False`` never. Tensors under ``min_quant_size`` (float32 momentum) take the plain step.
    """

    recipe = LION8BIT

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, block_size: int = 256, min_quant_size: int = 4096,
                 state_dtype: str = "float32", foreach: bool | None = None, fused: bool | None = None):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, block_size=block_size,
                         min_quant_size=min_quant_size, state_dtype=state_dtype, foreach=foreach, fused=fused)


register(LION, Lion, state_precision="fp32", second_moment="none", example_hparams={"lr": 1e-3})
register(LION8BIT, Lion8bit, state_precision="8bit", second_moment="none",
         example_hparams={"lr": 1e-3, "min_quant_size": 64, "block_size": 64})  # (the toy's tensors are small: quantized anyway)
