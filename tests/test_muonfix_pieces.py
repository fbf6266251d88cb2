"""Issue 12 (MUONFIX): a hybrid's (Muon / SinkGD / SCALE) AdamW tensor larger than ``chunk_numel`` reaches its
foreach buckets in pieces that AdamW steps element-wise with the bucket (``HybridMoments.steps_pieces_whole`` is
false for it): ``step_transient_bytes()`` counts those buckets only, not a per-parameter step that never runs.
Before, the engine added the per-parameter term for any tensor in pieces of a rule not ``pieces_elementwise``: a
2**21-element vector in pieces of 2**19 on torch's fused kernel, 2,097,160 B reported for 2,304 traced (Muon).

Every dispatched output is traced (tests/test_nonfinite_check_bytes._AllLive), the third step; Muon's bf16 GEMM
workspace is left out (not a torch tensor). The fused kernel's step-count tensor (4 B per device,
``_fused_step_bytes``) is counted kept and new: the trace sees at most the new one."""

from __future__ import annotations

import pytest
import torch
from test_nonfinite_check_bytes import _AllLive

import lowmem.optim.functional.adam as FA
from lowmem.optim import create_optimizer
from lowmem.optim.functional.muon import bf16_workspace_left_out

_KEY = {"muon": ("use_muon", True), "sinkgd": ("use_sinkgd", True), "scale": ("scale_role", "hidden")}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(_KEY))
def test_adamw_vector_in_pieces_counts_its_buckets_only(name, dtype, fused, monkeypatch):
    monkeypatch.setattr(FA, "FUSED_ON_CPU", fused)
    FA.clear_step_tensors()
    gen = torch.Generator().manual_seed(0)
    v = torch.nn.Parameter(torch.randn(2**21, generator=gen).to(dtype))  # AdamW, 4 pieces of 2**19
    w = torch.nn.Parameter(torch.randn(16, 24, generator=gen).to(dtype))  # the target
    key, value = _KEY[name]
    opt = create_optimizer([{"params": [w], key: value}, {"params": [v]}], name)
    opt.chunk_numel = 2**19
    assert len(opt._foreach_pieces(v)) == 4 and not opt.recipe.moment.steps_pieces_whole(v.shape, {}, {"exp_avg": v})
    with bf16_workspace_left_out():
        for step in range(3):
            for p in (v, w):
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            if step < 2:
                opt.step()
        with _AllLive() as t:
            opt.step()
        reported = opt.step_transient_bytes()
    steps = opt._fused_step_bytes()
    assert steps == 4 * (fused and dtype == torch.float32)
    assert t.peak > 0
    assert reported - 2 * steps <= t.peak <= reported - steps, (reported, t.peak)
