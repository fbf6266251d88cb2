"""lowmem: fine-tune and post-train LLMs in far less GPU memory.

Public entry points::

    lowmem.list_optimizers()                       # registered optimizers
    lowmem.create_optimizer(model, "adamw", lr=1e-3)
"""

from .optim import create_optimizer, list_optimizers
from .memory import estimate_memory

__version__ = "0.1.0"
__all__ = ["__version__", "create_optimizer", "list_optimizers"]
