"""The CPU 8-bit quantizer in torch operations (functional.quant.quantize_blockwise_8bit_table) against
bitsandbytes' own ``quantize_blockwise`` (the reference: the storage format of every 8-bit checkpoint):
the same codes and absmax, bit for bit, on random values at many scales, exact code values, the
midpoints between codes and the boundaries of bitsandbytes' 65536 points with their neighbouring
floats, zero blocks, subnormal and infinite magnitudes, every block size and ragged last blocks."""

import math

import pytest
import torch

from lowmem.optim.functional import quant as Q

MAPS = ("dynamic8_signed", "dynamic8_unsigned")


def _bnb(x: torch.Tensor, name: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    import bitsandbytes.functional as bnbF

    codes, qstate = bnbF.quantize_blockwise(x.reshape(-1).float().contiguous(), code=Q.code_map(name), blocksize=block_size)
    return codes, qstate.absmax


def _assert_same(x: torch.Tensor, name: str, block_size: int) -> None:
    ref_codes, ref_absmax = _bnb(x, name, block_size)
    codes, absmax = Q.quantize_blockwise_8bit(x, Q.code_map(name), block_size, name)
    assert codes.dtype == torch.uint8 and absmax.dtype == torch.float32
    diff = (codes != ref_codes).nonzero().flatten()
    assert diff.numel() == 0, (name, block_size, diff.numel(), x.reshape(-1)[diff[:5]].tolist(),
                               codes[diff[:5]].tolist(), ref_codes[diff[:5]].tolist())
    assert torch.equal(absmax, ref_absmax), (name, block_size)


def _neighbours(v: torch.Tensor, k: int = 2) -> torch.Tensor:
    """``v`` and its ``k`` float32 neighbours on each side."""
    out, lo, hi = [v], v, v
    for _ in range(k):
        lo, hi = torch.nextafter(lo, torch.tensor(-math.inf)), torch.nextafter(hi, torch.tensor(math.inf))
        out += [lo, hi]
    return torch.cat(out)


def _with_unit_absmax(values: torch.Tensor, block_size: int, signed: bool) -> torch.Tensor:
    """``values`` (in [-1, 1]) laid out in blocks whose first value is 1 (absmax 1: normalized = value),
    times powers of two (the normalization stays exact: the same normalized values at every scale)."""
    values = values.clamp(-1.0, 1.0) if signed else values.abs().clamp(max=1.0)
    per = block_size - 1
    pad = (-values.numel()) % per
    body = torch.cat([values, values.new_zeros(pad)]).view(-1, per)
    blocks = torch.cat([torch.ones(body.shape[0], 1), body], dim=1)
    scales = 2.0 ** torch.tensor([-100.0, -3.0, 0.0, 5.0, 60.0]).repeat(-(-blocks.shape[0] // 5))[: blocks.shape[0]]
    return (blocks * scales.unsqueeze(1)).reshape(-1)


def test_point_index_rounding_is_exact_for_every_float32():
    """table_rows_'s ``0.5 + 32767.5 u`` (torch's rounding, fused or not) truncates, for every float32
    ``u = y + 1`` in [0, 2] (multiples of 2^-24 below 1, of 2^-23 above), to the integer of bitsandbytes'
    one fused rounding ``fma(u * 0.5, 65535, 0.5)`` (exact in float64, then rounded once to float32)."""
    ks = [(k, 2.0**-24) for k in range(0, 1 << 24, 1 << 22)] + [(k, 2.0**-23) for k in range(1 << 23, 1 << 24, 1 << 22)]
    seen = 0
    for start, unit in ks + [(1 << 24, 2.0**-23)]:  # (the last: u = 2)
        u64 = torch.arange(start, start + (1 if start == 1 << 24 else 1 << 22), dtype=torch.float64) * unit
        fused = (u64 * 0.5 * 65535.0 + 0.5).float().to(torch.int32)  # the product and sum exact in float64
        y = u64.float() - 1.0
        assert torch.equal((y + 1.0).double(), u64)  # y + 1 gives u back
        got = Q.table_rows_(y).to(torch.int32)
        assert torch.equal(got, fused), (start, (got != fused).sum().item())
        seen += u64.numel()
    assert seen == (1 << 24) + (1 << 23) + 1
    assert got[-1].item() == Q.TABLE_POINTS - 1


def test_point_table_shape():
    """65536 codes, non-decreasing from the lowest code to the highest. No point lies on a midpoint between
    two codes of these maps, so the table's tie rule (the lower code) is never exercised (a table built
    with the upper code is the same table)."""
    for name in MAPS:
        table = Q._point_table(name)
        assert table.shape == (Q.TABLE_POINTS,) and table.dtype == torch.uint8
        assert torch.all(table[1:] >= table[:-1]) and table[0].item() == 0 and table[-1].item() == 255
        code = Q.code_map(name)
        points = torch.arange(Q.TABLE_POINTS, dtype=torch.float32).mul_(2.0).div_(Q.TABLE_POINTS - 1).sub_(1.0)
        assert not torch.isin(points, (code[:-1] + code[1:]) * 0.5).any()


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("block_size", Q.VALID_BLOCK_SIZES)
def test_random_values_at_many_scales_match_bitsandbytes(name, block_size):
    gen = torch.Generator().manual_seed(block_size)
    for n in (1, 37, block_size, block_size + 1, 3 * block_size - 5, Q.TABLE_PIECE + 2 * block_size + 7):
        for scale in (1e-41, 1e-38, 1e-30, 1e-6, 1.0, 1e6, 1e30, 3e38):
            x = torch.randn(n, generator=gen) * scale  # 3e38: some values overflow to +-inf
            if name == "dynamic8_unsigned":
                x = x.abs()
            if n > 3 * block_size:
                x[block_size : 2 * block_size] = 0.0  # a zero block
            _assert_same(x, name, block_size)


@pytest.mark.parametrize("name", MAPS)
def test_code_values_midpoints_and_point_boundaries_match_bitsandbytes(name):
    """Normalized values on the decision points, each with its two float32 neighbours on both sides:
    the code values, the midpoints between codes, and every boundary between two of bitsandbytes'
    65536 points (``j - 0.5 = 32767.5 (y + 1)``)."""
    code = Q.code_map(name)
    mids = (code[:-1] + code[1:]) * 0.5
    j = torch.arange(1, Q.TABLE_POINTS, dtype=torch.float64)
    boundaries = ((j - 0.5) / 32767.5 - 1.0).float()
    values = _neighbours(torch.cat([code, mids, boundaries, torch.tensor([-1.0, 0.0, 1.0])]))
    for block_size in (64, 256, 4096):
        _assert_same(_with_unit_absmax(values, block_size, name == "dynamic8_signed"), name, block_size)


def test_special_blocks_match_bitsandbytes():
    """Zero blocks, a lone subnormal, infinities, +-0 and a ragged last block of zeros."""
    for name in MAPS:
        sign = -1.0 if name == "dynamic8_signed" else 1.0
        x = torch.zeros(6 * 64 + 10)
        x[64] = 1e-45  # the smallest subnormal: 1 / N_b overflows
        x[65] = -0.0
        x[128], x[129], x[130] = math.inf, sign * math.inf, 2.0
        x[192:256] = torch.linspace(-1e-40, 1e-40, 64) * (1 if name == "dynamic8_signed" else 0) + 1e-40
        x[256], x[257] = sign * 3.4e38, 1.0
        _assert_same(x, name, 64)


def test_split_and_single_calls_take_the_table_and_match_bitsandbytes(monkeypatch):
    """quantize_blockwise_split (the multi-tensor step) passes the map's name: CPU tensors take the
    table; without a name (or on another device) bitsandbytes is called."""
    calls = []
    orig = Q.quantize_blockwise_8bit_table
    monkeypatch.setattr(Q, "quantize_blockwise_8bit_table", lambda *a: calls.append(a[1]) or orig(*a))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3 * 256 + 512, generator=gen)
    codes, absmax = Q.quantize_blockwise_split(x, Q.code_map("dynamic8_signed"), 256, 8, [768, 512], "dynamic8_signed")
    ref_codes, ref_absmax = _bnb(x, "dynamic8_signed", 256)
    assert calls == ["dynamic8_signed"]
    assert torch.equal(torch.cat(codes), ref_codes) and torch.equal(torch.cat(absmax), ref_absmax)
    Q.quantize_blockwise_8bit(x, Q.code_map("dynamic8_signed"), 256)
    assert calls == ["dynamic8_signed"]


def test_quantizer_workspace_is_bounded_by_the_piece():
    """The workspace of a call (Quantized.transient_bytes counts it with codec_bytes) is one pass of at most
    TABLE_PIECE values, whatever the tensor's size."""
    from lowmem.optim.quantized import codec_bytes

    big = 4 * Q.TABLE_PIECE + 3
    assert Q.table_workspace_bytes(big) == Q.TABLE_PIECE_BYTES * Q.TABLE_PIECE
    assert codec_bytes(big, False, False) == 2 * big + Q.TABLE_PIECE_BYTES * Q.TABLE_PIECE
    assert Q.table_workspace_bytes(1000) >= Q.TABLE_PIECE_BYTES * 1024  # a padded block of 1024 values
    assert Q.table_workspace_bytes(0) == 0
