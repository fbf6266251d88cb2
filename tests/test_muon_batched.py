"""Muon and SinkGD on batches of matrices (fused MoE experts, transformers 5.x: ``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``): a parameter ``[E, A, B]`` of a ``use_muon`` group is stepped as ``E`` separate
``A x B`` parameters would be (each matrix its own momentum slice, Newton-Schulz iteration and ``adjust_lr_fn``
ratio), on every path: whole (``chunk_numel=None``), chunked (blocks of rows within and over matrices), the
multi-tensor buckets (stacked with the 2-D weights of their shape) and a tensor larger than the chunk in them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from test_nonfinite_check_bytes import _AllLive

from lowmem.optim import create_optimizer

SHAPES = [(3, 24, 40), (3, 40, 24), (2, 2, 7, 10), (4, 1, 17)]  # wide, tall, 4-D, single rows


HP = {"muon": {"lr": 2e-2}, "sinkgd": {"lr": 1e-2, "scale": 0.5, "sinkhorn_iters": 3}}


def _grads(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (1.0 if t != 2 else 0.0) for t in range(steps)]


def _run(name, params, grads, chunk, foreach, steps, **kw):
    opt = create_optimizer(params, name, **{**HP[name], **kw}, foreach=foreach)
    opt.chunk_numel = chunk
    for t in range(steps):
        for p, g in zip(params, grads):
            p.grad = g[t].clone()
        opt.step()
    return opt


PATHS = [(None, False), (None, True), (100, False), (100, True), (240, False), (240, True), (2**19, False), (2**19, True)]
PATH_IDS = ["whole", "whole-buckets", "rows", "rows-buckets", "matrices", "matrices-buckets", "one-chunk", "one-chunk-buckets"]
ORIGINAL = {"nesterov": False, "adjust_lr_fn": "original", "weight_decay": 0.0}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name,chunk,foreach,config",
                         [("muon", *p, {}) for p in PATHS] + [("muon", *PATHS[3], ORIGINAL)]
                         + [("sinkgd", *PATHS[i], {}) for i in (0, 2, 5, 7)],
                         ids=[f"muon-{i}" for i in PATH_IDS] + [f"muon-original-{PATH_IDS[3]}"]
                         + [f"sinkgd-{PATH_IDS[i]}" for i in (0, 2, 5, 7)])
def test_a_batch_of_matrices_steps_as_separate_matrices(shape, name, chunk, foreach, config):
    """[E, A, B] vs E separate [A, B] parameters, same gradients (a zero one
    included), 4 steps: weights (and Muon's momentum) bit for bit equal, whatever the path of either (SinkGD's
    buckets take matrices with both sides >= 16 only: the 4-D and single-row batches are stepped alone there).
    Muon's 4-D tensor is a conv kernel [out, in, kh, kw] (AUDMATH21 1): it steps as the one [out, in*kh*kw] matrix,
    here a 2 x 140 parameter, on every path. SinkGD refuses a 4-D tensor (no reference reading: AUDMATH21 1)."""
    steps = 4
    grads = _grads(shape, steps, 1)
    if name == "sinkgd" and len(shape) == 4:
        with pytest.raises(ValueError, match=r"parameter 0 of shape \[2, 2, 7, 10\] in a use_sinkgd group"):
            _run(name, [nn.Parameter(torch.randn(shape))], [grads], chunk, foreach, steps, **config)
        return
    mat = (shape[0], math.prod(shape[1:])) if name == "muon" and len(shape) == 4 else shape[-2:]
    mats = math.prod(shape) // math.prod(mat)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    batch = nn.Parameter(start.clone())
    opt_b = _run(name, [batch], [grads], chunk, foreach, steps, **config)
    singles = [nn.Parameter(m.clone()) for m in start.reshape(mats, *mat)]
    opt_s = _run(name, singles, [[g.reshape(mats, *mat)[e] for g in grads] for e in range(mats)],
                 chunk, foreach, steps, **config)
    assert "exp_avg" not in opt_b.state[batch]  # (the normalized update's state, not AdamW's)
    got = batch.detach().reshape(mats, *mat)
    assert not torch.equal(got, start.reshape(got.shape))
    for e, p in enumerate(singles):
        assert torch.equal(got[e], p.detach()), (e, chunk, foreach)
        if name == "muon":
            assert opt_b.state[batch]["momentum_buffer"].shape == shape  # (the parameter's shape: checkpoints load)
            buf = opt_b.state[batch]["momentum_buffer"].reshape(mats, *mat)
            assert torch.equal(buf[e], opt_s.state[p]["momentum_buffer"]), e


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
                                                  ((8, 128, 64), 8192, True), ((2, 2, 7, 10), 60, True),
                                                  ((8, 128, 64), None, True)],
                         ids=["one-chunk", "rows-over-matrices", "one-matrix-a-chunk", "matrices-and-rows", "plain-momentum",
                              "aligned", "4-D", "whole"])
def test_a_batchs_step_allocates_what_it_reports(shape, chunk, nesterov, monkeypatch):
    """The traced tensors of a batch's per-parameter step (foreach=False) == step_transient_bytes() with the bfloat16
    products' workspace (BLAS's packing buffers, not traced; a bound per thread) set to 0: one matrix's lean step,
    and a block's float32 step beside the next matrix's iteration when the block spans matrices. Stepped whole
    (chunk_numel=None): a bound (as a 2-D weight's whole step); with the workspace, the report exceeds the traced
    tensors by at most the workspace."""
    from lowmem.optim.functional import muon as M

    def step(p, opt):
        opt.chunk_numel, opt.skip_nonfinite = chunk, False
        for _ in range(2):
            p.grad = torch.randn(shape)
            with _AllLive() as t:
                opt.step()
        return t.peak

    p = nn.Parameter(torch.randn(shape))
    opt = create_optimizer([p], "muon", foreach=False, nesterov=nesterov)
    traced = step(p, opt)
    reported = opt.step_transient_bytes()
    assert traced <= reported <= traced + M.bf16_gemm_workspace_bytes(min(shape[-2:]), torch.get_num_threads())
    monkeypatch.setattr(M, "bf16_gemm_workspace_bytes", lambda r, threads=1: 0)
    if chunk is None:
        assert traced <= opt.step_transient_bytes() <= 1.2 * traced
    else:
        assert opt.step_transient_bytes() == traced


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


@pytest.mark.parametrize("shape,chunk", [((3, 24, 40), 4000), ((3, 40, 24), 240), ((3, 24, 40), 960), ((3, 24, 40), 2000),
                                         ((4, 7, 10), 60), ((8, 128, 64), 8192), ((1, 20, 30), 200), ((3, 24, 40), None)],
                         ids=["one-chunk", "rows-over-matrices", "one-matrix-a-chunk", "matrices-and-rows", "small-matrices",
                              "aligned", "single-matrix", "whole"])
def test_a_sinkgd_batchs_step_allocates_exactly_what_it_reports(shape, chunk):
    """SinkGD on a batch (foreach=False): the traced peak of the step == step_transient_bytes() (one matrix's
    scalings beside the batch's r and c, then a block's step; whole: the batch's step beside one matrix's
    sr_sinkhorn)."""
    p = nn.Parameter(torch.randn(shape))
    opt = create_optimizer([p], "sinkgd", foreach=False, **HP["sinkgd"])
    opt.chunk_numel, opt.skip_nonfinite = chunk, False
    for _ in range(2):
        p.grad = torch.randn(shape)
        with _AllLive() as t:
            opt.step()
    assert t.peak == opt.step_transient_bytes()


def test_create_optimizer_puts_a_mixtrals_fused_experts_in_the_sinkgd_group():
    """create_optimizer(mixtral, "sinkgd"): the fused experts in the use_sinkgd group, no state on them, one step."""
    model = _tiny_mixtral()
    experts = [p for p in model.parameters() if p.dim() == 3]
    opt = create_optimizer(model, "sinkgd", lr=1e-3)
    ids = {id(p) for g in opt.param_groups if g.get("use_sinkgd") for p in g["params"]}
    assert experts and all(id(p) in ids for p in experts)
    ids_in = torch.randint(0, 64, (2, 12))
    model(input_ids=ids_in, labels=ids_in).loss.backward()
    opt.step()
    assert all(set(opt.state[p]) <= {"step"} for p in experts)


@pytest.mark.parametrize("name", ["muon", "sinkgd"])
def test_layerwise_mode_steps_a_batch_as_the_plain_step(name):
    """LayerwiseOptimizer (each parameter stepped from its gradient hook) on a model with a fused-experts-like 3-D
    weight: the batch is in the targeted group and 3 steps equal create_optimizer's single-tensor step bit for bit."""
    from lowmem.optim.layerwise import LayerwiseOptimizer

    class Experts(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w, self.lin = nn.Parameter(w.clone()), nn.Linear(40, 24)

        def forward(self, x):
            return torch.einsum("eab,b->", self.w, x) + self.lin(x).sum()

    torch.manual_seed(0)
    w = torch.randn(3, 24, 40)
    plain_model, lw_model = Experts(w), Experts(w)
    lw_model.load_state_dict(plain_model.state_dict())
    plain = create_optimizer(plain_model, name, foreach=False, **HP[name])
    assert any(g.get(f"use_{name}") and plain_model.w in g["params"] for g in plain.param_groups)
    lw = LayerwiseOptimizer(lw_model, name, **HP[name])
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(40, generator=gen)
        plain.zero_grad()
        plain_model(x).pow(2).backward()
        plain.step()
        lw_model(x).pow(2).backward()
        lw.step()
        lw.zero_grad()
    for p, q in zip(plain_model.parameters(), lw_model.parameters()):
        assert torch.equal(p, q)
    lw.remove_hooks()


@pytest.mark.parametrize("name", ["muon", "sinkgd"])
def test_convolution_kernels_are_not_batches_of_matrices(name):
    """batched_target_names took every trainable weight of 3+ dimensions, so a VLM's patch-embedding Conv2d
    [d, 3, 14, 14] became a batch of 14 x 14 matrices and a Mamba depthwise Conv1d [d, 1, k] a batch of 1 x k
    rows: a convolution kernel is one linear map of in x k... inputs; it keeps AdamW, fused experts do not."""
    from torch import nn

    from lowmem.optim import create_optimizer

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 8, 4)
            self.dw = nn.Conv1d(8, 8, 3, groups=8)
            self.lin = nn.Linear(8, 8)
            self.experts = nn.Parameter(torch.randn(4, 8, 8))

    model = Model()
    key = {"muon": "use_muon", "sinkgd": "use_sinkgd"}[name]
    names = {id(p): n for n, p in model.named_parameters()}
    opt = create_optimizer(model, name)
    targeted = {names[id(p)] for g in opt.param_groups if g.get(key) for p in g["params"]}
    assert targeted == {"experts", "lin.weight"}, targeted
