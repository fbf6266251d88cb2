"""lowmem optimizers: one engine (:mod:`.engine`), many recipes (:mod:`.recipes`), one registry.

Layout, following the engine's seams:

* :mod:`.functional` - pure update math, one module per paper, citing equations.
* :mod:`.moments` - moment rules (Adam, factored, ...) and learning-rate rules.
* :mod:`.subspace` - projections and residual rules; :mod:`.stabilizers` - gradient stabilizers.
* :mod:`.engine` - ``Recipe`` and ``LowMemOptimizer`` (state, validation, the loop).
* :mod:`.recipes` - the named optimizers; :mod:`.registry` - names, grouping, ``create_optimizer``.
* :mod:`.step_memory` - a step's peak memory measured in a fresh process (docs/memory.md's table).
"""

from .engine import LowMemOptimizer, Recipe
from .recipes import ADAFACTOR, ADAMW, Adafactor, AdamW
from .recipes.compressed import SPAM, AdamW4bit, AdamW8bit, MicroAdam, StableSPAM
from .registry import (
    OptimizerEntry,
    build_param_groups,
    bytes_per_param,
    create_optimizer,
    get_entry,
    list_optimizers,
    optimizer_entries,
    register,
)

__all__ = [
    "SPAM", "AdamW4bit", "AdamW8bit", "MicroAdam", "StableSPAM",
    "Adafactor",
    "AdamW",
    "LowMemOptimizer",
    "OptimizerEntry",
    "Recipe",
    "build_param_groups",
    "bytes_per_param",
    "create_optimizer",
    "get_entry",
    "list_optimizers",
    "optimizer_entries",
    "register",
]
from .recipes.subspace import FiraAdamW, Frugal, GaLoreAdafactor, GaLoreAdamW, OnlineSubspaceDescent  # noqa: E402
from .recipes.apollo import APOLLOAdamW  # noqa: E402
from .recipes.adam_mini import AdamMini  # noqa: E402
from .recipes.normalized import Muon, Scale, SinkGD  # noqa: E402
from .recipes.lion import Lion, Lion8bit  # noqa: E402
from .recipes.came import CAME  # noqa: E402
from .recipes.normuon import NorMuon  # noqa: E402
from .recipes.sm3 import SM3  # noqa: E402
from .recipes.racs import RACS  # noqa: E402
from .recipes.ademamix import AdEMAMix, AdEMAMix8bit  # noqa: E402
from .recipes.classic import SGD_ as SGD, Adagrad, RMSprop  # noqa: E402
from .recipes.stable_adamw import StableAdamW  # noqa: E402

__all__ += ["FiraAdamW", "Frugal", "GaLoreAdafactor", "GaLoreAdamW", "OnlineSubspaceDescent",
            "APOLLOAdamW", "AdamMini", "Muon", "Scale", "SinkGD", "Lion", "Lion8bit", "CAME"]
__all__ += ["NorMuon", "SM3", "RACS", "AdEMAMix", "AdEMAMix8bit", "SGD", "Adagrad", "RMSprop", "StableAdamW"]
