"""Quantized storage of optimizer moments: 8-bit (Dettmers et al. 2022) and 4-bit (Li et al. 2023).

:class:`Quantized` wraps any :class:`~lowmem.optim.moments.MomentRule` (Adam's moments, or the
moments a subspace recipe keeps for its projected gradient) and stores the tensors it names in
low-bit form. Each step it decodes them to float32, lets the wrapped rule update them exactly as it
would in full precision, and encodes them again (Dettmers et al. 2022, Section 2: "dequantize,
update, quantize"). In ``state[p]`` a quantized moment ``k`` is two plain tensors:

* ``k``: the codes, ``uint8`` (``n`` bytes at 8 bits, ``ceil(n / 2)`` at 4 bits, flat);
* ``k + "_absmax"``: the per-block absolute maxima, ``float32`` (``ceil(n / block_size)`` values).

So checkpoints stay tensors only, ``load_state_dict`` keeps the dtypes, and ``state_bytes()``
counts the compressed bytes. Tensors with fewer than ``min_quant_size`` elements stay float32
(bitsandbytes' ``min_8bit_size`` rule: tiny tensors gain nothing and lose the most precision).

Group keys read: ``block_size``, ``min_quant_size`` (see :data:`QUANT_HPARAMS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .functional import quant as Q
from .hparams import HParam, one_of, positive_int
from .moments import MomentRule


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


def quant_hparams(block_size: int) -> tuple[HParam, ...]:
    """The two hyperparameters every quantized-state recipe carries."""
    return (block_size_hparam(block_size), MIN_QUANT_SIZE)


# ---- storage helpers ------------------------------------------------------------------------


def is_quantized(state: dict[str, Tensor], key: str) -> bool:
    return key + "_absmax" in state


def alloc_quantized(state: dict[str, Tensor], key: str, numel: int, spec: QuantSpec, block_size: int, device) -> None:
    """Zero codes and zero scales (decoding gives exact zeros, whatever the map)."""
    state[key] = torch.zeros(Q.packed_numel(numel, spec.bits), dtype=torch.uint8, device=device)
    state[key + "_absmax"] = torch.zeros(Q.num_blocks(numel, block_size), dtype=torch.float32, device=device)


def decode(state: dict[str, Tensor], key: str, spec: QuantSpec, block_size: int, shape: torch.Size) -> Tensor:
    """The float32 value of quantized moment ``key``, in ``shape``."""
    codes, absmax = state[key], state[key + "_absmax"]
    code = Q.code_map(spec.code, codes.device)
    n = shape.numel()
    if spec.bits == 8:
        flat = Q.dequantize_blockwise_8bit(codes, absmax, code, block_size)
    else:
        flat = Q.dequantize_blockwise_4bit(codes, absmax, code, block_size, n)
    return flat.view(shape)


def encode_(state: dict[str, Tensor], key: str, value: Tensor, spec: QuantSpec, block_size: int) -> None:
    """Quantize ``value`` into the existing code and scale tensors of ``key`` (in place)."""
    code = Q.code_map(spec.code, value.device)
    if spec.bits == 8:
        codes, absmax = Q.quantize_blockwise_8bit(value, code, block_size)
    else:
        codes, absmax = Q.quantize_blockwise_4bit(value, code, block_size)
    state[key].copy_(codes)
    state[key + "_absmax"].copy_(absmax)


# ---- the moment-rule wrapper ----------------------------------------------------------------


class Quantized(MomentRule):
    """Store some of a moment rule's tensors quantized; the math is the wrapped rule's, in float32.

    Args:
        inner: The moment rule whose tensors are stored compressed (e.g. ``AdamMoments()``).
        specs: State key -> :class:`QuantSpec`; keys not listed keep the inner rule's storage.
            Listed tensors must have the (projected) gradient's shape, as Adam's moments do.

    The wrapped rule allocates its tensors first (on the meta device, so nothing is spent);
    listed tensors with at least ``group["min_quant_size"]`` elements are then allocated as codes
    and scales on the parameter's device. :meth:`reset` zeroes codes and scales, which decodes to
    exact zeros. :meth:`second_moment` decodes Adam's ``exp_avg_sq`` for SPAM's spike clipping.
    """

    def __init__(self, inner: MomentRule, specs: dict[str, QuantSpec]):
        unknown = set(specs) - set(inner.state_keys)
        if unknown:
            raise ValueError(f"keys {sorted(unknown)} are not state keys of {type(inner).__name__}: {inner.state_keys}")
        self.inner = inner
        self.specs = dict(specs)
        self.applies_lr = inner.applies_lr
        self.state_keys = tuple(inner.state_keys) + tuple(k + "_absmax" for k in specs)

    def __repr__(self) -> str:
        bits = sorted({s.bits for s in self.specs.values()})
        return f"Quantized({type(self.inner).__name__}, bits={bits})"

    def init_state(self, state, shape, group, param):
        probe: dict[str, Tensor] = {}
        meta_param = torch.empty(0, dtype=param.dtype, device="meta")
        self.inner.init_state(probe, shape, group, meta_param)
        for key, t in probe.items():
            spec = self.specs.get(key)
            if spec is not None and t.numel() >= group["min_quant_size"]:
                alloc_quantized(state, key, t.numel(), spec, group["block_size"], param.device)
            else:
                state[key] = torch.zeros(t.shape, dtype=t.dtype, device=param.device)

    def direction(self, g, state, group, t, lr):
        block = group["block_size"]
        view = dict(state)
        quantized = [k for k in self.specs if is_quantized(state, k)]
        for k in quantized:
            view[k] = decode(state, k, self.specs[k], block, g.shape)
        d = self.inner.direction(g, view, group, t, lr)
        for k in quantized:
            encode_(state, k, view[k], self.specs[k], block)
        return d

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
