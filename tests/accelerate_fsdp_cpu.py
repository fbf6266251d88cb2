"""Test-only helpers of the processes the distributed tests start: accelerate's FSDP on CPU processes (gloo),
so the Trainer's FSDP2 path is tested here, and an exit that cannot abort in gloo's threads.

accelerate (1.15) switches ``AcceleratorState.distributed_type`` to ``FSDP`` only for GPU / accelerator
processes (``MULTI_GPU``, ``MULTI_NPU``, ...: the branch in ``AcceleratorState.__init__`` that reads
``ACCELERATE_USE_FSDP`` / ``fsdp_plugin``); ``MULTI_CPU`` processes keep DDP. :func:`fsdp_on_cpu_processes`
applies that same branch to ``MULTI_CPU``: after accelerate's own ``__init__``, a ``MULTI_CPU`` state
given an FSDP plugin becomes ``FSDP`` with that plugin, and (as accelerate does at the end of its
``__init__``) the shared ``PartialState`` records the type, so later ``AcceleratorState()`` calls (e.g.
``AcceleratedOptimizer``'s) keep it. Nothing else is changed: the Trainer, ``Accelerator.prepare``
(``fsdp2_prepare_model``: ``fully_shard`` per decoder layer, the optimizer's parameters switched to the
sharded ones), gradient clipping and the checkpoints (``torch.distributed.checkpoint``) are the real code.
"""

from __future__ import annotations


def fsdp_on_cpu_processes() -> None:
    """Patch ``accelerate.state.AcceleratorState.__init__`` in this process (idempotent)."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    if getattr(AcceleratorState.__init__, "_lowmem_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # accelerate's condition for MULTI_GPU & co. (the Accelerator passes the plugin it built from
        # ACCELERATE_USE_FSDP / FSDP_* or from TrainingArguments' fsdp_config)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    __init__._lowmem_fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__


def exit_without_finalizing(code: int = 0) -> None:
    """End a process of a gloo process group without interpreter finalization: ``lowmem.dist_exit.exit_process``
    with ``distributed=True`` (``destroy_process_group()`` if still initialized, the ``atexit`` handlers, flush,
    ``os._exit(code)``), also after the caller's own ``finally: dist.destroy_process_group()``.

    Why (the module docstring of lowmem/dist_exit.py has the whole backtrace): a gloo worker thread dropping a
    finished collective's ``Work`` takes the GIL; if the main thread has entered interpreter finalization, that
    thread is made to ``pthread_exit`` through a ``noexcept`` frame: ``std::terminate``, SIGABRT (-6) after the
    run passed. Call it on the success path only: an exception should still end the process with its traceback
    (tests/test_experts_gloo_exit.py).
    """
    from lowmem.dist_exit import exit_process

    exit_process(code, distributed=True)
