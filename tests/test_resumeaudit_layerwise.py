"""Resume audit of layerwise mode (``LayerwiseOptimizer``) through its own ``state_dict`` / ``load_state_dict``,
where a user's loop checkpoints (the Trainer only saves after ``step()``):

* a checkpoint taken **inside an accumulation window** (after some of the window's backward passes): the projected
  parameters' subspace accumulators (``r x n``, held by the optimizer, not in ``.grad``) and the micro-batch counts
  travel in the checkpoint, so weights + ``.grad`` + optimizer state resume the window bit for bit;
* a checkpoint **loaded into an optimizer that is inside a window** (a loop that caught an error mid-window and
  rolls back to the last checkpoint): the window in progress is dropped, not added to the next step's gradient.

Compared: every weight and optimizer state tensor with ``torch.equal`` (CPU, one thread, same kernels)."""

from __future__ import annotations

import io

import pytest
import torch

from lowmem.kit import build_tiny_model
from lowmem.optim.layerwise import LayerwiseOptimizer

GALORE = dict(name="galore_adamw", lr=1e-2, rank=4, update_proj_gap=2)


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 12), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def batches():
    return _batches(12)


def _model():
    torch.manual_seed(0)
    return build_tiny_model(0)[0]


def _backward(model, ids):
    model(input_ids=ids, labels=ids).loss.backward()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_same(ma, oa, mb, ob):
    ref = dict(ma.named_parameters())
    for k, p in mb.named_parameters():
        assert torch.equal(p, ref[k]), f"{k}: max |d| = {(p - ref[k]).abs().max().item():.3g}"
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


@pytest.mark.parametrize("hp", [GALORE, dict(name="adamw", lr=1e-2)], ids=["galore_adamw", "adamw"])
def test_a_checkpoint_inside_an_accumulation_window_resumes_the_window(batches, hp):
    acc = 3
    full = _model()
    opt = LayerwiseOptimizer(full, accumulation_steps=acc, max_grad_norm=1.0, clip_mode="global_prev", **hp)
    it = iter(batches)
    for _ in range(acc):  # one whole step (the refresh at step 1)
        _backward(full, next(it))
    opt.step()
    _backward(full, next(it))  # the next window's first micro-batch (a refresh is due at step 3: its basis now)
    ckpt = _roundtrip({"model": full.state_dict(), "optim": opt.state_dict(),
                       "grads": {n: p.grad for n, p in full.named_parameters() if p.grad is not None}})
    rest = list(it)[:acc - 1 + acc]  # the window's other micro-batches, then one more whole step
    for k, ids in enumerate(rest):
        _backward(full, ids)
        if k in (acc - 2, 2 * acc - 2):
            opt.step()

    resumed = _model()
    resumed.load_state_dict(ckpt["model"])
    for n, p in resumed.named_parameters():
        if n in ckpt["grads"]:
            p.grad = ckpt["grads"][n].clone()
    ropt = LayerwiseOptimizer(resumed, accumulation_steps=acc, max_grad_norm=1.0, clip_mode="global_prev", **hp)
    ropt.load_state_dict(ckpt["optim"])
    for k, ids in enumerate(rest):
        _backward(resumed, ids)
        if k in (acc - 2, 2 * acc - 2):
            ropt.step()
    _assert_same(full, opt, resumed, ropt)


@pytest.mark.parametrize("hp", [GALORE, dict(name="adamw", lr=1e-2)], ids=["galore_adamw", "adamw"])
def test_loading_into_an_optimizer_inside_a_window_drops_that_window(batches, hp):
    acc = 2
    model = _model()
    opt = LayerwiseOptimizer(model, accumulation_steps=acc, **hp)
    for ids in batches[:acc]:
        _backward(model, ids)
    opt.step()
    ckpt = _roundtrip({"model": model.state_dict(), "optim": opt.state_dict()})
    _backward(model, batches[acc])  # a window begins ... and the loop rolls back to the checkpoint
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    opt.zero_grad()
    for k, ids in enumerate(batches[acc + 1: acc + 1 + 2 * acc]):
        _backward(model, ids)
        if k % acc == acc - 1:
            opt.step()

    fresh = _model()
    fresh.load_state_dict(ckpt["model"])
    fopt = LayerwiseOptimizer(fresh, accumulation_steps=acc, **hp)
    fopt.load_state_dict(ckpt["optim"])
    for k, ids in enumerate(batches[acc + 1: acc + 1 + 2 * acc]):
        _backward(fresh, ids)
        if k % acc == acc - 1:
            fopt.step()
    _assert_same(fresh, fopt, model, opt)


def test_a_layerwise_checkpoint_of_another_parameter_count_is_refused_and_changes_nothing(batches):
    model = _model()
    opt = LayerwiseOptimizer([p for p in model.parameters()], accumulation_steps=2, **GALORE)
    for ids in batches[:3]:  # a step, and a window begun
        _backward(model, ids)
        if ids is batches[1]:
            opt.step()
    sd = _roundtrip(opt.state_dict())
    target = _model()
    topt = LayerwiseOptimizer([p for n, p in target.named_parameters() if "layers.1." not in n], accumulation_steps=2,
                              **GALORE)
    for ids in batches[:3]:
        _backward(target, ids)
        if ids is batches[1]:
            topt.step()
    before = _roundtrip(topt.state_dict())
    n_saved, n_here = sd["layerwise"]["micro"].numel(), before["layerwise"]["micro"].numel()
    with pytest.raises(ValueError, match=rf"window counts {n_saved} parameters, this optimizer has {n_here}"):
        topt.load_state_dict(sd)
    after = topt.state_dict()
    assert torch.equal(after["layerwise"]["micro"], before["layerwise"]["micro"])
    assert after["layerwise"]["low"].keys() == before["layerwise"]["low"].keys()
    assert all(torch.equal(after["layerwise"]["low"][k], before["layerwise"]["low"][k]) for k in before["layerwise"]["low"])
    for i, st in before["state"].items():
        assert all(torch.equal(after["state"][i][k], v) for k, v in st.items())
