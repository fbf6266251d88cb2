"""SPAM and Stable-SPAM against plain loops written from the papers' algorithms (as the reference
implementations run them), and the stabilizers composed with quantized moments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowmem.optim import SPAM, LowMemOptimizer, Recipe, StableSPAM
from lowmem.optim.hparams import BETAS, EPS, LR, WEIGHT_DECAY
from lowmem.optim.moments import AdamMoments
from lowmem.optim.quantized import M1_8BIT, M2_8BIT, Quantized, quant_hparams
from lowmem.optim.stabilizers import SPAM_HPARAMS, SPAMStabilizer


def spiky_grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = []
    for t in range(steps):
        x = torch.randn(shape, generator=g)
        if t % 4 == 3:  # a gradient spike on a few entries
            x.view(-1)[:5] *= 300.0
        grads.append(x)
    return grads


def plain_spam(p, grads, lr, betas, eps, weight_decay, threshold, reset_interval, warmup_steps, grad_accu_steps):
    """SPAM, Algorithm 1 (Huang et al. 2025), step for step as the reference AdamW runs it."""
    b1, b2 = betas
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    since_reset = warmup_steps + 1  # no warm-up before the first reset
    for t, g in enumerate(grads, 1):
        c = since_reset
        scale = 1.0 if c >= warmup_steps else 1.0 - 0.99 * (1 + math.cos(math.pi * c / (warmup_steps + 1))) / 2
        if t % reset_interval == 0:
            m, v = torch.zeros_like(p), torch.zeros_like(p)
        if t >= grad_accu_steps and t % reset_interval >= grad_accu_steps:
            spike = g * g > threshold * v
            g = torch.where(spike, g.sign() * (threshold * v).sqrt(), g)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        p = p - step * scale * m / (v.sqrt() + eps)
        p = p - lr * weight_decay * p
        since_reset += 1
        if (t + 1) % reset_interval == 0:
            since_reset = 0
    return p


def plain_stable_spam(p, grads, lr, betas, eps, weight_decay, gamma1, gamma2, theta, reset_interval, t_max=None,
                      stats_step="global"):
    """Stable-SPAM, Algorithm 1 (Huang et al. 2025): AdaClip, AdaGN, MoRet with bias-correction restart;
    with ``t_max``, the reference's cosine decay of beta1 and gamma1 (both EMAs and their corrections).
    ``stats_step="since_reset"``: the authors' code, one counter for Adam and the norm statistics,
    set to 1 on a reset step after the statistics used it (their EMAs are never reset)."""
    b1_base, b2 = betas
    gamma1_base = gamma1
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    max_ema = norm_m = norm_v = torch.tensor(0.0)
    k = 0
    for t, g in enumerate(grads, 1):
        c = k + 1  # the authors' shared counter before a reset sets it to 1
        if t % reset_interval == 0:
            k = 1
            m, v = torch.zeros_like(p), torch.zeros_like(p)
        else:
            k += 1
        ts = t if stats_step == "global" else c
        s = 1.0 if t_max is None else 0.5 + 0.5 * (1 + math.cos(math.pi * t / (t_max + 1))) / 2
        b1, gamma1 = b1_base * s, gamma1_base * s
        p = p * (1 - lr * weight_decay)
        g_max = g.abs().max()
        max_ema = theta * max_ema + (1 - theta) * g_max
        bound = max_ema / (1 - theta**ts)
        g = torch.where(g.abs() > bound, g / g_max * bound, g)
        n = g.norm()
        norm_m = gamma1 * norm_m + (1 - gamma1) * n
        norm_v = gamma2 * norm_v + (1 - gamma2) * n * n
        g = g / n * ((norm_m / (1 - gamma1**ts)) / ((norm_v / (1 - gamma2**ts)).sqrt() + eps))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr / (1 - b1**k) * m / (v.sqrt() / math.sqrt(1 - b2**k) + eps)
    return p


SPAM_CFG = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, threshold=5.0, reset_interval=7,
                warmup_steps=3, grad_accu_steps=2)
STABLE_CFG = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, gamma1=0.7, gamma2=0.9, theta=0.99,
                  reset_interval=7)


@pytest.mark.parametrize("cls,cfg,plain", [(SPAM, SPAM_CFG, plain_spam), (StableSPAM, STABLE_CFG, plain_stable_spam)])
def test_matches_plain_loop(cls, cfg, plain):
    grads = spiky_grads((12, 9), 24)  # three resets, spikes every 4 steps
    p0 = torch.randn(12, 9, generator=torch.Generator().manual_seed(5))
    p = nn.Parameter(p0.clone())
    opt = cls([p], **cfg)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), plain(p0, grads, **cfg), rtol=1e-5, atol=1e-6)


def test_stable_spam_beta1_cosine_decay_matches_plain_loop():
    grads = spiky_grads((12, 9), 30)
    p0 = torch.randn(12, 9, generator=torch.Generator().manual_seed(6))
    cfg = {**STABLE_CFG, "t_max": 12}  # 30 steps: down to half at t = 13 and up again, as the reference
    p = nn.Parameter(p0.clone())
    opt = StableSPAM([p], **cfg)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), plain_stable_spam(p0, grads, **cfg), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(p.detach(), plain_stable_spam(p0, grads, **STABLE_CFG), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="t_max"):
        StableSPAM([p], t_max=0)


def test_stable_spam_stats_step_since_reset_is_the_authors_counter():
    grads = spiky_grads((12, 9), 24)
    p0 = torch.randn(12, 9, generator=torch.Generator().manual_seed(7))
    out = {}
    for mode in ("global", "since_reset"):
        p = nn.Parameter(p0.clone())
        opt = StableSPAM([p], **STABLE_CFG, stats_step=mode)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out[mode] = p.detach()
    for mode, got in out.items():
        torch.testing.assert_close(got, plain_stable_spam(p0, grads, **STABLE_CFG, stats_step=mode), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out["global"], out["since_reset"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="stats_step"):
        StableSPAM([nn.Parameter(p0.clone())], stats_step="reset")


def test_stats_step_counts():
    from lowmem.optim.functional import spam as S

    assert [S.stats_step(t, 5) for t in range(1, 17)] == [1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 2, 3, 4, 5, 6, 2]
    assert [S.stats_step(t, 0) for t in (1, 7, 100)] == [1, 7, 100]


def test_beta1_scale_is_the_reference_cosine_annealing():
    """The reference builds the scale with torch's CosineAnnealingLR(T_max = t_max + 1, eta_min = 0.5)
    on a dummy SGD with lr 1, stepped with the global step count."""
    import warnings

    from lowmem.optim.functional import spam as S

    t_max = 10
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, t_max + 1, 0.5)
    for t in range(1, 3 * t_max):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stepping with an explicit epoch is deprecated
            sched.step(t)
        assert S.cosine_beta1_scale(t, t_max) == pytest.approx(sgd.param_groups[0]["lr"], abs=1e-12)
    assert S.cosine_beta1_scale(5, None) == 1.0


def test_spam_clipping_actually_clips():
    grads = spiky_grads((12, 9), 12)
    runs = []
    for threshold in (5.0, 0.0):
        p = nn.Parameter(torch.zeros(12, 9))
        opt = SPAM([p], **{**SPAM_CFG, "threshold": threshold})
        for g in grads:
            p.grad = g.clone()
            opt.step()
        runs.append(p.detach().clone())
    assert not torch.allclose(runs[0], runs[1])


def test_spam_composes_with_8bit_moments():
    """The stabilizer reads the decoded second moment and resets the codes."""
    recipe = Recipe(
        name="spam_adamw8bit", summary="", reference="",
        moment=Quantized(AdamMoments("hf"), {"exp_avg": M1_8BIT, "exp_avg_sq": M2_8BIT}),
        hparams=(LR(1e-2), BETAS(), EPS(1e-6), WEIGHT_DECAY(0.0), *SPAM_HPARAMS, *quant_hparams(64)),
        stabilizers=(SPAMStabilizer(),), decay_after_update=True,
    )
    target = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    hp = dict(lr=0.1, reset_interval=10, warmup_steps=2, grad_accu_steps=2, threshold=5.0)
    finals = []
    runs = ((lambda q: LowMemOptimizer([q], recipe, **hp), torch.uint8), (lambda q: SPAM([q], **hp), torch.float32))
    for opt_of, moment_dtype in runs:
        p = nn.Parameter(torch.zeros(64, 64))
        opt = opt_of(p)
        for t in range(1, 41):
            opt.zero_grad()
            loss = (p - target).pow(2).sum()
            loss.backward()
            opt.step()
            if t == 1:
                first = loss.item()
        finals.append(loss.item())
        assert finals[-1] < 0.2 * first
        assert opt.state[p]["exp_avg"].dtype == moment_dtype
    assert abs(finals[0] - finals[1]) < 0.1 * finals[1]  # 8-bit moments track the float32 ones


# ---- AdaClip's fast pieces (issue 15): the same bits as the formulas they replace -----------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_abs_max_is_the_inf_norm_bit_for_bit(dtype):
    """``abs_max`` (one ``aminmax`` pass) returns ``vector_norm(g, inf)``: mixed signs, all positive, all
    negative (the max of ``|g|`` is then ``-min``), a single element, and NaN propagating."""
    from lowmem.optim.functional.spam import abs_max

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1001, generator=g).to(dtype)
    cases = [x, x.abs() + 0.5, -x.abs() - 0.5, x[:1], -x[:1]]
    for c in cases:
        got, want = abs_max(c), torch.linalg.vector_norm(c, float("inf"))
        assert got.dtype == want.dtype and torch.equal(got, want), (got, want)
    nan = x.clone()
    nan[7] = float("nan")
    assert abs_max(nan).isnan()


def test_ada_clip_apply_is_the_where_formula_bit_for_bit():
    """The in-place AdaClip equals ``torch.where(|g| > bound, g / max|g| * bound, g)`` bit for bit (a bound that
    clips about a third of the entries, none, all but the largest, a zero gradient) and leaves ``g`` alone."""
    from lowmem.optim.functional.spam import abs_max, ada_clip_apply

    gen = torch.Generator().manual_seed(1)
    g = torch.randn(4097, generator=gen) * 1e-3
    g_max = abs_max(g)
    before = g.clone()
    for frac in (0.3, 2.0, 1e-6):
        bound = g_max * frac
        want = torch.where(g.abs() > bound, g / g_max * bound, g)
        assert torch.equal(ada_clip_apply(g, g_max, bound), want), frac
    assert torch.equal(g, before)
    z = torch.zeros(64)
    assert torch.equal(ada_clip_apply(z, abs_max(z), torch.tensor(0.0)), z)  # 0 / 0 only where nothing is picked



def _stable_spam_on_large_chunks(monkeypatch, clean_min):
    """Stable-SPAM on a 600 x 500 weight in chunks of 2^16 (5 chunks, the last partial) with spikes in one
    chunk on alternate steps: clean and clipped chunks in the same step. Returns the weight, the state and
    the sizes of the AdaClip passes that ran."""
    import lowmem.optim.functional.spam as S
    import lowmem.optim.stabilizers as ST
    from lowmem.optim.registry import create_optimizer

    monkeypatch.setattr(ST, "CLEAN_CHUNK_MIN", clean_min)
    calls = []
    orig = S.ada_clip_apply
    monkeypatch.setattr(S, "ada_clip_apply", lambda g, *a: calls.append(g.numel()) or orig(g, *a))
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(600, 500))
    opt = create_optimizer([p], "stable_spam", lr=1e-2, reset_interval=4)
    opt.chunk_numel = 2**16
    gen = torch.Generator().manual_seed(1)
    for i in range(8):
        g = torch.randn(p.shape, generator=gen)
        if i % 2:
            g.view(-1)[100000:100003] *= 30.0 * (i + 1)  # chunk 1 holds max|g| and entries above the bound
        p.grad = g
        opt.step()
    monkeypatch.undo()
    return p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}, calls


def test_stable_spam_skips_clipping_of_clean_chunks_with_the_same_bits(monkeypatch):
    """On the CPU a chunk whose own max|g| is within AdaClip's bound is not clipped (nothing would change):
    the weights and state equal those of the step that clips every chunk, bit for bit, and fewer AdaClip
    passes run (the chunk holding the spikes and the partial last chunk, under CLEAN_CHUNK_MIN, still do)."""
    fast_p, fast_s, fast_calls = _stable_spam_on_large_chunks(monkeypatch, 2**16)
    full_p, full_s, full_calls = _stable_spam_on_large_chunks(monkeypatch, 2**62)
    assert torch.equal(fast_p, full_p)
    assert all(torch.equal(fast_s[k], full_s[k]) for k in full_s)
    assert len(full_calls) == 8 * 2 * 5  # every chunk, in the norm pass and the update
    assert 8 * 2 <= len(fast_calls) < len(full_calls) // 2  # the partial last chunk always; the spiky one often


def test_stable_spam_clean_chunk_host_reads():
    """The skip's host reads, from stabilizers.py in one step: one flag list per parameter and one comparison
    per chunk of at least CLEAN_CHUNK_MIN (600 x 500 in chunks of 2^16: 4 full chunks); a parameter whose
    chunks are all smaller reads nothing (its step keeps the host reads pinned in test_speed_paths)."""
    import traceback
    from unittest import mock

    from lowmem.optim.registry import create_optimizer

    sites = []

    def counted(orig):
        def read(self, *args, **kwargs):
            sites.append(traceback.extract_stack()[-2].filename)
            return orig(self, *args, **kwargs)
        return read

    for shape, want in (((600, 500), 1 + 4), ((64, 48), 0)):
        p = nn.Parameter(torch.randn(shape))
        opt = create_optimizer([p], "stable_spam")
        opt.chunk_numel = 2**16
        for _ in range(2):
            p.grad = torch.randn(shape)
            opt.step()
        p.grad = torch.randn(shape)
        sites.clear()
        patches = [mock.patch.object(torch.Tensor, m, counted(getattr(torch.Tensor, m)))
                   for m in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")]
        for pt in patches:
            pt.start()
        try:
            opt.step()
        finally:
            for pt in patches:
                pt.stop()
        assert sum(f.endswith("stabilizers.py") for f in sites) == want, (shape, sites)


def test_stable_spam_whole_step_of_a_float64_parameter():
    """``chunk_numel=None`` (the whole-tensor step) on float64 weights: AdaClip's and AdaGN's statistics
    are float32 state, as on the chunked path (the float64 max / norm crashed ``lerp_``); the two
    paths agree to float32 rounding of those statistics."""
    from lowmem.optim import create_optimizer

    weights = []
    for chunk in (None, 256):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 32).double()
        opt = create_optimizer(model, "stable_spam", lr=1e-3)
        opt.chunk_numel = chunk
        for _ in range(3):
            model.zero_grad()
            model(torch.randn(4, 64, dtype=torch.float64)).square().sum().backward()
            opt.step()
        assert opt.state[model.weight]["spam_clip_max"].dtype == torch.float32
        weights.append(model.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-6, atol=1e-8)
