"""The moment rules' per-tensor work prepared before the step's device read (issue 15, ``foreach_prepare``).

A planned steady step (``LowMemOptimizer._plan_foreach``) asks the moment rule to prepare each bucket between the
non-finite check's kernels and its read (``_prepare_buckets``); the returned function launches the kernels after
the read. Pinned without timings: the prepared step equals the step's loop bit for bit (a NaN step skipped by
both), and on meta tensors (the CUDA code path) the rule's per-tensor checks run before the read, none after it.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import lowmem.optim.functional.adam as FA
from lowmem.optim import create_optimizer, get_entry
from lowmem.optim import engine as E
from lowmem.optim.moments import AdamMoments


def _params(n: int, device: str = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(24, 16), (16,), (40, 24), (8, 8, 3)]
    return [torch.nn.Parameter(torch.randn(shapes[i % 4], generator=g).to(device)) for i in range(n)]


def _adamw(params, eps_placement: str, **hp) -> torch.optim.Optimizer:
    """AdamW with this ``eps_placement`` (``"hf"``: the decay after the update, ``foreach_decays_after``)."""
    recipe = dataclasses.replace(get_entry("adamw").recipe, moment=AdamMoments(eps_placement=eps_placement),
                                 decay_after_update=eps_placement == "hf")
    return E.LowMemOptimizer(params, recipe=recipe, **hp)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("eps_placement", ["torch", "hf"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_prepared_equals_the_loop_bit_for_bit(fused, eps_placement, wd, monkeypatch):
    """Six steps of AdamW planned and prepared before the read, and of one stepped by the loop (``_plan_foreach``
    answering ``None``), the fourth with a NaN gradient: the same parameters and moments bit for bit, the NaN step
    skipped by both; the prepared one's buckets were prepared every later step (the test is not vacuous)."""
    monkeypatch.setattr(FA, "FUSED_ON_CPU", fused)
    a, b = _params(6), _params(6)
    pa = _adamw(a, eps_placement, lr=1e-2, weight_decay=wd)
    pb = _adamw(b, eps_placement, lr=1e-2, weight_decay=wd)
    pa.chunk_numel = pb.chunk_numel = 256  # (tensors in pieces: several buckets)
    monkeypatch.setattr(pb, "_plan_foreach", lambda work: None)
    prepared = []
    prepare = E.LowMemOptimizer._prepare_buckets

    def counted(self, buckets):
        out = prepare(self, buckets)
        prepared.append(len(out) == len(buckets) > 0)
        return out

    monkeypatch.setattr(E.LowMemOptimizer, "_prepare_buckets", counted)
    g = torch.Generator().manual_seed(3)
    for k in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in a]
        if k == 3:
            grads[1].view(-1)[2] = float("nan")
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pa.step()
            pb.step()
    assert pa.skipped_steps == pb.skipped_steps == 1
    assert prepared == [True] * 5, prepared  # (the first step: no state yet, stepped by the loop)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(pa.state[p][key], pb.state[q][key]), key


@pytest.mark.parametrize("n", [4, 12])
def test_adamw_checks_its_tensors_before_the_read_on_meta(n, monkeypatch):
    """The real ``adamw`` on meta tensors (the CUDA code path): ``fused_indices`` (the per-tensor layout checks)
    runs before the non-finite check's device read, once per bucket, and never after it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ps = _params(n, "meta")
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = create_optimizer(ps, "adamw", lr=1e-2, weight_decay=0.1)
    seen = {"read": False, "before": 0, "after": 0}

    class Read(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type != "cpu":
                seen["read"] = True
                return True
            return func(*args, **(kwargs or {}))

    checks = FA.fused_indices

    def counted(*args, **kwargs):
        seen["after" if seen["read"] else "before"] += 1
        return checks(*args, **kwargs)

    monkeypatch.setattr(FA, "fused_indices", counted)
    with Read():
        opt.step()  # (the first step: no state yet, stepped by the loop after the read)
        seen.update(before=0, after=0)
        for _ in range(2):
            seen["read"] = False
            opt.step()
    assert seen["after"] == 0 and seen["before"] == 2, seen  # (one group, one fused bucket a step)


def test_a_patched_foreach_step_is_not_bypassed_by_the_preparation(monkeypatch):
    """A rule object whose own attribute replaces ``foreach_step_`` (a wrapper, a test's spy) is stepped by it:
    the engine does not take the class's ``foreach_prepare`` for it (as for a subclass overriding the step)."""
    ps = _params(4)
    opt = create_optimizer(ps, "adamw", lr=1e-2)
    stepped = []
    bucket = opt.recipe.moment.foreach_step_

    def wrapped(params, *args, **kwargs):
        stepped.append(len(params))
        return bucket(params, *args, **kwargs)

    monkeypatch.setattr(opt.recipe.moment, "foreach_step_", wrapped)
    for _ in range(3):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    assert sum(stepped) == 12, stepped  # (every step's tensors through the wrapper, planned steps included)


@pytest.mark.parametrize("fused", [None, True])
def test_lion_prepared_equals_the_loop_bit_for_bit(fused, monkeypatch):
    """Lion planned and prepared before the read (``LionMoments.foreach_prepare``) and stepped by the loop: the
    same parameters and momentum bit for bit, a NaN step skipped by both; ``fused=True`` sends every member to
    bitsandbytes' 32-bit Lion kernel (on the CPU here), ``None`` none on the CPU."""
    if fused:
        pytest.importorskip("bitsandbytes")
    a, b = _params(6), _params(6)
    pa, pb = (create_optimizer(x, "lion", lr=1e-2, weight_decay=0.1, fused=fused) for x in (a, b))
    pa.chunk_numel = pb.chunk_numel = 256
    monkeypatch.setattr(pb, "_plan_foreach", lambda work: None)
    prepared = []
    prepare = E.LowMemOptimizer._prepare_buckets
    monkeypatch.setattr(E.LowMemOptimizer, "_prepare_buckets",
                        lambda self, buckets: prepared.append(self is pa) or prepare(self, buckets))
    g = torch.Generator().manual_seed(4)
    for k in range(5):
        for i, (p, q) in enumerate(zip(a, b)):
            gr = torch.randn(p.shape, generator=g)
            if k == 2 and i == 3:
                gr.view(-1)[1] = float("nan")
            p.grad, q.grad = gr, gr.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pa.step()
            pb.step()
    assert pa.skipped_steps == pb.skipped_steps == 1 and prepared.count(True) >= 4, prepared
    for p, q in zip(a, b):
        assert torch.equal(p, q) and torch.equal(pa.state[p]["exp_avg"], pb.state[q]["exp_avg"])


def _after_the_read(opt, seen: dict, steps: int = 2, first=lambda: None) -> int:
    """lowmem's Python calls after the step's device read (meta tensors; ``sys.setprofile``) over ``steps``
    steady steps; ``seen["read"]``: whether this step's read has happened (for the caller's counters, which
    ``first`` resets after the first step)."""
    import sys

    from torch.utils._python_dispatch import TorchDispatchMode

    lowmem = E.__file__.rsplit("/optim/", 1)[0]
    seen.update(read=False, calls=0)

    class Read(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type != "cpu":
                seen["read"] = True
                return True
            return func(*args, **(kwargs or {}))

    def prof(frame, event, arg):
        if seen["read"] and event == "call" and frame.f_code.co_filename.startswith(lowmem):
            seen["calls"] += 1

    with Read():
        opt.step()  # (the first step: no state yet, stepped by the loop)
        first()
        for _ in range(steps):
            seen["read"] = False
            sys.setprofile(prof)
            try:
                opt.step()
            finally:
                sys.setprofile(None)
    return seen["calls"]


def test_lion_decides_its_fused_members_before_the_read_on_meta(monkeypatch):
    """Lion with ``fused=True`` on meta tensors (the CUDA code path; bitsandbytes' eligibility answered "no" here,
    counted): every member's kernel decision (``bnb_fused.use_fused_32bit``) before the device read, none after
    it, and lowmem's Python calls after the read are as many for 12 parameters as for 4."""
    from lowmem.optim import bnb_fused

    asked = {"before": 0, "after": 0}
    seen = {"read": False}

    def decide(p, g, m, group):
        asked["after" if seen["read"] else "before"] += 1
        return False

    monkeypatch.setattr(bnb_fused, "use_fused_32bit", decide)
    calls = []
    for n in (4, 12):
        ps = _params(n, "meta")
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt = create_optimizer(ps, "lion", lr=1e-2, weight_decay=0.1)
        opt.param_groups[0]["fused"] = True
        calls.append(_after_the_read(opt, seen, first=lambda: asked.update(before=0, after=0)))
        assert asked == {"before": 2 * n, "after": 0}, (n, asked)
    assert calls[0] == calls[1], calls


@pytest.mark.parametrize("name,fused", [("adamw8bit", None), ("adamw8bit", True), ("lion8bit", True),
                                        ("adamw4bit", None)])
def test_quantized_prepared_equals_the_loop_bit_for_bit(name, fused, monkeypatch):
    """The quantized rules planned and prepared before the read (``Quantized.foreach_prepare``) and stepped by
    the loop: the same parameters and encoded state bit for bit, a NaN step skipped by both; pieces of 256
    (a quantized tensor stepped whole from its first piece), ``fused=True``: bitsandbytes' kernels (the CPU's)."""
    if fused:
        pytest.importorskip("bitsandbytes")
    hp = dict(lr=1e-2, weight_decay=0.1, min_quant_size=64)
    if fused is not None:
        hp["fused"] = fused
    a, b = _params(8), _params(8)
    pa, pb = (create_optimizer(x, name, **hp) for x in (a, b))
    pa.chunk_numel = pb.chunk_numel = 256
    monkeypatch.setattr(pb, "_plan_foreach", lambda work: None)
    prepared = []
    prepare = E.LowMemOptimizer._prepare_buckets

    def counted(self, buckets):
        out = prepare(self, buckets)
        prepared.append(len(out) == len(buckets) > 0)
        return out

    monkeypatch.setattr(E.LowMemOptimizer, "_prepare_buckets", counted)
    g = torch.Generator().manual_seed(5)
    for k in range(5):
        for i, (p, q) in enumerate(zip(a, b)):
            gr = torch.randn(p.shape, generator=g)
            if k == 2 and i == 2:
                gr.view(-1)[7] = float("nan")
            p.grad, q.grad = gr, gr.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pa.step()
            pb.step()
    assert pa.skipped_steps == pb.skipped_steps == 1 and prepared == [True] * 4, prepared
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key, x in pa.state[p].items():
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, pb.state[q][key]), (name, key)


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_quantized_decides_its_fused_members_before_the_read_on_meta(name, monkeypatch):
    """The 8-bit rules with ``fused=True`` on meta tensors (the CUDA code path; bitsandbytes' eligibility
    answered "no" here, counted): every member's kernel decision (``bnb_fused.use_fused``) before the read,
    none after it."""
    from lowmem.optim import bnb_fused

    asked = {"before": 0, "after": 0}
    seen = {"read": False}

    def decide(p, g, state, group):
        asked["after" if seen["read"] else "before"] += 1
        return False

    monkeypatch.setattr(bnb_fused, "use_fused", decide)
    n = 8
    ps = _params(n, "meta")
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = create_optimizer(ps, name, lr=1e-2, min_quant_size=64)
    opt.param_groups[0]["fused"] = True
    _after_the_read(opt, seen, first=lambda: asked.update(before=0, after=0))
    assert asked["after"] == 0 and asked["before"] >= 2 * n // 2, asked  # (the quantized half: 2 of 4 shapes)
