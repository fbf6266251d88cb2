"""Recipes: each paper's optimizer as a short composition of engine parts, plus its registry line.

* :mod:`.full_rank` - AdamW (reference baseline), Adafactor.
* :mod:`.subspace` - GaLore, Fira, FRUGAL, Online Subspace Descent (projected state).
* :mod:`.compressed` - MicroAdam, 8-bit / 4-bit states, SPAM / Stable-SPAM.

Importing this package registers every recipe.
"""

from . import bnb, compressed, full_rank, subspace  # noqa: F401  (registration happens on import)
from .full_rank import ADAFACTOR, ADAMW, Adafactor, AdamW

__all__ = ["ADAFACTOR", "ADAMW", "Adafactor", "AdamW"]
