"""Muon's bfloat16 products' BLAS workspace is process memory, not a torch tensor: the estimate names it
(``details["optimizer_transient_blas_workspace"]``, 1e56cb0) and ``MemoryMeasurement`` leaves it out of the
tensor-level comparison and names it in its table, as it does MKL's GEMM packing and SVD buffers."""

from __future__ import annotations

import warnings


def test_muon_blas_workspace_is_named_and_left_out_of_the_tensor_ratio():
    from lowmem.memory.measure import measure_memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = measure_memory("tiny", "muon", seq_len=16, steps=2, device="cpu")
    d = r.estimate.details
    blas = d["optimizer_transient_blas_workspace"]
    assert blas > 0
    assert r.mkl_gemm_pack_bytes() == (d.get("optimizer_transient_mkl_gemm_pack", 0)
                                       + (d.get("optimizer_transient_mkl_svd") or 0) + blas)
    assert "the BLAS workspace of bfloat16 products" in r.table()
    assert "optimizer_transient_tensors" in r.ratios()


def test_measure_memory_refuses_steps_that_measure_nothing():
    """``steps=0`` ran no step and measured weights and state alone (a peak that "fits" anything); 1.5 / True are
    no step counts either (FOUND_MEASUREPICK 4)."""
    import pytest

    from lowmem.memory.measure import measure_memory

    for steps in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"steps must be an int >= 1"):
            measure_memory("tiny", "adamw", seq_len=8, steps=steps, device="cpu")
