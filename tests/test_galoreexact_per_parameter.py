"""Issue 12: a projected parameter stepped alone (layerwise mode's step, ``step_param``) allocates what
:func:`lowmem.optim.subspace.projected_alone_bytes` reports from meta tensors, phase by phase (refresh,
project-down, the moment rule, the combine-back), traced (every new storage a dispatched operation returns):
the steady step and the refresh step, float32 and bfloat16 weights, tall / wide / square shapes and a rank
near the smaller side, chunk_numel default / 4096 (several row blocks) / None (whole), for GaLore (AdamW,
Adafactor, 8-bit AdamW), Fira, FRUGAL (SVD and columns), APOLLO and APOLLO-Mini. A refresh's LAPACK
workspace (inside the SVD kernel) is counted in the report but invisible to the trace
(``Projection.untraced_refresh_bytes``): the traced refresh step is compared without it.

Before: the engine's per-parameter report summed the phases (a (200, 128) float32 galore_adafactor weight at
rank 16: 843,776 B reported, 483,328 of them the SVD refresh and 360,448 MKL's kept GEMM buffer, for a
traced steady step of 128,004 B and a traced refresh step of 168,448 B). The engine is to report it
for a parameter stepped alone (``LowMemOptimizer._projected_bytes``, no stabilizers: FOUND_GALOREEXACT 1)."""

import warnings

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.functional import galore as GL
from lowmem.optim.subspace import projected_alone_bytes
from test_transient_per_parameter import _Traced

RECIPES = {
    "galore_adamw": {}, "galore_adafactor": {}, "galore_adamw8bit": {"min_quant_size": 16}, "fira_adamw": {},
    "frugal": {}, "frugal_columns": {"projection": "columns"}, "osd_adamw": {}, "apollo_adamw": {}, "apollo_mini": {},
    "adamw_snsm": {}, "sgd_sm": {}, "adagrad_snsm": {},
}
SHAPES = {"tall": ((200, 128), 16), "wide": ((128, 200), 16), "square": ((96, 96), 16), "rank_near_side": ((300, 40), 39)}
# other settings, on the tall and rank-near-side shapes
VARIANTS = [
    ("galore_adamw", {"proj_type": "full"}), ("galore_adamw", {"moment_policy": "rotate"}),
    ("galore_adamw", {"projection": "random"}), ("galore_adamw", {"projection": "random", "proj_type": "full"}),
    ("galore_adamw", {"projection": "gaussian"}), ("galore_adamw", {"state_dtype": "bfloat16"}),
    ("galore_adafactor", {"beta1": 0.9}), ("galore_adafactor", {"scale_parameter": False, "relative_step": False, "lr": 1e-3}),
    ("frugal", {"projection": "rows"}), ("frugal", {"projection": "blocks"}), ("frugal", {"free_rule": "sgd"}),
    ("adamw_snsm", {"free_rule": "signsgd"}), ("sgd_sm", {"projection": "columns"}), ("sgd_sm", {"projection": "rows"}),
    ("apollo_adamw", {"gamma": None}), ("osd_adamw", {"proj_optimizer": "sgd"}),
    # (the first refresh, the range finder, outweighs a later one, the subspace iteration: steps 1 and 3)
    ("galore_adamw", {"projection": "rsvd"}), ("galore_adamw", {"projection": "rsvd", "proj_type": "full"}),
    ("fira_adamw", {"projection": "rsvd"}),
]


def _traced_steps(name, shape, rank, dtype, chunk, steps=3, **extra):
    """The traced peaks of steps 1..steps (state allocated before: materialize_state; update_proj_gap=2: refreshes
    at steps 1 and 3, at 1, 2 and 4 for the Subspace-Momentum recipes' 'multiples' phase, at 1 only for online
    PCA) and the meta reports (steady, and of any step without the untraced workspace)."""
    kw = {**RECIPES[name], **extra}
    base = name.split("_columns")[0]
    if base != "apollo_mini":
        kw["rank"] = rank
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer([p], base, update_proj_gap=2, **kw)
        if chunk != "default":
            opt.chunk_numel = chunk
        opt.materialize_state()
        gen = torch.Generator().manual_seed(1)
        peaks = []
        for _ in range(steps):
            g = torch.randn(shape, generator=gen).to(dtype)
            with _Traced() as t:
                opt.step_param(p, g)
            peaks.append(t.peak)
        mp = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"))
        meta = create_optimizer([mp], base, update_proj_gap=2, **kw)
    if chunk != "default":
        meta.chunk_numel = chunk
    meta.materialize_state()
    group, state = meta.param_groups[0], meta.state[mp]
    return (peaks, projected_alone_bytes(meta, mp, group, state, steady=True),
            projected_alone_bytes(meta, mp, group, state, traced=True), (meta, mp))


def _check(name, peaks, steady, any_step):
    """The steady step equals the steady report; the report of any step is the larger of a refresh step (a
    later one: the first may allocate a process-wide cache, the 8-bit quantizer's tables) and a steady one."""
    if name.endswith("snsm") or name == "sgd_sm":  # refreshes at steps 1, 2 (multiples of 2), 4
        steady_peak, refresh_peak = peaks[2], peaks[1]
    elif name == "osd_adamw":  # one SVD, at step 1; then a basis step every step
        steady_peak, refresh_peak = peaks[1], peaks[0]
    else:
        steady_peak, refresh_peak = peaks[1], peaks[2]
    assert steady_peak == steady > 0
    assert any_step == max(refresh_peak, steady_peak)


@pytest.mark.parametrize("chunk", ["default", 4096, None], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_projected_step_allocates_what_it_reports(name, shape, dtype, chunk):
    """Every recipe, shape, dtype and chunk: traced == reported, steady and refresh steps."""
    peaks, steady, any_step, _ = _traced_steps(name, *SHAPES[shape], dtype, chunk)
    _check(name, peaks, steady, any_step)


@pytest.mark.parametrize("chunk", ["default", 4096, None], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ["tall", "rank_near_side"])
@pytest.mark.parametrize("name,extra", VARIANTS, ids=[f"{n}-{'-'.join(map(str, e.values()))}" for n, e in VARIANTS])
def test_projected_step_variants(name, extra, shape, dtype, chunk):
    """Two-sided bases, rotated moments, random, Gaussian and randomized-SVD bases, coordinates, the folded and
    unfolded complements, APOLLO without its limiter, Adafactor's first moment and constant step, OSD's SGD basis
    step."""
    peaks, steady, any_step, _ = _traced_steps(name, *SHAPES[shape], dtype, chunk, **extra)
    if extra.get("projection") == "rsvd":
        assert peaks[1] == steady and any_step == max(peaks)
        return
    _check(name, peaks, steady, any_step)


@pytest.mark.parametrize("chunk", ["default", 4096, None], ids=str)
@pytest.mark.parametrize("name", ["galore_adamw", "fira_adamw", "frugal", "apollo_adamw", "adamw_snsm", "osd_adamw"])
def test_float64_parameter(name, chunk):
    """A float64 parameter: its gradient's float32 copy lives through the step (the subspace math is float32),
    the parameter is updated in float64 (no copy, no in-place addmm_)."""
    peaks, steady, any_step, _ = _traced_steps(name, (200, 128), 16, torch.float64, chunk)
    _check(name, peaks, steady, any_step)


@pytest.mark.parametrize("chunk", ["default", 4096], ids=str)
def test_randk_rows_are_bounded(chunk):
    """FRUGAL's RandK: how many chosen indices fall in a block of rows is the selection's: the report is the exact
    maximum over selections (traced equal with the first k coordinates selected: tests/test_bounds_frugal_rows.py);
    a drawn selection allocates at most it."""
    peaks, steady, any_step, _ = _traced_steps("frugal", (200, 128), 16, torch.float32, chunk, projection="randk")
    assert steady >= peaks[1] and any_step >= max(peaks)
    if chunk == "default":
        assert steady == peaks[1]


@pytest.mark.parametrize("iters", [0, 1, 2])
@pytest.mark.parametrize("shape", [(200, 128, 16), (128, 200, 16), (300, 40, 39), (64, 64, 8)])
def test_range_finder_traced_bytes(shape, iters):
    """functional.galore.range_finder_traced_bytes == the traced peak of range_finder and of subspace_iteration."""
    d, e, r = shape
    a = torch.randn(d, e)
    gen = torch.Generator().manual_seed(0)
    GL.range_finder(a, r, gen, iters)  # (a first call: MKL's one-time buffers are not traced anyway)
    with _Traced() as t:
        q = GL.range_finder(a, r, gen, iters)
    assert t.peak == GL.range_finder_traced_bytes(d, e, r, iters)
    with _Traced() as t:
        GL.subspace_iteration(a, q, max(iters, 1))
    assert t.peak == GL.range_finder_traced_bytes(d, e, r, max(iters, 1), None)


@pytest.mark.parametrize("rows", [None, 1, 7, 20])
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_project_down_rows_bytes(side, rows):
    """functional.galore.project_down_rows_bytes == the traced peak of project_down_rows (a block's copy made
    while the previous block and product are bound; the right side's parts beside the final cat)."""
    m, n, r = 37, 50, 7
    g = torch.randn(m, n).bfloat16()
    left = torch.linalg.qr(torch.randn(m, r)).Q if side in ("left", "full") else None
    right = torch.linalg.qr(torch.randn(n, r)).Q.t().contiguous() if side in ("right", "full") else None
    rows = rows or m
    bounds = [(a, min(a + rows, m)) for a in range(0, m, rows)]
    with _Traced() as t:
        GL.project_down_rows(g, left, right, bounds)
    assert t.peak == GL.project_down_rows_bytes(n, r, left is not None, right is not None, bounds)


def test_svd_refresh_untraced_part_is_the_kernel_workspace():
    """The exact SVD's report keeps LAPACK's copy of the gradient and workspace (measured by peak RSS, not
    visible to a trace): report - untraced = the SVD's outputs U, S, V^T."""
    p = torch.nn.Parameter(torch.empty(200, 128, device="meta"))
    opt = create_optimizer([p], "galore_adamw", rank=16)
    opt.materialize_state()
    P, group = opt.recipe.projection, opt.param_groups[0]
    full = P.transient_bytes(p.shape, group, opt.state[p], refresh=True)
    assert full - P.untraced_refresh_bytes(p.shape, group) == 4 * (200 * 128 + 128 + 128 * 128)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_engine_per_parameter_report_is_projected_alone_bytes(name):
    """On meta (no MKL buffer), the engine's per-parameter report of a projected parameter is
    projected_alone_bytes' (steady and any step; a (300, 40) float32 weight at rank 39, whose steady step
    outweighs its refresh for most recipes, and a bfloat16 (200, 128) one at rank 16 in row blocks)."""
    for shape, rank, dtype, chunk in [((300, 40), 39, torch.float32, "default"), ((200, 128), 16, torch.bfloat16, 4096)]:
        _, _, _, (meta, mp) = _traced_steps(name, shape, rank, dtype, chunk, steps=0)
        group, state = meta.param_groups[0], meta.state[mp]
        assert meta._transient_bytes(True, steady=True) == projected_alone_bytes(meta, mp, group, state, steady=True)
        assert meta.step_transient_bytes(per_parameter=True) == projected_alone_bytes(meta, mp, group, state)


WHOLE_SHAPES = [(96, 64), (64, 96), (96, 64), (64,), (160, 64), (200, 40)]


def _whole_step(name, dtype, chunk):
    """The traced third step (no refresh: update_proj_gap=1000) of a small model's parameters in one optimizer
    (the projected multi-tensor buckets) and the meta report of a step without a refresh."""
    kw = dict(RECIPES[name])
    base = name.split("_columns")[0]
    if base != "apollo_mini":
        kw["rank"] = 8
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in WHOLE_SHAPES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer(ps, base, update_proj_gap=1000, **kw)
        opt.chunk_numel = opt.chunk_numel if chunk == "default" else chunk
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            with _Traced() as t:
                opt.step()
        metas = [torch.nn.Parameter(torch.empty(s, dtype=dtype, device="meta")) for s in WHOLE_SHAPES]
        meta = create_optimizer(metas, base, update_proj_gap=1000, **kw)
    meta.chunk_numel = opt.chunk_numel
    meta.materialize_state()
    return t.peak, meta._transient_bytes(False, steady=True)


WHOLE_CASES = ([(n, torch.float32) for n in ("galore_adamw", "galore_adafactor", "galore_adamw8bit")]
               + [(n, torch.bfloat16) for n in sorted(RECIPES)])


@pytest.mark.parametrize("name,dtype,chunk", [
    pytest.param(n, d, c, id=f"{n}-{str(d)[6:]}-{c}") for n, d in WHOLE_CASES for c in ("default", None)])
def test_whole_step_buckets_allocate_what_they_report(name, dtype, chunk):
    """The whole step's projected buckets (one optimizer, a small model's parameters): GaLore's float32 buckets
    fold in place (CombineRule.fold_bytes), the others combine each parameter back as it is stepped alone
    (subspace.projected_back_bytes), Adafactor's step sizes live to the bucket's end."""
    traced, reported = _whole_step(name, dtype, chunk)
    assert traced == reported


# tests/test_foreach_projected.py::test_step_transient_bytes_counts_the_bucket_phases's setups, against a trace
PHASES = [("apollo_adamw", {}), ("galore_adamw", {"projection": "random"}), ("fira_adamw", {"projection": "random"}),
          ("frugal", {"projection": "random"}), ("galore_adamw", {"projection": "random", "proj_type": "left"})]


def _bucket(name, hp, k, chunk):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 256)) for _ in range(k)]
    opt = create_optimizer(ps, name, rank=16, update_proj_gap=1000, **hp)
    opt.chunk_numel = chunk
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(64, 256)
        with _Traced() as t:
            opt.step()
    metas = [torch.nn.Parameter(torch.zeros(64, 256, device="meta")) for _ in range(k)]
    meta = create_optimizer(metas, name, rank=16, update_proj_gap=1000, **hp)
    meta.chunk_numel = chunk
    meta.materialize_state()
    return t.peak, meta._transient_bytes(False, steady=True)


@pytest.mark.parametrize("name,hp,chunk,k", [
    pytest.param(n, h, c, k, id=f"{n}-{'-'.join(h.values())}-{c}-{k}") for n, h in PHASES for c in (None, 8192) for k in (1, 3)])
def test_float32_bucket_of_same_shapes(name, hp, chunk, k):
    """``k`` (64, 256) float32 weights at rank 16 in one bucket (two at chunk 8192), a step without refresh:
    GaLore's bucket folds in place, its peak is the multi-tensor direction's ``12 k n`` (traced 49,152 for one,
    147,456 for three, 98,304 for two), which the engine is to report exactly (FOUND 3; it reports the unfolded
    per-parameter combine-back: 98,304 / 65,536 for one); Fira's and FRUGAL's folds are counted by their rules
    (CombineRule.foreach_fold_bytes, since FOLDS' commit: tests/test_folds_buckets.py), APOLLO's too (9f37672)."""
    traced, reported = _bucket(name, hp, k, chunk)
    if name == "galore_adamw":
        assert traced == reported == 12 * min(k, 2 if chunk else k) * 4096
    else:
        assert traced == reported
