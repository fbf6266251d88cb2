"""AUDITSR: pure-bfloat16 BAdam (``master_weights=False``) with ``bf16_stochastic_round`` / ``kahan_summation``.

BAdam frees a block's state at each switch, its step count included, so a re-activated parameter counts from
``t = 1`` again: the rounding's stream (``stream_seed(position, t)``) repeats the bits of its earlier activations
(FOUND_AUDITSR 3), and Kahan's compensation is dropped with the state (FOUND_AUDITSR 4)."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.optim import create_optimizer

LR, STEPS = 2.5e-4, 32


def _badam(dtype, switch_every, steps=STEPS, lr=LR, **kw):
    a = torch.nn.Parameter(torch.full((64, 64), 0.25, dtype=dtype))
    b = torch.nn.Parameter(torch.full((64, 64), 0.25, dtype=dtype))
    opt = create_optimizer([a, b], "badam", lr=lr, master_weights=False, switch_every=switch_every,
                           freeze_inactive=False, weight_decay=0.0, switch_mode="ascending", **kw)
    for _ in range(steps):
        a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        opt.step()
    return opt, a


def test_badam_reactivated_parameters_draw_new_bits():
    """Each step moves a weight of 0.25 down by 2.5e-4, a quarter of the ulp below (2^-10). With independent bits
    each element's move is Binomial(n, p) ulps (mean and spread ``sqrt(n p (1 - p))``); with the bits of ``t = 1``
    drawn at every activation each element moves always or never (measured: 2 distinct moves, 0 and 32 ulps; spread
    13.6 ulps against 2.4 for independent bits). The mean is right either way (unbiased over the elements)."""
    _, a = _badam(torch.float32, 1)
    exact = (0.25 - a.detach().double()).mean().item()
    _, a = _badam(torch.bfloat16, 1, bf16_stochastic_round=True)
    moves = (0.25 - a.detach().double()) / 2.0**-10
    n, p = exact / LR, LR / 2.0**-10
    spread = math.sqrt(n * p * (1 - p))
    assert abs(moves.mean().item() * 2.0**-10 - exact) < 0.1 * exact  # (holds: the mean is unbiased)
    assert moves.std().item() < 2 * spread, (moves.std().item(), spread, torch.unique(moves).tolist()[:4])


@pytest.mark.parametrize("switch_every", [2, 5])
def test_badam_refuses_the_kahan_compensation(switch_every):
    """FOUND_AUDITSR 4: BAdam freed ``kahan_comp`` at each block switch (switch_every=2: Kahan was round-to-nearest,
    5: twice the float32 movement), so the combination is refused naming both settings (BF16FIX af50e96; keeping
    every block's compensation would cost 2 B per parameter of the whole model), pointing to stochastic rounding."""
    with pytest.raises(ValueError, match="kahan_summation=True and BAdam conflict"):
        _badam(torch.bfloat16, switch_every, steps=1, lr=1e-4, kahan_summation=True)
