"""8-bit moments of projected (low-rank) gradients stepped a bucket at a time (issue 15): the projected
gradients of a bucket whose sizes are whole quantization blocks share one decode and one encode per
moment (``Quantized.foreach_direction`` through ``Quantized._decoded_many``, as the full-rank buckets'
``foreach_step_``), not one per parameter; equal bit for bit to the per-parameter step (``foreach=False``)
and to one tensor at a time, within the bucket's reported transient, and a constant number of codec
kernels per bucket on the CUDA code path (meta tensors)."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.functional import quant as Q

# rank 4: projected gradients (4, 32) = 128 values (2 blocks of 64) x 3, (32, 4)... and (4, 40) = 160: a partial
# last block (decoded alone); a vector (full-rank)
SHAPES = [(16, 32), (16, 32), (32, 16), (9, 40), (48,)]
HP = {"rank": 4, "update_proj_gap": 2, "lr": 1e-2, "eps": 1e-3, "min_quant_size": 16, "block_size": 64}
RECIPES = [("galore_adamw8bit", {"weight_decay": 0.1}), ("fira_adamw8bit", {}), ("frugal8bit", {"projection": "columns"})]


def _run(name, hp, foreach, chunk_numel, monkeypatch, steps=4):
    """Weights, state and the sizes of the 8-bit decode calls (values per call) after ``steps`` steps."""
    calls: list[int] = []
    orig = Q.dequantize_blockwise_8bit

    def spy(codes, absmax, code, block_size):
        calls.append(codes.numel())
        return orig(codes, absmax, code, block_size)

    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = create_optimizer(ps, name, **{**HP, **hp})
    opt.chunk_numel = chunk_numel
    for g in opt.param_groups:
        g["foreach"] = foreach
    with monkeypatch.context() as mp:
        mp.setattr(Q, "dequantize_blockwise_8bit", spy)
        for _ in range(steps):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
    return [p.detach().clone() for p in ps], [{k: v.clone() for k, v in opt.state[p].items()} for p in ps], calls


@pytest.mark.parametrize("name,hp", RECIPES, ids=[r[0] for r in RECIPES])
@pytest.mark.parametrize("chunk_numel", [None, 512])
def test_projected_8bit_bucket_decodes_once_per_moment(name, hp, chunk_numel, monkeypatch):
    """Every state tensor (codes, absmax, float32 moments) and weight equal bit for bit to ``foreach=False``
    (GaLore's weights: its in-place fold is the per-parameter step's operations; Fira / FRUGAL's to float32
    rounding, tests/test_foreach_fold.py), and the whole-block projected gradients of a bucket decoded in
    one call per moment: with whole tensors one bucket, 2 calls of 3 x 128 values a step (the partial
    (4, 40) alone: 2 more; the 48-element vector's full-rank bucket: 2)."""
    fast = _run(name, hp, None, chunk_numel, monkeypatch)
    ref = _run(name, hp, False, chunk_numel, monkeypatch)
    for sa, sb in zip(fast[1], ref[1]):
        assert sa.keys() == sb.keys()
        for k in sa:
            if k == "fira_prev_norm":  # (the bucket's fold: float32 rounding)
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=0)
            else:
                assert torch.equal(sa[k], sb[k]), k
    for a, b in zip(fast[0], ref[0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert sum(fast[2]) == sum(ref[2]) and len(fast[2]) < len(ref[2])
    if name == "galore_adamw8bit":  # (4, 32), (4, 32), (32, 4) together; (4, 40) alone; the vector's bucket
        assert sorted(set(fast[2])) == [48, 160, 3 * 128] and sorted(set(ref[2])) == [48, 128, 160], fast[2]


BUCKETS = {
    "whole_blocks": ([(128, 512)] * 4, 256),
    "small": ([(64, 64)] * 3, 64),
    "partial_blocks": ([(4, 32), (4, 32), (4, 32), (4, 40), (8,)], 64),  # (4, 40): decoded alone; (8,): float32
    "mixed": ([(128, 512), (9, 40), (4, 4)], 256),
}


@pytest.mark.parametrize("case", sorted(BUCKETS))
def test_projected_8bit_direction_allocates_what_it_reports(case):
    """The bucket's multi-tensor direction allocates (live, measured) exactly what
    ``foreach_direction_bucket_transient_bytes`` reports: the decoded moments beside the inner rule's directions
    and ``sqrt(v)``, or beside the directions, the members decoded alone encoded in turn, then each moment's
    new codes and absmax kept for the one write-back next to the next one's table pass. Was the per-element
    bound ``foreach_direction_transient_bytes``: 22 B per element on (128, 512) x 4 for 18.03 measured
    (5,767,168 for 4,726,784 B)."""
    from lowmem.optim.registry import get_entry

    from tests.test_engine_accounting import _allocated_peak

    shapes, block = BUCKETS[case]
    rule = get_entry("galore_adamw8bit").recipe.moment
    group = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "block_size": block, "min_quant_size": 16,
             "lr": 1e-3}
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(s, generator=gen) for s in shapes]
    states = []
    for g in gs:
        states.append({})
        rule.init_state(states[-1], g.shape, group, g)
    rule.foreach_direction(gs, states, group, 1, 1e-3)  # (non-zero moments)
    inputs = gs + [t for st in states for t in st.values()]
    n = sum(g.numel() for g in gs)
    measured = _allocated_peak(lambda: rule.foreach_direction(gs, states, group, 2, 1e-3), inputs)
    report = rule.foreach_direction_bucket_transient_bytes([(g.shape, st) for g, st in zip(gs, states)])
    assert measured == report, (measured, report)
    assert report <= rule.foreach_direction_transient_bytes(n)  # (the per-element bound)


def test_projected_8bit_bucket_codec_kernels_do_not_grow_with_the_bucket():
    """On the CUDA code path (meta tensors), a bucket of k same-shape projected 8-bit moments dispatches
    one decode and one encode per moment whatever k (was one per parameter and moment, plus two copies)."""
    from lowmem.bench_launches import LaunchCounter

    def codec(k):
        ps = [torch.nn.Parameter(torch.zeros(256, 512, device="meta")) for _ in range(k)]
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt = create_optimizer(ps, "galore_adamw8bit", rank=16, lr=1e-3, update_proj_gap=100)
        opt.chunk_numel = None
        with LaunchCounter():  # (a meta value read on the host: answered)
            opt.step()
        with LaunchCounter() as c:
            opt.step()
        return c.ops["dequantize_blockwise"], c.ops["quantize_blockwise"], c.counts["kernels"]

    one, four = codec(1), codec(4)
    assert one[:2] == four[:2] == (2, 2), (one, four)


@pytest.mark.parametrize("bits", [8, 4])
def test_encode_writes_codes_and_scales_in_one_copy(bits):
    """``encode_`` (a tensor quantized alone: a partial last block, a piece of a tensor stepped from its first
    piece) writes its new codes and scales back with one ``torch._foreach_copy_`` (was a ``copy_`` each): 8-bit
    codes and absmax (2 before), 4-bit with rank-1 scales (3 before); the values decode back (CPU)."""
    from lowmem.bench_launches import LaunchCounter
    from lowmem.optim import quantized as QZ

    spec = QZ.M1_8BIT if bits == 8 else QZ.M2_4BIT
    shape = torch.Size((8, 96))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    state: dict[str, torch.Tensor] = {}
    if bits == 4:
        QZ.alloc_rank1(state, "v", shape, "cpu")
    else:
        QZ.alloc_quantized(state, "v", shape.numel(), spec, 64, "cpu")
    QZ.encode_(state, "v", x, spec, 64)
    torch.testing.assert_close(QZ.decode(state, "v", spec, 64, shape), x, atol=0.07 if bits == 4 else 0.01, rtol=0)
    meta = {k: torch.empty_like(v, device="meta") for k, v in state.items()}
    xm = torch.empty(shape, device="meta")
    with LaunchCounter() as c:
        QZ.encode_(meta, "v", xm, spec, 64)
    assert c.ops["_foreach_copy_"] == 1 and c.ops["copy_"] == 0, c.ops
