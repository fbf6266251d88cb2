"""gvpo_loss against values worked out by hand from the GVPO formula (and GVPOConfig checks).

r_i = beta (logp_i - ref_i); group loss = sum_i 0.5 ((r_i - mean r) - (R_i - mean R))^2 / (G - 1),
mean r constant; batch loss = mean over groups.
"""

import pytest
import torch

from lowmem.trainers.gvpo import gvpo_loss


def test_one_group_by_hand():
    # r = 0.5 * [0.5, 0, -0.5] = [0.25, 0, -0.25], mean 0; R - mean R = [0.5, -0.5, 0]
    # residuals r~ - R~ = [-0.25, 0.5, -0.25]; sum of squares 0.375; loss = 0.5 * 0.375 / 2
    logps = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    ref = torch.tensor([-1.5, -2.0, -2.5])
    rewards = torch.tensor([1.0, 0.0, 0.5])
    loss = gvpo_loss(logps, ref, rewards, 3, 0.5)
    assert loss.item() == pytest.approx(0.09375)
    loss.backward()
    # d/dlogp_i = beta * residual_i / (G - 1)
    torch.testing.assert_close(logps.grad, torch.tensor([-0.0625, 0.125, -0.0625]))


def test_batch_is_mean_of_groups_by_hand():
    # group 1: r = 0, R = 1 everywhere: loss 0
    # group 2: r = [1, -1, 0, 0] (mean 0), R = [0, 0, 0, 4] (mean 1), R~ = [-1, -1, -1, 3]
    # residuals [2, 0, 1, -3]; squares 14; loss 0.5 * 14 / 3 = 7/3; batch loss (0 + 7/3) / 2
    logps = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0])
    ref = torch.zeros(8)
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 4.0])
    loss = gvpo_loss(logps, ref, rewards, 4, 1.0)
    assert loss.item() == pytest.approx((0.0 + 7.0 / 3.0) / 2)


def test_mean_of_implicit_reward_is_constant():
    # r = beta * logp with r mean shifted: a common shift of logp changes nothing (centred), and the
    # gradient is beta * residual / (G - 1) (no -mean(residual) term from differentiating the mean).
    logps = torch.tensor([2.0, 0.0], requires_grad=True)
    rewards = torch.tensor([0.0, 1.0])
    loss = gvpo_loss(logps, torch.zeros(2), rewards, 2, 1.0)
    # r~ = [1, -1], R~ = [-0.5, 0.5], residuals [1.5, -1.5]; loss 0.5 * 4.5 / 1
    assert loss.item() == pytest.approx(2.25)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([1.5, -1.5]))


def test_on_policy_is_reward_variance_and_policy_gradient():
    # ref = detached policy: r = 0, loss = 0.5 * unbiased var(R); gradient = -beta (R_i - mean R) / (G - 1) / groups
    logps = torch.tensor([-3.0, -1.0, -2.0, -4.0, -1.0, -1.0, -2.0, -2.0], requires_grad=True)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    loss = gvpo_loss(logps, logps.detach(), rewards, 4, 0.2)
    # group 1: R~ = [0.75, -0.25, -0.25, -0.25], squares 0.75, 0.5 * 0.75 / 3 = 0.125; group 2: 0
    assert loss.item() == pytest.approx(0.0625)
    loss.backward()
    expected = torch.tensor([-0.75, 0.25, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0]) * 0.2 / 3 / 2
    torch.testing.assert_close(logps.grad, expected)


def test_degenerate_equal_rewards_on_policy_is_zero():
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    loss = gvpo_loss(logps, logps.detach(), torch.full((4,), 0.3), 4, 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logps.grad, torch.zeros(4))


def test_reference_gets_no_gradient():
    ref = torch.tensor([0.5, -0.5], requires_grad=True)
    logps = torch.tensor([0.0, 0.0], requires_grad=True)
    gvpo_loss(logps, ref, torch.tensor([0.0, 1.0]), 2, 1.0).backward()
    assert ref.grad is None and logps.grad is not None


@pytest.mark.parametrize(
    "shape, group_size, beta, match",
    [((4,), 1, 0.1, "group_size"), ((5,), 2, 0.1, "multiple"), ((4,), 2, 0.0, "beta"), ((4,), 2, float("nan"), "beta")],
)
def test_invalid_arguments(shape, group_size, beta, match):
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        gvpo_loss(x, x, x, group_size, beta)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="1-D"):
        gvpo_loss(torch.zeros(4), torch.zeros(4), torch.zeros(2, 2), 2, 0.1)


def test_config_requires_whole_groups(tmp_path):
    from lowmem.trainers.gvpo import GVPOConfig

    with pytest.raises(ValueError, match="multiple of num_generations"):
        GVPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, num_generations=4, report_to="none", bf16=False)
    with pytest.raises(ValueError, match="reference_policy"):
        GVPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, reference_policy="x", bf16=False)
    with pytest.raises(ValueError, match="beta > 0"):
        GVPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, beta=0.0, bf16=False)
