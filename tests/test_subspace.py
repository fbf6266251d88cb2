"""FRUGAL and Online Subspace Descent against plain loops written from their papers' algorithms, and
the shared subspace parts: refresh robustness, staggering, moment policies, randomized SVD,
grouping from a model and the Llama-shaped accounting."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lowmem.optim import Frugal, GaLoreAdamW, OnlineSubspaceDescent, create_optimizer
from lowmem.optim.functional import galore as GL
from lowmem.optim.functional import osd as OSD


def grads(shape, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base * 0.5 + torch.randn(shape, generator=g) * (1 + t % 3) for t in range(steps)]


# ---- FRUGAL (Zmushko et al. 2024, Algorithm 1) --------------------------------------------------


def frugal_reference(w, gs, rank, gap, lr, betas, eps, wd, free_lr_scale, rule, projection):
    """Algorithm 1: every T steps a new subspace and zeroed moments (their step count too, as the authors'
    code); Adam on P^T G (state-full),
    signSGD on G - P P^T G (state-free); decoupled weight decay first (torch's AdamW)."""
    w = w.clone()
    b1, b2 = betas
    m, n = w.shape
    for t, g in enumerate(gs, start=1):
        k = (t - 1) // gap
        if (t - 1) % gap == 0:
            if projection == "svd":
                U, S, Vh = torch.linalg.svd(g, full_matrices=False)
                basis = Vh[:rank] if m >= n else U[:, :rank]
            else:  # blocks: the k-th contiguous block of `rank` columns (m >= n) or rows, cycling
                size = n if m >= n else m
                start = (k % math.ceil(size / rank)) * rank
                idx = torch.arange(start, start + rank) % size
            mom, vel, t0 = None, None, t - 1  # zeroed moments, counted again from 1 (the authors' reset_statistics)
        if projection == "svd":
            low = g @ basis.t() if m >= n else basis.t() @ g
        else:
            low = g[:, idx] if m >= n else g[idx]
        if mom is None:
            mom, vel = torch.zeros_like(low), torch.zeros_like(low)
        mom = b1 * mom + (1 - b1) * low
        vel = b2 * vel + (1 - b2) * low * low
        # bias corrections count the steps since the reset: the authors' _init_state sets state["step"] = 0
        direction_low = (mom / (1 - b1**(t - t0))) / ((vel / (1 - b2**(t - t0))).sqrt() + eps)
        if projection == "svd":
            full = direction_low @ basis if m >= n else basis @ direction_low
            back = low @ basis if m >= n else basis @ low
        else:
            full, back = torch.zeros_like(g), torch.zeros_like(g)
            if m >= n:
                full[:, idx], back[:, idx] = direction_low, low
            else:
                full[idx], back[idx] = direction_low, low
        free = torch.sign(g - back) if rule == "signsgd" else g - back
        w = w * (1 - lr * wd)
        w = w - lr * (full + free_lr_scale * free)
    return w


@pytest.mark.parametrize("projection", ["svd", "blocks"])
@pytest.mark.parametrize("shape", [(24, 16), (10, 30)])
@pytest.mark.parametrize("rule", ["signsgd", "sgd"])
def test_frugal_matches_algorithm(projection, shape, rule):
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    gs = grads(shape, 17)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref = frugal_reference(w0, gs, rank=4, gap=5, free_lr_scale=0.3, rule=rule, projection=projection,
                           wd=0.1, lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    p = nn.Parameter(w0.clone())
    opt = Frugal([{"params": [p], "rank": 4, "update_proj_gap": 5, "projection": projection,
                   "free_lr_scale": 0.3, "free_rule": rule}], **kw)
    for g in gs:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), ref, rtol=1e-5, atol=1e-6)


def test_frugal_coordinate_subspaces_are_complementary():
    """Columns / rows / RandK: the state-full and state-free parts partition the gradient."""
    for projection, low_numel in [("columns", 24 * 4), ("rows", 4 * 16), ("randk", 4 * 24)]:
        p = nn.Parameter(torch.zeros(24, 16))
        opt = Frugal([{"params": [p], "rank": 4, "projection": projection, "free_rule": "sgd"}], lr=1.0, betas=(0.0, 0.0), eps=0.0)
        p.grad = torch.randn(24, 16)
        opt.step()
        assert opt.state[p]["exp_avg"].numel() == low_numel
        # with beta = 0 Adam's direction is sign(g) on the subspace; SGD elsewhere: -p = sign or g
        upd = -p.detach()
        in_sub = (upd == torch.sign(p.grad))
        assert torch.equal(in_sub | (upd == p.grad), torch.ones_like(in_sub))
        assert in_sub.sum() >= low_numel and (upd == p.grad).sum() >= p.numel() - low_numel


# ---- Online Subspace Descent (Liang et al. 2024, Algorithm 1) -----------------------------------


def osd_reference(w, gs, rank, lr, proj_lr, betas, eps, scale, proj_weight_decay=0.01):
    """Algorithm 1: P_0 from an SVD; each step W <- W - lr * scale * Adam(P^T G) mapped back with P_t,
    then P_{t+1} = P_t - AdamW step on || G_n - G_n P^T P ||^2 (autograd; G_n = G / ||G||). The basis
    optimizer is the authors' (kyleliang919/Online-Subspace-Descent): torch.optim.AdamW at its default
    weight decay 0.01 (lowmem's ``proj_weight_decay=None``, 7a5fa81)."""
    w = w.clone()
    b1, b2 = betas
    basis = torch.linalg.svd(gs[0], full_matrices=False)[2][:rank].clone().requires_grad_(True)  # right (m >= n)
    popt = torch.optim.AdamW([basis], lr=proj_lr, weight_decay=proj_weight_decay, foreach=False)
    mom = vel = None
    for t, g in enumerate(gs, start=1):
        low = g @ basis.detach().t()
        mom = (1 - b1) * low if mom is None else b1 * mom + (1 - b1) * low
        vel = (1 - b2) * low * low if vel is None else b2 * vel + (1 - b2) * low * low
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        w = w - step * scale * ((mom / (vel.sqrt() + eps)) @ basis.detach())
        if t == 1:
            continue  # P_0 is optimal for G_0: the first PCA step comes with the next gradient
        gn = g / g.norm()
        popt.zero_grad()
        ((gn @ basis.t() @ basis - gn).norm() ** 2).backward()
        popt.step()
    return w, basis.detach()


def test_osd_matches_algorithm():
    torch.manual_seed(0)
    w0 = torch.randn(24, 16)
    gs = grads((24, 16), 15)
    ref_w, ref_basis = osd_reference(w0, gs, rank=4, lr=1e-2, proj_lr=1e-2, betas=(0.9, 0.99), eps=1e-6, scale=0.5)
    p = nn.Parameter(w0.clone())
    opt = OnlineSubspaceDescent([{"params": [p], "rank": 4, "proj_lr": 1e-2, "scale": 0.5}], lr=1e-2, betas=(0.9, 0.99))
    for g in gs:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(opt.state[p]["proj_right"], ref_basis, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p.detach(), ref_w, rtol=1e-5, atol=1e-6)
    assert opt.state[p]["proj_meta"][2] == 1  # one SVD, then learned online
    # without the basis decay (proj_weight_decay=0): the plain Adam basis step
    ref_w0, ref_basis0 = osd_reference(w0, gs, rank=4, lr=1e-2, proj_lr=1e-2, betas=(0.9, 0.99), eps=1e-6, scale=0.5,
                                       proj_weight_decay=0.0)
    p0 = nn.Parameter(w0.clone())
    opt0 = OnlineSubspaceDescent([{"params": [p0], "rank": 4, "proj_lr": 1e-2, "scale": 0.5, "proj_weight_decay": 0.0}],
                                 lr=1e-2, betas=(0.9, 0.99))
    for g in gs:
        p0.grad = g.clone()
        opt0.step()
    torch.testing.assert_close(opt0.state[p0]["proj_right"], ref_basis0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p0.detach(), ref_w0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side,shape", [("left", (10, 30)), ("right", (24, 16))])
def test_pca_loss_gradient_is_autograd(side, shape):
    g = torch.randn(shape, dtype=torch.float64)
    basis = torch.randn((shape[0], 3) if side == "left" else (3, shape[1]), dtype=torch.float64, requires_grad=True)
    gn = g / g.norm()
    rec = basis @ basis.t() @ gn if side == "left" else gn @ basis.t() @ basis
    ((rec - gn).norm() ** 2).backward()
    torch.testing.assert_close(OSD.pca_loss_grad(basis.detach(), g, side), basis.grad)


# ---- shared parts: refreshes never crash, staggering, moments, rsvd ------------------------------


def test_zero_and_nonfinite_gradient_keep_the_old_projection():
    p = nn.Parameter(torch.randn(24, 16))
    opt = GaLoreAdamW([{"params": [p], "rank": 4, "update_proj_gap": 2, "scale": 1.0, "proj_type": "std"}], lr=1e-2)
    p.grad = torch.zeros(24, 16)  # first refresh skipped: retried next step
    with pytest.warns(UserWarning, match="refresh skipped"):
        opt.step()
    assert opt.state[p]["proj_meta"][2] == 0
    p.grad = torch.randn(24, 16)
    opt.step()  # t = 2: the first usable gradient sets the basis
    basis = opt.state[p]["proj_right"].clone()
    assert opt.state[p]["proj_meta"][2] == 1 and basis.abs().sum() > 0
    p.grad = torch.zeros(24, 16)
    with pytest.warns(UserWarning, match="refresh skipped"):
        opt.step()  # t = 3 is a refresh step: zero gradient -> old basis kept
    p.grad = torch.randn(24, 16)
    opt.step()  # t = 4
    with pytest.warns(UserWarning, match="refresh skipped"):  # t = 5 is due; a NaN gradient keeps the basis
        assert opt.refresh_projection(p, torch.full((24, 16), float("nan")), opt.param_groups[0])
    assert torch.equal(opt.state[p]["proj_right"], basis)
    assert torch.isfinite(p).all()


def test_rank_at_or_above_smaller_side_falls_back_to_full_rank():
    p, q = nn.Parameter(torch.randn(6, 20)), nn.Parameter(torch.randn(20, 20))  # rank 6 applies to q only
    with pytest.warns(UserWarning, match="full-rank"):  # said once, when the group is added
        opt = GaLoreAdamW([{"params": [p, q], "rank": 6, "scale": 1.0}], lr=1e-2)
    p.grad, q.grad = torch.randn(6, 20), torch.randn(20, 20)
    opt.step()
    assert opt.state[p]["exp_avg"].shape == (6, 20) and "proj_meta" not in opt.state[p]
    assert "proj_meta" in opt.state[q]


def test_staggered_refreshes_spread_over_the_gap():
    params = [nn.Parameter(torch.randn(12, 8)) for _ in range(4)]
    opt = GaLoreAdamW([{"params": params, "rank": 2, "update_proj_gap": 4, "scale": 1.0, "refresh_phase": "staggered"}])
    per_step = []
    for _ in range(9):
        before = [int(opt.state[p]["proj_meta"][2]) if opt.state[p] else 0 for p in params]
        for p in params:
            p.grad = torch.randn(12, 8)
        opt.step()
        per_step.append(sum(int(opt.state[p]["proj_meta"][2]) - b for p, b in zip(params, before)))
    assert per_step[0] == 4  # every parameter needs a first basis
    assert per_step[1:] == [1] * 8  # then exactly one refresh per step


@pytest.mark.parametrize("projection", ["svd", "columns"])
def test_rotate_policy_moves_moments_into_the_new_basis(projection):
    """Refreshing onto the same subspace must leave rotated moments unchanged (they would be zeroed
    by 'reset'); onto a new one, the first moment is carried: M' = T_l M T_r."""
    g = torch.randn(24, 16)
    p = nn.Parameter(torch.zeros(24, 16))
    opt = Frugal([{"params": [p], "rank": 4, "update_proj_gap": 1, "projection": projection, "moment_policy": "rotate",
                   "seed": 0}], lr=1e-3)
    p.grad = g.clone()
    opt.step()
    st = opt.state[p]
    m_before = st["exp_avg"].clone()
    old = opt.recipe.projection.snapshot(st, opt.param_groups[0])
    p.grad = g.clone()
    opt.step()  # refresh (gap 1) then moment update with the same gradient
    if projection == "svd":  # same gradient -> same subspace: rotation is (up to signs) the identity
        expected_m = 0.9 * GL.rotate_low_rank(m_before, GL.basis_transition((None, old["proj_right"]), (None, st["proj_right"])))
        expected_m += 0.1 * (g @ st["proj_right"].t())
        torch.testing.assert_close(st["exp_avg"], expected_m, rtol=1e-4, atol=1e-5)
        assert st["exp_avg"].abs().sum() > 0.5 * m_before.abs().sum()
    else:  # new random columns: kept columns keep their moments, new ones start from zero
        idx_old, idx_new = old["proj_index"].tolist(), st["proj_index"].tolist()
        for j, c in enumerate(idx_new):
            prev = m_before[:, idx_old.index(c)] if c in idx_old else torch.zeros(24)
            torch.testing.assert_close(st["exp_avg"][:, j], 0.9 * prev + 0.1 * g[:, c])


def test_rsvd_finds_the_dominant_subspace():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(48, 48))
    s = torch.cat([torch.tensor([10.0, 8, 6, 5]), 0.01 * torch.rand(44)])
    g = u[:, :48] * s @ v.t()
    exact, _ = GL.svd_basis(g, 4, "left")
    gen = torch.Generator().manual_seed(0)
    approx = GL.range_finder(g, 4, gen, power_iters=2)
    assert torch.linalg.matrix_norm(exact @ exact.t() - approx @ approx.t(), 2) < 1e-3
    warm = GL.subspace_iteration(g + 0.001 * torch.randn(64, 48), approx, iters=1)
    assert torch.linalg.matrix_norm(exact @ exact.t() - warm @ warm.t(), 2) < 1e-2


@pytest.mark.parametrize("projection", ["rsvd", "random", "gaussian"])
def test_cheap_projections_train(projection):
    torch.manual_seed(0)
    target = torch.randn(32, 16)
    p = nn.Parameter(torch.zeros(32, 16))
    opt = GaLoreAdamW([{"params": [p], "rank": 4, "update_proj_gap": 3, "scale": 1.0, "projection": projection}], lr=0.1)
    first = None
    for _ in range(100):
        loss = (p - target).pow(2).sum()
        p.grad = torch.autograd.grad(loss, p)[0]
        opt.step()
        first = first or loss.item()
    assert loss.item() < 0.4 * first


def test_invalid_combination_raises():
    with pytest.raises(ValueError, match="proj_type='full'"):
        Frugal([{"params": [nn.Parameter(torch.zeros(4, 4))], "rank": 2, "proj_type": "full", "projection": "columns"}])
    with pytest.raises(ValueError, match="projection"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(4, 4))], "rank": 2, "projection": "online_pca"}])


def test_create_optimizer_groups_from_a_model():
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 32), nn.Linear(32, 8))
    opt = create_optimizer(model, "galore_adamw", rank=4, target_modules=["0", "2"], weight_decay=0.1)
    projected = [g for g in opt.param_groups if g.get("rank")]
    assert len(projected) == 1 and {id(p) for p in projected[0]["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert projected[0]["update_proj_gap"] == 200 and projected[0]["scale"] == 0.25 and projected[0]["projection"] == "svd"
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_llama_7b_shaped_accounting_matches_the_formula():
    """GaLore at rank r on Llama-2-7B (meta device): projected weights keep 2 moments of
    max(m, n) x r, a min(m, n) x r basis and 48 bytes of bookkeeping; the rest AdamW's 8 bytes."""
    from lowmem.memory import shape_config, state_bytes_at_scale
    from lowmem.memory.estimate import build_meta_model
    from lowmem.optim.registry import subspace_target_names

    r = 128
    adamw = state_bytes_at_scale("adamw")
    galore = state_bytes_at_scale("galore_adamw", rank=r)
    model = build_meta_model(shape_config("llama-2-7b"), torch.float32)
    targets = set(subspace_target_names(model))
    expected = 0
    for name, p in model.named_parameters():
        if name in targets:
            m, n = p.shape
            expected += 2 * max(m, n) * r * 4 + min(m, n) * r * 4 + 6 * 8 + 4
        else:
            expected += 8 * p.numel() + 4
    assert galore["state_bytes"] == expected
    assert galore["trainable_params"] == adamw["trainable_params"] > 6.7e9
    assert abs(adamw["bytes_per_param"] - 8.0) < 1e-5 and galore["bytes_per_param"] < 0.7


def test_gpt2_conv1d_layers_are_projected():
    # GPT-2-family models use transformers' Conv1D (weight stored [in, out]) instead of nn.Linear
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32))
    opt = create_optimizer(model, "galore_adamw", rank=8)
    projected = [g for g in opt.param_groups if g.get("rank") is not None]
    assert len(projected) == 1 and len(projected[0]["params"]) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    ids = torch.randint(0, 100, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    adamw = create_optimizer(model, "adamw")
    adamw.materialize_state()
    opt.materialize_state()
    assert opt.state_bytes() < 0.75 * adamw.state_bytes()  # the 2-D block weights keep rank-8 moments


def test_no_projection_layer_warns():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    with pytest.warns(UserWarning, match="no trainable projection layer"):
        create_optimizer(model, "galore_adamw", rank=2)


@pytest.mark.parametrize("name", ["fira_adamw", "fira_adamw8bit"])
def test_fira_refuses_two_sided_projection_naming_the_field(name):
    """Fira scales the residual per column / row of a one-sided projection; proj_type='full' has
    neither (fira 1.0.2 crashes at its first step): an error at construction naming proj_type."""
    p = [torch.nn.Parameter(torch.randn(24, 40))]
    with pytest.raises(ValueError, match="proj_type"):
        create_optimizer(p, name, rank=4, proj_type="full")


def _fira_pieces(shape, proj_type, scale):
    """A fira_adamw parameter after its first step (basis, moments, step 1 recorded) and a step-2
    projected gradient ``low`` and an Adam-like direction ``d_low`` (any tensor of ``low``'s shape)."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(*shape))
    opt = create_optimizer([p], "fira_adamw", rank=6, update_proj_gap=100, proj_type=proj_type, scale=scale)
    p.grad = torch.randn(*shape)
    opt.step()
    state, group, recipe = opt.state[p], opt.param_groups[0], opt.recipe
    state["step"].fill_(3)  # unit scale c = sqrt(1 - b2^3) / (1 - b1^3) != 1
    g = torch.randn(*shape)
    low = recipe.projection.down(g, state, group)
    d_low = torch.randn_like(low)
    return g, low, d_low, state, group, recipe


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (33, 50), (50, 33)])
@pytest.mark.parametrize("proj_type", ["left", "right"])
@pytest.mark.parametrize("limited", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_fira_folded_rows_equal_unfolded_rows(shape, proj_type, limited, scale):
    """Fira's combine-back folded into one GEMM per row block (FiraResidual.fold:
    ``up_rows(alpha (d_low - low * k)) + G_rows * k``, ``k = f c / l``) equals the unfolded rows
    ``alpha up_rows(d_low) + (G_rows - alpha up_rows(low)) f c / l`` and the whole-tensor direction,
    on both sides (per-column factor on the left, per-row on the right), limiter active or not."""
    g, low, d_low, state, group, recipe = _fira_pieces(shape, proj_type, scale)
    combine, P = recipe.combine, recipe.projection
    assert (low.shape[0] < low.shape[1]) == (proj_type == "left")
    state["fira_prev_norm"].fill_(1e-3 if limited else 1e6)
    whole_state = {k: v.clone() for k, v in state.items()}
    bounds = [(a, min(a + 7, shape[0])) for a in range(0, shape[0], 7)]  # uneven row blocks
    ctx = combine.prepare(g, low, d_low, state, group, P, bounds)
    inner, folded = ctx
    assert folded is not None
    limiter = inner[1]
    assert (limiter > 1.0).item() == limited
    rows_folded = torch.cat([combine.direction_rows(g[a:b], low, d_low, state, group, P, a, b, ctx) for a, b in bounds])
    rows_plain = torch.cat([combine.unfolded_rows(g[a:b], low, d_low, state, group, P, a, b, inner) for a, b in bounds])
    whole = combine.direction(g, low, d_low, whole_state, group, P)
    tol = dict(rtol=1e-6, atol=1e-6 * rows_plain.abs().max().item())
    torch.testing.assert_close(rows_folded, rows_plain, **tol)
    torch.testing.assert_close(rows_folded, whole, **tol)
    torch.testing.assert_close(whole_state["fira_prev_norm"], state["fira_prev_norm"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name,projection", [("galore_adamw", "svd"), ("galore_adamw", "rsvd"),
                                             ("fira_adamw", "svd"), ("osd_adamw", "online_pca")])
@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
def test_bases_are_column_major_and_step_as_row_major_ones(name, projection, proj_type):
    """Issue 15: a basis is stored column by column (GL.basis_zeros: the project-down GEMM's transposed
    operand contiguous, faster on MKL) and steps as the same basis stored row-major (a checkpoint from
    before the change, or any copy): only the memory order differs.

    Equal to float32 GEMM rounding, not bit for bit: no BLAS promises the same bits for the two layouts
    of an operand (MKL on an Intel Xeon gave them, MKL on an AMD EPYC takes another kernel for the
    transposed operand and rounds differently). Each float tensor of the two runs agrees within
    ``steps * gamma_k * max|x|``, ``gamma_k = k u / (1 - k u)`` the worst-case relative error of a
    ``k``-term float32 dot product (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.4),
    ``k = 40`` the longest reduction here, ``u = 2^-24``, one such error per step: 1.7e-5 of the
    tensor's largest entry. Measured on the EPYC: at most 4.8e-6 of it (the rsvd basis, whose power
    iteration starts from the previous basis), the weights within 2.4e-7 (half an ulp of their largest
    entry); a basis read as if it were row-major moves the weights by ~lr = 1e-2. Integer state
    (step counts, refresh bookkeeping) is equal exactly."""
    if name == "fira_adamw" and proj_type == "full" or name == "osd_adamw" and proj_type == "full":
        pytest.skip("fira and online_pca are one-sided")
    torch.manual_seed(0)
    w0 = torch.randn(40, 24)
    gs = grads((40, 24), 7)
    runs = []
    for row_major in (False, True):
        p = nn.Parameter(w0.clone())
        opt = create_optimizer([p], name, rank=6, update_proj_gap=3, proj_type=proj_type, projection=projection,
                               lr=1e-2)
        for t, g in enumerate(gs):
            p.grad = g.clone()
            opt.step()
            st = opt.state[p]
            for key, rows in (("proj_left", 40), ("proj_right", 6)):
                if key in st:
                    if t == 0 and not row_major:
                        assert st[key].stride() == (1, rows), key
                    if row_major:
                        st[key] = st[key].contiguous()
        runs.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    (w_a, s_a), (w_b, s_b) = runs
    k, u = 40, 2.0**-24
    rel = len(gs) * k * u / (1 - k * u)
    for key, a, b in [("weight", w_a, w_b)] + [(key, s_a[key], s_b[key]) for key in s_a]:
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0, atol=rel * a.abs().max().item(), msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(a, b), key


# ---- moment_policy="reset": the moments' step count restarts with them -----------------------------


def test_reset_moments_restart_their_bias_correction():
    """The first step after a refresh that zeroes FRUGAL's moments is Adam's first step again: on a
    constant gradient (``eps=0``, the next block of 3 of the 6 columns at step T+1 = 4), every coordinate
    moves by exactly ``lr`` at steps 1 and 4 alike, Adam's and signSGD's. A count that kept going would
    move the new block by ``lr (1 - b1) sqrt(1 - b2^t) / ((1 - b1^t) sqrt(1 - b2))``: 0.58 lr at t = 4,
    3.16 lr once ``t`` is large."""
    g = torch.randn(8, 6).abs() + 0.5
    p = nn.Parameter(torch.zeros(8, 6))
    opt = Frugal([{"params": [p], "rank": 3, "update_proj_gap": 3, "projection": "blocks", "proj_type": "std"}],
                 lr=0.1, betas=(0.9, 0.999), eps=0.0)
    moves = []
    for _ in range(4):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        moves.append((before - p.detach()).abs())
    assert opt.state[p]["moment_start"].item() == 3.0 and opt.state[p]["proj_index"].tolist() == [3, 4, 5]
    for t in (0, 3):
        torch.testing.assert_close(moves[t], torch.full_like(moves[t], 0.1), rtol=1e-5, atol=0)


def test_checkpoint_without_moment_start_loads_and_counts_from_the_first_step():
    """A FRUGAL checkpoint saved before ``moment_start`` existed loads (its moments count from step 1
    until their next reset, as they did); the rules that do not restart (Subspace-Momentum's
    subset-norm rule, GaLore's ``keep``) keep no ``moment_start``."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 6))
    opt = Frugal([{"params": [p], "rank": 2, "update_proj_gap": 2}], lr=1e-2)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    sd = opt.state_dict()
    assert "moment_start" in sd["state"][0]
    del sd["state"][0]["moment_start"]
    again = Frugal([{"params": [p], "rank": 2, "update_proj_gap": 2}], lr=1e-2)
    again.load_state_dict(sd)
    assert again.state[p]["moment_start"].item() == 0.0 and again.state[p]["moment_start"].device.type == "cpu"
    for name in ("galore_adamw", "adamw_snsm"):
        q = nn.Parameter(torch.randn(8, 6))
        o = create_optimizer([{"params": [q], "rank": 2}], name)
        q.grad = torch.randn_like(q)
        o.step()
        assert "moment_start" not in o.state[q], name
