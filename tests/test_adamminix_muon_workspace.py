"""Issue 12: Muon's bfloat16 products' BLAS workspace (functional.muon.bf16_gemm_workspace_bytes: process memory, not
torch tensors) is named in the estimate, details["optimizer_transient_blas_workspace"], as MKL's SVD buffers are
(optimizer_transient_mkl_svd): the estimator sizes the step a second time within
functional.muon.bf16_workspace_left_out(), where the workspace is 0."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_nonfinite_check_bytes import _AllLive
from torch import nn

from lowmem.optim import create_optimizer
from lowmem.optim.functional import muon as M


def test_the_workspace_is_zero_only_within_the_context():
    threads = torch.get_num_threads()
    outside = M.bf16_gemm_workspace_bytes(64, threads)
    assert outside > 0
    with M.bf16_workspace_left_out():
        assert M.bf16_gemm_workspace_bytes(64, threads) == 0
    with M.bf16_workspace_left_out():
        lean = M.muon_whole_step_bytes((64, 128), True, False, threads)
    assert M.muon_whole_step_bytes((64, 128), True, False, threads) == lean + outside
    with pytest.raises(RuntimeError), M.bf16_workspace_left_out():
        raise RuntimeError
    assert M.bf16_gemm_workspace_bytes(64, threads) == outside


# (shape, chunk_numel, whether a Newton-Schulz iteration is the step's peak; else a block's float32 step beside the next
# matrix, or the last iterate beside the step, is larger without the workspace: it then names less than it)
STEPS = [((40, 24), 240, True), ((64, 128), 3000, True), ((128, 64), 4096, True), ((3, 40, 24), 240, True),
         ((4, 64, 128), 3000, True), ((3, 24, 40), 960, False), ((3, 24, 40), 4000, False), ((8, 128, 64), 8192, False),
         ((2, 2, 7, 10), 60, True)]  # (a conv kernel: its 2 x 140 matrix, the iteration the peak; AUDMATH21 1)


@pytest.mark.parametrize("shape,chunk,iteration_peak", STEPS)
def test_the_step_without_the_workspace_is_its_traced_tensors(shape, chunk, iteration_peak):
    """A Muon step (foreach=False, chunked: its exact count): the traced tensors == step_transient_bytes() within
    bf16_workspace_left_out(); outside it the report adds the workspace of the matrices' smaller side where an
    iteration is the peak, at most that where another moment is."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(shape))
    opt = create_optimizer([p], "muon", foreach=False)
    opt.chunk_numel, opt.skip_nonfinite = chunk, False
    for _ in range(2):
        p.grad = torch.randn(shape)
        with _AllLive() as t:
            opt.step()
    with M.bf16_workspace_left_out():
        tensors = opt.step_transient_bytes()
    assert t.peak == tensors
    named = opt.step_transient_bytes() - tensors
    mat = M.muon_matrix_shape(shape)  # (a conv kernel [out, in, kh, kw]: its matrix [out, in kh kw], AUDMATH21 1)
    ws = M.bf16_gemm_workspace_bytes(min(mat[-2:]), torch.get_num_threads())
    assert named == ws if iteration_peak else 0 < named < ws


def test_the_estimate_names_the_workspace():
    """A tiny Qwen2 whose Muon matrices all have 64 as their smaller side (hidden 64, 4 key / value heads of 16):
    details["optimizer_transient_blas_workspace"] == bf16_gemm_workspace_bytes(64, threads), the estimate's transient
    less it == the transient sized within the context; layerwise (sized per parameter): named too, at most the
    layerwise transient (one parameter's step with it less the same step without it)."""
    from transformers import Qwen2Config

    from lowmem.memory.estimate import estimate_memory

    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
    kw = dict(batch_size=1, seq_len=32, dtype="fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = estimate_memory(config, "muon", **kw)
        with M.bf16_workspace_left_out():
            lean = estimate_memory(config, "muon", **kw)
        lw = estimate_memory(config, "muon", layerwise=True, **kw)
    ws = e.details["optimizer_transient_blas_workspace"]
    assert ws == M.bf16_gemm_workspace_bytes(64, torch.get_num_threads()) > 0
    assert e.optimizer_transient - ws == lean.optimizer_transient
    assert lean.details["optimizer_transient_blas_workspace"] == 0
    assert 0 < lw.details["optimizer_transient_blas_workspace"] <= lw.optimizer_transient
