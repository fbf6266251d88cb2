"""What the CPU memory model takes from the machine it runs on: MKL's kept GEMM packing buffers follow
the CPU's vendor (lowmem.optim.functional.galore.mkl_generic_kernels; docs/memory.md "MKL's GEMM packing
buffers on projected steps"). Both vendors' models are checked on any machine (the vendor patched), and
the step report and the CPU estimate take the same function."""

from __future__ import annotations

import os

import pytest
import torch

from lowmem.optim.functional import galore as GL

MiB = 2**20
VENDORS = {"GenuineIntel": False, "AuthenticAMD": True, "HygonGenuine": True}


def test_cpu_vendor_is_proc_cpuinfos():
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("needs Linux /proc/cpuinfo")
    with open("/proc/cpuinfo") as f:
        line = next(line for line in f if line.startswith("vendor_id"))
    assert GL.cpu_vendor() == line.split(":", 1)[1].strip()


@pytest.mark.parametrize("vendor", sorted(VENDORS))
def test_kept_packing_buffers_follow_the_vendor(monkeypatch, vendor):
    """Intel (Xeon): combine-back 4 min(r, 256) n + 0.7 MiB, project-down 1 MiB; AMD (EPYC): combine-back
    0.25 MiB, project-down 768 B a column up to 6656 columns (the measurements are in the docstrings)."""
    monkeypatch.setattr(GL, "cpu_vendor", lambda: vendor)
    amd = VENDORS[vendor]
    assert GL.mkl_generic_kernels() == amd
    for rank, cols in ((16, 128), (256, 2048), (512, 8192), (256, 11008)):
        if amd:
            want = 2**18 + 768 * min(cols, 6656)
        else:
            want = 4 * min(rank, 256) * cols + 7 * MiB // 10 + MiB
        assert GL.kept_pack_bytes(rank, cols) == want, (rank, cols)


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD"])
def test_step_report_and_cpu_estimate_count_the_same_buffers(monkeypatch, vendor):
    """The engine's once-per-step term (the widest projected weight's) and estimate_memory(device="cpu")'s
    ``optimizer_transient_mkl_gemm_pack`` are kept_pack_bytes of the running CPU."""
    if not torch.backends.mkl.is_available():
        pytest.skip("needs a build with MKL")
    from lowmem.memory.estimate import estimate_memory
    from lowmem.optim.registry import create_optimizer

    monkeypatch.setattr(GL, "cpu_vendor", lambda: vendor)
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in ((300, 200), (64, 500), (64, 64))]
    opt = create_optimizer(ps, "galore_adamw", rank=8, projection="gaussian")
    opt.materialize_state()
    assert opt._kept_gemm_bytes() == GL.kept_pack_bytes(8, 500)
    est = estimate_memory("tiny", "galore_adamw", optim_args={"rank": 16}, dtype="fp32", seq_len=16, device="cpu")
    assert est.details["optimizer_transient_mkl_gemm_pack"] == GL.kept_pack_bytes(16, 128)
