"""Pure update math on tensors, one module per paper.

Every function is small and free of optimizer bookkeeping: it takes tensors and numbers and returns
(or updates in place, when the name ends in ``_``) tensors, and its docstring cites the equation it
implements. Classes in :mod:`lowmem.optim.moments`, :mod:`lowmem.optim.subspace` and
:mod:`lowmem.optim.stabilizers` hold state and call these.

Notation: ``g`` gradient, ``m`` first moment, ``v`` second moment, ``t`` 1-based step count,
``lr`` learning rate (parameter units per unit of update).
"""

from .adafactor import (
    adafactor_beta2,
    adafactor_direction_foreach,
    adafactor_foreach_,
    adafactor_lr_foreach,
    adafactor_param_scale,
    adafactor_relative_lr,
    clip_by_rms_,
    factored_rsqrt,
    factored_second_moment_,
    rms,
)
from .adam import (
    adam_direction,
    adam_direction_foreach,
    adam_direction_hf,
    adam_moments_,
    adam_moments_foreach_,
    adamw_foreach_,
    apply_update_,
    compute_float,
    decoupled_weight_decay_,
)

__all__ = [
    "compute_float",
    "adafactor_beta2", "adafactor_direction_foreach", "adafactor_foreach_", "adafactor_lr_foreach", "adafactor_param_scale", "adafactor_relative_lr", "adam_direction", "adam_direction_foreach",
    "adam_direction_hf", "adam_moments_", "adam_moments_foreach_", "adamw_foreach_", "apply_update_", "clip_by_rms_",
    "decoupled_weight_decay_", "factored_rsqrt", "factored_second_moment_", "rms",
]
