"""estimate_memory(device="cuda") names what it does not count on CUDA (issue 12, ESTLORA): the projection refresh's SVD
is counted as LAPACK's gesdd holds it, while torch.linalg.svd on CUDA runs cuSOLVER (its workspace through torch's
allocator: the H200 run of session 14 measured ~178 MiB more on a Llama-2-7B layer's refresh step, est / measured
0.80-0.81). Sized on fake tensors: no GPU needed."""

from __future__ import annotations

import pytest

CUSOLVER = "cuSOLVER"


@pytest.mark.parametrize("optimizer,device,named", [("galore_adamw", "cuda", True), ("galore_adamw", "cpu", False),
                                                    ("adamw", "cuda", False), ("apollo_adamw", "cuda", False)])
def test_cusolver_workspace_is_named_on_cuda_only(optimizer, device, named):
    from transformers import AutoConfig

    from lowmem.memory.estimate import estimate_memory

    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128)
    est = estimate_memory(config, optimizer=optimizer, optim_args={"rank": 16} if optimizer != "adamw" else None,
                          batch_size=1, seq_len=32, device=device)
    assert any(CUSOLVER in n for n in est.notes) is named, est.notes
