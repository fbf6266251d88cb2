"""FIXREF20 (AUDREF19 2): lowmem.optim.AdamW / SGD / Adagrad / RMSprop take torch.optim's keywords (in torch's
positions): at torch's defaults (and fused=False) they change nothing; another value is a ValueError naming the
argument and what is supported (never run as the plain update)."""

from __future__ import annotations

import inspect

import pytest
import torch

import lowmem.optim as LO

NAMES = ["AdamW", "SGD", "Adagrad", "RMSprop"]


def _positional(cls):
    return [n for n, q in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and q.kind == q.POSITIONAL_OR_KEYWORD]


@pytest.mark.parametrize("name", NAMES)
def test_torch_signature_is_a_prefix(name):
    """torch's positional arguments in torch's order, and each of torch's keywords taken."""
    theirs, mine = getattr(torch.optim, name), getattr(LO, name)
    assert _positional(mine) == _positional(theirs)
    assert set(inspect.signature(theirs.__init__).parameters) <= set(inspect.signature(mine.__init__).parameters)


@pytest.mark.parametrize("name, flag, value", [
    ("AdamW", "amsgrad", True), ("AdamW", "capturable", True), ("AdamW", "differentiable", True),
    ("AdamW", "fused", True), ("SGD", "maximize", True), ("SGD", "fused", True), ("Adagrad", "differentiable", True),
    ("Adagrad", "fused", True), ("RMSprop", "capturable", True), ("RMSprop", "maximize", True),
])
def test_other_values_are_refused_naming_the_argument(name, flag, value):
    p = [torch.nn.Parameter(torch.randn(3, 4))]
    with pytest.raises(ValueError, match=rf"{name}: {flag}={value!r} is not implemented: .*; supported: {flag}="):
        getattr(LO, name)(p, lr=1e-2, **{flag: value})


def test_amsgrad_positional_as_in_torch():
    p = [torch.nn.Parameter(torch.randn(3, 4))]
    with pytest.raises(ValueError, match="amsgrad=True"):
        LO.AdamW(p, 1e-3, (0.9, 0.999), 1e-8, 0.01, True)
    assert LO.AdamW(p, 1e-3, (0.9, 0.999), 1e-8, 0.01, False).param_groups[0]["weight_decay"] == 0.01


def test_adagrad_foreach_positional_as_in_torch():
    p = [torch.nn.Parameter(torch.randn(3, 4))]
    assert LO.Adagrad(p, 0.01, 0.0, 0.0, 0.0, 1e-10, False).param_groups[0]["foreach"] is False


@pytest.mark.parametrize("name", NAMES)
def test_flags_at_defaults_step_as_without_them(name):
    init = torch.randn(5, 6)
    grads = [torch.randn(5, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    flags = {k: torch_default for k, torch_default in
             [("maximize", False), ("differentiable", False), ("fused", False), ("capturable", False),
              ("amsgrad", False)] if k in inspect.signature(getattr(torch.optim, name).__init__).parameters}
    out = []
    for kw in ({}, flags):
        p = torch.nn.Parameter(init.clone())
        opt = getattr(LO, name)([p], lr=1e-2, **kw)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out.append(p.detach())
        assert not set(flags) & set(opt.param_groups[0])  # (nothing of them stored: the groups are lowmem's own)
    assert torch.equal(*out)
