"""bnpo_advantages against values worked out by hand from the BNPO formulas.

p = group mean of rewards rescaled to [0, 1]; m, v = mean and unbiased variance of the batch's p;
a = (m(1-m)/v - 1) m, b = (m(1-m)/v - 1)(1-m); alpha = max(1 + a/3, 1), beta = max(1 + b/3, 1);
A_i = min(1 / BetaPDF(p; alpha, beta), 1e6) (R_i - p); several functions: mean of their advantages.
"""

import math

import pytest
import torch

from lowmem.trainers.bnpo import beta_normalization_params, bnpo_advantages


def _beta_pdf(x, a, b):  # by hand, with math.gamma only
    return x ** (a - 1) * (1 - x) ** (b - 1) * math.gamma(a + b) / (math.gamma(a) * math.gamma(b))


def test_symmetric_batch_closed_form():
    # p = [0.25, 0.5, 0.75]: m = 0.5, v = 0.0625, m(1-m)/v = 4, a = b = 1.5, alpha = beta = 1.5
    # BetaPDF(x; 1.5, 1.5) = sqrt(x (1-x)) / B(1.5, 1.5) with B = pi/8
    rewards = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.float64)
    adv = bnpo_advantages(rewards, 4)
    w_quarter = math.pi / (2 * math.sqrt(3))  # 1 / (8/pi * sqrt(3)/4)
    w_half = math.pi / 4
    expected = [w_quarter * (r - 0.25) for r in (1, 0, 0, 0)]
    expected += [w_half * (r - 0.5) for r in (1, 1, 0, 0)]
    expected += [w_quarter * (r - 0.75) for r in (1, 1, 1, 0)]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    assert beta_normalization_params(torch.tensor([0.25, 0.5, 0.75])) == pytest.approx((1.5, 1.5))


def test_asymmetric_batch():
    # p = [0.5, 1.0]: m = 0.75, v = 0.125, m(1-m)/v - 1 = 0.5, a = 0.375, b = 0.125
    # alpha = 1.125, beta = 1 + 0.125/3; group 2 has R = p: zero advantage
    alpha, beta = 1.125, 1 + 0.125 / 3
    w = 1 / _beta_pdf(0.5, alpha, beta)
    adv = bnpo_advantages(torch.tensor([0.0, 1.0, 1.0, 1.0]), 2)
    torch.testing.assert_close(adv, torch.tensor([-0.5 * w, 0.5 * w, 0.0, 0.0]))
    assert beta_normalization_params(torch.tensor([0.5, 1.0])) == pytest.approx((alpha, beta))


def test_fitted_parameters_below_one_are_clamped():
    # p = [0, 0.5, 1]: m = 0.5, v = 0.25, m(1-m)/v - 1 = 0 -> a = b = 0 -> alpha = beta = 1 (uniform, w = 1)
    # p = [0, 1]: v = 0.5, m(1-m)/v - 1 = -0.5 -> a, b < 0 -> clamped to 1
    assert beta_normalization_params(torch.tensor([0.0, 0.5, 1.0])) == (1.0, 1.0)
    assert beta_normalization_params(torch.tensor([0.0, 1.0])) == (1.0, 1.0)
    adv = bnpo_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 2)
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -0.5, 0.5, 0.0, 0.0]))


def test_weight_cap_and_zero_density_give_no_nan():
    # p = [0, 0.25, 0.25, 0.5]: alpha > 1 so BetaPDF(0) = 0 -> w = 1e6, but R - p = 0 there
    rewards = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0], dtype=torch.float32)
    m, v = 0.25, (0.0625 + 0 + 0 + 0.0625) / 3
    c = m * (1 - m) / v - 1
    alpha, beta = max(1 + c * m / 3, 1), max(1 + c * (1 - m) / 3, 1)
    assert alpha > 1
    adv = bnpo_advantages(rewards, 4)
    assert torch.isfinite(adv).all() and torch.equal(adv[:4], torch.zeros(4))
    w = 1 / _beta_pdf(0.25, alpha, beta)
    torch.testing.assert_close(adv[4:8], torch.tensor([0.75 * w, -0.25 * w, -0.25 * w, -0.25 * w]))


def test_degenerate_one_prompt_and_zero_variance():
    # one prompt: no variance -> uniform Beta, A = R - p
    torch.testing.assert_close(bnpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # every prompt at p = 0.5: zero variance -> A = R - p
    adv = bnpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # all rewards equal (0 and 1 too): zeros, not NaN
    for value in (0.0, 1.0, 0.3):
        assert torch.equal(bnpo_advantages(torch.full((8,), value), 4), torch.zeros(8))


def test_reward_range_rescales():
    # rewards in [-1, 1] -> (R + 1) / 2: same as the symmetric case
    raw = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.float64)
    torch.testing.assert_close(bnpo_advantages(2 * raw - 1, 4, (-1.0, 1.0)), bnpo_advantages(raw, 4))


def test_two_reward_functions_mean_of_advantages():
    # function 1: p = [0.5, 1.0] (asymmetric case); function 2 in [0, 2]: rescaled p = [0.25, 0.75]
    # function 2: m = 0.5, v = 0.125, m(1-m)/v - 1 = 1, a = b = 0.5, alpha = beta = 1 + 1/6
    f1 = torch.tensor([0.0, 1.0, 1.0, 1.0])
    f2 = torch.tensor([0.0, 1.0, 2.0, 1.0])
    adv = bnpo_advantages(torch.stack([f1, f2], dim=1), 2, [(0.0, 1.0), (0.0, 2.0)])
    w1 = 1 / _beta_pdf(0.5, 1.125, 1 + 0.125 / 3)
    a2 = 1 + 1 / 6
    w2_q, w2_tq = 1 / _beta_pdf(0.25, a2, a2), 1 / _beta_pdf(0.75, a2, a2)
    per_func_1 = [-0.5 * w1, 0.5 * w1, 0.0, 0.0]
    per_func_2 = [-0.25 * w2_q, 0.25 * w2_q, 0.25 * w2_tq, -0.25 * w2_tq]
    torch.testing.assert_close(adv, torch.tensor([(x + y) / 2 for x, y in zip(per_func_1, per_func_2)]))


def test_missing_rewards_are_left_out():
    # function 2 gives no reward (NaN) to the second prompt: its advantage there is function 1's alone
    f1 = torch.tensor([0.0, 1.0, 1.0, 1.0])
    f2 = torch.tensor([1.0, 0.0, float("nan"), float("nan")])
    adv = bnpo_advantages(torch.stack([f1, f2], dim=1), 2)
    w1 = 1 / _beta_pdf(0.5, 1.125, 1 + 0.125 / 3)
    # function 2 scores one prompt: degenerate -> A = R - p = [0.5, -0.5]
    torch.testing.assert_close(adv, torch.tensor([(-0.5 * w1 + 0.5) / 2, (0.5 * w1 - 0.5) / 2, 0.0, 0.0]))
    assert torch.equal(bnpo_advantages(torch.full((4, 1), float("nan")), 2), torch.zeros(4))


def test_invalid_inputs():
    with pytest.raises(ValueError, match="multiple of group_size"):
        bnpo_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="outside reward_range"):
        bnpo_advantages(torch.tensor([0.0, 2.0]), 2)
    with pytest.raises(ValueError, match="reward_range"):
        bnpo_advantages(torch.zeros(4), 2, (1.0, 0.0))
    with pytest.raises(ValueError, match="one pair per reward function"):
        bnpo_advantages(torch.zeros(4, 3), 2, [(0, 1), (0, 1)])
    with pytest.raises(ValueError, match="group_size"):
        bnpo_advantages(torch.zeros(4), 0)
