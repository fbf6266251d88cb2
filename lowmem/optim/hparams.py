"""Hyperparameter specifications: defaults, validation and documentation in one place.

Each recipe lists its :class:`HParam` entries. Optimizers validate every parameter group against
them, so a bad value fails at construction (or in ``add_param_group``) with an error that names
the value and the valid range, instead of producing NaNs a thousand steps later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class HParam:
    """One hyperparameter of a recipe.

    Args:
        name: Keyword used in constructors, ``create_optimizer`` and parameter groups.
        default: Value used when the caller gives none.
        check: Predicate that accepts valid values.
        valid: Human-readable description of the valid values, used in error messages.
        doc: One line on what the value means.
        group_only: If true the value only makes sense per parameter group (e.g. GaLore's
            ``rank``), and ``None`` means "this group is not projected".
    """

    name: str
    default: Any
    check: Callable[[Any], bool]
    valid: str
    doc: str

    def validate(self, value: Any, where: str = "") -> None:
        ok = False
        try:
            ok = bool(self.check(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            loc = f" in {where}" if where else ""
            raise ValueError(f"Invalid {self.name}={value!r}{loc}: expected {self.valid}.")


# ---- predicates -----------------------------------------------------------------------------


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def nonneg(x: Any) -> bool:
    return _is_real(x) and x >= 0


def positive(x: Any) -> bool:
    return _is_real(x) and x > 0


def in_unit_interval(x: Any) -> bool:
    """``0 <= x < 1``."""
    return _is_real(x) and 0 <= x < 1


def betas_pair(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(in_unit_interval(b) for b in x)


def optional(pred: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or pred(x)


def positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda x: x in choices


def is_bool(x: Any) -> bool:
    return isinstance(x, bool)


# ---- common entries -------------------------------------------------------------------------


def LR(default: float | None = 1e-3) -> HParam:  # noqa: N802 - reads like a constant
    return HParam("lr", default, nonneg, "a finite float >= 0", "learning rate (parameter units per unit update)")


def BETAS(default: tuple[float, float] = (0.9, 0.999)) -> HParam:  # noqa: N802
    return HParam(
        "betas", tuple(default), betas_pair, "a pair (beta1, beta2) with 0 <= beta < 1",
        "decay rates of the first and second moment EMAs",
    )


def EPS(default: float = 1e-8) -> HParam:  # noqa: N802
    return HParam("eps", default, nonneg, "a finite float >= 0", "added to the denominator for numerical stability")


def WEIGHT_DECAY(default: float = 0.0) -> HParam:  # noqa: N802
    return HParam("weight_decay", default, nonneg, "a finite float >= 0", "decoupled weight decay coefficient")


STATE_DTYPE = HParam(
    "state_dtype", "float32", one_of("float32", "bfloat16", "param"),
    "one of 'float32', 'bfloat16', 'param'",
    "storage dtype of float optimizer states ('param' = same dtype as the parameter)",
)

FOREACH = HParam(
    "foreach", None, optional(is_bool), "None, True or False",
    "use the multi-tensor path where the recipe has one (None = automatically); False forces the"
    " single-tensor reference path",
)

ENGINE_HPARAMS = (STATE_DTYPE, FOREACH)  # accepted by every engine optimizer
