"""A small deterministic regression problem shared by the optimizer tests (not a test module)."""

from __future__ import annotations

import torch
from torch import nn

from lowmem.optim import get_entry


class Toy(nn.Module):
    """Two linear layers with biases and a norm: 2-D targets, decayed and undecayed groups."""

    def __init__(self, d_in=16, d_hidden=32, d_out=8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.norm = nn.LayerNorm(d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def make_problem(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Toy().to(dtype)
    teacher = Toy()
    x = torch.randn(64, 16, generator=g)
    with torch.no_grad():
        y = teacher(x) * 2
    return model, x.to(dtype), y.to(dtype)


def hparams_for(name, **extra):
    """The registry's example hyperparameters for ``name`` (with lr 1e-2 unless the entry says otherwise)."""
    entry = get_entry(name)
    hp = {"lr": 1e-2} if "lr" in entry.valid_hparams() else {}
    hp.update(entry.example_hparams)
    hp.update(extra)
    return hp


def loss_fn(model, x, y):
    return (model(x).float() - y.float()).pow(2).mean()


def train(model, opt, x, y, steps):
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
