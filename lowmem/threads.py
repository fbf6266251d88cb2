"""CPU thread count for lowmem's commands.

torch starts one OpenMP thread per core in every process. When several processes share the cores
(``pytest -n 2``, ``accelerate launch --num_processes 2`` on CPU, or other jobs on the machine), the
threads oversubscribe the cores and spin-wait on each other: on a loaded 2-core machine one test
file took 121 s instead of 48 s, and ``lowmem bench`` step-time ratios swung from 0.07x to 554x.
``lowmem train`` and ``lowmem bench`` therefore choose the count themselves unless the user set
``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def env_threads() -> int | None:
    """``OMP_NUM_THREADS`` as an int, ``None`` when unset; anything else is a ValueError."""
    raw = os.environ.get("OMP_NUM_THREADS")
    if raw is None or raw.strip() == "":
        return None
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {raw!r}")
    return n


def default_threads(cap: int | None = None) -> int:
    """Threads per process when the user did not choose: ``OMP_NUM_THREADS`` if set, else the cores
    shared out among the local processes of a launch (``LOCAL_WORLD_SIZE``, set by torchrun and
    accelerate), at most ``cap``."""
    n = env_threads()
    if n is not None:
        return n
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    n = max(1, available_cores() // max(1, procs))
    return min(n, cap) if cap else n


def set_threads(n: int | None = None, cap: int | None = None) -> int:
    """Set torch's intra-op thread count to ``n`` (``None``: :func:`default_threads`) and return it."""
    import torch

    if n is None:
        n = default_threads(cap)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    torch.set_num_threads(n)
    return n


def set_train_threads(model: str | None) -> int:
    """``lowmem train``'s thread count: ``OMP_NUM_THREADS`` if set; else 1 for the embedded tiny model
    (``model is None``: its matrices are too small for threads to pay; on a loaded 2-core machine the
    default recipe took 53-68 s with torch's default threads and 12-14 s with one); else
    :func:`default_threads` (the cores shared among a launch's local processes)."""
    return set_threads(env_threads() or (1 if model is None else default_threads()))
