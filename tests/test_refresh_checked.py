"""A refresh step of the SVD recipes reads the device once (issue 15): whether each gradient of a due
data-dependent refresh (``svd`` / ``rsvd`` / ``online_pca``) is usable, finite and not all zero, is taken from
the non-finite check's own norms (``LowMemOptimizer._finite_and_pre_check``, ``subspace.all_usable_if_finite``) and read
with it, instead of one read per projected weight in ``SubspaceProjection.refresh`` (``_usable``). The bases,
moments and weights are bit-equal to the per-parameter check's (``skip_nonfinite=False``: no whole-step check,
each refresh reads its own); an unusable gradient still skips its refresh with a warning and keeps the
previous subspace; a NaN gradient still skips the step with the state untouched."""

from __future__ import annotations

import warnings

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim import subspace as S
from tests.test_nonfinite_check_bytes import _AllLive

RECIPES = ["galore_adamw", "fira_adamw", "frugal", "galore_adamw8bit"]


def _params(n=4):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(48, 40)) for _ in range(n)] + [torch.nn.Parameter(torch.randn(40))]


def _opt(name, ps, **kw):
    hp = {"min_quant_size": 1} if name.endswith("8bit") else {}
    return create_optimizer([{"params": ps[:-1], "rank": 8, "update_proj_gap": 2, **kw}, {"params": ps[-1:]}],
                            name, lr=1e-2, **hp)


def _usable_reads(monkeypatch):
    calls = []
    orig = S._usable

    def counted(g, norm=None):
        calls.append(tuple(g.shape))
        return orig(g, norm)

    monkeypatch.setattr(S, "_usable", counted)
    return calls


@pytest.mark.parametrize("chunk_numel", [None, 256])
@pytest.mark.parametrize("name", RECIPES)
def test_refresh_usability_read_with_the_check_is_bit_equal(name, chunk_numel, monkeypatch):
    ps_a, ps_b = _params(), _params()
    fast, ref = _opt(name, ps_a), _opt(name, ps_b)
    ref.skip_nonfinite = False  # (each refresh reads its own usability: the per-parameter reference)
    fast.chunk_numel = ref.chunk_numel = chunk_numel
    calls = _usable_reads(monkeypatch)
    torch.manual_seed(1)
    for step in range(5):
        grads = [torch.randn_like(p) for p in ps_a]
        if step == 2:
            grads[1].zero_()  # a zero gradient at a refresh step (3: 1, 3, 5 refresh at gap 2)
        for p, q, g in zip(ps_a, ps_b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        before = len(calls)
        with warnings.catch_warnings(record=True) as wa:
            warnings.simplefilter("always")
            fast.step()
        fast_calls = len(calls) - before
        with warnings.catch_warnings(record=True) as wb:
            warnings.simplefilter("always")
            ref.step()
        assert [str(w.message) for w in wa if "refresh" in str(w.message)] == \
               [str(w.message) for w in wb if "refresh" in str(w.message)]
        if step in (0, 4):  # refresh steps with usable gradients: no per-parameter read
            assert fast_calls == 0
        if step == 2:  # the zero gradient: the check's flag fails, each refresh reads its own (as before)
            assert fast_calls == 4 and any("zero or not finite" in str(w.message) for w in wa)
    for p, q in zip(ps_a, ps_b):
        assert torch.equal(p, q)
        for k, v in ref.state[q].items():
            assert torch.equal(fast.state[p][k], v), k


def test_nan_gradient_at_a_refresh_skips_the_step_untouched():
    ps = _params()
    opt = _opt("galore_adamw", ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    snap = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in ps}
    weights = [p.detach().clone() for p in ps]
    ps[2].grad[3, 4] = float("nan")  # step 3: a refresh step
    with pytest.warns(UserWarning, match="non-finite gradient"):
        opt.step()
    assert opt.skipped_steps == 1
    for p, w in zip(ps, weights):
        assert torch.equal(p, w)
        for k, v in snap[id(p)].items():
            assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("n", [1, 4])
def test_refresh_check_stays_within_the_count(n):
    """What the check with the refreshes' usability allocates (every dispatched output, 0-d ones too) stays
    within ``_check_bytes()`` (one byte more: whether the refreshes' norms are all nonzero)."""
    ps = _params(n)[:n] if n == 1 else _params(n)
    opt = create_optimizer([{"params": ps, "rank": 8, "update_proj_gap": 1}], "fira_adamw", lr=1e-2)
    orig, peaks = opt._all_finite, []

    def measured(work, lows=None, tokens=None):
        with _AllLive() as m:
            ok = orig(work, lows, tokens)
        peaks.append(m.peak)
        return ok

    opt._all_finite = measured
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        assert opt._usable is None  # (reset at the end of the step)
    assert 0 < max(peaks) <= opt._check_bytes() <= opt.step_transient_bytes(), (peaks, opt._check_bytes())


class _Reads(torch.utils._python_dispatch.TorchDispatchMode):
    """Device values read on the host (meta tensors: a read answers ``True`` / ``1``)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            self.reads += 1
            return True if args[0].dtype is torch.bool else 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["galore_adamw", "fira_adamw", "adamw_snsm"])
def test_refresh_step_reads_the_device_once_on_meta(name):
    """The CUDA code path on meta tensors: a refresh step (the first, and step 3 at gap 2) reads once, the
    non-finite check's read (was 1 + one per projected weight: 169 on the 368M model)."""
    ps = [torch.nn.Parameter(torch.zeros(48, 40, device="meta")) for _ in range(4)]
    ps.append(torch.nn.Parameter(torch.zeros(40, device="meta")))
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = create_optimizer([{"params": ps[:4], "rank": 8, "update_proj_gap": 2}, {"params": ps[4:]}], name, lr=1e-2)
    reads = []
    for _ in range(3):
        with _Reads() as r:
            opt.step()
        reads.append(r.reads)
    assert reads == [1, 1, 1]


@pytest.mark.parametrize("chunk_numel", [None, 256])
def test_osd_low_precision_whole_basis_steps_read_nothing_more(chunk_numel, monkeypatch):
    """Online Subspace Descent with bfloat16 parameters stepped whole (``chunk_numel=None``): the basis step of
    a gradient's float32 copy takes pre_check's decision (through the gradient it was converted from:
    ``_Projected.checked``) instead of reading its own (one device read per parameter before); bit-equal to
    ``skip_nonfinite=False`` (each basis step reads its own), a zero gradient's basis step skipped by both."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(48, 40).bfloat16()) for _ in range(3)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = create_optimizer([{"params": ps, "rank": 8}], "osd_adamw", lr=1e-2)
    ref = create_optimizer([{"params": qs, "rank": 8}], "osd_adamw", lr=1e-2)
    ref.skip_nonfinite = False
    opt.chunk_numel = ref.chunk_numel = chunk_numel
    calls = _usable_reads(monkeypatch)
    torch.manual_seed(1)
    for t in range(5):
        gs = [torch.randn(48, 40).bfloat16() for _ in ps]
        if t == 3:
            gs[1].zero_()
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        before = len(calls)
        opt.step()
        if t in (1, 2, 4):  # steady steps with usable gradients: the step's one read decides
            assert len(calls) == before, t
        ref.step()
        for p, q in zip(ps, qs):
            assert torch.equal(p, q), t
            for k, v in ref.state[q].items():
                assert torch.equal(opt.state[p][k], v), (t, k)


@pytest.mark.parametrize("name", ["galore_adamw", "osd_adamw"])
def test_float64_gradient_whose_float32_copy_is_zero_is_not_taken_as_checked(name):
    """The refresh and the basis steps use the float32 copy of a float64 gradient: one of entries 5e-46 (below
    half float32's smallest subnormal) has a float32 norm of 2e-44 (it passes the step's check) but a zero
    copy, so it is not taken as checked: the refresh is skipped with the warning, as with the per-parameter
    read."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(48, 40, dtype=torch.float64)) for _ in range(2)]
    opt = create_optimizer([{"params": ps, "rank": 8}], name, lr=1e-2)
    for p in ps:
        p.grad = torch.full_like(p, 5e-46)
    assert not ps[0].grad.float().any() and float(torch.linalg.vector_norm(ps[0].grad).float()) > 0
    with pytest.warns(UserWarning, match="zero or not finite"):
        opt.step()
    assert opt.state[ps[0]]["proj_meta"][2] == 0  # (no refresh counted)


def test_osd_float64_basis_step_of_a_zero_copy_is_skipped():
    """A steady step of osd_adamw on float64 parameters whose gradient's float32 copy is zero (entries 5e-46):
    pre_check's flag holds (its float32 norm is 2e-44) but the basis step, which reads the copy, is not handed
    the decision (only a bfloat16 / float16 copy is exact): it reads its own and skips; the basis stays finite."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(48, 40, dtype=torch.float64)) for _ in range(2)]
    opt = create_optimizer([{"params": ps, "rank": 8}], "osd_adamw", lr=1e-2)
    opt.chunk_numel = None
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    basis = {k: v.clone() for k, v in opt.state[ps[0]].items() if k.startswith("proj_")}
    for p in ps:
        p.grad = torch.full_like(p, 5e-46)
    opt.step()
    for k, v in basis.items():
        if k != "proj_meta":
            assert torch.isfinite(opt.state[ps[0]][k]).all() and torch.equal(opt.state[ps[0]][k], v), k
