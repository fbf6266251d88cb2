"""Issue 15 (SRBATCH): the bf16 bucket's stochastic rounding in a few launches,
:func:`~lowmem.optim.functional.rounding.stochastic_round_bucket_to_bf16_`: each member's bits drawn from its own
generator into its slice of one buffer, the rest once on the flat buffers. Bit for bit the per-member
:func:`~lowmem.optim.functional.rounding.stochastic_round_to_bf16_` (NaN, infinities, subnormals, sizes not a multiple
of 4), its allocation the traced one, its kernels counted on meta; on a GPU the slice draw is a fresh tensor's."""

from __future__ import annotations

import pytest
import torch
from test_nonfinite_check_bytes import _AllLive

from lowmem.bench_launches import LaunchCounter
from lowmem.optim.functional.adam import float32_copies
from lowmem.optim.functional.rounding import (padded_numel, stochastic_round_bucket_bytes,
                                              stochastic_round_bucket_to_bf16_, stochastic_round_to_bf16_, stream_seed)

SHAPES = [(7,), (33, 5), (64, 4), (3,), (1,), (129, 17), (2, 3)]


def _values(device="cpu"):
    torch.manual_seed(0)
    xs = [(torch.randn(s) * 10).to(device) for s in SHAPES]
    xs[1][2, 2] = float("nan")
    xs[1][0, 0] = float("inf")
    xs[3][0] = -float("inf")
    xs[5][0, :5] = torch.tensor([1e-40, -1e-40, 3e38, -3e38, 0.0])  # (subnormals, near the largest, zero)
    xs[0][6] = float("nan")  # (the last element of a member before its padding)
    return xs


def _gens(device, seeds):
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(s)
        yield g


def _both(device="cpu"):
    xs = _values(device)
    seeds = [stream_seed(i, 5) for i in range(len(xs))]
    ref = [torch.empty(x.shape, dtype=torch.bfloat16, device=device) for x in xs]
    for d, x, g in zip(ref, xs, _gens(device, seeds)):
        stochastic_round_to_bf16_(d, x.clone(), g, overwrite_src=True)
    out = [torch.empty(x.shape, dtype=torch.bfloat16, device=device) for x in xs]
    srcs = float32_copies([x.to(torch.bfloat16) for x in xs], padded=True)
    torch._foreach_copy_(srcs, xs)  # (the float32 values, not their bfloat16 copies)
    stochastic_round_bucket_to_bf16_(out, srcs, _gens(device, seeds))
    return ref, out


def test_bucket_rounding_equals_the_per_member_one_bit_for_bit():
    ref, out = _both()
    for a, b in zip(ref, out):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert out[1][2, 2].isnan() and out[0][6].isnan() and out[1][0, 0] == float("inf")


def test_padded_copies_are_views_of_one_buffer():
    xs = [torch.randn(s).to(torch.bfloat16) for s in SHAPES]
    cs = float32_copies(xs, padded=True)
    base = cs[0]._base
    assert base.numel() == padded_numel([x.numel() for x in xs]) == 4 * sum((x.numel() + 3) // 4 for x in xs)
    assert [c.storage_offset() % 4 for c in cs] == [0] * len(cs)
    assert all(torch.equal(c, x.float()) and c._base is base for c, x in zip(cs, xs))


def test_copies_that_are_not_one_padded_buffer_are_refused():
    xs = [torch.randn(s) for s in SHAPES]
    ds = [torch.empty(s, dtype=torch.bfloat16) for s in SHAPES]
    with pytest.raises(ValueError, match="views of one flat float32 buffer"):
        stochastic_round_bucket_to_bf16_(ds, xs, [None] * len(xs))
    cs = float32_copies([x.to(torch.bfloat16) for x in xs], padded=True)
    with pytest.raises(ValueError, match="views of one flat float32 buffer"):  # (out of order)
        stochastic_round_bucket_to_bf16_(ds[::-1], cs[::-1], [None] * len(xs))


def test_bucket_rounding_allocates_what_it_reports():
    xs = _values()
    cs = float32_copies([x.to(torch.bfloat16) for x in xs], padded=True)
    ds = [torch.empty(x.shape, dtype=torch.bfloat16) for x in xs]
    with _AllLive() as t:
        stochastic_round_bucket_to_bf16_(ds, cs, _gens("cpu", range(len(xs))))
    assert t.peak == stochastic_round_bucket_bytes([x.numel() for x in xs]) > 0


def test_bucket_rounding_kernels_on_meta():
    """One draw per member and 6 for the bucket (the per-member rounding: 7 per member)."""
    n = 50
    ps = [torch.empty(64, 32, dtype=torch.bfloat16, device="meta") for _ in range(n)]
    cs = float32_copies(ps, padded=True)
    with LaunchCounter() as c:
        stochastic_round_bucket_to_bf16_(ps, cs, [None] * n)
    with LaunchCounter() as c1:
        for p in ps:
            stochastic_round_to_bf16_(p, torch.empty(64, 32, device="meta"), None, overwrite_src=True)
    assert (c.result().kernels, c1.result().kernels) == (n + 6, 7 * n)


@pytest.mark.cuda
def test_cuda_slice_draw_is_a_fresh_tensors_draw():
    """On a GPU, torch.randint into a slice of a larger buffer draws what a fresh tensor of that numel draws from the
    same generator (grid and Philox offset depend on the numel only), and the bucket rounding is the per-member one."""
    for words in (1, 2, 9, 1000, 65537, 1 << 20):
        g = torch.Generator(device="cuda")
        g.manual_seed(7)
        fresh = torch.randint(-(2**63), 2**63 - 1, (words,), dtype=torch.int64, device="cuda", generator=g)
        buf = torch.zeros(words + 13, dtype=torch.int64, device="cuda")
        g.manual_seed(7)
        torch.randint(-(2**63), 2**63 - 1, (words,), dtype=torch.int64, device="cuda", generator=g,
                      out=buf[5 : 5 + words])
        assert torch.equal(fresh, buf[5 : 5 + words])
    ref, out = _both("cuda")
    for a, b in zip(ref, out):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
