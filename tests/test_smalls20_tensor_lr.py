"""SMALLS20 4: a tensor learning rate (``group["lr"] = torch.tensor(1e-3)``, as a scheduler may write; the step takes
it as torch.optim does) made the step allocate beyond step_transient_bytes(): ``apply_update_``'s temporary
``direction * lr`` and ``decoupled_weight_decay_``'s ``p * (lr wd)`` (a float32 chunk each: 131,072 B missed for
adamw(foreach=False), lion, sgd, rmsprop, adagrad on a 256 x 128 weight), and APOLLO-Mini's combine-back, which the
report counted as the in-place ``addmm_`` a float lr takes (129,804 B missed). Now both functions step in place
(``addcmul_``) and the report follows the route the engine takes; what is left unreported is 0-d tensors (at most
12 B: the product ``lr * wd`` and the multi-tensor step's scalars)."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_nonfinite_check_bytes import _AllLive

from lowmem.optim import functional as F
from lowmem.optim.registry import create_optimizer

SHAPES = [(256, 128), (128,), (64, 64)]
ZERO_DIM = 12  # bytes of 0-d tensors a tensor lr's step makes beyond the report (lr * wd, the foreach scalars)

CASES = {
    "adamw_per_parameter": ("adamw", {"foreach": False}),
    "lion": ("lion", {}),
    "sgd": ("sgd", {"momentum": 0.9}),
    "rmsprop": ("rmsprop", {}),
    "adagrad": ("adagrad", {}),
    "apollo_mini": ("apollo_mini", {}),
    "apollo_mini_per_parameter": ("apollo_mini", {"foreach": False}),
    "stable_adamw": ("stable_adamw", {}),
    "adafactor": ("adafactor", {"relative_step": False}),
    "adamw8bit": ("adamw8bit", {"min_quant_size": 1}),
}


def _traced_step(name, hp, lr, wd):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    kw = dict(hp, **({"weight_decay": wd} if wd else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer(ps, name, lr=1e-3, **kw)
        gen = torch.Generator().manual_seed(1)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        for g in opt.param_groups:
            g["lr"] = lr
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        with _AllLive() as t:
            opt.step()
    return t.peak, opt.step_transient_bytes(), [p.detach().clone() for p in ps]


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tensor_lr_step_allocates_what_it_reports(case, wd):
    name, hp = CASES[case]
    traced, reported, got = _traced_step(name, hp, torch.tensor(1e-3), wd)
    assert traced <= reported + ZERO_DIM, (traced, reported)
    f_traced, f_reported, want = _traced_step(name, hp, 1e-3, wd)
    assert f_traced <= f_reported
    for a, b in zip(got, want):  # (the same step: float32 1e-3 against the double, and the update's rounding)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_and_decay_with_a_0d_lr_allocate_nothing_of_the_tensors_size(dtype):
    gen = torch.Generator().manual_seed(0)
    p, d = torch.randn(4096, generator=gen, dtype=dtype), torch.randn(4096, generator=gen, dtype=dtype)
    lr = torch.tensor(3e-3)
    want = (p - p * (lr * 0.1)) - d * lr
    got = p.clone()
    with _AllLive() as t:
        F.decoupled_weight_decay_(got, lr, 0.1)
        F.apply_update_(got, d, lr)
    assert t.peak <= 4  # (the 0-d lr * wd)
    torch.testing.assert_close(got, want, rtol=0, atol=4 * torch.finfo(dtype).eps)


def test_a_cpu_lr_beside_another_device_is_read_as_its_number():
    """A 0-d CPU lr beside tensors of another device (here meta, as CUDA parameters): addcmul_ takes no CPU
    scalar there, so its number is used (a host value: no device sync)."""
    p, d = torch.empty(8, device="meta"), torch.empty(8, device="meta")
    F.decoupled_weight_decay_(p, torch.tensor(1e-3), 0.1)
    F.apply_update_(p, d, torch.tensor(1e-3))
    lrs = torch.tensor([1e-3, 2e-3])  # (per-row step sizes: the broadcasting form)
    q = torch.ones(2, 3)
    F.apply_update_(q, torch.ones(2, 3), lrs.view(2, 1))
    torch.testing.assert_close(q, torch.tensor([[0.999] * 3, [0.998] * 3]))


@pytest.mark.parametrize("foreach", [False, True])
def test_galore_steady_bound_follows_the_row_blocks_of_a_tensor_lr(foreach):
    """GaLore on a float32 weight steps in place with one addmm_ under a float lr; with a tensor lr the engine
    combines back a block of rows at a time (addmm_'s alpha takes no tensor), and the bound of a step without a
    refresh (what the non-finite check may hold projected gradients within) counts those blocks: before, it
    counted the addmm_ (1,081,344 B reported, 2,129,920 allocated on a 1024 x 1024 weight)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(512, 256))
    opt = create_optimizer([p], "galore_adamw", lr=1e-3, rank=4, update_proj_gap=100, foreach=foreach)
    p.grad = torch.randn(p.shape)
    opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(1e-3)
    p.grad = torch.randn(p.shape)
    with _AllLive() as t:
        opt.step()
    assert t.peak > 4 * 512 * 256 // 2  # (a block of rows' direction at least)
    assert t.peak <= opt._transient_bytes(steady=True) + ZERO_DIM, (t.peak, opt._transient_bytes(steady=True))
