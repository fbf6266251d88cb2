"""AUDITSR: ``kahan_summation``'s compensation through checkpoints and in ``state_bytes()`` on rules and shapes the
authors' tests (AdamW only) did not use: the quantized, projected, batched and factored states."""

from __future__ import annotations

import io

import pytest
import torch

from lowmem.optim import create_optimizer

CASES = {
    "adamw8bit": ("adamw8bit", (32, 48), {}),
    "galore_rows": ("galore_adamw", (24, 80), {"rank": 4}),
    "muon_batch": ("muon", (3, 32, 48), {}),
    "adafactor": ("adafactor", (32, 48), {}),
    "sm3_3d": ("sm3", (3, 16, 24), {}),
}


def _stepped(name, shape, steps=3, **kw):
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((0.25 + 0.25 * torch.rand(shape, generator=gen)).to(torch.bfloat16))
    opt = create_optimizer([p], name, lr=1e-4, kahan_summation=True, **kw)
    for _ in range(steps):
        p.grad = torch.randn(shape, generator=gen).to(torch.bfloat16)
        opt.step()
    return p, opt, gen


@pytest.mark.parametrize("key", list(CASES))
def test_compensation_survives_a_weights_only_checkpoint_and_is_counted(key):
    """The compensation comes back bfloat16, of the weight's shape, equal to the saved one, and the resumed run's
    next two steps equal the uninterrupted run's bit for bit; ``state_bytes()`` is the plain optimizer's plus 2 B per
    element, equal to the state tensors' bytes. A float32 compensation in a checkpoint is refused naming the key.
    Mutations checked: kahan_comp made float32 (engine's _init_state) -> red; state_bytes without it -> red."""
    name, shape, kw = CASES[key]
    p, opt, gen = _stepped(name, shape, **kw)
    buf = io.BytesIO()
    torch.save({"w": p.detach(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    q = torch.nn.Parameter(ck["w"].clone())
    fresh = create_optimizer([q], name, lr=1e-4, kahan_summation=True, **kw)
    fresh.load_state_dict(ck["opt"])
    c = fresh.state[q]["kahan_comp"]
    assert c.dtype == torch.bfloat16 and c.shape == p.shape and torch.equal(c, opt.state[p]["kahan_comp"])
    assert bool(c.ne(0).any())  # (it holds what rounding dropped)
    for _ in range(2):
        g = torch.randn(shape, generator=gen).to(torch.bfloat16)
        p.grad, q.grad = g, g.clone()
        opt.step()
        fresh.step()
    assert torch.equal(p.view(torch.int16), q.view(torch.int16))
    plain = create_optimizer([torch.nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16))], name, **kw)
    plain.materialize_state()
    mine = create_optimizer([torch.nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16))], name, kahan_summation=True, **kw)
    mine.materialize_state()
    assert mine.state_bytes() - plain.state_bytes() == 2 * p.numel()
    tensors = sum(t.numel() * t.element_size() for st in mine.state.values() for t in st.values() if torch.is_tensor(t))
    assert mine.state_bytes() == tensors
    bad = opt.state_dict()
    bad["state"][0]["kahan_comp"] = bad["state"][0]["kahan_comp"].float()
    with pytest.raises(ValueError, match="kahan_comp"):
        create_optimizer([torch.nn.Parameter(ck["w"].clone())], name, lr=1e-4, kahan_summation=True, **kw).load_state_dict(bad)


def test_a_float32_compensation_in_a_checkpoint_is_named_as_such():
    """A checkpoint whose ``kahan_comp`` was converted to float32: the error says the compensation is always bfloat16
    (it named state_dtype, which does not choose it: FOUND_AUDITSR 6)."""
    p = torch.nn.Parameter(torch.full((4, 8), 0.25, dtype=torch.bfloat16))
    opt = create_optimizer([p], "adamw", lr=1e-4, kahan_summation=True)
    p.grad = torch.full_like(p, 1e-3)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["kahan_comp"] = sd["state"][0]["kahan_comp"].float()
    fresh = create_optimizer([p], "adamw", lr=1e-4, kahan_summation=True)
    with pytest.raises(ValueError, match="kahan_summation's compensation is always bfloat16"):
        fresh.load_state_dict(sd)
