"""``MemoryMeasurement``'s tensors-only ratio leaves out the SVD refresh's LAPACK bytes too (not tensors the tracker
sees, like MKL's buffers): alice / GaLore on the tiny model read 1.467 where the tensors agree to 1.000
(FOUND_INTEG16 2 / FOUND_ALICEDOC 2). Built from an estimate of meta tensors and a stand-in measurement."""

import pytest

from lowmem.memory import estimate_memory
from lowmem.memory.measure import MemoryMeasurement


def test_tensor_ratio_leaves_out_the_lapack_bytes():
    est = estimate_memory("tiny", "galore_adamw", {"rank": 8}, batch_size=1, seq_len=32, dtype="fp32", device="cpu")
    d = est.details
    mkl = int(d.get("optimizer_transient_mkl_gemm_pack", 0)) + int(d.get("optimizer_transient_mkl_svd") or 0) \
        + int(d.get("optimizer_transient_blas_workspace") or 0)
    lapack = int(d.get("optimizer_transient_lapack_svd") or 0)
    if not (mkl and lapack):
        pytest.skip("this CPU's estimate names no MKL or LAPACK bytes")
    tensors = est.optimizer_transient - mkl - lapack
    m = MemoryMeasurement(measured={"optimizer_transient": tensors, "total": est.total}, at_peak={}, estimate=est,
                          device="cpu")
    assert m.ratios()["optimizer_transient_tensors"] == pytest.approx(1.0)
    assert "(est/meas 1.000 without the LAPACK bytes below)" in m.table()
