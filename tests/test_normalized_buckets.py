"""The normalized hybrids' weights fill foreach buckets of their own shape (issue 15: one stack per shape
and bucket is a fixed number of kernels off the CPU; ``MomentRule.foreach_bucket_class``,
``HybridMoments.foreach_bucket_class``): with layers of interleaved shapes each bucket's stack is as large
as the chunk allows, the results are those of the per-parameter step (bit for bit on the CPU), and
``step_transient_bytes()`` is that of the largest bucket (no bucket beyond the chunk)."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim.recipes import normalized
from lowmem.optim.registry import create_optimizer

A, B = (16, 16), (24, 16)  # 256 and 384 elements
LAYER = [A, B, A, B, A, B, A, (16,)]  # interleaved, as a Llama layer's q, gate, k, up, v, down, o and a norm
CHUNK = 1024

STACKS = {"sinkgd": "sinkgd_foreach_", "muon": "muon_foreach_", "scale": "scale_rows_foreach_"}
HPARAMS = {"sinkgd": {"lr": 1e-2, "scale": 0.5, "weight_decay": 0.1}, "muon": {"lr": 2e-2, "ns_steps": 2},
           "scale": {"lr": 1e-2, "weight_decay": 0.1}}


def _run(name, foreach, monkeypatch, steps=3):
    stacks = []
    orig = getattr(normalized, STACKS[name])

    def spy(params, *a, **k):
        stacks.append((tuple(params[0].shape), len(params)))
        return orig(params, *a, **k)

    monkeypatch.setattr(normalized, STACKS[name], spy)
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in LAYER * 4]
    opt = create_optimizer(ps, name, foreach=foreach, **HPARAMS[name])
    opt.chunk_numel = CHUNK
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return ps, stacks, opt


@pytest.mark.parametrize("name", sorted(STACKS))
def test_stacks_fill_the_chunk_and_equal_the_per_parameter_step(name, monkeypatch):
    """16 weights of 256 elements in stacks of 4 (1,024: the chunk), 12 of 384 in stacks of 2 (4 and 6
    stacks a step, not 10 and 12 partial ones of buckets of mixed shapes); the weights (and momenta) equal
    the per-parameter step's (foreach=False, the same chunk) bit for bit, the AdamW vectors to rounding."""
    got, stacks, opt = _run(name, None, monkeypatch)
    want, none, ref = _run(name, False, monkeypatch)
    assert none == []
    assert sorted(stacks) == sorted(([(A, 4)] * 4 + [(B, 2)] * 6) * 3), stacks
    for a, b in zip(want, got):
        if a.dim() == 2:
            assert torch.equal(a, b)
            assert all(torch.equal(ref.state[a][k], opt.state[b][k]) for k in ref.state[a] if k != "step")
        else:  # (AdamW: torch's fused kernel in the buckets, the operations per parameter: rounding apart)
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(STACKS))
def test_transient_is_the_largest_buckets(name):
    """step_transient_bytes() is the rule's foreach transient of a full bucket of one shape (the chunk's
    1,024 elements of the 256-element weights, counted for that shape: HybridMoments.foreach_bucket_transient_bytes
    is told the bucket's class), within the rule's bound for any bucket of the chunk: no bucket beyond the chunk."""
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in LAYER * 4]
    opt = create_optimizer(ps, name, **HPARAMS[name])
    opt.chunk_numel = CHUNK
    opt.materialize_state()
    rule = opt.recipe.moment
    full = rule.target_foreach_bucket_transient_bytes(CHUNK, torch.Size(A), opt.param_groups[0])
    # (+ torch's fused AdamW kernel's step count for the norms' float32 bucket: 4 B kept from the last step + 4 B new)
    assert opt._fused_step_bytes() == 4
    assert opt.step_transient_bytes() == full + 2 * opt._fused_step_bytes() and full <= rule.foreach_transient_bytes(CHUNK)
