"""The step that makes the state (a parameter's first step without ``materialize_state()``, as the Trainer's first
step): ``step_transient_bytes(first_step=True)`` equals what that step allocates beside the state it makes, traced
by a ``TorchDispatchMode`` (machine-independent: every output storage the step's operations make, alive together).

A bfloat16 weight with bfloat16 moments joins torch's fused AdamW bucket from its first step (its route decided from
the state its first step makes, ``LowMemOptimizer._state_to_be``; before FIRSTSTEP, 2026-12-01, as without moments: the
capped buckets' float32 arithmetic, 12 B per element of its bucket, which the default report left out), so the first
step's report equals the default."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.optim import create_optimizer
from lowmem.optim.functional import adam as FA

SHAPES = [(24, 40), (40,), (640,)]  # 1,640 elements


class _Timeline(TorchDispatchMode):
    """The storages the dispatched operations make (not on meta), as a timeline of (bytes, pointer), each freed
    when its tensor object goes; :meth:`peak` leaves out the storages given (the state the step makes)."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[int, int]] = []
        self.seen: set[int] = set()

    def _drop(self, nbytes, ptr):
        self.events.append((-nbytes, ptr))
        self.seen.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in inputs or ptr in self.seen:
                continue
            nbytes = t.untyped_storage().nbytes()
            self.seen.add(ptr)
            self.events.append((nbytes, ptr))
            weakref.finalize(t, self._drop, nbytes, ptr)
        return out

    def peak(self, leave_out: set[int]) -> int:
        live = peak = 0
        for delta, ptr in self.events:
            if ptr not in leave_out:
                live += delta
                peak = max(peak, live)
        return peak


def _state_storages(opt) -> set[int]:
    return {v.untyped_storage().data_ptr() for st in opt.state.values() for v in st.values()
            if isinstance(v, torch.Tensor)}


def _params(dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES], gen


@pytest.mark.parametrize("chunk_numel", [256, 100_000])
@pytest.mark.parametrize("dtype, state_dtype", [(torch.bfloat16, "param"), (torch.bfloat16, None),
                                                (torch.float32, None)])
def test_first_step_allocates_what_it_reports(dtype, state_dtype, chunk_numel):
    """The lazily initialised first step on the CPU's fused kernel: traced beside the state it makes, it allocates
    ``step_transient_bytes(first_step=True)`` of a twin with the state materialized, less the kernel's kept step
    count kept from an earlier step where it counts one (``_fused_step_bytes``; none at the first). bfloat16 moments:
    the kernel from the first step (its step count only: before FIRSTSTEP 12 B per element of the largest capped
    bucket, 3,072 B at 256, 19,680 B for the 1,640 elements uncapped); float32 moments and float32 weights: the same
    as the later steps (the bucket's float32 copies, or the kernel)."""
    kw = {"state_dtype": state_dtype} if state_dtype else {}
    twin_ps, _ = _params(dtype)
    twin = create_optimizer(twin_ps, "adamw", **kw)
    twin.chunk_numel, twin.skip_nonfinite = chunk_numel, False
    twin.materialize_state()
    report, later = twin.step_transient_bytes(first_step=True), twin.step_transient_bytes()

    ps, gen = _params(dtype)
    opt = create_optimizer(ps, "adamw", **kw)
    opt.chunk_numel, opt.skip_nonfinite = chunk_numel, False
    FA.clear_step_tensors()  # (a fresh process: the first step makes the kernel's step count)
    traced = []
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        with _Timeline() as m:
            opt.step()
        traced.append(m.peak(_state_storages(opt)))
    # (beside the step: the kernel's step count kept from an earlier step, made before the traced step or never)
    assert traced[0] + twin._fused_step_bytes(first_step=True) == report, (traced, report)
    assert traced[1] + twin._fused_step_bytes() == later, (traced, later)
    assert opt.step_transient_bytes() == later and opt.step_transient_bytes(first_step=True) == report
    if dtype == torch.bfloat16 and state_dtype != "param":  # float32 moments: the buckets' float32 arithmetic, never the kernel
        assert report == later == 8 * min(chunk_numel, 1640)
    else:  # the kernel from the first step (bfloat16 moments too, FIRSTSTEP): its step counts only
        assert report == later == 8


@pytest.mark.slow
def test_estimate_reports_the_first_step_of_a_tiny_bf16_model():
    """``estimate_memory``'s ``details["optimizer_transient_first_step"]`` of a tiny Llama in bfloat16 with bfloat16
    moments equals the default ``optimizer_transient`` (before FIRSTSTEP 996,864 B: 12 B per element of its bucket,
    above it), which is the traced transient of its lazily initialised first step and of its second (plus the kernel's
    kept step count, made at the first), and no note about the first step is given."""
    from lowmem.memory import estimate_memory
    from lowmem.memory.measure import _build_model

    est = estimate_memory("tiny", optimizer="adamw", dtype="bf16", seq_len=8, device="cpu",
                          optim_args={"state_dtype": "param"})
    model, config = _build_model("tiny", torch.bfloat16, None, None, False, "cpu", 0)
    opt = create_optimizer(model, "adamw", state_dtype="param")
    ids = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    FA.clear_step_tensors()
    traced = []
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        with _Timeline() as m:
            opt.step()
        opt.zero_grad(set_to_none=True)
        traced.append(m.peak(_state_storages(opt)))
    assert est.details["optimizer_transient_first_step"] == est.optimizer_transient
    for t in traced:
        assert t + est.details["optimizer_kept_step_count"] == est.optimizer_transient, (traced, est.optimizer_transient)
    assert not any("first step that makes the state" in n for n in est.notes)
