"""AUDITSR: ``bf16_stochastic_round`` and ``kahan_summation`` checked from outside on the real write-back paths.

Random bfloat16 weights in [0.25, 0.5) (ulp 2^-9, half of it 9.8e-4) and a fixed sequence of positive random
gradients, 20 steps of lr 1e-4 (each update << half an ulp): round-to-nearest stalls, and the stochastically
rounded weights must track float32 weights given the same gradients. The bound is statistical: each rounding is a
zero-mean error of variance ``ulp^2 p (1 - p) <= ulp |u|`` (``u`` that step's update), independent of the others, so
``sum_i s_i (d_sr_i - d_ref_i)`` (``s``: the reference's direction) has a standard deviation of at most
``sqrt(ulp_max * sum |d_ref|)``; the test allows 5 of them (with ulp_max 2^-8, the larger binade). Kahan: the weight
plus its compensation tracks the float32 weight to the compensation's bfloat16 precision (as optimi's, whose
compensation is in the parameter's dtype too)."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.optim import create_optimizer

ULP_MAX = 2.0**-8
STEPS = 20


def _run(name, mode, shape, lr=1e-4, steps=STEPS, chunk=None, **kw):
    gen = torch.Generator().manual_seed(0)
    w0 = (0.25 + 0.25 * torch.rand(shape, generator=gen)).to(torch.bfloat16)
    grads = [(0.5 + torch.rand(shape, generator=gen)).to(torch.bfloat16) for _ in range(steps)]
    dtype = torch.float32 if mode == "ref" else torch.bfloat16
    p = torch.nn.Parameter(w0.to(dtype, copy=True))
    extra = {"sr": {"bf16_stochastic_round": True}, "kahan": {"kahan_summation": True}}.get(mode, {})
    opt = create_optimizer([p], name, lr=lr, weight_decay=0.0, **kw, **extra)
    if chunk is not None:
        opt.chunk_numel = chunk
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
    w = p.detach().double()
    if mode == "kahan":
        w = w + opt.state[p]["kahan_comp"].double()
    return w - w0.double()


def _tracks(ref, d, sigmas=5.0):
    """``(ratio, bound)``: the signed movement of ``d`` over the reference's, and the bound 5 standard deviations
    allow (relative)."""
    s, mov = ref.sign(), ref.abs().sum().item()
    return (d * s).sum().item() / mov, sigmas * math.sqrt(ULP_MAX * mov) / mov


CONFIGS = {  # name, shape, settings: every write-back path the brief names, on shapes the authors' tests do not use
    "adamw": ("adamw", (96, 80), {}),
    "adamw_foreach_off": ("adamw", (96, 80), {"foreach": False}),
    "adamw_small_chunks": ("adamw", (96, 80), {"chunk": 1000}),
    "adamw8bit": ("adamw8bit", (96, 80), {}),
    "adamw4bit_rank1": ("adamw4bit_rank1", (96, 80), {}),
    "adafactor": ("adafactor", (96, 80), {}),
    "adafactor_bf16_state": ("adafactor", (96, 80), {"state_dtype": "bfloat16"}),
    "lion": ("lion", (96, 80), {}),
    "lion_bf16_state": ("lion", (96, 80), {"state_dtype": "bfloat16"}),
    "sm3": ("sm3", (96, 80), {}),
    "racs": ("racs", (96, 80), {}),
    "adam_mini": ("adam_mini", (96, 80), {}),
    "galore_adamw_rows": ("galore_adamw", (72, 160), {"rank": 8, "update_proj_gap": 5}),
    "galore_adamw_cols": ("galore_adamw", (160, 72), {"rank": 8, "update_proj_gap": 5}),
    "galore_adamw_batch": ("galore_adamw", (3, 48, 96), {"rank": 8, "update_proj_gap": 5}),
    "fira_adamw": ("fira_adamw", (72, 160), {"rank": 8}),
    "apollo_adamw": ("apollo_adamw", (72, 160), {"rank": 8}),
    "muon_batch": ("muon", (3, 64, 48), {}),
    "normuon_batch": ("normuon", (3, 64, 48), {}),
    "stacked_adamw": ("adamw", (3, 40, 64), {}),
    "stacked_sm3": ("sm3", (3, 40, 64), {}),
    "stacked_racs": ("racs", (3, 40, 64), {}),
}


def _run_cfg(key, mode):
    name, shape, kw = CONFIGS[key]
    return _run(name, mode, shape, **kw)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_stochastic_rounding_tracks_float32_where_nearest_stalls(key):
    """Passes on every listed path. Mutations checked: _store's rounding replaced by copy_ -> all red (ratio 0);
    the random bits' offset 2^15 -> 2^14 in stochastic_round_to_bf16_ (a rounding biased up by a quarter ulp) -> red."""
    ref, rtn, sr = (_run_cfg(key, m) for m in ("ref", "rtn", "sr"))
    r_rtn, _ = _tracks(ref, rtn)
    r_sr, bound = _tracks(ref, sr)
    assert abs(r_rtn) < 0.05, r_rtn  # (round-to-nearest loses the updates)
    assert bound < 0.5  # (the check can tell)
    assert abs(r_sr - 1.0) < bound, (r_sr, bound)


@pytest.mark.parametrize("key", ["adamw", "adafactor", "lion", "galore_adamw_rows", "muon_batch", "stacked_racs"])
def test_kahan_weight_plus_compensation_tracks_float32(key):
    """Passes. Mutation checked: kahan_store_ without ``comp.copy_`` (the compensation never kept) -> red."""
    ref, kh = _run_cfg(key, "ref"), _run_cfg(key, "kahan")
    r, _ = _tracks(ref, kh)
    assert abs(r - 1.0) < 0.01, r


@pytest.mark.parametrize("option", ["bf16_stochastic_round", "kahan_summation"])
@pytest.mark.parametrize("state_dtype", ["param", "bfloat16"])
@pytest.mark.parametrize("name,shape", [("adamw", (96, 80)), ("galore_adamw", (7680,)), ("apollo_adamw", (7680,))],
                         ids=["adamw", "galore_unprojected", "apollo_unprojected"])
def test_adam_low_precision_state_applies_the_option(name, shape, option, state_dtype):
    """AdamW, and the AdamW step of the subspace recipes' unprojected parameters (biases, norms): measured 0.0, the
    weights never move (and the compensation stays 0)."""
    mode = "sr" if option == "bf16_stochastic_round" else "kahan"
    ref = _run(name, "ref", shape, state_dtype=state_dtype)
    d = _run(name, mode, shape, state_dtype=state_dtype)
    r, bound = _tracks(ref, d)
    assert abs(r - 1.0) < bound, r
