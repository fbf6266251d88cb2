"""``MemoryCallback``: peak memory by component during any Trainer run (HF ``Trainer``, TRL's SFT,
DPO, GRPO, and lowmem's GVPO / BNPO trainers, which are all ``transformers.Trainer`` subclasses).

Per optimizer step it records

* ``weights`` - live bytes of parameters, buffers and bitsandbytes 4-bit constants;
* ``gradients`` - live gradient bytes just before the optimizer step (when all exist);
* ``optimizer_states`` - live bytes of the optimizer's state after the step;
* ``activations`` - on CUDA the allocator's peak of the step (``max_memory_allocated``) minus the
  three above; on CPU, for the first ``track_steps`` steps, the maximum of live activation and
  temporary tensors tracked by :class:`lowmem.memory.measure.PeakTracker` (a dispatch mode: slow,
  hence only a few steps);
* ``peak`` - CUDA: ``max_memory_allocated`` of the step; CPU: the tracked peak of live tensors;
* ``ddp_buckets`` - under ``DistributedDataParallel`` (several processes without FSDP) with
  ``gradient_as_bucket_view=False`` (the Trainer's default): the reducer's gradient buckets, the bytes it reports
  (:func:`lowmem.memory.measure.ddp_bucket_sizes`; on CPU the tracker labels their storages so, and they are not in
  ``activations``; on CUDA they are taken out of ``peak - (weights + gradients + optimizer_states)`` with the rest).

and per evaluation

* ``evaluation`` - the peak of an evaluation (weights, the optimizer state alive then, the eval batch's
  activations; ``per_device_eval_batch_size`` rows): CUDA ``max_memory_allocated`` from the end of the step
  before (or the start of training) to ``on_evaluate``; CPU the live-tensor tracker over the first prediction
  step of each evaluation, for trainers that call :meth:`MemoryCallback.evaluation_step` (every
  :class:`~lowmem.trainers.LowMemOptimizerMixin` trainer does). It can exceed ``peak``: 64 eval rows
  against training batches of 8 did by 39% on the tiny Llama (2.53 vs 1.82 MiB; tests/test_endrun_memory.py).

Under FSDP2 every component is this process's: ``live_bytes`` counts a ``DTensor``'s local shard (and the tensors
any wrapper subclass holds, e.g. torchao's quantized optimizer state), so ``weights``, ``gradients`` and
``optimizer_states`` are the rank's shards (2 CPU processes, tiny Llama, adamw: ``optimizer_states`` 334,164 bytes on
process 0, its ``state_bytes()``, of 667,220 unsharded).

``callback.peak`` keeps each component's maximum over the run; every log line gets
``memory/<component>_mib`` entries (also added to ``trainer.state.log_history``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from transformers import TrainerCallback

from lowmem.memory.measure import PeakTracker, ddp_bucket_sizes, find_ddp, live_bytes, quant_state_tensors

MIB = 1024**2
COMPONENTS = ("weights", "gradients", "optimizer_states", "activations", "ddp_buckets", "peak", "evaluation")


class MemoryCallback(TrainerCallback):
    """Log peak memory by component during training.

    Args:
        track_steps (`int`, defaults to `2`): On CPU, how many optimizer steps to run under the
            live-tensor tracker (activations and the peak come from it; later steps log weights,
            gradients and optimizer state only). ``0`` disables tracking. Ignored on CUDA, where the
            allocator's statistics are used at every step.
    """

    def __init__(self, track_steps: int = 2):
        self.track_steps = track_steps
        self.peak: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self._tracker: PeakTracker | None = None
        self._step: dict[str, int] = {}
        self._steps_seen = 0
        self._eval_tracked = False  # the current evaluation's first prediction step was tracked (CPU)
        self._ddp_buckets = 0  # DDP's gradient buckets (bytes), found at the first step

    def _update(self, key: str, value: int) -> None:
        self._step[key] = max(self._step.get(key, 0), int(value))
        self.peak[key] = max(self.peak.get(key, 0), int(value))

    @staticmethod
    def _cuda(model: torch.nn.Module) -> bool:
        p = next(model.parameters(), None)
        return p is not None and p.device.type == "cuda"

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            return
        self._step = {}
        self._update("weights", live_bytes([*model.parameters(), *model.buffers(), *quant_state_tensors(model)]))
        if self._steps_seen == 0:
            ddp = find_ddp(model)  # (DDP wraps the model before the first step; the buckets' bytes do not change)
            self._ddp_buckets = sum(ddp_bucket_sizes(ddp)) if ddp is not None and not ddp.gradient_as_bucket_view else 0
        if self._ddp_buckets:
            self._update("ddp_buckets", self._ddp_buckets)
        if self._cuda(model):
            torch.cuda.reset_peak_memory_stats()
        elif self._steps_seen < self.track_steps:
            self._tracker = PeakTracker(model, optimizer)
            self._tracker.__enter__()

    def training_inputs(self, inputs: Any) -> None:
        """The micro-batch a training step runs on (``LowMemOptimizerMixin.training_step`` hands it over): during a
        tracked CPU step its tensors are counted in ``activations`` (:meth:`PeakTracker.track_inputs`). The Trainer
        fetches the batch before ``on_step_begin``; no operator returns it, so the tracker did not see it (DPO 4 pairs x
        66 tokens: ``input_ids``, ``attention_mask``, ``completion_mask``, 12,672 B)."""
        if self._tracker is not None:
            self._tracker.track_inputs(inputs)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self._cuda(model):
            torch.cuda.reset_peak_memory_stats()  # eval_on_start's peak: from here

    @contextlib.contextmanager
    def evaluation_step(self, model: torch.nn.Module, optimizer: Any = None) -> Iterator[None]:
        """Around one prediction step of an evaluation (``LowMemOptimizerMixin.prediction_step``): on CPU the
        first of each evaluation runs under the live-tensor tracker, and its peak total is ``evaluation``."""
        if self.track_steps == 0 or self._eval_tracked or self._tracker is not None or self._cuda(model):
            yield
            return
        self._eval_tracked = True
        tracker = PeakTracker(model, getattr(optimizer, "optimizer", optimizer))
        with tracker:
            yield
        self.peak["evaluation"] = max(self.peak.get("evaluation", 0), int(tracker.peak["total"]))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._eval_tracked = False
        if model is not None and self._cuda(model):
            self.peak["evaluation"] = max(self.peak.get("evaluation", 0), int(torch.cuda.max_memory_allocated()))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._update("gradients", live_bytes(p.grad for p in model.parameters() if p.grad is not None))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            return
        self._steps_seen += 1
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        if opt is not None:
            self._update("optimizer_states", live_bytes(v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)))
        if self._cuda(model):
            peak = torch.cuda.max_memory_allocated()
            self._update("peak", peak)
            fixed = sum(self._step.get(k, 0) for k in ("weights", "gradients", "optimizer_states", "ddp_buckets"))
            self._update("activations", max(0, peak - fixed))
            torch.cuda.reset_peak_memory_stats()  # an evaluation after this step: its own peak (on_evaluate)
        elif self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self._update("activations", self._tracker.maxima["activations"])
            if self._tracker.maxima.get("ddp_buckets"):  # (the labelled storages: the reducer's sizes)
                self._update("ddp_buckets", self._tracker.maxima["ddp_buckets"])
            self._update("peak", self._tracker.peak["total"])
            self._tracker = None
        self.history.append({"step": state.global_step, **self._step})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.peak:
            return
        entries = {f"memory/{k}_mib": round(v / MIB, 3) for k, v in self.peak.items()}
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)

    def on_train_end(self, args, state, control, **kwargs):
        if self._tracker is not None:  # training stopped inside a tracked step
            self._tracker.__exit__(None, None, None)
            self._tracker = None
