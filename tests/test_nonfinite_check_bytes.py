"""The step's non-finite check (``engine._all_finite``) and its byte count (``engine._all_finite_bytes``, part of
``step_transient_bytes()``): what it allocates alive together, every dispatched output counted (0-d norms
too), equals the count for float32 (the norms, then their stack: 8 bytes per tensor), bfloat16 (one multi-tensor
norm, its stack cast to float32 once) and mixed dtypes (one per dtype, their stacks concatenated); a float16
norm that overflowed is rechecked a bounded piece at a time (no float32 or float64 copy of the whole tensor, which
``vector_norm(t, dtype=...)`` makes inside the kernel); the answers are unchanged."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.optim import create_optimizer
from lowmem.optim import engine as E


class _AllLive(TorchDispatchMode):
    """Bytes of the new storages the dispatched operations return (0-d ones too), alive together at most."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _drop(self, nbytes, ptr):
        self.live -= nbytes
        self.seen.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [a for a in args if isinstance(a, torch.Tensor)]
        flat += [x for a in args if isinstance(a, (list, tuple)) for x in a if isinstance(x, torch.Tensor)]
        flat += [a for a in (kwargs or {}).values() if isinstance(a, torch.Tensor)]  # an out= tensor is written, not new
        inputs = {a.untyped_storage().data_ptr() for a in flat}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
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


def _spec(ts):
    return [(t.numel(), t.dtype, t.device) for t in ts]


CASES = {
    "float32": [torch.float32] * 5,
    "bfloat16": [torch.bfloat16] * 5,
    "mixed": [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float64],
    "interleaved": [torch.bfloat16, torch.float32, torch.bfloat16, torch.float64, torch.float32],
    "float64_first": [torch.float64] * 4 + [torch.float32],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_allocates_what_it_counts(case):
    ts = [torch.randn(100, 50).to(d) for d in CASES[case]]
    with _AllLive() as m:
        assert E._all_finite(ts)
    count = E._all_finite_bytes(_spec(ts))
    assert m.peak == count if case != "mixed" else m.peak < count
    # float32: the 0-d norms and their stack; bfloat16: the 0-d norms (2 B) beside their stack, then the stack's
    # float32 copy beside it (6 B per norm; was 10: each norm cast alone, the copies beside the 0-d norms);
    # several dtypes: the float32 stacks (4 B per norm) and their concatenation; float64 first: its 0-d norms
    # beside their stack (16 B per norm) outweigh that
    assert count == {"float32": 8 * 5, "bfloat16": 6 * 5, "mixed": 4 * 5000 + 32,  # (mixed: its float16's recheck)
                     "interleaved": 8 * 5, "float64_first": 16 * 4}[case]
    if case == "mixed":  # the norms: the float32 stacks of each dtype's beside their concatenation
        assert m.peak == 8 * 5


def test_failing_checks_allocate_within_the_count_and_answer_as_before():
    """NaN, Inf and a norm >= MAX_GRAD_NORM fail at once from the norms (no recheck); a float16 norm that
    overflowed float16 (65504) is rechecked (finite below the bound: passes; NaN: fails)."""
    cases = []
    nan = [torch.randn(300, 400), torch.randn(1000)]
    nan[0][3, 3] = float("nan")
    cases.append((nan, False))
    inf = [torch.randn(400, 300).t(), torch.randn(10)]
    inf[0][5, 5] = float("inf")
    cases.append((inf, False))
    cases.append(([torch.full((70000,), 1e19)], False))  # norm 2.6e21 >= MAX_GRAD_NORM
    cases.append(([torch.full((300, 400), 1000.0).half(), torch.randn(10)], True))  # f16 norm 3.5e5: overflowed
    cases.append(([torch.full((400, 300), 1000.0).half().t(), torch.randn(10)], True))  # (non-contiguous)
    cases.append(([torch.full((300, 400), 1000.0).half(), torch.full((3,), float("nan")).half()], False))
    cases.append(([torch.full((300, 400), 6e4).half()], True))  # norm 2.1e7: fine in float32
    for ts, want in cases:
        with _AllLive() as m:
            assert E._all_finite(ts) is want
        assert m.peak <= E._all_finite_bytes(_spec(ts))


def test_float16_recheck_copies_a_piece_at_a_time():
    """The recheck's float32 copies (made inside vector_norm, seen by the profiler's allocator events) are at
    most NORM_PIECE elements, though the tensor is 12x larger; NaN/Inf float32 checks copy nothing."""
    t = torch.full((3 * E.NORM_PIECE, 4), 1000.0).half()
    f = torch.randn(3 * E.NORM_PIECE, 4)
    f[0, 0] = float("nan")
    for ts, want in (([t], True), ([f], False)):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            assert E._all_finite(ts) is want
        copies = [e.cpu_memory_usage for e in prof.events() if e.name == "aten::empty_strided"]
        assert max(copies) == 4 * E.NORM_PIECE if want else max(copies, default=0) <= 8, copies
        assert max(e.cpu_memory_usage for e in prof.events()) <= E._all_finite_bytes(_spec(ts))


def test_step_transient_counts_the_check():
    """AdamW on the kernel allocates nothing beyond the check (8 bytes per float32 tensor) and the kernel's step
    count (4 kept, 4 new); bfloat16 parameters add their bfloat16 norms (2 bytes each); a CUDA-like device
    (meta: not known) the multi-tensor norm kernel's partial sums; nothing with skip_nonfinite off."""
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in [(300, 200), (100,), (7,)]]
    opt = create_optimizer(ps, "adamw")
    opt.materialize_state()
    assert opt.step_transient_bytes() == 4 + max(4, 8 * 3)
    assert E._all_finite_bytes([(60000, torch.float32, torch.device("meta")), (70000, torch.float32, torch.device("meta"))]) \
        == max(4 * 2 + 4 * 2 * 2, 8 * 2)  # 2 tensors x 2 chunks of 65536 elements of partial sums
    opt.skip_nonfinite = False
    assert opt.step_transient_bytes() == 4 + 4


OSD_DTYPES = {  # (no float16: the check's count then holds the failing step's piecewise recheck, _norm_below)
    "float32": [torch.float32] * 4,
    "bfloat16": [torch.bfloat16] * 4,
    "mixed": [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16],
}


@pytest.mark.parametrize("case", sorted(OSD_DTYPES))
def test_osd_pre_check_read_with_the_check_allocates_what_it_counts(case):
    """Online Subspace Descent's pre_check is read with the non-finite check (``_finite_and_pre_check``): what
    that phase allocates (every dispatched output, 0-d ones too) equals ``_check_bytes()``: 57 B float32, 44
    bfloat16, 56 mixed for 4 projected parameters and a vector (counted 80 / 12,384 / 12,384 before: 16 B per
    parameter and a float_norm block the pre_check never allocates; bfloat16 49 while the check cast each norm
    alone, now the pre_check's own peak is the larger); the float32 norms it keeps through the step
    (4 bytes per float32 projected parameter; none of a bfloat16 one) are in every later phase."""
    dtypes = OSD_DTYPES[case]
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 48).to(d)) for d in dtypes] + [torch.nn.Parameter(torch.randn(48))]
    opt = create_optimizer([{"params": ps[:4], "rank": 8}, {"params": ps[4:]}], "osd_adamw", lr=1e-2)
    orig, peaks = opt._all_finite, []

    def measured(work, lows=None, tokens=None):
        with _AllLive() as m:
            ok = orig(work, lows, tokens)
        peaks.append(m.peak)
        return ok

    opt._all_finite = measured
    for _ in range(4):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt._pre_check_bytes()[0] == 4 * sum(d is torch.float32 for d in dtypes)
    assert max(peaks) == opt._check_bytes() == {"float32": 57, "bfloat16": 44, "mixed": 56}[case], (peaks, opt._check_bytes())
    assert opt._check_bytes() <= opt.step_transient_bytes()


@pytest.mark.parametrize("case", sorted(OSD_DTYPES))
def test_a_refresh_read_with_the_check_allocates_what_it_counts(case):
    """GaLore's refresh steps read their gradients' usability with the check (``_finite_and_pre_check``), its other
    steps take ``_all_finite``: both the grouped norms (one cast per dtype, ``engine._norms``), so every step
    allocates 40 B for 4 projected weights and a vector, and ``_check_bytes()`` is that (was 48 B bfloat16 / 44
    mixed at the refresh steps while that check cast each norm to float32 alone)."""
    dtypes = OSD_DTYPES[case]
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 48).to(d)) for d in dtypes] + [torch.nn.Parameter(torch.randn(48))]
    opt = create_optimizer([{"params": ps[:4], "rank": 8, "update_proj_gap": 2}, {"params": ps[4:]}], "galore_adamw",
                           lr=1e-2)
    orig, peaks = opt._all_finite, []

    def measured(work, lows=None, tokens=None):
        with _AllLive() as m:
            ok = orig(work, lows, tokens)
        peaks.append(m.peak)
        return ok

    opt._all_finite = measured
    for _ in range(4):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    assert peaks == [40, 40, 40, 40] and opt._check_bytes() == 40, (peaks, opt._check_bytes())
