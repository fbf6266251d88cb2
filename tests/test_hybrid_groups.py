"""The normalized hybrids' target key (use_muon, use_sinkgd, scale_role) on parameter groups: the classes
(Muon, SinkGD, Scale) and create_optimizer give groups the same keys and step the same (issue 12 item 4 of the
ninth session: no warning nobody reads)."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim.registry import create_optimizer

HYBRIDS = [("muon", "Muon", "use_muon", True), ("sinkgd", "SinkGD", "use_sinkgd", True),
           ("scale", "Scale", "scale_role", "hidden")]


def _groups(ws, marked=None):
    first = {"params": ws[:2], "lr": 2e-2}
    if marked is not None:
        first[marked[0]] = marked[1]
    return [first, {"params": ws[2:], "weight_decay": 0.0}]


def _stepped(make, shapes=((8, 12), (12, 8), (8, 8), (8,))):
    gen = torch.Generator().manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = make(ws)
    for _ in range(3):
        for w in ws:
            w.grad = torch.randn(w.shape, generator=gen)
        opt.step()
    return opt, [w.detach().clone() for w in ws]


@pytest.mark.parametrize("name,cls,key,default", HYBRIDS)
def test_hybrid_class_applies_the_default_like_create_optimizer(name, cls, key, default):
    """Groups none of which carries the target key: Muon(...) / SinkGD(...) / Scale(...) give each the documented
    default, as create_optimizer does (it warned 'no parameter group has use_muon=...' and trained every parameter
    with AdamW, while create_optimizer targeted them): the same groups and the same steps, without a warning.
    When a group sets the key, the groups without it take AdamW on both paths."""
    import warnings

    import lowmem.optim as O

    for marked in (None, (key, default)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            a, wa = _stepped(lambda ws: getattr(O, cls)(_groups(ws, marked), lr=1e-2))
            b, wb = _stepped(lambda ws: create_optimizer(_groups(ws, marked), name, lr=1e-2))
        assert [g.get(key) for g in a.param_groups] == [g.get(key) for g in b.param_groups]
        expect = [default, default] if marked is None else [default, None]
        assert [g.get(key) for g in a.param_groups] == expect
        for x, y in zip(wa, wb):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        # the second group's 2-D weight: the normalized rule (no AdamW moments) only when it carries the key
        assert ("exp_avg" in a.state[a.param_groups[1]["params"][0]]) == (marked is not None)
