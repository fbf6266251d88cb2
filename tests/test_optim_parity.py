"""Parity of the engine's full-rank recipes with the implementations users migrate from."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.optimization import Adafactor as HFAdafactor

from lowmem.optim import Adafactor, AdamW


def params_zoo(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 16), (16,), (3, 8, 10), (40, 12)]
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def run(opt_factory, params, steps=25, seed=1, lr_schedule=None):
    opt = opt_factory(params)
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype) * (1 + t % 3)
        if lr_schedule is not None:
            for grp in opt.param_groups:
                grp["lr"] = lr_schedule(t)
        opt.step()
    return params, opt


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch(foreach, weight_decay):
    ref = params_zoo()
    ours = copy.deepcopy(ref)
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    sched = lambda t: 3e-2 * (1 - t / 50)  # noqa: E731 - a scheduler changing lr between steps
    run(lambda ps: torch.optim.AdamW(ps, foreach=foreach, **kw), ref, lr_schedule=sched)
    run(lambda ps: AdamW(ps, **kw), ours, lr_schedule=sched)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_param_groups_match_torch():
    ref = params_zoo()
    ours = copy.deepcopy(ref)
    groups = lambda ps: [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa: E731
    run(lambda ps: torch.optim.AdamW(groups(ps), lr=5e-3, foreach=False), ref)
    run(lambda ps: AdamW(groups(ps), lr=5e-3), ours)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


ADAFACTOR_CONFIGS = {
    "defaults": {},
    "beta1": {"beta1": 0.9},
    "external_lr": {"lr": 1e-2, "relative_step": False, "scale_parameter": False},
    "external_lr_scaled": {"lr": 1e-2, "relative_step": False, "beta1": 0.5, "weight_decay": 0.1},
    "warmup_init": {"warmup_init": True, "weight_decay": 0.01},
    "clip": {"clip_threshold": 0.5, "decay_rate": -0.5},
}


@pytest.mark.parametrize("config", list(ADAFACTOR_CONFIGS))
def test_adafactor_matches_transformers(config):
    kw = ADAFACTOR_CONFIGS[config]
    ref = params_zoo()
    ours = copy.deepcopy(ref)
    run(lambda ps: HFAdafactor(ps, **kw), ref, steps=30)
    run(lambda ps: Adafactor(ps, **kw), ours, steps=30)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


def test_adafactor_bf16_matches_transformers():
    """transformers keeps float32 statistics for bf16 parameters; so do we (state_dtype="float32")."""
    ref = params_zoo(torch.bfloat16)
    ours = copy.deepcopy(ref)
    run(lambda ps: HFAdafactor(ps, beta1=0.9), ref, steps=15)
    run(lambda ps: Adafactor(ps, beta1=0.9), ours, steps=15)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
        assert (a != b).float().mean() < 0.01  # at most a rare bf16 rounding tie differs


def test_adafactor_rejects_transformers_invalid_combinations():
    p = [nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(ValueError, match="relative_step"):
        Adafactor(p, lr=1e-3)
    with pytest.raises(ValueError, match="warmup_init"):
        Adafactor(p, lr=1e-3, relative_step=False, warmup_init=True)


def test_adafactor_state_is_sublinear():
    p = nn.Parameter(torch.zeros(64, 32))
    opt = Adafactor([p])
    opt.materialize_state()
    assert opt.state_bytes() == (64 + 32) * 4 + 4  # row + column statistics + step counter


def test_adamw_foreach_path_equals_single_tensor_reference():
    ref = params_zoo()
    ours = copy.deepcopy(ref)
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    _, opt_ref = run(lambda ps: AdamW(ps, foreach=False, **kw), ref)
    _, opt = run(lambda ps: AdamW(ps, foreach=True, **kw), ours)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for p_a, p_b in zip(ours, ref):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[p_a][k], opt_ref.state[p_b][k], rtol=1e-6, atol=1e-9)


def test_foreach_buckets_respect_per_parameter_step_counts():
    """A parameter that missed steps (None grad) has its own bias correction on the fast path."""
    ref = params_zoo()
    ours = copy.deepcopy(ref)
    for ps, fe in ((ref, False), (ours, True)):
        opt = AdamW(ps, lr=1e-2, foreach=fe)
        g = torch.Generator().manual_seed(3)
        for t in range(8):
            for i, p in enumerate(ps):
                p.grad = None if (i == 1 and t < 4) else torch.randn(p.shape, generator=g)
            opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_resume_a_torch_adamw_checkpoint_with_lowmem_adamw():
    """Migration: torch.optim.AdamW's state dict (weights_only) loads into lowmem's AdamW and the run
    continues exactly as torch's would."""
    import io

    ref = params_zoo()
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    _, torch_opt = run(lambda ps: torch.optim.AdamW(ps, foreach=False, **kw), ref, steps=5)
    buf = io.BytesIO()
    torch.save(torch_opt.state_dict(), buf)
    ours = copy.deepcopy(ref)
    buf.seek(0)
    opt = AdamW(ours, **kw)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in ref]
        for p, q, gr in zip(ref, ours, grads):
            p.grad, q.grad = gr, gr.clone()
        torch_opt.step()
        opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
