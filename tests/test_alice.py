"""Alice (Gong et al. 2025, arXiv 2502.07752; ``lowmem.optim.recipes.alice``): the switch's math, the engine
against the plain loop of the paper (``lowmem.optim.references.alice``) on shapes, ranks and refresh gaps of
both orientations, refused settings, the exact state, the steady step's traced bytes, the refresh's bound,
pytorch_optimizer's Alice, the switch's draw on the parameter's device and its resume, the range finder's first
basis (``first_basis="rsvd"``) and the Ritz vectors' sign convention (``fix_signs``)."""

from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.functional import alice as AL
from lowmem.optim.recipes.alice import ALICE, switch_bytes
from lowmem.optim.references.alice import alice as reference

sys.path.insert(0, str(Path(__file__).parent))


def _grads(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (0.5 + 0.5 * math.sin(t)) for t in range(1, steps + 1)]


# ---- the switch (pure functions) ----


def test_switch_keeps_the_leading_ritz_vectors_and_draws_the_rest_from_the_complement():
    """The new basis is orthonormal; its first l columns are the leading eigenvectors of the tracked covariance
    ``Q~ = b3 U Q U^T + (1 - b3) A A^T`` within the iterated subspace (formed explicitly here, as the paper
    writes it), the other r - l are orthogonal to that whole subspace."""
    torch.manual_seed(0)
    d, e, r, lead, b3 = 30, 50, 6, 2, 0.9
    a = torch.randn(d, e)
    u = torch.linalg.qr(torch.randn(d, r))[0]
    c = torch.randn(r, r)
    q = c @ c.t()
    qt = b3 * u @ q @ u.t() + (1 - b3) * a @ a.t()
    x = torch.linalg.qr(qt @ u)[0]
    w, vecs = torch.linalg.eigh(x.t() @ qt @ x)
    ritz = x @ vecs.flip(1)
    new = AL.switch(a, u, q, b3, lead, 1, torch.Generator().manual_seed(3))
    assert new.shape == (d, r)
    torch.testing.assert_close(new.t() @ new, torch.eye(r), atol=1e-5, rtol=0)
    # leading columns: the Ritz vectors up to sign
    torch.testing.assert_close((new[:, :lead] * ritz[:, :lead]).sum(0).abs(), torch.ones(lead), atol=1e-4, rtol=0)
    # switched columns: outside span(x) (the whole iterated subspace, not only the leading part)
    assert (x.t() @ new[:, lead:]).abs().max() < 1e-5
    # Q carried: U_new^T U_old Q U_old^T U_new
    torch.testing.assert_close(AL.carry_covariance(q, u, new), new.t() @ u @ q @ u.t() @ new, rtol=1e-4, atol=1e-4)


def test_switch_fills_a_small_complement_with_the_next_ritz_vectors():
    """d - r < r - l: the whole complement (d - r directions) and the next Ritz vectors; still orthonormal."""
    torch.manual_seed(1)
    d, r, lead = 10, 8, 1  # complement of 2 for 7 switched directions: 5 more Ritz vectors
    a = torch.randn(d, 20)
    u = torch.linalg.qr(torch.randn(d, r))[0]
    new = AL.switch(a, u, torch.zeros(r, r), 0.0, lead, 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(new.t() @ new, torch.eye(r), atol=1e-5, rtol=0)
    _, ritz = AL.subspace_eig(a, u, torch.zeros(r, r), 0.0, 1)
    torch.testing.assert_close((new[:, :6] * ritz[:, :6]).sum(0).abs(), torch.ones(6), atol=1e-4, rtol=0)


def test_limiter_caps_growth_and_skips_a_zero_previous_norm():
    prev = torch.tensor(-1.0)
    assert AL.growth_limiter_(torch.tensor(5.0), prev, 1.01).item() == 1.0 and prev.item() == 5.0
    lim = AL.growth_limiter_(torch.tensor(10.0), prev, 1.01)
    assert lim.item() == pytest.approx(10.0 / 5.0 / 1.01) and prev.item() == pytest.approx(5.05)
    zero = torch.tensor(0.0)
    assert AL.growth_limiter_(torch.tensor(3.0), zero, 1.01).item() == 1.0  # (a zero compensation last step)


# ---- the engine against the plain loop of the paper ----

CASES = [  # (shape, rank, gap, extra): wide (left basis) and tall (right basis), each side forced, ranks, gaps
    ((16, 48), 3, 2, {}),
    ((48, 16), 5, 3, {}),
    ((33, 20), 7, 4, {"proj_type": "left", "switch_fraction": 0.5}),
    ((20, 33), 7, 1, {"proj_type": "right", "power_iters": 2, "beta3": 0.5}),
    ((12, 40), 9, 3, {"switch_fraction": 0.9, "bias_correction": True, "weight_decay": 0.05}),  # small complement
    ((40, 12), 2, 5, {"switch_fraction": 0.0, "alpha_c": 0.0}),
    ((24, 40), 4, 3, {"betas": (0.8, 0.95), "carry_covariance": True}),  # (p's decay: beta1 = 0.8)
    ((40, 24), 4, 3, {"refresh_phase": "aligned", "comp_beta": 0.5}),
]


@pytest.mark.parametrize("path", ["single", "fast"])
@pytest.mark.parametrize("shape,rank,gap,extra", CASES, ids=[f"{s[0]}x{s[1]}-r{r}-T{t}" for s, r, t, _ in CASES])
def test_engine_equals_the_paper_loop(shape, rank, gap, extra, path):
    """10 steps (several switches), the whole step (``chunk_numel=None``, one tensor at a time) and the chunked,
    multi-tensor step (row blocks of 64 elements): equal to the plain loop to float32 rounding."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    start = p.detach().clone()
    grads = _grads(shape, 10, 7)
    opt = create_optimizer([{"params": [p], "rank": rank, "update_proj_gap": gap, **extra}], "alice", lr=1e-2)
    if path == "single":
        opt.chunk_numel = None
        for g in opt.param_groups:
            g["foreach"] = False
    else:
        opt.chunk_numel = 64
    got = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        got.append(p.detach().clone())
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    want = reference(start.clone(), [g.clone() for g in grads], index=0, **group)
    for t, (x, y) in enumerate(zip(got, want), 1):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=2e-6, msg=lambda m: f"step {t}: {m}")


def test_the_update_does_not_depend_on_the_gradients_scale():
    """Algorithm 4 with ``eps = 0`` is invariant to the gradient's scale (Adam's ``m / sqrt(v)``, ``C``'s
    ``R Diag(p)^{-1/2}``, the limiter's ratio): gradients 1e-6 times smaller give the same trajectory (``p``'s floor
    is float32's smallest normal number, not a value a small gradient's squared column norms reach)."""
    runs = []
    for s in (1.0, 1e-6):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(24, 40))
        opt = create_optimizer([{"params": [p], "rank": 4, "update_proj_gap": 3}], "alice", lr=1e-2, eps=0.0)
        for g in _grads((24, 40), 8, 3):
            p.grad = g * s
            opt.step()
        runs.append(p.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-5)


def test_a_zero_first_gradient_leaves_the_weight_finite_and_refreshes_at_the_next_step():
    """A weight whose first gradient is exactly 0 (LoRA's ``lora_A``): the refresh is retried at the next step, and
    ``p`` floored at float32's smallest normal gives a zero compensation (``||C||`` from ``sqrt(sq) k``, not ``sq k^2``,
    whose ``k^2`` overflowed to inf: 0 * inf = NaN in every later step), whole and folded."""
    for foreach in (None, False):
        p = torch.nn.Parameter(torch.randn(16, 40))
        opt = create_optimizer([{"params": [p], "rank": 4}], "alice", lr=0.02, foreach=foreach)
        p.grad = torch.zeros(16, 40)
        with pytest.warns(UserWarning, match="refresh skipped"):
            opt.step()
        before = p.detach().clone()
        for g in _grads((16, 40), 3, 5):
            p.grad = g
            opt.step()
        assert torch.isfinite(p).all()
        assert float((p.detach() - before).norm()) > 1e-3
        basis = opt.state[p]["proj_left"]
        torch.testing.assert_close(basis.t() @ basis, torch.eye(4), atol=1e-5, rtol=0)


# ---- settings ----


@pytest.mark.parametrize("key,value,fragment", [
    ("rank", 0, "Invalid rank=0"),
    ("rank", 48, "rank 48 >= the smaller side of every 2-D parameter"),
    ("update_proj_gap", 0, "Invalid update_proj_gap=0"),
    ("beta3", 1.0, "Invalid beta3=1.0: expected a float with 0 <= beta3 < 1"),
    ("switch_fraction", 1.0, "Invalid switch_fraction=1.0: expected a float with 0 <= switch_fraction < 1"),
    ("switch_fraction", -0.1, "Invalid switch_fraction=-0.1"),
    ("comp_beta", 1.5, "Invalid comp_beta=1.5"),
    ("alpha_c", -1.0, "Invalid alpha_c=-1.0: expected a finite float >= 0"),
    ("gamma", 0.5, "Invalid gamma=0.5: expected a finite float >= 1"),
    ("power_iters", -1, "Invalid power_iters=-1"),
    ("bias_correction", 1, "Invalid bias_correction=1: expected True or False"),
    ("carry_covariance", "yes", "Invalid carry_covariance='yes': expected True or False"),
    ("refresh_phase", "every", "Invalid refresh_phase='every'"),
    ("proj_type", "full", "proj_type must be one of"),
    ("projection", "svd", "Invalid projection='svd'"),
    ("first_basis", "qr", "Invalid first_basis='qr': expected one of ['svd', 'rsvd']"),
    ("betas", (0.9, 1.0), "Invalid betas=(0.9, 1.0)"),
])
def test_bad_settings_are_refused_naming_the_field(key, value, fragment):
    p = torch.nn.Parameter(torch.randn(48, 64))
    with pytest.raises(ValueError, match=re.escape(fragment).replace(re.escape(": expected"), ".*: expected")):
        create_optimizer([{"params": [p], "rank": 4, key: value}] if key != "betas" else
                         [{"params": [p], "rank": 4}], "alice", **({"betas": value} if key == "betas" else {}))


def test_float64_moments_of_a_projected_weight_are_refused():
    """``state_dtype="param"`` on a float64 weight would make float64 moments meet the float32 basis (GaLore's
    check, named for alice); the default float32 state trains it."""
    p = torch.nn.Parameter(torch.randn(24, 40, dtype=torch.float64))
    with pytest.raises(ValueError, match="state_dtype='param' on float64 parameters projected through alice's basis"):
        create_optimizer([{"params": [p], "rank": 4}], "alice", state_dtype="param")
    opt = create_optimizer([{"params": [p], "rank": 4}], "alice")
    p.grad = torch.randn_like(p)
    opt.step()
    assert p.dtype == torch.float64 and opt.state[p]["exp_avg"].dtype == torch.float32


def test_a_bad_setting_written_into_the_group_later_is_refused_at_the_step():
    p = torch.nn.Parameter(torch.randn(24, 40))
    opt = create_optimizer([{"params": [p], "rank": 4}], "alice")
    p.grad = torch.randn_like(p)
    opt.step()
    before = p.detach().clone()
    opt.param_groups[0]["switch_fraction"] = 2.0
    with pytest.raises(ValueError, match="switch_fraction"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_switch_fraction_gives_the_papers_leading_counts():
    """docs/subspace.md's table: ``l = r - floor(r * switch_fraction)``; the paper's Table 11 (``l = 40`` at
    ``r = 128`` and 256, 160 at 512) needs 0.6875 at 128 and 512 and the default 0.84375 at 256, which gives 20 at
    128 and 80 at 512."""
    assert [AL.leading_count(r, 0.6875) for r in (128, 512)] == [40, 160]
    assert [AL.leading_count(r, 0.84375) for r in (128, 256, 512)] == [20, 40, 80]


def test_alice0_keeps_q_but_its_value_never_enters_the_update():
    """Alice-0 (``beta3=0``) keeps ``proj_cov`` (``4 r^2`` bytes, docs/subspace.md "State") whose value does not enter
    a step: garbage written into it before every step (switches at 2, 4, 6) leaves the weights bit-equal."""
    shape, r = (12, 30), 3
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(shape, generator=gen) for _ in range(7)]
    runs = []
    for garbage in (False, True):
        p = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(5)))
        opt = create_optimizer([{"params": [p], "rank": r, "update_proj_gap": 2, "beta3": 0.0}], "alice", lr=1e-2)
        for g in grads:
            if garbage and p in opt.state:
                opt.state[p]["proj_cov"].copy_(torch.randn(r, r, generator=gen) * 100)
            p.grad = g.clone()
            opt.step()
        assert opt.state[p]["proj_cov"].shape == (r, r)
        runs.append(p.detach().clone())
    assert torch.equal(runs[0], runs[1])


# ---- state and bytes ----


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_state_is_exact_and_plain_tensors(shape, tmp_path):
    """The state of an m x n weight at rank r, d the projected side and e the other: the basis ``4 d r``, ``Q``
    ``4 r^2``, Adam's moments ``8 r e``, ``p`` ``4 e``, ``phi`` 4, ``proj_meta`` 48 and the step 4."""
    r = 4
    p = torch.nn.Parameter(torch.randn(shape))
    opt = create_optimizer([{"params": [p], "rank": r}], "alice")
    p.grad = torch.randn_like(p)
    opt.step()
    d, e = min(shape), max(shape)
    assert opt.state_bytes() == 4 * d * r + 4 * r * r + 8 * r * e + 4 * e + 4 + 48 + 4
    key = "proj_left" if shape[0] < shape[1] else "proj_right"
    assert set(opt.state[p]) == {"step", "proj_meta", key, "proj_cov", "exp_avg", "exp_avg_sq", "alice_p", "alice_phi"}
    torch.save(opt.state_dict(), tmp_path / "s.pt")
    torch.load(tmp_path / "s.pt", weights_only=True)


def test_steady_step_allocates_what_it_reports():
    """A projected weight stepped alone (layerwise mode's step): the traced steady step equals
    ``projected_alone_bytes(steady=True)`` (tall / wide / square / rank near the side, float32 and bfloat16, whole,
    default and 4096-element row blocks), and the report of any step (without the SVD's untraced workspace) covers
    the first refresh (an exact SVD, counted as GaLore's) and a switch."""
    import test_galoreexact_per_parameter as G

    G.RECIPES.setdefault("alice", {})
    for shape in sorted(G.SHAPES):
        for dtype in (torch.float32, torch.bfloat16):
            for chunk in ("default", 4096, None):
                peaks, steady, any_step, _ = G._traced_steps("alice", *G.SHAPES[shape], dtype, chunk,
                                                             refresh_phase="aligned")  # (refreshes at steps 1, 3)
                assert peaks[1] == steady > 0, (shape, dtype, chunk, peaks, steady)
                assert any_step == peaks[0] >= peaks[2], (shape, dtype, chunk, peaks, any_step)


@pytest.mark.parametrize("d,e,r,fraction,iters", [(128, 200, 16, 0.84375, 1), (200, 128, 16, 0.5, 2),
                                                  (40, 300, 39, 0.84375, 1), (300, 40, 20, 0.9, 0), (64, 64, 8, 0.0, 3)])
def test_switch_allocates_within_its_bound(d, e, r, fraction, iters):
    """A switch (tracking, subspace iteration, Ritz vectors, complement, the carried ``Q``) traced, against
    :func:`switch_bytes` without LAPACK's workspace: never above, within 3x."""
    from test_transient_per_parameter import _Traced

    torch.manual_seed(0)
    a = torch.randn(d, e)
    u = torch.linalg.qr(torch.randn(d, r))[0]
    q = torch.eye(r)
    with _Traced() as t:
        new = AL.switch(a, u, q, 0.99, AL.leading_count(r, fraction), iters, torch.Generator().manual_seed(0))
        carried = AL.carry_covariance(q, u, new)
        del new, carried
    bound = switch_bytes(d, e, r, AL.leading_count(r, fraction), iters, workspace=False)
    assert t.peak <= bound <= 3 * t.peak


# ---- pytorch_optimizer's Alice ----


def _peer_and_ours(shape, r, gap, steps, lr=1e-2, seed=0, **extra):
    """lowmem's alice and pytorch_optimizer's on the same gradients, the peer's settings mapped to lowmem's:
    its rows projected (``proj_type="left"``), ``leading_basis = rank`` (``switch_fraction=0``: no random draw),
    its refreshes at steps ``1, K, 2K, ...`` (lowmem's default ``refresh_phase="multiples"``, the paper's), and its
    state seeded at the first step with lowmem's first basis (its own is the coordinate axes: the QR of ``Q~ 0``).
    Returns the largest difference of the weights after each step, over the weights' largest movement."""
    Alice = pytest.importorskip("pytorch_optimizer").Alice
    torch.manual_seed(seed)
    w0 = torch.randn(shape)
    grads = _grads(shape, steps, seed + 1)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = create_optimizer([{"params": [a], "rank": r, "update_proj_gap": gap, "proj_type": "left",
                              "switch_fraction": 0.0, **extra}], "alice", lr=lr)
    peer = Alice([b], lr=lr, rank=r, leading_basis=r, update_interval=gap)
    out = []
    for t, g in enumerate(grads, 1):
        a.grad = g.clone()
        ours.step()
        if t == 1:
            m, n = shape
            peer.state[b].update(U=ours.state[a]["proj_left"].clone(), Q=torch.zeros(r, r), m=torch.zeros(r, n),
                                 v=torch.zeros(r, n), p=torch.zeros(n), phi=torch.zeros(1))
        b.grad = g.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer.step()
        out.append(((a.detach() - b.detach()).abs().max() / (a.detach() - w0).abs().max()).item())
    return out


def test_pytorch_optimizer_alice_agrees_with_the_paper_defaults():
    """With the paper's line 12 (``Q``'s entries kept across a switch, the default) lowmem follows pytorch_optimizer's
    Alice (a transcription of Algorithm 4) through three switches (steps 4, 8, 12) to float32 rounding; with
    ``carry_covariance=True`` (``Q`` re-expressed in the new basis) they part from the second switch (step 8) on."""
    paper = _peer_and_ours((24, 40), 4, 4, 14)
    assert max(paper) < 1e-4, paper
    carried = _peer_and_ours((24, 40), 4, 4, 10, carry_covariance=True)
    assert max(carried[:7]) < 1e-4, carried
    assert carried[7] > 1e-2, carried


@pytest.mark.parametrize("shape", [(3, 24, 40), (2, 40, 24)])
@pytest.mark.parametrize("foreach", [None, False])
def test_fused_experts_train_as_separate_matrices(shape, foreach):
    """A batch ``[E, A, B]`` (fused MoE experts) steps each matrix as a 2-D weight: bit for bit the separate
    matrices' trajectory (switches at steps 3, 5, 7 keeping the leading Ritz vectors: ``switch_fraction=0``, no
    draw; with draws each matrix draws from its own seed, ``subspace.matrix_seed``)."""
    torch.manual_seed(0)
    w = torch.randn(shape)
    batch = torch.nn.Parameter(w.clone())
    seps = [torch.nn.Parameter(w[e].clone()) for e in range(shape[0])]
    hp = {"rank": 4, "update_proj_gap": 2, "switch_fraction": 0.0}
    ob = create_optimizer([{"params": [batch], **hp}], "alice", lr=1e-2, foreach=foreach)
    os_ = create_optimizer([{"params": [p], **hp} for p in seps], "alice", lr=1e-2, foreach=foreach)
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        g = torch.randn(shape, generator=gen)
        batch.grad = g.clone()
        for e, p in enumerate(seps):
            p.grad = g[e].clone()
        ob.step()
        os_.step()
    for e, p in enumerate(seps):
        assert torch.equal(batch.detach()[e], p.detach())
        assert torch.equal(ob.state[batch]["proj_cov"][e], os_.state[p]["proj_cov"])


BUCKET_CASES = {"alice": ({}, 8), "alice_near": ({}, 36), "alice_left": ({"proj_type": "reverse_std"}, 8)}


@pytest.mark.parametrize("chunk", ["default", 4096], ids=str)
@pytest.mark.parametrize("shapes", ["mixed", "same6", "tall_wide", "rank_over_side", "near_side8", "many_small"])
@pytest.mark.parametrize("case", sorted(BUCKET_CASES))
def test_folded_bucket_allocates_what_it_reports(monkeypatch, case, shapes, chunk):
    """The projected multi-tensor step folds a float32 bucket (``AliceCompensation.foreach_fold``): each fold's
    traced peak (beyond the bucket's projected gradients and directions) == ``foreach_fold_bytes`` of its members,
    and the whole steady step traced == ``step_transient_bytes()`` of meta tensors (tests/test_folds_buckets.py's
    harness: mixed, same-shape, tall and wide weights, a rank near the smaller side, a weight trained full-rank
    beside the bucket, 24 short-row weights; the default chunk and 4096-element row blocks: several buckets)."""
    import test_folds_buckets as F
    from lowmem.optim import subspace as S

    hp, rank = BUCKET_CASES[case]
    if shapes == "many_small" and rank >= 16:
        pytest.skip("rank 36 applies to no (64, 16) weight")
    monkeypatch.setitem(F.CASES, case, ("alice", hp, rank))
    # (24 weights with short rows: the bucket's channel vectors, not a residual block, are the fold's peak)
    monkeypatch.setitem(F.SETS, "many_small", [(64, 16)] * 24)
    monkeypatch.setattr(S, "STACK_BY_SHAPE", False)
    phases = F._Phases(monkeypatch)
    traced, reported, opt = F._step(case, F.SETS[shapes], torch.float32, chunk, phases)
    r = opt.recipe
    assert phases.folds
    for peak, (members, group) in phases.folds:
        assert peak == r.combine.foreach_fold_bytes(members, group, r.projection, torch.device("cpu")) > 0
    assert traced == reported > 0


# ---- the switch's draw: on the parameter's device, seeded from the state ----


def test_switch_draws_on_the_parameters_device():
    """A switch draws its complement directions on the basis's device: on meta tensors (the CUDA code path,
    ``lowmem bench --launches``) the switch steps copy nothing from the host (one host-to-device copy per matrix
    per switch when the draw was on the CPU generator: 56 on llama-8x128) and launch one ``randn`` per matrix."""
    from lowmem.bench_launches import LaunchCounter

    ps = [torch.nn.Parameter(torch.zeros(32, 48, device="meta")) for _ in range(3)]
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = create_optimizer([{"params": ps, "rank": 4, "update_proj_gap": 2}], "alice")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with LaunchCounter():  # (it answers the host's reads of meta values)
            opt.step()  # (the first refresh: an SVD, no draw)
        with LaunchCounter() as c:
            opt.step()  # step 2: a switch
    assert c.counts["h2d"] == 0
    assert c.ops["randn"] == 3


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_a_resumed_run_draws_the_uninterrupted_runs_switches(shape, tmp_path):
    """The switch's generator is seeded from ``proj_meta`` (the seed and the refresh count): a run saved after
    step 3 (``torch.save`` / ``weights_only`` load into a new optimizer) goes on through the switches at 4, 6 and 8
    bit for bit as the uninterrupted run."""
    grads = _grads(shape, 8, 5)

    def run(save_at=None):
        p = torch.nn.Parameter(torch.zeros(shape))
        opt = create_optimizer([{"params": [p], "rank": 4, "update_proj_gap": 2}], "alice")
        for t, g in enumerate(grads, 1):
            p.grad = g.clone()
            opt.step()
            if t == save_at:
                torch.save(opt.state_dict(), tmp_path / "s.pt")
                p = torch.nn.Parameter(p.detach().clone())
                opt = create_optimizer([{"params": [p], "rank": 4, "update_proj_gap": 2}], "alice")
                opt.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
        return p.detach()

    assert torch.equal(run(), run(save_at=3))


# ---- the first basis by GaLore's randomized range finder (first_basis="rsvd") ----


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_rsvd_first_basis_spans_the_exact_one_on_a_low_rank_dominated_gradient(shape):
    """A gradient of rank 4 (singular values 10, 8, 6, 4) plus 1e-3 noise, rank 4: the range finder's first basis
    spans the exact SVD's subspace (projectors within 1e-4) and the first step moves the weight as the exact one
    (within 1e-3 of its movement); the default is the exact SVD (bit-equal to ``first_basis="svd"``)."""
    gen = torch.Generator().manual_seed(7)
    m, n = shape
    u = torch.linalg.qr(torch.randn(m, 4, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, 4, generator=gen))[0]
    g = u @ torch.diag(torch.tensor([10.0, 8.0, 6.0, 4.0])) @ v.t() + 1e-3 * torch.randn(m, n, generator=gen)

    def first(**extra):
        p = torch.nn.Parameter(torch.zeros(shape))
        opt = create_optimizer([{"params": [p], "rank": 4, **extra}], "alice")
        p.grad = g.clone()
        opt.step()
        st = opt.state[p]
        basis = st["proj_left"] if "proj_left" in st else st["proj_right"].t()
        return basis @ basis.t(), p.detach()

    (exact, w_exact), (approx, w_approx) = first(first_basis="svd"), first(first_basis="rsvd")
    default, w_default = first()
    assert (exact - approx).abs().max() <= 1e-4
    assert (w_exact - w_approx).abs().max() <= 1e-3 * w_exact.abs().max()
    assert torch.equal(default, exact) and torch.equal(w_default, w_exact)


def test_rsvd_first_refresh_is_counted_in_the_step_report():
    """``step_transient_bytes()`` of a 4096 x 4096 weight at rank 256 (meta): with the exact SVD the first refresh's
    402 MiB; with ``first_basis="rsvd"`` GaLore's ``rsvd`` count of the projected side (25.3 MiB) or a switch's
    (33.6 MiB) beside the step, under a fifth of the exact one's."""
    from lowmem.optim.functional import galore as GL

    def report(fb):
        p = torch.nn.Parameter(torch.empty(4096, 4096, device="meta"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return create_optimizer([{"params": [p], "rank": 256, "first_basis": fb}], "alice").step_transient_bytes()

    svd, rsvd = report("svd"), report("rsvd")
    assert svd >= GL.svd_refresh_bytes(4096, 4096)
    assert max(GL.rsvd_refresh_bytes(4096, 4096, 256, 1), switch_bytes(4096, 4096, 256, 40, 1)) <= rsvd < svd / 5


# ---- the Ritz vectors' signs (fix_signs) ----


@pytest.mark.parametrize("fix", [True, False])
def test_fix_signs_makes_a_switch_independent_of_eighs_sign_choice(monkeypatch, fix):
    """``eigh`` returns each eigenvector up to its sign. With ``fix_signs`` a switch returns the same basis whatever
    signs ``eigh`` chose (here: every other column of its eigenvectors negated), each Ritz vector's largest entry in
    the ``r x r`` rotation positive; with eigh's own signs those columns come back negated."""
    torch.manual_seed(0)
    d, e, r = 24, 40, 6
    a = torch.randn(d, e)
    u = torch.linalg.qr(torch.randn(d, r))[0]
    q = torch.diag(torch.linspace(2.0, 1.0, r))

    def run():
        return AL.switch(a, u, q, 0.9, r, 1, torch.Generator().manual_seed(0), fix_signs=fix)  # (l = r: no draw)

    plain = run()
    eigh = torch.linalg.eigh

    def flipped(x):
        w, v = eigh(x)
        v = v.clone()
        v[:, ::2] *= -1
        return torch.return_types.linalg_eigh((w, v))

    monkeypatch.setattr(torch.linalg, "eigh", flipped)
    other = run()
    if fix:
        assert torch.equal(other, plain)
    else:  # (eigh's columns in ascending order, flipped: the even columns from the end)
        negated = [j for j in range(r) if (r - 1 - j) % 2 == 0]
        assert torch.allclose(other[:, negated], -plain[:, negated]) and not torch.allclose(other, plain)
