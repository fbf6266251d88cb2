"""SM3's multi-tensor step on bfloat16 state (``state_dtype="bfloat16"`` of float32 parameters): the accumulators
and the momentum read in float32, the momentum updated in a float32 copy, everything rounded into the state as the
per-parameter step rounds it, so the buckets equal the per-parameter step bit for bit, and their transient is counted
exactly (``Sm3Moments._group_bytes``: the bfloat16 stacks, the float32 maxima of a wide dimension above them).

The engine's ``_foreach_ok`` buckets float32 state only (``state_dtype(group, p) == torch.float32``, every rule):
until it lets a rule name bfloat16 (FOUND_SMALLS16 3), the engine-level tests open that one gate in-process
(:func:`_gate_open`); the rule-level test needs no engine."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.recipes.sm3 import Sm3Moments

BUCKET = [(16, 24)] * 4 + [(24,)] * 3 + [(3, 8, 10)] * 2 + [(), (40, 300)]
STACKS = [(16, 24)] * 8 + [(24,)] * 3 + [(3, 8, 10)] * 2 + [()]
WIDE = [(4, 300)] * 3  # a dimension's float32 maxima (4 k 300) above the bfloat16 accumulators' stack (2 k 304)


def _grads(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (1 + 3 * (t % 3)) for t in range(steps)]


def _state(shape, group, seed):
    st: dict = {}
    Sm3Moments().init_state(st, torch.Size(shape), group, torch.empty(shape))
    gen = torch.Generator().manual_seed(seed)
    for k, v in st.items():  # (a state as after some steps: accumulators >= 0, a momentum of either sign)
        v.copy_((torch.rand(v.shape, generator=gen) * 4) if k != "momentum" else torch.randn(v.shape, generator=gen))
    return st


@pytest.mark.parametrize("momentum, beta2", [(0.0, 1.0), (0.9, 1.0), (0.9, 0.99)])
@pytest.mark.parametrize("shape, k", [((16, 24), 4), ((3, 8, 10), 2), ((24,), 3), ((), 2), ((16, 24), 1)])
def test_stacked_direction_on_bfloat16_state_is_the_per_parameter_one(shape, k, momentum, beta2):
    group = {"momentum": momentum, "beta2": beta2, "eps": 1e-30, "state_dtype": "bfloat16"}
    for step in range(3):
        grads = [g for i in range(k) for g in _grads(shape, 1, 100 * step + i)]
        if step == 0:
            stacked = [_state(shape, group, i) for i in range(k)]
            alone = [{n: v.clone() for n, v in st.items()} for st in stacked]
            assert all(v.dtype == torch.bfloat16 for st in stacked for v in st.values())
        d = Sm3Moments._group_direction(grads, stacked, group)
        for i, (g, st) in enumerate(zip(grads, alone)):
            rows = (0, shape[0]) if len(shape) >= 2 else None
            want = Sm3Moments._block(g, st, group, g.shape, rows, None).view(g.shape)
            assert torch.equal(d[i], want), (step, i)
            assert all(torch.equal(stacked[i][n], st[n]) and stacked[i][n].dtype == torch.bfloat16 for n in st)


def _gate_open(monkeypatch):
    """The engine's bucket gate with bfloat16 state admitted (what FOUND_SMALLS16 3 proposes for engine.py):
    engine.state_dtype is read by _foreach_ok (the gate) and, for float64 parameters only, _casts_float64_grad."""
    import lowmem.optim.engine as engine

    real = engine.state_dtype
    monkeypatch.setattr(engine, "state_dtype",
                        lambda group, p: torch.float32 if real(group, p) == torch.bfloat16 else real(group, p))


def _run(foreach, momentum, shapes=BUCKET, steps=6):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = create_optimizer(ps, "sm3", lr=1e-2, momentum=momentum, weight_decay=0.1, foreach=foreach,
                           state_dtype="bfloat16")
    opt.chunk_numel = 4096
    grads = [_grads(s, steps, 30 + i) for i, s in enumerate(shapes)]
    for t in range(steps):
        for p, gs in zip(ps, grads):
            p.grad = gs[t]
        opt.step()
    return ps, opt


def _counting(monkeypatch):
    calls: list[int] = []
    orig = Sm3Moments._group_direction
    monkeypatch.setattr(Sm3Moments, "_group_direction",
                        staticmethod(lambda g, s, grp: calls.append(len(g)) or orig(g, s, grp)))
    return calls


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_bfloat16_state_buckets_equal_the_per_parameter_step(monkeypatch, momentum):
    _gate_open(monkeypatch)
    calls = _counting(monkeypatch)
    ps, opt = _run(None, momentum)
    assert max(calls) >= 4  # (the four 16 x 24 matrices stacked)
    calls.clear()
    qs, ref = _run(False, momentum)
    assert not calls
    for p, q in zip(ps, qs):
        assert torch.equal(p, q), p.shape
        assert all(torch.equal(opt.state[p][k], ref.state[q][k]) and opt.state[p][k].dtype == ref.state[q][k].dtype
                   for k in ref.state[q]), p.shape
    assert opt.state[ps[0]]["acc_0"].dtype == torch.bfloat16


@pytest.mark.parametrize("shapes", [STACKS, BUCKET, WIDE], ids=["stacks", "with-pieces", "wide"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_bfloat16_state_buckets_allocate_what_they_report(monkeypatch, momentum, shapes):
    from test_transient_per_parameter import _Traced

    _gate_open(monkeypatch)
    calls = _counting(monkeypatch)
    ps, opt = _run(None, momentum, shapes=shapes, steps=2)
    assert max(calls) >= 3
    for i, p in enumerate(ps):
        p.grad = _grads(shapes[i], 1, 90 + i)[0]
    with _Traced() as t:
        opt.step()
    assert t.peak == opt.step_transient_bytes() > 0


def test_the_engine_buckets_bfloat16_sm3_state(monkeypatch):
    calls = _counting(monkeypatch)
    _run(None, 0.9, steps=1)
    assert calls
