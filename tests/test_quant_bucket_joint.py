"""A quantized bucket's decode and encode off the CPU in one buffer (issue 15, session 10).

Off the CPU (``Q.launch_bound``) ``Quantized._decoded_many`` copies every scale and code tensor of a bucket's
whole-block members and rank-1 stacks into one buffer by one ``torch.cat`` (``Q.joint_codes``), converts all 4-bit
codes to the lookup index at once, multiplies every blockwise 4-bit moment by its absmax at once and takes the
encode's block absmax and its clamp once (``Quantized._decoded_joint``). Checked here: the same bits as the plain
per-parameter whole step (the device's forms forced on the CPU; full-rank buckets and projected buckets), and the
kernels of one bucket on meta tensors (the GPU's code path).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lowmem
from lowmem.optim.functional import quant as Q

# several members of one shape (batched blocks; rank-1 stacks of 3 and of 2), a partial last block (alone),
# an odd rank-1 matrix (alone), a 1-D tensor of whole blocks, a tensor below min_quant_size (float32 moments)
_SHAPES = [(64, 256), (64, 256), (64, 256), (128, 96), (128, 96), (300, 7), (33, 65), (4096,), (8,)]


def _run(name: str, foreach, steps: int = 4, chunk=None, shapes=_SHAPES, **kw):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = lowmem.create_optimizer(ps, name, lr=1e-2, weight_decay=0.1, min_quant_size=16, foreach=foreach, **kw)
    opt.chunk_numel = chunk
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
            p.grad.view(-1)[:256] = 0.0  # (zero blocks of the moments at every step: the clamp of their absmax)
        opt.step()
    return [p.detach().clone() for p in ps] + [v.clone() for p in ps for _, v in sorted(opt.state[p].items())
                                              if torch.is_tensor(v)]


@pytest.mark.parametrize("name", ["adamw8bit", "adamw4bit", "adamw4bit_rank1"])
@pytest.mark.parametrize("chunk", [None, 1 << 15])
def test_joint_bucket_equals_the_plain_step(name, chunk, monkeypatch):
    """Buckets with the device's joint decode / encode forced on the CPU give the parameters and state of the
    plain per-parameter step (CPU forms), bit for bit."""
    ref = _run(name, False)
    calls = []
    orig = Q.joint_codes
    monkeypatch.setattr(Q, "joint_codes", lambda *a: calls.append(1) or orig(*a))
    monkeypatch.setattr(Q, "launch_bound", lambda device: True)
    got = _run(name, None, chunk=chunk)
    assert calls, "the joint path did not run"
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b), (name, chunk, a.shape)


@pytest.mark.parametrize("name", ["galore_adamw8bit"])
def test_joint_projected_bucket_equals_the_cpu_forms(name, monkeypatch):
    """The projected bucket (``Quantized.foreach_direction``) with the joint forms forced on the CPU: the bits of the
    same bucket with the CPU's forms (GaLore's multi-tensor step is compared with its per-parameter one elsewhere)."""
    shapes = [(64, 256)] * 3 + [(96, 128)] * 2 + [(256,)]
    kw = dict(rank=8, update_proj_gap=2)
    ref = _run(name, None, shapes=shapes, **kw)
    calls = []
    orig = Q.joint_codes
    monkeypatch.setattr(Q, "joint_codes", lambda *a: calls.append(1) or orig(*a))
    monkeypatch.setattr(Q, "launch_bound", lambda device: True)
    got = _run(name, None, shapes=shapes, **kw)
    assert calls, "the joint path did not run"
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b), (name, a.shape)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return True if args[0].dtype is torch.bool else 1
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _meta_bucket_ops(name: str, shapes) -> list[str]:
    ps = [torch.nn.Parameter(torch.zeros(s, device="meta")) for s in shapes]
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = lowmem.create_optimizer(ps, name, lr=1e-3, min_quant_size=16)
    opt.chunk_numel = None
    for _ in range(2):
        with _Ops():
            opt.step()
    with _Ops() as ops:
        opt.step()
    return ops.ops


@pytest.mark.parametrize("name,expected", [
    # one cat for every code and scale tensor (was 4: codes and absmax per moment)
    ("adamw8bit", {"cat": 1, "dequantize_blockwise": 2, "quantize_blockwise": 2, "_foreach_copy_": 1}),
    # + one int32 conversion, one lookup per moment, one absmax product, one block absmax and clamp
    # (was 4 cats, 2 conversions, 2 products, 2 vector_norms, 2 clamps)
    ("adamw4bit", {"cat": 1, "_to_copy": 1, "index_select": 2, "mul_": 1, "linalg_vector_norm": 1, "clamp": 1,
                   "div": 2, "searchsorted": 2, "_foreach_copy_": 1}),
    # blockwise m + two rank-1 stacks of v: no cat / stack per stack (was cat + 2 stack each, 2 more cats for m);
    # the stacks' lookup, clamp, division, search and pack once for both (was once per stack)
    ("adamw4bit_rank1", {"cat": 1, "stack": 1, "_to_copy": 1, "index_select": 2, "minimum": 4, "amax": 4,
                         "clamp": 1, "clamp_": 1, "div": 2, "searchsorted": 2, "add": 2, "_foreach_copy_": 1}),
])
def test_bucket_kernels_on_the_devices_path(name, expected):
    """A bucket of three 64 x 256 and two 128 x 96 weights on meta tensors (the GPU's code path): the codec's
    kernels per bucket. (``stack`` 1: the engine's non-finite check.)"""
    ops = _meta_bucket_ops(name, [(64, 256)] * 3 + [(128, 96)] * 2)
    got = {k: ops.count(k) for k in expected}
    assert got == expected, ops


FOUR_BIT_BUCKETS = {  # (shapes, block size): as tests/test_transient_4bit_buckets.py's CPU cases
    "whole_blocks": ([(32, 256)] * 4, 256),
    "partial_blocks": ([(4, 32), (4, 32), (4, 32), (4, 40), (8,)], 64),  # (4, 40): alone; (8,): float32 moments
    "mixed": ([(128, 512), (9, 40), (4, 4)], 256),
    "odd_rank1": ([(9, 7), (9, 7), (16, 8)], 64),  # rank-1 of an odd count: alone
    "batched_3d": ([(2, 9, 8), (3, 5, 7), (16, 8), (8, 16), (16, 8), (10,)], 64),  # 3-D rank-1: alone
    "odd_partial": ([(7, 37), (5, 33), (3, 3), (64, 4)], 128),
    "two_stacks": ([(64, 32)] * 3 + [(32, 48)] * 2 + [(512,)], 64),
}


@pytest.mark.parametrize("case", sorted(FOUR_BIT_BUCKETS))
@pytest.mark.parametrize("name,v_normalization", [("adamw4bit", "block"), ("adamw4bit_rank1", "rank1")])
def test_joint_4bit_direction_allocates_what_it_reports(name, v_normalization, case, monkeypatch):
    """A projected bucket of 4-bit moments with the device's forms (forced on the CPU): the multi-tensor direction
    allocates (torch's MemTracker) exactly what foreach_direction_bucket_transient_bytes reports
    (Quantized._four_bit_joint_bytes); was the per-element bound off the CPU (29 B per element)."""
    from test_engine_accounting import _allocated_peak

    from lowmem.optim.registry import get_entry

    monkeypatch.setattr(Q, "launch_bound", lambda device: True)
    shapes, block = FOUR_BIT_BUCKETS[case]
    rule = get_entry(name).recipe.moment
    group = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "block_size": block, "min_quant_size": 16,
             "lr": 1e-3, "v_normalization": v_normalization}
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(s, generator=gen) for s in shapes]
    states = []
    for g in gs:
        states.append({})
        rule.init_state(states[-1], g.shape, group, g)
    rule.foreach_direction(gs, states, group, 1, 1e-3)  # (non-zero moments; the per-device tables made)
    inputs = gs + [t for st in states for t in st.values()]
    measured = _allocated_peak(lambda: rule.foreach_direction(gs, states, group, 2, 1e-3), inputs)
    report = rule.foreach_direction_bucket_transient_bytes([(g.shape, st) for g, st in zip(gs, states)])
    assert measured == report, (measured, report)
    assert report <= rule.foreach_direction_transient_bytes(sum(g.numel() for g in gs))  # (the per-element bound)


@pytest.mark.parametrize("case", sorted(FOUR_BIT_BUCKETS))
@pytest.mark.parametrize("name,v_normalization", [("adamw4bit", "block"), ("adamw4bit_rank1", "rank1")])
@pytest.mark.parametrize("device_forms", [False, True], ids=["cpu", "device"])
def test_4bit_bucket_step_allocates_what_it_reports(name, v_normalization, case, device_forms, monkeypatch):
    """The full-rank bucket step (``Quantized.foreach_step_``: the engine's buckets of adamw4bit / adamw4bit_rank1)
    allocates (torch's MemTracker) what ``foreach_bucket_transient_bytes(numel, members, group)`` reports, with
    the CPU's forms and with the device's (forced on the CPU). Was the per-element bound: 29 B per quantized
    element plus the inner rule's 8 B per element (4 x (32, 256) whole blocks: 1,212,416 reported)."""
    from test_engine_accounting import _allocated_peak

    from lowmem.optim.registry import get_entry

    if device_forms:
        monkeypatch.setattr(Q, "launch_bound", lambda device: True)
    shapes, block = FOUR_BIT_BUCKETS[case]
    rule = get_entry(name).recipe.moment
    group = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "block_size": block, "min_quant_size": 16,
             "lr": 1e-3, "v_normalization": v_normalization}
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen) for s in shapes]
    gs = [torch.randn(s, generator=gen) for s in shapes]
    states = []
    for g in gs:
        states.append({})
        rule.init_state(states[-1], g.shape, group, g)
    if not all(rule.supports_foreach_for(g.shape, group, st) for g, st in zip(gs, states)):
        pytest.skip("a member outside the multi-tensor step (3-D rank-1: per tensor)")
    rule.foreach_step_(ps, gs, states, group, 1, 1e-3)  # (non-zero moments; the per-device tables made)
    measured = _allocated_peak(lambda: rule.foreach_step_(ps, gs, states, group, 2, 1e-3),
                               ps + gs + [t for st in states for t in st.values()])
    members = [(g.numel(), st) for g, st in zip(gs, states)]
    report = rule.foreach_bucket_transient_bytes(sum(g.numel() for g in gs), members, group)
    assert measured == report, (measured, report)
    assert report <= rule.foreach_bucket_transient_bytes(sum(g.numel() for g in gs), members)  # (the bound)
