"""GVPO: Group Variance Policy Optimization (Zhang et al., 2025, arXiv:2504.19599).

For the ``G`` completions ``y_i`` of one prompt with rewards ``R_i``, GVPO regresses the centred
implicit reward onto the centred reward:

* implicit reward ``r_i = beta * (log pi_theta(y_i) - log pi_ref(y_i))``, log-probabilities summed
  over the completion's tokens;
* group loss ``sum_i 0.5 * ((r_i - mean_j r_j) - (R_i - mean_j R_j))^2 / (G - 1)``, with
  ``mean_j r_j`` treated as a constant;
* batch loss: the mean of the group losses. (The authors' code sums them; the mean keeps the
  learning rate independent of the number of prompts per batch.)

There is no importance ratio and no extra KL term: ``beta`` and ``pi_ref`` are the
regularization. ``pi_ref`` is the sampling policy by default (the detached current policy when
training is on-policy), or a fixed reference model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .trl import ConfigFieldError, LowMemGRPOConfig, LowMemGRPOTrainer, bare_key, refuse_unused_grpo_fields

REFERENCE_POLICIES = ("sampling", "model")
#: GRPOConfig fields of GRPO's clipped loss and its advantages, which GVPO's loss replaces: a value other than
#: TRL's default is refused (it would be ignored).
GVPO_UNUSED_FIELDS = (
    "loss_type", "epsilon", "epsilon_high", "delta", "importance_sampling_level", "scale_rewards",
    "multi_objective_aggregation", "top_entropy_quantile", "entropy_coef", "use_adaptive_entropy",
    "off_policy_mask_threshold", "use_bias_correction_kl", "sapo_temperature_neg", "sapo_temperature_pos",
    "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg",
    "entropy_target", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta",
)


def gvpo_loss(
    logps: torch.Tensor, ref_logps: torch.Tensor, rewards: torch.Tensor, group_size: int, beta: float
) -> torch.Tensor:
    """GVPO loss (GVPO, Eq. 9: the weighted-MSE form of the group objective) of a batch of groups.

    Args:
        logps (`torch.Tensor`):
            ``(N,)`` log-probabilities of each completion under the policy being trained, summed
            over its tokens (carries the gradient).
        ref_logps (`torch.Tensor`):
            ``(N,)`` the same under the reference policy ``pi_ref`` (no gradient is taken through it).
        rewards (`torch.Tensor`):
            ``(N,)`` scalar rewards ``R_i``.
        group_size (`int`):
            ``G``, completions per prompt, ``>= 2``; ``N`` is a multiple of it and each group is
            contiguous.
        beta (`float`):
            Scale of the implicit reward, ``> 0``; larger ``beta`` keeps the policy closer to ``pi_ref``.

    Returns:
        `torch.Tensor`: Scalar, the mean over groups of
        ``sum_i 0.5 * ((r_i - mean r) - (R_i - mean R))^2 / (G - 1)`` with
        ``r_i = beta * (logps_i - ref_logps_i)`` and ``mean r`` detached.

    Raises:
        ValueError: Shapes differ or are not 1-D, ``N`` not a positive multiple of ``group_size``,
            ``group_size < 2``, or ``beta <= 0``.
    """
    if not (logps.dim() == 1 and logps.shape == ref_logps.shape == rewards.shape):
        raise ValueError(
            f"logps, ref_logps and rewards must be 1-D of equal length; got {tuple(logps.shape)}, "
            f"{tuple(ref_logps.shape)}, {tuple(rewards.shape)}"
        )
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2 (the loss divides by G - 1); got {group_size!r}")
    if logps.numel() == 0 or logps.numel() % group_size:
        raise ValueError(f"the number of completions ({logps.numel()}) must be a positive multiple of group_size ({group_size})")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0; got {beta!r}")
    implicit = (beta * (logps - ref_logps.detach())).view(-1, group_size)
    rewards = rewards.detach().to(implicit.dtype).view(-1, group_size)
    centred_implicit = implicit - implicit.mean(dim=1, keepdim=True).detach()
    centred_rewards = rewards - rewards.mean(dim=1, keepdim=True)
    group_losses = 0.5 * (centred_implicit - centred_rewards).pow(2).sum(dim=1) / (group_size - 1)
    return group_losses.mean()


def gvpo_centred_rewards(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``R~_i = R_i - mean_j R_j`` over each contiguous group of ``group_size`` (GVPO, Eq. 9's centred reward, the
    target the centred implicit reward is regressed onto); ``(N,)`` in, ``(N,)`` out."""
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).flatten()


@dataclass
class GVPOConfig(LowMemGRPOConfig):
    """Configuration of :class:`GVPOTrainer`: TRL's ``GRPOConfig`` with lowmem's optimizer fields
    (``lowmem_optim``, ``lowmem_optim_args``, see :class:`~lowmem.trainers.LowMemGRPOConfig`) and:

    Parameters:
        beta (`float`, *optional*, defaults to `0.1`):
            GVPO's ``beta``, the scale of the implicit reward ``r_i = beta * (log pi_theta(y_i) -
            log pi_ref(y_i))``, ``> 0``. Not a KL coefficient here: GVPO adds no KL term. With
            ``reference_policy="sampling"`` no reference model is loaded whatever its value.
        reference_policy (`str`, *optional*, defaults to `"sampling"`):
            ``pi_ref``. ``"sampling"``: the policy that generated the completions (the detached
            current policy when on-policy; TRL's stored generation-time log-probabilities when
            ``num_iterations > 1`` or ``steps_per_generation > gradient_accumulation_steps``); no
            reference model is loaded. ``"model"``: a fixed reference, the initial model (reloaded
            by path, or the base model with the adapter disabled under ``peft_config``);
            TRL's ``sync_ref_model`` needs ``"model"``.

    Batching: each micro-batch must hold whole groups, so ``per_device_train_batch_size`` (and
    ``per_device_eval_batch_size``: checked when the config is built with ``eval_strategy`` on, when the trainer is
    built with an ``eval_dataset``, and when ``evaluate()`` starts) must be a multiple of ``num_generations``
    (``num_generations_eval``); the trainer shuffles whole groups instead of single completions.
    ``num_generations`` and ``num_generations_eval`` must be at least 2 (the loss divides by ``G - 1``).
    GRPO's loss and advantage fields (:data:`GVPO_UNUSED_FIELDS`: ``loss_type``, ``epsilon``,
    ``epsilon_high``, ``delta``, ``importance_sampling_level``, ``scale_rewards``,
    ``multi_objective_aggregation``, ``top_entropy_quantile``, the entropy-bonus (and its adaptive
    controller's), off-policy-mask, SAPO and VESPO fields) do not apply: a value other than TRL's default raises ``ValueError``.
    """

    beta: float = field(
        default=0.1,
        metadata={"help": "GVPO's implicit-reward scale beta (> 0); no KL term is added."},
    )
    reference_policy: str = field(
        default="sampling",
        metadata={"help": "pi_ref: 'sampling' (the generating policy, no reference model) or 'model' (the initial model)."},
    )

    #: every process's eval batch holds whole groups (trainers.trl.check_eval_groups)
    EVAL_GROUPS_PER_PROCESS = True
    #: refused by GVPO whatever the setting that reads them in GRPO (lowmem.train.check_dependent_fields skips them)
    UNUSED_FIELDS = GVPO_UNUSED_FIELDS
    FIELD_RANGES = {"beta": None}  # checked below: GVPO's beta scales the implicit reward, > 0 (lowmem.config.RANGES: >= 0)

    def __post_init__(self) -> None:
        # each a ConfigFieldError (trainers.trl): lowmem train prints it with the recipe's keys (batch_size, ...)
        for name in ("num_generations", "num_generations_eval"):  # before TRL's check, which does not name the field
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ConfigFieldError(lambda key, name=name, value=value: (
                    f"GVPO needs {name} >= 2 completions per prompt (its loss compares the completions of a prompt "
                    f"and divides by G - 1); got {key(name)}={value}"), bare_key)
        super().__post_init__()
        refuse_unused_grpo_fields(self, GVPO_UNUSED_FIELDS, "GVPO",
                                  "its loss is the regression of GVPO Eq. 9 on the weighted reward sum, scaled by beta")
        if self.reference_policy not in REFERENCE_POLICIES:
            raise ConfigFieldError(lambda key: f"Unknown {key('reference_policy')} {self.reference_policy!r}; valid: "
                                   f"{list(REFERENCE_POLICIES)}", bare_key)
        if self.sync_ref_model and self.reference_policy == "sampling":  # TRL would blame beta=0.0, which GVPO sets
            raise ConfigFieldError(lambda key: (
                f"{key('sync_ref_model')}=True needs {key('reference_policy')}='model': with reference_policy="
                "'sampling' pi_ref is the policy that sampled the completions and there is no reference model to "
                "synchronize"), bare_key)
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigFieldError(lambda key: f"GVPO needs beta > 0 (the implicit-reward scale); got "
                                   f"{key('beta')}={self.beta!r}", bare_key)
        if self.per_device_train_batch_size % self.num_generations:
            raise ConfigFieldError(lambda key: (
                f"GVPO needs whole groups in every micro-batch: {key('per_device_train_batch_size')} "
                f"({self.per_device_train_batch_size}) must be a multiple of {key('num_generations')} "
                f"({self.num_generations})"), bare_key)


def _shuffle_groups(batch: dict[str, Any], group_size: int) -> dict[str, Any]:
    """Shuffle a generation batch by whole groups of ``group_size`` contiguous rows."""
    rows = len(next(v for v in batch.values() if v is not None and not (torch.is_tensor(v) and v.dim() == 0)))
    group_order = torch.randperm(rows // group_size)
    order = (group_order[:, None] * group_size + torch.arange(group_size)).flatten()

    def permute(value: Any) -> Any:
        if value is None or (torch.is_tensor(value) and value.dim() == 0):
            return value
        if torch.is_tensor(value):
            return value[order.to(value.device)]
        return [value[i] for i in order.tolist()]

    return {key: permute(value) for key, value in batch.items()}


class GVPOTrainer(LowMemGRPOTrainer):
    """GVPO (:func:`gvpo_loss`) on TRL's ``GRPOTrainer``.

    TRL generates and scores the completions (reward functions, ``reward_weights``: ``R_i`` is the
    weighted sum, as in GRPO); this trainer keeps every group whole inside a micro-batch
    (group-wise shuffle of the buffered generation batch; each micro-batch is checked) and
    replaces the loss (plus, on a Mixture-of-Experts model, TRL's router load-balancing loss times
    ``router_aux_loss_coef``, as TRL's GRPO adds it). Works with lowmem optimizers, ``peft_config``, gradient accumulation,
    evaluation and checkpoints like :class:`~lowmem.trainers.LowMemGRPOTrainer`. Logs
    ``gvpo/implicit_reward_std`` (spread of ``r_i`` within groups); the completions' logged advantages (TRL's
    completions table, ``_logs["advantages"]``) are the centred rewards ``R_i - mean R``
    (:func:`gvpo_centred_rewards`), not TRL's std-scaled GRPO advantages, which GVPO does not use.
    """

    _name = "GVPO"
    _reference_alternative = "or reference_policy='sampling' (the sampling policy is pi_ref: no reference model)"

    def __init__(self, model: Any, reward_funcs: Any, args: GVPOConfig | None = None, **kwargs: Any) -> None:
        if not isinstance(args, GVPOConfig):
            raise TypeError(f"GVPOTrainer needs args=GVPOConfig(...); got {type(args).__name__}")
        beta = args.beta
        if args.reference_policy == "sampling":
            args.beta = 0.0  # TRL then loads no reference model and computes no reference log-probs
        try:
            super().__init__(model, reward_funcs, args=args, **kwargs)
        finally:
            args.beta = beta
        self.gvpo_beta = beta
        self._gvpo_rewards_per_func: torch.Tensor | None = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gvpo_rewards_per_func = rewards_per_func  # gathered over processes
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        group_size = self.num_generations if self.model.training else self.num_generations_eval
        per_func = self._gvpo_rewards_per_func
        self._gvpo_rewards_per_func = None
        # an infinite reward (the loss would be NaN) was refused in LowMemGRPOTrainer._calculate_rewards
        rewards = (per_func * self.reward_weights.to(per_func.device)).nansum(dim=1)
        unscorable = torch.isnan(per_func).all(dim=1)
        if unscorable.any():  # no reward at all: give it its group's mean reward (a zero centred reward)
            masked = torch.where(unscorable, torch.nan, rewards).view(-1, group_size)
            group_mean = torch.nan_to_num(torch.nanmean(masked, dim=1)).repeat_interleave(group_size)
            rewards = torch.where(unscorable, group_mean, rewards)
        # TRL logged its GRPO advantages ((R - mean R) / (std R + 1e-4)) for this batch (the completions table's
        # "advantage" column), which GVPO never uses: log the centred reward R_i - mean R instead, GVPO's regression
        # target (its per-completion weight beta / (G - 1) * (R~_i - r~_i) with r~ = 0, as at an on-policy step)
        centred = gvpo_centred_rewards(rewards, group_size)
        logged = self._logs["advantages"]
        for _ in range(min(len(centred), len(logged))):
            logged.pop()
        logged.extend(centred.tolist())
        start = self.accelerator.process_index * len(inputs)
        if start % group_size or len(inputs) % group_size:
            raise ValueError(
                f"GVPO needs whole groups on every process: the per-process generation batch ({len(inputs)}) must be a "
                f"multiple of num_generations ({group_size})"
            )
        device = output["advantages"].device
        output["gvpo_rewards"] = rewards[start : start + len(inputs)].to(device)
        output["gvpo_group_ids"] = torch.arange(start, start + len(inputs), device=device) // group_size
        return output

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

        steps = self.args.steps_per_generation
        if self._step % (steps * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = _shuffle_groups(split_pixel_values_by_grid(batch), self.num_generations)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in split_tensor_dict(batch, steps)]
        return self._buffered_inputs[self._step % steps]

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        group_ids = inputs["gvpo_group_ids"]
        if group_ids.numel() % group_size or not (group_ids.view(-1, group_size) == group_ids.view(-1, group_size)[:, :1]).all():
            raise RuntimeError(
                f"GVPO micro-batch does not hold whole groups of {group_size} completions (group ids {group_ids.tolist()}); "
                "per_device_train_batch_size must be a multiple of num_generations"
            )
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        multimodal = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                      "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
        # an MoE model's load-balancing loss (TRL's GRPO adds it whenever the model's config has output_router_logits
        # and a router_aux_loss_coef, the architecture's own or GRPOConfig's; BNPO keeps TRL's loss, so it has it too)
        per_token_logps, _, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in multimodal}
        )
        if self.args.reference_policy == "model":
            ref_per_token_logps = inputs["ref_per_token_logps"]
        else:
            ref_per_token_logps = inputs.get("old_per_token_logps")
            if ref_per_token_logps is None:  # on-policy: the sampling policy is the current one
                ref_per_token_logps = per_token_logps.detach()
        logps = (per_token_logps * mask).sum(dim=1)
        ref_logps = (ref_per_token_logps * mask).sum(dim=1)
        loss = gvpo_loss(logps, ref_logps, inputs["gvpo_rewards"], group_size, self.gvpo_beta)
        implicit = (self.gvpo_beta * (logps - ref_logps)).detach().view(-1, group_size)
        self._metrics[mode]["gvpo/implicit_reward_std"].append(
            self.accelerator.gather(implicit.std(dim=1).mean()).mean().item()
        )
        self._metrics[mode]["gvpo/loss"].append(self.accelerator.gather(loss.detach()).mean().item())
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.aux_loss_enabled:  # as TRL's GRPO: scaled for gradient accumulation like the policy loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather(aux_loss.detach()).mean().item())
            return (loss + self.router_aux_loss_coef * aux_loss) / normalizer
        return loss / normalizer
