"""Ending a process of a ``torch.distributed`` process group without interpreter finalization.

A 2-process gloo run (``torchrun`` / ``accelerate launch`` on CPU, ``mp.spawn`` workers) can abort *after* it has
finished and saved: "terminate called without an active exception", SIGABRT (exit -6; torchrun then reports the
launch failed). The cause (a core dump's backtrace of the aborting thread, ``pt_gloo_runloop``; torch 2.13,
CPython 3.11): ``ProcessGroupGloo::runLoop`` drops the ``Work`` it ran after ``wait()`` has returned to Python;
holding its last reference it runs ``~AsyncWork``, whose tensors are Python tensors, so c10's
``TensorImpl::decref_pyobject`` (``noexcept``) takes the GIL. If the main thread has meanwhile entered interpreter
finalization, CPython's ``take_gil`` calls ``pthread_exit``, whose forced unwind through that ``noexcept`` frame
is ``std::terminate``. The window is the worker starting to wait for the GIL within a switch interval before
finalization: rare, under CPU load; tests/test_experts_gloo_exit.py forces it every time.
``destroy_process_group()`` alone does not prevent it: gloo's ``shutdown`` does not wait for its workers, and the
group lives on while something (FSDP2's device mesh, a sharded module) still holds it.

:func:`exit_process` ends such a process the way a normal exit would, less the finalization: the process
group destroyed, the ``atexit`` handlers run (logging's flush, ...), stdout / stderr flushed, ``os._exit(code)``.
Without finalization no thread is made to exit through ``pthread_exit``. Call it on the success and user-error
paths only: an unexpected exception should still end the process with its traceback.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn

__all__ = ["exit_if_distributed", "exit_process"]


def _process_group_initialized() -> bool:
    """Whether this process is in an initialized ``torch.distributed`` process group (without importing
    torch when nothing did)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def exit_process(code: int | None = 0, *, distributed: bool | None = None) -> NoReturn:
    """End this process with exit status ``code`` (``None`` is 0, as for ``sys.exit``).

    ``distributed=None`` (the default): when ``torch.distributed`` is initialized here, destroy the process
    group, run the ``atexit`` handlers, flush stdout / stderr and ``os._exit(code)`` (no interpreter
    finalization, so no gloo worker thread can abort the exit: see the module's docstring); otherwise
    ``sys.exit(code)``, the ordinary exit. ``distributed=True`` takes the first path even when the process
    group has already been destroyed (its gloo threads may outlive ``destroy_process_group()`` while the group
    is still referenced: a worker's ``finally: dist.destroy_process_group()`` followed by this call);
    ``distributed=False`` always exits through ``sys.exit``.

    An ``os._exit`` is not an exception: in a ``torch.multiprocessing.spawn`` worker call it after the work has
    returned normally (an exception raised before it still reaches ``spawn``'s error handling and fails the
    parent's ``join``), and never in a process that must go on (pytest's own process).
    """
    code = 0 if code is None else code
    if not isinstance(code, int) or isinstance(code, bool):
        raise TypeError(f"exit_process: code must be an int exit status (0-255), got {code!r}")
    if distributed is None:
        distributed = _process_group_initialized()
    if not distributed:
        sys.exit(code)
    if _process_group_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced streams: nothing left to flush
            pass
    os._exit(code)


def exit_if_distributed(code: int | None) -> int | None:
    """For an entry point that returns its exit status (``sys.exit(main())``, a console script): in a process of
    an initialized process group, :func:`exit_process` (``code``; never returns); otherwise ``code`` unchanged, so a
    caller in the same process (a test calling ``main([...])``) still gets the status back."""
    if _process_group_initialized():
        exit_process(code, distributed=True)
    return code
