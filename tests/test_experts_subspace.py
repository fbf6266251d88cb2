"""The subspace and Subset-Norm recipes on fused MoE experts: a parameter ``[E, A, B]`` of a projected (or
``subset_norm``) group is stepped as E matrices, each with its own projection, moments and statistics
(LowMemOptimizer._matrices), equal bit for bit to the same matrices as E separate 2-D parameters of the group,
on the engine's per-parameter reference path (``foreach=False``) and on its projected multi-tensor path (the
matrices join the projected buckets as separate parameters do)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from test_nonfinite_check_bytes import _AllLive

from lowmem.optim import create_optimizer
from lowmem.optim.engine import MATRIX_SHARED_KEYS
from lowmem.optim.subspace import MATRIX_SEED_STRIDE

GAP = {"rank": 2, "update_proj_gap": 3}  # 7 steps: refreshes at steps 1, 4 and 7
CASES = {
    "galore_svd": ("galore_adamw", GAP),
    "galore_rsvd": ("galore_adamw", {**GAP, "projection": "rsvd"}),
    "galore_rotate": ("galore_adamw", {**GAP, "moment_policy": "rotate"}),
    "galore_adafactor": ("galore_adafactor", {**GAP, "lr": 1e-2, "relative_step": False, "scale_parameter": False}),
    "fira": ("fira_adamw", GAP),
    "frugal_random": ("frugal", {**GAP, "projection": "random"}),
    "frugal_columns": ("frugal", {**GAP, "projection": "columns"}),
    "osd": ("osd_adamw", {**GAP, "proj_lr": 1e-2}),
    "apollo": ("apollo_adamw", GAP),
    "apollo_random": ("apollo_adamw", {**GAP, "projection": "random"}),
    "apollo_mini": ("apollo_mini", {"rank": 1, "update_proj_gap": 3}),
    "galore8bit": ("galore_adamw8bit", {**GAP, "block_size": 64, "min_quant_size": 16}),
    "fira8bit": ("fira_adamw8bit", {**GAP, "block_size": 64, "min_quant_size": 16}),
    "frugal8bit": ("frugal8bit", {**GAP, "block_size": 64, "min_quant_size": 16, "projection": "columns"}),
    "adamw_sn": ("adamw_sn", {"subset_norm": True}),
    "adagrad_sn": ("adagrad_sn", {"subset_norm": True}),
    "adamw_snsm": ("adamw_snsm", GAP),
    "sgd_sm": ("sgd_sm", GAP),
}
E = 3


def _pair(name, hp, shape, dtype=torch.float32, foreach=False):
    """A batch parameter [E, *shape] and E separate 2-D parameters holding the same matrices, each in an
    optimizer of the same group settings (the separate ones on the per-parameter reference path); the separate
    matrices' random draws seeded as the batch's matrices (the per-matrix seed rule, checked here too)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(E, *shape, generator=gen).to(dtype)
    batch = torch.nn.Parameter(w.clone())
    mats = [torch.nn.Parameter(w[e].clone()) for e in range(E)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ob = create_optimizer([{"params": [batch], **hp, "foreach": foreach}], name)
        os_ = create_optimizer([{"params": mats, **hp, "foreach": foreach}], name)
    ob.materialize_state()
    os_.materialize_state()
    if "proj_meta" in ob.state[batch]:
        seeds = ob.state[batch]["proj_meta"][:, 0]
        assert seeds.tolist() == [seeds[0].item() + e * MATRIX_SEED_STRIDE for e in range(E)]
        for e, p in enumerate(mats):
            os_.state[p]["proj_meta"][0] = seeds[e]
    return batch, mats, ob, os_


def _grads(shape, steps, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(E, *shape, generator=gen).to(dtype) for _ in range(steps)]


def _step(batch, mats, ob, os_, g):
    batch.grad = g.clone()
    for e, p in enumerate(mats):
        p.grad = g[e].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ob.step()
        os_.step()


def _assert_equal(batch, mats, ob, os_):
    for e, p in enumerate(mats):
        assert torch.equal(batch.detach()[e], p.detach()), f"matrix {e}: {(batch[e] - p).abs().max().item()}"
        sb, ss = ob.state[batch], os_.state[p]
        assert set(sb) == set(ss)
        for k, v in ss.items():
            got = sb[k] if k in MATRIX_SHARED_KEYS else sb[k][e]
            assert got.shape == v.shape and got.dtype == v.dtype and torch.equal(got, v), (e, k)


@pytest.mark.parametrize("foreach", [False, None], ids=["per_parameter", "buckets"])
@pytest.mark.parametrize("shape", [(12, 7), (7, 12)], ids=["tall", "wide"])
@pytest.mark.parametrize("case", list(CASES))
def test_batch_of_matrices_equals_separate_2d_parameters(case, shape, foreach):
    """7 steps (refreshes at 1, 4, 7; both projection sides): the batch's matrices, and their state, equal the
    separate 2-D parameters' bit for bit, on either path (the separate ones on the same)."""
    name, hp = CASES[case]
    batch, mats, ob, os_ = _pair(name, hp, shape, foreach=foreach)
    group = ob.param_groups[0]
    assert ob._matrices(batch, group)
    # (projected: on the buckets' path its matrices join the projected buckets, as the separate parameters do)
    low = ob._projected_foreach_ok(mats[0], os_.param_groups[0], state=os_.state[mats[0]])
    assert ob._matrices_foreach_ok(batch, group, state=ob.state[batch]) == (low and foreach is None)
    for g in _grads(shape, 7):
        _step(batch, mats, ob, os_, g)
    _assert_equal(batch, mats, ob, os_)
    # one state dict for the batch: its matrices' entries stacked, the counters once
    one = os_.state[mats[0]]
    shared = sum(v.numel() * v.element_size() for k, v in one.items() if k in MATRIX_SHARED_KEYS)
    assert ob.state_bytes() == E * (os_.state_bytes() // E - shared) + shared
    assert all(v.shape[0] == E for k, v in ob.state[batch].items() if k not in MATRIX_SHARED_KEYS)


@pytest.mark.parametrize("foreach", [False, None], ids=["per_parameter", "buckets"])
def test_bf16_batch_equals_separate(foreach):
    """A bf16 batch (low-precision gradients projected a block of rows at a time) equals separate bf16 matrices."""
    batch, mats, ob, os_ = _pair("galore_adamw", GAP, (12, 7), torch.bfloat16, foreach=foreach)
    for g in _grads((12, 7), 4, torch.bfloat16):
        _step(batch, mats, ob, os_, g)
    _assert_equal(batch, mats, ob, os_)


def test_nonfinite_in_one_expert_skips_the_whole_step():
    batch, mats, ob, os_ = _pair("galore_adamw", GAP, (12, 7))
    gs = _grads((12, 7), 2)
    _step(batch, mats, ob, os_, gs[0])
    before = {k: v.clone() for k, v in ob.state[batch].items()}
    w = batch.detach().clone()
    bad = gs[1].clone()
    bad[2, 3, 4] = float("nan")
    batch.grad = bad
    with pytest.warns(UserWarning, match="non-finite"):
        ob.step()
    assert ob.skipped_steps == 1 and torch.equal(batch.detach(), w)
    assert all(torch.equal(before[k], v) for k, v in ob.state[batch].items())


@pytest.mark.parametrize("case", ["galore_svd", "fira", "frugal_random", "adamw_sn"])
def test_checkpoint_round_trip_weights_only(case):
    """state_dict() -> torch.save -> torch.load(weights_only=True) -> load_state_dict: the resumed batch steps as
    the uninterrupted one (the stacked state and the shared counters restored); a checkpoint of another rank
    refuses, naming the entry."""
    name, hp = CASES[case]
    shape = (12, 7)
    batch, mats, ob, _ = _pair(name, hp, shape)
    gs = _grads(shape, 5)
    for g in gs[:3]:
        batch.grad = g.clone()
        ob.step()
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    resumed = torch.nn.Parameter(batch.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o2 = create_optimizer([{"params": [resumed], **hp}], name)
    o2.load_state_dict(sd)
    for g in gs[3:]:
        batch.grad, resumed.grad = g.clone(), g.clone()
        ob.step()
        o2.step()
    assert torch.equal(batch.detach(), resumed.detach())
    if "rank" in hp:
        other = torch.nn.Parameter(batch.detach().clone())
        o3 = create_optimizer([{"params": [other], **{**hp, "rank": 3}}], name)
        with pytest.raises(ValueError, match="rank"):
            o3.load_state_dict(sd)


@pytest.mark.parametrize("foreach", [False, None], ids=["per_parameter", "buckets"])
@pytest.mark.parametrize("case", ["galore_svd", "fira", "apollo", "adamw_snsm", "galore8bit", "adamw_sn"])
def test_transient_of_a_batch_is_that_of_its_matrices(case, foreach):
    """The batch's step allocates (traced, every dispatched output) what the separate matrices' step does (one
    matrix at a time; or the projected buckets its matrices join), and reports the same step_transient_bytes(),
    an upper bound of the trace. (adamw_sn: the batch a matrix at a time, the separate ones in the foreach
    buckets on that path: compared per parameter.)"""
    name, hp = CASES[case]
    shape = (12, 7)
    batch, mats, ob, os_ = _pair(name, hp, shape, foreach=False if name == "adamw_sn" else foreach)
    gs = _grads(shape, 5)
    for g in gs[:3]:
        _step(batch, mats, ob, os_, g)
    batch.grad = gs[3].clone()
    for e, p in enumerate(mats):
        p.grad = gs[3][e].clone()
    with _AllLive() as tb:
        ob.step()
    with _AllLive() as ts:
        os_.step()
    assert tb.peak == ts.peak
    assert ob.step_transient_bytes() == os_.step_transient_bytes() >= tb.peak
    assert ob.step_transient_bytes(per_parameter=True) == os_.step_transient_bytes(per_parameter=True)


def test_meta_sizing_counts_expert_state_at_rank():
    """materialize_state() on meta tensors (the estimator's path): the expert's state is E matrices' at rank."""
    p = torch.nn.Parameter(torch.empty(8, 256, 64, device="meta"))
    opt = create_optimizer([{"params": [p], "rank": 16}], "galore_adamw")
    opt.materialize_state()
    qs = [torch.nn.Parameter(torch.empty(256, 64, device="meta")) for _ in range(8)]
    sep = create_optimizer([{"params": qs, "rank": 16}], "galore_adamw")
    sep.materialize_state()
    assert opt.state_bytes() == sep.state_bytes() - 7 * 4  # (one step counter instead of 8)
    assert opt.state_bytes() < 8 * 256 * 64 * 8 / 3  # not AdamW's full-size state
    assert opt.step_transient_bytes() == sep.step_transient_bytes()
    assert opt.step_transient_bytes(per_parameter=True) == sep.step_transient_bytes(per_parameter=True)


def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MixtralForCausalLM(cfg)


@pytest.mark.parametrize("name", ["galore_adamw", "fira_adamw", "frugal", "osd_adamw", "apollo_adamw", "adamw_snsm",
                                  "sgd_sm", "adamw_sn", "galore_adamw8bit"])
def test_create_optimizer_targets_the_experts(name):
    """create_optimizer on a tiny Mixtral puts the fused experts in the targeted group (target_modules respected:
    a selection without them leaves them out), and one training step runs."""
    from lowmem.optim import get_entry

    entry = get_entry(name)
    model = _tiny_mixtral()
    experts = {n for n, p in model.named_parameters() if p.dim() == 3}
    assert experts
    hp = {} if name == "adamw_sn" else {"rank": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer(model, name, **hp)
    names = {id(p): n for n, p in model.named_parameters()}
    targeted = {names[id(p)] for g in opt.param_groups if g.get(entry.target_key) not in (None, False) for p in g["params"]}
    assert experts <= targeted
    out = model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8)))
    out.loss.backward()
    opt.step()
    opt2 = create_optimizer(model, name, target_modules=["q_proj"], **hp)
    targeted = {names[id(p)] for g in opt2.param_groups if g.get(entry.target_key) not in (None, False) for p in g["params"]}
    assert not experts & targeted and targeted


def test_expert_state_before_and_after_on_a_tiny_mixtral():
    """The state of a tiny Mixtral's experts under GaLore rank 4: E matrices' projected state, not AdamW's."""
    model = _tiny_mixtral()
    opt = create_optimizer(model, "galore_adamw", rank=4)
    opt.materialize_state()
    for n, p in model.named_parameters():
        if p.dim() == 3:
            e, a, b = p.shape
            st = opt.state[p]
            assert st["exp_avg"].shape[0] == e and st["exp_avg"][0].numel() == 4 * max(a, b)


@pytest.fixture
def one_process_mesh(tmp_path):
    """A 1-D device mesh of one gloo process (DTensors without spawning; tests/test_fsdp_experts.py runs two)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dim", [1, 2, -1])
def test_sharded_batch_split_inside_its_matrices_refused(one_process_mesh, dim):
    """An FSDP2 (DTensor) batch of matrices in a projected group sharded on A or B (its matrices split across
    processes) is refused at the group, naming the parameter, its placements, the recipe and what is supported
    (no silent fallback); Shard(0) of the experts is stepped (tests/test_fsdp_experts.py)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    p = torch.nn.Parameter(distribute_tensor(torch.randn(3, 12, 7), one_process_mesh, [Shard(dim)]))
    shown = dim % 3
    with pytest.raises(NotImplementedError, match=rf"parameter 0.*\(3, 12, 7\).*Shard\(dim={shown}\).*galore_adamw"
                                                  r".*Shard\(d\) of a leading dimension d < 1"):
        create_optimizer([{"params": [p], "rank": 2}], "galore_adamw")


def test_sharded_batch_of_whole_matrices_is_stepped_as_unsharded(one_process_mesh):
    """Shard(0) on one process (the local shard is the whole batch): the same weights and state as the plain
    batch, bit for bit, its stacked state a DTensor of the parameter's placements in state_dict()."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    w = torch.randn(3, 12, 7, generator=torch.Generator().manual_seed(0))
    p = torch.nn.Parameter(distribute_tensor(w.clone(), one_process_mesh, [Shard(0)]))
    q = torch.nn.Parameter(w.clone())
    hp = {**GAP, "projection": "random"}
    op = create_optimizer([{"params": [p], **hp}], "galore_adamw")
    oq = create_optimizer([{"params": [q], **hp}], "galore_adamw")
    for g in _grads((12, 7), 4):
        p.grad = distribute_tensor(g.clone(), one_process_mesh, [Shard(0)])
        q.grad = g.clone()
        op.step()
        oq.step()
    assert torch.equal(p.to_local(), q.detach())
    for k, v in oq.state[q].items():
        assert torch.equal(op.state[p][k], v), k
    sd = op.state_dict()["state"][0]
    assert isinstance(sd["exp_avg"], DTensor) and tuple(sd["exp_avg"].placements) == (Shard(0),)
    assert type(sd["step"]) is torch.Tensor  # (the counters shared by the matrices: plain, equal on every rank)


def test_rank_that_applies_to_no_expert_matrix_is_an_error():
    """A group of experts only whose matrices' smaller side is <= rank: the RankError of 2-D weights (it was
    left alone: no 2-D parameter), naming the matrices' shape; one that applies projects them."""
    from lowmem.optim.recipes.subspace import RankError

    p = torch.nn.Parameter(torch.randn(4, 6, 10))
    with pytest.raises(RankError, match=r"rank 6 >= the smaller side .*\(6, 10\)"):
        create_optimizer([{"params": [p], "rank": 6}], "galore_adamw")
    opt = create_optimizer([{"params": [p], "rank": 5}], "galore_adamw")
    assert opt._is_projected(p, opt.param_groups[0])


@pytest.mark.parametrize("accumulation", [1, 2])
def test_layerwise_mode_steps_a_batch_as_its_matrices(accumulation):
    """Layerwise mode (each parameter stepped from its gradient hook; with accumulation, GaLore's gradients
    accumulated in the subspace: refresh_projection / project per matrix, stacked) equals separate matrices."""
    from lowmem.optim.layerwise import LayerwiseOptimizer

    shape = (12, 7)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(E, *shape, generator=gen)
    batch = torch.nn.Parameter(w.clone())
    mats = [torch.nn.Parameter(w[e].clone()) for e in range(E)]
    lb = LayerwiseOptimizer([{"params": [batch], **GAP}], "galore_adamw", accumulation_steps=accumulation)
    ls = LayerwiseOptimizer([{"params": mats, **GAP}], "galore_adamw", accumulation_steps=accumulation)
    for step in range(5):
        for _ in range(accumulation):
            x = torch.randn(E, *shape, generator=gen)
            (batch * x).sum().backward()
            sum((m * x[e]).sum() for e, m in enumerate(mats)).backward()
        lb.step()
        ls.step()
        lb.zero_grad()
        ls.zero_grad()
    for e, m in enumerate(mats):
        assert torch.equal(batch.detach()[e], m.detach()), e
    assert lb.inner.state[batch]["step"].item() == 5


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)], ids=["tall", "wide"])
@pytest.mark.parametrize("case", ["galore_svd", "galore_rsvd", "fira", "apollo", "apollo_mini", "osd", "adamw_snsm",
                                  "galore8bit", "galore_adafactor"])
def test_batched_project_down(case, shape, monkeypatch):
    """Issue 15: a batch's steady steps project every matrix down in one batched product (off the CPU; here forced
    with batched_down_on_cpu), equal to the separate matrices to float32 rounding (MKL's batched GEMM differs from
    its GEMM / GEMV in the last bits); refresh steps project per matrix. The traced transient of such a step is
    within step_transient_bytes() and no more than the per-matrix project-down's."""
    import lowmem.optim.functional.galore as GL

    name, hp = CASES[case]
    batch, mats, ob, os_ = _pair(name, hp, shape, foreach=None)
    ob.batched_down_on_cpu = True
    calls = []
    real = GL.project_down_batched
    monkeypatch.setattr(GL, "project_down_batched", lambda *a: calls.append(1) or real(*a))
    from lowmem.optim.engine import matrix_state

    def steady(t):  # (no refresh due at step t: the batched product)
        return not ob.recipe.projection.refresh_due(matrix_state(ob.state[batch], (0,)), ob.param_groups[0], t)

    gs = _grads(shape, 7)
    for t, g in enumerate(gs[:5], 1):
        want = len(calls) + (t > 1 and steady(t))
        _step(batch, mats, ob, os_, g)
        assert len(calls) == want, t
    assert len(calls) >= 2
    for e, p in enumerate(mats):
        torch.testing.assert_close(batch.detach()[e], p.detach(), rtol=1e-5, atol=1e-6)
    batch.grad = gs[5].clone()
    for e, p in enumerate(mats):
        p.grad = gs[5][e].clone()
    with _AllLive() as tb:
        ob.step()
    for e, p in enumerate(mats):
        p.grad = gs[5][e].clone()
    with _AllLive() as tm:  # (the separate matrices' step 6, one project-down each)
        os_.step()
    # (OSD: the separate matrices' report also holds their pre-check norms, 4 bytes each; a batch reads its own)
    assert tb.peak <= ob.step_transient_bytes() <= os_.step_transient_bytes()
    assert tb.peak <= tm.peak


def test_batched_project_down_split_over_buckets(monkeypatch):
    """A batch larger than a bucket (chunk_numel of 2.5 matrices' projected gradients): each bucket's share of its
    matrices is projected down in one product as the buckets fill, equal to the separate matrices
    to float32 rounding, traced within step_transient_bytes()."""  # (2, 2, 2 per steady step)
    import lowmem.optim.functional.galore as GL

    shape = (12, 7)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, *shape, generator=gen)
    batch = torch.nn.Parameter(w.clone())
    mats = [torch.nn.Parameter(w[e].clone()) for e in range(6)]
    ob = create_optimizer([{"params": [batch], **GAP}], "galore_adamw")
    os_ = create_optimizer([{"params": mats, **GAP}], "galore_adamw")
    numel = ob.recipe.projection.low_shape(torch.Size(shape), ob.param_groups[0]).numel()
    ob.chunk_numel = os_.chunk_numel = 5 * numel // 2
    ob.batched_down_on_cpu = True
    sizes = []
    real = GL.project_down_batched
    monkeypatch.setattr(GL, "project_down_batched", lambda g, *a: sizes.append(g.shape[0]) or real(g, *a))
    for step in range(3):
        g = torch.randn(6, *shape, generator=gen)
        batch.grad = g.clone()
        for e, p in enumerate(mats):
            p.grad = g[e].clone()
        with _AllLive() as tb:
            ob.step()
        os_.step()
        assert tb.peak <= ob.step_transient_bytes() == os_.step_transient_bytes()
    assert sizes == [2, 2, 2, 2, 2, 2]  # (step 1 refreshes: per matrix)
    for e, p in enumerate(mats):
        torch.testing.assert_close(batch.detach()[e], p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", [False, None], ids=["per_parameter", "buckets"])
def test_batch_with_two_leading_dims_equals_separate(foreach):
    """[2, 3, A, B]: its 6 matrices in row-major order, each equal to a separate 2-D parameter (random bases:
    matrix_seed's e row-major)."""
    shape = (12, 7)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, *shape, generator=gen)
    batch = torch.nn.Parameter(w.clone())
    mats = [torch.nn.Parameter(w[i, j].clone()) for i in range(2) for j in range(3)]
    hp = {**GAP, "projection": "random", "foreach": foreach}
    ob = create_optimizer([{"params": [batch], **hp}], "frugal")
    os_ = create_optimizer([{"params": mats, **hp}], "frugal")
    ob.materialize_state()
    os_.materialize_state()
    meta = ob.state[batch]["proj_meta"]
    assert meta.shape == (2, 3, 6)
    for e, p in enumerate(mats):
        os_.state[p]["proj_meta"][0] = meta[e // 3, e % 3, 0]
    assert meta[1, 2, 0] - meta[0, 0, 0] == 5 * MATRIX_SEED_STRIDE
    for _ in range(5):
        g = torch.randn(2, 3, *shape, generator=gen)
        batch.grad = g.clone()
        for e, p in enumerate(mats):
            p.grad = g[e // 3, e % 3].clone()
        ob.step()
        os_.step()
    for e, p in enumerate(mats):
        assert torch.equal(batch.detach()[e // 3, e % 3], p.detach()), e


def test_checkpoint_of_full_size_expert_state_refuses():
    """A checkpoint saved before experts were projected (a rank group whose 3-D weight kept AdamW's full-size
    exp_avg / exp_avg_sq) does not load into the per-matrix state: a ValueError naming the parameter and entry."""
    p = torch.nn.Parameter(torch.randn(3, 12, 7))
    opt = create_optimizer([{"params": [p], **GAP}], "galore_adamw")
    sd = opt.state_dict()
    sd["state"] = {0: {"step": torch.tensor(2.0), "exp_avg": torch.zeros(3, 12, 7), "exp_avg_sq": torch.zeros(3, 12, 7)}}
    with pytest.raises(ValueError, match=r"parameter 0 of shape \(3, 12, 7\).*(proj_meta|exp_avg)"):
        opt.load_state_dict(sd)


def test_sharded_batch_state_dict_round_trip_and_other_rank_refused(one_process_mesh):
    """state_dict() -> load_state_dict() of a Shard(0) batch (DTensor stacks back to the shard's plain tensors, the
    bases' column-major layout kept) continues as the uninterrupted optimizer, bit for bit; a checkpoint of another
    rank refuses, naming the parameter's group and the entries whose shapes differ."""
    from torch.distributed.tensor import Shard, distribute_tensor

    w = torch.randn(3, 12, 7, generator=torch.Generator().manual_seed(0))
    ps = [torch.nn.Parameter(distribute_tensor(w.clone(), one_process_mesh, [Shard(0)])) for _ in range(2)]
    opts = [create_optimizer([{"params": [p], **GAP}], "galore_adamw") for p in ps]
    grads = _grads((12, 7), 5)
    for i, g in enumerate(grads):
        if i == 2:
            opts[1].load_state_dict(opts[0].state_dict())
            ps[1].data.copy_(ps[0].data)
        for p, o in zip(ps, opts):
            p.grad = distribute_tensor(g.clone(), one_process_mesh, [Shard(0)])
            o.step()
    assert torch.equal(ps[0].to_local(), ps[1].to_local())
    for k, v in opts[0].state[ps[0]].items():
        assert torch.equal(opts[1].state[ps[1]][k], v) and opts[1].state[ps[1]][k].stride() == v.stride(), k
    other = create_optimizer([{"params": [ps[1]], **GAP, "rank": 3}], "galore_adamw")
    with pytest.raises(ValueError, match=r"parameter group 0.*rank=2 \(this optimizer: 3\).*exp_avg"):
        other.load_state_dict(opts[0].state_dict())


@pytest.mark.cuda
def test_sharded_batch_checkpoint_on_a_cuda_mesh(tmp_path):
    """NCCL, one process: a Shard(0) batch's checkpoint through torch.distributed.checkpoint (and a full state
    dict, gathered over the CUDA mesh) holds every stacked entry on the GPU, proj_meta included, and resumes
    bit for bit with proj_meta back on the CPU."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        w = torch.randn(3, 12, 7, generator=torch.Generator().manual_seed(0))
        models = [torch.nn.Module() for _ in range(2)]
        for m in models:
            m.w = torch.nn.Parameter(distribute_tensor(w.cuda(), mesh, [Shard(0)]))
        opts = [create_optimizer([{"params": [m.w], **GAP, "projection": "random"}], "galore_adamw") for m in models]
        grads = [g.cuda() for g in _grads((12, 7), 4)]
        for i, g in enumerate(grads):
            if i == 2:
                full = get_optimizer_state_dict(models[0], opts[0], options=StateDictOptions(full_state_dict=True))
                assert full["state"]["w"]["proj_meta"].shape == (3, 6)
                dcp.save({"optim": get_optimizer_state_dict(models[0], opts[0])}, checkpoint_id=tmp_path / "ckpt")
                sd = {"optim": get_optimizer_state_dict(models[1], opts[1])}
                dcp.load(sd, checkpoint_id=tmp_path / "ckpt")
                set_optimizer_state_dict(models[1], opts[1], sd["optim"])
                models[1].w.data.copy_(models[0].w.data)
            for m, o in zip(models, opts):
                m.w.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                o.step()
        assert torch.equal(models[0].w.to_local(), models[1].w.to_local())
        assert opts[1].state[models[1].w]["proj_meta"].device.type == "cpu"
        for k, v in opts[0].state[models[0].w].items():
            assert torch.equal(opts[1].state[models[1].w][k], v), k
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name,hp,key", [
    ("galore_adamw", {"rank": 2, "projection": "random"}, "proj_right"),
    ("galore_adamw", {"rank": 2, "projection": "rsvd"}, "proj_right"),
    ("apollo_adamw", {"rank": 2}, "proj_right"),
    ("frugal", {"rank": 2, "projection": "randk"}, "proj_index"),
    ("frugal", {"rank": 2, "projection": "columns"}, "proj_index"),
])
def test_the_matrices_of_a_batch_draw_different_random_projections(name, hp, key):
    """Each matrix of a batch draws its own random basis / selection (its seed, ``matrix_seed``, differs in the
    low 32 bits torch's CPU generator keeps: with the old stride 2^32 every matrix drew matrix 0's)."""
    p = torch.nn.Parameter(torch.randn(E, 12, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer([{"params": [p], **hp}], name)
    p.grad = torch.randn(E, 12, 7)
    opt.step()
    drawn = opt.state[p][key]
    assert all(not torch.equal(drawn[0], drawn[e]) for e in range(1, E))
