"""The normalized hybrids' targets on the foreach path (issue 15): Muon's weights of one shape stacked
and orthogonalised by a batched Newton-Schulz iteration (functional.muon.muon_foreach_), SinkGD's
scalings of a stack, SCALE's row normalisation of a stack; each equal, bit for bit on the CPU, to the
per-parameter step (``foreach=False``) with the same ``chunk_numel``. A weight larger than
``chunk_numel`` reaches the buckets in pieces and takes the per-parameter (lean, row-block) step from
its first piece; vectors take AdamW's bucket; a bfloat16 model its bfloat16 buckets (tests/test_bf16_buckets_matrix.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.optim.functional import muon as M
from lowmem.optim.registry import create_optimizer

# same-shape groups (q/k/v/o-like 16 x 16, MLP-like 24 x 40 and its transpose), a vector, a 3-D tensor,
# a 4 x 30 weight (below SinkGD's foreach_min_side) and a 48 x 40 weight (1920 elements: in pieces at
# chunk_numel=1024)
SHAPES = [(16, 16), (16, 16), (16, 16), (16, 16), (24, 40), (24, 40), (40, 24), (40, 24), (16,), (2, 3, 4), (4, 30),
          (48, 40)]


def _run(name, foreach, chunk_numel, hp, spy=None, steps=4, dtype=torch.float32, shapes=SHAPES):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = create_optimizer(ps, name, foreach=foreach, **hp)
    opt.chunk_numel = chunk_numel
    for step in range(steps):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=gen) * (1 + step % 3)).to(dtype)
            if step == 2 and p.dim() == 2 and p.shape[0] == 24:
                p.grad.zero_()  # a zero gradient (the norm's floor)
        opt.step()
    return ps, opt


def _assert_equal(name, foreach, hp, chunk_numel, **kw):
    """The targets bit for bit (weights and state); the AdamW parameters at rtol 1e-6 (AdamW's own
    foreach step: addcdiv against div and add)."""
    ref, ref_opt = _run(name, False, chunk_numel, hp, **kw)
    got, got_opt = _run(name, foreach, chunk_numel, hp, **kw)
    for a, b in zip(ref, got):
        if "exp_avg" in ref_opt.state[a]:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
            continue
        assert torch.equal(a, b), (name, tuple(a.shape), (a - b).abs().max().item())
        for k, v in ref_opt.state[a].items():
            assert torch.equal(got_opt.state[b][k], v), (name, tuple(a.shape), k)
    return ref, got


# ---- Muon -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 8), (16, 24), (24, 16), (64, 64), (3, 300), (300, 3)])
@pytest.mark.parametrize("steps", [5, 1])
def test_newton_schulz_batched_equals_newton_schulz(shape, steps):
    """Each matrix of the stack (one scaled by 1e-3, one zero: the floor) equals newton_schulz of it."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(5, *shape, generator=gen)
    u[1] *= 1e-3
    u[3] = 0
    rows = M.ns_shape(shape)
    x = torch.stack([ui.T if shape[0] > shape[1] else ui for ui in u]).to(torch.bfloat16).contiguous()
    assert x.shape[1:] == rows
    out = M.newton_schulz_batched(x, M.NS_COEFFICIENTS, steps, 1e-7)
    for i in range(5):
        ref = M.newton_schulz(u[i], M.NS_COEFFICIENTS, steps, 1e-7)
        assert torch.equal(out[i].T if shape[0] > shape[1] else out[i], ref), i


def test_newton_schulz_batched_refuses_a_tall_stack():
    with pytest.raises(ValueError, match="rows <= cols"):
        M.newton_schulz_batched(torch.zeros(2, 5, 3, dtype=torch.bfloat16), M.NS_COEFFICIENTS, 5, 1e-7)


MUON_CONFIGS = {
    "defaults": {"lr": 2e-2},
    "plain-momentum": {"lr": 2e-2, "nesterov": False, "momentum": 0.9, "weight_decay": 0.0},
    "original": {"lr": 2e-2, "adjust_lr_fn": "original", "ns_steps": 3, "ns_coefficients": (3.0, -3.2, 1.2)},
}


@pytest.mark.parametrize("chunk_numel", [None, 1024])
@pytest.mark.parametrize("config", sorted(MUON_CONFIGS))
def test_muon_foreach_equals_the_per_parameter_step(config, chunk_numel, monkeypatch):
    """4 steps (a zero gradient at step 3): weights and momentum buffers bit for bit; the stacks are
    the same-shape weights (4 of 16 x 16, 2 of 24 x 40, 2 of 40 x 24), the 48 x 40 weight is stepped
    whole from its first piece at chunk_numel=1024 (in the bucket otherwise)."""
    stacks = []
    orig = M.muon_foreach_

    def spy(params, *args, **kwargs):
        stacks.append((len(params), tuple(params[0].shape)))
        return orig(params, *args, **kwargs)

    from lowmem.optim.recipes import normalized

    monkeypatch.setattr(normalized, "muon_foreach_", spy)
    ref, got = _assert_equal("muon", None, MUON_CONFIGS[config], chunk_numel)
    assert (ref[0] - _run("muon", False, chunk_numel, MUON_CONFIGS[config], steps=0)[0][0]).abs().max() > 1e-3
    # 4 steps; the buckets (at most 1024 elements at chunk_numel=1024) split the same-shape weights
    per_step = sorted(stacks[: len(stacks) // 4])
    if chunk_numel is None:
        # (the 3-D tensor's two 3 x 4 matrices stacked as two Muon weights: tests/test_muon_batched.py)
        assert per_step == [(1, (4, 30)), (1, (48, 40)), (2, (3, 4)), (2, (24, 40)), (2, (40, 24)), (4, (16, 16))]
    else:
        assert all(k * math.prod(s) <= 1024 for k, s in per_step) and sum(k for k, _ in per_step) == 11
        assert (4, (16, 16)) in per_step and (48, 40) not in [s for _, s in per_step]


def test_muon_foreach_off_stays_per_parameter_and_bf16_stacks_on_copies(monkeypatch):
    """foreach=False never calls the stacked step; a bfloat16 model takes the bfloat16 buckets (MATRIXBF16: the
    stack of its weights' gradients' float32 copies, ``muon_foreach_iterate``, not the float32 ``muon_foreach_``), and
    its result is the same with foreach on and off (bit for bit: tests/test_bf16_buckets_matrix.py)."""
    from lowmem.optim.recipes import normalized

    calls, stacked = [], []
    monkeypatch.setattr(normalized, "muon_foreach_", lambda *a, **k: calls.append(1))
    iterate = normalized.muon_foreach_iterate
    monkeypatch.setattr(normalized, "muon_foreach_iterate", lambda g, *a, **k: (stacked.append(len(g)), iterate(g, *a, **k))[1])
    _run("muon", False, 1024, MUON_CONFIGS["defaults"], steps=1)
    assert stacked == []
    _assert_equal("muon", None, MUON_CONFIGS["defaults"], 1024, dtype=torch.bfloat16)
    assert calls == [] and max(stacked) == 4  # (the four 16 x 16 weights of a step stacked)


def test_muon_bucket_transient_is_reported():
    """A bucket of Muon weights reports the stack's bound (6 bytes/element and the products' workspace)."""
    ps = [torch.nn.Parameter(torch.zeros(64, 64, device="meta")) for _ in range(8)]
    opt = create_optimizer(ps, "muon")
    opt.materialize_state()
    numel = 8 * 64 * 64
    assert opt.step_transient_bytes() == M.muon_foreach_transient_bytes(numel, torch.get_num_threads())
    assert opt.step_transient_bytes() >= 6 * numel


# ---- SinkGD and SCALE -------------------------------------------------------------------------------


def _spy(monkeypatch, name):
    from lowmem.optim.recipes import normalized

    stacks, orig = [], getattr(normalized, name)

    def spy(params, *args, **kwargs):
        stacks.append((len(params), tuple(params[0].shape)))
        return orig(params, *args, **kwargs)

    monkeypatch.setattr(normalized, name, spy)
    return stacks


def test_sinkhorn_scalings_stacked_equal_sinkhorn_scalings():
    """Each matrix's (r, c) equal sinkhorn_scalings of it in one block of rows (a zero row and a zero
    matrix included: their scalings are 0)."""
    from lowmem.optim.functional.sinkgd import sinkhorn_scalings, sinkhorn_scalings_stacked

    g = torch.randn(4, 12, 20, generator=torch.Generator().manual_seed(0))
    g[1, 3] = 0
    g[2] = 0
    r, c = sinkhorn_scalings_stacked(g.square(), 5)
    for i in range(4):
        ri, ci = sinkhorn_scalings(lambda a, b, gi=g[i]: gi[a:b], [(0, 12)], 12, 20, 5)
        assert torch.equal(r[i], ri) and torch.equal(c[i], ci), i


SINKGD_CONFIGS = {"defaults": {"lr": 1e-2, "scale": 0.5},
                  "decay-2-iters": {"lr": 1e-2, "scale": 0.5, "weight_decay": 0.1, "sinkhorn_iters": 2}}


@pytest.mark.parametrize("config", sorted(SINKGD_CONFIGS))
def test_sinkgd_foreach_equals_the_chunked_per_parameter_step(config, monkeypatch):
    """chunk_numel=1024: weights bit for bit; 16 x 16 stacked by 4 (4 x 30, below foreach_min_side,
    and 48 x 40, in pieces, per parameter)."""
    stacks = _spy(monkeypatch, "sinkgd_foreach_")
    ref, _ = _assert_equal("sinkgd", None, SINKGD_CONFIGS[config], 1024)
    assert (4, (16, 16)) in stacks and all(s not in ((4, 30), (48, 40)) for _, s in stacks)
    assert (ref[0] - _run("sinkgd", False, 1024, SINKGD_CONFIGS[config], steps=0)[0][0]).abs().max() > 1e-3


def test_sinkgd_foreach_whole_tensor_reference_up_to_rounding():
    """chunk_numel=None: the per-parameter step is sr_sinkhorn (whole), the foreach one the scalings
    (as the chunked step): equal up to float32 rounding (measured max abs 2.4e-7 on weights up to 4.1,
    as between the chunked and the whole per-parameter steps)."""
    ref, _ = _run("sinkgd", False, None, SINKGD_CONFIGS["defaults"])
    got, _ = _run("sinkgd", None, None, SINKGD_CONFIGS["defaults"])
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


SCALE_CONFIGS = {"hidden": {"lr": 1e-2}, "head": {"lr": 1e-2, "scale_role": "head", "momentum": 0.8, "weight_decay": 0.1}}


@pytest.mark.parametrize("chunk_numel", [None, 1024])
@pytest.mark.parametrize("config", sorted(SCALE_CONFIGS))
def test_scale_foreach_equals_the_per_parameter_step(config, chunk_numel, monkeypatch):
    """Weights (and the head's momentum buffers) bit for bit; the 3-D tensor (a target, normalised
    whole) and the 48 x 40 weight at chunk_numel=1024 (in pieces) are stepped per parameter."""
    stacks = _spy(monkeypatch, "scale_rows_foreach_")
    ref, _ = _assert_equal("scale", None, SCALE_CONFIGS[config], chunk_numel)
    assert (4, (16, 16)) in stacks and all(len(s) == 2 for _, s in stacks)
    assert ((48, 40) in [s for _, s in stacks]) == (chunk_numel is None)
    assert (ref[0] - _run("scale", False, chunk_numel, SCALE_CONFIGS[config], steps=0)[0][0]).abs().max() > 1e-3


def test_scale_embedding_stays_per_parameter(monkeypatch):
    stacks = _spy(monkeypatch, "scale_rows_foreach_")
    _assert_equal("scale", None, {"lr": 1e-2, "scale_role": "embedding"}, 1024)
    assert stacks == []


@pytest.mark.parametrize("name,config", [("muon", MUON_CONFIGS["defaults"]), ("sinkgd", SINKGD_CONFIGS["defaults"]),
                                         ("scale", SCALE_CONFIGS["head"])])
def test_foreach_equal_with_two_threads(name, config):
    """Two CPU threads on matrices above torch's grain size (32768 elements: reductions and products
    may split): still bit for bit (also measured on q/k/v/o 256 x 256, gate/up 128 x 688, down
    688 x 128 at chunk_numel 2^19 and 2^17)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _assert_equal(name, None, config, 2**19, shapes=[(192, 192), (192, 192), (96, 400), (96, 400), (64,)], steps=2)
    finally:
        torch.set_num_threads(prev)


# ---- the stacked step's transient, measured in a fresh process ---------------------------------------

_MEASURE = r"""
import gc, json, sys, torch
from lowmem.optim.registry import create_optimizer
from lowmem.optim.step_memory import _reset_peak, _status_kib
out = {}
for label, name, hp in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    warm = [torch.nn.Parameter(torch.randn(32, 48)) for _ in range(2)]
    wopt = create_optimizer(warm, name, **hp)
    for _ in range(2):
        for w in warm:
            w.grad = torch.randn_like(w)
        wopt.step()
    del wopt, warm
    ps = [torch.nn.Parameter(torch.randn(256, 256)) for _ in range(8)]  # 2^19 elements: one bucket
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = create_optimizer(ps, name, **hp)
    opt.step()
    reported = opt.step_transient_bytes()
    gc.collect()
    _reset_peak()
    base = _status_kib("VmRSS")
    opt.step()
    out[label] = [(_status_kib("VmHWM") - base) * 1024, reported]
    del opt, ps
    gc.collect()
print(json.dumps(out))
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_stacked_step_transient_is_bounded_by_the_report():
    """8 weights of 256 x 256 (one bucket of 2^19 elements, one stack), a second step after the first:
    the peak RSS growth stays under step_transient_bytes() (+1 MiB) and the report within 2x + 4 MiB
    of it (measured under load 8-10: muon 3.9 MiB of 6.0 reported, 4.0 without Nesterov, sinkgd 1.9 of 3.5,
    scale head 1.9 of 2.1)."""
    import json
    import os
    import subprocess
    import sys

    from lowmem.optim.step_memory import LIVE_ENV

    specs = [["muon", "muon", {}], ["muon_no_nesterov", "muon", {"nesterov": False}], ["sinkgd", "sinkgd", {}],
             ["scale_head", "scale", {"scale_role": "head"}]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **LIVE_ENV}
    res = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(specs)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    MiB = 2**20
    for name, (grown, reported) in json.loads(res.stdout.strip().splitlines()[-1]).items():
        assert grown <= 1.1 * reported + MiB, (name, grown / MiB, reported / MiB)
        assert reported <= 2 * grown + 4 * MiB, (name, grown / MiB, reported / MiB)
