"""adamw8bit ``fused=True`` on the CPU (bitsandbytes' CPU implementation), a parameter stepped alone: the engine's
per-parameter report is the rule's ``Quantized.fused_step_transient_bytes`` alone (FOUND_QUANTEXACT 4(a)). The
engine's ``_update_state`` hands the parameter to the kernel before it makes any float32 copy, so the copies the
plain step makes are not added: a bfloat16 (200, 128) weight stepped whole was reported 716,800 B (28 B per value)
for 614,400 traced (24 B: bitsandbytes' own float32 temporaries and the weight's float32 copy)."""

import pytest
import torch

from test_quantexact_fused import traced_cpu_kernel  # noqa: F401  (the fixture)
from test_transient_per_parameter import _traced_and_reported


@pytest.mark.parametrize("chunk", [None, 4096, 300], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(200, 128), (33, 65)], ids=str)
def test_fused_cpu_step_alone_allocates_what_it_reports(traced_cpu_kernel, shape, dtype, chunk):  # noqa: F811
    """Whole and in slices (4096: 16 blocks; 300: one block of 256, the slice rounded down)."""
    traced, reported = _traced_and_reported("adamw8bit", dtype, shape, chunk, min_quant_size=1, fused=True)
    assert traced == reported > 0
