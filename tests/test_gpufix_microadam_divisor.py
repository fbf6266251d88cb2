"""MicroAdam's 4-bit error feedback divides by 15 (``u = (Delta - delta) / 15``, Algorithm 1 lines 4 and 7-8); off
the CPU every path must divide by a tensor on the device (``quant.minmax_top``).

The first session-14 H200 run found the compiled MicroAdam state unequal to the plain one
(``test_microadam.py::test_compiled_path_equals_plain[*-cuda]``: ``microadam_error_min`` in float32,
``microadam_indices`` in bf16). The cause: CUDA's eager ``x / 15.0`` is ``x * fl(1/15)`` (ATen's
``div_true_kernel_cuda`` turns a division by a CPU scalar into a product with its reciprocal), while the compiled
path divided by a 0-dim device tensor (a true, correctly rounded division in Triton with ``division_rounding``) and
the CPU's eager division divides. The two differ by an ulp on part of the inputs (checked here on the CPU), which
moves the decoded error, its block minima and so the top-k. CUDA's path is reproduced on meta tensors (a device
other than the CPU): the dispatched divisions are traced."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.optim.functional import microadam as MA
from lowmem.optim.functional import quant as Q


class _Divisions(TorchDispatchMode):
    """Records the divisor of every ``aten.div`` / ``aten.div_`` (a number, or a tensor's device type)."""

    def __init__(self):
        super().__init__()
        self.divisors = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.div, torch.ops.aten.div_):
            d = args[1]
            self.divisors.append(d.device.type if isinstance(d, torch.Tensor) else d)
        return func(*args, **(kwargs or {}))


def test_the_reciprocal_product_is_not_the_division():
    """Why a number will not do on CUDA: ``fl(x fl(1/15))`` (CUDA's eager ``x / 15.0``) differs from ``fl(x / 15)``
    for part of the float32 inputs (here on the CPU, where both forms are written out)."""
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 8
    recip = torch.tensor(1.0 / 15.0, dtype=torch.float32)
    off = (x * recip != x / 15.0).sum().item()
    assert 0.01 * x.numel() < off  # (measured: 64% of them)


def _meta_rows(rows=3, d=5000, qbs=2048):
    lay = MA.topk_layout(d, 4096, 0.01)
    nb = -(-d // qbs)
    return (torch.empty(rows, d, device="meta"), torch.empty(rows, -(-d // 2), dtype=torch.uint8, device="meta"),
            torch.empty(rows, nb, device="meta"), torch.empty(rows, nb, device="meta"), lay, qbs)


def test_plain_microadam_divides_by_a_device_tensor_off_the_cpu():
    """The plain paths (the stacked rows: :func:`MA.compress_rows_`; a tensor alone: :func:`MA.compress_`) on meta
    tensors divide only by tensors of the device, never by a number (what CUDA would multiply by the reciprocal of).
    Mutation: ``quant.minmax_levels`` back to ``/ 15.0`` -> red (a ``15.0`` divisor), likewise
    ``error_sum_rows``' ``top`` back to a default of ``15.0``."""
    g, err, lo, hi, lay, qbs = _meta_rows()
    with _Divisions() as rows:
        MA.compress_rows_(g, err, lo, hi, lay, qbs)
    with _Divisions() as single:
        MA.compress_(g[0], err[0], lo[0], hi[0], lay, qbs)
    for t in (rows, single):
        assert t.divisors and all(d == "meta" for d in t.divisors), t.divisors
    assert len(rows.divisors) == len(single.divisors) == 3  # (line 4's u; line 8's u and (x - delta) / u)


def test_on_the_cpu_the_divisor_stays_the_number():
    """The CPU divides by the number as before (its bits unchanged; its eager division is a true one), and the
    device divisor is one kept 0-dim float32 tensor per device (``MicroAdamMoments.cached_bytes``' 4 B)."""
    assert Q.minmax_top("cpu") == 15.0 and isinstance(Q.minmax_top(torch.device("cpu")), float)
    top = Q.minmax_top("meta")
    assert top.shape == () and top.dtype == torch.float32 and top is Q.minmax_top(torch.device("meta"))
    g, err, lo, hi, lay, qbs = _meta_rows()
    with _Divisions() as t:
        MA.compress_rows_(torch.randn(3, 5000), torch.zeros(3, 2500, dtype=torch.uint8), torch.zeros(3, 3),
                          torch.ones(3, 3), lay, qbs)
    assert t.divisors.count(15.0) == 2 and t.divisors.count("cpu") == 1, t.divisors
