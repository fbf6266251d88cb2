"""torch's fused AdamW kernel (``torch._fused_adamw_``, the one behind ``torch.optim.AdamW(fused=True)``)
on the engine's AdamW steps (issue 15): the foreach buckets (``functional.adamw_foreach_``, every
``eps`` placement and decay order) and the per-parameter step (``AdamMoments.fused_step_``: a
low-precision parameter with moments of its dtype) take it on every device torch has it for, the CPU
included by default (``functional.adam.FUSED_ON_CPU``; off: the multi-tensor operations), and every
case is checked against the plain reference loop (``references/full_rank.py``) and against the
multi-tensor path within float32 rounding. On meta tensors (the non-CPU code path) the launches of a
step are counted."""

from __future__ import annotations

import collections
import math
import warnings
import weakref
from itertools import chain

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.optim import create_optimizer
from lowmem.optim.functional import adam as FA
from lowmem.optim.references import get_reference
from lowmem.optim.references.full_rank import adamw as reference_adamw


class _Spy:
    """Counts the tensors ``torch._fused_adamw_`` steps (monkeypatched in ``torch``)."""

    def __init__(self, monkeypatch):
        self.calls: list[int] = []
        orig = torch._fused_adamw_

        def spy(params, *args, **kwargs):
            self.calls.append(len(params))
            return orig(params, *args, **kwargs)

        monkeypatch.setattr(torch, "_fused_adamw_", spy)


def _grads(shapes, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * (0.5 + 0.5 * math.sin(t)) for s in shapes] for t in range(1, steps + 1)]


SHAPES = [(24, 40), (40, 24), (40,), (7, 9), (300,)]


@pytest.mark.parametrize("chunk_numel", [None, 64])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_fused_buckets_equal_the_reference_loop(index, chunk_numel, monkeypatch):
    """Every configuration of the AdamW reference (defaults; decay 0.1 with other betas and eps; no
    decay with beta1 = 0), whole tensors and flat pieces of 64 elements in buckets: each parameter after
    each of 12 steps equals the plain loop (rtol 1e-5, the reference suite's), every step by the kernel."""
    monkeypatch.setattr(FA, "FUSED_ON_CPU", True)
    spy = _Spy(monkeypatch)
    config = get_reference("adamw").configs[index]
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    starts = [p.detach().clone() for p in ps]
    grads = _grads(SHAPES, 12, seed=1)
    opt = create_optimizer(ps, "adamw", **config)
    opt.chunk_numel = chunk_numel
    traj = []
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
        traj.append([p.detach().clone() for p in ps])
    assert len(spy.calls) >= 12 and sum(spy.calls) >= 12 * len(ps)
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    for i, start in enumerate(starts):
        want = reference_adamw(start.clone(), [g[i] for g in grads], index=i, **group)
        for t, w in enumerate(want):
            torch.testing.assert_close(traj[t][i], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t + 1}: {m}")


def _train(fused, monkeypatch, *, groups_fn, name="adamw", steps=8, chunk_numel=None, schedule=False, reload_at=None,
           drop=(), seed=0, **hparams):
    """Steps an optimizer from ``groups_fn(params)`` through seeded gradients (``drop``: (step, index) pairs
    without a gradient); ``reload_at``: a fresh optimizer loads the state dict after that step (torch.load
    round trip, weights_only). Returns the parameters, the states and the kernel's calls."""
    with monkeypatch.context() as mp:
        mp.setattr(FA, "FUSED_ON_CPU", fused)
        spy = _Spy(mp)
        gen = torch.Generator().manual_seed(seed)
        params = groups_fn(gen)
        flat = list(chain(*(g["params"] for g in params)))

        def make():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (rank >= a side: trained full-rank)
                o = create_optimizer(params, name, **hparams)
            o.chunk_numel = chunk_numel
            return o, (torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) if schedule else None)

        opt, sched = make()
        for step in range(steps):
            for i, p in enumerate(flat):
                g = torch.randn(p.shape, generator=gen) * (3.0 if step % 3 == 2 else 1.0)
                p.grad = None if (step, i) in drop else g.to(p.dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
            if sched is not None:
                sched.step()
            if reload_at is not None and step == reload_at:
                import io

                buf = io.BytesIO()
                torch.save({"opt": opt.state_dict(), "sched": sched.state_dict() if sched else None}, buf)
                buf.seek(0)
                saved = torch.load(buf, weights_only=True)
                opt, sched = make()
                opt.load_state_dict(saved["opt"])
                if sched is not None:
                    sched.load_state_dict(saved["sched"])
        states = [{k: v.clone() for k, v in opt.state[p].items()} for p in flat]
        return [p.detach().clone() for p in flat], states, spy.calls


def _two_groups(gen, dtype=torch.float32):
    a = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(24, 40), (40,), (5, 7)]]
    b = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(40, 24), (300,)]]
    return [{"params": a}, {"params": b, "lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.0}]


CASES = {
    "decay": dict(weight_decay=0.1),
    "no_decay": dict(weight_decay=0.0, eps=1e-6),
    "groups_schedule_missing_grads": dict(schedule=True, drop={(1, 0), (2, 3), (3, 0), (5, 4)}),
    "pieces_reload": dict(chunk_numel=100, reload_at=3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_equals_the_multi_tensor_path(case, monkeypatch):
    """Two groups with different lr / betas / decay, a LambdaLR schedule, missing gradients (a
    parameter skipped at some steps: its own step count), pieces of 100 elements and a state dict
    loaded mid-run: the kernel's trajectory and state equal today's multi-tensor operations within
    float32 rounding (rtol 1e-6), the step counters exactly, and every state stays float32."""
    kw = dict(CASES[case])
    got, got_s, calls = _train(True, monkeypatch, groups_fn=_two_groups, **kw)
    want, want_s, none = _train(False, monkeypatch, groups_fn=_two_groups, **kw)
    assert none == [] and len(calls) >= 8
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for sa, sb in zip(got_s, want_s):
        assert sa.keys() == sb.keys()
        assert torch.equal(sa["step"], sb["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert sa[k].dtype == torch.float32
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("state_dtype", ["param", "bfloat16"])
def test_bf16_parameters_take_the_kernel_per_parameter(state_dtype, monkeypatch):
    """bf16 parameters with bf16 moments (``state_dtype="param"`` / ``"bfloat16"``) leave the buckets
    (float32 only) and take the kernel in the per-parameter step (``AdamMoments.fused_step_``), with a
    mid-run reload (the bf16 states survive it): the kernel computes in float32 and rounds once, as the
    engine's step does, so parameters and moments equal it up to a bf16 rounding flip in a few
    elements (float32 differences of 1e-7 relative landing on a rounding boundary). ``foreach=False``
    (the single-tensor reference) and float32 moments of a bf16 parameter (the kernel takes one dtype)
    keep the engine's step."""
    kw = dict(state_dtype=state_dtype, weight_decay=0.1, reload_at=2, steps=6)
    bf16 = lambda gen: _two_groups(gen, torch.bfloat16)  # noqa: E731
    got, got_s, calls = _train(True, monkeypatch, groups_fn=bf16, **kw)
    want, want_s, _ = _train(False, monkeypatch, groups_fn=bf16, **kw)
    assert calls == [3, 2] * 6  # (bf16 weights in their group's fused bucket from their first step: BF16BUCKET, FIRSTSTEP)
    for a, b in chain(zip(got, want), ((sa[k], sb[k]) for sa, sb in zip(got_s, want_s) for k in ("exp_avg", "exp_avg_sq"))):
        assert a.dtype == b.dtype == torch.bfloat16
        differ = (a != b).float().mean().item()
        assert differ <= 0.01, differ
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-6)
    _, _, ref_calls = _train(True, monkeypatch, groups_fn=bf16, foreach=False, **kw)
    assert ref_calls == []
    _, _, mixed = _train(True, monkeypatch, groups_fn=bf16, weight_decay=0.1, steps=2)  # float32 moments
    assert mixed == []


def _muon_groups(gen):
    targets = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(12, 10), (8, 16)]]
    rest = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(10,), (9, 6), (20, 8)]]
    return [{"params": targets, "use_muon": True}, {"params": rest}]


def _galore_groups(gen):
    low = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(32, 24), (24, 32)]]
    full = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(20,), (9, 6), (150,)]]
    # rank None: the full-rank group (else create_optimizer gives it the default rank 128, above every side: an error)
    return [{"params": low, "rank": 4, "update_proj_gap": 3}, {"params": full, "rank": None}]


def _plain(gen):
    return [{"params": [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(24, 40), (40,), (130,)]]}]


# recipe: (groups, hyperparameters, full-rank AdamW parameters)
RECIPES = {
    # eps on the uncorrected sqrt(v) and the decay after the update (the full-rank remainder of GaLore)
    "galore_adamw": (_galore_groups, dict(weight_decay=0.1, eps=1e-3), 3),
    # hf placement, decay after, stabilizers: the update's step size differs from the decay's (warm-up)
    "spam": (_plain, dict(weight_decay=0.1, warmup_steps=5, reset_interval=4), 3),
    # torch placement at a restarted step count, a scaled beta1, stabilized gradients
    "stable_spam": (_plain, dict(weight_decay=0.1, reset_interval=4, t_max=20), 3),
    # a hybrid's AdamW parameters (the group without use_muon: its vector and two weights, galore-torch's
    # rule for groups given as dicts; the use_muon group's weights are Muon's): update lr * adamw_lr_ratio,
    # decay with lr (the decay apart)
    "muon": (_muon_groups, dict(weight_decay=0.1, adamw_lr_ratio=0.3, ns_steps=2), 3),
    "frugal": (_galore_groups, dict(weight_decay=0.1), 3),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("chunk_numel", [None, 64])
def test_other_recipes_adamw_buckets_take_the_kernel_equal(name, chunk_numel, monkeypatch):
    """The recipes whose buckets run ``adamw_foreach_`` in another form: ``eps`` on the uncorrected
    ``sqrt(v)`` (the kernel with ``eps / sqrt(1 - beta2^t)``), the decay after the update (the caller's
    multiply), an update step size apart from the decay's (the decay as its own multiply first): equal
    to today's multi-tensor operations within float32 rounding, full-rank parameters by the kernel and
    the projected (low-rank) moments never."""
    groups_fn, hp, full = RECIPES[name]
    got, got_s, calls = _train(True, monkeypatch, groups_fn=groups_fn, name=name, chunk_numel=chunk_numel, **hp)
    want, want_s, _ = _train(False, monkeypatch, groups_fn=groups_fn, name=name, chunk_numel=chunk_numel, **hp)
    if chunk_numel is None:  # every full-rank AdamW parameter, every step (whole tensors)
        assert sum(calls) == 8 * full, calls
    else:
        assert len(calls) >= 8, calls
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for sa, sb in zip(got_s, want_s):
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-9)


def test_galore_projected_moments_never_take_the_kernel(monkeypatch):
    """galore_adamw with every weight projected and no full-rank parameter: no call of the kernel
    (the low-rank moments are stepped by the projected multi-tensor direction)."""
    low = lambda gen: [{"params": [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(32, 24), (24, 32)]],  # noqa: E731
                        "rank": 4}]
    _, _, calls = _train(True, monkeypatch, groups_fn=low, name="galore_adamw", steps=3)
    assert calls == []


def test_tensors_outside_the_kernels_layout_keep_the_operations(monkeypatch):
    """A bucket with a transposed parameter (non-contiguous): the kernel steps the others, the
    multi-tensor operations that one; equal to today's path. A tensor step size keeps the operations."""
    def groups(gen):
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 5), (5,), (4, 4)]]
        ps.append(torch.nn.Parameter(torch.randn(7, 3, generator=gen).t()))
        return [{"params": ps}]

    got, _, calls = _train(True, monkeypatch, groups_fn=groups, weight_decay=0.1, steps=4)
    want, _, _ = _train(False, monkeypatch, groups_fn=groups, weight_decay=0.1, steps=4)
    assert calls == [3] * 4
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ps = [torch.zeros(4) for _ in range(4)]
    assert FA.fused_indices(ps[:1], ps[1:2], ps[2:3], ps[3:], 0.1) == [0]  # the CPU, by default
    with monkeypatch.context() as mp:
        mp.setattr(FA, "FUSED_ON_CPU", False)
        assert FA.fused_indices(ps[:1], ps[1:2], ps[2:3], ps[3:], 0.1) == []
    assert FA.fused_indices(ps[:1], ps[1:2], ps[2:3], ps[3:], torch.tensor(0.1)) == []
    assert FA.fused_indices(ps[:1], [torch.zeros(4, dtype=torch.float64)], ps[2:3], ps[3:], 0.1) == []


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.h2d = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return True if args[0].dtype is torch.bool else 1.0
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        devs = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        if name in ("_to_copy", "copy_") and "cpu" in devs and isinstance(out, torch.Tensor) and out.device.type != "cpu":
            self.h2d += 1
        self.ops[name] += 1
        return out


def test_meta_step_launches_one_kernel_per_bucket():
    """On meta tensors (the non-CPU path): a step of 20 parameters (3 buckets of ``chunk_numel`` at the
    first step) launches the fused kernel once from the second step (their bucket is uncapped: the kernel
    allocates nothing) and none of the multi-tensor AdamW operations, one step-count fill, no
    host-to-device copy; the report is the capped buckets' ``sqrt(v)`` (meta: the device is not known),
    0 on a device that takes the kernel."""
    ps = [torch.nn.Parameter(torch.zeros(s, device="meta")) for s in [(64, 64)] * 10 + [(64,)] * 10]
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = create_optimizer(ps, "adamw")
    opt.chunk_numel = 64 * 64 * 4
    for _ in range(2):
        with _Count() as c:
            opt.step()
    assert c.ops["_fused_adamw_"] == 1, c.ops
    assert not {"_foreach_lerp_", "_foreach_addcdiv_", "_foreach_sqrt"} & set(c.ops), c.ops
    assert c.ops["full"] == 1 and c.h2d == 0, c.ops
    assert opt.step_transient_bytes() == 4 * 64 * 64 * 4


def test_fused_bucket_reports_no_transient(monkeypatch):
    """A bucket the kernel steps allocates nothing (``AdamMoments.foreach_bucket_transient_bytes``: 0, the
    CPU's default); without the kernel (``FUSED_ON_CPU`` off) the bucket's ``sqrt(v)``; a non-contiguous
    parameter in the bucket (the operations step it) its own ``sqrt(v)``; a tensor ``lr`` the bucket's. Beside
    them the non-finite check's float32 norms and their stack, 8 bytes per parameter (``_all_finite_bytes``),
    what the whole step reports on the kernel (none with ``skip_nonfinite`` off), next to the kernel's step
    count: 4 bytes kept from the last step, 4 more when the step makes its own (``_fused_step_bytes``)."""
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in [(30, 20), (100,)]]
    opt = create_optimizer(ps, "adamw")
    opt.materialize_state()
    assert opt.step_transient_bytes() == 4 + 8 * 2
    opt.skip_nonfinite = False
    assert opt.step_transient_bytes() == 4 + 4
    with monkeypatch.context() as mp:
        mp.setattr(FA, "FUSED_ON_CPU", False)
        assert opt.step_transient_bytes() == 4 * 700
    ps.append(torch.nn.Parameter(torch.zeros(7, 3).t()))
    opt = create_optimizer(ps, "adamw")
    opt.materialize_state()
    assert opt.step_transient_bytes() == 4 + 4 * 21 + 4
    opt.param_groups[0]["lr"] = torch.tensor(1e-3)  # (no kernel: no step count)
    assert opt.step_transient_bytes() == 4 * 721


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_bf16_decay_after_the_update_keeps_the_engine_step(weight_decay, monkeypatch):
    """galore_adamw's full-rank bf16 parameters with bf16 moments (``eps`` on the uncorrected ``sqrt(v)``,
    the decay after the update): without decay the kernel steps them (within a bf16 rounding flip of the
    engine's step); with decay they keep the engine's step (the decay apart would round twice)."""
    def groups(gen):
        return [{"params": [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in [(40,), (9, 6)]],
                 "rank": None}]  # full-rank (the default rank 128 is above every side: an error)

    kw = dict(name="galore_adamw", state_dtype="param", weight_decay=weight_decay, eps=1e-3, steps=5)
    got, _, calls = _train(True, monkeypatch, groups_fn=groups, **kw)
    want, _, _ = _train(False, monkeypatch, groups_fn=groups, **kw)
    assert calls == ([] if weight_decay else [2] * 5)  # (one fused bucket per group and step, the first included)
    for a, b in zip(got, want):
        assert (a != b).float().mean().item() <= 0.02
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-6)


def test_fused_tensors_join_one_uncapped_bucket(monkeypatch):
    """Parameters only the kernel steps (contiguous, float ``lr``, state present) join one bucket of their
    group, step count and device whole, beyond ``chunk_numel`` (``LowMemOptimizer._fused_whole``): one
    kernel call per step, the first included (its route decided from the state it makes: FIRSTSTEP),
    equal to the capped multi-tensor path within float32 rounding; a transposed parameter keeps a capped
    bucket of the operations, the report its ``sqrt(v)`` alone; a tensor ``lr`` keeps the capped buckets."""
    def groups(gen):
        return [{"params": [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(24, 40), (40,), (300,)]]}]

    got, _, calls = _train(True, monkeypatch, groups_fn=groups, chunk_numel=64, steps=4)
    want, _, _ = _train(False, monkeypatch, groups_fn=groups, chunk_numel=64, steps=4)
    n = 24 * 40 + 40 + 300
    assert calls == [3] * 4, calls  # (tensors per call: whole ones, from the first step: FIRSTSTEP)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    spy = _Spy(monkeypatch)
    ps = groups(torch.Generator().manual_seed(0))[0]["params"] + [torch.nn.Parameter(torch.zeros(7, 3).t())]
    opt = create_optimizer(ps, "adamw")
    opt.chunk_numel = 64
    opt.materialize_state()
    assert opt.step_transient_bytes() == 4 + 4 * 21 + 4  # (and the kernel's step count, kept and new)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert spy.calls == [3], spy.calls  # the transposed one: the operations, in its own capped bucket
    opt.param_groups[0]["lr"] = torch.tensor(1e-3)
    assert opt.step_transient_bytes() == 4 * 64
    spy.calls.clear()
    opt.step()
    assert spy.calls == [] and n + 21 > 64
    # two transposed parameters around a contiguous one: the step buckets them together (42 elements of the
    # operations), the contiguous one apart; the report follows the step
    ts = [torch.nn.Parameter(torch.zeros(7, 3).t()), torch.nn.Parameter(torch.zeros(40)),
          torch.nn.Parameter(torch.zeros(7, 3).t())]
    opt = create_optimizer(ts, "adamw")
    opt.chunk_numel = 64
    opt.materialize_state()
    assert opt.step_transient_bytes() == 4 + 4 * 42 + 4


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors the dispatched operations allocate (outputs on a new storage, not 0-d), alive
    together at most (each freed when its tensor object goes); as tests/test_stable_spam_many.py's."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _drop(self, nbytes, ptr):
        self.live -= nbytes
        self.seen.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in inputs or ptr in self.seen:
                continue
            nbytes = t.untyped_storage().nbytes()
            self.seen.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._drop, nbytes, ptr)
        return out


@pytest.mark.parametrize("case", ["fused", "non_contiguous", "tensor_lr", "multi_tensor"])
def test_step_allocates_what_it_reports(case, monkeypatch):
    """What a CPU step allocates alive together (the dispatched operations' outputs) equals
    ``step_transient_bytes()`` (besides the non-finite check's few bytes): 0 on the kernel (uncapped bucket of 1,640 elements over a chunk of 256); the
    ``sqrt(v)`` of two transposed parameters bucketed together (42 elements); of the largest capped bucket
    (256) with a tensor ``lr`` or with ``FUSED_ON_CPU`` off."""
    if case == "multi_tensor":
        monkeypatch.setattr(FA, "FUSED_ON_CPU", False)
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(24, 40), (40,), (640,)]]
    if case == "non_contiguous":
        ps += [torch.nn.Parameter(torch.randn(7, 3, generator=gen).t()) for _ in range(2)]
    opt = create_optimizer(ps, "adamw", weight_decay=0.1)
    opt.chunk_numel = 256
    if case == "tensor_lr":
        opt.param_groups[0]["lr"] = torch.tensor(1e-3)
    opt.materialize_state()
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).as_strided(p.shape, p.stride())
        with _LiveBytes() as m:
            opt.step()
    want = {"fused": 0, "non_contiguous": 4 * 42, "tensor_lr": 4 * 256, "multi_tensor": 4 * 256}[case]
    # (before the buckets, the non-finite check: 8 bytes per parameter reported, its float32 norms and their
    # stack; the tracker leaves 0-d outputs, the norms, out and sees the stack and its mask: 5 bytes per parameter)
    steps = 4 * (case in ("fused", "non_contiguous"))  # (the kernel's step count: 0-d, kept and new)
    assert opt.step_transient_bytes() == steps + max(want + steps, 8 * len(ps))
    assert m.peak == max(want, 5 * len(ps)), (m.peak, want)
