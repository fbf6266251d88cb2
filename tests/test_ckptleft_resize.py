"""A parameter resized after its state was made, without a gradient: a step does not step it, so does not compare it
(the compare rides on the step's cached paths, group_layout.check_resized); ``group_layout.check_state_fits`` compares
every parameter with state, for ``state_dict()``: a checkpoint taken then would hold state of the old shape, which
every later load refuses. At a step nothing changes (the cost there stays nil)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowmem.optim.group_layout as gl
from lowmem.optim import create_optimizer
from lowmem.optim.group_layout import check_state_fits


def _model():
    torch.manual_seed(0)
    return nn.ModuleDict({"emb": nn.Embedding(10, 4), "lin": nn.Linear(4, 4)})


def _groups(m):
    """The embedding in a group of its own: a step that decides the path of a parameter of its group again compares
    it (check_resized); here none is (the case this module is about)."""
    return [{"params": [m["emb"].weight]}, {"params": list(m["lin"].parameters())}]


def _step(m, opt, emb=True):
    opt.zero_grad(set_to_none=True)
    x = m["emb"](torch.arange(4)) if emb else torch.ones(4, 4)
    m["lin"](x).square().sum().backward()
    opt.step()


@pytest.mark.parametrize("name", ["adamw", "galore_adamw", "adamw8bit", "lomo"])
def test_a_resized_parameter_with_state_and_no_gradient_is_refused_by_check_state_fits(name):
    m = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer(_groups(m), name, lr=1e-2, **({"rank": 2} if name == "galore_adamw" else {}))
    _step(m, opt)
    _step(m, opt)
    check_state_fits(opt)  # (nothing resized: passes)
    emb = m["emb"].weight
    emb.data = torch.randn(12, 4)
    _step(m, opt, emb=False)  # the step does not see it (no gradient): documented, and unchanged
    i, j = next((i, j) for i, g in enumerate(opt.param_groups) for j, p in enumerate(g["params"]) if p is emb)
    with pytest.raises(ValueError, match=rf"parameter {j} of parameter group {i} is \(12, 4\) but its state was made "
                                         r"for \(10, 4\).*Nothing was saved.*optimizer.state.pop\(p\)"):
        check_state_fits(opt)
    opt.state.pop(emb)  # (what the message says)
    check_state_fits(opt)
    _step(m, opt)  # its state made for (12, 4)
    assert opt.state[emb]["step"].item() == 1


def test_check_state_fits_compares_each_parameter_once_and_probes_nothing(monkeypatch):
    m = _model()
    opt = create_optimizer(m, "adamw", lr=1e-2)
    _step(m, opt)
    _step(m, opt)
    reads, probes = [], []
    real = gl._SHAPE
    monkeypatch.setattr(gl, "_SHAPE", lambda p: (reads.append(p), real(p))[1])
    monkeypatch.setattr(gl, "layout", lambda *a: probes.append(a))
    check_state_fits(opt)
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert len(reads) == n and probes == []
    reads.clear()
    _step(m, opt)  # a step whose paths are cached compares no shape (tests/test_fastcheck_resize.py)
    assert reads == []


def test_state_dict_refuses_a_resized_parameter_with_state():
    m = _model()
    opt = create_optimizer(_groups(m), "adamw", lr=1e-2)
    _step(m, opt)
    m["emb"].weight.data = torch.randn(12, 4)
    _step(m, opt, emb=False)
    with pytest.raises(ValueError, match=r"is \(12, 4\) but its state was made for \(10, 4\).*Nothing was saved"):
        opt.state_dict()
