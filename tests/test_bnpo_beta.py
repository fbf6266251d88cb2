"""BNPO's Beta weight comes from torch.distributions.Beta; it equals the hand-written log-space formula it replaced."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.trainers.bnpo import MAX_WEIGHT, beta_weight


def _previous_beta_weight(p: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The closed form used before: min(1 / (p^(a-1) (1-p)^(b-1) / B(a, b)), 1e6) in log space."""
    p = p.double()
    log_b = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    log_pdf = torch.xlogy(torch.tensor(alpha - 1.0, dtype=p.dtype), p) + torch.special.xlog1py(
        torch.tensor(beta - 1.0, dtype=p.dtype), -p) - log_b
    return torch.exp(-log_pdf).clamp(max=MAX_WEIGHT)


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (1.0, 2.5), (2.5, 1.0), (1.7, 3.2), (40.0, 1.0), (12.0, 9.0)])
def test_beta_weight_equals_the_previous_formula(alpha, beta):
    p = torch.cat([torch.tensor([0.0, 1.0, 1e-9, 1 - 1e-9]), torch.linspace(0, 1, 101)])
    got, want = beta_weight(p, alpha, beta), _previous_beta_weight(p, alpha, beta)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert torch.isfinite(got).all() and (got <= MAX_WEIGHT).all()


def test_beta_weight_edges():
    # uniform Beta: weight 1 everywhere, also at the ends (0^0 = 1)
    assert torch.equal(beta_weight(torch.tensor([0.0, 0.5, 1.0]), 1.0, 1.0), torch.ones(3, dtype=torch.float64))
    # zero density at p = 0 with alpha > 1: the cap
    assert beta_weight(torch.tensor([0.0]), 2.0, 1.0).item() == MAX_WEIGHT
    # Beta(2, 2) at 0.5: pdf 1.5
    assert beta_weight(torch.tensor([0.5]), 2.0, 2.0).item() == pytest.approx(1 / 1.5, rel=1e-12)
