"""FRUGAL's projected buckets combine back at once (``StateFreeResidual.foreach_fold`` /
``foreach_fold_rest``, issue 15): the subspace part one ``addmm_`` per parameter, the state-free
``sign`` step of the residuals a batch of row blocks per multi-tensor kernel. Equality with the
per-parameter step: tests/test_foreach_projected.py (``frugal``, to float32 rounding); kernels:
tests/test_foreach_fold_engine.py. Here: what a step allocates stays within ``step_transient_bytes()``
with many parameters in one bucket (a batch holds at most 3 blocks of the smallest parameter's largest)."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.functional import frugal as FR
from tests.test_nonfinite_check_bytes import _AllLive


@pytest.mark.parametrize("chunk_numel", [None, 24576])
@pytest.mark.parametrize("rule", ["signsgd", "sgd"])
def test_fold_batches_stay_within_the_count(chunk_numel, rule, monkeypatch):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(256, 192)) for _ in range(12)]
    opt = create_optimizer([{"params": ps, "rank": 4, "update_proj_gap": 100, "free_rule": rule}], "frugal", lr=1e-2)
    opt.chunk_numel = chunk_numel
    batches = []
    orig = FR.state_free_step_foreach_

    def spy(params, residuals, r, alpha):
        batches.append(len(residuals))
        return orig(params, residuals, r, alpha)

    monkeypatch.setattr(FR, "state_free_step_foreach_", spy)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # (the refresh step)
    for p in ps:
        p.grad = torch.randn_like(p)
    batches.clear()
    with _AllLive() as m:
        opt.step()
    assert batches and max(batches) == 3 and sum(batches) == 12 * (1 if chunk_numel is None else 2), batches
    steady = opt._transient_bytes(steady=True)  # (a step without a refresh: its bound, not the SVD's)
    assert 0 < m.peak <= steady <= opt.step_transient_bytes(), (m.peak, steady)
