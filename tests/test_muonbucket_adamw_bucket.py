"""Issue 12: the hybrids' (Muon, SinkGD, SCALE) bucket of AdamW parameters (embeddings, head, norms, biases:
``foreach_bucket_class`` ``None``) is counted with AdamW's own rule (``AdamMoments.foreach_bucket_transient_bytes``:
nothing on torch's fused kernel, ``sqrt(v)`` on the multi-tensor operations), not the targets' bound (Muon's
6 B per element); and SinkGD's chunked direction is a new tensor (then ``chunk_direction_is_new``; since MUONFIX
SinkGD and Muon count their chunks' copies themselves, ``chunk_counts_copies``), so a bfloat16 parameter's
gradient-chunk copy is counted once, not twice. Before, on the tiny Qwen2 below (the embedding
and untied head, 65,536 elements, one AdamW bucket): muon float32 reported 393,216 for 196,608 traced, sinkgd
458,752 for 140,804; bfloat16 393,216 for 262,144 (both).

Every dispatched output is traced (tests/test_nonfinite_check_bytes._AllLive); Muon's bf16 GEMM workspace is left
out of the report (functional.muon.bf16_workspace_left_out), not a torch tensor. The fused kernel's step-count
tensor (``_fused_step_bytes``, 4 B per device) is counted kept from the last step and once more made by this one:
the trace sees at most the new one."""

from __future__ import annotations

import pytest
import torch
from test_nonfinite_check_bytes import _AllLive

import lowmem.optim.functional.adam as FA
from lowmem.optim import create_optimizer
from lowmem.optim.functional.muon import bf16_workspace_left_out


def _qwen2(dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).to(dtype)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["muon", "sinkgd", "scale"])
def test_hybrid_step_allocates_what_it_reports(name, dtype, fused, monkeypatch):
    monkeypatch.setattr(FA, "FUSED_ON_CPU", fused)
    FA.clear_step_tensors()
    opt = create_optimizer(_qwen2(dtype), name)
    params = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(1)
    with bf16_workspace_left_out():
        for step in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            if step == 0:
                opt.step()
        with _AllLive() as t:
            opt.step()
        reported = opt.step_transient_bytes()
    steps = opt._fused_step_bytes()  # (4 on the fused path: the kept step count; 0 on the multi-tensor operations)
    assert steps == 4 * (fused and dtype == torch.float32)  # (a bf16 parameter: no kernel, no step count)
    assert t.peak > 0
    assert reported - 2 * steps <= t.peak <= reported - steps
