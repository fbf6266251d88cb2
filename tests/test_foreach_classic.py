"""Issue 15 (CLASSICFE): torch's classic optimizers (sgd, adagrad, rmsprop: lowmem/optim/recipes/classic.py) and
StableAdamW (lowmem/optim/recipes/stable_adamw.py) step their parameters in the engine's multi-tensor buckets
(``foreach`` not ``False``): float32 weights with float32 state (the rule's ``foreach_step_``), bfloat16 weights with
float32 or bfloat16 state (the engine's ``_step_bf16_bucket``). Every configuration the per-tensor tests use (momentum,
dampening, Nesterov, torch's coupled L2 decay, Adagrad's lr_decay and initial accumulator, RMSprop's centered form and
momentum, StableAdamW's per-tensor update clipping and decoupled lr, tensors larger than ``chunk_numel`` in pieces)
equals ``foreach=False`` (the per-tensor step, itself tested equal to torch.optim.SGD / Adagrad / RMSprop and the
StableAdamW reference loop) bit for bit, weights and state, over several steps and across a checkpoint;
``step_transient_bytes()`` is the traced peak of such a step."""

from __future__ import annotations

import copy

import pytest
import torch
from test_nonfinite_check_bytes import _AllLive

import lowmem.optim.engine as E
from lowmem.bench_launches import LaunchCounter
from lowmem.optim.registry import create_optimizer

SHAPES = [(7, 5), (300,), (40, 30), (3,), (6, 4)]

CONFIGS = {  # id -> (name, hyperparameters)
    "sgd": ("sgd", {"lr": 0.05}),
    "sgd-wd": ("sgd", {"lr": 0.05, "weight_decay": 0.1}),  # (no momentum: the engine's decoupled decay)
    "sgd-momentum": ("sgd", {"lr": 0.05, "momentum": 0.9}),
    "sgd-momentum-dampening-wd": ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05}),
    "sgd-nesterov-wd": ("sgd", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.2}),
    "adagrad": ("adagrad", {"lr": 0.05}),
    "adagrad-lr_decay-init-wd": ("adagrad", {"lr": 0.05, "lr_decay": 0.1, "initial_accumulator_value": 0.5,
                                             "eps": 1e-6, "weight_decay": 0.3}),
    "rmsprop": ("rmsprop", {"lr": 1e-3}),
    "rmsprop-momentum": ("rmsprop", {"lr": 1e-3, "momentum": 0.9}),
    "rmsprop-centered-wd": ("rmsprop", {"lr": 1e-3, "alpha": 0.9, "centered": True, "weight_decay": 0.2}),
    "rmsprop-centered-momentum-wd": ("rmsprop", {"lr": 1e-3, "alpha": 0.95, "momentum": 0.5, "centered": True,
                                                 "weight_decay": 0.05}),
    "stable_adamw": ("stable_adamw", {"lr": 1e-2}),
    "stable_adamw-betas-wd": ("stable_adamw", {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-4, "weight_decay": 0.3}),
    "stable_adamw-decouple_lr": ("stable_adamw", {"lr": 1e-2, "decouple_lr": True, "max_lr": 2e-2,
                                                  "weight_decay": 0.1}),
}


def _build(cfg, foreach, dtype=torch.float32, state="float32", chunk=None, rounding=None, mixed=False):
    name, hp = CONFIGS[cfg]
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
    groups = [{"params": ps, **({rounding: True} if rounding else {})}]
    if mixed:  # (a group of the other dtype beside: its own buckets)
        other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
        groups.append({"params": [torch.nn.Parameter(torch.randn(11, 3).to(other))]})
    opt = create_optimizer(groups, name, foreach=foreach, state_dtype=state, **hp)
    opt.chunk_numel = chunk
    return opt, [p for g in groups for p in g["params"]]


def _steps(opt, params, steps, seed=1, start=0):
    """``steps`` steps from ``start`` (the gradients of the steps before are drawn and dropped): growing gradients,
    one step of zeros (the coupled decay alone feeds the statistics)."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(start + steps):
        grads = [torch.randn(p.shape, generator=gen).mul(0.0 if i == 2 else 1.0 + i).to(p.dtype) for p in params]
        if i < start:
            continue
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()


def _same(a, pa, b, pb):
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        sa, sb = a.state[p], b.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def _watch(monkeypatch):
    """The dtypes of the parameters stepped alone (``_update``) and the bucket steps taken (float32, bfloat16)."""
    alone, buckets = [], []
    update, bf16, f32 = E.LowMemOptimizer._update, E.LowMemOptimizer._step_bf16_bucket, E.LowMemOptimizer._step_bucket
    monkeypatch.setattr(E.LowMemOptimizer, "_update",
                        lambda self, p, *a, **k: (alone.append(p.dtype), update(self, p, *a, **k))[1])
    monkeypatch.setattr(E.LowMemOptimizer, "_step_bf16_bucket",
                        lambda self, ps, *a: (buckets.append("bf16"), bf16(self, ps, *a))[1])
    monkeypatch.setattr(E.LowMemOptimizer, "_step_bucket",
                        lambda self, key, b: (buckets.append("f32"), f32(self, key, b))[1])
    return alone, buckets


CASES = ([pytest.param(c, torch.float32, "float32", id=f"{c}-f32") for c in CONFIGS]
         + [pytest.param(c, torch.bfloat16, s, id=f"{c}-bf16-{s}") for c in CONFIGS for s in ("float32", "bfloat16")])


@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "pieces"])
@pytest.mark.parametrize("cfg,dtype,state", CASES)
def test_buckets_equal_the_per_tensor_step(cfg, dtype, state, chunk, monkeypatch):
    """Five steps (growing gradients, one of zeros) in buckets == five per-tensor steps, weights and every state
    tensor bit for bit; a group of the other dtype beside. Every weight of the first group is stepped in a bucket, none
    alone (chunk 64: the (300,) and (40, 30) weights in pieces across buckets)."""
    ref, pr = _build(cfg, False, dtype, state, chunk, mixed=True)
    _steps(ref, pr, 5)
    alone, buckets = _watch(monkeypatch)
    opt, po = _build(cfg, None, dtype, state, chunk, mixed=True)
    _steps(opt, po, 5)
    # (StableAdamW's RMS spans the tensor: a bfloat16 weight larger than the chunk is stepped alone, as before;
    # a float32 one whole from its first piece, step_whole_from_piece_)
    big = [p for p in po[:len(SHAPES)] if dtype == torch.bfloat16 and chunk is not None and p.numel() > chunk
           and not getattr(opt.recipe.moment, "pieces_elementwise", False)]
    assert alone.count(dtype) == 5 * len(big) and buckets
    _same(ref, pr, opt, po)


@pytest.mark.parametrize("rounding", ["bf16_stochastic_round", "kahan_summation"])
@pytest.mark.parametrize("cfg", ["sgd-nesterov-wd", "adagrad-lr_decay-init-wd", "rmsprop-centered-momentum-wd",
                                 "stable_adamw-betas-wd"])
def test_bf16_buckets_with_the_engines_write_back(cfg, rounding):
    """bfloat16 weights with stochastic rounding (each piece continues its parameter's stream) or Kahan's
    compensation: the buckets equal the per-tensor step bit for bit."""
    ref, pr = _build(cfg, False, torch.bfloat16, "bfloat16", 64, rounding)
    _steps(ref, pr, 4)
    opt, po = _build(cfg, None, torch.bfloat16, "bfloat16", 64, rounding)
    _steps(opt, po, 4)
    _same(ref, pr, opt, po)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_resume_from_a_checkpoint(cfg, dtype):
    """2 bucket steps, state_dict, a new optimizer loads it, 3 more == 5 uninterrupted per-tensor steps (SGD's
    first-step copy into the buffer, Adagrad's lr_decay read the restored step count)."""
    ref, pr = _build(cfg, False, dtype, chunk=64)
    _steps(ref, pr, 5)
    first, p1 = _build(cfg, None, dtype, chunk=64)
    _steps(first, p1, 2)
    saved = copy.deepcopy(first.state_dict())
    weights = [p.detach().clone() for p in p1]
    resumed, p2 = _build(cfg, None, dtype, chunk=64)
    with torch.no_grad():
        for p, w in zip(p2, weights):
            p.copy_(w)
    resumed.load_state_dict(saved)
    _steps(resumed, p2, 3, start=2)
    _same(ref, pr, resumed, p2)


@pytest.mark.parametrize("chunk", [None, 500], ids=["whole", "pieces"])
@pytest.mark.parametrize("cfg,dtype,state", CASES)
def test_bucket_step_allocates_what_it_reports(cfg, dtype, state, chunk):
    """The traced peak of a steady step (the third; every dispatched output alive: ``_AllLive``) ==
    ``step_transient_bytes()``: the coupled gradients, the denominators and quotients, Nesterov's sums, the float32
    copies of bfloat16 gradients, state and parameters (a group of the other dtype beside)."""
    opt, ps = _build(cfg, None, dtype, state, chunk, mixed=True)
    _steps(opt, ps, 2)
    gen = torch.Generator().manual_seed(5)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    with _AllLive() as t:
        opt.step()
    assert t.peak == opt.step_transient_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cfg", ["sgd-momentum", "sgd-nesterov-wd", "adagrad-lr_decay-init-wd", "rmsprop",
                                 "rmsprop-centered-momentum-wd", "stable_adamw-betas-wd"])
def test_launch_counts_on_meta(cfg, dtype):
    """The CUDA path counted on meta tensors (one per dispatched operation): 40 weights in one bucket launch a fixed
    number of kernels beside the non-finite check's (one per weight: a bfloat16 gradient's float32 cast) and
    StableAdamW's RMS sums (one per weight), where the per-tensor step launches several per weight (StableAdamW 26).
    (StableAdamW's two multiplications by a list of 0-d step sizes take torch's per-tensor fallback on CUDA: 2 more
    kernels per weight there, which the meta count does not see.)"""
    def count(foreach):
        name, hp = CONFIGS[cfg]
        ps = [torch.nn.Parameter(torch.empty(64, 32, device="meta", dtype=dtype)) for _ in range(40)]
        opt = create_optimizer(ps, name, foreach=foreach, **hp)
        for p in ps:
            p.grad = torch.zeros_like(p)
        with LaunchCounter():  # (it answers the non-finite check's read, which meta tensors cannot)
            opt.step()
        with LaunchCounter() as c:
            opt.step()
        return c.result().kernels

    bucket, alone = count(None), count(False)
    if cfg.startswith("stable_adamw"):  # (each tensor's RMS sum is its own .sum(): one kernel per weight)
        assert bucket < 40 + 40 and alone > 20 * 40, (bucket, alone)  # (measured: 69 / 73 and 1,046 / 1,087)
    else:
        assert bucket < 25 and alone > 40, (bucket, alone)  # (measured: 7-20 in buckets, 46-527 alone)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name,optim_args", [("sgd", {"momentum": 0.9, "weight_decay": 0.1}),
                                             ("rmsprop", {"momentum": 0.9, "centered": True, "weight_decay": 0.1}),
                                             ("adagrad", {"lr_decay": 0.1, "weight_decay": 0.1}),
                                             ("stable_adamw", {"decouple_lr": True, "max_lr": 0.01})],
                         ids=["sgd", "rmsprop", "adagrad", "stable_adamw"])
def test_measured_transient_equals_the_estimate(name, optim_args, dtype):
    """The tiny Llama on the CPU (its weights in buckets): the measured step transient (MemTracker) equals the
    estimate. Red when the momentum's multiplication takes a 0-d CPU tensor (foreach_scalar: made anew under the
    tracker, 4 B alive at the peak beside the coupled gradients or the denominators, which the estimate does not
    count: sgd and rmsprop 4 B over)."""
    from lowmem.memory.measure import measure_memory

    got = measure_memory("tiny", optimizer=name, optim_args=optim_args, steps=2, seq_len=8, dtype=dtype, device="cpu")
    assert got.measured["optimizer_transient"] == got.estimate.optimizer_transient > 0
