"""AUDMATH21 1: a 4-D convolution kernel ``[out, in, kh, kw]`` in a ``use_muon`` group (``Muon(model.parameters())``
on a CNN: a flat list is one targeted group) is one linear map of ``in kh kw`` inputs, and Keller Jordan's muon.py
orthogonalises it as the matrix ``[out, in kh kw]`` (``muon_update``: ``if update.ndim == 4: update =
update.view(len(update), -1)``). lowmem stepped it as ``out * in`` separate ``kh x kw`` matrices; now every path
steps it as that one matrix (its momentum buffer keeps the kernel's shape, so a checkpoint of either loads), the
step size from the matrix's rows and columns. NorMuon likewise, one second moment per output channel (the paper's
neuron-wise rule on that matrix; pytorch_optimizer's ``[size(0), 1]``; the authors' code normalises the 4-D
tensor's ``kw``-rows instead: docs/optimizers.md). Tensors of 5 or more dimensions are refused in a ``use_muon``
group (no reference reading).

Each test compares the kernel with a 2-D parameter ``[out, in kh kw]`` stepped on the same path, bit for bit, or
with Keller Jordan's code written out in tests/test_audit21_math.py."""

from __future__ import annotations

import math

import pytest
import torch
from test_audit21_math import _kj_zeropower
from test_nonfinite_check_bytes import _AllLive
from torch import nn

from lowmem.optim import create_optimizer
from lowmem.optim.recipes.normalized import Muon
from lowmem.optim.recipes.normuon import NorMuon

KERNELS = [(8, 4, 3, 3), (40, 2, 2, 2), (6, 3, 1, 3)]  # a wide 8 x 36, a tall 40 x 8, a non-square kernel 6 x 9
IDS = ["wide", "tall", "1x3"]


def _mat(shape):
    return (shape[0], math.prod(shape[1:]))


def _grads(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (1.0 if t != 2 else 0.0) for t in range(steps)]


def _kj_run(w, grads, lr, own_ratio):
    """Keller Jordan's SingleDeviceMuon step (nesterov, momentum 0.95, no decay) on a conv kernel, line for line:
    ``update.view(len(update), -1)`` before the iteration; the ratio ``max(1, grad.size(-2) / grad.size(-1)) ** 0.5``
    of the 4-D gradient (``own_ratio=True``), or of the 2-D view, lowmem's (``False``)."""
    p, buf = w.clone(), torch.zeros_like(w)
    for g in grads:
        g = g.clone()
        buf.lerp_(g, 1 - 0.95)
        update = g.lerp_(buf, 0.95).view(len(g), -1)
        update = _kj_zeropower(update)
        ratio = g.size(-2) / g.size(-1) if own_ratio else update.size(-2) / update.size(-1)
        update = update * max(1, ratio) ** 0.5
        p.add_(update.reshape(p.shape), alpha=-lr)
    return p


def _lowmem(shape, grads, lr, **kw):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    p = nn.Parameter(w.clone())
    opt = Muon([p], lr=lr, weight_decay=0.0, adjust_lr_fn="original", **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return w, p.detach(), opt


@pytest.mark.parametrize("shape", KERNELS, ids=IDS)
def test_a_kernel_steps_as_keller_jordans_matrix(shape):
    """3 steps (a zero gradient among them), lr 0.02: lowmem's Muon on the kernel (its default path) is Keller Jordan's
    with the ratio of the 2-D view, within 1% of the movement (the fused bfloat16 products, test_audit21_math);
    measured 0.0 on all three."""
    grads = _grads(shape, 3, 1)
    w, ours, _ = _lowmem(shape, grads, 0.02)
    ref = _kj_run(w, grads, 0.02, own_ratio=False)
    moved = (ref - w).abs().max().item()
    assert moved > 0
    assert (ours - ref).abs().max().item() <= 0.01 * moved


@pytest.mark.parametrize("shape,kj_over_lowmem", [((8, 4, 3, 3), 1.0), ((40, 2, 2, 2), 1 / math.sqrt(5)),
                                                  ((6, 3, 3, 1), math.sqrt(3))], ids=["square", "tall", "3x1"])
def test_keller_jordans_own_ratio_reads_the_4d_shape(shape, kj_over_lowmem):
    """The one documented difference: Keller Jordan's ratio is ``sqrt(max(1, kh / kw))`` of the 4-D gradient, lowmem's
    ``sqrt(max(1, out / (in kh kw)))`` of the matrix it orthogonalises. Equal for a square kernel with ``out <= in kh
    kw`` (most hidden convolutions); a 40 x 2 x 2 x 2 kernel moves sqrt(5) times more in lowmem, a 6 x 3 x 3 x 1 one
    sqrt(3) times less. Without decay the iterates are the same (up to the fused bfloat16 products' roundings, as
    above), so the movements differ by that factor: within 1% of the movement (measured 0.0 square and tall, 0.2% on
    the 3 x 1 kernel)."""
    grads = _grads(shape, 3, 2)
    w, ours, _ = _lowmem(shape, grads, 0.02)
    kj = _kj_run(w, grads, 0.02, own_ratio=True)
    moved = (kj - w).abs().max().item()
    assert ((kj - w) - (ours - w) * kj_over_lowmem).abs().max().item() <= 0.01 * moved


PATHS = {"whole": (None, False), "whole-buckets": (None, True), "rows": (72, False), "rows-buckets": (72, True),
         "one-chunk": (2**19, False), "one-chunk-buckets": (2**19, True)}


def _run(name, params, grads, chunk, foreach, steps, **kw):
    opt = create_optimizer(params, name, lr=2e-2, foreach=foreach, **kw)
    opt.chunk_numel = chunk
    for t in range(steps):
        for p, g in zip(params, grads):
            p.grad = g[t].clone()
        opt.step()
    return opt


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", ["muon", "normuon"])
@pytest.mark.parametrize("shape", KERNELS, ids=IDS)
def test_every_path_steps_the_kernel_as_its_matrix(shape, name, path, layout):
    """Two kernels of one shape (so the buckets stack them) vs two ``[out, in kh kw]`` parameters, the same gradients
    (a zero one included), 4 steps, on the same path: weights, momentum (and NorMuon's ``v``) bit for bit; the
    momentum buffer has the kernel's shape, NorMuon's ``v`` one number per output channel. channels_last kernels and
    gradients (stepped whole, or in the buckets through views of the stack in their own layout) too."""
    chunk, foreach = PATHS[path]
    steps = 4
    starts = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    grads = [_grads(shape, steps, s) for s in (3, 4)]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    kernels = [nn.Parameter(w.clone().contiguous(memory_format=fmt)) for w in starts]
    opt_k = _run(name, kernels, [[g.contiguous(memory_format=fmt) for g in gs] for gs in grads], chunk, foreach, steps)
    mats = [nn.Parameter(w.reshape(_mat(shape)).clone()) for w in starts]
    opt_m = _run(name, mats, [[g.reshape(_mat(shape)) for g in gs] for gs in grads], chunk, foreach, steps)
    for k, m, w in zip(kernels, mats, starts):
        assert not torch.equal(k.detach(), w)
        assert torch.equal(k.detach().reshape(_mat(shape)), m.detach()), (path, layout)
        sk, sm = opt_k.state[k], opt_m.state[m]
        assert sk["momentum_buffer"].shape == shape
        assert torch.equal(sk["momentum_buffer"].reshape(_mat(shape)), sm["momentum_buffer"])
        if name == "normuon":
            assert sk["second_momentum_buffer"].shape == (shape[0],)
            assert torch.equal(sk["second_momentum_buffer"], sm["second_momentum_buffer"])


@pytest.mark.parametrize("name", ["muon", "normuon"])
def test_a_bfloat16_kernel_steps_as_its_matrix(name):
    """A bfloat16 kernel is stepped by the per-parameter step (the bfloat16 buckets take 2-D weights and batches
    ``[E, A, B]``); equal bit for bit to a bfloat16 ``[out, in kh kw]`` parameter stepped per parameter."""
    shape = (8, 4, 3, 3)
    w = torch.randn(shape).bfloat16()
    grads = [[g.bfloat16() for g in _grads(shape, 3, 5)]]
    k = nn.Parameter(w.clone())
    m = nn.Parameter(w.reshape(_mat(shape)).clone())
    opt_k = _run(name, [k], grads, 72, None, 3)
    _run(name, [m], [[g.reshape(_mat(shape)) for g in grads[0]]], 72, False, 3)
    assert torch.equal(k.detach().reshape(_mat(shape)), m.detach())
    assert opt_k.state[k]["momentum_buffer"].shape == shape


@pytest.mark.parametrize("name", ["muon", "normuon"])
@pytest.mark.parametrize("chunk,foreach", [(72, False), (144, False), (None, False), (None, True), (2**19, True)],
                         ids=["rows", "two-rows", "whole", "whole-buckets", "buckets"])
def test_state_and_step_transient_of_a_kernel_are_its_matrixs(name, chunk, foreach):
    """state_bytes() and step_transient_bytes() of a kernel are those of its ``[out, in kh kw]`` matrix on every path,
    and in row blocks (the lean step, the engine's default) the report equals the traced tensors of the step exactly
    (the bfloat16 products' workspace, not a tensor, set to 0), as a 2-D weight's (test_muon_batched,
    test_normuon_engine)."""
    from lowmem.optim.functional.muon import bf16_workspace_left_out

    shape = (8, 4, 3, 3)

    def build(s):
        p = nn.Parameter(torch.randn(s))
        opt = create_optimizer([p], name, lr=1e-2, foreach=foreach)
        opt.chunk_numel, opt.skip_nonfinite = chunk, False
        for _ in range(2):  # (the second step: the state exists)
            p.grad = torch.randn(s)
            with _AllLive() as t:
                opt.step()
        return opt, t.peak

    opt_k, traced_k = build(shape)
    opt_m, traced_m = build(_mat(shape))
    with bf16_workspace_left_out():
        reported = opt_k.step_transient_bytes()
    assert opt_k.state_bytes() == opt_m.state_bytes() == sum(
        v.numel() * v.element_size() for v in opt_k.state[opt_k.param_groups[0]["params"][0]].values())
    assert opt_k.step_transient_bytes() == opt_m.step_transient_bytes()
    assert traced_k == traced_m
    if chunk in (72, 144):
        assert reported == traced_k


@pytest.mark.parametrize("name", ["muon", "normuon"])
def test_a_checkpoint_of_a_kernel_resumes(name):
    """state_dict() after 2 steps -> a new optimizer -> 2 more steps == 4 steps in one run, bit for bit. The Muon state
    is the one saved before AUDMATH21 1 (``momentum_buffer`` of the kernel's shape and ``step``), so such a checkpoint
    loads; a NorMuon checkpoint of that time holds ``v`` per row of each ``kh x kw`` kernel (``[out, in, kh]``), which
    the load refuses by its shape instead of stepping it."""
    shape = (8, 4, 3, 3)
    w = torch.randn(shape)
    grads = _grads(shape, 4, 6)

    def fresh():
        p = nn.Parameter(w.clone())
        return p, create_optimizer([p], name, lr=2e-2)

    p1, o1 = fresh()
    for g in grads:
        p1.grad = g.clone()
        o1.step()
    p2, o2 = fresh()
    for g in grads[:2]:
        p2.grad = g.clone()
        o2.step()
    saved = o2.state_dict()
    assert saved["state"][0]["momentum_buffer"].shape == shape
    p3 = nn.Parameter(p2.detach().clone())
    o3 = create_optimizer([p3], name, lr=2e-2)
    o3.load_state_dict(saved)
    for g in grads[2:]:
        p3.grad = g.clone()
        o3.step()
    assert torch.equal(p3.detach(), p1.detach())
    if name == "normuon":
        old = {**saved, "state": {0: {**saved["state"][0], "second_momentum_buffer": torch.zeros(8, 4, 3)}}}
        o4 = create_optimizer([nn.Parameter(w.clone())], name, lr=2e-2)
        with pytest.raises(ValueError, match="second_momentum_buffer"):
            o4.load_state_dict(old)


@pytest.mark.parametrize("name", ["muon", "normuon"])
def test_five_dimensions_are_refused_in_a_use_muon_group(name):
    """A Conv3d kernel ``[out, in, kt, kh, kw]`` has no reference reading (Keller Jordan's code flattens ``ndim == 4``
    only and would batch the last two dimensions of a 5-D tensor; his stated reason would flatten it): refused,
    naming the parameter and the shapes Muon takes, from the class, create_optimizer and add_param_group; in a group
    without use_muon it takes AdamW."""
    cls = {"muon": Muon, "normuon": NorMuon}[name]
    p5, p2 = nn.Parameter(torch.randn(2, 2, 2, 3, 3)), nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"parameter 1 of shape \[2, 2, 2, 3, 3\] in a use_muon group.*4-D convolution"):
        cls([p2, p5])
    with pytest.raises(ValueError, match=r"parameter group 0 of optimizer '\w+': parameter 0 of shape \[2, 2, 2, 3, 3\]"):
        create_optimizer([p5], name)
    opt = cls([{"params": [p2], "use_muon": True}])
    with pytest.raises(ValueError, match=r"parameter group 1 .*parameter 0 of shape \[2, 2, 2, 3, 3\]"):
        opt.add_param_group({"params": [p5], "use_muon": True})
    opt.add_param_group({"params": [p5], "use_muon": False})
    p5.grad, p2.grad = torch.randn_like(p5), torch.randn_like(p2)
    opt.step()
    assert "exp_avg" in opt.state[p5]
