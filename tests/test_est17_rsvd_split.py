"""EST17 (issue 12, residual b): a ``rsvd`` refresh's count split like the exact SVD's. Within
``functional.galore.svd_workspace_left_out()`` (the estimate's ``optimizer_transient_lapack_svd`` split) the refresh
counts its tensors only (``Projection._rsvd_traced_bytes``: what its operations return), its LAPACK and MKL buffers
apart. Before, the whole bound (MKL's first-call code and packing, its kept SVD panel: ~4 MiB whatever the shape) stayed
in the tensors' part: ``lowmem budget tiny --optim galore_adamw --optim-args rank=8,projection=rsvd --measure`` read
4.17 MiB for 128 KiB measured (tensors-only est/meas 33.367), now 1.000."""

import pytest
import torch
from test_muonfix_sweep import _RealLive, _Tiny

import lowmem.optim.functional.adam as FA
import lowmem.optim.functional.galore as GL
from lowmem.optim.registry import create_optimizer


@pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "per-parameter"])
@pytest.mark.parametrize("name", ["galore_adamw", "fira_adamw", "adamw_snsm"])
def test_rsvd_tensors_only_count_is_the_traced_step(name, foreach, monkeypatch):
    """The tensors-only step transient (steps 1-5, refreshes at 1, 3, 5: the range finder, then the subspace
    iteration) equals the most bytes the step's operations hold, up to torch's fused AdamW step count (a 4 B 0-d
    tensor kept from step to step and a new one, as tests/test_muonfix_sweep.py's EXACT cases); the whole count
    (LAPACK's and MKL's buffers too) stays the larger bound."""
    monkeypatch.setattr(FA, "FUSED_ON_CPU", True)
    FA.clear_step_tensors()
    torch.manual_seed(0)
    opt = create_optimizer(_Tiny(), name, foreach=foreach, rank=4, projection="rsvd", update_proj_gap=2, lr=1e-3)
    params = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(1)
    opt.materialize_state()
    peak = 0
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        with _RealLive() as t:
            opt.step()
        peak = max(peak, t.peak)
    with GL.svd_workspace_left_out():
        tensors = opt.step_transient_bytes() - opt._kept_gemm_bytes()
    steps = opt._fused_step_bytes()
    assert tensors - 2 * steps <= peak <= tensors - steps, (tensors, peak, steps)
    assert opt.step_transient_bytes() - opt._kept_gemm_bytes() > tensors + 2**20  # (MKL's first-call buffers: MiBs)


@pytest.mark.slow  # 3-6 s: the tiny model's estimate
def test_estimate_names_the_rsvd_buffers_apart():
    """``estimate_memory``'s ``optimizer_transient_lapack_svd`` holds the rsvd refresh's LAPACK and MKL buffers: the
    transient less them and MKL's GEMM packing is the tensors' count (tiny model, rank 8)."""
    from lowmem.memory import estimate_memory

    est = estimate_memory("tiny", "galore_adamw", optim_args={"rank": 8, "projection": "rsvd"}, device="cpu")
    lapack = est.details["optimizer_transient_lapack_svd"]
    assert lapack > 2**20
    assert est.optimizer_transient - est.details["optimizer_transient_mkl_gemm_pack"] - lapack < 2**18
