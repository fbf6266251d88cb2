"""Full-rank recipes: AdamW (the reference baseline) and Adafactor.

Each recipe is a few lines composing engine parts; each class is a thin constructor with the
signature users know (``torch.optim.AdamW``, ``transformers.optimization.Adafactor``).
"""

from __future__ import annotations

from typing import Any, Iterable

from ..engine import LowMemOptimizer, Recipe
from ..hparams import BETAS, EPS, LR, WEIGHT_DECAY, HParam, is_bool, nonneg, optional, in_unit_interval
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
    """

    recipe = ADAMW

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_dtype: str = "float32",
        foreach: bool | None = None,
    ):
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype, foreach=foreach
        )


def _eps_pair(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(nonneg(e) for e in x)


def _check_adafactor_group(group: dict[str, Any]) -> None:
    if group["lr"] is not None and group["relative_step"]:
        raise ValueError("Cannot combine manual `lr` and `relative_step=True` options (Adafactor)")
    if group["warmup_init"] and not group["relative_step"]:
        raise ValueError("`warmup_init=True` requires `relative_step=True` (Adafactor)")
    if group["lr"] is None and not group["relative_step"]:
        raise ValueError("Adafactor needs `lr` when `relative_step=False`")


ADAFACTOR_HPARAMS = (
    HParam("lr", None, optional(nonneg), "None or a finite float >= 0", "external learning rate (requires relative_step=False)"),
    HParam("eps", (1e-30, 1e-3), _eps_pair, "a pair (eps1, eps2) of floats >= 0", "regularizer of g^2, and floor of the parameter scale"),
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


register(ADAMW, AdamW, state_precision="fp32", second_moment="full")
register(ADAFACTOR, Adafactor, state_precision="fp32", second_moment="factored", example_hparams={"lr": 1e-2, "relative_step": False, "scale_parameter": False})
