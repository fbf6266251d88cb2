"""The step's host work after its one device read (issue 15, the H200's AdamW at 1.44x torch's fused AdamW).

A steady step whose parameters are all on the foreach path (AdamW, Lion, the quantized rules, Adafactor, ...) is
planned (``LowMemOptimizer._plan_foreach``: its buckets, each step counter's next value) between the non-finite
check's kernels and its read (``engine._all_finite``'s ``prepare``); after the read the host only writes the
counters and launches the buckets. Pinned here without timings: the planned step equals the step's loop bit for
bit (a skipped step included), and on meta tensors (the CUDA code path) nothing after the read grows with the
number of parameters: no step counter is read there, and lowmem's Python calls after it are as many for 12
parameters as for 4.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim import engine as E

LOWMEM = E.__file__.rsplit("/optim/", 1)[0]


def _params(n: int, device: str = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(24, 16), (16,), (40, 24), (8, 8, 3)]
    return [torch.nn.Parameter(torch.randn(shapes[i % 4], generator=g).to(device)) for i in range(n)]


CASES = {
    "adamw": dict(name="adamw", hp=dict(weight_decay=0.1)),
    "adamw_ops": dict(name="adamw", hp=dict(weight_decay=0.1), fused=False),  # the multi-tensor operations
    "adamw_pieces": dict(name="adamw", hp=dict(), chunk=256, fused=False),  # tensors in pieces, several buckets
    "adamw_two_groups": dict(name="adamw", hp=dict(weight_decay=0.05), groups=True),
    "adamw8bit": dict(name="adamw8bit", hp=dict(min_quant_size=64), chunk=256, n=4),
    "lion": dict(name="lion", hp=dict(weight_decay=0.1)),
    "adafactor": dict(name="adafactor", hp=dict(), n=4),
    "adamw_unchecked": dict(name="adamw", hp=dict(), check=False),  # skip_nonfinite=False: planned, no read
}


def _build(case: dict, ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if case.get("groups"):
        params = [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}]
    else:
        params = ps
    opt = create_optimizer(params, case["name"], lr=1e-2, **case["hp"])
    if "chunk" in case:
        opt.chunk_numel = case["chunk"]
    opt.skip_nonfinite = case.get("check", True)
    return opt


@pytest.mark.parametrize("label", sorted(CASES))
def test_planned_step_equals_the_loop_bit_for_bit(label, monkeypatch):
    """Six steps of an optimizer whose steady steps are planned before the check's read and of one stepped by
    the loop (``_plan_foreach`` answering ``None``), the fourth with a NaN gradient: the same parameters, state
    and step counters bit for bit, the NaN step skipped by both (state untouched, counters unchanged, told);
    the planned one planned every later step (the test is not vacuous)."""
    import lowmem.optim.functional.adam as FA

    case = CASES[label]
    monkeypatch.setattr(FA, "FUSED_ON_CPU", case.get("fused", True))
    planned, loop = _params(case.get("n", 8)), _params(case.get("n", 8))
    a, b = _build(case, planned), _build(case, loop)
    taken = []
    plan = E.LowMemOptimizer._plan_foreach

    def counted(self, work):
        out = plan(self, work)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(b, "_plan_foreach", lambda work: None)
    monkeypatch.setattr(E.LowMemOptimizer, "_plan_foreach", counted)
    g = torch.Generator().manual_seed(1)
    for k in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in planned]
        if k == 3 and case.get("check", True):
            grads[-2].view(-1)[5] = float("nan")
        for p, q, gr in zip(planned, loop, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        with warnings.catch_warnings(record=True) as told:
            warnings.simplefilter("always")
            a.step()
            b.step()
        assert (len([w for w in told if "non-finite" in str(w.message)]) == 2) == (k == 3 and case.get("check", True))
    skipped = 1 if case.get("check", True) else 0
    assert a.skipped_steps == b.skipped_steps == skipped
    # (the first step: no state yet, stepped by the loop; the NaN step planned, then skipped at the read)
    assert taken == [False, True, True, True, True, True], taken
    for p, q in zip(planned, loop):
        assert torch.equal(p, q)
        sa, sb = a.state[p], b.state[q]
        assert sa.keys() == sb.keys() and float(sa["step"]) == 6.0 - skipped
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), (label, key)


def _meta_host_work(name: str, n: int, matrices: bool = False, **hp) -> tuple[int, int, int, int]:
    """A steady step of ``name`` on ``n`` meta parameters (the CUDA code path; ``matrices``: all 24 x 16): its
    device reads, the step counters read after the last device read, and the Python calls after it of the
    engine and of all of lowmem (the moment rules' too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ps = [torch.nn.Parameter(torch.zeros(24, 16, device="meta")) for _ in range(n)] if matrices else _params(n, "meta")
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = create_optimizer(ps, name, lr=1e-2, **hp)
    reads = {"device": 0, "counters_after": 0, "engine_calls_after": 0, "calls_after": 0}

    class Order(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                if args[0].device.type == "cpu":
                    reads["counters_after"] += reads["device"] > 0
                    return func(*args, **(kwargs or {}))
                reads["device"] += 1
                return True
            return func(*args, **(kwargs or {}))

    def profile(frame, event, arg):
        if event == "call" and reads["device"] and frame.f_code.co_filename.startswith(LOWMEM):
            reads["calls_after"] += 1
            reads["engine_calls_after"] += frame.f_code.co_filename == E.__file__

    with Order():
        for _ in range(2):
            opt.step()
        reads.update(device=0, counters_after=0, engine_calls_after=0, calls_after=0)
        sys.setprofile(profile)
        try:
            opt.step()
        finally:
            sys.setprofile(None)
    return reads["device"], reads["counters_after"], reads["engine_calls_after"], reads["calls_after"]


@pytest.mark.parametrize("name", ["adamw", "lion", "adamw8bit", "adafactor"])
def test_host_work_after_the_read_does_not_grow_with_the_parameters(name):
    """On meta tensors, a steady step reads the device once; after that read no step counter is read (they were
    read while planning, before it) and the engine runs as many Python calls for 12 parameters as for 4 (the
    buckets' launches, not a per-parameter loop); for AdamW (torch's fused kernel) all of lowmem does. (The
    other rules' ``foreach_step_`` still decide per tensor after the read: Lion's bitsandbytes kernel, the
    quantized states' fused members; FOUND_HOSTTIME.)"""
    few, many = _meta_host_work(name, 4), _meta_host_work(name, 12)
    assert few[0] == many[0] == 1
    assert few[1] == many[1] == 0, (few, many)
    assert few[2] == many[2] and few[3] > 0, (few, many)  # (a rule preparing its buckets: no engine call after it)
    if name == "adamw":
        assert few[3] == many[3], (few, many)


def test_filling_a_projected_bucket_is_linear_in_its_members():
    """GaLore's projected parameters join one bucket (``_joins_low_bucket``): the engine's Python calls after the
    read grow by the same amount per parameter from 2 to 4 to 8 parameters (the step counts the bucket's
    elements as it fills it; summing them at every join made it quadratic: 8,437 engine calls on llama-368m,
    2,636 now)."""
    calls = [_meta_host_work("galore_adamw", n, matrices=True, rank=4, update_proj_gap=1000)[2] for n in (2, 4, 8)]
    assert calls[2] - calls[1] == 2 * (calls[1] - calls[0]) > 0, calls


def test_a_counter_shared_by_two_parameters_is_left_to_the_loop():
    """A step counter tensor shared by two parameters (set by hand) is advanced once per parameter by the step's
    loop; the plan, which reads every counter before writing any, declines such a step (same result as the loop)."""
    ps = _params(3)
    opt = create_optimizer(ps, "adamw", lr=1e-2)
    for _ in range(2):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    opt.state[ps[1]]["step"] = opt.state[ps[0]]["step"]
    for _ in range(2):
        opt.step()
    assert float(opt.state[ps[0]]["step"]) == 6.0 and float(opt.state[ps[2]]["step"]) == 4.0


def _prepared_adamw(params, **hp) -> torch.optim.Optimizer:
    """AdamW whose moment rule prepares its buckets ahead (``foreach_prepare`` through
    ``functional.adam.adamw_foreach_prepare``, the form FOUND_HOSTTIME 1 proposes for ``AdamMoments``)."""
    import copy
    import dataclasses

    import lowmem.optim.functional.adam as FA
    from lowmem.optim import get_entry

    recipe = get_entry("adamw").recipe

    class Prepared(type(recipe.moment)):
        def foreach_prepare(self, params, grads, states, group, t, lr, step_lr=None):
            if self.foreach_decays_after:
                return None
            beta1, beta2 = group["betas"]
            return FA.adamw_foreach_prepare(params, grads, [s["exp_avg"] for s in states],
                                            [s["exp_avg_sq"] for s in states], t, beta1, beta2, lr,
                                            group.get("weight_decay", 0.0), group["eps"],
                                            eps_placement=self.eps_placement, step_lr=step_lr)

    moment = copy.copy(recipe.moment)
    moment.__class__ = Prepared
    return E.LowMemOptimizer(params, recipe=dataclasses.replace(recipe, moment=moment), **hp)


@pytest.mark.parametrize("fused", [True, False])
def test_a_rule_that_prepares_its_buckets_steps_the_same_and_checks_before_the_read(fused, monkeypatch):
    """A moment rule with ``foreach_prepare`` (here AdamW's through ``adamw_foreach_prepare``): the same parameters
    and state bit for bit as AdamW (torch's fused kernel, or the multi-tensor operations), a NaN step skipped;
    on meta tensors its per-tensor checks (``fused_indices``) run before the read, none after it."""
    import lowmem.optim.functional.adam as FA
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(FA, "FUSED_ON_CPU", fused)
    a, b = _params(6), _params(6)
    pa, pb = _prepared_adamw(a, lr=1e-2, weight_decay=0.1), create_optimizer(b, "adamw", lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(2)
    for k in range(5):
        for p, q in zip(a, b):
            gr = torch.randn(p.shape, generator=g)
            if k == 2 and p is a[1]:
                gr.view(-1)[0] = float("inf")
            p.grad, q.grad = gr, gr.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pa.step()
            pb.step()
    assert pa.skipped_steps == pb.skipped_steps == 1
    for p, q in zip(a, b):
        assert torch.equal(p, q) and all(torch.equal(pa.state[p][k], pb.state[q][k]) for k in pa.state[p])

    ps = _params(6, "meta")
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = _prepared_adamw(ps, lr=1e-2)
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


def test_a_rule_overriding_foreach_step_does_not_inherit_the_preparation():
    """A rule that overrides ``foreach_step_`` under a base that prepares its buckets is stepped by its own
    ``foreach_step_`` (the engine does not take the base's ``foreach_prepare`` for it)."""
    import copy
    import dataclasses

    ps = _params(3)
    base = _prepared_adamw(ps, lr=1e-2)
    calls = []

    class Own(type(base.recipe.moment)):
        def foreach_step_(self, params, grads, states, group, t, lr, step_lr=None):
            calls.append(len(params))
            super().foreach_step_(params, grads, states, group, t, lr, step_lr)

    moment = copy.copy(base.recipe.moment)
    moment.__class__ = Own
    opt = E.LowMemOptimizer(ps, recipe=dataclasses.replace(base.recipe, moment=moment), lr=1e-2)
    for _ in range(3):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    assert sum(calls) == 9, calls  # (every step's buckets through Own.foreach_step_)
