"""Outside-in audit of BNPO (Xiao et al. 2025, arXiv:2506.02864) against the paper, written here in plain Python
(``math.lgamma``; not lowmem's functions):

* rewards mapped to [0, 1] by the affine map of their bounds (the paper's extension beyond binary rewards);
* ``p`` = a prompt's success rate, the mean of its group's mapped rewards;
* the Beta(a, b) of the batch's ``p`` by the method of moments: ``m`` mean, ``v`` unbiased variance,
  ``a = m (m(1-m)/v - 1)``, ``b = (1-m)(m(1-m)/v - 1)``;
* the variance-minimising normalizing parameters (the paper's Theorem): ``alpha = 1 + a/3``, ``beta = 1 + b/3``,
  clamped below at 1 (the authors' code);
* ``A_i = (R_i - p) / BetaPDF(p; alpha, beta)``, the weight capped at 1e6;
* several reward functions: one advantage per function, each with its own Beta, then their mean (advantage
  decomposition); a missing reward (``None`` / NaN) is left out of its ``p`` and of the mean.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from lowmem.trainers.bnpo import bnpo_advantages


def paper_params(ps):
    n = len(ps)
    if n < 2:
        return 1.0, 1.0
    m = sum(ps) / n
    v = sum((p - m) ** 2 for p in ps) / (n - 1)
    if v == 0:
        return 1.0, 1.0  # lowmem's documented uniform fallback (the formula divides by v)
    c = m * (1 - m) / v - 1
    return max(1 + m * c / 3, 1.0), max(1 + (1 - m) * c / 3, 1.0)


def paper_weight(p, alpha, beta):
    log_b = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    if (p == 0 and alpha > 1) or (p == 1 and beta > 1):
        return 1e6  # density 0: the cap
    log_pdf = (alpha - 1) * (math.log(p) if alpha != 1 else 0.0) + (beta - 1) * (math.log1p(-p) if beta != 1 else 0.0)
    return min(math.exp(log_b - log_pdf), 1e6)


def paper_advantages(rewards, k, ranges):
    """rewards: list of rows, one value (or None) per reward function."""
    n, funcs = len(rewards), len(ranges)
    per_func = [[None] * n for _ in range(funcs)]
    for j, (low, high) in enumerate(ranges):
        scaled = [None if r[j] is None else (r[j] - low) / (high - low) for r in rewards]
        group_p = []
        for g in range(n // k):
            given = [s for s in scaled[g * k : (g + 1) * k] if s is not None]
            group_p.append(sum(given) / len(given) if given else None)
        alpha, beta = paper_params([p for p in group_p if p is not None])
        for i, s in enumerate(scaled):
            p = group_p[i // k]
            if s is not None:
                per_func[j][i] = paper_weight(p, alpha, beta) * (s - p)
    out = []
    for i in range(n):
        given = [per_func[j][i] for j in range(funcs) if per_func[j][i] is not None]
        out.append(sum(given) / len(given) if given else 0.0)
    return out


def _as_tensor(rows):
    return torch.tensor([[math.nan if x is None else x for x in r] for r in rows], dtype=torch.float64)


@pytest.mark.parametrize("k,prompts", [(2, 3), (4, 5), (8, 4), (16, 2), (4, 16)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_rewards_one_function(k, prompts, seed):
    rng = random.Random(seed * 1000 + k * prompts)
    rates = [rng.random() for _ in range(prompts)]
    rows = [[float(rng.random() < rates[i // k])] for i in range(k * prompts)]
    got = bnpo_advantages(_as_tensor(rows), k)
    torch.testing.assert_close(got, torch.tensor(paper_advantages(rows, k, [(0.0, 1.0)]), dtype=torch.float64),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_several_functions_non_binary_ranges_and_missing_rewards(seed):
    # function 0: binary; function 1: continuous in [-1, 2]; function 2: in {0, 0.5, 1} with some None
    rng = random.Random(seed)
    k, prompts = 4, 6
    rows = []
    for i in range(k * prompts):
        rows.append([float(rng.random() < 0.4 + 0.1 * (i // k % 3)), rng.uniform(-1.0, 2.0),
                     None if rng.random() < 0.25 else rng.choice([0.0, 0.5, 1.0])])
    ranges = [(0.0, 1.0), (-1.0, 2.0), (0.0, 1.0)]
    got = bnpo_advantages(_as_tensor(rows), k, ranges)
    torch.testing.assert_close(got, torch.tensor(paper_advantages(rows, k, ranges), dtype=torch.float64),
                               rtol=1e-9, atol=1e-9)


def test_decomposition_is_not_the_advantage_of_the_summed_reward():
    # the mean of per-function advantages (each with its own Beta) differs from BNPO on R_1 + R_2 mapped to [0, 1]
    rows = [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    got = bnpo_advantages(_as_tensor(rows), 2)
    summed = bnpo_advantages(torch.tensor([sum(r) for r in rows], dtype=torch.float64), 2, (0.0, 2.0))
    torch.testing.assert_close(got, torch.tensor(paper_advantages(rows, 2, [(0.0, 1.0)] * 2), dtype=torch.float64))
    assert not torch.allclose(got, summed)


def test_the_paper_s_parameters_on_a_known_batch():
    # p = [0.2, 0.4, 0.4, 0.6, 0.8] (5 prompts x 5 completions): m = 0.48, v = 0.052,
    # m(1-m)/v - 1 = 0.2496/0.052 - 1 = 3.8; a = 1.824, b = 1.976; alpha = 1.608, beta = 1.658(6)
    successes = [1, 2, 2, 3, 4]
    rows = [[float(j < s)] for s in successes for j in range(5)]
    alpha, beta = paper_params([s / 5 for s in successes])
    assert alpha == pytest.approx(1.608) and beta == pytest.approx(1 + 1.976 / 3)
    torch.testing.assert_close(bnpo_advantages(_as_tensor(rows), 5),
                               torch.tensor(paper_advantages(rows, 5, [(0.0, 1.0)]), dtype=torch.float64))


def test_float32_rewards_as_trl_gives_them():
    # TRL's rewards_per_func is float32: the advantages come back float32, equal to the float64 computation
    rng = random.Random(7)
    rows = [[float(rng.random() < 0.5), rng.random()] for _ in range(16)]
    got = bnpo_advantages(_as_tensor(rows).float(), 4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(paper_advantages(
        [[float(torch.tensor(x, dtype=torch.float32)) for x in r] for r in rows], 4, [(0.0, 1.0)] * 2),
        dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_a_bimodal_batch_clamps_the_parameters_at_one():
    # p = [0, 0, 1, 1, 0.25]: m = 0.45, v = 0.2625 > m(1-m) = 0.2475, so a, b < 0 and 1 + a/3, 1 + b/3 < 1:
    # clamped to the uniform Beta(1, 1), A = R - p
    successes = [0, 0, 4, 4, 1]
    rows = [[float(j < s)] for s in successes for j in range(4)]
    assert paper_params([s / 4 for s in successes]) == (1.0, 1.0)
    got = bnpo_advantages(_as_tensor(rows), 4)
    torch.testing.assert_close(got, torch.tensor(paper_advantages(rows, 4, [(0.0, 1.0)]), dtype=torch.float64))
    torch.testing.assert_close(got[16:], torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64))


def test_the_trainer_hands_trl_the_papers_advantages_and_logs_its_parameters(tmp_path, monkeypatch):
    # BNPOTrainer._generate_and_score_completions over TRL's (stubbed: it scored two functions and logged its own
    # advantages): the advantages TRL's loss gets, the logged advantages and bnpo/alpha, bnpo/beta are the paper's
    import sys
    from pathlib import Path

    from trl import GRPOTrainer

    sys.path.insert(0, str(Path(__file__).parent))
    from lowmem.kit import save_tiny_model
    from trl_helpers import make_trainer

    trainer = make_trainer("bnpo", save_tiny_model(tmp_path / "m", seed=0), str(tmp_path / "o"), 1, optim=None,
                           per_device_train_batch_size=16)
    trainer.model.train()
    rng = random.Random(3)
    rows = [[float(rng.random() < 0.3 + 0.15 * (i // 4)), rng.uniform(-1.0, 2.0)] for i in range(16)]

    def generated(self, inputs):
        self._bnpo_rewards_per_func = _as_tensor(rows).float()
        self._logs["advantages"].extend([123.0] * len(inputs))  # TRL's own, to be replaced
        return {"advantages": torch.zeros(len(inputs))}

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", generated)
    monkeypatch.setattr(trainer, "reward_func_names", ["acc", "score"])
    monkeypatch.setattr(trainer.args, "reward_range", [[0.0, 1.0], [-1.0, 2.0]])
    out = trainer._generate_and_score_completions([{}] * 16)
    float_rows = [[float(torch.tensor(x, dtype=torch.float32)) for x in r] for r in rows]
    want = torch.tensor(paper_advantages(float_rows, 4, [(0.0, 1.0), (-1.0, 2.0)]))
    torch.testing.assert_close(out["advantages"], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(list(trainer._logs["advantages"])), want, rtol=1e-6, atol=1e-6)
    params = [paper_params([sum((r[j] - lo) / (hi - lo) for r in float_rows[g * 4 : g * 4 + 4]) / 4 for g in range(4)])
              for j, (lo, hi) in enumerate([(0.0, 1.0), (-1.0, 2.0)])]
    assert trainer._metrics["train"]["bnpo/alpha"][-1] == pytest.approx(sum(a for a, _ in params) / 2, rel=1e-6)
    assert trainer._metrics["train"]["bnpo/beta"][-1] == pytest.approx(sum(b for _, b in params) / 2, rel=1e-6)


@pytest.mark.parametrize("weights, says", [
    ([-1.0], "a weight <= 0 would be ignored"), ([0.0, 0.0], "(all weights are 0|a weight <= 0 would be ignored)"),  # (either refusal: GRPO's all-zero check or BNPO's)
    ([-2.0, -2.0], "return its negation"), ([1.0, 2.0], "equal weight; got reward_weights=\\[1.0, 2.0\\]"),
])
def test_reward_weights_bnpo_would_ignore_are_refused(weights, says, tmp_path):
    # bnpo_advantages never sees the weights (each function is mapped to [0, 1] by reward_range): a negative common
    # weight (meant to minimize a cost) was accepted and the function maximized; 0 (meant to switch it off) trained
    from lowmem.trainers import BNPOConfig, BNPOTrainer

    common = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, bf16=False, report_to="none")
    with pytest.raises(ValueError, match=f"BNPOConfig.reward_weights=.*{says}"):
        BNPOConfig(**common, reward_weights=weights)
    args = BNPOConfig(**common)
    args.reward_weights = weights  # set after the config's own check: the trainer refuses it before loading the model
    funcs = [lambda prompts, completions, **kw: [0.0] * len(completions)] * len(weights)
    with pytest.raises(ValueError, match=says):
        BNPOTrainer(model=str(tmp_path / "no-such-model"), reward_funcs=funcs, args=args)
    BNPOConfig(**common, reward_weights=[0.5] * len(weights))  # equal and positive: fine (the value changes nothing)
