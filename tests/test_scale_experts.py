"""SCALE on fused MoE expert weights ``[E, A, B]`` (transformers 5 ``experts.gate_up_proj`` / ``down_proj``): each
``A x B`` matrix is stepped exactly as a 2-D weight of its own in the same role (rows over ``B``; the embedding
role: columns over ``A``), as Muon and SinkGD step them, and ``create_optimizer`` targets them
(``register(..., batched_targets=True)``). Before 2026-11-30 a 3-D weight was normalised as its ``[E, -1]`` view
(one RMS per expert over the whole expert) and ``create_optimizer`` left experts in the AdamW group.
Tensors of more than 3 dimensions (conv kernels) keep the ``[out, -1]`` view. The step's transient is traced
against ``step_transient_bytes()`` (tests/test_nonfinite_check_bytes._AllLive), float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
from test_nonfinite_check_bytes import _AllLive
from torch import nn

from lowmem.optim.functional.scale import column_normalize
from lowmem.optim.references.normalized import scale as scale_reference
from lowmem.optim.registry import create_optimizer

E, A, B = 3, 8, 20  # a matrix of 160 elements: chunks of 20 (a row), 60 (rows), 100 (across a matrix), 200 (across)


def _steps(params, role, chunk, foreach, grads, dtype=torch.float32):
    opt = create_optimizer(params, "scale", scale_role=role, weight_decay=0.1, lr=1e-2, foreach=foreach)
    opt.chunk_numel = chunk
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("chunk", [None, 20, 60, 100, 200, 10000])
@pytest.mark.parametrize("role,foreach", [("hidden", False), ("hidden", True), ("head", False), ("head", True),
                                          ("embedding", False)])
def test_an_expert_weight_steps_as_its_matrices_would(role, foreach, chunk):
    """A [3, 8, 20] weight over 3 steps equals 3 separate [8, 20] weights of the same role, bit for bit, stepped whole,
    in blocks inside a matrix or across matrices, and in foreach buckets (the row roles' matrices stacked)."""
    torch.manual_seed(0)
    start = torch.randn(E, A, B)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(E, A, B, generator=gen) for _ in range(3)]
    batch = nn.Parameter(start.clone())
    opt = _steps([batch], role, chunk, foreach, [[g] for g in grads])
    singles = [nn.Parameter(start[e].clone()) for e in range(E)]
    opt_s = _steps(singles, role, chunk, foreach, [list(g.unbind(0)) for g in grads])
    assert "exp_avg" not in opt.state[batch]  # (SCALE's step, not AdamW's)
    assert not torch.equal(batch.detach(), start)
    for e, p in enumerate(singles):
        assert torch.equal(batch.detach()[e], p.detach()), (e, chunk)
        if role == "head":
            assert torch.equal(opt.state[batch]["momentum_buffer"][e], opt_s.state[p]["momentum_buffer"])


@pytest.mark.parametrize("role", ["hidden", "head", "embedding"])
def test_the_reference_loop_steps_experts_per_matrix(role):
    """references.normalized.scale (the paper's loop) on a 3-D weight: C(M) of each matrix; the engine follows it, and
    a [E, -1] normalisation (before) does not."""
    torch.manual_seed(0)
    p0 = torch.randn(E, A, B)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(E, A, B, generator=gen) for _ in range(3)]
    hp = dict(lr=1e-2, weight_decay=0.1, momentum=0.9, betas=(0.9, 0.999), eps=1e-8, adamw_lr_ratio=1.0)
    want = scale_reference(p0, grads, index=0, scale_role=role, **hp)[-1]
    p = nn.Parameter(p0.clone())
    _steps([p], role, None, False, [[g] for g in grads])
    torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
    g = grads[0]
    flat = g.reshape(E, -1) / g.reshape(E, -1).square().mean(dim=1, keepdim=True).sqrt()
    assert not torch.allclose(column_normalize(g, dim=1), flat.view(g.shape))


def test_a_conv_kernel_keeps_its_out_rows():
    """A 4-D conv kernel [out, in, k, k] is normalised as its [out, -1] view (unchanged), whole and in chunks."""
    torch.manual_seed(0)
    p0 = torch.randn(4, 3, 3, 3)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(4, 3, 3, 3, generator=gen) for _ in range(2)]
    hp = dict(lr=1e-2, weight_decay=0.1, momentum=0.9, betas=(0.9, 0.999), eps=1e-8, adamw_lr_ratio=1.0)
    want = scale_reference(p0, grads, index=0, scale_role="hidden", **hp)[-1]
    g = grads[0]
    rows = g.reshape(4, -1)
    assert torch.allclose(column_normalize(g, dim=1), (rows / rows.square().mean(dim=1, keepdim=True).sqrt()).view(g.shape))
    for chunk in (None, 10):
        p = nn.Parameter(p0.clone())
        _steps([p], "hidden", chunk, False, [[g] for g in grads])
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)


def _tiny_moe(kind):
    torch.manual_seed(0)
    if kind == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        return MixtralForCausalLM(MixtralConfig(
            vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=32))
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=3, num_experts_per_tok=2,
        max_position_embeddings=32))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_create_optimizer_targets_the_fused_experts(kind):
    """create_optimizer(moe, "scale"): the fused experts join the scale_role="hidden" group (before: the AdamW group,
    8 bytes/param of state), the embedding and head keep their roles, vectors AdamW; after a step the experts hold no
    state and each expert's update is -lr C(g) of its own matrix (rows over its input features)."""
    model = _tiny_moe(kind)
    experts = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    assert len(experts) == 2
    opt = create_optimizer(model, "scale", lr=1e-2, weight_decay=0.0)
    hidden = [g for g in opt.param_groups if g.get("scale_role") == "hidden"]
    assert len(hidden) == 1
    assert {id(p) for p in experts.values()} <= {id(p) for p in hidden[0]["params"]}
    roles = {g.get("scale_role") for g in opt.param_groups for p in g["params"] if p is model.get_input_embeddings().weight}
    assert roles == {"embedding"}
    before = {n: p.detach().clone() for n, p in experts.items()}
    ids = torch.randint(0, 64, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in experts.items()}
    opt.step()
    for n, p in experts.items():
        assert set(opt.state[p]) <= {"step"}, (n, set(opt.state[p]))
        for e in range(p.shape[0]):
            want = before[n][e] - 1e-2 * column_normalize(grads[n][e], dim=1)
            torch.testing.assert_close(p.detach()[e], want, rtol=0, atol=1e-7)
    assert opt.state_bytes() < sum(8 * p.numel() for p in experts.values())


def _traced(shape, role, chunk, dtype, state_dtype="float32"):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(shape).to(dtype))
    opt = create_optimizer([p], "scale", scale_role=role, weight_decay=0.1, lr=1e-2, state_dtype=state_dtype,
                           foreach=False)
    opt.chunk_numel = chunk
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        opt.step_param(p, torch.randn(shape, generator=gen).to(dtype))
    g = torch.randn(shape, generator=gen).to(dtype)
    with _AllLive() as t:
        opt.step_param(p, g)
    return t.peak, opt.step_transient_bytes(per_parameter=True)


SHAPES = [(1, 6, 10), (E, A, B), (24, 40)]


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("role", ["hidden", "head", "embedding"])
@pytest.mark.parametrize("shape", SHAPES, ids=["one-expert", "experts", "2-D"])
def test_a_float32_step_allocates_what_it_reports(shape, role, state_dtype):
    """float32 weights, every chunk size (inside a matrix, across matrices, all of it, whole): traced == reported.
    The embedding role's report counts column_rms's first block (squares and sums) apart from the later ones
    (beside the running sums): a matrix of one block reported 4 bytes per column high before (24 x 40,
    chunk 10000: 4,160 for 4,000 traced)."""
    for chunk in (None, 7, 60, 80, 200, 10000):
        peak, reported = _traced(shape, role, chunk, torch.float32, state_dtype)
        assert peak == reported, (chunk, peak, reported)


@pytest.mark.parametrize("role", ["hidden", "head", "embedding"])
@pytest.mark.parametrize("shape", SHAPES, ids=["one-expert", "experts", "2-D"])
def test_a_bfloat16_whole_step_allocates_what_it_reports(shape, role):
    """bfloat16 weights stepped whole (chunk_numel=None): the float32 copies of the gradient and the parameter are
    alive together with the step; traced == reported."""
    peak, reported = _traced(shape, role, None, torch.bfloat16)
    assert peak == reported


@pytest.mark.parametrize("role", ["hidden", "embedding"])
@pytest.mark.parametrize("shape", [(E, A, B), (24, 40), (3, 5, 4, 4)], ids=["experts", "2-D", "conv"])
def test_a_bfloat16_chunked_step_allocates_what_it_reports(shape, role):
    """bfloat16 weights in chunks: the report is the traced step. It was 4 x chunk bytes above it (24 x 40, chunk 200:
    2,420 for 1,620): the gradient chunk's float32 copy was counted beside the parameter chunk's, though SCALE's
    direction frees it first (MomentRule.chunk_direction_is_new, read by LowMemOptimizer._param_transient_bytes)."""
    for chunk in (60, 200):
        peak, reported = _traced(shape, role, chunk, torch.bfloat16)
        assert peak == reported, (chunk, peak, reported)


def test_a_large_expert_weights_report_is_a_chunk():
    """A [8, 1024, 2048] expert weight in chunks of 2^19 (256 rows of one expert): the chunk's step and its rows' RMS,
    4 x 2^19 + 4 x 256, not the tensor's 64 MiB (the [8, 2^21] view's report was 4 x 2^19 + 4 x 8 + 4)."""
    p = nn.Parameter(torch.empty(8, 1024, 2048, device="meta"))
    opt = create_optimizer([p], "scale")
    opt.chunk_numel = 2**19
    opt.materialize_state()
    assert opt.step_transient_bytes(per_parameter=True) == 4 * 2**19 + 4 * 256
    emb = create_optimizer([p], "scale", scale_role="embedding")
    emb.chunk_numel = 2**19
    emb.materialize_state()
    # each matrix's column pass (the second block's squares beside its sums and the running sums) next to the
    # batch's column RMS [8, 2048]
    assert emb.step_transient_bytes(per_parameter=True) == 4 * 8 * 2048 + 4 * 2**19 + 8 * 2048
