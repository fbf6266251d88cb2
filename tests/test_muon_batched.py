"""Muon on batches of matrices (fused MoE experts, transformers 5.x: ``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``): a parameter ``[E, A, B]`` of a ``use_muon`` group is stepped as ``E`` separate
``A x B`` parameters would be (each matrix its own momentum slice, Newton-Schulz iteration and ``adjust_lr_fn``
ratio), on every path: whole (``chunk_numel=None``), chunked (blocks of rows within and over matrices), the
multi-tensor buckets (stacked with the 2-D weights of their shape) and a tensor larger than the chunk in them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from test_nonfinite_check_bytes import _AllLive

from lowmem.optim import create_optimizer

SHAPES = [(3, 24, 40), (3, 40, 24), (2, 2, 7, 10), (4, 1, 17)]  # wide, tall, 4-D, single rows


def _run(shapes, grads, chunk, foreach, steps, **kw):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
    opt = create_optimizer(params, "muon", lr=2e-2, foreach=foreach, **kw)
    opt.chunk_numel = chunk
    for t in range(steps):
        for p, g in zip(params, grads):
            p.grad = g[t].clone()
        opt.step()
    return params, opt


def _grads(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (1.0 if t != 2 else 0.0) for t in range(steps)]


PATHS = [(None, False), (None, True), (100, False), (100, True), (240, False), (240, True), (2**19, False), (2**19, True)]
PATH_IDS = ["whole", "whole-buckets", "rows", "rows-buckets", "matrices", "matrices-buckets", "one-chunk", "one-chunk-buckets"]
ORIGINAL = {"nesterov": False, "adjust_lr_fn": "original", "weight_decay": 0.0}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("chunk,foreach,config",
                         [(*p, {}) for p in PATHS] + [(*p, ORIGINAL) for p in PATHS[2:4]],
                         ids=PATH_IDS + [f"original-{i}" for i in PATH_IDS[2:4]])
def test_a_batch_of_matrices_steps_as_separate_matrices(shape, chunk, foreach, config):
    """[E, A, B] (and [E1, E2, A, B]) vs E1*E2 separate [A, B] parameters, same gradients (a zero one
    included), 4 steps: weights and momentum bit for bit equal, whatever the path of either."""
    steps = 4
    grads = _grads(shape, steps, 1)
    mats = int(torch.tensor(shape[:-2]).prod())
    (batch,), opt_b = _run([shape], [grads], chunk, foreach, steps, **config)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0)).reshape(mats, *shape[-2:])
    singles, opt_s = _run_from(start, grads, chunk, foreach, steps, **config)
    got = batch.detach().reshape(mats, *shape[-2:])
    assert "exp_avg" not in opt_b.state[batch]  # (Muon's state, not AdamW's)
    buf = opt_b.state[batch]["momentum_buffer"].reshape(mats, *shape[-2:])
    for e, p in enumerate(singles):
        assert torch.equal(got[e], p.detach()), (e, chunk, foreach)
        assert torch.equal(buf[e], opt_s.state[p]["momentum_buffer"]), e


def _run_from(start, grads, chunk, foreach, steps, **kw):
    params = [nn.Parameter(start[e].clone()) for e in range(start.shape[0])]
    opt = create_optimizer(params, "muon", lr=2e-2, foreach=foreach, **kw)
    opt.chunk_numel = chunk
    for t in range(steps):
        g = grads[t].reshape(start.shape)
        for e, p in enumerate(params):
            p.grad = g[e].clone()
        opt.step()
    return params, opt


def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    return MixtralForCausalLM(cfg)


def test_create_optimizer_puts_a_mixtrals_fused_experts_in_the_muon_group():
    """create_optimizer(mixtral, "muon"): the fused 3-D experts (transformers 5.x) land in the use_muon group with
    the projection layers (before: in the AdamW group, 85% of a tiny Mixtral's parameters), the embedding, head
    and router-free 1-D weights keep AdamW; one step gives them Muon's state (a momentum buffer, 4 B/param) and
    moves them; target_modules selects them by name."""
    model = _tiny_mixtral()
    experts = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    assert len(experts) == 4 and any("gate_up_proj" in n for n in experts)
    opt = create_optimizer(model, "muon", lr=1e-3)
    muon = [g for g in opt.param_groups if g.get("use_muon")]
    assert len(muon) == 1
    ids = {id(p) for p in muon[0]["params"]}
    assert all(id(p) in ids for p in experts.values())
    assert id(model.get_input_embeddings().weight) not in ids and id(model.get_output_embeddings().weight) not in ids
    assert all(p.dim() >= 2 for p in muon[0]["params"])
    before = {n: p.detach().clone() for n, p in experts.items()}
    ids_in = torch.randint(0, 64, (2, 12))
    model(input_ids=ids_in, labels=ids_in).loss.backward()
    opt.step()
    for n, p in experts.items():
        assert set(opt.state[p]) == {"momentum_buffer", "step"}, n
        assert not torch.equal(before[n], p.detach()), n
    numel = sum(p.numel() for p in experts.values())
    opt_names = create_optimizer(model, "muon", target_modules=["down_proj"])
    sel = [p for g in opt_names.param_groups if g.get("use_muon") for p in g["params"]]
    assert {id(p) for p in sel if p.dim() == 3} == {id(p) for n, p in experts.items() if n.endswith("down_proj")}
    assert numel > 0


@pytest.mark.parametrize("shape,chunk,nesterov", [((3, 24, 40), 4000, True), ((3, 40, 24), 240, True), ((3, 24, 40), 960, True),
                                                  ((3, 24, 40), 2000, True), ((4, 64, 128), 3000, False),
                                                  ((8, 128, 64), 8192, True), ((8, 128, 64), None, True)],
                         ids=["one-chunk", "rows-over-matrices", "one-matrix-a-chunk", "matrices-and-rows", "plain-momentum",
                              "aligned", "whole"])
def test_a_batchs_step_allocates_what_it_reports(shape, chunk, nesterov):
    """The traced tensors of a batch's per-parameter step (foreach=False) stay within step_transient_bytes(), which
    exceeds them by at most the bfloat16 products' workspace it bounds (not traced: BLAS's packing buffers)."""
    from lowmem.optim.functional.muon import bf16_gemm_workspace_bytes

    p = nn.Parameter(torch.randn(shape))
    opt = create_optimizer([p], "muon", foreach=False, nesterov=nesterov)
    opt.chunk_numel, opt.skip_nonfinite = chunk, False
    for _ in range(2):
        p.grad = torch.randn(shape)
        with _AllLive() as t:
            opt.step()
    reported = opt.step_transient_bytes()
    assert t.peak <= reported <= t.peak + bf16_gemm_workspace_bytes(min(shape[-2:]), torch.get_num_threads())


def test_a_batch_is_stepped_a_matrix_at_a_time_not_whole():
    """A batch larger than the chunk reports one matrix's lean step (what a 2-D weight of that shape reports at
    that chunk), not the batch's: e.g. Mixtral-8x7B's w1 experts [8, 14336, 4096] at the GPU's 2^24-element chunk
    (meta tensors): below a quarter of the batch's float32 size."""
    def reported(shape, chunk):
        p = nn.Parameter(torch.empty(shape, device="meta"))
        opt = create_optimizer([p], "muon")
        opt.chunk_numel = chunk
        opt.materialize_state()
        return opt.step_transient_bytes()

    assert reported((8, 256, 128), 8192) == reported((256, 128), 8192)  # blocks inside one matrix: as a 2-D weight
    big = (8, 14336, 4096)
    assert reported(big, 2**24) < 8 * 14336 * 4096 * 4 / 4
    assert reported(big, 2**24) < reported(big, None) / 4
