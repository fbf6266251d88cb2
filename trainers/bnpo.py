"""BNPO: Beta Normalization Policy Optimization (Xiao et al., 2025, arXiv:2506.02864).

For binary or bounded rewards, BNPO replaces GRPO's per-group standard-deviation scaling by a
weight that depends on the prompt's success rate ``p`` through a Beta distribution fitted to the
batch, recomputed every batch:

* rewards are rescaled to ``[0, 1]``; ``p`` is the mean reward of a prompt's group;
* the batch's ``p`` values are fitted by moments: ``m`` their mean, ``v`` their unbiased sample
  variance, ``a = (m(1-m)/v - 1) m``, ``b = (m(1-m)/v - 1)(1-m)``;
* the normalizing Beta has ``alpha = max(1 + a/3, 1)``, ``beta = max(1 + b/3, 1)``;
* advantage ``A_i = w(p) (R_i - p)`` with ``w(p) = min(1 / BetaPDF(p; alpha, beta), 1e6)``;
* with several reward functions, one BNPO advantage per function, then their mean (the paper's
  advantage decomposition).

This is *not* TRL's ``loss_type="bnpo"``, which only changes how token losses are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .trl import ConfigFieldError, FieldKey, LowMemGRPOConfig, LowMemGRPOTrainer, bare_key, config_key, \
    refuse_unused_grpo_fields

MAX_WEIGHT = 1e6  # w(p) = min(1 / BetaPDF(p), MAX_WEIGHT)
_RANGE_TOLERANCE = 1e-6


def beta_normalization_params(p: torch.Tensor) -> tuple[float, float]:
    """``(alpha, beta)`` of BNPO's normalizing Beta distribution for success rates ``p``.

    Method of moments on ``p`` (``m`` mean, ``v`` unbiased sample variance):
    ``a = (m(1-m)/v - 1) m``, ``b = (m(1-m)/v - 1)(1-m)``, then ``alpha = max(1 + a/3, 1)``,
    ``beta = max(1 + b/3, 1)`` (BNPO, Sec. 4: normalizing parameters from the fitted ones).

    Degenerate batches: with fewer than two values, or zero variance (every prompt has the same
    success rate), there is no spread to fit and the result is ``(1.0, 1.0)``: the uniform
    distribution, ``w(p) = 1``, so advantages are the plain ``R_i - p``. (The zero-variance limit of
    the formula would put an infinitely narrow Beta on ``m`` and erase every advantage.)

    Args:
        p (`torch.Tensor`): 1-D success rates in ``[0, 1]`` (NaN-free).
    """
    p = p.detach().double().flatten()
    if p.numel() < 2:
        return 1.0, 1.0
    m = p.mean().item()
    v = p.var(unbiased=True).item()
    if not v > 0.0 or not math.isfinite(v):
        return 1.0, 1.0
    common = m * (1.0 - m) / v - 1.0
    a, b = common * m, common * (1.0 - m)
    return max(1.0 + a / 3.0, 1.0), max(1.0 + b / 3.0, 1.0)


def beta_weight(p: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``w(p) = min(1 / BetaPDF(p; alpha, beta), 1e6)`` (BNPO, Eq. 9), in float64.

    The density is ``torch.distributions.Beta(alpha, beta).log_prob(p)`` (its Dirichlet form uses
    ``xlogy``, so with ``alpha = 1`` the factor ``p^0`` is 1 at ``p = 0``); a density of 0 (``p = 0``
    with ``alpha > 1``) gives the cap ``1e6``.
    """
    p = p.double()
    dist = torch.distributions.Beta(torch.tensor(float(alpha), dtype=p.dtype, device=p.device),
                                    torch.tensor(float(beta), dtype=p.dtype, device=p.device))
    return torch.exp(-dist.log_prob(p)).clamp(max=MAX_WEIGHT)


def _ranges(reward_range: Any, num_funcs: int, key: FieldKey = bare_key) -> list[tuple[float, float]]:
    """``reward_range`` as one ``(low, high)`` per reward function (``num_funcs``), checked; its errors name the field
    with ``key`` (:class:`~lowmem.trainers.trl.ConfigFieldError`: ``lowmem train`` names the recipe's key)."""
    if isinstance(reward_range, Sequence) and len(reward_range) == 2 and all(isinstance(x, (int, float)) for x in reward_range):
        ranges = [tuple(map(float, reward_range))] * num_funcs
    elif isinstance(reward_range, Sequence) and len(reward_range) == num_funcs and all(
        isinstance(r, Sequence) and len(r) == 2 for r in reward_range
    ):
        ranges = [tuple(map(float, r)) for r in reward_range]
    else:
        raise ConfigFieldError(lambda k: (f"{k('reward_range')} must be a pair (low, high) or one pair per reward "
                                          f"function ({num_funcs}); got {reward_range!r}"), key)
    for low, high in ranges:
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigFieldError(lambda k: f"invalid {k('reward_range')} {(low, high)!r}: expected finite low < high",
                                   key)
    return ranges


def bnpo_advantages(rewards: torch.Tensor, group_size: int, reward_range: Any = (0.0, 1.0),
                    reward_names: Sequence[str] | None = None) -> torch.Tensor:
    """BNPO advantages (BNPO, Eq. 9 with the Beta of Sec. 4; Sec. 5 advantage decomposition).

    Args:
        rewards (`torch.Tensor`):
            ``(N,)`` rewards of one reward function, or ``(N, K)`` for ``K`` reward functions.
            ``N`` is a multiple of ``group_size``; each group (the completions of one prompt) is
            contiguous. NaN marks a reward a function did not give (TRL's ``None``): it is left out
            of that group's ``p`` and of the mean over functions.
        group_size (`int`):
            Completions per prompt (TRL's ``num_generations``), ``>= 1``.
        reward_range (`tuple[float, float]` or a sequence of them, defaults to `(0.0, 1.0)`):
            Bounds ``(low, high)`` of the rewards, used to rescale them to ``[0, 1]``; one pair for
            every function, or one pair per function. A reward outside its range raises.
        reward_names (`Sequence[str]` or `None`, defaults to `None`):
            The reward functions' names, only to name the function in that error.

    Returns:
        `torch.Tensor`: ``(N,)`` advantages ``A_i = mean_k w_k(p_k) (R_ik - p_k)`` in the dtype of
        ``rewards`` (float32 for integer input); 0 where no function gave a reward.

    Each function's Beta is fitted (:func:`beta_normalization_params`) to the ``p`` values of the
    prompts it scored, every call. Degenerate batches (one prompt, or every ``p`` equal) use the
    uniform Beta: ``A_i = R_i - p``; all-equal rewards give zeros, never NaN.

    Raises:
        ValueError: Wrong shape, ``N`` not a multiple of ``group_size``, invalid ``reward_range``,
            or a reward outside it.
    """
    rewards = torch.as_tensor(rewards)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if rewards.dim() == 1:
        rewards = rewards.unsqueeze(1)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (N,) or (N, num_reward_functions); got {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1; got {group_size!r}")
    n, k = rewards.shape
    if n == 0 or n % group_size:
        raise ValueError(f"the number of rewards ({n}) must be a positive multiple of group_size ({group_size})")
    ranges = _ranges(reward_range, k)
    low = torch.tensor([r[0] for r in ranges], dtype=torch.float64, device=rewards.device)
    high = torch.tensor([r[1] for r in ranges], dtype=torch.float64, device=rewards.device)
    scaled = (rewards.double() - low) / (high - low)
    outside = ~torch.isnan(scaled) & ((scaled < -_RANGE_TOLERANCE) | (scaled > 1 + _RANGE_TOLERANCE))
    if outside.any():
        row, col = outside.nonzero()[0].tolist()
        func = f"{reward_names[col]!r} = reward_funcs[{col}]" if reward_names is not None else str(col)
        raise ValueError(
            f"reward {rewards[row, col].item()!r} (row {row}, reward function {func}) is outside reward_range "
            f"{list(ranges[col])}: BNPO rescales each function's rewards to [0, 1] with reward_range, so set it to "
            "bounds that hold every reward the function can return ([low, high] for every function, or one "
            "[low, high] per function in reward_funcs' order)"
        )
    scaled = scaled.clamp(0.0, 1.0)  # NaN stays NaN
    p = torch.nanmean(scaled.view(-1, group_size, k), dim=1)  # (prompts, K); NaN where a function scored nothing
    per_func = torch.full_like(scaled, float("nan"))
    for j in range(k):
        scored = ~torch.isnan(p[:, j])
        if not scored.any():
            continue
        alpha, beta = beta_normalization_params(p[scored, j])
        weight = beta_weight(torch.nan_to_num(p[:, j]), alpha, beta)
        per_func[:, j] = weight.repeat_interleave(group_size) * (scaled[:, j] - p[:, j].repeat_interleave(group_size))
    given = ~torch.isnan(per_func)
    total = torch.nan_to_num(per_func).sum(dim=1)
    advantages = torch.where(given.any(dim=1), total / given.sum(dim=1).clamp(min=1), torch.zeros_like(total))
    return advantages.to(out_dtype)


@dataclass
class BNPOConfig(LowMemGRPOConfig):
    """Configuration of :class:`BNPOTrainer`: TRL's ``GRPOConfig`` with lowmem's optimizer fields
    (``lowmem_optim``, ``lowmem_optim_args``, see :class:`~lowmem.trainers.LowMemGRPOConfig`) and:

    Parameters:
        reward_range (`list[float]` or `list[list[float]]`, *optional*, defaults to `[0.0, 1.0]`):
            Bounds ``[low, high]`` of the rewards, one pair for every reward function or one pair
            per function; rewards are rescaled to ``[0, 1]`` with them before the Beta fit. A reward
            outside its range stops training with an error naming it.

    BNPO replaces only the advantages: ``scale_rewards`` and ``multi_objective_aggregation`` are
    not used (a value other than TRL's default raises ``ValueError``), ``num_generations`` must be at
    least 2 (``p`` is the mean over a prompt's completions), and ``reward_weights`` must be equal and ``> 0``
    (the decomposition is a plain mean over reward functions). The policy loss is TRL's clipped surrogate of ``loss_type`` (default ``"dapo"``:
    token losses summed over the batch and divided by its token count) with the BNPO advantages;
    ``beta`` stays TRL's KL coefficient (default 0: no reference model).
    """

    reward_range: list = field(
        default_factory=lambda: [0.0, 1.0],
        metadata={"help": "Reward bounds [low, high] (or one pair per reward function), rescaled to [0, 1] for BNPO."},
    )

    def __post_init__(self) -> None:
        if self.num_generations is not None and self.num_generations < 2:  # TRL's own check does not name the field
            raise ConfigFieldError(lambda key: (
                "BNPO needs num_generations >= 2 completions per prompt (p, the baseline, is their mean reward: one "
                f"completion would have A = R - p = 0); got {key('num_generations')}={self.num_generations}"), bare_key)
        super().__post_init__()
        refuse_unused_grpo_fields(self, ("scale_rewards", "multi_objective_aggregation"), "BNPO",
                                  "its advantages are the Beta-normalized ones (BNPO Eq. 9), one per reward function "
                                  "and their mean")
        if isinstance(self.reward_range, tuple):
            self.reward_range = list(self.reward_range)
        value = self.reward_range
        if not (_is_pair(value) or (isinstance(value, list) and value and all(_is_pair(r) for r in value))):
            # before: a string ('0,1') was read as a list of 3 "pairs" ("one pair per reward function (3)")
            raise ConfigFieldError(lambda key: f"{key('reward_range')}={value!r}: expected a pair [low, high] of numbers, "
                                   "or a list of such pairs, one per reward function", config_key(self))
        _ranges(value, 1 if _is_pair(value) else len(value))
        if self.reward_weights is not None:  # also in BNPOTrainer
            check_reward_weights(self.reward_weights, config_key(self))


def check_reward_weights(weights: Sequence[float], key: FieldKey = config_key("BNPOConfig")) -> None:
    """Refuse ``reward_weights`` that BNPO would ignore: unequal ones (the advantage decomposition is a plain mean over
    reward functions), and equal ones that are not ``> 0``. BNPO maps each function's rewards to ``[0, 1]`` with
    ``reward_range``, so a common weight changes nothing; a negative one (meant to minimize a cost) would silently be
    maximized, and ``0`` (meant to switch rewards off) would still train.

    Raises:
        ConfigFieldError: ``BNPOConfig.reward_weights=[...]`` (``key``'s naming), what BNPO does with them and the fix.
    """
    values = [float(w) for w in weights]
    if len(set(values)) > 1:
        raise ConfigFieldError(lambda k: (
            f"{k('reward_weights')}={values}: BNPO averages one advantage per reward function with equal weight; got "
            f"reward_weights={values} (the authors' advantage decomposition is a plain mean); give equal weights or "
            "leave reward_weights unset"), key)
    if values and not (math.isfinite(values[0]) and values[0] > 0):
        raise ConfigFieldError(lambda k: (
            f"{k('reward_weights')}={values}: BNPO rescales each function's rewards to [0, 1] with reward_range and does "
            "not use the weights' common value, so a weight <= 0 would be ignored (a negative one would maximize what "
            "it was meant to minimize); leave reward_weights unset, and to minimize a function return its negation "
            "(with reward_range [-high, -low])"), key)


def _is_pair(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value))


class BNPOTrainer(LowMemGRPOTrainer):
    """GRPO with BNPO advantages (:func:`bnpo_advantages`), on TRL's ``GRPOTrainer``.

    Generation, reward functions, the clipped policy loss, reference model, PEFT, checkpoints and
    lowmem optimizers are TRL's / :class:`~lowmem.trainers.LowMemGRPOTrainer`'s. The advantage
    TRL computes is replaced, after the rewards of the whole (all-process) generation batch are
    known, by the BNPO advantage; ``bnpo/alpha`` and ``bnpo/beta`` (mean over reward functions)
    are logged.
    """

    _name = "BNPO"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import inspect

        from trl import GRPOTrainer

        # the config is checked before any model loads (a 7B policy loaded to learn of a wrong config is minutes lost)
        bound = inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs).arguments
        config, funcs = bound.get("args"), bound.get("reward_funcs")
        if not isinstance(config, BNPOConfig):
            raise TypeError(f"BNPOTrainer needs args=BNPOConfig(...); got {type(config).__name__}")
        if config.reward_weights is not None:
            check_reward_weights(config.reward_weights)
        if funcs is not None:
            _ranges(config.reward_range, len(funcs) if isinstance(funcs, (list, tuple)) else 1)
        super().__init__(*args, **kwargs)
        check_reward_weights(self.reward_weights.tolist())
        _ranges(self.args.reward_range, len(self.reward_funcs))
        self._bnpo_rewards_per_func: torch.Tensor | None = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._bnpo_rewards_per_func = rewards_per_func  # gathered over processes: the whole batch
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = self._bnpo_rewards_per_func
        self._bnpo_rewards_per_func = None
        advantages = bnpo_advantages(rewards, group_size, self.args.reward_range, self.reward_func_names)
        advantages = advantages.to(output["advantages"].dtype)
        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        output["advantages"] = advantages[local]
        logged = self._logs["advantages"]  # TRL logged its own advantages for this batch: replace them
        for _ in range(min(len(advantages), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())
        ranges = _ranges(self.args.reward_range, rewards.shape[1])
        params = []
        for j, (low, high) in enumerate(ranges):
            p = torch.nanmean(((rewards[:, j].double() - low) / (high - low)).view(-1, group_size), dim=1)
            p = p[~torch.isnan(p)]
            if p.numel():
                params.append(beta_normalization_params(p.clamp(0, 1)))
        if params:
            self._metrics[mode]["bnpo/alpha"].append(sum(a for a, _ in params) / len(params))
            self._metrics[mode]["bnpo/beta"].append(sum(b for _, b in params) / len(params))
        return output
