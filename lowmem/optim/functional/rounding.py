"""Stochastic rounding of a float32 result into a bfloat16 tensor.

Zamirai, Zhang, Aberger, De Sa 2020, "Revisiting BFloat16 Training" (arXiv:2010.06192): pure-bfloat16 training stores the weights in bfloat16 only, and round-to-nearest drops any update
smaller than half a unit in the last place of the weight (``|w| * 2^-9``); stochastic rounding

    ``Q(x) = floor_bf16(x) + ulp(x)`` with probability ``(x - floor_bf16(x)) / ulp(x)``, else ``floor_bf16(x)``

(rounding toward zero and away from it, in magnitude) is unbiased, ``E[Q(x)] = x``, so small updates survive
on average. The standard bit trick: a bfloat16 value is the upper 16 bits of a float32 bit pattern, so
adding 16 uniform random bits to the pattern (as an integer) and truncating the low 16 rounds up exactly
when the random bits exceed ``2^16`` minus the discarded ones: with probability ``discarded / 2^16``, the
position of ``x`` between its two neighbours (the patterns of finite floats of one sign are ordered as their
magnitudes, so a carry out of the low half is the next bfloat16 value, across a binade too; subnormals
alike). A representable ``x`` (low bits zero) never changes; an infinity's low bits are zero, so it stays;
a NaN is kept a NaN (a carry could otherwise turn its pattern into an infinity or a zero).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def random_int16(n: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
    """``n`` uniform random int16 values (16 random bits each, in ``[-2^15, 2^15)``): the int16 view of
    ``ceil(n / 4)`` uniform int64 draws (one 64-bit draw gives four of them; on the CPU, 3x faster than
    ``n`` int16 draws), ``8 * ceil(n / 4)`` bytes. (The int64 range is ``[-2^63, 2^63 - 1)``: the one
    excluded pattern, all ones, is a 2^-64 bias.)"""
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device, generator=generator)
    return words.view(torch.int16)[:n]


def random_int16_bytes(n: int) -> int:
    """What :func:`random_int16` allocates."""
    return 8 * ((n + 3) // 4)


#: ``0xFFFF0000`` as an int32: keeps a float32 pattern's upper 16 bits (the bfloat16 value)
_UPPER = -65536


def stochastic_round_to_bf16_(dst: Tensor, src: Tensor, generator: torch.Generator | None = None, *,
                              overwrite_src: bool = False) -> Tensor:
    """``dst <- Q(src)``: ``src`` (float32) stochastically rounded to bfloat16 (Zamirai et al. 2020; ``Q`` in
    the module docstring), written into ``dst`` (bfloat16, ``src``'s shape). Returns ``dst``.

    The random bits are 16 per element from ``generator`` (``None``: torch's default one of ``src``'s
    device; :func:`random_int16`). ``overwrite_src=False`` leaves ``src`` unchanged: a 1-byte NaN mask, the
    2-byte random bits and a 4-byte int32 work tensor per element (:func:`stochastic_round_bytes`);
    ``overwrite_src=True`` works in ``src``'s own memory (it is left holding the rounded values: ``src`` must
    be a temporary of the caller, with no overlapping elements), the mask and the random bits only, 3 bytes per element: the
    engine's write-back of a step's float32 copy of the parameter. Both draw the same bits and give the same
    ``dst``.
    """
    if src.dtype != torch.float32 or dst.dtype != torch.bfloat16:
        raise ValueError(f"stochastic_round_to_bf16_: rounds a float32 src into a bfloat16 dst; got src {src.dtype},"
                         f" dst {dst.dtype}")
    if src.shape != dst.shape:
        raise ValueError(f"stochastic_round_to_bf16_: src {tuple(src.shape)} and dst {tuple(dst.shape)} differ in shape")
    nan = src.isnan()
    noise = random_int16(src.numel(), src.device, generator).view(src.shape)
    if overwrite_src:
        bits = src.view(torch.int32).add_(noise)
        out = src
    else:
        bits = torch.add(src.view(torch.int32), noise)
        out = bits.view(torch.float32)
    del noise
    # noise + 2^15 is uniform on [0, 2^16): the carry out of the low half rounds up
    bits.add_(32768).bitwise_and_(_UPPER)
    out.masked_fill_(nan, float("nan"))
    return dst.copy_(out)  # (exact: out's low 16 bits are zero)


def stochastic_round_bytes(n: int, overwrite_src: bool = True) -> int:
    """The peak of what :func:`stochastic_round_to_bf16_` allocates for ``n`` elements: the NaN mask (1 byte
    each) beside the random bits (:func:`random_int16_bytes`), and beside the int32 work tensor (4 bytes each)
    when ``src`` is kept."""
    return n + random_int16_bytes(n) + (0 if overwrite_src else 4 * n)


def padded_numel(numels: list[int]) -> int:
    """The elements of a bucket's flat float32 buffer for :func:`stochastic_round_bucket_to_bf16_`: each member
    ``k`` elements padded to a multiple of 4 (its :func:`random_int16` bits, ``ceil(k / 4)`` int64 words, then
    lie over its own elements in one int64 buffer), members one after another."""
    return 4 * sum((int(k) + 3) // 4 for k in numels)


def stochastic_round_bucket_to_bf16_(dsts: list[Tensor], srcs: list[Tensor],
                                     generators: Iterable[torch.Generator | None]) -> None:
    """:func:`stochastic_round_to_bf16_` (``overwrite_src=True``) of each pair of ``dsts`` and ``srcs``, bit for
    bit, in a few launches (issue 15): ``srcs`` are the views of one flat float32 buffer laid out by
    :func:`padded_numel` (``functional.adam.float32_copies(xs, padded=True)``; overwritten). Each member draws its
    :func:`random_int16` words from its own generator (taken from ``generators`` one at a time, right before its
    draw: the engine's generators are seeded again per parameter) into its own slice of one int64 buffer (the
    same number of words from the same stream: the bits of a fresh tensor), then the NaN mask, the two adds, the
    ``and`` and the NaN fill run once on the flat buffers and one multi-tensor copy writes ``dsts``: one kernel
    per member and 6, where :func:`stochastic_round_to_bf16_` is 7 per member. Allocates
    :func:`stochastic_round_bucket_bytes`."""
    if not srcs:
        return
    flat = srcs[0]._base
    if (flat is None or flat.dim() != 1 or flat.dtype != torch.float32 or len(dsts) != len(srcs)
            or flat.numel() != padded_numel([x.numel() for x in srcs])):
        raise ValueError("stochastic_round_bucket_to_bf16_: srcs must be the views of one flat float32 buffer laid "
                         "out by padded_numel (float32_copies(xs, padded=True)), one per dst")
    noise = torch.empty(flat.numel() // 4, dtype=torch.int64, device=flat.device)
    o = 0
    for x, d, g in zip(srcs, dsts, generators):
        if (x._base is not flat or x.storage_offset() != flat.storage_offset() + 4 * o or not x.is_contiguous()
                or d.dtype != torch.bfloat16 or d.shape != x.shape):
            raise ValueError("stochastic_round_bucket_to_bf16_: srcs must be the views of one flat float32 buffer "
                             "laid out by padded_numel, in order, each rounded into a bfloat16 dst of its shape")
        w = (x.numel() + 3) // 4
        torch.randint(-(2**63), 2**63 - 1, (w,), dtype=torch.int64, device=flat.device, generator=g,
                      out=noise[o : o + w])  # (random_int16's draw, into the member's own words)
        o += w
    nan = flat.isnan()
    bits = flat.view(torch.int32).add_(noise.view(torch.int16))
    del noise
    bits.add_(32768).bitwise_and_(_UPPER)  # (stochastic_round_to_bf16_'s operations, on every member at once)
    flat.masked_fill_(nan, float("nan"))
    del nan
    torch._foreach_copy_(dsts, srcs)  # (exact: the low 16 bits are zero)


def stochastic_round_bucket_bytes(numels: list[int]) -> int:
    """What :func:`stochastic_round_bucket_to_bf16_` allocates for members of ``numels`` elements: the NaN mask
    (1 byte) beside the random bits (2 bytes) of every element of the padded flat buffer (:func:`padded_numel`),
    all members' together."""
    return 3 * padded_numel(numels)


def kahan_store_(dst: Tensor, src: Tensor, comp: Tensor) -> None:
    """``dst <- round(src + comp)``, ``comp <- (src + comp) - dst``: the new weight ``src`` (float32, the step's
    result from the old ``dst``; a temporary: overwritten) written into bfloat16 ``dst`` with Kahan's compensated
    summation (Kahan 1965; for bfloat16 weight updates: Zamirai et al. 2020, beside stochastic rounding; the ``optimi``
    package's ``kahan_sum``): ``comp`` (bfloat16, ``dst``'s shape) carries what rounding to nearest dropped, so an
    update below half an ulp accumulates there until it moves the weight. Allocates nothing."""
    src.add_(comp)
    dst.copy_(src)
    comp.copy_(src.sub_(dst))


_MASK64 = (1 << 64) - 1


def stream_seed(index: int, t: float, epoch: int = 0) -> int:
    """The seed of the random bits that round parameter ``index`` (its position in the optimizer's parameter
    groups) at its step ``t``: SplitMix64's finalizer (Steele, Lea, Flood 2014) of the pair, so neighbouring
    parameters and steps get unrelated streams, and a run resumed from a checkpoint draws the bits the
    uninterrupted run drew (nothing but the parameter's step count is needed). ``epoch``: a count that tells
    apart the runs of a step count that starts again (BAdam's block periods: a re-activated block counts from
    ``t = 1`` again); ``0`` adds nothing. In ``[0, 2^63)``."""
    z = (int(index) * 0x9E3779B97F4A7C15 + int(t) * 0xD1B54A32D192ED03 + int(epoch) * 0x8CB92BA72F3D8DD7
         + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1
