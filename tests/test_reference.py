"""The generic reference suite: every engine optimizer equals its plain loop, on every configuration.

For each registered engine optimizer, :mod:`lowmem.optim.references` holds a single-tensor loop
written from the paper and a list of configurations. Each case steps several parameters (a wide and
a tall matrix and a vector, by default) together in one optimizer through the same gradients
(Gaussian, with a spike at step 5 and a zero gradient at step 9), on two paths of the engine:

* ``single``: ``chunk_numel=None``, ``foreach=False``: every parameter whole, one at a time;
* ``fast``: ``chunk_numel=64`` and the default ``foreach``: the chunked step (whole quantization /
  top-k blocks, row blocks of the combine-back) and the multi-tensor buckets.

and compares every parameter after every step with the loop's (float32, rtol 1e-5 by default).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lowmem.optim import create_optimizer, optimizer_entries
from lowmem.optim.references import get_reference

ENGINE = [e.name for e in optimizer_entries() if e.recipe is not None]
PATHS = ("single", "fast")


def gradients(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for t in range(1, steps + 1):
        g = torch.randn(shape, generator=gen) * (0.5 + 0.5 * math.sin(t))
        if t == 5:  # a spike: SPAM's clipping, the limiters, AdaClip
            g.view(-1)[:3] *= 100.0
        if t == 9:
            g.zero_()  # a zero gradient: refreshes must keep the old subspace, moments decay
        grads.append(g)
    return grads


def cases():
    for name in ENGINE:
        ref = get_reference(name)
        if ref is None:
            continue
        for i, config in enumerate(ref.configs):
            for path in PATHS:
                yield pytest.param(name, i, path, id=f"{name}-{i}-{path}")


def test_every_engine_optimizer_has_a_reference():
    missing = [name for name in ENGINE if get_reference(name) is None]
    assert not missing, f"engine optimizers without a plain reference in lowmem.optim.references: {missing}"


def test_every_reference_has_several_configs():
    few = {name: len(get_reference(name).configs) for name in ENGINE if get_reference(name) is not None}
    few = {name: n for name, n in few.items() if n < 2}
    assert not few, f"references with fewer than 2 configurations: {few}"


@pytest.mark.parametrize("name,index,path", list(cases()))
def test_engine_equals_reference(name, index, path):
    ref = get_reference(name)
    config = ref.configs[index]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ref.shapes]
    starts = [p.detach().clone() for p in params]
    grads = [gradients(shape, ref.steps, seed=10 + i) for i, shape in enumerate(ref.shapes)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank >= a side, skipped refreshes: the reference does the same
        opt = create_optimizer(params, name, **config)
        if path == "single":
            opt.chunk_numel = None
            for group in opt.param_groups:
                group["foreach"] = False
        else:
            opt.chunk_numel = 64
        trajectory = [[] for _ in params]
        for t in range(ref.steps):
            for p, g in zip(params, grads):
                p.grad = g[t].clone()
            opt.step()
            for i, p in enumerate(params):
                trajectory[i].append(p.detach().clone())
        group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        group["group_size"] = len(opt.param_groups[0]["params"])  # (refresh_phase='staggered' shifts by index / size)
        for i, (start, g) in enumerate(zip(starts, grads)):
            expected = ref.loop(start.clone(), [x.clone() for x in g], index=i, **group)
            assert len(expected) == ref.steps
            for t, (got, want) in enumerate(zip(trajectory[i], expected)):
                torch.testing.assert_close(
                    got, want, rtol=ref.rtol, atol=ref.atol,
                    msg=lambda m: f"{name} config {config} shape {tuple(start.shape)} ({path}) step {t + 1}: {m}",
                )
