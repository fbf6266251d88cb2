"""Adafactor's multi-tensor step on non-CPU devices (issue 15): same-shape tensors of any size are
stacked into one group (``functional.adafactor.stacks_large``), so a step launches a kernel per
operation and distinct shape instead of per tensor (the CPU keeps groups of small tensors only:
``STACK_NUMEL``, bits independent of the thread count). ``STACK_LARGE_ON_CPU`` forces the non-CPU
grouping here: the step equals the paper's loop (``references/full_rank.py``), the per-parameter
step (``foreach=False``) within float32 rounding and transformers' ``Adafactor``; the stacks are
counted in ``step_transient_bytes`` (against torch's allocation tracker); on meta tensors (the non-CPU
path) the launches of a step do not grow with the number of same-shape tensors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.optim import create_optimizer
from lowmem.optim.functional import adafactor as FF
from lowmem.optim.references import get_reference
from lowmem.optim.references.full_rank import adafactor as reference_adafactor

# same-shape matrices, vectors and batched matrices at least STACK_NUMEL (32,768) elements (groups of
# their own on the CPU by default), small ones, a transposed (non-contiguous) matrix: alone
SHAPES = [(200, 170), (16, 8), (200, 170), (34000,), (2, 130, 130), (34000,), (16, 8), (2, 130, 130), (200, 170), (40,)]


def _params(shapes, seed=0, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    if transposed:
        ps.append(torch.nn.Parameter(torch.randn(170, 200, generator=gen).t()))
    return ps


def _grads(ps, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) * (20.0 if t % 3 == 1 else 1.0) for p in ps] for t in range(steps)]


def _run(ps, grads, forced, monkeypatch, chunk_numel=None, foreach=None, **hp):
    with monkeypatch.context() as mp:
        mp.setattr(FF, "STACK_LARGE_ON_CPU", forced)
        opt = create_optimizer(ps, "adafactor", foreach=foreach, **hp)
        opt.chunk_numel = chunk_numel
        traj = []
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
            traj.append([p.detach().clone() for p in ps])
        return traj, opt


@pytest.mark.parametrize("index", [0, 1, 2])
def test_stacked_step_equals_the_reference_loop(index, monkeypatch):
    """Every configuration of the Adafactor reference (relative step with the parameter scale; first
    moment, weight decay and a clipping that bites; an external lr without scale): each parameter after
    each of 5 steps equals the paper's loop (rtol 1e-5), with every same-shape set stacked (spied)."""
    config = get_reference("adafactor").configs[index]
    ps = _params(SHAPES)
    starts = [p.detach().clone() for p in ps]
    grads = _grads(ps, 5)
    seen = []
    orig = FF._group_direction

    def spy(gs, *a, **k):
        seen.append((tuple(gs[0].shape), len(gs)))
        return orig(gs, *a, **k)

    monkeypatch.setattr(FF, "_group_direction", spy)
    traj, opt = _run(ps, grads, True, monkeypatch, **config)
    assert set(seen) == {((40,), 1), ((2, 130, 130), 2), ((16, 8), 2), ((200, 170), 3), ((34000,), 2)}
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    for i, start in enumerate(starts):
        want = reference_adafactor(start.clone(), [g[i] for g in grads], index=i, **group)
        for t, w in enumerate(want):
            torch.testing.assert_close(traj[t][i], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t + 1} {tuple(w.shape)}: {m}")


CONFIGS = {
    "default": {},
    "beta1_wd": {"beta1": 0.9, "weight_decay": 0.1},
    "lr_scaled_clip": {"lr": 1e-2, "relative_step": False, "clip_threshold": 0.3},
    "lr_plain_beta1": {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.8, "weight_decay": 0.05},
}


@pytest.mark.parametrize("chunk_numel", [None, 80_000])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_stacked_step_equals_the_per_parameter_step(config, chunk_numel, monkeypatch):
    """The non-CPU grouping against the per-parameter step (``foreach=False``, the reference path) with
    a transposed parameter next to its shape's contiguous ones (alone), whole tensors and buckets of at
    most 80,000 elements (a tensor larger than that in pieces, stepped whole from its first): parameters
    and every state within float32 rounding (rtol 1e-6) after 4 steps."""
    hp = CONFIGS[config]
    ref = _params(SHAPES, transposed=True)
    got = _params(SHAPES, transposed=True)
    grads = _grads(ref, 4)
    (_, ref_opt), (_, got_opt) = (_run(ref, grads, False, monkeypatch, chunk_numel, foreach=False, **hp),
                                  _run(got, grads, True, monkeypatch, chunk_numel, **hp))
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        sa, sb = ref_opt.state[a], got_opt.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("relative_step", [False, True])
def test_stacked_step_matches_transformers(relative_step, monkeypatch):
    """transformers' ``Adafactor`` (the parity peer of tests/test_outside_parity.py) on the same-shape
    sets, stacked: within 1e-5 of its largest update over 8 steps."""
    from test_outside_parity import run_pair
    from transformers.optimization import Adafactor as HFAdafactor

    from lowmem.optim import Adafactor

    kw = {} if relative_step else dict(lr=1e-2, relative_step=False, weight_decay=0.01, beta1=0.9)
    monkeypatch.setattr(FF, "STACK_LARGE_ON_CPU", True)
    diff = run_pair(lambda ps: Adafactor(ps, **kw), lambda ps: HFAdafactor(ps, **kw), SHAPES, steps=8)
    assert diff < 1e-5


def test_stack_groups_on_other_devices_stack_every_size():
    """``large``: every contiguous same-shape set is one group whatever its size (the CPU's default
    keeps tensors of STACK_NUMEL elements or more alone and groups of at most GROUP_NUMEL); a
    non-contiguous tensor stays alone; the default follows the tensors' device."""
    xs = [torch.zeros(s) for s in [(200, 200), (5,), (200, 200), (200, 200), (70000,), (70000,)]]
    xs.append(torch.zeros(200, 200).t())
    kinds = [2, 1, 2, 2, 1, 1, 2]
    assert FF.stack_groups(xs, kinds, large=True) == [[0, 2, 3], [1], [4, 5], [6]]
    assert FF.stack_groups(xs, kinds) == [[0], [1], [2], [3], [4], [5], [6]]
    meta = [x.to("meta") for x in xs[:6]]
    assert FF.stack_groups(meta, kinds[:6]) == [[0, 2, 3], [1], [4, 5]]


def _allocated_peak(fn, inputs) -> int:
    """Peak bytes of the tensors ``fn`` allocates (torch's MemTracker; ``inputs`` are the baseline)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mt, cpu = MemTracker(), torch.device("cpu")
    with mt:
        for t in inputs:
            t.mul_(1)
        base = mt.get_tracker_snapshot("current").get(cpu, {}).get("Total", 0)
        fn()
        peak = mt.get_tracker_snapshot("peak").get(cpu, {}).get("Total", 0)
    return peak - base


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_stacks_are_counted_in_the_transient(beta1, monkeypatch):
    """A bucket of three (200, 170) weights, two (34000,) vectors and a small one, stacked: the bucket's
    report (``FactoredMoments.foreach_bucket_transient_bytes``, from the statistics' device) covers what
    the step allocates (torch's allocation tracker) within the step sizes' 16 B per member, and is the
    largest group's two float32 tensors and stacked statistics: 8 k n + 8 k (R + C) + 16 per member;
    the CPU's default grouping reports each large tensor alone; meta tensors (device not known) the
    larger of the two."""
    from lowmem.optim.registry import get_entry

    rule = get_entry("adafactor").recipe.moment
    shapes = [(200, 170)] * 3 + [(34000,)] * 2 + [(16, 8)]
    group = {"eps": (1e-30, 1e-3), "decay_rate": -0.8, "clip_threshold": 1.0, "beta1": beta1, "weight_decay": 0.1,
             "relative_step": False, "lr": 1e-3, "warmup_init": False, "scale_parameter": True}
    torch.manual_seed(0)
    ps, gs = [torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes]
    states = []
    for g in gs:
        states.append({})
        rule.init_state(states[-1], g.shape, group, g)
    members = [(g.numel(), st) for g, st in zip(gs, states)]
    numel = sum(n for n, _ in members)
    cpu_report = rule.foreach_bucket_transient_bytes(numel, members, group)
    assert cpu_report == 8 * 34000 + 4 * (200 + 170) + 16 * 6  # (each large tensor alone: a weight's statistics once)
    monkeypatch.setattr(FF, "STACK_LARGE_ON_CPU", True)
    report = rule.foreach_bucket_transient_bytes(numel, members, group)
    assert report == 8 * 3 * 34000 + 8 * 3 * (200 + 170) + 16 * 6
    inputs = ps + gs + [t for st in states for t in st.values()]
    for lr_rule in (None, rule.foreach_lr_rule):
        measured = _allocated_peak(lambda: rule.foreach_step_(ps, gs, states, group, 2, 1e-3, lr_rule=lr_rule), inputs)
        assert measured <= report <= measured + 16 * len(gs), (lr_rule, measured, report)
    monkeypatch.setattr(FF, "STACK_LARGE_ON_CPU", False)
    meta = []
    for g in gs:
        meta.append({})
        rule.init_state(meta[-1], g.shape, group, g.to("meta"))
    assert rule.foreach_bucket_transient_bytes(numel, [(g.numel(), st) for g, st in zip(gs, meta)], group) == report


class _Count(TorchDispatchMode):
    VIEWS = {"view", "_unsafe_view", "slice", "t", "unsqueeze", "squeeze", "as_strided", "detach", "alias", "expand",
             "select", "unbind", "empty", "empty_like", "new_empty", "empty_strided", "_local_scalar_dense", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.kernels = 0
        self.h2d = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return True if args[0].dtype is torch.bool else 1.0
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        devs = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        if name in ("_to_copy", "copy_") and "cpu" in devs and isinstance(out, torch.Tensor) and out.device.type != "cpu":
            self.h2d += 1
        if name not in self.VIEWS and devs != {"cpu"}:
            self.kernels += 1
        return out


@pytest.mark.parametrize("hp", [{}, {"beta1": 0.9, "weight_decay": 0.1}])
def test_meta_launches_do_not_grow_with_same_shape_tensors(hp):
    """On meta tensors (the non-CPU path, no switch), whole tensors: a step of 4 or of 16 copies of
    each shape launches the same number of kernels (one group per shape), no host-to-device copy (the
    groups' step sizes are stacked entries, not an index tensor)."""
    def launches(copies):
        shapes = [(256, 128), (300,), (2, 64, 64)] * copies
        ps = [torch.nn.Parameter(torch.zeros(s, device="meta")) for s in shapes]
        for p in ps:
            p.grad = torch.zeros_like(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = create_optimizer(ps, "adafactor", **hp)
        opt.chunk_numel = None
        for _ in range(2):
            with _Count() as c:
                opt.step()
        return c.kernels, c.h2d

    (few, h2d_few), (many, h2d_many) = launches(4), launches(16)
    assert few == many and h2d_few == h2d_many == 0, (few, many)
    assert few < 3 * 40
