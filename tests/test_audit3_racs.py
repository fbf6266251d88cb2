"""Outside review of ``racs`` (AUDIT3) against the paper's text: Gong, Scetbon, Ma & Meeds 2025, "Towards Efficient
Optimizer Design for LLM via Structured Fisher Approximation with a Low-Rank Extension" (arXiv 2502.07752v2),
Section 4, Eq. 16 and Algorithm 1. The loop below is written here from the paper, in float64, without lowmem's code:

    Eq. 16 (from q = 1, this step's G as the one-sample E, 5 iterations):
        s = Diag(G^T Q G) / ||Q||_F^2 ,  q = Diag(G S G^T) / ||S||_F^2      (S = Diag_v(s), Q = Diag_v(q))
    Algorithm 1:  s_0 = q_0 = 0, phi_0 = 0
        s_t = beta s_{t-1} + (1 - beta) s ;  q_t = beta q_{t-1} + (1 - beta) q
        G~  = Diag_v(q_t)^-1/2 G Diag_v(s_t)^-1/2
        eta = gamma / max(||G~|| / phi_{t-1}, gamma) if t > 1 else 1 ;  phi_t = eta ||G~||
        W  <- W - lr eta alpha G~

Unseen settings (shapes m < n and m > n, 3-D, iterations 2 / 7, beta 0 / 0.99, gamma 1 / 2, weight decay, groups of
different settings, bfloat16 weights, a resumed ``state_dict`` loaded with ``weights_only=True``, a closure), and a
tensor whose gradient is all zero at one step moves again after it (FOUND_AUDIT3 1: it had stopped for good);
``state_bytes()`` and ``step_transient_bytes()`` against the state tensors and a traced step on new shapes.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

from lowmem.optim import create_optimizer


def _paper_racs(w0, grads, *, lr, beta=0.9, alpha=0.05, gamma=1.01, iterations=5, weight_decay=0.0, store=None):
    """Algorithm 1 with Eq. 16, float64, summation form written out (no eps: the paper has none). Returns the
    weights after each step and the final ``(q_t, s_t, phi_t)``; ``store``: the weights' dtype, each step's weight
    rounded to it (round to nearest)."""
    w = w0.double().reshape(w0.shape[0], -1).clone()
    m, n = w.shape
    s_t, q_t, phi = torch.zeros(n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64), 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.double().reshape(m, n)
        g2 = g * g
        q = torch.ones(m, dtype=torch.float64)
        for _ in range(iterations):
            # (an all-zero G makes s = 0 and the next q 0 / 0: floored as lowmem does, so q = 0 too)
            s = torch.stack([sum(q[i] * g2[i, j] for i in range(m)) for j in range(n)]) / (q * q).sum().clamp(1e-300)
            q = torch.stack([sum(s[j] * g2[i, j] for j in range(n)) for i in range(m)]) / (s * s).sum().clamp(1e-300)
        s_t = beta * s_t + (1 - beta) * s
        q_t = beta * q_t + (1 - beta) * q
        g_tilde = g / (q_t.sqrt()[:, None] * s_t.sqrt()[None, :])
        norm = float(g_tilde.norm())
        # (phi = 0 after an all-zero gradient: lowmem's eta = 1, the paper's Algorithm 3 rule; Algorithm 1 divides by 0)
        eta = 1.0 if t == 1 or phi == 0 else gamma / max(norm / phi, gamma)
        phi = eta * norm
        w = w - lr * weight_decay * w - lr * eta * alpha * g_tilde
        if store is not None:
            w = w.to(store).double()
        out.append(w.reshape(w0.shape).clone())
    return out, (q_t, s_t, phi)


def _grads(shape, steps, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    # (the scale changes from step to step, so that the limiter both holds and lets go)
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * (0.2 + 3.0 * (t % 3 == 1))).to(dtype)
            for t in range(steps)]


CONFIGS = [
    ((7, 3), {"lr": 0.02, "iterations": 2, "beta": 0.0, "gamma": 1.0}),
    ((3, 11), {"lr": 0.05, "iterations": 7, "beta": 0.99, "alpha": 0.5, "gamma": 2.0}),
    ((2, 3, 2, 2), {"lr": 0.1, "weight_decay": 0.2, "alpha": 0.3}),
    ((5, 6), {"lr": 0.02}),  # the paper's lr, everything else lowmem's defaults (= the paper's)
]


@pytest.mark.parametrize("shape,config", CONFIGS, ids=[f"{s}-{i}" for i, (s, _) in enumerate(CONFIGS)])
def test_engine_equals_the_papers_algorithm_1(shape, config):
    """float64 weights with float64 state (``state_dtype='param'``), 6 steps, whole and in blocks of one row: the
    weights and ``(q_t, s_t, phi_t)`` equal the loop above to 1e-9 (lowmem's ``eps`` 1e-30 is below rounding)."""
    grads = _grads(shape, 6, 3)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    want, (q_t, s_t, phi) = _paper_racs(w0, grads, **config)
    cols = w0.reshape(shape[0], -1).shape[1]
    for chunk in (None, cols):
        p = torch.nn.Parameter(w0.clone())
        opt = create_optimizer([p], "racs", state_dtype="param", **config)
        opt.chunk_numel = chunk
        for t, g in enumerate(grads):
            p.grad = g.clone()
            opt.step()
            torch.testing.assert_close(p.detach(), want[t], rtol=1e-9, atol=1e-12, msg=lambda m: f"step {t + 1}: {m}")
        st = opt.state[p]
        torch.testing.assert_close(st["row_scale"], q_t, rtol=1e-9, atol=0)
        torch.testing.assert_close(st["col_scale"], s_t, rtol=1e-9, atol=0)
        assert float(st["update_norm"]) == pytest.approx(phi, rel=1e-9)


def test_param_groups_keep_their_own_settings():
    """Two groups with every RACS setting different: each weight follows the paper's loop with its group's."""
    a_cfg = {"lr": 0.03, "beta": 0.5, "alpha": 0.2, "gamma": 1.5, "iterations": 3, "weight_decay": 0.1}
    b_cfg = {"lr": 0.01, "beta": 0.95, "alpha": 0.05, "gamma": 1.01, "iterations": 1, "weight_decay": 0.0}
    wa = torch.randn(4, 9, dtype=torch.float64)
    wb = torch.randn(9, 4, dtype=torch.float64)
    ga, gb = _grads((4, 9), 5, 1), _grads((9, 4), 5, 2)
    pa, pb = torch.nn.Parameter(wa.clone()), torch.nn.Parameter(wb.clone())
    opt = create_optimizer([{"params": [pa], **a_cfg}, {"params": [pb], **b_cfg}], "racs", state_dtype="param")
    for x, y in zip(ga, gb):
        pa.grad, pb.grad = x.clone(), y.clone()
        opt.step()
    torch.testing.assert_close(pa.detach(), _paper_racs(wa, ga, **a_cfg)[0][-1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pb.detach(), _paper_racs(wb, gb, **b_cfg)[0][-1], rtol=1e-9, atol=1e-12)


def test_bfloat16_weights_keep_float32_statistics_of_the_papers_values():
    """A bfloat16 weight (float32 statistics, the default): the statistics and the limiter's norm are the paper's
    (they depend on the gradients only) to float32 rounding, and the weight is the paper's loop rounded to bfloat16
    after each step, to one bfloat16 ulp (a float32 update can round the other way)."""
    shape = (6, 10)
    grads = _grads(shape, 6, 4, dtype=torch.bfloat16)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    p = torch.nn.Parameter(w0.clone())
    opt = create_optimizer([p], "racs", lr=0.05, alpha=0.3)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    want, (q_t, s_t, phi) = _paper_racs(w0, grads, lr=0.05, alpha=0.3, store=torch.bfloat16)
    st = opt.state[p]
    assert st["row_scale"].dtype == st["col_scale"].dtype == torch.float32
    torch.testing.assert_close(st["row_scale"].double(), q_t, rtol=2e-5, atol=0)
    torch.testing.assert_close(st["col_scale"].double(), s_t, rtol=2e-5, atol=0)
    assert float(st["update_norm"]) == pytest.approx(phi, rel=2e-5)
    assert p.dtype == torch.bfloat16 and not torch.equal(p.detach(), w0)
    torch.testing.assert_close(p.detach().double(), want[-1], rtol=2 ** -7, atol=0)


def test_resume_from_a_weights_only_state_dict_equals_the_uninterrupted_run():
    """3 steps, ``state_dict()`` through ``torch.save`` / ``torch.load(weights_only=True)`` into a new optimizer,
    3 more steps: bit for bit the run that never stopped (the limiter's ``phi`` and the step count included)."""
    grads = _grads((5, 8), 6, 6, dtype=torch.float32)
    w0 = torch.randn(5, 8)
    p = torch.nn.Parameter(w0.clone())
    opt = create_optimizer([p], "racs", lr=0.02, gamma=1.2)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    q = torch.nn.Parameter(w0.clone())
    first = create_optimizer([q], "racs", lr=0.02, gamma=1.2)
    for g in grads[:3]:
        q.grad = g.clone()
        first.step()
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    second = create_optimizer([q], "racs", lr=0.02, gamma=1.2)
    second.load_state_dict(saved)
    for g in grads[3:]:
        q.grad = g.clone()
        second.step()
    assert torch.equal(q.detach(), p.detach())
    for key in ("row_scale", "col_scale", "update_norm"):
        assert torch.equal(second.state[q][key], opt.state[p][key]), key


def test_a_bucket_of_same_shape_tensors_follows_the_paper_per_tensor():
    """float32 weights of one shape step together (the multi-tensor buckets, d647b77), one of them given an all-zero
    gradient at step 2 and another a 1e3 larger one: each follows its own paper loop (float64) to float32 rounding,
    its own limiter and ``phi`` (a zero ``phi`` in a stack does not reach the others)."""
    shape, n = (6, 10), 4
    w0s = [torch.randn(shape, generator=torch.Generator().manual_seed(40 + i)) for i in range(n)]
    grads = [_grads(shape, 6, 50 + i, dtype=torch.float32) for i in range(n)]
    grads[1][1] = torch.zeros(shape)
    grads[2] = [g * 1e3 for g in grads[2]]
    ps = [torch.nn.Parameter(w.clone()) for w in w0s]
    opt = create_optimizer(ps, "racs", lr=0.05, gamma=1.1)
    for t in range(6):
        for p, g in zip(ps, grads):
            p.grad = g[t].clone()
        opt.step()
    for i, (p, w, g) in enumerate(zip(ps, w0s, grads)):
        want = _paper_racs(w, g, lr=0.05, gamma=1.1)[0][-1]
        moved = float((want - w.double()).norm())
        assert float((p.detach().double() - want).norm()) <= 1e-5 * moved, i


class _Experts(torch.nn.Module):
    """A fused-experts module as transformers 5 writes Mixtral / Qwen-MoE's (``experts.gate_up_proj`` ``[E, A, B]``:
    one ``A x B`` linear weight per expert, not a convolution)."""

    def __init__(self, e, a, b):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(e, a, b, generator=torch.Generator().manual_seed(8)))


def test_fused_experts_are_scaled_per_expert_matrix():
    """Each expert of a fused ``[E, A, B]`` weight is a linear layer, which the paper's RACS scales by its own rows
    and columns (``A + B + 1`` numbers). lowmem (as pytorch_optimizer) steps the tensor as its ``[E, A B]`` view:
    ``q`` one number per expert, ``s`` one per (row, column) pair shared by the experts; measured 0.61 of the
    movement away from per-expert RACS on 3 x 8 x 12, and for Qwen3-30B-A3B's experts (128 x 1536 x 2048 per layer)
    3,145,857 numbers instead of 458,880 (6.9x; 1.2 GB instead of 176 MB over 48 layers' two expert tensors)."""
    model = torch.nn.Module()
    e, a, b = 3, 8, 12
    model.experts = _Experts(e, a, b)
    w = model.experts.gate_up_proj
    w0 = w.detach().clone()
    opt = create_optimizer(model, "racs", lr=0.05)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(e, a, b, generator=gen) for _ in range(4)]
    for g in grads:
        w.grad = g.clone()
        opt.step()
    want = torch.stack([_paper_racs(w0[i], [g[i] for g in grads], lr=0.05)[0][-1] for i in range(e)])
    moved = float((want - w0.double()).norm())
    assert float((w.detach().double() - want).norm()) <= 1e-5 * moved
    assert opt.state_bytes() <= 4 * (e * (a + b + 1) + 1)  # (+ the step counter; measured 404 B = 4 (3 + 96 + 1 + 1))


def test_closure_is_called_and_its_loss_returned():
    w = torch.nn.Parameter(torch.randn(4, 6))
    x = torch.randn(8, 6)
    opt = create_optimizer([w], "racs", lr=0.02)
    calls = []

    def closure():
        opt.zero_grad()
        loss = (x @ w.t()).square().mean()
        loss.backward()
        calls.append(loss.item())
        return loss

    before = w.detach().clone()
    loss = opt.step(closure)
    assert calls and loss.item() == calls[0]
    assert not torch.equal(w.detach(), before)


@pytest.mark.parametrize("zero_at", [1, 4], ids=["first-step", "later-step"])
def test_a_zero_gradient_does_not_stop_the_tensor(zero_at):
    """A step whose gradient is all zero (LoRA's ``lora_A`` at step 1, its ``lora_B`` being 0; a MoE expert no
    token reached; a zeroed accumulation) leaves ``phi = 0``. Algorithm 1's line 9 then divides by it: ``eta``
    ~ 0 at every later step (the paper's literal rule: 0 for ever; lowmem before 8000797: ``phi`` grew by ``gamma``
    from 1e-30, ~7,000 steps to reach 1). lowmem takes the paper's own limiter of the Alice compensation
    (Algorithm 3, line 4: ``eta = 1`` while ``phi = 0``), so the tensor moves again (FOUND_AUDIT3 1, fixed)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 9, generator=gen))
    opt = create_optimizer([p], "racs", lr=0.02)
    for t in range(1, 30):
        p.grad = torch.zeros(6, 9) if t == zero_at else torch.randn(6, 9, generator=gen)
        opt.step()
        if t == zero_at:
            after_zero = p.detach().clone()
    assert float((p.detach() - after_zero).norm()) > 1e-3


# ---- memory on shapes the authors' tests did not use ---------------------------------------------------------


def _state_tensor_bytes(opt):
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_racs_bytes_on_new_shapes(pdtype):
    """racs: ``state_bytes()`` is the bytes of the tensors in ``optimizer.state``, and ``step_transient_bytes()``
    what a traced steady step holds at most, on 6 shapes (1 x 33, 33 x 1, 5 x 7, 7 x 5, 2 x 3 x 4 x 5, a 17-vector)
    x whole / 40-element / 7-element chunks x float32 / bfloat16 statistics."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_muonfix_sweep import _RealLive

    off = []
    for shape in [(1, 33), (33, 1), (5, 7), (7, 5), (2, 3, 4, 5), (17,)]:
        for state_dtype in ("float32", "bfloat16"):
            for chunk in (None, 40, 7):
                torch.manual_seed(0)
                p = torch.nn.Parameter(torch.randn(shape).to(pdtype))
                opt = create_optimizer([p], "racs", lr=1e-2, state_dtype=state_dtype)
                opt.chunk_numel = chunk
                gen = torch.Generator().manual_seed(1)
                peak = 0
                for step in range(3):
                    p.grad = torch.randn(shape, generator=gen).to(pdtype)
                    with _RealLive() as tr:
                        opt.step()
                    peak = max(peak, tr.peak) if step else 0
                if opt.state_bytes() != _state_tensor_bytes(opt) or opt.step_transient_bytes() != peak:
                    off.append((shape, state_dtype, chunk, opt.state_bytes(), _state_tensor_bytes(opt),
                                opt.step_transient_bytes(), peak))
    assert not off, off
