"""bitsandbytes' fused blockwise 8-bit Adam and Lion steps on lowmem's own 8-bit state (``adamw8bit``'s and
``lion8bit``'s ``fused``).

lowmem's 8-bit moments (:mod:`lowmem.optim.quantized`, ``M1_8BIT`` / ``M2_8BIT``) are bitsandbytes'
blockwise format: ``uint8`` codes of the signed dynamic map for ``m`` and the unsigned one for ``v``
(``bitsandbytes.functional.create_dynamic_map``), one ``float32`` absmax per block, blocks in flat
order. With blocks of :data:`BNB_BLOCK_SIZE` (bitsandbytes' ``BLOCKSIZE_2STATE`` in csrc/ops.cu, and the
fixed ``blocksize`` of its CPU implementation) ``bitsandbytes.functional.optimizer_update_8bit_blockwise``
("adam") therefore updates ``p`` and the codes and absmax tensors of ``state[p]`` in place: the
checkpoint format does not change.

The step it computes (Dettmers et al. 2022, Section 2: dequantize, update, quantize; Loshchilov & Hutter
2019, Algorithm 2 for the decay) is the engine's AdamW with ``eps`` after the bias correction:

* CPU (bitsandbytes' ``_optimizer_update_8bit_blockwise_cpu``): decode both moments to float32,
  ``m = beta1 m + (1 - beta1) g`` (the engine uses ``lerp``: equal up to a rounding), ``v = beta2 v +
  (1 - beta2) g^2``, ``p *= 1 - lr wd`` *before* the update, ``p -= lr/(1 - beta1^t) m / (sqrt(v) /
  sqrt(1 - beta2^t) + eps)``, encode with ``quantize_blockwise`` (the codec lowmem's CPU path matches bit
  for bit). Temporaries: whole-slice float32 copies, :data:`CPU_BYTES_PER_VALUE` bytes per value of the
  slice it is given (:func:`fused_cpu_transient_bytes`); lowmem hands it slices of whole blocks of at
  most the engine's chunk.
* CUDA (``kOptimizerStatic8bit2StateBlockwise``): the same update in registers, no global temporaries
  (0 transient bytes), with three documented differences: ``eps`` enters as ``m / (sqrt(v) + eps
  sqrt(1 - beta2^t)) * (-lr sqrt(1 - beta2^t) / (1 - beta1^t))`` (equal in exact arithmetic), the bias
  corrections in float32, and the decay ``p *= 1 - lr wd`` *after* the update (a difference of
  ``lr^2 wd |u|`` per step); its encoding is ``quantize_2D`` with a sign fix for ``m`` (a code can differ by
  one from ``quantize_blockwise``'s). Not run in a session without a GPU: tests/test_bnb_fused.py's CUDA
  test and ``lowmem/bench_gpu.py`` check it when one is lent.

Lion (``lion8bit``, Chen et al. 2023 Algorithm 2; :func:`fused_lion8bit_step_`): one moment, ``m``'s
signed-map codes and absmax as ``state1`` (``optimizer_update_8bit_blockwise("lion", ...)``, ``beta1``
then ``beta2`` as ``bnb.optim.Lion8bit`` passes them; no second state, ``eps`` unused):

* CPU: decode ``m``; ``p *= 1 - lr wd`` (for ``wd > 0``) *before* the update, as the engine;
  ``p -= lr sign(beta1 m + (1 - beta1) g)`` (bitsandbytes computes ``m beta1 + g (1 - beta1)`` with two
  ``mul`` and one ``add``, the engine ``mul`` then ``add(alpha=...)``: an exact tie at zero or a rounding of
  the sum may differ, in practice equal); ``m = beta2 m + (1 - beta2) g`` (the engine's very operations),
  encoded by ``quantize_blockwise``: bit for bit the engine's chunked ``lion8bit`` step
  (tests/test_fusedlion_cpu.py). Temporaries: the decoded ``m``, ``g * gnorm_scale``, and
  ``m beta1``, ``g (1 - beta1)`` and their sum alive at once: 20 B per value, 24 with a non-float32
  parameter's float32 copy (:func:`fused_cpu_transient_bytes`, the same count as Adam's, traced).
* CUDA (``kOptimizerStatic8bit1StateBlockwise``, ``LION``; read in a SYCL port of bitsandbytes' kernels, not
  in csrc itself): in registers, no temporaries; decay ``p *= 1 - lr wd`` before the update, as the CPU; the
  differences are the kernel's float arithmetic
  (``s1 beta1 + (1 - beta1) g`` may be contracted to an FMA: a sign can differ where the sum is within a
  rounding of zero), a bfloat16 / float16 parameter rounded after the decay and again after the update
  (the CPU and the engine round once), and the encoding (``quantize_2D``-style code search: a code can
  differ by one). Not run here: tests/test_fusedlion_cpu.py's CUDA test checks it when a GPU is lent.

Lion with a float32 momentum (``lion``; :func:`fused_lion32bit_step_`): ``optimizer_update_32bit("lion", ...)``
on ``state["exp_avg"]`` itself (``state1``; ``beta1`` then ``beta2``, as ``bnb.optim.Lion``), element-wise: no
blocks, any slice. The CPU implementation is the same three operations as the engine's (decay first,
``sign(m beta1 + g (1 - beta1))``, ``m beta2 + g (1 - beta2)``): bit for bit. Temporaries per value:
``g * gnorm_scale``, ``m beta1`` and the sum (12 B), 16 with a non-float32 parameter's float32 copy
(:func:`fused_lion32_cpu_transient_bytes`, traced). CUDA (``kOptimizer32bit1State``, ``LION``): in
registers, no temporaries; its source was not at hand in this session (its decay order and float arithmetic
are what tests/test_fusedlion_fp32.py's CUDA test bounds: within 1e-2 of the update). The momentum must be
float32 (``state_dtype="float32"``: the kernel's state is ``float*``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from .hparams import HParam

BNB_BLOCK_SIZE = 256  # bitsandbytes 0.50: BLOCKSIZE_2STATE (csrc/ops.cu), blocksize = 256 (backends/cpu/ops.py)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # cadam_8bit_blockwise_grad_{fp32,fp16,bf16}
MAX_NUMEL = 2**31 - 1  # the kernel's element count is a c_int32
# bitsandbytes' CPU op on n values: Adam's decoded m and v, g * gnorm_scale, and sqrt(v) with sqrt(v) / c2 alive
# at once (20 B); Lion's decoded m, g * gnorm_scale, m * beta1, g * (1 - beta1) and their sum (20 B); a
# non-float32 parameter adds its float32 copy (4 B).
CPU_BYTES_PER_VALUE = 20
CPU_BYTES_PER_VALUE_LOW_PRECISION = 24
# optimizer_update_32bit("lion") on the CPU: g * gnorm_scale, m * beta1 and the sum alive at once (12 B; then the
# sign beside the sum and g * gnorm_scale, 12 B); a non-float32 parameter adds its float32 copy (4 B).
CPU_LION32_BYTES_PER_VALUE = 12
CPU_LION32_BYTES_PER_VALUE_LOW_PRECISION = 16


def _fused_value(x: Any) -> bool:
    return x is None or isinstance(x, bool)


FUSED = HParam(
    "fused", None, _fused_value, "None, True or False",
    "bitsandbytes' fused 8-bit step (Adam, Lion): None where it applies (CUDA), True required (CPU: its CPU"
    " implementation), False never",
)


@lru_cache(maxsize=None)
def code_maps(device: str) -> tuple[Tensor, Tensor]:
    """bitsandbytes' signed and unsigned dynamic maps (``m``'s and ``v``'s) on ``device``, kept (no copy
    to the device at every step)."""
    from .functional import quant as Q

    return Q.code_map("dynamic8_signed", device), Q.code_map("dynamic8_unsigned", device)


def fused_cpu_transient_bytes(numel: int, param_dtype: torch.dtype = torch.float32) -> int:
    """Bytes bitsandbytes' CPU implementation allocates for a slice of ``numel`` values, Adam's or Lion's
    (the same count, see the module docstring); the CUDA kernel allocates none."""
    return (CPU_BYTES_PER_VALUE if param_dtype == torch.float32 else CPU_BYTES_PER_VALUE_LOW_PRECISION) * numel


def ineligible_reason(p: Tensor, g: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> str | None:
    """Why the fused 8-bit step cannot run on ``p`` (``None``: it can). ``state`` must hold the moments as
    8-bit blockwise codes (the caller's check: members below ``min_quant_size`` keep float32 moments
    and take the plain step)."""
    if group["block_size"] != BNB_BLOCK_SIZE:
        return f"block_size={group['block_size']} (bitsandbytes' kernel uses blocks of {BNB_BLOCK_SIZE})"
    return _tensor_reason(p, g, group)


def ineligible_reason_32bit(p: Tensor, g: Tensor, m: Tensor, group: dict[str, Any]) -> str | None:
    """Why ``optimizer_update_32bit`` cannot step ``p`` and its float32 momentum ``m`` (``None``: it can)."""
    from .sharded import is_dtensor

    if is_dtensor(p) or is_dtensor(m):
        return "the parameter is an FSDP2 shard (a DTensor; the kernel takes plain tensors)"
    if m.dtype != torch.float32:
        return f"the momentum's dtype {m.dtype} (the kernel keeps a float32 state: state_dtype='float32')"
    if not m.is_contiguous():
        return "the momentum is not contiguous"
    return _tensor_reason(p, g, group)


def _tensor_reason(p: Tensor, g: Tensor, group: dict[str, Any]) -> str | None:
    if p.device.type not in ("cuda", "cpu"):
        return f"the parameter is on {p.device.type} (bitsandbytes' kernel: cuda, or its cpu implementation)"
    if p.dtype not in KERNEL_DTYPES:
        return f"the parameter's dtype {p.dtype} (the kernel takes float32, bfloat16, float16)"
    if g.dtype != p.dtype:
        return f"the gradient's dtype {g.dtype} differs from the parameter's {p.dtype}"
    if not (p.is_contiguous() and g.is_contiguous()):
        return "the parameter or its gradient is not contiguous"
    if p.numel() > MAX_NUMEL:
        return f"{p.numel()} elements (the kernel counts them in an int32)"
    if p.dtype == torch.bfloat16 and (group.get("bf16_stochastic_round") or group.get("kahan_summation")):
        return ("bf16_stochastic_round or kahan_summation on a bfloat16 parameter (the kernel writes the weight"
                " rounded to nearest; the plain step applies the option)")
    if group.get("weight_decay", 0.0) < 0:
        return f"weight_decay={group['weight_decay']} < 0 (the kernel decays only for weight_decay > 0)"
    return None


def use_fused(p: Tensor, g: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> bool:
    """Whether ``group["fused"]`` sends ``p`` (8-bit moments) to the kernel: ``False`` never; ``None`` on
    CUDA where :func:`ineligible_reason` finds nothing; ``True`` always, or a ``ValueError`` naming the
    field and the condition that fails (no silent fallback)."""
    return _decide(group, p, lambda: ineligible_reason(p, g, state, group))


def use_fused_32bit(p: Tensor, g: Tensor, m: Tensor, group: dict[str, Any]) -> bool:
    """:func:`use_fused` for ``optimizer_update_32bit`` (:func:`ineligible_reason_32bit`)."""
    return _decide(group, p, lambda: ineligible_reason_32bit(p, g, m, group))


def _decide(group: dict[str, Any], p: Tensor, reason_of) -> bool:
    fused = group.get("fused")
    if fused is False or (fused is None and p.device.type != "cuda"):
        return False
    reason = reason_of()
    if reason is None:
        return True
    if fused is True:
        raise ValueError(f"fused=True: bitsandbytes' fused 8-bit step does not apply: {reason}")
    return False


def fused_adam8bit_step_(p: Tensor, g: Tensor, state: dict[str, Tensor], group: dict[str, Any], t: float,
                         lr: float | Tensor, codes: tuple[Tensor, Tensor], chunk: int | None = None) -> None:
    """One AdamW step of ``p`` (any shape, contiguous) and its 8-bit moments by
    ``bitsandbytes.functional.optimizer_update_8bit_blockwise("adam", ...)``, in place.

    ``codes``: the float32 code maps of ``m`` (signed dynamic) and ``v`` (unsigned dynamic) on ``p``'s
    device. ``chunk``: on CPU, the largest slice handed to bitsandbytes at once (rounded down to whole
    blocks, at least one; ``None``: the whole tensor), which bounds its float32 temporaries; CUDA takes
    the whole tensor in one launch."""
    import bitsandbytes.functional as bnbF

    beta1, beta2 = group["betas"]
    n = p.numel()
    pflat, gflat = p.view(-1), g.view(-1)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    am, av = state["exp_avg_absmax"], state["exp_avg_sq_absmax"]
    lr_f, wd = float(lr), float(group.get("weight_decay", 0.0))
    for start, stop, blocks in _slices(n, chunk, p.device):
        bnbF.optimizer_update_8bit_blockwise(
            "adam", gflat[start:stop], pflat[start:stop], m[start:stop], v[start:stop], float(beta1), float(beta2),
            0.0, 0.0, float(group["eps"]), int(t), lr_f, codes[0], codes[1], am[blocks], av[blocks], wd,
            gnorm_scale=1.0)


def _slices(n: int, chunk: int | None, device: torch.device):
    """``(start, stop, blocks)`` of the slices handed to bitsandbytes: the whole tensor on CUDA or for
    ``chunk=None``, else ``chunk`` rounded down to whole blocks (at least one); ``blocks`` their absmax."""
    b = BNB_BLOCK_SIZE
    size = n if chunk is None or device.type == "cuda" else max(b, chunk // b * b)
    for start in range(0, n, size):
        stop = min(start + size, n)
        yield start, stop, slice(start // b, -(-stop // b))


def fused_lion8bit_step_(p: Tensor, g: Tensor, state: dict[str, Tensor], group: dict[str, Any], t: float,
                         lr: float | Tensor, code: Tensor, chunk: int | None = None) -> None:
    """One Lion step (Chen et al. 2023, Algorithm 2: decay, ``p -= lr sign(beta1 m + (1 - beta1) g)``,
    ``m = beta2 m + (1 - beta2) g``) of ``p`` (any shape, contiguous) and its 8-bit momentum by
    ``bitsandbytes.functional.optimizer_update_8bit_blockwise("lion", ...)``, in place: ``state["exp_avg"]``
    (codes of the signed dynamic map ``code``) and ``state["exp_avg_absmax"]`` are its ``state1`` and
    ``absmax1``. ``chunk``: as :func:`fused_adam8bit_step_`."""
    import bitsandbytes.functional as bnbF

    beta1, beta2 = group["betas"]
    pflat, gflat = p.view(-1), g.view(-1)
    m, am = state["exp_avg"], state["exp_avg_absmax"]
    lr_f, wd = float(lr), float(group.get("weight_decay", 0.0))
    for start, stop, blocks in _slices(p.numel(), chunk, p.device):
        bnbF.optimizer_update_8bit_blockwise(
            "lion", gflat[start:stop], pflat[start:stop], m[start:stop], None, float(beta1), float(beta2),
            0.0, 0.0, 0.0, int(t), lr_f, code, None, am[blocks], None, wd, gnorm_scale=1.0)


def fused_lion32_cpu_transient_bytes(numel: int, param_dtype: torch.dtype = torch.float32) -> int:
    """Bytes ``optimizer_update_32bit("lion")``'s CPU implementation allocates for ``numel`` values (see the
    module docstring); the CUDA kernel allocates none."""
    low = param_dtype != torch.float32
    return (CPU_LION32_BYTES_PER_VALUE_LOW_PRECISION if low else CPU_LION32_BYTES_PER_VALUE) * numel


def fused_lion32bit_step_(p: Tensor, g: Tensor, m: Tensor, group: dict[str, Any], t: float, lr: float | Tensor,
                          chunk: int | None = None) -> None:
    """One Lion step (Chen et al. 2023, Algorithm 2) of ``p`` (any shape, contiguous) and its float32
    momentum ``m`` by ``bitsandbytes.functional.optimizer_update_32bit("lion", ...)``, in place. ``chunk``:
    on CPU the largest slice handed to it at once (element-wise: any size; ``None``: the whole tensor),
    which bounds its temporaries; CUDA takes the whole tensor in one launch."""
    import bitsandbytes.functional as bnbF

    beta1, beta2 = group["betas"]
    n = p.numel()
    pflat, gflat, mflat = p.view(-1), g.view(-1), m.view(-1)
    size = n if chunk is None or p.device.type == "cuda" else max(1, chunk)
    lr_f, wd = float(lr), float(group.get("weight_decay", 0.0))
    for start in range(0, n, size):
        stop = min(start + size, n)
        bnbF.optimizer_update_32bit("lion", gflat[start:stop], pflat[start:stop], mflat[start:stop], float(beta1),
                                    0.0, int(t), lr_f, None, float(beta2), 0.0, 0.0, wd, 1.0)
