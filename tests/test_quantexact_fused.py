"""adamw8bit's fused step (bitsandbytes' blockwise 8-bit Adam, lowmem/optim/bnb_fused.py) allocates what the report
says (issue 12). CUDA's kernel updates the moments in registers: a parameter it steps alone reports nothing
(Quantized.fused_step_allocates_nothing; sized on fake CUDA tensors, as the estimator does: a 2000 x 1024 float32
weight reported 27,704,576 B, the chunked PyTorch step's, before). bitsandbytes' CPU implementation (``fused=True``
on the CPU) is traced by calling its Python kernel directly (as a registered custom operator its inside is not
dispatched through a Python mode): 20 B per value of a slice, 24 with a low-precision weight."""

import pytest
import torch

from lowmem.optim import create_optimizer
from test_transient_per_parameter import _traced_and_reported
from test_quantexact_buckets import SHAPES
from test_quantexact_buckets import _traced_and_reported as _bucket_traced_and_reported


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fused", [None, True, False], ids=str)
def test_cuda_kernel_step_reports_nothing(fused, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        p = torch.nn.Parameter(torch.empty(2000, 1024, device="cuda", dtype=dtype))
        opt = create_optimizer([p], "adamw8bit", fused=fused)
        opt.materialize_state()
        reported = opt.step_transient_bytes(per_parameter=True)
    if fused is False:  # (the PyTorch step, one chunk: the decoded moments at least)
        assert reported >= 8 * p.numel()
    else:
        assert reported == 0


@pytest.fixture
def traced_cpu_kernel(monkeypatch):
    import bitsandbytes.functional  # noqa: F401  (registers the operators)
    from bitsandbytes.backends.cpu import ops as cpu_ops

    torch.ops.bitsandbytes.optimizer_update_8bit_blockwise  # noqa: B018  (the attribute, made on first access)
    monkeypatch.setattr(torch.ops.bitsandbytes, "optimizer_update_8bit_blockwise",
                        cpu_ops._optimizer_update_8bit_blockwise_cpu)


@pytest.mark.parametrize("chunk", ["default", 4096], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(200, 128), (33, 65), (8184, 1)], ids=str)
def test_cpu_kernel_per_parameter_step_allocates_what_it_reports(traced_cpu_kernel, shape, dtype, chunk):
    traced, reported = _traced_and_reported("adamw8bit", dtype, shape, chunk, min_quant_size=1, fused=True)
    assert traced == reported > 0


@pytest.mark.parametrize("chunk", ["default", 4096], ids=str)
@pytest.mark.parametrize("shapes", ["small_and_large", "in_pieces"], ids=str)
def test_cpu_kernel_bucket_step_allocates_what_it_reports(traced_cpu_kernel, shapes, chunk):
    traced, reported = _bucket_traced_and_reported(SHAPES[shapes], chunk, fused=True)
    assert traced == reported > 0
