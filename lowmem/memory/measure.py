"""Measure what is live at the peak of real training steps, by component, beside the estimate.

Live tensors are tracked with ``torch.distributed._tools.mem_tracker.MemTracker`` (a
``TorchDispatchMode`` that follows every storage with a weak reference and labels it parameter,
buffer, gradient, optimizer state, activation or temporary): on CPU this is the measurement; on
CUDA it gives the split by component, and the caching allocator's ``max_memory_allocated`` gives
the ground-truth peak. bitsandbytes' 4-bit constants (``quant_state`` tensors) and 8-bit row scales (``SCB``)
are registered as external tensors and reported as ``quant_constants``.

Mapping to :data:`~lowmem.memory.estimate.COMPONENTS`: parameters and buffers -> ``weights``;
gradients -> ``gradients``; optimizer states -> ``optimizer_states``; activations and temporaries
(gradients of activations, scratch) -> ``activations``; other registered tensors ->
``quant_constants``; a ``DistributedDataParallel`` model's gradient buckets -> ``ddp_buckets``
(:func:`find_ddp`; without this label torch's tracker filed them under activations).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .estimate import COMPONENTS, MemoryEstimate, estimate_memory, parse_dtype, resolve_config

_CATEGORY = {
    "Parameter": "weights", "Buffer": "weights", "Gradient": "gradients", "Optstate": "optimizer_states",
    "Activation": "activations", "Temp": "activations", "Other": "quant_constants", "DDP buckets": "ddp_buckets",
}


def snapshot_components(snap: dict[str, int]) -> dict[str, int]:
    """A ``MemTracker`` per-device snapshot (reference-type name -> bytes) as our components."""
    out = dict.fromkeys(COMPONENTS, 0)
    for key, value in snap.items():
        name = getattr(key, "value", key)
        if name in _CATEGORY:
            out[_CATEGORY[name]] += int(value)
    out["total"] = sum(out[c] for c in COMPONENTS)  # a snapshot at one moment: every row is live
    return out


def quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors of every bitsandbytes ``quant_state`` in ``model`` (4-bit: absmax, code books, offsets) and the
    per-row float32 scales of its 8-bit weights (``Int8Params.SCB``, which ``Linear8bitLt``'s first forward moves to
    the layer's ``state.SCB``)."""
    out, seen = [], set()

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out.append(t)

    for p in model.parameters():
        add(getattr(p, "SCB", None))
        qs = getattr(p, "quant_state", None)
        while qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                add(t)
            qs = getattr(qs, "state2", None)
    for m in model.modules():
        if type(getattr(m, "state", None)).__name__ == "MatmulLtState":
            add(m.state.SCB)
    return out


class _NoHook:
    def remove(self) -> None:
        pass


def op_workspace_bytes(func: Any, args: tuple, kwargs: dict) -> list[int]:
    """The storages an operator allocates and frees inside its own kernel, which a ``TorchDispatchMode`` (the
    tracker) cannot see: it sees the operator as one call and its outputs only. bitsandbytes' ``gemm_4bit`` (its 4-bit
    linear on the CPU, forward and no-grad: ``_gemm_4bit_default_impl``) de-quantizes the whole weight in the input's
    dtype (``dequantize_4bit``: ``prod(shapeB)`` elements) and, with double quantization (``absmax_8bit``), first the
    blocks' float32 scales (``dequantize_blockwise(...) + absmax_offset``: one float32 per block kept to the end),
    both alive when its ``linear`` allocates the output. Returns those bytes in the order the kernel allocates them
    (empty for every other operator, and off the CPU: bitsandbytes' CUDA ``gemm_4bit`` runs a fused kernel without
    the copy up to some rows and de-quantizes above, its own heuristic; the allocator's peak measures it there). Before 2026-12-01 the tracker missed them: a tiny Llama nf4 LoRA step without
    checkpointing measured its forward's peak 704,640 B low (the 688 x 256 float32 ``down_proj`` weight and the
    absmax), so the peak read in the backward and the (right) traced estimate read 1.0105 / 1.0317 of it."""
    if getattr(func, "namespace", None) != "bitsandbytes" or func.__name__ != "gemm_4bit.default":
        return []
    a, shape = args[0], args[2]
    if a.device.type != "cpu":  # (CUDA picks a fused kernel without the copy for few rows: not counted there)
        return []
    scales = (kwargs.get("absmax_8bit") if "absmax_8bit" in kwargs else (args[7] if len(args) > 7 else None))
    out = [] if scales is None else [4 * scales.numel()]
    n = 1
    for d in shape:
        n *= int(d)
    return out + [n * a.element_size()]


def find_ddp(model: nn.Module) -> Any:
    """The ``torch.nn.parallel.DistributedDataParallel`` that wraps ``model`` (``model`` itself if it is one), or
    ``None``: without a process group of more than one process, or when nothing wraps it. A ``Trainer``'s callbacks get
    the unwrapped model (``trainer.model``); accelerate's DDP wrapper holds it as ``.module``, found among the objects
    that refer to it."""
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    # the wrapper's _modules dict refers to the model; the wrapper (or its __dict__, which the wrapper refers to) to it
    for ref in gc.get_referrers(model):
        if isinstance(ref, dict) and ref.get("module") is model:
            for owner in gc.get_referrers(ref):
                for wrapper in [owner, *(gc.get_referrers(owner) if isinstance(owner, dict) else [])]:
                    if isinstance(wrapper, DistributedDataParallel) and wrapper.module is model:
                        return wrapper
    return None


def ddp_bucket_sizes(ddp: Any) -> list[int]:
    """Bytes of each gradient bucket of ``ddp`` (a ``DistributedDataParallel``), as its reducer reports them
    (``_get_ddp_logging_data()["bucket_sizes"]``): the trainable parameters' gradients by dtype, in buckets of
    ``bucket_cap_mb`` (the first 1 MiB), allocated when DDP wraps the model and rebuilt once (in the order the
    gradients became ready) at the second iteration's forward."""
    sizes = str(ddp._get_ddp_logging_data().get("bucket_sizes", "") or "")
    return [int(x) for x in sizes.split(",") if x.strip()]


def _ddp_ref_type() -> Any:
    """The tracker's label of DDP's gradient buckets: a reference type of its own beside torch's
    (``_MemRefType`` cannot be extended), so that snapshots and maxima hold the buckets as a row of their own."""
    global _DDP_REF
    if _DDP_REF is None:
        from torch.distributed._tools.mem_tracker import _RefType

        class _DdpRefType(_RefType):
            DDP = "DDP buckets"

        _DDP_REF = _DdpRefType.DDP
    return _DDP_REF


_DDP_REF: Any = None


class _ReducerProxy:
    """``ddp.reducer`` during DDP's ``_pre_forward`` in a tracked region: every call goes to the reducer; ``_rebuild_buckets`` (DDP's forward of
    the second iteration, which frees the buckets and allocates them again in the gradients' ready order) runs with the
    tracker's DDP flag set, so the new buckets are labelled ``ddp_buckets`` where they are allocated."""

    def __init__(self, reducer: Any, tracker: Any) -> None:
        self._reducer, self._tracker = reducer, tracker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reducer, name)

    def _rebuild_buckets(self) -> Any:
        self._tracker._in_ddp_rebuild = True
        try:
            return self._reducer._rebuild_buckets()
        finally:
            self._tracker._in_ddp_rebuild = False


def _tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    class Tracker(MemTracker):
        """``MemTracker`` that also keeps each category's own maximum, and skips gradient hooks on
        frozen parameters (torch's tracker tries to hook them and fails, e.g. under LoRA)."""

        def __init__(self) -> None:
            super().__init__()
            self.max_by_type: dict[torch.device, dict[str, int]] = {}
            self._ddp_sizes: set[int] = set()  # bytes of the DDP buckets (set by PeakTracker under DDP)
            self._in_ddp_rebuild = False
            self._op_input_storages: set[int] = set()

        def _track(self, reftype: Any, t: torch.Tensor) -> None:
            # DDP's gradient buckets: allocated when DDP wraps the model (before the region; gradient_as_bucket_view
            # False: the reducer copies each gradient into its bucket through an as_strided view, the first the tracker
            # sees of the bucket's storage: a view of an operator's input it has not seen, of a bucket's size) or by the
            # reducer's rebuild (_ReducerProxy). torch's tracker labelled them activations / temporaries.
            if self._ddp_sizes and not is_traceable_wrapper_subclass(t):
                st = t.untyped_storage()
                if st not in self._WINFO and (self._in_ddp_rebuild or (
                        st.nbytes() in self._ddp_sizes and st.data_ptr() in self._op_input_storages)):
                    reftype = _ddp_ref_type()
            super()._track(reftype, t)

        def _update_snap(self, u_type: Any, winfo: Any, old_mem_consumed: Any = None, old_reftype: Any = None) -> None:
            if self._ddp_sizes:  # the buckets' row in every device snapshot (torch's are keyed by its own types)
                snap = self._curr_mem_snap.setdefault(winfo.device, dict.fromkeys(self._ref_class, 0))
                snap.setdefault(_ddp_ref_type(), 0)
            super()._update_snap(u_type, winfo, old_mem_consumed=old_mem_consumed, old_reftype=old_reftype)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if self._ddp_sizes:
                from torch.utils._pytree import tree_leaves

                self._op_input_storages = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs or {}))
                                           if isinstance(a, torch.Tensor) and not is_traceable_wrapper_subclass(a)}
            # an operator's own workspace (op_workspace_bytes: bitsandbytes' gemm_4bit's de-quantized weight), tracked
            # as storages of its device alive while it runs (uninitialized: no page is touched), freed after it
            sizes = op_workspace_bytes(func, args, kwargs or {})
            if not sizes:
                return super().__torch_dispatch__(func, types, args, kwargs)
            device = args[0].device
            held = [super(Tracker, self).__torch_dispatch__(torch.ops.aten.empty.memory_format, types, ([n],),
                                                            {"dtype": torch.uint8, "device": device}) for n in sizes]
            try:
                return super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                del held

        def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
            for p in module.parameters():
                if not p.requires_grad and self._param_to_grad_hook_handles.get(p, None) is None:
                    self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
            # A root module called again in forward: the next pass of the same step (generation
            # decoding steps, reference / old-policy log-probs in DPO and GRPO). torch's tracker
            # refuses it; lowmem keeps only category maxima and the peak, which survive a reset of
            # the per-module statistics.
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
                if parents == {"Global"}:
                    self.reset_mod_stats()
            super()._pre_fw_hook(module, inputs)

        # torch's hooks skip a module of None (a backward hook of peft's or an MoE layer's) with a warning
        # ("Module is None. Skipping PRE_BW hook.") that said nothing to a user: skipped here without it
        def _pre_bw_hook(self, module: nn.Module, args: Any) -> None:
            if module is not None and module in self.memory_tracking:  # else: its statistics were reset
                super()._pre_bw_hook(module, args)

        def _post_bw_hook(self, module: nn.Module, args: Any) -> None:
            if module is not None and module in self.memory_tracking:
                super()._post_bw_hook(module, args)

        def _update_and_maybe_create_winfos(self, t: Any, reftype: Any, update_existing: bool = False) -> set:
            # layerwise mode frees each gradient in its own hook, before the tracker's hook reads it:
            # None holds no storage (torch warned "Expected a tensor ... but got NoneType")
            if t is None:
                return set()
            return super()._update_and_maybe_create_winfos(t, reftype, update_existing)

        def _update_peak_stats(self, peak_state: Any) -> None:
            super()._update_peak_stats(peak_state)
            for dev, snap in self._curr_mem_snap.items():
                best = self.max_by_type.setdefault(dev, {})
                for key, value in snap.items():
                    name = getattr(key, "value", key)
                    best[name] = max(best.get(name, 0), int(value))
                act = int(snap.get(_ref("Activation"), 0)) + int(snap.get(_ref("Temp"), 0))
                best["activations"] = max(best.get("activations", 0), act)

    return Tracker


def _ref(name: str) -> Any:
    from torch.distributed._tools.mem_tracker import _MemRefType

    return _MemRefType(name)


def live_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages counted once).

    A tensor subclass that wraps others (``DTensor``: FSDP2's sharded parameters, their gradients and the optimizer
    state made from them; torchao's quantized optimizer state, ``OptimState4bit`` / ``8bit``) has no storage of its
    own (``untyped_storage().data_ptr()`` raises "invalid python storage"): the tensors it holds
    (``__tensor_flatten__``: a ``DTensor``'s local shard, torchao's codes and scales) are what this process holds,
    and those are counted. A wrapper that does not say what it holds is left out with a warning naming its type."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen, total, left_out = set(), 0, set()

    def storages(t: torch.Tensor) -> Any:
        if is_traceable_wrapper_subclass(t):
            for name in t.__tensor_flatten__()[0]:  # (a DTensor lists its device mesh there too)
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):
                    yield from storages(inner)
        else:
            yield t

    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        for inner in storages(t):
            if inner.device.type == "meta":
                continue
            try:
                st = inner.untyped_storage()
                ptr = st.data_ptr()
            except RuntimeError:  # a wrapper without __tensor_flatten__
                left_out.add(type(inner).__name__)
                continue
            if ptr not in seen:
                seen.add(ptr)
                total += st.nbytes()
    if left_out:
        warnings.warn(f"live_bytes: tensors of type {', '.join(sorted(left_out))} hold no storage of their own and do "
                      "not say what they wrap (no __tensor_flatten__): left out of the count", stacklevel=2)
    return total


class PeakTracker:
    """Track live tensors by component across a region of training steps.

    After the region, ``peak`` is the breakdown at the moment of the highest total, and
    ``maxima`` each component's own maximum (what an estimate of that component predicts).
    Optimizer-state tensors are those the optimizer holds after the region (temporaries of the
    step are in ``maxima["optimizer_step"]``, the tracker's optimizer category, which includes them).

    Usage::

        tracker = PeakTracker(model, optimizer)
        with tracker:
            for batch in batches:
                ...  # forward, backward, step, zero_grad
                tracker.next_step()
        tracker.peak, tracker.maxima
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, device: str | torch.device | None = None):
        self.tracker = _tracker_class()()
        self.ddp = find_ddp(model)
        if self.ddp is not None:
            model = self.ddp.module
            if not self.ddp.gradient_as_bucket_view:  # (views: the buckets are the gradients, labelled so)
                self.tracker._ddp_sizes = set(ddp_bucket_sizes(self.ddp))
        self.model, self.optimizer = model, optimizer
        self.tracker.track_external(model, *([optimizer] if optimizer is not None else []), *quant_state_tensors(model))
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.peak: dict[str, int] = {}
        self.maxima: dict[str, int] = {}

    def __enter__(self) -> "PeakTracker":
        # torch's ModTracker (inside MemTracker) puts a multi-grad hook on every module's inputs and outputs and never
        # removes it; the hook's closure holds the tensor's grad_fn node, a cycle through C++ that gc cannot collect,
        # and the node holds the graph down to the leaves. Under LoRA with checkpointing the embedding output is such a
        # leaf (transformers' enable_input_require_grads): it and its .grad stayed alive for every step tracked (two
        # e-h-per-token tensors a step: measured activations grew by that from step to step, and MemoryCallback's
        # process kept them). The hooks are recorded here and removed once a step's backward is over.
        import torch.distributed._tools.mod_tracker as mod_tracker

        self._mod_tracker_module, self._hook_handles = mod_tracker, []
        self._register = mod_tracker.register_multi_grad_hook

        def register(tensors: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
            # a module's inputs get a hook of mode "all" (its post-backward), which holds each input's gradient until
            # every input has one: a tensor the step itself does not keep. Mamba2's gated norm (two (b, s, 2h) inputs)
            # read 512 B per token more than the same step without the tracker (1 x 64, h=64: 10,437,392 B of
            # activations, 10,404,624 plain and traced). Mode "any" holds none (ModTracker only pops the module there)
            kwargs["mode"] = "any"
            handle = self._register(tensors, fn, *args, **kwargs)
            self._hook_handles.append(handle)
            return handle

        mod_tracker.register_multi_grad_hook = register
        self._wrap_layerwise_steps()
        self._wrap_ddp_reducer()
        try:
            self.tracker.__enter__()
        except BaseException:
            mod_tracker.register_multi_grad_hook = self._register
            self._unwrap_layerwise_steps()
            self._unwrap_ddp_reducer()
            raise
        return self

    def track_inputs(self, tensors: Any) -> None:
        """Label the tensors of a batch made before the region (the Trainer fetches a step's micro-batches before
        ``on_step_begin``) as activations: torch's tracker sees a storage only as an operator's output, so a batch's
        ``input_ids`` / ``attention_mask`` / ``completion_mask`` that no operator returns were live and uncounted (the
        estimate's ``batch_input_bytes`` holds them). Storages it already follows keep their label."""
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage() not in self.tracker._WINFO:
                self.tracker._update_and_maybe_create_winfos(t, _ref("Activation"))

    def _wrap_ddp_reducer(self) -> None:
        """DDP's ``_pre_forward`` (where the reducer rebuilds its buckets) runs with ``ddp.reducer`` a
        :class:`_ReducerProxy`; only there: elsewhere the reducer is passed to C++ (``register_comm_hook``, which
        layerwise mode calls at its first training step, inside a tracked step) and must be the reducer itself."""
        self._ddp_wrapped = False
        if not self.tracker._ddp_sizes:
            return
        ddp, tracker, pre_forward = self.ddp, self.tracker, self.ddp._pre_forward

        def tracked_pre_forward(*args: Any, **kwargs: Any) -> Any:
            reducer = ddp.reducer
            ddp.reducer = _ReducerProxy(reducer, tracker)
            try:
                return pre_forward(*args, **kwargs)
            finally:
                ddp.reducer = reducer

        ddp._pre_forward = tracked_pre_forward
        self._ddp_wrapped = True

    def _unwrap_ddp_reducer(self) -> None:
        if getattr(self, "_ddp_wrapped", False):
            del self.ddp._pre_forward  # (the class's method again)
            self._ddp_wrapped = False

    def _wrap_layerwise_steps(self) -> None:
        """Layerwise mode (:class:`~lowmem.optim.layerwise.LayerwiseOptimizer`) steps each parameter in its gradient
        hook, not in ``optimizer.step()``, where torch's tracker labels what is allocated as optimizer memory: without
        this the per-parameter steps' temporaries (and the codecs' tables their first step makes) were labelled
        activations (GPT-NeoX h=128 layerwise adamw8bit: measured activations 1.71x the activations alone, measured
        transient 0). Each per-parameter step is run with the tracker's optimizer flag set, as a plain step is."""
        self._layerwise = None
        step = getattr(self.optimizer, "_step_param", None)
        if step is None or "_step_param" in vars(self.optimizer):
            return
        tracker = self.tracker

        def tracked(*args: Any, **kwargs: Any) -> Any:
            outer = tracker._in_opt
            tracker._in_opt = True
            try:
                return step(*args, **kwargs)
            finally:
                tracker._in_opt = outer

        self.optimizer._step_param = tracked
        self._layerwise = self.optimizer

    def _unwrap_layerwise_steps(self) -> None:
        if getattr(self, "_layerwise", None) is not None:
            del self._layerwise._step_param  # (the class's method again)
            self._layerwise = None

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()

    def next_step(self) -> None:
        """Call between training steps (MemTracker keeps per-module statistics for one iteration)."""
        self._remove_hooks()
        self.tracker.reset_mod_stats()

    def _for_device(self, snaps: dict) -> dict:
        for dev, snap in snaps.items():
            if torch.device(dev).type == self.device.type:
                return snap
        return {}

    def __exit__(self, *exc: Any) -> None:
        try:
            self.tracker.__exit__(*exc)
        finally:
            self._mod_tracker_module.register_multi_grad_hook = self._register
            self._unwrap_layerwise_steps()
            self._unwrap_ddp_reducer()
            self._remove_hooks()
        self.peak = snapshot_components(self._for_device(self.tracker.get_tracker_snapshot("peak")))
        best = self._for_device(self.tracker.max_by_type)
        state = [v for st in (self.optimizer.state.values() if self.optimizer is not None else []) for v in st.values()]
        state = [v for v in state if isinstance(v, torch.Tensor) and v.device.type == self.device.type]
        self.maxima = {
            "weights": best.get("Parameter", 0) + best.get("Buffer", 0),
            "quant_constants": best.get("Other", 0),
            "gradients": best.get("Gradient", 0),
            "optimizer_states": live_bytes(state),
            "activations": best.get("activations", 0),
            "ddp_buckets": best.get("DDP buckets", 0),
            "optimizer_step": best.get("Optstate", 0),
        }
        # what the step allocated beyond the state it keeps (the tracker labels every tensor
        # created inside optimizer.step() as optimizer state)
        self.maxima["optimizer_transient"] = max(0, self.maxima["optimizer_step"] - self.maxima["optimizer_states"])


@dataclass
class MemoryMeasurement:
    """What was measured beside the estimate for the same settings.

    Attributes:
        measured: Each component's own maximum (``PeakTracker.maxima``), and ``total``: the
            highest total of live tensors.
        at_peak: The breakdown by component at the moment of that highest total.
        estimate: :func:`~lowmem.memory.estimate_memory` for the same settings.
        device: ``"cpu"`` or ``"cuda"``.
        peak_allocated: CUDA only: ``torch.cuda.max_memory_allocated()`` over the steps.
        losses: The training losses of the steps (of each micro-batch, with gradient accumulation).
        rss_peak: CPU on Linux only (else ``None``): the process's peak resident memory over the last step, as bytes
            of the run: the live tensors at its start (weights, buffers, optimizer state) plus the growth of the peak
            RSS above the RSS there (``/proc/self/status`` ``VmHWM`` after ``clear_refs``; the last step, as the
            first's one-time costs, lazy imports and initialization, are not the run's steady peak). It sees what
            the tracker cannot: memory allocated inside a library's kernel (bitsandbytes' CPU optimizer step, a
            custom op whose temporaries are not dispatched tensors, AUDMEM21 2), MKL's / LAPACK's buffers, the
            allocator's and Python's own. With glibc's dynamic mmap threshold the heap's fragmentation is in it too
            (a 45 MiB pick: 67.9 MiB for 44.8 live); ``lowmem budget --measure`` fixes the threshold first
            (:func:`fix_mmap_threshold`: 45.05 MiB for 44.79).
    """

    measured: dict[str, int]
    at_peak: dict[str, int]
    estimate: MemoryEstimate
    device: str
    peak_allocated: int | None = None
    losses: list[float] = field(default_factory=list)
    rss_peak: int | None = None

    def ratios(self) -> dict[str, float]:
        """estimate / measured per component (``nan`` where nothing was measured)."""
        est = {**self.estimate.components(), "total": self.estimate.total}
        out = {k: (est[k] / self.measured[k] if self.measured.get(k) else float("nan")) for k in est}
        mkl = self.mkl_gemm_pack_bytes()
        if mkl and self.measured.get("optimizer_transient"):  # what the tracker can see: torch tensors only
            lapack = int(self.estimate.details.get("optimizer_transient_lapack_svd") or 0)  # (not tensors either)
            out["optimizer_transient_tensors"] = (est["optimizer_transient"] - mkl - lapack) / self.measured["optimizer_transient"]
        if self.peak_allocated:
            out["total_vs_peak_allocated"] = self.estimate.total / self.peak_allocated
        return out

    def mkl_gemm_pack_bytes(self) -> int:
        """The part of the estimated transient that is MKL's GEMM packing buffer (CPU, projected steps) and its
        SVD buffers (an AMD CPU's exact-SVD refresh, bucketed steps: ``optimizer_transient_mkl_svd``) and Muon's
        bfloat16 products' BLAS workspace (``optimizer_transient_blas_workspace``): memory of the process, but not
        torch tensors, so the tracker's measurement leaves them out."""
        details = self.estimate.details
        return (int(details.get("optimizer_transient_mkl_gemm_pack", 0)) + int(details.get("optimizer_transient_mkl_svd") or 0)
                + int(details.get("optimizer_transient_blas_workspace") or 0))

    def table(self) -> str:
        from .report import estimate_table, fmt_bytes

        text = estimate_table(self.estimate, measured=self.measured)
        mkl = self.mkl_gemm_pack_bytes()
        lapack = int(self.estimate.details.get("optimizer_transient_lapack_svd") or 0)
        if mkl:
            m = self.measured.get("optimizer_transient", 0)
            rest = self.estimate.optimizer_transient - mkl
            # (the ratio compares tensors with tensors: the SVD's LAPACK bytes below are not tensors either)
            parts = [name for key, name in (("optimizer_transient_mkl_gemm_pack", "MKL's GEMM packing buffer"),
                                             ("optimizer_transient_mkl_svd", "MKL's SVD buffers"),
                                             ("optimizer_transient_blas_workspace", "the BLAS workspace of bfloat16 products"))
                     if self.estimate.details.get(key)]
            what = " and ".join(parts)
            text += (f"measured: live torch tensors; the estimated optimizer_transient includes {what} "
                     f"({fmt_bytes(mkl)}, the library's on CPU, not tensors): without them {fmt_bytes(rest)}"
                     + (f" (est/meas {(rest - lapack) / m:.3f}" + (" without the LAPACK bytes below" if lapack else "") + ")"
                        if m else "") + "\n")
        if lapack:  # (real memory on any vendor: not in mkl_gemm_pack_bytes, which names the library's own buffers)
            text += (f"the estimated optimizer_transient also includes the SVD refresh's LAPACK copy of the gradient and "
                     f"workspace, or a randomized refresh's LAPACK and MKL buffers ({fmt_bytes(lapack)}, allocated inside "
                     "the kernels, not tensors the tracker sees)\n")
        if self.peak_allocated is not None:
            text += f"CUDA max_memory_allocated: {fmt_bytes(self.peak_allocated)} (estimate/peak {self.estimate.total / self.peak_allocated:.3f})\n"
        if self.rss_peak is not None:
            text += (f"process peak RSS over the last step (tensors at its start + RSS growth): {fmt_bytes(self.rss_peak)} "
                     f"(estimate/RSS {self.estimate.total / self.rss_peak:.3f}; includes non-tensor memory)\n")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "measured": self.measured, "at_peak": self.at_peak, "estimate": self.estimate.to_dict(), "peak_allocated": self.peak_allocated,
                "ratios": self.ratios(), "losses": self.losses, "rss_peak": self.rss_peak}


def _has_weights(path: str | os.PathLike) -> bool:
    """A model directory with weight files (safetensors or torch ``.bin``, sharded or not); a directory with only
    ``config.json`` is measured on seeded random weights of that config (the memory does not depend on the values)."""
    return any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))


def _build_model(model: Any, dtype: torch.dtype, quantization: Any, lora: Any, gradient_checkpointing: bool, device: str, seed: int):
    from transformers import AutoModelForCausalLM

    config = resolve_config(model)
    if quantization is not None:
        from ..quant import load_quantized_model

        path = model if isinstance(model, (str, os.PathLike)) and os.path.isdir(model) and _has_weights(model) else None
        tmp = None
        if path is None:  # a shape or config: write random weights to load them the way users do
            tmp = tempfile.TemporaryDirectory()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(tmp.name)
            path = tmp.name
        m = load_quantized_model(path, quantization=quantization, lora=lora, dtype=dtype, device=device,
                                 gradient_checkpointing=gradient_checkpointing)
        if tmp is not None:
            tmp.cleanup()
        return m, config
    if isinstance(model, nn.Module):
        m = model
    elif isinstance(model, (str, os.PathLike)) and os.path.isdir(model) and _has_weights(model):
        m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, local_files_only=True)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            m = AutoModelForCausalLM.from_config(config, dtype=dtype)
    m = m.to(device)
    if lora is not None:
        from ..quant import attach_lora  # peft.get_peft_model without peft's deprecation noise

        m = attach_lora(m, lora)
    if gradient_checkpointing:
        from ..quant import enable_activation_checkpointing  # transformers' non-deprecated API

        enable_activation_checkpointing(m)
    return m, config


def _module_dtype(model: nn.Module, dtype: Any) -> torch.dtype:
    """The dtype an ``nn.Module`` given to :func:`measure_memory` runs in (it is used as is, not cast): that of most of
    its floating parameters' elements (a peft model's base, not its float32 adapters).

    Raises:
        ValueError: ``dtype`` given and not that dtype (naming both), or a module without floating parameters.
    """
    count: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    if not count:
        raise ValueError("measure_memory: the nn.Module given as model has no floating-point parameters to train")
    own = max(count, key=count.__getitem__)
    if dtype is not None and parse_dtype(dtype) != own:
        raise ValueError(f"measure_memory: dtype={dtype!r} but the nn.Module given as model holds "
                         f"{str(own).removeprefix('torch.')} parameters and is measured as is (not cast): pass "
                         f"dtype=None (its own) or {str(own).removeprefix('torch.')!r}, or cast the module first")
    return own


def measure_memory(
    model: Any,
    optimizer: str = "adamw",
    optim_args: dict[str, Any] | None = None,
    batch_size: int = 1,
    seq_len: int = 64,
    dtype: str | torch.dtype | None = None,
    quantization: Any = None,
    lora: Any = None,
    gradient_checkpointing: bool = False,
    layerwise: bool = False,
    steps: int = 2,
    device: str | None = None,
    seed: int = 0,
    gradient_accumulation_steps: int = 1,
    padding_free: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MemoryMeasurement:
    """Run ``steps`` real training steps and report the live memory at the peak, by component,
    beside :func:`~lowmem.memory.estimate_memory` for the same settings.

    Arguments are those of :func:`~lowmem.memory.estimate_memory` (``model`` may also be an
    ``nn.Module``, used as is; the estimate is for the measured ``device``; a Hugging Face 8-bit ``optim`` name
    builds the optimizer as LowMemTrainer does, the ``nn.Embedding`` weights' state 32-bit), plus:

    Args:
        dtype (`str`, `torch.dtype` or `None`, defaults to `None`): The weights' dtype (a shape, config or directory is
            built in it). ``None``: float32, or an ``nn.Module``'s own dtype (that of most of its parameters' elements:
            the module is not cast). Given with an ``nn.Module`` (without ``quantization``), it must be that dtype.
        steps (`int`, defaults to `2`): Training steps (the peak usually comes in the second, when
            the optimizer state exists).
        device (`str` or `None`, defaults to `None`): ``"cuda"`` when available, else ``"cpu"``.
        seed (`int`, defaults to `0`): Seeds the random weights (shapes and configs) and the tokens.
        gradient_accumulation_steps (`int`, defaults to `1`): Micro-batches (forward and backward) per optimizer
            step, as the Trainer runs them (layerwise: ``LayerwiseOptimizer(accumulation_steps=...)``, which steps
            each parameter at its last micro-batch's gradient and keeps the earlier ones' between micro-batches).
        padding_free (`bool`, defaults to `False`): Each micro-batch as TRL's padding-free collator gives it (``SFTConfig
            .padding_free``; ``packing`` with ``"bfd"``): its ``batch_size`` sequences flattened into one row of
            ``batch_size x seq_len`` tokens, with ``position_ids`` restarting at each sequence (no attention mask).
        progress (`Callable[[int, int], None]` or `None`, defaults to `None`): Called as ``progress(step, steps)``
            (``step`` 1-based) after each optimizer step: after the last micro-batch with ``gradient_accumulation_steps
            > 1``, once per step in layerwise mode too (``lowmem budget --measure`` shows it as ``k/steps``).

    Steps use random token ids as inputs and labels (``labels = input_ids``), no padding mask;
    ``layerwise=True`` steps each parameter in its post-accumulate-grad hook and frees its gradient.
    The quantized codecs' process-wide tables are forgotten first
    (:func:`~lowmem.optim.functional.quant.clear_kept_tables`), and the fused AdamW kernel's kept step count: every
    measurement in a process sees them made, as a fresh process's first step makes them.
    """
    from ..optim import create_optimizer, get_entry
    from ..optim.layerwise import LayerwiseOptimizer

    accumulation = gradient_accumulation_steps
    if isinstance(accumulation, bool) or not (isinstance(accumulation, int) and accumulation >= 1):
        raise ValueError(f"gradient_accumulation_steps must be an int >= 1, got {accumulation!r}")
    if not isinstance(padding_free, bool):
        raise ValueError(f"padding_free must be True or False (TRL's SFTConfig.padding_free), got {padding_free!r}")
    if isinstance(steps, bool) or not (isinstance(steps, int) and steps >= 1):  # (0: no step, a peak of nothing)
        raise ValueError(f"steps must be an int >= 1 (training steps measured), got {steps!r}")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be a callable progress(step, steps) or None, got {progress!r}")
    from .estimate import resolve_optimizer_name

    given_optimizer = optimizer  # a Hugging Face optim name: the estimate below applies its rule too
    optimizer, layerwise, embeddings_32bit = resolve_optimizer_name(optimizer, layerwise)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    own = quantization is None and isinstance(model, nn.Module)  # the user's module, measured as is
    pdtype = _module_dtype(model, dtype) if own else parse_dtype("fp32" if dtype is None else dtype)
    # the estimate of the same run: the module itself when it is what runs (a peft model's adapter, its dtype, its
    # frozen parameters: estimate_memory sizes or names them), made before _build_model attaches lora= to it in place.
    # Before, the estimate of its config at dtype= with every parameter trained, beside the module's run: a peft LoRA
    # model 1.674 of the measured peak, a bf16 module 1.281, frozen layers 1.454, without a word (AUDIT-PEAK18 2, 3)
    est = estimate_memory(
        model if own else resolve_config(model), optimizer=given_optimizer, optim_args=optim_args, batch_size=batch_size,
        seq_len=seq_len, dtype=pdtype, quantization=quantization, lora=lora, gradient_checkpointing=gradient_checkpointing,
        layerwise=layerwise, device=torch.device(device).type, max_grad_norm=None,  # its LayerwiseOptimizer does not clip
        gradient_accumulation_steps=accumulation, padding_free=padding_free,
    )
    m, config = _build_model(model, pdtype, quantization, lora, gradient_checkpointing, device, seed)
    m.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if layerwise:  # what `lowmem train` / the Trainer run: the same LayerwiseOptimizer, its own hooks
            if get_entry(optimizer).recipe is None:
                raise ValueError(f"layerwise needs an engine optimizer; {optimizer!r} is not one")
            opt = LayerwiseOptimizer(m, optimizer, accumulation_steps=accumulation, **(optim_args or {}))
        elif embeddings_32bit:  # as LowMemTrainer builds it for this HF name (lowmem_embeddings_32bit)
            from lowmem.trainers.hf import create_optimizer_embeddings_32bit

            opt = create_optimizer_embeddings_32bit(m, optimizer, **(optim_args or {}))
        else:
            opt = create_optimizer(m, optimizer, **(optim_args or {}))

    # state exists before tracking: labelled optimizer state, not temporaries (layerwise: the inner engine optimizer's,
    # which its hooks would otherwise create in the first backward, after that step's activations' peak)
    sized = opt.inner if isinstance(opt, LayerwiseOptimizer) else opt
    if hasattr(sized, "materialize_state"):
        sized.materialize_state()
    # bitsandbytes' first import (the quantized codecs import it lazily, inside the step) logs a
    # warning with a traceback on CPU; a handler that keeps records (pytest's, a user's) would keep
    # that traceback's frames, and with them the step's gradients, alive: import it before tracking
    import bitsandbytes.functional  # noqa: F401
    from ..optim.functional.quant import clear_kept_tables

    # the codecs' process-wide tables (made at the first step that codes a moment, kept; the estimate counts them):
    # forgotten, the measured steps make them as a fresh process's first step does (a second measurement in one
    # process read 133,120 B lower for adamw8bit on the CPU without this)
    clear_kept_tables()
    # and torch's fused AdamW kernel's step count (functional.adam._step_tensor, kept per device from one step to the
    # next): an earlier run's count of the same value was re-used by the first measured step, made outside the
    # tracker, so unseen at the second step's peak (4 B lower after a one-step AdamW run in the same process)
    from ..optim.functional import adam as _adam

    _adam.clear_step_tensors()
    gen = torch.Generator().manual_seed(seed)
    losses = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss = _RssProbe(m, opt) if device == "cpu" else None  # (the process's peak RSS over the steps: MemoryMeasurement.rss_peak)
    tracker = PeakTracker(m, opt, device=device)
    with tracker:
        for step in range(1, steps + 1):
            if rss is not None and step == steps:  # (the last step: the state exists, one-time costs are behind)
                rss.start()
            for _ in range(accumulation):
                ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen).to(device)
                if padding_free:  # one row, position ids per sequence (TRL's DataCollatorForLanguageModeling)
                    ids = ids.view(1, batch_size * seq_len)
                    positions = torch.arange(seq_len, device=device).repeat(batch_size).view(1, -1)
                    loss = m(input_ids=ids, labels=ids, position_ids=positions).loss
                    del positions
                else:
                    loss = m(input_ids=ids, labels=ids).loss
                (loss / accumulation if accumulation > 1 else loss).backward()
                losses.append(float(loss.detach()))
                del loss
            opt.step()  # layerwise: ends the window (parameters were stepped in their hooks)
            opt.zero_grad(set_to_none=True)
            tracker.next_step()
            if progress is not None:
                progress(step, steps)
    rss_peak = rss.peak() if rss is not None else None
    peak_allocated = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak_allocated = int(torch.cuda.max_memory_allocated())
    if layerwise:
        opt.remove_hooks()
    from .estimate import model_label

    est.settings["model"] = model_label(model)
    measured = {**tracker.maxima, "total": tracker.peak["total"]}
    return MemoryMeasurement(measured=measured, at_peak=tracker.peak, estimate=est, device=device, peak_allocated=peak_allocated,
                             losses=losses, rss_peak=rss_peak)


#: the mmap threshold :func:`fix_mmap_threshold` sets (bytes; as ``MALLOC_MMAP_THRESHOLD_=65536``, the "live" setting
#: of the fresh-process step measurements, lowmem.optim.step_memory)
MMAP_THRESHOLD = 65536


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for the rest of this process (``mallopt(M_MMAP_THRESHOLD,
    ...)``; a fixed threshold also turns off glibc's dynamic one): blocks above it are mapped and unmapped, so the
    process's RSS follows the live memory instead of the heap's high-water mark. ``lowmem budget --measure`` calls it
    before measuring (a process that exits after); :func:`measure_memory` itself does not change the caller's
    allocator. Returns whether it was set (``False`` off glibc)."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD))  # (M_MMAP_THRESHOLD = -3)
    except (OSError, AttributeError):
        return False


class _RssProbe:
    """The process's peak RSS over :func:`measure_memory`'s last step on the CPU (Linux: ``/proc/self/status``; else
    :meth:`peak` is ``None``): :meth:`start` (before that step) takes the live tensors
    then (the model's parameters and buffers, the optimizer's state: what the estimate's total holds before the step's
    phases), frees what glibc can (``gc.collect``, ``malloc_trim(0)``), resets the peak (``clear_refs``) and reads the
    RSS; :meth:`peak` is those tensors plus ``VmHWM`` above that RSS."""

    def __init__(self, model: nn.Module, optimizer: Any) -> None:
        self.model, self.optimizer, self.base = model, optimizer, None

    def _state_tensors(self) -> list[torch.Tensor]:
        inner = getattr(self.optimizer, "inner", self.optimizer)
        return [v for st in getattr(inner, "state", {}).values() if isinstance(st, dict) for v in st.values()
                if isinstance(v, torch.Tensor)]

    def start(self) -> None:
        import gc

        from ..optim.step_memory import _reset_peak, _status_kib

        try:
            self.tensors = live_bytes([*self.model.parameters(), *self.model.buffers(), *self._state_tensors()])
            gc.collect()
            try:
                import ctypes

                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            _reset_peak()
            self.base = _status_kib("VmRSS")
        except (OSError, RuntimeError):  # (no /proc/self/status or clear_refs: not Linux)
            self.base = None

    def peak(self) -> int | None:
        from ..optim.step_memory import _status_kib

        if self.base is None:
            return None
        return self.tensors + max(0, _status_kib("VmHWM") - self.base) * 1024
