"""Outside-in audit of GVPO (Zhang et al. 2025, arXiv:2504.19599) against the paper's objective, written here
from the paper, not from lowmem's code.

The paper's loss for a prompt x with k completions y_i (its MSE form, the authors' ``compute_policy_loss_gvpo``):

    L_x = 1/(k-1) * 1/2 * sum_i [ (R_theta(y_i) - mean_j R_theta(y_j)) - (R(y_i) - mean_j R(y_j)) ]^2,
    R_theta(y) = beta * (log pi_theta(y|x) - log pi_ref(y|x)),  log pi summed over the completion's tokens,

and its gradient (the paper's policy-gradient form)

    d L_x / d log pi_theta(y_i) = beta / (k-1) * [ (R_theta_i - mean R_theta) - (R_i - mean R) ],

the same whether or not ``mean R_theta`` is differentiated (the centred residuals of a group sum to zero).
lowmem's batch loss is the mean over groups (the authors sum; a constant factor for a fixed batch).

Checked here: ``gvpo_loss`` on random batches (several beta, k, group counts) against the MSE written with the mean
NOT detached and against the closed-form gradient; ``GVPOTrainer._compute_loss`` on a tiny model with
hand-built micro-batches (right padding, different lengths, a completion with no unmasked token) against the same
objective with log-probabilities recomputed here; gradient-accumulation invariance (one micro-batch of 4 groups
equals two of 2 groups, as the objective's mean over groups requires); k = 1 refused.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from lowmem.trainers.gvpo import gvpo_loss

sys.path.insert(0, str(Path(__file__).parent))


def paper_loss(logps, ref_logps, rewards, k, beta):
    """The paper's objective, mean over groups; the group mean of R_theta is differentiated (not detached)."""
    total = 0.0
    groups = logps.numel() // k
    for g in range(groups):
        sl = slice(g * k, (g + 1) * k)
        r_theta = beta * (logps[sl] - ref_logps[sl])
        centred = (r_theta - r_theta.mean()) - (rewards[sl] - rewards[sl].mean())
        total = total + 0.5 * (centred ** 2).sum() / (k - 1)
    return total / groups


def paper_gradient(logps, ref_logps, rewards, k, beta):
    """d loss / d log pi_theta(y_i) from the paper's gradient formula, divided by the number of groups (lowmem's mean)."""
    r_theta = (beta * (logps - ref_logps)).view(-1, k)
    rew = rewards.view(-1, k)
    weight = (r_theta - r_theta.mean(1, keepdim=True)) - (rew - rew.mean(1, keepdim=True))
    return (beta * weight / (k - 1) / r_theta.shape[0]).flatten()


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 3.0])
@pytest.mark.parametrize("k,groups", [(2, 1), (3, 4), (4, 2), (8, 3)])
def test_gvpo_loss_equals_the_papers_objective_on_random_batches(beta, k, groups):
    gen = torch.Generator().manual_seed(k * 100 + groups)
    n = k * groups
    logps = (-torch.rand(n, generator=gen, dtype=torch.float64) * 20).requires_grad_()
    ref = -torch.rand(n, generator=gen, dtype=torch.float64) * 20
    rewards = torch.randint(0, 3, (n,), generator=gen).double() + torch.randn(n, generator=gen, dtype=torch.float64)
    got = gvpo_loss(logps, ref, rewards, k, beta)
    (grad,) = torch.autograd.grad(got, logps)
    want = paper_loss(logps, ref, rewards, k, beta)
    (want_grad,) = torch.autograd.grad(want, logps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, paper_gradient(logps.detach(), ref, rewards, k, beta), rtol=1e-10, atol=1e-12)


def test_all_equal_rewards_off_policy_pull_towards_the_reference():
    # R constant: the loss is 1/2 * sum (centred R_theta)^2 / (k-1), zero only where the policy matches pi_ref up to a
    # per-group constant
    logps = torch.tensor([-1.0, -3.0, -2.0, -5.0, -5.0, -5.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-2.0, -2.0, -2.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    loss = gvpo_loss(logps, ref, torch.full((6,), 0.7, dtype=torch.float64), 3, 0.5)
    # group 1: R_theta = 0.5 * [1, -1, 0], centred the same, 1/2 * 0.5 / 2 = 0.125; group 2: a constant shift: 0
    assert loss.item() == pytest.approx((0.125 + 0.0) / 2)
    torch.testing.assert_close(loss, paper_loss(logps, ref, torch.full((6,), 0.7, dtype=torch.float64), 3, 0.5))


def test_one_completion_per_prompt_is_refused(tmp_path):
    from lowmem.trainers import GVPOConfig

    with pytest.raises(ValueError, match="group_size"):
        gvpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 1, 0.1)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        GVPOConfig(output_dir=str(tmp_path), num_generations=1, per_device_train_batch_size=4, report_to="none")


# ---------------------------------------------------------------------------------------------------------------
# The trainer's loss on hand-built micro-batches

K, PROMPT, COMPLETION = 4, 3, 5


@pytest.fixture(scope="module")
def gvpo_trainer(tmp_path_factory):
    from lowmem.kit import save_tiny_model
    from trl_helpers import make_trainer

    path = save_tiny_model(tmp_path_factory.mktemp("trlaudit-gvpo"), seed=0)
    trainer = make_trainer("gvpo", path, str(tmp_path_factory.mktemp("out")), 1, optim=None, beta=0.3, temperature=1.0,
                           per_device_train_batch_size=16, num_generations=K)
    trainer.model.train()
    return trainer


def _micro_batch(groups: int, seed: int, vocab: int, empty_row: int | None = None):
    """``groups`` groups of K completions: equal-length prompts, right-padded completions of lengths 1..COMPLETION
    (``empty_row``: no unmasked token at all), random rewards, a sampling reference off the current policy."""
    gen = torch.Generator().manual_seed(seed)
    n = groups * K
    lengths = torch.randint(1, COMPLETION + 1, (n,), generator=gen)
    if empty_row is not None:
        lengths[empty_row] = 0
    completion_mask = (torch.arange(COMPLETION)[None, :] < lengths[:, None]).long()
    return {
        "prompt_ids": torch.randint(3, vocab, (n, PROMPT), generator=gen),
        "prompt_mask": torch.ones(n, PROMPT, dtype=torch.long),
        "completion_ids": torch.randint(3, vocab, (n, COMPLETION), generator=gen),
        "completion_mask": completion_mask,
        "old_per_token_logps": -torch.rand(n, COMPLETION, generator=gen) * 6,  # pi_ref = the sampling policy
        "gvpo_rewards": torch.randint(0, 2, (n,), generator=gen).float() + 0.25 * torch.rand(n, generator=gen),
        "gvpo_group_ids": torch.arange(n) // K,
    }


def _completion_logps(model, batch):
    """Per-token log pi_theta of the completion tokens, recomputed here from the model's logits."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, PROMPT - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)


def _hand_loss(model, batch, beta):
    mask = batch["completion_mask"].float()
    logps = (_completion_logps(model, batch) * mask).sum(1)
    ref = (batch["old_per_token_logps"] * mask).sum(1)
    return paper_loss(logps, ref, batch["gvpo_rewards"], K, beta)


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("empty_row", [None, 5])
def test_trainer_loss_and_gradient_equal_the_papers_on_padded_groups(gvpo_trainer, empty_row):
    trainer = gvpo_trainer
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1
    batch = _micro_batch(2, seed=1, vocab=model.config.vocab_size, empty_row=empty_row)
    got = trainer._compute_loss(model, batch)
    want = _hand_loss(model, batch, 0.3)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6)
    g_got, g_want = _grads(model, got), _grads(model, _hand_loss(model, batch, 0.3))
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6 * g_want.abs().max().item())
    assert want.item() > 0.01  # a real, non-trivial objective (off-policy: R_theta != 0)


def test_a_completion_with_no_token_has_zero_implicit_reward_and_keeps_its_reward_in_the_group_mean(gvpo_trainer):
    # after truncation (mask_truncated_completions) a completion can have no unmasked token: log pi = log pi_ref = 0
    # (an empty sum), so R_theta = 0 there and no gradient reaches it; its reward stays in the group's mean R
    trainer = gvpo_trainer
    batch = _micro_batch(1, seed=2, vocab=trainer.model.config.vocab_size, empty_row=1)
    trainer.current_gradient_accumulation_steps = 1
    mask = batch["completion_mask"].float()
    with torch.no_grad():
        logps = (_completion_logps(trainer.model, batch) * mask).sum(1)
    ref = (batch["old_per_token_logps"] * mask).sum(1)
    assert logps[1].item() == 0.0 and ref[1].item() == 0.0
    got = trainer._compute_loss(trainer.model, batch)
    torch.testing.assert_close(got.detach(), gvpo_loss(logps, ref, batch["gvpo_rewards"], K, 0.3), rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_one_micro_batch_of_4_groups_equals_two_of_2(gvpo_trainer):
    trainer = gvpo_trainer
    model = trainer.model
    whole = _micro_batch(4, seed=3, vocab=model.config.vocab_size)
    trainer.current_gradient_accumulation_steps = 1
    one = trainer._compute_loss(model, whole)
    g_one = _grads(model, one)
    halves = [{key: value[i * 2 * K : (i + 1) * 2 * K] for key, value in whole.items()} for i in range(2)]
    trainer.current_gradient_accumulation_steps = 2
    losses = [trainer._compute_loss(model, h) for h in halves]
    g_two = sum(_grads(model, loss) for loss in losses)
    trainer.current_gradient_accumulation_steps = 1
    torch.testing.assert_close(sum(losses).detach(), one.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_two, g_one, rtol=1e-4, atol=1e-6 * g_one.abs().max().item())
    # and both are the paper's mean over the 4 groups
    torch.testing.assert_close(one.detach(), _hand_loss(model, whole, 0.3).detach(), rtol=1e-5, atol=1e-6)


def test_a_micro_batch_that_splits_a_group_is_refused(gvpo_trainer):
    trainer = gvpo_trainer
    batch = _micro_batch(2, seed=4, vocab=trainer.model.config.vocab_size)
    batch["gvpo_group_ids"] = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    with pytest.raises(RuntimeError, match="whole groups"):
        trainer._compute_loss(trainer.model, batch)


def test_rewards_are_the_weighted_sum_and_an_unscored_completion_gets_its_groups_mean(gvpo_trainer, monkeypatch):
    # R_i = sum_j w_j R_ij over the functions that scored it (TRL's nansum); a completion no function scored gets its
    # group's mean R (a zero centred reward); a group nobody scored gets 0 everywhere
    from trl import GRPOTrainer

    nan = math.nan
    per_func = torch.tensor([[1.0, 0.0], [0.0, nan], [nan, nan], [1.0, 1.0],
                             [nan, nan], [nan, nan], [nan, nan], [nan, nan]])

    def generated(self, inputs):
        self._gvpo_rewards_per_func = per_func
        return {"advantages": torch.zeros(len(inputs))}

    trainer = gvpo_trainer
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", generated)
    monkeypatch.setattr(trainer, "reward_weights", torch.tensor([2.0, 0.5]))
    monkeypatch.setattr(trainer, "reward_func_names", ["f", "g"])
    out = trainer._generate_and_score_completions([{}] * 8)
    torch.testing.assert_close(out["gvpo_rewards"], torch.tensor([2.0, 0.0, 1.5, 2.5, 0.0, 0.0, 0.0, 0.0]))
    assert out["gvpo_group_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
