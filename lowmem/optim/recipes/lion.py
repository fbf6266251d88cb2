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

from typing import Any, Iterable

import torch

from .. import bnb_fused
from ..bnb_fused import FUSED
from ..engine import LowMemOptimizer, Recipe
from ..functional import adam as FA
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

    ``fused_32bit`` (``lion``'s rule, not ``lion8bit``'s inner one): the group's ``fused`` sends a float32
    momentum to bitsandbytes' ``optimizer_update_32bit("lion")``
    (:func:`~lowmem.optim.bnb_fused.fused_lion32bit_step_`): per parameter (:meth:`fused_step_`) and per
    bucket member (:meth:`foreach_step_`); ``fused=True`` on a step that cannot take it is an error naming why.
    """

    def __init__(self, fused_32bit: bool = False):
        self.fused_32bit = fused_32bit

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
        if "exp_avg" in state:  # (a 0-d moment too: the engine passes its gradient as view(-1)[start:stop], [1])
            view["exp_avg"] = state["exp_avg"].view(-1)[start:stop]
        return view

    def transient_bytes(self, numel, shape, group, state):
        """The direction (float32, float64 for float64 moments); low-precision moments add their float32 copy."""
        dtype = state["exp_avg"].dtype if "exp_avg" in state else torch.float32
        if dtype == torch.float64:
            return 8 * numel
        return (4 if dtype == torch.float32 else 8) * numel

    def direction(self, g, state, group, t, lr):
        if self.fused_32bit and group.get("fused") is True:  # (the engine's step that is not fused_step_'s)
            raise ValueError("fused=True: this parameter's step has no fused form (an FSDP2 shard stepped per"
                             " parameter: bitsandbytes' kernel takes plain tensors); use fused=None or fused=False")
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

    #: bfloat16 parameters join the multi-tensor buckets (the engine's ``_step_bf16_bucket``) with a momentum of
    #: these dtypes: :meth:`bf16_bucket_direction` computes in float32 what :meth:`direction` computes
    bf16_bucket_state_dtypes = (torch.float32, torch.bfloat16)

    def bf16_bucket_takes(self, p, group) -> bool:
        """Whether bfloat16 ``p`` may join the buckets: not where the group's ``fused`` may send it to bitsandbytes'
        kernel per parameter (:meth:`fused_step_`: ``fused`` not ``False``, and ``None`` on a CUDA device)."""
        fused = group.get("fused", False)
        return not self.fused_32bit or fused is False or (fused is None and p.device.type != "cuda")

    def bf16_bucket_direction(self, g32s, states, group, t, lr):
        """:meth:`direction` of a bucket of bfloat16 parameters (pieces), one multi-tensor kernel per operation in the
        same order (:func:`~lowmem.optim.functional.lion.lion_direction_foreach`, bit for bit on the CPU): ``g32s``
        are the gradients' float32 copies, emptied (freed) once the directions and momenta are made; a bfloat16
        momentum is updated on a float32 copy and stored rounded to nearest (as :meth:`direction`). Returns the
        float32 directions; allocates :meth:`bf16_bucket_transient_bytes` at most."""
        beta1, beta2 = group["betas"]
        ms = [s["exp_avg"] for s in states]
        dtypes = {m.dtype for m in ms}
        if dtypes == {torch.float32}:
            cs = FL.lion_direction_foreach(ms, g32s, beta1, beta2)
            g32s.clear()
            return cs
        if dtypes != {torch.bfloat16}:
            raise ValueError(f"LionMoments.bf16_bucket_direction: the momenta of one bucket are all float32 or all"
                             f" bfloat16, got {sorted(map(str, dtypes))}")
        m32s = FA.float32_copies(ms)
        cs = FL.lion_direction_foreach(m32s, g32s, beta1, beta2)
        g32s.clear()
        torch._foreach_copy_(ms, m32s)
        return cs

    def bf16_bucket_transient_bytes(self, numel, states, members=None, group=None):
        """What :meth:`bf16_bucket_direction` allocates at most for ``numel`` elements, the gradients' float32 copies
        included: the directions beside them (8 B per element), and a bfloat16 momentum's float32 copy (12 B)."""
        low = any(s["exp_avg"].dtype != torch.float32 for s in states if "exp_avg" in s)
        return (12 if low else 8) * numel

    def foreach_direction_transient_bytes(self, numel):
        """The directions only (float32)."""
        return 4 * numel

    def foreach_transient_bytes(self, numel):
        """The bucket's directions (float32)."""
        return 4 * numel

    # ---- bitsandbytes' fused 32-bit Lion step (lion's ``fused``; lowmem.optim.bnb_fused) ----

    def _fused_here(self, p, g, state, group) -> bool:
        """Whether ``group["fused"]`` sends ``p`` and its momentum to ``optimizer_update_32bit`` (an error
        for ``fused=True`` where it cannot: :func:`~lowmem.optim.bnb_fused.use_fused_32bit`)."""
        if not self.fused_32bit or group.get("fused", False) is False:
            return False
        m = state["exp_avg"] if "exp_avg" in state else None
        if m is None or m.dim() == 0:
            return False
        return bnb_fused.use_fused_32bit(p, g, m, group)

    def fused_step_(self, p, grad, group, state, t, lr, chunk_numel) -> bool:
        """The per-parameter step of ``p`` by :func:`~lowmem.optim.bnb_fused.fused_lion32bit_step_` (on CPU
        in slices of ``chunk_numel``) where the group's ``fused`` says so; returns whether it ran."""
        if not self._fused_here(p, grad, state, group):
            return False
        bnb_fused.fused_lion32bit_step_(p, grad, state["exp_avg"], group, t, lr, chunk_numel)
        return True

    def _fused_bytes(self, n, dtype, state, group, device) -> int | None:
        """What the fused step of ``n`` values allocates (``None``: not fused): 0 on CUDA, bitsandbytes'
        CPU temporaries (:func:`~lowmem.optim.bnb_fused.fused_lion32_cpu_transient_bytes`) on the CPU.
        Parameters and gradients assumed contiguous and of one dtype, as the engine's bound assumes."""
        fused = group.get("fused", False) if group is not None else False
        if not self.fused_32bit or fused is False or (fused is None and device.type != "cuda"):
            return None
        m = state.get("exp_avg")
        if m is None or m.dim() == 0 or m.dtype != torch.float32 or device.type not in ("cuda", "cpu"):
            return None
        return 0 if device.type == "cuda" else bnb_fused.fused_lion32_cpu_transient_bytes(n, dtype)

    def fused_step_allocates_nothing(self, p, group, state) -> bool:
        """Whether :meth:`fused_step_` steps ``p`` with bitsandbytes' CUDA kernel (no temporaries)."""
        return self._fused_bytes(p.numel(), p.dtype, state, group, p.device) == 0

    def fused_step_transient_bytes(self, p, group, state, chunk_numel) -> int | None:
        """What :meth:`fused_step_` allocates stepping ``p`` alone (``None``: it does not): the CPU's temporaries
        of its largest slice (``chunk_numel``, at most the tensor), 0 on CUDA."""
        n = p.numel() if chunk_numel is None else min(p.numel(), max(1, chunk_numel))
        return self._fused_bytes(n, p.dtype, state, group, p.device)

    def foreach_bucket_transient_bytes(self, numel, members, group=None):
        """Each fused member stepped alone (:meth:`_fused_bytes`, float32 parameters), then the others'
        directions together (:meth:`foreach_transient_bytes`)."""
        fused, rest = [], 0
        for n, state in members:
            m = state.get("exp_avg")
            b = None if m is None else self._fused_bytes(n, torch.float32, state, group, m.device)
            if b is None:
                rest += n
            else:
                fused.append(b)
        if not fused:
            return self.foreach_transient_bytes(numel)
        return max(max(fused), self.foreach_transient_bytes(rest))

    def foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """Whole Lion step of float32 tensors: the directions (:meth:`foreach_direction`), then the decoupled
        decay and ``p -= lr d`` as multi-tensor ops (the engine's per-parameter decay and update, the same
        operations: :func:`~lowmem.optim.quantized.apply_updates_foreach_`). With ``fused``, each member it
        applies to (a tensor or a piece: element-wise) by :func:`~lowmem.optim.bnb_fused.fused_lion32bit_step_`
        first."""
        fused = group.get("fused", False) if self.fused_32bit else False
        if fused is True or (fused is None and any(p.is_cuda for p in params)):
            # (fused=None fuses CUDA tensors only, bnb_fused.use_fused_32bit: a CPU bucket skips the per-member check)
            rest = [(p, g, st) for p, g, st in zip(params, grads, states)
                    if not self.fused_step_(p, g, group, st, t, lr, None)]
            if not rest:
                return
            params, grads, states = (list(x) for x in zip(*rest))
        ds = self.foreach_direction(grads, states, group, t, lr)
        apply_updates_foreach_(params, ds, lr, group.get("weight_decay", 0.0), decay_after=False)

    def foreach_prepare(self, params, grads, states, group, t, lr):
        """:meth:`foreach_step_` prepared ahead (the engine's ``_prepare_buckets``, before the step's device read):
        which members bitsandbytes' fused kernel steps (:meth:`_fused_here` per member, on CUDA with ``fused=None``:
        a few host calls per tensor) and the lists of the others now; the kernels when the returned function is
        called: the fused members first, then the others' directions, decay and update (the same operations in
        the same order)."""
        fused = group.get("fused", False) if self.fused_32bit else False
        members = []
        # (the engine's bucket is on one device, its key's: the first member's tells whether any is on CUDA)
        if fused is True or (fused is None and params and params[0].is_cuda):
            rest = []
            for p, g, st in zip(params, grads, states):
                (members if self._fused_here(p, g, st, group) else rest).append((p, g, st))
            params, grads, states = (list(x) for x in zip(*rest)) if rest else ([], [], [])

        def launch() -> None:
            for p, g, st in members:
                bnb_fused.fused_lion32bit_step_(p, g, st["exp_avg"], group, t, lr, None)
            if params:
                ds = self.foreach_direction(grads, states, group, t, lr)
                apply_updates_foreach_(params, ds, lr, group.get("weight_decay", 0.0), decay_after=False)

        return launch


class Lion8bitQuantized(Quantized):
    """:class:`~lowmem.optim.quantized.Quantized` Lion with the group's ``fused`` routed to bitsandbytes'
    fused Lion step (:func:`~lowmem.optim.bnb_fused.fused_lion8bit_step_`) instead of its Adam step: the
    same conditions (``bnb_fused.use_fused``, pieces stepped whole from the first, CPU slices of whole
    blocks), the same transient bytes (``fused_cpu_transient_bytes``: Lion's CPU temporaries count as
    Adam's). Only :meth:`_fusable` and the kernel hook :meth:`_fused_kernel_step_` differ from Quantized's."""

    def _fusable(self, state) -> bool:
        """The momentum in bitsandbytes' blockwise 8-bit format (signed dynamic map, not rank-1)."""
        return (self.specs == {"exp_avg": M1_8BIT} and is_quantized(state, "exp_avg")
                and not is_rank1(state, "exp_avg"))

    def _fused_kernel_step_(self, p, g, state, group, t, lr, chunk) -> None:
        """bitsandbytes' fused Lion step (the signed map only: Lion has no second moment)."""
        bnb_fused.fused_lion8bit_step_(p, g, state, group, t, lr, bnb_fused.code_maps(str(p.device))[0], chunk)


_LION_HPARAMS = (
    LR(1e-4),
    BETAS((0.9, 0.99)),
    WEIGHT_DECAY(0.0),
)

LION = Recipe(
    name="lion",
    summary="Lion: sign of an interpolated momentum, one float32 moment; 4 bytes/param",
    reference="Chen et al. 2023, Symbolic Discovery of Optimization Algorithms, Algorithm 2 / Program 1",
    moment=LionMoments(fused_32bit=True),
    hparams=(*_LION_HPARAMS, FUSED),
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
        fused (`bool` or `None`, defaults to `None`): bitsandbytes' fused 32-bit Lion step
            (``optimizer_update_32bit("lion", ...)``, :mod:`lowmem.optim.bnb_fused`) on the float32 moment in
            place: ``None`` where it applies (CUDA), ``True`` required (on the CPU bitsandbytes' CPU
            implementation, bit for bit the engine's step; a tensor it cannot take, e.g. ``state_dtype`` not
            float32, is an error naming why), ``False`` never.
    """

    recipe = LION

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, state_dtype: str = "float32", foreach: bool | None = None,
                 fused: bool | None = None):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, state_dtype=state_dtype,
                         foreach=foreach, fused=fused)


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
