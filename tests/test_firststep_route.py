"""A parameter's first step without ``materialize_state()`` (the Trainer's, ``lowmem train``'s) takes the route its
later steps take: ``LowMemOptimizer._fused_whole`` decides a parameter with no state from the state its first step
makes (``_state_to_be``: the moment rule's ``init_state`` on a meta twin), so a bfloat16 weight with bfloat16 moments
joins torch's fused AdamW bucket at its first step (before FIRSTSTEP, 2026-12-01: the capped buckets' float32
arithmetic, 12 B per element of the largest). Checked on the CPU (the kernel's device by default): the lazily
initialised run equals, bit for bit, a twin whose state was materialized before its first step (decided with its
state from the start, the route every later step takes), and ``step_transient_bytes(first_step=True)`` equals the
default for AdamW. BAdam forwards ``first_step`` for a block whose state its count makes (FOUND_EST18 4)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.optim import LowMemOptimizer, create_optimizer
from lowmem.optim.functional import adam as FA

SHAPES = [(24, 40), (40,), (640,)]  # 1,640 elements

CASES = {  # name -> [(dtype, state_dtype)] per group
    "bf16-bf16": [(torch.bfloat16, "param")],
    "fp32-fp32": [(torch.float32, "float32")],
    "mixed": [(torch.bfloat16, "param"), (torch.float32, "float32"), (torch.bfloat16, "float32")],
}


def _build(case, chunk_numel, materialize):
    gen = torch.Generator().manual_seed(0)
    groups = []
    for dtype, state_dtype in CASES[case]:
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
        groups.append({"params": ps, "state_dtype": state_dtype, "weight_decay": 0.1})
    opt = create_optimizer(groups, "adamw", lr=1e-2)
    opt.chunk_numel, opt.skip_nonfinite = chunk_numel, False
    if materialize:
        opt.materialize_state()
    return opt


def _run(opt, steps):
    gen = torch.Generator().manual_seed(1)
    fused = []
    for _ in range(steps):
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
        fused.append([opt._routes[id(p)].fused for g in opt.param_groups for p in g["params"]])
    return fused


@pytest.mark.parametrize("chunk_numel", [256, 100_000])
@pytest.mark.parametrize("case", list(CASES))
def test_first_step_takes_the_later_steps_route(case, chunk_numel):
    """Lazily initialised vs materialized before the first step, 3 steps: every parameter and state tensor equal bit
    for bit after each run, the route (fused or not) the same at every step, bfloat16 weights with bfloat16 moments
    and float32 weights on the kernel from the first step, bfloat16 weights with float32 moments never."""
    FA.clear_step_tensors()
    lazy, twin = _build(case, chunk_numel, False), _build(case, chunk_numel, True)
    assert all(not lazy.state.get(p) for g in lazy.param_groups for p in g["params"])
    routes = _run(lazy, 3)
    assert routes == _run(twin, 3)
    expect = [dtype == torch.float32 or sd == "param" for dtype, sd in CASES[case] for _ in SHAPES]
    assert routes[0] == routes[2] == expect
    for ga, gb in zip(lazy.param_groups, twin.param_groups):
        for a, b in zip(ga["params"], gb["params"]):
            assert torch.equal(a, b)
            sa, sb = lazy.state[a], twin.state[b]
            assert sa.keys() == sb.keys()
            for k in sa:
                assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("case", list(CASES))
def test_first_step_report_equals_the_default(case):
    """``step_transient_bytes(first_step=True)`` of AdamW equals the default, chunked and whole (before FIRSTSTEP:
    bf16-bf16 3,072 / 19,680 B against 8)."""
    for chunk_numel in (256, 100_000):
        opt = _build(case, chunk_numel, True)
        assert opt.step_transient_bytes(first_step=True) == opt.step_transient_bytes()
        assert opt._fused_step_bytes(first_step=True) == opt._fused_step_bytes()


class _Ops(TorchDispatchMode):
    """The names of the operations dispatched under it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_route_of_no_state_reads_no_state_and_allocates_nothing():
    """The state a route decision is told for a parameter with no state (``_state_to_be``): the rule's dtypes as
    0-element tensors on the parameter's device, ``kahan_comp`` where the write-back will make one (then no kernel:
    the kernel rounds to nearest), nothing added to the optimizer's state; a dispatch mode (``lowmem bench
    --launches``' counter, a memory tracer) sees only the 0-element stand-ins (before the meta twin was made outside
    modes: 2 zero fills per parameter, counted as kernels by the launch counter, 879 / 488 -> 896 / 896 at the first
    step of llama-368m bf16, 458 / 458 now)."""
    p = torch.nn.Parameter(torch.zeros(8, 4, dtype=torch.bfloat16))
    opt = create_optimizer([p], "adamw", state_dtype="param")
    group = opt.param_groups[0]
    made = opt._state_to_be(p, group)
    assert {k: (v.dtype, v.numel(), v.device.type) for k, v in made.items()} == {
        "exp_avg": (torch.bfloat16, 0, "cpu"), "exp_avg_sq": (torch.bfloat16, 0, "cpu")}
    with _Ops() as ops:
        assert opt._fused_whole(p, group, {}) and not opt.state.get(p)
    assert set(ops.names) == {"empty"}, ops.names  # (the meta twin's zero fills outside the mode: no kernel counted)
    opt32 = create_optimizer([p], "adamw")  # float32 moments of a bfloat16 weight: no kernel
    assert not opt32._fused_whole(p, opt32.param_groups[0], {})
    kahan = create_optimizer([p], "adamw", state_dtype="param", kahan_summation=True)
    assert "kahan_comp" in kahan._state_to_be(p, kahan.param_groups[0])
    assert not kahan._fused_whole(p, kahan.param_groups[0], {})


def test_badam_forwards_first_step_for_a_fresh_block(monkeypatch):
    """BAdam's ``step_transient_bytes`` takes ``first_step`` and tells the engine's ``first_step=True`` for a block
    whose state its count makes (``_fresh_block_state``, right at a switch), the caller's value once the block has
    stepped (FOUND_EST18 4)."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    opt = create_optimizer(model, "badam", switch_every=100)
    told = []
    engine = LowMemOptimizer.step_transient_bytes

    def spy(self, per_parameter=False, first_step=False):
        told.append(first_step)
        return engine(self, per_parameter, first_step=first_step)

    monkeypatch.setattr(LowMemOptimizer, "step_transient_bytes", spy)
    fresh = opt.step_transient_bytes()
    assert told == [True] and fresh == opt.step_transient_bytes(first_step=True)
    model(torch.randn(2, 8, generator=gen)).sum().backward()
    opt.step()
    told.clear()
    opt.step_transient_bytes()
    opt.step_transient_bytes(first_step=True)
    assert told == [False, True]
