"""Issue 12: Adam-mini's multi-tensor bucket transient is the exact count (every dispatched output traced:
tests/test_nonfinite_check_bytes._AllLive), not the bound of 8 bytes per element.

functional.adam_mini.adam_mini_foreach_bytes walks adam_mini_foreach_ (the stacks / cats of every block length
with their means, then the factors of every block beside the directions); AdamMiniMoments.foreach_bucket_transient_bytes
reads each member's elements and blocks (exp_avg_sq's size). Before: the Qwen2 tiny estimate's 442,368-element bucket
counted 3,538,944 bytes for 2,102,100 traced."""

from __future__ import annotations

import pytest
import torch
from test_nonfinite_check_bytes import _AllLive

import lowmem.optim.functional.adam_mini as AM
from lowmem.optim import create_optimizer

# (shape, elements per block) of each tensor of a bucket
FUNCTIONAL = {
    "one_shape_rows": [((64, 32), 32)] * 3,
    "one_tensor": [((48, 16), 16)],
    "mixed_rows": [((64, 32), 32), ((24, 32), 32), ((32,), 32), ((10, 48), 48)],
    "heads_and_rows": [((32, 16), 4 * 16), ((16, 16), 4 * 16), ((48, 16), 16), ((16,), 16)],
    "whole_tensors": [((16,), 16), ((16,), 16), ((8, 8), 64), ((5,), 5)],
    "elements": [((12, 8), 1), ((7,), 1)],
    "all_kinds": [((64, 32), 32), ((32, 32), 8 * 32), ((32,), 32), ((20, 3), 1), ((6, 6), 36), ((0, 4), 4),
                  ((100, 32), 32)],
    "few_elements_many_blocks": [((300, 2), 2), ((2, 300), 300)],
}


@pytest.mark.parametrize("case", list(FUNCTIONAL))
def test_adam_mini_foreach_bytes_is_what_adam_mini_foreach_allocates(case):
    torch.manual_seed(0)
    shapes = FUNCTIONAL[case]
    ps = [torch.randn(s) for s, _ in shapes]
    gs = [torch.randn(s) for s, _ in shapes]
    ms = [torch.zeros(s) for s, _ in shapes]
    vs = [torch.zeros(p.numel() // b) for p, (_, b) in zip(ps, shapes)]
    with _AllLive() as t:
        AM.adam_mini_foreach_(ps, gs, ms, vs, 3, 0.9, 0.999, 1e-3, 0.1, 1e-8)
    assert t.peak > 0
    assert t.peak == AM.adam_mini_foreach_bytes([(p.numel(), v.numel()) for p, v in zip(ps, vs)])


def _groups(case):
    """Parameter groups of several block partitions (float32 unless said), or a tiny Qwen2 / Llama (embedding and
    head rows, query / key heads, norms whole, biases)."""
    torch.manual_seed(0)
    P = lambda *s, dtype=torch.float32: torch.nn.Parameter(torch.randn(*s, dtype=dtype))  # noqa: E731
    if case in ("qwen2", "llama"):
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

        sizes = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
        if case == "llama":
            return LlamaForCausalLM(LlamaConfig(**sizes, tie_word_embeddings=False))
        return Qwen2ForCausalLM(Qwen2Config(**sizes, tie_word_embeddings=True))
    if case == "one_shape":
        return [{"params": [P(64, 32) for _ in range(4)], "block": "row"}]
    if case == "partitions":
        return [{"params": [P(64, 32), P(24, 32), P(32)], "block": "row"},
                {"params": [P(32, 16), P(16, 16)], "block": "head", "head_dim": 4},
                {"params": [P(16), P(16), P(8, 8)], "block": "tensor"},
                {"params": [P(12, 8), P(7)], "block": "element"}]
    if case == "bf16_and_fp32":
        # (the float32 bucket larger than the bfloat16 tensors' per-parameter step, so that it is the peak)
        return [{"params": [P(128, 32), P(32), P(24, 32, dtype=torch.bfloat16), P(16, dtype=torch.bfloat16)],
                 "block": "row"}]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["one_shape", "partitions", "bf16_and_fp32", "qwen2", "llama"])
def test_adam_mini_bucket_step_allocates_what_it_reports(case):
    """chunk_numel=None (every tensor whole in its bucket): the traced step == step_transient_bytes()."""
    groups = _groups(case)
    kw = {"head_dim": 8} if case in ("qwen2", "llama") else {}
    opt = create_optimizer(groups, "adam_mini", weight_decay=0.1, **kw)
    opt.chunk_numel = None
    params = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        if _ == 0:
            opt.step()
    with _AllLive() as t:
        opt.step()
    assert t.peak == opt.step_transient_bytes()
