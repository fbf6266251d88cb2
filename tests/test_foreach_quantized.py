"""The multi-tensor path of quantized moments (issue 15): ``Quantized.foreach_step_`` steps a bucket's
tensors with one decode and one encode per moment for the tensors of whole blocks
(``functional.quant.dequantize_blockwise_cat`` / ``quantize_blockwise_split``), rank-1 scales and
partial last blocks alone, the inner rule's multi-tensor direction, and multi-tensor decay and update;
equal bit for bit (weights and every state tensor) to the per-parameter step (``foreach=False``, the
reference path) with the same ``chunk_numel``. A quantized tensor larger than ``chunk_numel`` arrives in
pieces and is stepped whole from its first one (the engine's chunked step)."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import quantized as QM
from lowmem.optim.functional import quant as Q
from lowmem.optim.registry import create_optimizer

# same-shape matrices of whole blocks (rank-1: stacked), two matrices ending in a partial block
# (35 x 29 = 1015: decoded alone, also with rank-1 scales: an odd number of 4-bit codes), a 1 x n row,
# small vectors (float32 moments below min_quant_size), a 3-D tensor, and two tensors larger than
# chunk_numel=1024 (pieces: a 3000-vector, a 48 x 40 matrix), and a bf16 matrix (per parameter)
SHAPES = [(32, 16), (32, 16), (35, 29), (35, 29), (1, 256), (64,), (64,), (7,), (2, 8, 16), (3000,), (48, 40)]

CONFIGS = {
    "8bit": ("adamw8bit", {}),
    "8bit_wd_b128": ("adamw8bit", {"weight_decay": 0.1, "block_size": 128, "lr": 1e-2}),
    "8bit_large_min": ("adamw8bit", {"min_quant_size": 2000}),  # most moments float32 (in pieces too)
    "4bit": ("adamw4bit", {}),
    "4bit_wd": ("adamw4bit", {"weight_decay": 0.3, "lr": 3e-2}),
    "4bit_rank1": ("adamw4bit_rank1", {}),
    "4bit_rank1_wd_b128": ("adamw4bit_rank1", {"weight_decay": 0.1, "block_size": 128}),
}


def _run(name, hparams, foreach, chunk_numel, steps=4, bf16=False):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    if bf16:
        ps.append(torch.nn.Parameter(torch.randn(24, 16, generator=gen).bfloat16()))
    hp = {"min_quant_size": 128, "block_size": 64, **hparams}
    opt = create_optimizer(ps, name, foreach=foreach, **hp)
    opt.chunk_numel = chunk_numel
    buckets = []
    orig = opt.recipe.moment.foreach_step_

    def spy(params, *args, **kwargs):
        buckets.append(sorted(p.numel() for p in params))
        return orig(params, *args, **kwargs)

    opt.recipe.moment.foreach_step_ = spy  # an instance attribute (the recipe's rule, restored below)
    try:
        for i in range(steps):
            for p in ps:
                p.grad = (torch.randn(p.shape, generator=gen) * (30.0 if i % 2 else 1.0)).to(p.dtype)
            opt.step()
    finally:
        del opt.recipe.moment.foreach_step_
    return ps, opt, buckets


def _assert_equal(ref, ref_opt, got, got_opt, label):
    for a, b in zip(ref, got):
        assert torch.equal(a, b), (label, tuple(a.shape), (a.float() - b.float()).abs().max().item())
        sa, sb = ref_opt.state[a], got_opt.state[b]
        assert set(sa) == set(sb), (label, tuple(a.shape))
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (label, tuple(a.shape), k)


@pytest.mark.parametrize("chunk_numel", [None, 1024])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_foreach_equals_the_per_parameter_step_bit_for_bit(config, chunk_numel):
    name, hp = CONFIGS[config]
    ref, ref_opt, ref_buckets = _run(name, hp, False, chunk_numel, bf16=True)
    got, got_opt, buckets = _run(name, hp, None, chunk_numel, bf16=True)
    assert ref_buckets == []
    assert buckets, config
    seen = {n for b in buckets for n in b}
    if chunk_numel is not None:
        assert max(sum(b) for b in buckets) <= chunk_numel
        assert 1024 in seen  # pieces of the 3000-vector and of the 48 x 40 matrix
    assert 24 * 16 not in seen  # the bf16 parameter: the per-parameter step
    _assert_equal(ref, ref_opt, got, got_opt, config)


def test_whole_block_tensors_share_one_decode_and_one_encode(monkeypatch):
    """One bucket of 8-bit moments: per moment one decode and one encode for the tensors of whole blocks
    (four 32 x 16 matrices), the 35 x 29 matrix (a partial last block) alone."""
    calls = {"cat": 0, "split": 0, "alone": 0}
    for fn in ("dequantize_blockwise_cat", "quantize_blockwise_split"):
        orig = getattr(Q, fn)
        monkeypatch.setattr(Q, fn, lambda *a, _o=orig, _k=fn.split("_")[-1], **kw: calls.__setitem__(_k, calls[_k] + 1) or _o(*a, **kw))
    orig_encode = QM.encode_
    monkeypatch.setattr(QM, "encode_", lambda *a, **kw: calls.__setitem__("alone", calls["alone"] + 1) or orig_encode(*a, **kw))
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(32, 16)] * 4 + [(35, 29), (64,)]]
    opt = create_optimizer(ps, "adamw8bit", min_quant_size=128, block_size=64)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    assert calls == {"cat": 2, "split": 2, "alone": 2}, calls


def test_quantized_foreach_refuses_rank1_beyond_two_dimensions_and_sharded_groups():
    rule = create_optimizer([torch.nn.Parameter(torch.zeros(4))], "adamw4bit_rank1").recipe.moment
    group = {"params": [], "min_quant_size": 16, "v_normalization": "rank1", "block_size": 64}
    assert rule.supports_foreach_for(torch.Size([8, 8]), group, {})
    assert not rule.supports_foreach_for(torch.Size([2, 8, 8]), group, {})
    assert rule.supports_foreach_for(torch.Size([2, 8, 8]), {**group, "v_normalization": "block"}, {})
