"""StableAdamW (Wortsman et al. 2023, Algorithm 2) on the engine: transformers' ``optim="stable_adamw"``.

AdamW whose decay rates are debiased (Adafactor's ``beta_hat``, no bias correction after) and whose step size is
divided, per tensor, by ``max(1, RMS)`` of the update ``g^2 / max(v, eps^2)`` (math:
:mod:`lowmem.optim.functional.stable_adamw`). The clipped step size applies to the decoupled weight decay too.

The RMS is a whole-tensor statistic: the chunked step computes it in a pass over the chunks first
(:meth:`StableAdamWMoments.prepare_chunks`, ``v_t`` aside, nothing written), the whole-tensor step after the moments.
The step size is a 0-d tensor (the recipe's learning-rate rule, :func:`clipped_lr`) that the rule multiplies in place
by ``1 / max(1, RMS)`` before the engine decays and steps with it: the clipped size reaches the decay and the update
without a host read (torch-optimi reads the RMS of every tensor). State: ``exp_avg`` and ``exp_avg_sq`` (8 B per
element, float32). On FSDP2 shards the RMS's sum is all-reduced over the shards (one 0-d all-reduce per tensor).

torch-optimi's ``kahan_sum`` is the engine's ``kahan_summation`` (the same compensation, for bfloat16 weights), with
its default: not given, on for the groups of bfloat16 weights (:class:`StableAdamW`). Not here from torch-optimi:
``triton`` / ``gradient_release`` (layerwise mode: ``stable_adamw_layerwise``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from ..engine import LowMemOptimizer, Recipe
from ..functional import stable_adamw as FS
from ..hparams import BETAS, EPS, LR, WEIGHT_DECAY, HParam, is_bool, kahan_sum_groups, optional, positive
from ..moments import ChunkState, MomentRule, state_dtype
from ..registry import register
from ..sharded import kahan_default_load_hook


def _work(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _like(g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``g`` in the moments' compute dtype: a float64 gradient beside float32 moments is cast here only where the
    engine did not cast it (an FSDP2 shard's step; elsewhere ``computes_in_state_precision`` casts it once)."""
    return g if g.dtype == m.dtype else g.to(m.dtype)


class StableAdamWMoments(MomentRule):
    """Adam's moments with debiased rates; the step size (a tensor) clipped per tensor (see the module)."""

    state_keys = ("exp_avg", "exp_avg_sq")
    chunk_direction_is_new = True
    computes_in_state_precision = True  # (a float64 gradient with a float32 / bf16 state: cast once by the engine)

    def init_state(self, state, shape, group, param):
        dtype = state_dtype(group, param)
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=param.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=param.device)

    def chunk_align(self, shape, group, state):
        return 1

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        view = ChunkState(state, start, stop, {"clipped": True} if ctx is not None else None)
        for k in self.state_keys:
            if k in state:
                view[k] = state[k].view(-1)[start:stop]
        return view

    @staticmethod
    def _rates(group: dict[str, Any], t: float) -> tuple[float, float]:
        beta1, beta2 = group["betas"]
        return FS.debiased_beta(beta1, t), FS.debiased_beta(beta2, t)

    sharded_stats = True  # (FSDP2: the RMS's sum all-reduced over the shards in prepare_chunks)

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized, reduce=None):
        """The pass over the chunks: ``RMS_t`` of the whole tensor (``v_t`` computed aside, nothing written; the sum
        all-reduced over the shards of an FSDP2 parameter, ``reduce``), and ``lr`` (:func:`clipped_lr`'s tensor)
        multiplied in place by ``1 / max(1, RMS_t)``, on the device (no host read)."""
        _, beta2_hat = self._rates(group, t)
        v = state["exp_avg_sq"]
        total = torch.zeros((), dtype=torch.float64 if v.dtype == torch.float64 else torch.float32, device=v.device)
        for start, stop in bounds:
            view = self.chunk_state(state, start, stop, shape, group)
            total.add_(FS.update_rms_sum(stabilized(start, stop, view), view["exp_avg_sq"], beta2_hat, group["eps"]))
        numel = math.prod(reduce.shape) if reduce is not None and reduce.shape is not None else (bounds[-1][1] if bounds else 0)
        if reduce is not None:
            reduce.sum_(total)
        lr.mul_(FS.clip_scale_(total, numel))
        return True

    def weight_decay_for(self, group, state):
        """``weight_decay`` (the engine multiplies it by the clipped ``lr``), divided by ``max_lr`` with
        ``decouple_lr`` (torch-optimi's fully decoupled decay, ``(eta_t / max_lr) wd``)."""
        wd = group.get("weight_decay", 0.0)
        return wd / group["max_lr"] if wd and group.get("decouple_lr") else wd

    def transient_bytes(self, numel, shape, group, state):
        """The larger of two phases, plus three 0-d tensors (the step size and the RMS sums, 8 B each at most):
        the RMS pass (``g^2`` and ``v_t``, beside the float32 copies of bfloat16 moments, which the whole-tensor step
        holds through it), and the update with a tensor step size (the direction beside the engine's decay
        temporary ``p * (lr wd)``, of the parameter's compute width: ``functional.adam.decoupled_weight_decay_``)."""
        m = state.get("exp_avg")
        width = 8 if m is not None and m.dtype == torch.float64 else 4
        copies = 8 if m is not None and m.dtype not in (torch.float32, torch.float64) else 0
        # the decay temporary's width: the parameter's. A float64 parameter's gradient is cast to float32 for a float32
        # / bfloat16 state (the engine counts the cast and tells the count float32), so a group holding a float64
        # parameter is counted at 8 (a bound for its float32 parameters, never under)
        param = 8 if width == 8 or any(getattr(q, "dtype", None) == torch.float64 for q in group.get("params", ())) else 4
        return max(2 * width + copies, width + param) * numel + 24

    def direction_bytes(self, numel, shape, group, state):
        m = state.get("exp_avg")
        return (8 if m is not None and m.dtype == torch.float64 else 4) * numel

    def direction(self, g, state, group, t, lr):
        beta1_hat, beta2_hat = self._rates(group, t)
        m, v = _work(state["exp_avg"]), _work(state["exp_avg_sq"])
        g = _like(g, m)
        FS.stable_adamw_moments_(m, v, g, beta1_hat, beta2_hat)
        if not getattr(state, "extra", {}).get("clipped"):  # the whole tensor (no prepare pass): the RMS of v_t
            g2 = g * g
            lr.mul_(FS.clip_scale_(g2.div_(v.clamp_min(group["eps"] ** 2)).sum(), g.numel()))
            del g2
        d = FS.stable_adamw_direction(m, v, group["eps"])
        if m is not state["exp_avg"]:
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v)
        return d


def clipped_lr(group: dict[str, Any], state: dict[str, torch.Tensor], p32: torch.Tensor, t: float,
               reduce: Any = None) -> torch.Tensor:
    """The step's learning rate as a new 0-d float64 tensor on the parameter's device, which
    :class:`StableAdamWMoments` multiplies in place by ``1 / max(1, RMS_t)`` before the engine decays and steps with
    it (``eta_t`` of Algorithm 2, lines 9-10: the decay and the update take the clipped size; no host read).
    ``reduce`` (an FSDP2 shard's, :mod:`lowmem.optim.sharded`): unused, the rule reduces the RMS itself."""
    return torch.full((), float(group["lr"]), dtype=torch.float64, device=p32.device)


def _check(group: dict[str, Any]) -> None:
    if group["decouple_lr"] and group["max_lr"] is None:
        raise ValueError("stable_adamw: decouple_lr=True needs max_lr (the schedule's largest lr: the decay is "
                         "(lr / max_lr) * weight_decay); torch-optimi takes the constructor's lr, give it here")



STABLE_ADAMW = Recipe(
    name="stable_adamw",
    summary="StableAdamW: AdamW with debiased rates and per-tensor update clipping (torch-optimi's); 8 bytes/param",
    reference="Wortsman et al. 2023, Stable and low-precision training for large-scale vision-language models, Algorithm 2",
    moment=StableAdamWMoments(),
    lr_rule=clipped_lr,
    hparams=(LR(1e-3), BETAS((0.9, 0.99)), EPS(1e-6), WEIGHT_DECAY(1e-2),
             HParam("decouple_lr", False, is_bool, "True or False",
                    "fully decoupled decay, theta *= 1 - (eta_t / max_lr) wd (torch-optimi's)"),
             HParam("max_lr", None, optional(positive), "None or a float > 0",
                    "the schedule's largest lr, for decouple_lr")),
    validate_group=_check,
)


class StableAdamW(LowMemOptimizer):
    """StableAdamW (Wortsman et al. 2023) on the lowmem engine, after torch-optimi's ``StableAdamW`` (its defaults).

    ``beta_hat(b, t) = b (1 - b^(t-1)) / (1 - b^t)``; ``m, v`` EMAs with them; ``eta = lr / max(1, RMS(g^2 / max(v,
    eps^2)))`` per tensor; ``p <- p (1 - eta wd) - eta m / (sqrt(v) + eps)``. State: two moments (8 B per element).

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-3`): Learning rate (before the clipping).
        betas (`tuple[float, float]`, defaults to `(0.9, 0.99)`): Decay rates, debiased each step.
        eps (`float`, defaults to `1e-6`): Added to ``sqrt(v)``; ``eps^2`` floors ``v`` in the RMS.
        weight_decay (`float`, defaults to `1e-2`): Decoupled decay, scaled by the clipped step size.
        decouple_lr (`bool`, defaults to `False`): Fully decoupled decay, ``(eta / max_lr) * weight_decay``.
        max_lr (`float` or `None`, defaults to `None`): The schedule's largest lr (needed with ``decouple_lr``).
        state_dtype (`str`, defaults to `"float32"`), foreach (`bool` or `None`): the engine's.
        kahan_summation (`bool`): the engine's; not given, torch-optimi's ``kahan_sum=None``: on for the groups
            holding bfloat16 parameters (:func:`~lowmem.optim.hparams.kahan_sum_groups`; not beside
            ``bf16_stochastic_round=True``). bf16_stochastic_round (`bool`, defaults to `False`): the engine's.
    """

    recipe = STABLE_ADAMW

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-6, weight_decay: float = 1e-2, decouple_lr: bool = False, max_lr: float | None = None,
                 *, state_dtype: str = "float32", foreach: bool | None = None):
        given, decided = self.__dict__.get("_added_settings", {}), []  # (the engine settings given: __init_subclass__)
        if "kahan_summation" not in given:  # torch-optimi's default (kahan_sum=None): on for bfloat16 weights
            params, decided = kahan_sum_groups(params, "optimizer 'stable_adamw'", bool(given.get("bf16_stochastic_round")))
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple_lr=decouple_lr,
                         max_lr=max_lr, state_dtype=state_dtype, foreach=foreach)
        if decided:
            self.register_load_state_dict_pre_hook(kahan_default_load_hook(decided))


register(STABLE_ADAMW, StableAdamW, state_precision="fp32", second_moment="full", example_hparams={"lr": 1e-2})
