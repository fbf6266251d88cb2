"""Issue 15 (BF16REST's measure): bfloat16 weights join the engine's multi-tensor buckets (``_step_bf16_bucket``) for
AdamW and Lion, float32 or bfloat16 moments, with the write-back of the per-parameter step (rounding to nearest,
``bf16_stochastic_round`` with each parameter's own stream, ``kahan_summation``'s compensation), so the weights and
the state are the per-parameter step's (``foreach=False``, the reference) bit for bit: weight decay on and off,
several steps, a float32 group beside, tensors larger than ``chunk_numel`` in pieces, a resume from a checkpoint.
``step_transient_bytes()`` is the traced peak of such a step (every dispatched output: ``_AllLive``)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from test_nonfinite_check_bytes import _AllLive

import lowmem.optim.functional.adam as FA
from lowmem.bench_launches import LaunchCounter
from lowmem.optim.registry import create_optimizer

SHAPES = [(7, 5), (300,), (40, 30), (3,)]
# (the rules with a bf16_bucket_direction; Adafactor's with its own lr rule read from the parameters' copies, and with
# a constant step size)
NAMES = ["adamw", "lion", "ademamix", "sm3", "sm3_momentum", "adafactor", "adafactor_const", "adamw8bit", "adamw4bit",
         "ademamix8bit", "lion8bit", "came", "adam_mini", "sgd_nesterov", "adagrad", "rmsprop_centered", "stable_adamw"]
KWARGS = {"sm3_momentum": ("sm3", {"momentum": 0.9}),  # (a name of NAMES that is a registered name with settings)
          # (torch's classic optimizers: weight decay is their coupled L2 decay, CLASSICFE; tests/test_foreach_classic.py)
          "sgd_nesterov": ("sgd", {"momentum": 0.9, "nesterov": True}),
          "rmsprop_centered": ("rmsprop", {"momentum": 0.9, "centered": True}),
          "adafactor": ("adafactor", {"lr": None, "beta1": 0.9}),  # (relative_step, scale_parameter: no lr)
          "adafactor_const": ("adafactor", {"relative_step": False, "scale_parameter": False}),
          # (the quantized rules: every weight's moments quantized, blocks of 64, a partial last block too)
          **{n: (n, {"min_quant_size": 1, "block_size": 64})
             for n in ("adamw8bit", "adamw4bit", "ademamix8bit", "lion8bit")}}


def _create(groups, name, **kw):
    """create_optimizer of a name of NAMES, its KWARGS over ``kw`` (``lr=None``: no lr given)."""
    name, extra = KWARGS.get(name, (name, {}))
    kw.update(extra)
    return create_optimizer(groups, name, **{k: v for k, v in kw.items() if not (k == "lr" and v is None)})
# (nearest: Kahan off by name; stable_adamw turns it on for bfloat16 weights when not given, torch-optimi's default)
ROUNDING = {"nearest": {"kahan_summation": False}, "sr": {"bf16_stochastic_round": True}, "kahan": {"kahan_summation": True}}


@pytest.fixture(autouse=True)
def _no_fused_cpu(monkeypatch):
    """torch's fused AdamW kernel off on the CPU (it rounds its own way: bfloat16 moments without a rounding option
    would take it, on both paths alike), so every configuration compares the multi-tensor operations with the
    per-parameter step."""
    monkeypatch.setattr(FA, "FUSED_ON_CPU", False)


def _build(foreach, moments="float32", rounding="nearest", wd=0.1, chunk=None, mixed=False, shapes=SHAPES,
           name="adamw"):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in shapes]
    groups = [{"params": ps, **ROUNDING[rounding]}]
    if mixed:  # a float32 group beside (its own buckets, the float32 operations)
        groups.append({"params": [torch.nn.Parameter(torch.randn(11, 3))], "weight_decay": 0.0})
    opt = _create(groups, name, lr=1e-2, weight_decay=wd, state_dtype=moments, foreach=foreach)
    if chunk is not None:
        opt.chunk_numel = chunk
    return opt, [p for g in groups for p in g["params"]]


def _steps(opt, params, steps, seed=1, start=0):
    gen = torch.Generator().manual_seed(seed)
    for i in range(start + steps):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
        if i < start:
            continue
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()


def _same(a, pa, b, pb, n=len(SHAPES)):
    """The bfloat16 weights and every state tensor of them equal bit for bit."""
    for p, q in zip(pa[:n], pb[:n]):
        assert torch.equal(p, q)
        sa, sb = a.state[p], b.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


CONFIGS = list(itertools.product(["float32", "bfloat16"], list(ROUNDING), [0.0, 0.1]))
# (the default suite: every configuration of AdamW and Lion, the others' with weight decay 0.1; their weight decay 0
# ones are slow: LOWMEM_SLOW=1 or -m slow)
CASES = [pytest.param(*c, name, id="-".join(map(str, (*c, name))),
                      marks=pytest.mark.slow if name not in ("adamw", "lion") and c[2] == 0.0 else ())
         for name in NAMES for c in CONFIGS]


@pytest.mark.parametrize("chunk,mixed", [(None, False), (64, True)], ids=["whole", "pieces_mixed"])
@pytest.mark.parametrize("moments,rounding,wd,name", CASES)
def test_bf16_buckets_equal_the_per_parameter_step(moments, rounding, wd, chunk, mixed, name, monkeypatch):
    """Three steps of the buckets == three per-parameter steps, weights and state bit for bit; the bfloat16 weights
    are stepped in buckets (_step_bf16_bucket), none alone. ``chunk=64``: the (300,) and (40, 30) weights in pieces
    of 64 across buckets (stochastic rounding: each piece continues its parameter's stream), or alone where the rule
    steps a tensor's pieces whole (SM3: not ``pieces_elementwise``)."""
    import lowmem.optim.engine as E

    ref, pr = _build(False, moments, rounding, wd, chunk, mixed, name=name)
    _steps(ref, pr, 3)
    calls = []
    real = E.LowMemOptimizer._step_bf16_bucket
    monkeypatch.setattr(E.LowMemOptimizer, "_step_bf16_bucket",
                        lambda self, ps, *a: (calls.append(len(ps)), real(self, ps, *a))[1])
    alone, update = [], E.LowMemOptimizer._update
    monkeypatch.setattr(E.LowMemOptimizer, "_update",
                        lambda self, p, *a, **k: (alone.append(p.dtype), update(self, p, *a, **k))[1])
    opt, po = _build(True, moments, rounding, wd, chunk, mixed, name=name)
    _steps(opt, po, 3)
    rule = opt.recipe.moment
    taken = getattr(torch, moments) in rule.bf16_bucket_state_dtypes  # (else every bfloat16 weight alone, as before)
    big = [p for p in po[:len(SHAPES)] if not taken or (chunk is not None and p.numel() > chunk
                                                         and not getattr(rule, "pieces_elementwise", False))]
    # (a float32 weight with bfloat16 moments: alone, as before)
    assert alone.count(torch.bfloat16) == 3 * len(big) and bool(calls) == taken
    _same(ref, pr, opt, po)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rounding", list(ROUNDING))
def test_bf16_buckets_resume_from_a_checkpoint(rounding, name):
    """2 steps, state_dict, a new optimizer loads it, 2 more steps == 4 uninterrupted per-parameter steps (the
    stochastic rounding's streams are seeded by position and step count; Kahan's compensation is state)."""
    ref, pr = _build(False, "bfloat16", rounding, chunk=64, name=name)
    _steps(ref, pr, 4)
    first, p1 = _build(True, "bfloat16", rounding, chunk=64, name=name)
    _steps(first, p1, 2)
    saved = copy.deepcopy(first.state_dict())
    weights = [p.detach().clone() for p in p1]
    resumed, p2 = _build(True, "bfloat16", rounding, chunk=64, name=name)
    with torch.no_grad():
        for p, w in zip(p2, weights):
            p.copy_(w)
    resumed.load_state_dict(saved)
    _steps(resumed, p2, 2, start=2)
    _same(ref, pr, resumed, p2)


def test_a_piece_rounded_out_of_its_stream_is_refused():
    """_piece_generator: a piece from start > 0 right after another parameter's rounding would draw other bits than
    the per-parameter step's: refused (the buckets never do it: a parameter's pieces open consecutive buckets)."""
    from lowmem.optim.moments import ChunkState

    opt, ps = _build(True, "float32", "sr", chunk=64)
    _steps(opt, ps, 1)
    big, other = ps[1], ps[0]
    opt._piece_generator(opt.state[other], other)  # (the last rounding: another parameter's)
    with pytest.raises(RuntimeError, match="not right after its previous piece"):
        opt._piece_generator(ChunkState(opt.state[big], 64, 128), big.view(-1)[64:128])
    opt._piece_generator(ChunkState(opt.state[big], 0, 64), big.view(-1)[:64])
    opt._piece_generator(ChunkState(opt.state[big], 64, 128), big.view(-1)[64:128])  # (its stream: accepted)


@pytest.mark.parametrize("chunk", [None, 500], ids=["whole", "pieces"])
@pytest.mark.parametrize("moments,rounding,wd,name", CASES)
def test_bf16_bucket_step_allocates_what_it_reports(moments, rounding, wd, chunk, name):
    """The traced peak of a steady step (the third) == step_transient_bytes(): the gradients' and parameters'
    float32 copies, the rule's direction phase, the rounding's bits (issue 12's exact counts)."""
    opt, ps = _build(True, moments, rounding, wd, chunk, mixed=True, name=name)
    _steps(opt, ps, 2)
    gen = torch.Generator().manual_seed(5)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    with _AllLive() as t:
        opt.step()
    assert t.peak == opt.step_transient_bytes() > 0


@pytest.mark.parametrize("name", NAMES)
def test_bf16_buckets_launch_counts_on_meta(name):
    """The CUDA path counted on meta tensors, 40 bfloat16 weights of each rule (float32 moments) in one bucket: rounded
    to nearest, fewer than 2 kernels per weight (the non-finite check's float32 cast of each bfloat16 gradient is one;
    the bucket's operations are a fixed number; Adafactor's step sizes and its and CAME's stacks of a same-shape group:
    fewer than 3), where the per-parameter step launches more than 10 per weight (AdamW 566 -> 59, Adafactor 1,566 ->
    87, CAME 1,726 -> 98; torch's SGD with Nesterov / Adagrad / RMSprop more than 5: 327 -> 15, 367 -> 16);
    Kahan's compensation 3 multi-tensor operations more; stochastic rounding one random draw per weight (each
    weight's own stream, into its slice of one buffer) and 6 for the bucket (isnan, two adds, and, masked_fill, one
    multi-tensor copy) instead of one multi-tensor copy (before SRBATCH: 7 kernels per weight, 40 weights 299 -> 65)."""
    def count(foreach, rounding):
        ps = [torch.nn.Parameter(torch.empty(64, 32, device="meta", dtype=torch.bfloat16)) for _ in range(40)]
        opt = _create([{"params": ps, **ROUNDING[rounding]}], name, lr=1e-3, weight_decay=0.1, foreach=foreach)
        for p in ps:
            p.grad = torch.zeros_like(p)
        with LaunchCounter():  # (it answers the non-finite check's read, which meta tensors cannot)
            opt.step()
        with LaunchCounter() as c:
            opt.step()
        return c.result().kernels

    nearest = count(True, "nearest")
    # (torch's SGD / Adagrad / RMSprop launch fewer alone: 8-9 per weight)
    alone = 5 if name in ("sgd_nesterov", "adagrad", "rmsprop_centered") else 10
    assert nearest < (3 if name.startswith(("adafactor", "came")) else 2) * 40 and count(False, "nearest") > alone * 40
    assert count(True, "kahan") == nearest + 3
    assert count(True, "sr") == nearest - 1 + 40 + 6


@pytest.mark.parametrize("name", ["adafactor", "sm3_momentum", "came", "adamw"])
@pytest.mark.parametrize("rounding", list(ROUNDING))
@pytest.mark.parametrize("shapes", [[(7, 5), (3,), (6, 4), (7, 5), (3,), (6, 4), (7, 5)],
                                    [(5,), (4,), (3,), (2,), (1,)]], ids=["interleaved", "vectors"])
def test_bf16_buckets_of_repeated_shapes(shapes, rounding, name):
    """Weights of repeated shapes, interleaved as a model's layers are (the rules that stack same-shape tensors stack
    each shape's weights together; Adafactor's step sizes of a group are then not consecutive and are stacked too), and
    vectors of decreasing sizes (Adafactor's groups small: its decay with one step size per weight peaks): three steps
    bit for bit the per-parameter step's, and the traced peak of the third == step_transient_bytes()."""
    ref, pr = _build(False, rounding=rounding, shapes=shapes, name=name)
    _steps(ref, pr, 3)
    opt, po = _build(True, rounding=rounding, shapes=shapes, name=name)
    _steps(opt, po, 2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # (_steps' third gradients)
        [torch.randn(p.shape, generator=gen) for p in po]
    for p in po:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    with _AllLive() as t:
        opt.step()
    _same(ref, pr, opt, po, n=len(shapes))
    assert t.peak == opt.step_transient_bytes() > 0
