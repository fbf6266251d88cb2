"""MicroAdam's multi-tensor path (issue 15): ``MicroAdamMoments.foreach_step_`` stacks a bucket's tensors
of one top-k layout as rows (tensors of whole blocks, whatever their sizes: one row) and runs
``functional.microadam.compress_rows_`` / ``window_direction_rows`` once per group, equal bit for bit (weights, ring buffer, error feedback) to the per-parameter step
(``foreach=False``, the reference path) with the same ``chunk_numel``; a tensor larger than
``chunk_numel`` arrives in pieces and is stepped whole from its first one (the engine's chunked step)."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim.functional import microadam as MA
from lowmem.optim.registry import create_optimizer

# same-size matrices and vectors (one layout each), a size with a partial top-k block and an odd
# length (1015: partial error block, a padding nibble), a 3-D tensor, a tiny vector whose window
# would outgrow half of it (2 m k > d: per parameter), two tensors larger than chunk_numel=2048
# (pieces), and a bf16 matrix (per parameter)
SHAPES = [(32, 16), (32, 16), (16, 32), (512,), (512,), (35, 29), (2, 8, 16), (5,), (3000,), (64, 48)]

CONFIGS = {
    "default_blocks": {"k_init": 0.05, "m": 4, "quant_block_size": 64, "topk_block_size": 128},
    "wd": {"k_init": 0.05, "m": 3, "quant_block_size": 128, "topk_block_size": 256, "weight_decay": 0.1, "lr": 1e-2},
    "big_blocks": {"k_init": 0.02, "m": 5, "quant_block_size": 2048, "topk_block_size": 4096},  # one partial block each
}



def _recording(orig, calls):
    """``compress_rows_`` recording the shape of the stacked gradients (``g``: a tensor, or a function that
    makes it)."""
    def wrapped(g, *a):
        g = g() if callable(g) else g
        calls.append(tuple(g.shape))
        return orig(g, *a)
    return wrapped


def _run(hp, foreach, chunk_numel, steps=7, monkeypatch=None):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    ps.append(torch.nn.Parameter(torch.randn(24, 16, generator=gen).bfloat16()))
    opt = create_optimizer(ps, "microadam", foreach=foreach, **hp)
    opt.chunk_numel = chunk_numel
    calls = []
    orig = MA.compress_rows_
    monkeypatch.setattr(MA, "compress_rows_", _recording(orig, calls))
    for i in range(steps):  # more steps than the ring's rows: rows are overwritten
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=gen) * (10.0 if i % 3 == 1 else 1.0)).to(p.dtype)
        opt.step()
    monkeypatch.undo()
    return ps, opt, calls


@pytest.mark.parametrize("chunk_numel", [None, 2048])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_foreach_equals_the_per_parameter_step_bit_for_bit(config, chunk_numel, monkeypatch):
    hp = CONFIGS[config]
    ref, ref_opt, ref_calls = _run(hp, False, chunk_numel, monkeypatch=monkeypatch)
    got, got_opt, calls = _run(hp, None, chunk_numel, monkeypatch=monkeypatch)
    assert ref_calls == []
    # every step: the five tensors of 512 elements (two 32 x 16, a 16 x 32, two vectors) stacked (in one
    # call per bucket), the others of a layout of their own; the bf16 matrix never, pieces never. With
    # blocks that divide them (whole top-k and quantization blocks), the 512s, the 2 x 8 x 16 and the
    # 64 x 48 (unless in pieces) are one row of a bucket instead, whatever their sizes (joint_key)
    steps = 7
    assert len(calls) % steps == 0 and calls == calls[: len(calls) // steps] * steps, calls
    assert (1, 1015) in calls
    assert not any(d == 384 or (chunk_numel and d > chunk_numel) for _, d in calls), calls
    if 512 % hp["quant_block_size"] or 512 % hp["topk_block_size"] and hp["topk_block_size"] < 512:
        assert sum(n for n, d in calls if d == 512) == 5 * steps
        assert max(n for n, _ in calls) >= 4  # (buckets of at most chunk_numel elements: 4 + 1 at 2048)
    else:
        joint = [512] * 5 + [256] + ([3072] if chunk_numel is None else [])
        assert all(n == 1 for n, _ in calls), calls
        assert sum(d for _, d in calls if d not in (1015, 3000)) == sum(joint) * steps, calls
        assert max(d for _, d in calls) >= 3 * 512  # (several sizes in one row)
    if 2 * hp["m"] * MA.topk_layout(5, hp["topk_block_size"], hp["k_init"]).k > 5:
        assert (1, 5) not in calls  # the window would outgrow half the tensor: per parameter
    for a, b in zip(ref, got):
        assert torch.equal(a, b), (config, tuple(a.shape), (a.float() - b.float()).abs().max().item())
        sa, sb = ref_opt.state[a], got_opt.state[b]
        assert set(sa) == set(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (config, tuple(a.shape), k)


def test_window_larger_than_the_tensor_takes_the_per_parameter_step():
    rule = create_optimizer([torch.nn.Parameter(torch.zeros(4))], "microadam").recipe.moment
    group = {"params": [], "m": 4, "k_init": 0.25, "topk_block_size": 64}
    assert rule.supports_foreach_for(torch.Size([16]), {**group, "k_init": 0.125}, {})  # 2 m k = 16 = d
    assert not rule.supports_foreach_for(torch.Size([16]), group, {})  # 2 m k = 32 > d


@pytest.mark.slow  # compiling takes ~20 s on CPU
@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_path_in_a_bucket_takes_each_tensors_compiled_direction():
    """Where the compiled path is on (CUDA by default; ``compile="always"`` here), a bucket's tensors take
    their compiled per-tensor direction, with the bucket's multi-tensor update: equal bit for bit to
    ``foreach=False`` with the same compiled functions."""
    from lowmem.optim.microadam import MicroAdamMoments

    def run(foreach):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(32, 16), (32, 16), (35, 29)]]
        opt = create_optimizer(ps, "microadam", foreach=foreach, k_init=0.05, m=3, quant_block_size=64,
                               topk_block_size=128, weight_decay=0.1)
        opt.recipe = type(opt.recipe)(**{**opt.recipe.__dict__, "moment": MicroAdamMoments(compile="always")})
        calls = []
        orig = opt.recipe.moment.foreach_step_
        opt.recipe.moment.foreach_step_ = lambda params, *a, **kw: calls.append(len(params)) or orig(params, *a, **kw)
        for _ in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return ps, opt, calls

    ref, ref_opt, ref_calls = run(False)
    got, got_opt, calls = run(None)
    assert ref_calls == [] and calls == [3] * 4
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
        for k in ref_opt.state[a]:
            assert torch.equal(ref_opt.state[a][k], got_opt.state[b][k]), k
