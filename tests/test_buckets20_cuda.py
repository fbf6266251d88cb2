"""Session 20's multi-tensor buckets on CUDA (written without a GPU; run by ``bash .ci/gpu_checks.sh``'s ``pytest:cuda``
check): the classic rules' buckets (CLASSICFE: sgd, adagrad, rmsprop, stable_adamw; tests/test_foreach_classic.py) and
the matrix rules' bfloat16 buckets (MATRIXBF16: muon, normuon, sinkgd, scale; tests/test_bf16_buckets_matrix.py), both
bit for bit ``foreach=False`` on the CPU (tested there).

On CUDA the two paths launch other kernels, so each test states what it can hold them to:

* **Bit for bit** (:func:`test_cuda_classic_buckets_match_the_per_tensor_step`, its second part): sgd, rmsprop and adagrad without
  ``lr_decay``. Every kernel of their step is element-wise (``add`` / ``mul`` by a number, ``addcmul``, ``lerp``,
  ``sqrt``, ``addcdiv``, tensor-by-tensor ``div``, the float32 copies and the write-back's round-to-nearest), and
  torch's per-tensor and multi-tensor CUDA kernels compute each element with the same float32 formula, so weights and
  state must be equal. A failure there, with the tolerance test passing, would name a torch kernel pair that rounds
  differently (e.g. an ``a + alpha * b`` contracted to one FMA in one kernel only), not a wrong bucket.
* **Within rounding** (:func:`test_cuda_classic_buckets_match_the_per_tensor_step`'s first part, every configuration): adagrad's
  ``lr_decay`` divides by a number, which torch's per-tensor CUDA ``div`` turns into a multiplication by its
  reciprocal where ``_foreach_div_`` divides (one float32 ulp apart); stable_adamw's ``RMS / numel`` likewise.
* **Within a bfloat16 tolerance** (:func:`test_cuda_matrix_bf16_buckets_within_tolerance`): the matrix rules' stacks
  take one ``bmm`` / ``baddbmm`` per product (``newton_schulz_batched`` off the CPU) where the per-parameter step
  takes ``mm`` / ``addmm``, and sinkgd's stacked scalings another order of float32 sums: other accumulation orders.
* **Memory** (:func:`test_cuda_bucket_step_transient_against_the_peak`): a later step of one bucket of each rule,
  the allocator's peak above the step's start against ``step_transient_bytes()``, as tests/test_gpu16_bf16sr.py.

The tolerance, per element, after ``STEPS`` steps (:func:`_assert_within`)::

    |a - b| <= STEPS * (unit * (max(|a|, |b|) + M) + direction * M)

``M`` is the update's scale: the largest change of one element in one step of the same rule on float32 copies of the
weights (per tensor; no bfloat16 rounding in it). Per step the two paths' unrounded new weights differ by the
difference of their updates (``direction * M``), and their stored weights by at most one unit in the last place more:
a bfloat16 ulp of ``x`` is at most ``2^-7 |x|`` (8 significant bits), so ``unit = 2^-7``, taken of the larger result or
of the weight before the step (``<= max(|a|, |b|) + M``). The gradients are given, not computed from the weights, so a
difference does not feed back beyond the coupled decay's ``wd * ulp`` (negligible): the bounds add over the steps.
``direction``: classic rules, float32 state, 2^-21 (four float32 ulps of the update: a reciprocal's last bit);
bfloat16 state, 2^-7 (a moment stored one bfloat16 ulp apart changes the update by at most 2^-8 of it). Matrix
rules: 2^-4, the difference of two Newton-Schulz runs in bfloat16 (each iterate stored in bfloat16: an element of
``X`` rounded to its neighbour moves by up to 2^-8 of ``X``'s largest; five iterations). Measured on the CPU with the
stacks forced through ``bmm`` / ``baddbmm`` and, harder than two accumulation orders, every element of every iterate
given -1, 0 or +1 times 2^-8 of its matrix's largest element at random: the coefficient the elements needed was at
most 2^-6.2 (muon_plain_rms; muon, normuon 2^-6.5; muon_original 2^-8.8), so 2^-4 leaves 4.5x room; the runs' difference
was at most 0.030 of the movement (Frobenius), asserted <= 0.1. The weights start at ``INIT_STD`` = 0.02 (a language
model's), so a step of lr 2e-2 is many bfloat16 ulps of them and the rounding does not hide the direction. float32
weights: ``unit = 2^-21`` (four float32 ulps).

What the tolerance catches (the CPU copy, mutations in the bucket path only): the stacks' directions handed to the
wrong matrices (Newton-Schulz, SinkGD's scalings, SCALE's rows), one Newton-Schulz iteration less, RMSprop's eps,
SGD's dampening, Adagrad's ``lr_decay`` step: red; a 10% larger stacked step only in part (5 of 24 muon / normuon
cases, none of SCALE's): the bound is sized for a wrong bucket, not for a scale error within 10%.

``DEVICE`` set to ``"cpu"`` in a scratch copy (the ``cuda`` mark taken off) is how this file was checked without a
GPU: the classic rules bit for bit there; the matrix rules too except sinkgd on the larger targets (256 x 512, 384 x
128, 48 x 40: 1-2 elements one bfloat16 ulp apart after a step, within the tolerance); the memory test's CPU form,
the traced peak (tests/test_nonfinite_check_bytes.py's ``_AllLive``) == ``step_transient_bytes()``, held for every
case (so each is one bucket the count knows)."""

from __future__ import annotations

import pytest
import torch
from test_bf16_buckets_matrix import BATCHED
from test_bf16_buckets_matrix import RULES as MATRIX_RULES
from test_bf16_buckets_matrix import SHAPES as MATRIX_SHAPES
from test_foreach_classic import CONFIGS

import lowmem.optim.engine as E
from lowmem.optim import create_optimizer
from lowmem.optim.functional.muon import bf16_workspace_left_out

DEVICE = "cuda"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                   reason="needs a CUDA GPU")]
STEPS = 4
BF16_UNIT, F32_UNIT = 2.0**-7, 2.0**-21
MATRIX_DIRECTION = 2.0**-4
INIT_STD = 0.02  # (a language model's initial weights: an update of 2e-2 is many bfloat16 ulps of them)

# ---- (a) the classic rules: sgd, adagrad, rmsprop, stable_adamw (CONFIGS: tests/test_foreach_classic.py) -----------

#: tests/test_foreach_classic.py's shapes and a larger matrix (its own CUDA launch configuration)
CLASSIC_SHAPES = [(7, 5), (300,), (40, 30), (3,), (6, 4), (256, 384)]
#: the configurations whose every kernel is element-wise without a division by a number (see the module)
BIT_EQUAL = [c for c in CONFIGS if not c.startswith("stable_adamw") and "lr_decay" not in c]
WEIGHTS = [pytest.param(torch.float32, "float32", id="f32"), pytest.param(torch.bfloat16, "float32", id="bf16-f32state"),
           pytest.param(torch.bfloat16, "bfloat16", id="bf16-bf16state")]


def _classic(cfg, foreach, dtype, state, chunk):
    """``STEPS`` steps of ``CONFIGS[cfg]`` on ``DEVICE`` (growing gradients, the third all zeros: the coupled decay
    alone); the optimizer, its parameters, and the weights before and after each step (float32, on the CPU)."""
    name, hp = CONFIGS[cfg]
    init, gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(s, generator=init).mul(INIT_STD).to(DEVICE, dtype)) for s in CLASSIC_SHAPES]
    opt = create_optimizer([{"params": ps}], name, foreach=foreach, state_dtype=state, **hp)
    opt.chunk_numel = chunk
    trail = [[p.detach().to("cpu", torch.float32, copy=True) for p in ps]]
    for i in range(STEPS):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).mul(0.0 if i == 2 else 1.0 + i).to(DEVICE, dtype)
        opt.step()
        trail.append([p.detach().to("cpu", torch.float32, copy=True) for p in ps])
    return opt, ps, trail


def _moves(trail):
    """Per tensor, the largest change of one element in one step (``M``)."""
    return [max((b[j] - a[j]).abs().max().item() for a, b in zip(trail, trail[1:])) for j in range(len(trail[0]))]


def _assert_within(got, want, moves, unit, direction):
    """Each element: ``|a - b| <= STEPS * (unit * (max(|a|, |b|) + M) + direction * M)`` (the module's derivation)."""
    for j, (a, b, m) in enumerate(zip(got, want, moves)):
        bound = STEPS * (unit * (torch.maximum(a.abs(), b.abs()) + m) + direction * m)
        over = (a - b).abs() > bound
        assert not bool(over.any()), (j, tuple(a.shape), int(over.sum()), (a - b).abs().max().item(), m)


@pytest.mark.parametrize("chunk", [None, 1000], ids=["whole", "pieces"])
@pytest.mark.parametrize("dtype,state", WEIGHTS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_cuda_classic_buckets_match_the_per_tensor_step(cfg, dtype, state, chunk):
    """Every configuration of tests/test_foreach_classic.py, float32 and bfloat16 weights (float32 / bfloat16 state),
    whole and in pieces of 1,000 elements: first, the buckets' weights within the module's tolerance of
    ``foreach=False``'s, and for bfloat16 weights at most 1% of the elements apart (a difference in the last bits of
    the update changes a stored bfloat16 weight only where it lands on a rounding boundary); then, for the
    element-wise configurations (``BIT_EQUAL``: sgd, rmsprop, adagrad without ``lr_decay``), weights and every state
    tensor bit for bit (``torch.equal``): a failure of that second part alone names a torch kernel pair, see the
    module."""
    opt, po, got = _classic(cfg, None, dtype, state, chunk)
    ref, pr, want = _classic(cfg, False, dtype, state, chunk)
    moves = _moves(want if dtype == torch.float32 else _classic(cfg, False, torch.float32, "float32", chunk)[2])
    low = dtype == torch.bfloat16
    _assert_within(got[-1], want[-1], moves, BF16_UNIT if low else F32_UNIT,
                   BF16_UNIT if state == "bfloat16" else F32_UNIT)
    if low:
        apart = sum(int((a != b).sum()) for a, b in zip(got[-1], want[-1]))
        assert apart <= 0.01 * sum(a.numel() for a in got[-1]), apart
    if cfg not in BIT_EQUAL:
        return
    for p, q in zip(po, pr):
        assert torch.equal(p, q), ("within the tolerance, not bit-equal", tuple(p.shape))
        sa, sb = opt.state[p], ref.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), ("within the tolerance, not bit-equal", tuple(p.shape), k)


# ---- (b) the matrix rules' bfloat16 buckets: muon, normuon, sinkgd, scale (tests/test_bf16_buckets_matrix.py) --------

#: tests/test_bf16_buckets_matrix.py's shapes (same-shape targets, a tall one, AdamW's vectors) and larger targets, two
#: of one shape (one stack) and a tall one, where cuBLAS picks other kernels than for 16 x 16
MIXED = MATRIX_SHAPES + [(256, 512), (256, 512), (384, 128)]
SETS = {"mixed": MIXED, "batched": BATCHED}  # (BATCHED: fused experts [E, A, B] and their vectors)
ROUNDING = {"nearest": {}, "sr": {"bf16_stochastic_round": True}, "kahan": {"kahan_summation": True}}


def _matrix(rule, foreach, state, rounding, shapes, dtype=torch.bfloat16):
    """``STEPS`` steps of ``MATRIX_RULES[rule]`` (lr 2e-2, weight decay 0.1, whole tensors) on ``DEVICE``; the
    weights before and after each step (float32, on the CPU)."""
    name, kw = MATRIX_RULES[rule]
    init, gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(s, generator=init).mul(INIT_STD).to(DEVICE, dtype)) for s in shapes]
    opt = create_optimizer([{"params": ps, **ROUNDING[rounding]}], name, lr=2e-2, weight_decay=0.1,
                           state_dtype=state, foreach=foreach, **kw)
    opt.chunk_numel = None
    trail = [[p.detach().to("cpu", torch.float32, copy=True) for p in ps]]
    for i in range(STEPS):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=gen) * (1 + i % 3)).to(DEVICE, dtype)
        opt.step()
        trail.append([p.detach().to("cpu", torch.float32, copy=True) for p in ps])
    return trail


MATRIX_CASES = ([pytest.param(r, s, rd, "mixed", id=f"{r}-{s}-{rd}-mixed")
                 for r in MATRIX_RULES for s in ("float32", "bfloat16") for rd in ROUNDING]
                + [pytest.param(r, s, "nearest", "batched", id=f"{r}-{s}-nearest-batched")
                   for r in MATRIX_RULES for s in ("float32", "bfloat16")])


@pytest.mark.parametrize("rule,state,rounding,shapes", MATRIX_CASES)
def test_cuda_matrix_bf16_buckets_within_tolerance(rule, state, rounding, shapes):
    """bfloat16 weights of every matrix rule (float32 / bfloat16 state; round-to-nearest, stochastic rounding, Kahan),
    ``STEPS`` steps: the buckets' weights (stacks through ``bmm``) within the module's tolerance of the per-parameter
    step's (``mm``), ``unit = 2^-7``, ``direction = 2^-4`` (``M`` from float32 copies of the weights, per-parameter,
    no rounding option). And the buckets move the weights as the per-parameter step does: the difference of the two
    runs' weights is at most a tenth of the per-parameter run's movement (Frobenius norms, all tensors; 0.030 in the
module's stress)."""
    got = _matrix(rule, True, state, rounding, SETS[shapes])
    want = _matrix(rule, False, state, rounding, SETS[shapes])
    moves = _moves(_matrix(rule, False, "float32", "nearest", SETS[shapes], torch.float32))
    _assert_within(got[-1], want[-1], moves, BF16_UNIT, MATRIX_DIRECTION)
    apart = sum(float((a - b).square().sum()) for a, b in zip(got[-1], want[-1])) ** 0.5
    moved = sum(float((b - w).square().sum()) for b, w in zip(want[-1], want[0])) ** 0.5
    assert apart <= 0.1 * moved, (apart, moved)


# ---- (c) a later step's transient on CUDA: one bucket of each rule --------------------------------------------------

CLASSIC_MEMORY = ("sgd-nesterov-wd", "adagrad-lr_decay-init-wd", "rmsprop-centered-momentum-wd", "stable_adamw-betas-wd")
MEMORY = {  # id -> (registered name, settings, weights' dtype, state dtype): one bucket of four 1024 x 768 weights
    **{f"{c}-f32": (*CONFIGS[c], torch.float32, "float32") for c in CLASSIC_MEMORY},  # (float32 state: foreach_step_)
    **{f"{c}-bf16-{s}": (*CONFIGS[c], torch.bfloat16, s) for c in CLASSIC_MEMORY for s in ("float32", "bfloat16")},
    **{f"{r}-bf16-{s}": (*MATRIX_RULES[r], torch.bfloat16, s)  # (tall: the transposed iterates)
       for r in ("muon", "normuon", "sinkgd", "scale_hidden") for s in ("float32", "bfloat16")},
}


@pytest.mark.parametrize("case", list(MEMORY))
def test_cuda_bucket_step_transient_against_the_peak(case, monkeypatch):
    """The fourth step of one bucket (four 1024 x 768 weights, the device's default chunk: one bucket): the
    allocator's peak of requested bytes above the step's start (the tensors' own sizes, as tests/test_gpu16_bf16sr.py
    and tests/test_microadam.py's CUDA transient tests) <= ``step_transient_bytes()`` + 4 KiB, and the report <=
    1.1 x measured + 1 MiB; ``max_memory_allocated`` above the start (blocks: each rounded up to 512 B, a cached large
    block handed out whole when less than 1 MiB of it would be left) <= the report + 2 MiB. The matrix rules'
    report is taken within ``bf16_workspace_left_out()``: cuBLAS's workspace is allocated at a handle's first product
    and kept (in the step's start here), where the CPU count adds the BLAS's per-step workspace. No weight is stepped
    alone (``_update``): the four are one bucket."""
    name, hp, dtype, state = MEMORY[case]
    alone, update = [], E.LowMemOptimizer._update
    monkeypatch.setattr(E.LowMemOptimizer, "_update",
                        lambda self, p, *a, **k: (alone.append(tuple(p.shape)), update(self, p, *a, **k))[1])
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(1024, 768, generator=gen).to(DEVICE, dtype)) for _ in range(4)]
    opt = create_optimizer(ps, name, state_dtype=state, **hp)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, dtype)
        opt.step()
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base, base_blocks = torch.cuda.memory_stats()["requested_bytes.all.current"], torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    measured = torch.cuda.memory_stats()["requested_bytes.all.peak"] - base
    blocks = torch.cuda.max_memory_allocated() - base_blocks
    with bf16_workspace_left_out():
        reported = opt.step_transient_bytes()
    assert reported > 0 and alone == [], (reported, alone)
    assert measured <= reported + 4096, (measured, reported, blocks)
    assert reported <= 1.1 * measured + 2**20, (measured, reported, blocks)
    assert blocks <= reported + 2 * 2**20, (measured, reported, blocks)
