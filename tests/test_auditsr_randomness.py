"""AUDITSR: the random bits of ``bf16_stochastic_round``: independent between parameters, chunks and the matrices of
a batch, and a resumed run equal to the uninterrupted one bit for bit on paths the authors' tests did not resume
(projected rows, a batch of matrices, SM3, Adafactor, layerwise mode's ``step_param``)."""

from __future__ import annotations

import io

import pytest
import torch

from lowmem.optim import create_optimizer

LR = 2.5e-4  # a quarter of the ulp below 0.25 (2^-10): each element rounds up (stays at 0.25) with probability 3/4


def _ups(x):
    """Which elements of a weight of 0.25 after one step of ``-LR`` rounded back up to 0.25 (float 0/1)."""
    return (x.detach().float() == 0.25).float().flatten()


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_same_shaped_parameters_chunks_and_matrices_draw_independent_bits():
    """The round-up maps of two same-shaped parameters at one step, of a parameter's chunks, and of two matrices of
    a batch (stepped per matrix by muon's orthogonalized update is not uniform, so adamw on a 3-D weight stepped in
    chunks of one matrix stands for it) are uncorrelated: |corr| < 5 / sqrt(n) (identical bits: corr 1).
    Mutation checked: stream_seed(index, t) -> stream_seed(0, t) (every parameter the same stream) -> red."""
    ps = [torch.nn.Parameter(torch.full((96, 96), 0.25, dtype=torch.bfloat16)) for _ in range(3)]
    stacked = torch.nn.Parameter(torch.full((4, 48, 48), 0.25, dtype=torch.bfloat16))
    opt = create_optimizer([*ps, stacked], "adamw", lr=LR, weight_decay=0.0, bf16_stochastic_round=True)
    opt.chunk_numel = 48 * 48
    for p in (*ps, stacked):
        p.grad = torch.ones_like(p)
    opt.step()
    n = 96 * 96
    maps = [_ups(p) for p in ps]
    assert abs(maps[0].mean().item() - 0.75) < 5 * (0.75 * 0.25 / n) ** 0.5  # (unbiased: 3/4 stay)
    for i in range(3):
        for j in range(i + 1, 3):
            assert abs(_corr(maps[i], maps[j])) < 5 / n**0.5, (i, j)
    chunks = _ups(stacked).view(4, -1)
    for i in range(1, 4):
        assert abs(_corr(chunks[0], chunks[i])) < 5 / chunks.shape[1] ** 0.5, i


def _resume_run(name, shape, resume_at, steps=5, layerwise=False, **kw):
    gen = torch.Generator().manual_seed(0)
    w0 = (0.25 + 0.25 * torch.rand(shape, generator=gen)).to(torch.bfloat16)
    grads = [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(steps)]

    def make(w):
        p = torch.nn.Parameter(w.clone())
        return p, create_optimizer([p], name, lr=1e-4, bf16_stochastic_round=True, **kw)

    p, opt = make(w0)
    for i, g in enumerate(grads):
        if i == resume_at:  # a fresh weight and optimizer from the checkpoint (weights_only)
            buf = io.BytesIO()
            torch.save({"w": p.detach(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ck = torch.load(buf, weights_only=True)
            torch.manual_seed(1234)  # (the default generator elsewhere: must not matter)
            p, opt = make(ck["w"])
            opt.load_state_dict(ck["opt"])
        if layerwise:
            opt.step_param(p, g)
        else:
            p.grad = g
            opt.step()
    return p.detach()


RESUMED = {
    "galore_rows": ("galore_adamw", (48, 96), {"rank": 4, "update_proj_gap": 2}),
    "muon_batch": ("muon", (3, 32, 24), {}),
    "sm3": ("sm3", (40, 24), {}),
    "adafactor": ("adafactor", (40, 24), {}),
    "step_param": ("adamw", (40, 24), {"layerwise": True}),
}


@pytest.mark.parametrize("key", list(RESUMED))
def test_resumed_bit_for_bit(key):
    """Mutation checked: _rounding_generator returning None (torch's default generator) -> red."""
    name, shape, kw = RESUMED[key]
    full = _resume_run(name, shape, None, **kw)
    again = _resume_run(name, shape, None, **kw)
    resumed = _resume_run(name, shape, 3, **kw)
    assert torch.equal(full.view(torch.int16), again.view(torch.int16))
    assert torch.equal(full.view(torch.int16), resumed.view(torch.int16))


def _layerwise_run(name, resume_at, **kw):
    from lowmem.optim.layerwise import LayerwiseOptimizer

    def model():
        return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8)).to(torch.bfloat16)

    torch.manual_seed(0)
    m = model()
    opt = LayerwiseOptimizer(m, name, lr=1e-3, **kw)
    gen = torch.Generator().manual_seed(1)
    for i in range(6):
        if i == resume_at:
            buf = io.BytesIO()
            torch.save({"m": m.state_dict(), "o": opt.state_dict()}, buf)
            buf.seek(0)
            ck = torch.load(buf, weights_only=True)
            torch.manual_seed(5)
            m = model()
            m.load_state_dict(ck["m"])
            opt = LayerwiseOptimizer(m, name, lr=1e-3, **kw)
            opt.load_state_dict(ck["o"])
        m(torch.randn(4, 16, generator=gen).to(torch.bfloat16)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in m.parameters()]


@pytest.mark.parametrize("option", [{"bf16_stochastic_round": True}, {"kahan_summation": True},
                                    {"kahan_summation": True, "accumulation_steps": 2}], ids=["sr", "kahan", "kahan_acc2"])
@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_layerwise_mode_resumed_bit_for_bit(name, option):
    """LOMO / AdaLomo in layerwise mode (the update in the backward hooks), checkpointed after 3 steps through
    torch.load(weights_only=True) into a fresh model and LayerwiseOptimizer: the uninterrupted run's weights, bit for
    bit (Kahan's compensation, bfloat16, carried through the wrapper's state_dict). Mutations checked:
    _rounding_generator -> None -> the sr cases red; kahan_comp zeroed after load_state_dict -> the kahan cases red."""
    full = _layerwise_run(name, None, **option)
    resumed = _layerwise_run(name, 3, **option)
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(full, resumed))
