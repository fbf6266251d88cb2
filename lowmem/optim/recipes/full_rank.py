"""Full-rank recipes: AdamW (the reference baseline) and Adafactor.

Each recipe is a few lines composing engine parts; each class is a thin constructor with the
signature users know (``torch.optim.AdamW``, ``transformers.optimization.Adafactor``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from ..engine import LowMemOptimizer, Recipe
from ..hparams import BETAS, EPS, LR, WEIGHT_DECAY, HParam, is_bool, nonneg, optional, in_unit_interval
from ..hparams import check_torch_flags
from ..functional.adafactor import adafactor_param_scale, adafactor_relative_lr
from ..moments import AdamMoments, FactoredMoments, adafactor_lr
from ..registry import register

ADAMW = Recipe(
    name="adamw",
    summary="AdamW on the engine; the reference baseline (equal to torch.optim.AdamW)",
    reference="Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization, Algorithm 2",
    moment=AdamMoments(eps_placement="torch"),
    hparams=(LR(1e-3), BETAS(), EPS(1e-8), WEIGHT_DECAY(1e-2)),
)


class AdamW(LowMemOptimizer):
    """AdamW (Loshchilov & Hutter 2019) on the lowmem engine.

    Same update as ``torch.optim.AdamW`` (tested equal). States are float32 by default even for
    bf16 parameters (``state_dtype="param"`` gives torch's behaviour): 8 bytes per parameter.

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-3`): Learning rate.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): Moment decay rates, each in [0, 1).
        eps (`float`, defaults to `1e-8`): Added to ``sqrt(v_hat)``.
        weight_decay (`float`, defaults to `1e-2`): Decoupled weight decay, applied as
            ``p *= 1 - lr * weight_decay`` before the step.
        state_dtype (`str`, defaults to `"float32"`): Storage of the moments: ``"float32"``,
            ``"bfloat16"`` or ``"param"``.
        foreach (`bool` or `None`, defaults to `None`): Multi-tensor path for float32 parameters with
            float32 state (``None``: automatically); ``False`` forces the single-tensor reference.
        amsgrad, maximize, capturable, differentiable, fused: ``torch.optim.AdamW``'s, accepted at its defaults
            (``fused=False`` too); another value is refused (:data:`~lowmem.optim.hparams.TORCH_FLAGS`).
    """

    recipe = ADAMW

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        state_dtype: str = "float32",
    ):
        check_torch_flags("AdamW", amsgrad=amsgrad, maximize=maximize, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype, foreach=foreach
        )


def _eps_pair(x: Any) -> bool:
    """``(eps1, eps2)`` with ``eps1 > 0`` (it regularizes ``g^2``: at 0 a zero gradient's factored rms is 0/0 and
    writes NaN into the parameter, a check on the gradient cannot see it) and ``eps2 >= 0`` (a floor: 0 is harmless)."""
    return (isinstance(x, (tuple, list)) and len(x) == 2 and all(nonneg(e) for e in x)
            and not isinstance(x[0], bool) and x[0] > 0)


def _check_adafactor_group(group: dict[str, Any]) -> None:
    if group["lr"] is not None and group["relative_step"]:
        raise ValueError("Cannot combine manual `lr` and `relative_step=True` options (Adafactor): relative_step=True "
                         "computes its own step size and would not use lr; give lr=None, or relative_step=False (and "
                         "usually scale_parameter=False) for an external learning rate")
    if group["warmup_init"] and not group["relative_step"]:
        raise ValueError("`warmup_init=True` requires `relative_step=True` (Adafactor): the warm-up is of the relative "
                         "step size; give warmup_init=False with an external lr")
    if group["lr"] is None and not group["relative_step"]:
        raise ValueError("Adafactor needs `lr` when `relative_step=False`: give lr (a float >= 0), or "
                         "relative_step=True for the relative step size")


ADAFACTOR_HPARAMS = (
    HParam("lr", None, optional(nonneg), "None or a finite float >= 0", "external learning rate (requires relative_step=False)"),
    HParam("eps", (1e-30, 1e-3), _eps_pair, "a pair (eps1, eps2) with eps1 > 0 and eps2 >= 0", "regularizer of g^2, and floor of the parameter scale"),
    HParam("clip_threshold", 1.0, lambda x: nonneg(x) and x > 0, "a float > 0", "threshold d of the update RMS clipping"),
    HParam("decay_rate", -0.8, lambda x: nonneg(-x) and x < 0, "a float < 0", "exponent c in beta2_t = 1 - t^c"),
    HParam("beta1", None, optional(in_unit_interval), "None or a float in [0, 1)", "first-moment decay; None keeps no first moment"),
    WEIGHT_DECAY(0.0),
    HParam("scale_parameter", True, is_bool, "a bool", "multiply the step size by max(eps2, RMS(param))"),
    HParam("relative_step", True, is_bool, "a bool", "use the relative step size min(1e-2, 1/sqrt(t)) instead of lr"),
    HParam("warmup_init", False, is_bool, "a bool", "relative step size warm-up 1e-6 t (requires relative_step)"),
)

ADAFACTOR = Recipe(
    name="adafactor",
    summary="Adafactor: factored second moment (rows + columns), optional first moment",
    reference="Shazeer & Stern 2018, Adafactor: Adaptive Learning Rates with Sublinear Memory Cost, Algorithms 4-5",
    moment=FactoredMoments(),
    hparams=ADAFACTOR_HPARAMS,
    lr_rule=adafactor_lr,
    validate_group=_check_adafactor_group,
)


class Adafactor(LowMemOptimizer):
    """Adafactor (Shazeer & Stern 2018), a drop-in for ``transformers.optimization.Adafactor``.

    Accepts the same keyword arguments and follows the same trajectory on identical inputs (tested),
    without its per-parameter host synchronisation (the parameter scale stays a 0-d tensor).
    Matrices keep ``rows + cols`` second-moment entries, vectors a full one; with ``beta1`` a full
    first moment is added.

    With ``relative_step=True`` the step does not read ``lr``: one written into such a group later is refused at the
    next step but ``None``, ``0.0`` and the step size :meth:`_get_lr` reports (transformers' ``AdafactorSchedule``
    writes it there; :meth:`_check_written_lr`).

    Differences from ``torch.optim.Adafactor`` (documented in ``docs/optimizers.md``): torch uses
    ``beta2_decay=-0.8`` with ``eps1=None`` (dtype-based), no update clipping threshold argument,
    no relative step / parameter scaling, no first moment, and weight decay ``lr * wd``.

    Args:
        params: Parameters or parameter groups.
        lr (`float` or `None`, defaults to `None`): External learning rate; requires ``relative_step=False``.
        eps (`tuple[float, float]`, defaults to `(1e-30, 1e-3)`): ``eps1`` added to ``g^2``; ``eps2``
            floor of the parameter scale.
        clip_threshold (`float`, defaults to `1.0`): Update clipping threshold ``d``.
        decay_rate (`float`, defaults to `-0.8`): ``beta2_t = 1 - t^decay_rate``.
        beta1 (`float` or `None`, defaults to `None`): First-moment decay; ``None`` keeps none.
        weight_decay (`float`, defaults to `0.0`): Decoupled, scaled by the step size.
        scale_parameter (`bool`, defaults to `True`): Scale the step by ``max(eps2, RMS(param))``.
        relative_step (`bool`, defaults to `True`): Step size ``min(1e-2, 1/sqrt(t))``.
        warmup_init (`bool`, defaults to `False`): Step size ``min(1e-6 t, 1/sqrt(t))``.
        state_dtype (`str`, defaults to `"float32"`): Storage of the statistics.
        foreach (`bool` or `None`, defaults to `None`): `None` steps float32 vectors and matrices in
            multi-tensor buckets (``functional.adafactor_foreach_``, equal to the per-parameter
            step); `False` forces the per-parameter step.
    """

    recipe = ADAFACTOR

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        state_dtype: str = "float32",
        foreach: bool | None = None,
    ):
        super().__init__(
            params, foreach=foreach, lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
            weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
            warmup_init=warmup_init, state_dtype=state_dtype,
        )

    def _get_lr(self, param_group: dict[str, Any], param_state: dict[str, Any]) -> float:
        """The step size of ``param_group``'s last step, as a float: transformers' ``Adafactor._get_lr(param_group,
        param_state)``, which ``transformers.optimization.AdafactorSchedule`` calls (with the state of the group's
        first parameter) to report the relative step size as the scheduler's lr. ``rho_t`` (the relative step size
        at the state's step count ``t``; 1 before the first step, or ``lr`` without ``relative_step``) times
        ``max(eps2, RMS(X))`` with ``scale_parameter``, ``X`` the group's first parameter as it is now
        (transformers keeps ``RMS(X_{t-1})`` as a float in its state; lowmem keeps no float, so after step ``t`` the
        scale is that of ``X_t``: a report, not what the step uses). One host read of the parameter's RMS."""
        step = param_state.get("step") if isinstance(param_state, dict) else None
        t = max(1.0, float(step)) if step is not None else 1.0
        rho = adafactor_relative_lr(t, param_group["warmup_init"]) if param_group["relative_step"] else param_group["lr"]
        if not param_group["scale_parameter"]:
            return float(rho)
        p = param_group["params"][0]
        with torch.no_grad():
            scale = adafactor_param_scale(p.detach().float(), param_group["eps"][1])
            if hasattr(scale, "full_tensor"):  # (an FSDP2 parameter: its norm reduced over the shards, a replicated 0-d)
                scale = scale.full_tensor()
        return float(scale) * float(rho)

    def _check_written_lr(self, group: dict[str, Any], where: str) -> dict[str, Any]:
        """An ``lr`` found in a ``relative_step`` group after construction (written later, or loaded by
        ``load_state_dict``), which the step does not use (it computes its own step size): accepted when it changes
        nothing a user meant, ``None``, ``0.0`` (torch.distributed.checkpoint's state initialization steps once
        with ``lr = 0.0``) or the step size :meth:`_get_lr` reports now (what transformers' ``AdafactorSchedule``
        writes there after each step; relative tolerance 1e-5, a checkpoint resumed on another device); any other
        value is refused (a user's ``group["lr"] = 1e-3`` would be ignored without a word). Returns the group as
        the recipe's cross-field check (:func:`_check_adafactor_group`) is to see it: with ``lr = None`` when the
        value is such a report. Called by :func:`~lowmem.optim.group_layout.check_group_settings`.

        Raises:
            ValueError: ``Invalid lr=<value> in <where>: relative_step=True computes its own step size ...``
                naming the accepted values and ``relative_step=False`` for an external learning rate.
        """
        lr = group.get("lr")
        if lr is None or not group.get("relative_step"):
            return group
        x = lr.item() if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            if x == 0:
                return {**group, "lr": None}
            params = group.get("params") or []
            if params:
                reported = self._get_lr(group, self.state.get(params[0], {}))
                if math.isclose(float(x), reported, rel_tol=1e-5, abs_tol=0.0):
                    return {**group, "lr": None}
        raise ValueError(
            f"Invalid lr={lr!r} in {where}: relative_step=True computes its own step size and does not use lr; expected "
            "None (0.0, and the step size Adafactor._get_lr reports, which transformers' AdafactorSchedule writes "
            "there, are accepted: they change nothing). For an external learning rate set relative_step=False "
            "(and usually scale_parameter=False) in the group"
        )


register(ADAMW, AdamW, state_precision="fp32", second_moment="full")
register(ADAFACTOR, Adafactor, state_precision="fp32", second_moment="factored", example_hparams={"lr": 1e-2, "relative_step": False, "scale_parameter": False})
