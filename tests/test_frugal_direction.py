"""FRUGAL's state-free direction (Zmushko et al. 2024, Algorithm 1, line 9) with its scale, and the launches of
its row blocks (issue 15): ``sign(G - P P^T G) * free_lr_scale`` without the product when the scale is 1, and
the residual's rows as one in-place subtraction, the same bits as before."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.functional import frugal as FR


@pytest.mark.parametrize("rule", ["signsgd", "sgd"])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_scaled_state_free_direction_is_the_direction_times_the_scale(rule, scale):
    """Bit for bit ``state_free_direction(r) * scale`` (zeros, a negative zero and infinities included), a
    new tensor (the residual untouched); with scale 1 one kernel (the sign or the copy), no product."""
    from lowmem.bench_launches import LaunchCounter

    r = torch.randn(64, 33, generator=torch.Generator().manual_seed(0))
    r[0, :3] = torch.tensor([0.0, -0.0, float("inf")])
    before = r.clone()
    d = FR.scaled_state_free_direction(r, rule, scale)
    ref = FR.state_free_direction(r, rule).mul(scale)
    assert torch.equal(d, ref) and torch.equal(d.signbit(), ref.signbit())
    assert torch.equal(r, before) and d.data_ptr() != r.data_ptr()
    x = torch.zeros(8, 8, device="meta")
    with LaunchCounter() as c:
        FR.scaled_state_free_direction(x, rule, scale)
    assert c.counts["kernels"] == (1 if scale == 1.0 else 2)


def test_frugal_rows_launch_one_kernel_for_the_residual():
    """The chunked combine-back's residual rows ``G - up(low)`` are one in-place subtraction (was a negation
    and an addition) and signSGD's direction at ``free_lr_scale`` 1 is not multiplied: 6 kernels per
    parameter and block of rows of ``frugal``'s step on meta (the two products up, the residual, the sign,
    their sum, the update; and per parameter its project-down)."""
    from lowmem.bench_launches import LaunchCounter

    def kernels(k, chunk):
        ps = [torch.nn.Parameter(torch.zeros(256, 512, device="meta")) for _ in range(k)]
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt = create_optimizer([{"params": ps, "rank": 16, "update_proj_gap": 100}], "frugal", lr=1e-3)
        opt.chunk_numel = chunk
        for _ in range(2):  # (the first step refreshes)
            with LaunchCounter() as c:
                opt.step()
        return c.counts["kernels"]

    # whole tensors: 7 (8 before: the product by 1); 2^16: two blocks of 128 rows, 6 each and the project-down
    # (17 before: the negation and the product by 1 per block)
    for chunk, most in ((None, 7), (2**16, 13)):
        assert (kernels(3, chunk) - kernels(1, chunk)) / 2 <= most, chunk
