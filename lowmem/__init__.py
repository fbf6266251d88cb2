"""lowmem: fine-tune and post-train LLMs in far less GPU memory.

Public entry points::

    lowmem.list_optimizers()                                  # names of the registered optimizers (sorted)
    lowmem.create_optimizer(model, "adamw", lr=1e-3)          # any of them, groups built from the model
    lowmem.estimate_memory("llama-2-7b", "galore_adamw")      # memory of a training step, by component

They are imported on first use (PEP 562), so ``import lowmem`` and ``lowmem --help`` do not pay for
torch and transformers.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"


def _quiet_bitsandbytes_hub_kernel_notice() -> None:
    """bitsandbytes logs, on CPUs with AVX512-BF16, that an optional kernel it would download from
    the Hugging Face Hub (``kernels``) is missing. lowmem never downloads and tests bitsandbytes'
    own CPU fallback, so that one record is dropped (a filter on its logger: every other record of
    bitsandbytes still shows). ``LOWMEM_DEBUG=1`` keeps it."""
    import logging
    import os

    if os.environ.get("LOWMEM_DEBUG"):
        return

    class _DropHubKernelNotice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHubKernelNotice())


_quiet_bitsandbytes_hub_kernel_notice()

_LAZY = {
    "create_optimizer": "lowmem.optim",
    "list_optimizers": "lowmem.optim",
    "estimate_memory": "lowmem.memory",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowmem' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
