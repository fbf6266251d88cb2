"""LOMO and AdaLomo (Lv et al. 2023, 2024): update rules meant to run fused into the backward pass.

LOMO's point is memory: each parameter is updated as soon as its gradient exists and the gradient
is freed, so no step ever holds every gradient. In lowmem that is layerwise mode
(:class:`~lowmem.optim.layerwise.LayerwiseOptimizer`, ``lowmem train`` with ``layerwise: true``,
the Trainer's ``lowmem_layerwise=True``), which works with any engine recipe; the recipes here are
the update rules:

* ``lomo``: SGD with decoupled weight decay (no state but the step counter).
* ``adalomo``: Adafactor's factored second moment (row and column statistics), no first moment,
  update RMS clipping and a step scaled by ``max(eps2, RMS(theta))`` (grouped update normalization).

Without layerwise mode they are ordinary optimizers (the same update, correct, but the backward pass
keeps every gradient until ``step()``); ``lowmem train`` refuses them without ``layerwise: true``
(:data:`FUSED_BACKWARD`). Gradient clipping by the global norm: ``lomo-optim`` runs the backward pass
twice (the first only to compute the norm); lowmem's layerwise mode offers ``clip_mode="global_prev"``
(the previous step's global norm, one backward) and ``"per_param"`` (docs/optimizers.md).

FSDP2 (``DTensor`` parameters): as plain optimizers (layerwise mode refuses sharded parameters).
LOMO is element-wise; AdaLomo's column statistics and update RMS are reduced over the shards as
Adafactor's, and its step size reads the RMS of the whole parameter (:func:`adalomo_lr`'s ``reduce``).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..engine import LowMemOptimizer, Recipe
from ..functional.lomo import adalomo_step_size, lomo_direction
from ..hparams import LR, WEIGHT_DECAY
from ..moments import ChunkState, FactoredMoments, MomentRule
from ..registry import register
from .full_rank import ADAFACTOR_HPARAMS

#: Registry names whose update is meant to be fused into the backward pass: ``lowmem train`` asks
#: for ``layerwise: true`` with them (without it they would keep every gradient, which LOMO exists
#: to avoid).
FUSED_BACKWARD = ("lomo", "adalomo")


class SGDMoments(MomentRule):
    """Plain SGD: the direction is the gradient (LOMO). No state; element-wise, so chunked freely."""

    state_keys = ()

    def init_state(self, state, shape, group, param):
        pass

    def direction(self, g, state, group, t, lr):
        return lomo_direction(g)

    def chunk_align(self, shape, group, state):
        return 1

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        return ChunkState(state, start, stop)

    def transient_bytes(self, numel, shape, group, state):
        """Nothing: the direction is the (float32) gradient itself and the update is in place; the
        engine counts the float32 copies of a low-precision gradient and parameter."""
        return 0


LOMO = Recipe(
    name="lomo",
    summary="LOMO: SGD fused into the backward pass (run it in layerwise mode); no optimizer state",
    reference="Lv et al. 2023, Full Parameter Fine-tuning for Large Language Models with Limited Resources, Algorithm 1",
    moment=SGDMoments(),
    hparams=(LR(1e-3), WEIGHT_DECAY(0.0)),
)


def adalomo_lr(group: dict[str, Any], state: dict[str, torch.Tensor], p32: torch.Tensor, t: float,
               reduce: Any = None, p_rms: torch.Tensor | None = None) -> torch.Tensor:
    """AdaLomo's step size ``lr * max(eps2, RMS(theta_{t-1}))`` (:func:`~lowmem.optim.functional.lomo.adalomo_step_size`).

    ``reduce`` (an FSDP2 parameter's local shard, :class:`~lowmem.optim.sharded.ShardReduce`): the
    RMS of the whole parameter (:func:`~lowmem.optim.sharded.sharded_rms`: one all-reduce of 2 numbers). ``p_rms``:
    the RMS computed by the caller (the engine's chunked step of a bfloat16 / float16 parameter,
    ``engine.chunked_rms``: no float32 copy of the whole parameter); ``p32`` is then not read."""
    if p_rms is not None:
        return adalomo_step_size(group["lr"], None, group["eps"][1], p_rms=p_rms)
    if reduce is None:
        return adalomo_step_size(group["lr"], p32, group["eps"][1])
    from ..sharded import sharded_rms

    return adalomo_step_size(group["lr"], None, group["eps"][1], p_rms=sharded_rms(p32, reduce))


adalomo_lr.takes_p_rms = True  # (engine._chunked_lr: the RMS from a low-precision parameter's chunks)
adalomo_lr.reads_param = lambda group: True

_ADAFACTOR = {h.name: h for h in ADAFACTOR_HPARAMS}


class AdaLomoMoments(FactoredMoments):
    """Adafactor's statistics and clipping (:class:`~lowmem.optim.moments.FactoredMoments`) whose
    multi-tensor step evaluates AdaLomo's step size :func:`adalomo_lr` (``step()`` of the plain
    optimizer: the engine's foreach buckets; the fused backward steps one parameter at a time)."""

    foreach_lr_rule = staticmethod(adalomo_lr)

    @staticmethod
    def _lr_bytes(group) -> int:
        """The step size :func:`adalomo_lr` returns, alive through the step: always a float32 0-d tensor
        (``lr * max(eps2, RMS(theta))``; AdaLomo's groups have no ``scale_parameter``)."""
        return 4

    def foreach_lr_form(self, group, t):
        """``lr * max(eps2, RMS(theta_{t-1}))``: ``rho = lr`` with the parameter scale."""
        return group["lr"], True


ADALOMO = Recipe(
    name="adalomo",
    summary="AdaLomo: factored second moment + grouped update normalization, fused into the backward pass (layerwise mode)",
    reference="Lv et al. 2024, AdaLomo: Low-memory Optimization with Adaptive Learning Rate, Algorithm 1",
    moment=AdaLomoMoments(),  # no beta1 in the group: no first moment (AdaLomo keeps none)
    hparams=(LR(1e-3), _ADAFACTOR["eps"], _ADAFACTOR["clip_threshold"], _ADAFACTOR["decay_rate"], WEIGHT_DECAY(0.0)),
    lr_rule=adalomo_lr,
)


class Lomo(LowMemOptimizer):
    """LOMO's update (Lv et al. 2023) as a plain optimizer: ``theta <- (1 - lr wd) theta - lr g``.

    For LOMO's memory saving run it fused into the backward pass:
    ``LayerwiseOptimizer(model, "lomo", lr=...)`` (``lowmem train``: ``layerwise: true``).

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-3`): Learning rate.
        weight_decay (`float`, defaults to `0.0`): Decoupled weight decay, ``theta *= 1 - lr * wd``
            before the step (``lomo-optim``'s order).
        state_dtype (`str`, defaults to `"float32"`): Accepted for uniformity (LOMO has no state).
        foreach (`bool` or `None`, defaults to `None`): Accepted for uniformity (no multi-tensor path).
    """

    recipe = LOMO

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0, *,
                 state_dtype: str = "float32", foreach: bool | None = None):
        super().__init__(params, lr=lr, weight_decay=weight_decay, state_dtype=state_dtype, foreach=foreach)


class AdaLomo(LowMemOptimizer):
    """AdaLomo's update (Lv et al. 2024) as a plain optimizer; run it fused into the backward pass
    with ``LayerwiseOptimizer(model, "adalomo", lr=...)`` for its memory saving.

    Matrices keep ``rows + cols`` float32 statistics, vectors a full second moment (as
    ``lomo-optim`` 0.1.1); no first moment.

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-3`): Learning rate ``alpha`` (scaled by ``max(eps2, RMS(theta))``).
        eps (`tuple[float, float]`, defaults to `(1e-30, 1e-3)`): ``eps1`` added to ``g^2``; ``eps2``
            floor of the parameter scale.
        clip_threshold (`float`, defaults to `1.0`): ``d`` in ``u / max(1, RMS(u) / d)``.
        decay_rate (`float`, defaults to `-0.8`): ``beta2_t = 1 - t^decay_rate``.
        weight_decay (`float`, defaults to `0.0`): Decoupled, ``theta *= 1 - step * wd`` with the
            parameter-scaled step, before the update (``lomo-optim``'s order).
        state_dtype (`str`, defaults to `"float32"`): Storage of the statistics.
        foreach (`bool` or `None`, defaults to `None`): `None` steps float32 vectors and matrices in multi-tensor
            buckets (``step()``; equal to the per-parameter step), `False` forces the per-parameter step.
    """

    recipe = ADALOMO

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, weight_decay: float = 0.0, *,
                 state_dtype: str = "float32", foreach: bool | None = None):
        super().__init__(params, lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                         weight_decay=weight_decay, state_dtype=state_dtype, foreach=foreach)


register(LOMO, Lomo, state_precision="fp32", second_moment="none", example_hparams={"lr": 0.1})
register(ADALOMO, AdaLomo, state_precision="fp32", second_moment="factored")

__all__ = ["ADALOMO", "FUSED_BACKWARD", "LOMO", "AdaLomo", "AdaLomoMoments", "Lomo", "SGDMoments", "adalomo_lr"]
