"""Issue 15 (MATRIXBF16): the matrix-normalizing hybrids (Muon, NorMuon, SinkGD, SCALE) step bfloat16 weights in the
engine's multi-tensor buckets (``_step_bf16_bucket``): their AdamW parameters (``HybridMoments.bf16_bucket_direction``:
AdamW's bucket direction times ``lr * adamw_lr_ratio``; a tensor larger than ``chunk_numel`` in pieces) and their
targets (2-D, and batches of matrices ``[E, A, B]``), stacked by shape (``target_bf16_bucket_direction``: the float32 buckets' functional steps,
``muon_foreach_iterate`` / ``muon_foreach_direction``, ``normuon_foreach_direction``, ``sinkgd_foreach_direction``,
``scale_rows_direction``, on the gradients' float32 copies; bfloat16 buffers through float32 copies written back
rounded). The weights and every state tensor equal the per-parameter step's (``foreach=False``) bit for bit (SinkGD's
whole tensors excepted: up to the Sinkhorn scalings' float32 rounding, the last test): float32
and bfloat16 state, rounding to nearest, stochastic rounding and Kahan's compensation, several steps, a resume; the
traced peak of a step equals ``step_transient_bytes()`` (the bfloat16 products' BLAS workspace, not a torch tensor,
left out)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from test_nonfinite_check_bytes import _AllLive

import lowmem.optim.engine as E
import lowmem.optim.functional.adam as FA
from lowmem.bench_launches import LaunchCounter
from lowmem.optim.functional.muon import bf16_workspace_left_out
from lowmem.optim.registry import create_optimizer

# same-shape targets (16 x 16, 24 x 40 twice, interleaved), a tall one (40 x 24: Muon's transposed iterate), vectors
# (AdamW; 1500 elements: in pieces at chunk_numel=1024), a 48 x 40 target (1920 elements: alone at 1024)
SHAPES = [(16, 16), (24, 40), (16, 16), (40, 24), (1500,), (3,), (24, 40), (48, 40)]
RULES = {
    "muon": ("muon", {}),
    "muon_plain_rms": ("muon", {"nesterov": False, "momentum": 0.9, "adjust_lr_fn": "match_rms_adamw",
                                "adamw_lr_ratio": 0.5}),
    "muon_original": ("muon", {"adjust_lr_fn": "original", "ns_steps": 3, "ns_coefficients": (3.0, -3.2, 1.2)}),
    "normuon": ("normuon", {}),
    "sinkgd": ("sinkgd", {}),
    "scale_hidden": ("scale", {"scale_role": "hidden"}),
    "scale_head": ("scale", {"scale_role": "head"}),
}
ROUNDING = {"nearest": {}, "sr": {"bf16_stochastic_round": True}, "kahan": {"kahan_summation": True}}


@pytest.fixture(autouse=True)
def _no_fused_cpu(monkeypatch):
    """torch's fused AdamW kernel off on the CPU (as tests/test_bf16_buckets.py: it rounds its own way)."""
    monkeypatch.setattr(FA, "FUSED_ON_CPU", False)


def _build(rule, foreach, state="float32", rounding="nearest", chunk=None, wd=0.1, shapes=SHAPES):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in shapes]
    name, kw = RULES[rule]
    opt = create_optimizer([{"params": ps, **ROUNDING[rounding]}], name, lr=2e-2, weight_decay=wd, state_dtype=state,
                           foreach=foreach, **kw)
    if chunk is not None:
        opt.chunk_numel = chunk
    return opt, ps


def _steps(opt, ps, steps, start=0):
    gen = torch.Generator().manual_seed(1)
    for i in range(start + steps):
        grads = [(torch.randn(p.shape, generator=gen) * (1 + i % 3)).to(p.dtype) for p in ps]
        if i < start:
            continue
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()


def _same(a, pa, b, pb):
    for p, q in zip(pa, pb):
        assert torch.equal(p, q), tuple(p.shape)
        sa, sb = a.state[p], b.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (tuple(p.shape), k)


CASES = [pytest.param(rule, state, rounding, id=f"{rule}-{state}-{rounding}")
         for rule, state, rounding in itertools.product(RULES, ["float32", "bfloat16"], ROUNDING)]


@pytest.mark.parametrize("chunk", [None, 1024], ids=["whole", "pieces"])
@pytest.mark.parametrize("rule,state,rounding", CASES)
def test_bf16_matrix_buckets_equal_the_per_parameter_step(rule, state, rounding, chunk, monkeypatch):
    """Three steps of the buckets == three per-parameter steps, weights and state bit for bit; every bfloat16 weight
    is stepped in a bucket except the 48 x 40 target at ``chunk_numel=1024`` (a target in pieces: alone, as before);
    the 1500-element vector then joins AdamW's buckets in pieces."""
    ref, pr = _build(rule, False, state, rounding, chunk)
    _steps(ref, pr, 3)
    calls, real = [], E.LowMemOptimizer._step_bf16_bucket
    monkeypatch.setattr(E.LowMemOptimizer, "_step_bf16_bucket",
                        lambda self, ps, *a: (calls.append(len(ps)), real(self, ps, *a))[1])
    alone, update = [], E.LowMemOptimizer._update
    monkeypatch.setattr(E.LowMemOptimizer, "_update",
                        lambda self, p, *a, **k: (alone.append(tuple(p.shape)), update(self, p, *a, **k))[1])
    opt, po = _build(rule, True, state, rounding, chunk)
    _steps(opt, po, 3)
    assert alone == ([(48, 40)] * 3 if chunk else [])
    assert sum(calls) == 3 * (len(SHAPES) - bool(chunk) + (1 if chunk else 0))  # (the vector's 2 pieces at 1024)
    _same(ref, pr, opt, po)


@pytest.mark.parametrize("rule", ["muon", "scale_head"])
def test_bf16_matrix_buckets_without_weight_decay(rule):
    """weight_decay 0 (no decay kernel in the bucket): the per-parameter step's bits."""
    ref, pr = _build(rule, False, "bfloat16", "sr", 1024, wd=0.0)
    _steps(ref, pr, 3)
    opt, po = _build(rule, True, "bfloat16", "sr", 1024, wd=0.0)
    _steps(opt, po, 3)
    _same(ref, pr, opt, po)


@pytest.mark.parametrize("rounding", list(ROUNDING))
@pytest.mark.parametrize("rule", list(RULES))
def test_bf16_matrix_buckets_resume_from_a_checkpoint(rule, rounding):
    """2 steps, state_dict, a new optimizer loads it, 2 more == 4 uninterrupted per-parameter steps (bfloat16 state)."""
    ref, pr = _build(rule, False, "bfloat16", rounding, 1024)
    _steps(ref, pr, 4)
    first, p1 = _build(rule, True, "bfloat16", rounding, 1024)
    _steps(first, p1, 2)
    saved = copy.deepcopy(first.state_dict())
    weights = [p.detach().clone() for p in p1]
    resumed, p2 = _build(rule, True, "bfloat16", rounding, 1024)
    with torch.no_grad():
        for p, w in zip(p2, weights):
            p.copy_(w)
    resumed.load_state_dict(saved)
    _steps(resumed, p2, 2, start=2)
    _same(ref, pr, resumed, p2)


@pytest.mark.parametrize("chunk", [None, 1024], ids=["whole", "pieces"])
@pytest.mark.parametrize("rule,state,rounding", CASES)
def test_bf16_matrix_bucket_step_allocates_what_it_reports(rule, state, rounding, chunk):
    """The traced peak of a steady step (the third) == step_transient_bytes() (the products' BLAS workspace left out:
    not a torch tensor)."""
    opt, ps = _build(rule, True, state, rounding, chunk)
    _steps(opt, ps, 2)
    gen = torch.Generator().manual_seed(5)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    with bf16_workspace_left_out():
        with _AllLive() as t:
            opt.step()
        assert t.peak == opt.step_transient_bytes() > 0


@pytest.mark.parametrize("rule", ["muon", "normuon", "sinkgd", "scale_head"])
def test_bf16_matrix_bucket_alone_allocates_what_it_reports(rule):
    """Only targets of one shape (the bucket's own transient is the step's peak): traced == reported."""
    opt, ps = _build(rule, True, "bfloat16", "sr", shapes=[(32, 48)] * 3)
    _steps(opt, ps, 2)
    for p in ps:
        p.grad = torch.randn(p.shape).to(p.dtype)
    with bf16_workspace_left_out():
        with _AllLive() as t:
            opt.step()
        assert t.peak == opt.step_transient_bytes() > 0


@pytest.mark.parametrize("rule", ["muon", "normuon", "sinkgd", "scale_hidden"])
def test_bf16_matrix_buckets_launch_counts_on_meta(rule):
    """The CUDA path counted on meta tensors: 40 bfloat16 64 x 32 targets and 40 vectors (AdamW), rounded to nearest:
    the buckets launch a fixed number of kernels per bucket plus the non-finite check's cast of each gradient, under
    3 per weight; the per-parameter step more than 10 per weight."""
    def count(foreach):
        ps = [torch.nn.Parameter(torch.empty(s, device="meta", dtype=torch.bfloat16))
              for s in [(64, 32)] * 40 + [(32,)] * 40]
        name, kw = RULES[rule]
        opt = create_optimizer(ps, name, lr=1e-3, weight_decay=0.1, foreach=foreach, **kw)
        for p in ps:
            p.grad = torch.zeros_like(p)
        with LaunchCounter():  # (it answers the non-finite check's read, which meta tensors cannot)
            opt.step()
        with LaunchCounter() as c:
            opt.step()
        return c.result().kernels

    bucket, alone = count(True), count(False)
    assert bucket < 3 * 80 and alone > 10 * 80, (bucket, alone)


def test_a_bucket_of_targets_with_mixed_buffer_dtypes_is_refused():
    """One dtype of the targets' buffers for a bucket (a checkpoint could mix them): an error naming the key."""
    from lowmem.optim.recipes.normalized import HybridMoments

    states = [{"momentum_buffer": torch.zeros(2, dtype=torch.float32)},
              {"momentum_buffer": torch.zeros(2, dtype=torch.bfloat16)}]
    with pytest.raises(ValueError, match="momentum_buffer of dtypes"):
        HybridMoments._low_buffers(states, {})


@pytest.mark.parametrize("name", ["muon", "normuon", "sinkgd", "scale"])
def test_bf16_matrix_buckets_read_the_host_as_the_float32_step(name, monkeypatch):
    """The host reads of a step of bfloat16 weights in the buckets (a 64 x 48 target and a 48-vector, after two steps)
    are the float32 step's pinned ones (tests/test_speed_paths.py HOST_READS: the engine's one finite check, the CPU
    step counter): the bucket adds no ``.item()``."""
    from test_speed_paths import HOST_READS, _count_host_reads

    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: real(*a, **k).to(torch.bfloat16))
    monkeypatch.setattr(torch, "randn_like", lambda x, **k: real(x.shape, **k).to(x.dtype))
    calls, bucket = [], E.LowMemOptimizer._step_bf16_bucket
    monkeypatch.setattr(E.LowMemOptimizer, "_step_bf16_bucket",
                        lambda self, ps, *a: (calls.append(len(ps)), bucket(self, ps, *a))[1])
    reads, device_reads, sites = _count_host_reads(name)
    assert calls and (reads, device_reads) == HOST_READS[name], sites


BATCHED = [(3, 16, 24), (16, 24), (3, 16, 24), (2, 40, 24), (40,), (2, 40, 24)]


@pytest.mark.parametrize("rule,state,rounding", CASES)
def test_bf16_matrix_buckets_of_batched_matrices(rule, state, rounding, monkeypatch):
    """Batches of matrices ``[E, A, B]`` (fused MoE experts; a tall one too) join the buckets, their matrices stacked as
    2-D weights as in the float32 buckets: three steps bit for bit the per-parameter step's (which steps each matrix
    as a 2-D weight of its own), none stepped alone, and the traced peak of the third == step_transient_bytes()."""
    ref, pr = _build(rule, False, state, rounding, shapes=BATCHED)
    _steps(ref, pr, 3)
    alone, update = [], E.LowMemOptimizer._update
    monkeypatch.setattr(E.LowMemOptimizer, "_update",
                        lambda self, p, *a, **k: (alone.append(tuple(p.shape)), update(self, p, *a, **k))[1])
    opt, po = _build(rule, True, state, rounding, shapes=BATCHED)
    _steps(opt, po, 2)
    gen = torch.Generator().manual_seed(1)
    for i in range(2):  # (_steps' third gradients)
        [torch.randn(p.shape, generator=gen) for p in po]
    for p in po:
        p.grad = (torch.randn(p.shape, generator=gen) * 3).to(p.dtype)
    with bf16_workspace_left_out():
        with _AllLive() as t:
            opt.step()
        assert t.peak == opt.step_transient_bytes() > 0
    assert alone == []
    _same(ref, pr, opt, po)


def test_sinkgd_whole_tensors_agree_up_to_the_scalings_rounding():
    """SinkGD's whole tensors (``chunk_numel=None``, or a weight below the default chunk) are not bit for bit: the
    per-parameter step takes ``sr_sinkhorn`` of the whole matrix, the bucket the Sinkhorn scalings of the stack (as the
    chunked step does), another order of float32 operations, as in the float32 buckets
    (tests/test_foreach_normalized.py::test_sinkgd_foreach_whole_tensor_reference_up_to_rounding). In bfloat16 that
    shows as one-ulp differences in a few weights (measured 2 x 256 x 512, 3 steps: 6.1e-5 at most, in a few of
    262,144; a few ulps on weights near zero, below 1e-8)."""
    def run(foreach):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter((torch.randn(256, 512) * 0.02).to(torch.bfloat16)) for _ in range(2)]
        opt = create_optimizer([{"params": ps}], "sinkgd", lr=2e-2, weight_decay=0.1, foreach=foreach)
        opt.chunk_numel = None
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        return [p.detach().float() for p in ps]

    for a, b in zip(run(True), run(False)):
        diff = (a - b).abs()
        # one bfloat16 ulp of the weight, or 1e-6 (5e-5 of the step size lr) where a weight crossed zero
        assert (diff <= 2.0 ** -7 * torch.maximum(a.abs(), b.abs()) + 1e-6).all()
        assert (diff > 0).float().mean() < 1e-3
