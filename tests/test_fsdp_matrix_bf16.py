"""The matrix rules (``muon``, ``normuon``, ``sinkgd``, ``scale``, ``racs``) on bfloat16 FSDP2 shards (2 gloo
processes on the CPU) against the same optimizer in one process, with each bfloat16 write-back (round to nearest, Kahan
compensation, stochastic rounding) and bfloat16 state; a ``torch.distributed.checkpoint`` save after 2 steps,
loaded into another model and optimizer, continues to the uninterrupted run.

How a shard is stepped (lowmem/optim/recipes/normalized.py, normuon.py; docs/distributed.md, "Which optimizers"):
Muon and NorMuon all-gather the whole bfloat16 momentum matrix ``U`` and run the unsharded Newton-Schulz iteration
on every rank (NorMuon then all-reduces two Frobenius norms' squares); SinkGD normalises the shard's rows and sums
the columns' squared norms over the shards in every iteration; SCALE's hidden and head roles normalise rows (local),
its embedding role the columns by their RMS over every shard's rows; RACS keeps the shard's rows' scalings and sums
the column sums and the squared norm over the shards in every fixed-point iteration.

The gradients are set by hand, the same global bfloat16 tensors in both runs (each rank gets its rows), so the
only differences left are the sharded step's own. The model's weights give uneven shards (255 rows: 128 / 127; 3
rows: 2 / 1), an even wide one (64 x 96), a vector (AdamW) and a batch of 3 matrices (fused experts: 2 / 1 whole
matrices per rank, stepped one by one by the engine, the rules' ``per_matrix``). What is asserted, and why (measured
numbers in docs/distributed.md, "The matrix rules on bfloat16 shards"):

- round to nearest, Kahan, bfloat16 state: ``muon`` bit for bit (weights, every state entry, the compensation);
  ``normuon``, ``sinkgd``, ``scale``, ``racs`` sum something over the shards in another order than one process (the
  two Frobenius norms, the column sums in every iteration, the embedding's columns, RACS's column sums and norm), so
  the float32 step differs in its last bits: the weights within one bfloat16 ulp (measured 0.0), the weight plus its
  compensation (the float32 result) within 1/16 of the weight's ulp (measured 1/512), in at most 0.1% of the
  elements; RACS's float32 scalings within rtol 4e-6 (measured 7.4e-7); every other state entry bit for bit;
- stochastic rounding: each shard rounds with its own stream (a stream per parameter, step and shard position:
  the engine's ``_param_index``), so the runs differ by their roundings only: every weight within ``2 x steps``
  ulps of one process's (each run's write-back is within one ulp of the same float32 value at every step: the
  updates do not read the weights but through the decay, which shrinks a difference); the state bit for bit;
- resume: bit for bit for every case (the stream of the stochastic rounding is seeded by the step count); the
  2-process Kahan checkpoints load into one process and continue to the 2-process run.

The same spawn runs transformers' Conv1D weights (GPT-2's layers, stored ``[in, out]``; FSDP2 shards their input
side) with the rules that read ``weight_layout="in_out"`` (``CONV_CASES``, float32 and bfloat16 weights, 17 and 45
input rows: uneven shards), ``create_optimizer(model)`` on the sharded model: :func:`_compare_conv`.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lowmem.optim import create_optimizer

pytestmark = [pytest.mark.distributed]

STEPS = 4
LR = 2e-3  # (updates near or below a bfloat16 ulp of the weights ~U(-0.5, 0.5): the write-back rounding matters)
# the bfloat16 settings every engine rule documents (docs/optimizers.md, "Pure-bfloat16 training"; the matrix rules
# have no master-weights option: that is BAdam's); case tag "rule-setting"
OPTIONS = {"nearest": {}, "kahan": {"kahan_summation": True}, "sr": {"bf16_stochastic_round": True},
           "state_bf16": {"state_dtype": "bfloat16", "kahan_summation": True}}
RULES = ["muon", "normuon", "sinkgd", "scale", "racs"]
CASES = {f"{rule}-{opt}": (rule, opt) for rule in RULES for opt in OPTIONS}


class Net(nn.Module):
    """tall: 255 x 16 (shards 128 / 127), wide: 64 x 96 (32 / 32) with a bias (AdamW), small: 3 x 16 (2 / 1),
    experts: a batch of 3 matrices 16 x 8 (fused MoE experts; 2 / 1 whole matrices)."""

    def __init__(self):
        super().__init__()
        self.tall = nn.Linear(16, 255, bias=False)
        self.wide = nn.Linear(96, 64)
        self.small = nn.Linear(16, 3, bias=False)
        self.experts = nn.Parameter(torch.empty(3, 16, 8))


def make(seed=0):
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    return model.to(torch.bfloat16)


def groups(model, rule):
    mats = [model.tall.weight, model.wide.weight, model.small.weight, model.experts]
    if rule == "scale":  # each role once: hidden (rows), embedding (columns over every row), head (rows, momentum)
        return [{"params": [model.tall.weight, model.experts], "scale_role": "hidden"},
                {"params": [model.wide.weight], "scale_role": "embedding"},
                {"params": [model.small.weight], "scale_role": "head"}, {"params": [model.wide.bias]}]
    if rule == "racs":  # every parameter (a vector as an [n, 1] column), the batch per matrix
        return [{"params": mats + [model.wide.bias]}]
    key = "use_sinkgd" if rule == "sinkgd" else "use_muon"
    return [{"params": mats, key: True}, {"params": [model.wide.bias]}]


def build(model, tag):
    rule, opt = CASES[tag]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_optimizer(groups(model, rule), rule, lr=LR, **OPTIONS[opt])


def grads(step, net=None):
    """The global gradients of step ``step`` (the weights' dtype, by parameter name; ``net``: a model of the run's
    class, default :class:`Net`)."""
    g = torch.Generator().manual_seed(1000 + step)
    net = Net().to(torch.bfloat16) if net is None else net
    return {n: torch.randn(p.shape, generator=g).to(p.dtype) for n, p in net.named_parameters()}


def train(model, opt, steps, start=0):
    from lowmem.optim.sharded import is_dtensor, shard_rows

    net = ConvNet().to(CONV_CASES[model.tag][1]) if getattr(model, "tag", None) in CONV_CASES else None
    for step in range(start, start + steps):
        whole = grads(step, net)
        for n, p in model.named_parameters():
            if is_dtensor(p):
                from torch.distributed.tensor import DTensor

                a, b = shard_rows(p)
                p.grad = DTensor.from_local(whole[n][a:b].contiguous(), p.device_mesh, p.placements,
                                            run_check=False, shape=p.shape, stride=p.stride())
            else:
                p.grad = whole[n]
        opt.step()


# ---- transformers' Conv1D weights ([in, out]: weight_layout="in_out") ----
# create_optimizer(model) puts them in a group of their own with weight_layout="in_out" (registry.LAYOUT_AWARE) and
# the rules read it: Muon's ratio sqrt(max(1, out / in)) (adjust_lr_fn="original"), NorMuon's second moment per output
# column (update_scale="preserve_norm" reads (out, in) too), SCALE's hidden role normalising the columns. FSDP2 shards
# dimension 0, the input side: Muon gathers the whole matrix (the ratio of the whole (out, in)); SCALE sums the
# columns' squares over the shards; NorMuon sums the columns' squared norms over the shards and keeps the whole (out,)
# v on every rank (saved once, replicated).
CONV_CASES = {"conv-muon-float32": ("muon", torch.float32, {"adjust_lr_fn": "original"}),
              "conv-muon-bfloat16": ("muon", torch.bfloat16, {"adjust_lr_fn": "original"}),
              "conv-normuon-float32": ("normuon", torch.float32, {"update_scale": "preserve_norm"}),
              "conv-normuon-bfloat16": ("normuon", torch.bfloat16, {"kahan_summation": True}),
              "conv-scale-float32": ("scale", torch.float32, {}),
              "conv-scale-bfloat16": ("scale", torch.bfloat16, {"kahan_summation": True})}


class ConvNet(nn.Module):
    """GPT-2's layers (transformers' Conv1D, weight [in, out], a bias): odd 17 -> 40 (shards of 9 / 8 input rows;
    out > in, so Muon's 'original' ratio is sqrt(40 / 17), 1 if read from the stored [17, 40]), tall 45 -> 8
    (23 / 22)."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.odd = Conv1D(40, 17)
        self.tall = Conv1D(8, 45)


def make_conv(tag, seed=0):
    torch.manual_seed(seed)
    model = ConvNet()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    model = model.to(CONV_CASES[tag][1])
    model.tag = tag
    return model


def build_conv(model, tag):
    rule, _, kw = CONV_CASES[tag]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_optimizer(model, rule, lr=LR, **kw)


def in_out_names(model, opt):
    """The parameters of ``opt``'s ``weight_layout="in_out"`` groups, by name."""
    names = {p: n for n, p in model.named_parameters()}
    return sorted(names[p] for g in opt.param_groups if g.get("weight_layout") == "in_out" for p in g["params"])


def full(model, opt):
    """The whole weights and, by parameter name, every state entry (full tensors)."""
    from lowmem.optim.sharded import is_dtensor

    names = {p: n for n, p in model.named_parameters()}
    out = {n: (p.full_tensor() if is_dtensor(p) else p).detach().clone() for n, p in model.named_parameters()}
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, p in zip([i for g in sd["param_groups"] for i in g["params"]], params):
        for k, v in sd["state"].get(pid, {}).items():
            if isinstance(v, torch.Tensor) and k != "shard_placement":
                out[f"{names[p]}.{k}"] = (v.full_tensor() if is_dtensor(v) else v).clone()
    return out


def _worker(rank, world, init_file, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))

        def sharded(seed=0):
            model = make(seed)
            for m in (model.tall, model.wide, model.small):
                fully_shard(m, mesh=mesh)
            return fully_shard(model, mesh=mesh)

        report = {"resumed": {}, "local": {}}
        for tag in CASES:
            model = sharded()
            opt = build(model, tag)
            train(model, opt, 2)
            ckpt = os.path.join(out_dir, f"dcp_{tag}")
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=ckpt)
            train(model, opt, STEPS - 2, start=2)
            straight = full(model, opt)
            if rank == 0:
                torch.save(straight, os.path.join(out_dir, f"{tag}.pt"))
            report["local"][tag] = {n: list(p.to_local().shape) for n, p in model.named_parameters()}
            report.setdefault("transient", {})[tag] = opt.step_transient_bytes()  # (the rank's matrices' steps)
            model = sharded(seed=1)  # other weights: the checkpoint must set them
            opt = build(model, tag)
            sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(sd, checkpoint_id=ckpt)
            set_model_state_dict(model, sd["model"])
            set_optimizer_state_dict(model, opt, sd["optim"])
            train(model, opt, STEPS - 2, start=2)
            again = full(model, opt)
            report["resumed"][tag] = {k: torch.equal(again[k], v) for k, v in straight.items()}
        for tag in CONV_CASES:  # (the same run with the Conv1D model, create_optimizer(model) on the sharded model)
            def sharded_conv(seed=0, tag=tag):
                model = make_conv(tag, seed)
                for m in (model.odd, model.tall):
                    fully_shard(m, mesh=mesh)
                return fully_shard(model, mesh=mesh)

            model = sharded_conv()
            opt = build_conv(model, tag)
            report.setdefault("in_out", {})[tag] = in_out_names(model, opt)
            train(model, opt, 2)
            ckpt = os.path.join(out_dir, f"dcp_{tag}")
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=ckpt)
            train(model, opt, STEPS - 2, start=2)
            straight = full(model, opt)
            if rank == 0:
                torch.save(straight, os.path.join(out_dir, f"{tag}.pt"))
            report["local"][tag] = {n: list(p.to_local().shape) for n, p in model.named_parameters()}
            model = sharded_conv(seed=1)
            opt = build_conv(model, tag)
            sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(sd, checkpoint_id=ckpt)
            set_model_state_dict(model, sd["model"])
            set_optimizer_state_dict(model, opt, sd["optim"])
            train(model, opt, STEPS - 2, start=2)
            again = full(model, opt)
            report["resumed"][tag] = {k: torch.equal(again[k], v) for k, v in straight.items()}
        every = [None] * world
        dist.all_gather_object(every, report)
        if rank == 0:
            with open(os.path.join(out_dir, "report.json"), "w") as f:
                json.dump(every, f)
    finally:
        dist.destroy_process_group()
    from lowmem.dist_exit import exit_process

    exit_process(0, distributed=True)  # no finalization: a gloo thread could abort it (lowmem/dist_exit.py)


@pytest.fixture(scope="module")
def matrix_fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix_bf16_fsdp")
    mp.spawn(_worker, args=(2, str(out / "rendezvous"), str(out)), nprocs=2, join=True)
    return out, json.loads((out / "report.json").read_text())


def single(tag, steps=STEPS):
    model = make()
    opt = build(model, tag)
    train(model, opt, steps)
    return full(model, opt)


def ulp(x):
    """One bfloat16 ulp at ``x`` (float32; at least the smallest normal's)."""
    e = torch.frexp(x.float().abs().clamp(min=2.0 ** -126))[1]
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), e - 8)


# the cases whose sharded step sums something over the shards in another order than one process (SinkGD's column
# sums in every iteration, SCALE's embedding columns, NorMuon's two Frobenius norms): the float32 update differs in
# its last bits, which can move a bfloat16 write-back by one ulp, or Kahan's compensation (what the write-back left)
SUMMED = {"normuon", "sinkgd", "scale", "racs"}


def _compare(tag, sharded, ref, w0):
    """Assert the 2-process result ``sharded`` against one process's ``ref`` (names -> full tensors); ``w0``: the
    initial weights by name. Returns the max |difference| of the weights (for the docs' numbers)."""
    rule, opt = CASES[tag]
    assert sorted(sharded) == sorted(ref)
    worst = 0.0
    for k, v in ref.items():
        a, b = sharded[k], v
        assert a.dtype == b.dtype and a.shape == b.shape, k
        d = (a.double() - b.double()).abs()
        if k in w0:
            worst = max(worst, d.max().item())
        if opt == "sr" and k in w0:
            # each write-back rounds to one of the two neighbours of the same float32 value (the updates do not read
            # the weights but through the decay, which shrinks a difference): at most one ulp per step, per run
            size = torch.maximum(torch.maximum(a.float().abs(), b.float().abs()), w0[k].float().abs())
            assert (d <= 2 * STEPS * ulp(size).double()).all(), (k, d.max().item())
            assert d.max() > 0, k  # (the shards round with their own streams)
        elif rule in SUMMED and k in w0:
            # at most one ulp in at most 0.1% of the elements (measured: 0.0)
            size = torch.maximum(a.float().abs(), b.float().abs())
            assert (d <= ulp(size).double()).all(), (k, d.max().item())
            assert (d > 0).sum() <= max(2, d.numel() // 1000), (k, int((d > 0).sum()))
        elif rule in SUMMED and k.endswith(".kahan_comp"):
            # the compensation keeps what the write-back dropped of the float32 result, so the weight plus its
            # compensation is that result up to the compensation's own roundings (a bfloat16 below half an ulp of
            # the weight, rounded at every step: 2^-9 of the weight's ulp each; 1/16 of it asserted), the float32
            # result's last-bit difference (2^-22 |w|) and the steps' own difference (4e-6 of the movement: RACS's
            # scalings are 7.4e-7 apart); in at most 0.1% of the elements (measured: 1 to 3 elements of a weight,
            # 1.9e-9 .. 4.8e-7 apart, at most 1/512 of the weight's ulp)
            name = k[: -len(".kahan_comp")]
            held = (sharded[name].double() + a.double() - ref[name].double() - b.double()).abs()
            size = torch.maximum(sharded[name].double().abs(), ref[name].double().abs())
            moved = (ref[name].double() + b.double() - w0[name].double()).abs()
            assert (held <= ulp(size.float()).double() / 16 + 2.0 ** -22 * size + 4e-6 * moved).all(), \
                (k, held.max().item())
            assert (d > 0).sum() <= max(2, d.numel() // 1000), (k, int((d > 0).sum()))
        elif rule == "racs" and k.rsplit(".", 1)[-1] in ("row_scale", "col_scale", "update_norm") and \
                b.dtype == torch.float32:
            # RACS's float32 scalings and kept norm: the column sums (with q.q) and the squared norm summed over the
            # shards in every fixed-point iteration, in another order (measured 7.4e-7 relative at most)
            assert torch.allclose(a, b, rtol=4e-6, atol=0), (k, (d / b.double().abs()).max().item())
        else:  # the rest bit for bit: every weight of Muon, every state entry but the compensation
            assert torch.equal(a, b), (k, d.max().item())
    return worst


@pytest.mark.parametrize("tag", list(CASES))
def test_two_shards_equal_one_process(matrix_fsdp_run, tag):
    """2 processes (uneven 128 / 127 and 2 / 1 shards, an even wide weight) against one process: every weight and
    state entry (momentum, NorMuon's row second moment, the AdamW vector's moments, the compensation), full tensors,
    as the module's docstring states (bit for bit for Muon; the others where nothing is summed over the shards)."""
    out, report = matrix_fsdp_run
    sharded = torch.load(out / f"{tag}.pt", weights_only=True)
    ref = single(tag)
    w0 = dict(make().named_parameters())
    _compare(tag, sharded, ref, w0)
    assert report[0]["local"][tag] == {"tall.weight": [128, 16], "wide.weight": [32, 96], "wide.bias": [32],
                                       "small.weight": [2, 16], "experts": [2, 16, 8]}
    assert report[1]["local"][tag] == {"tall.weight": [127, 16], "wide.weight": [32, 96], "wide.bias": [32],
                                       "small.weight": [1, 16], "experts": [1, 16, 8]}
    assert all(r["transient"][tag] > 0 for r in report)
    # the batch of matrices is stepped by the rule (its state), not by AdamW (its moments)
    rule = CASES[tag][0]
    held = {"muon": ["momentum_buffer"], "normuon": ["momentum_buffer", "second_momentum_buffer"]}.get(rule, [])
    assert all(f"experts.{k}" in ref for k in held) and "experts.exp_avg" not in ref, sorted(ref)
    assert (sharded["experts"] != w0["experts"]).any()
    if "kahan_summation" in OPTIONS[CASES[tag][1]]:  # the compensation is live
        assert all(ref[f"{n}.kahan_comp"].abs().max() > 0 for n in w0), tag
    if CASES[tag][1] == "state_bf16":
        held = {"muon": ["tall.weight.momentum_buffer", "wide.bias.exp_avg"],
                "scale": ["small.weight.momentum_buffer", "wide.bias.exp_avg"],
                "normuon": ["tall.weight.momentum_buffer", "tall.weight.second_momentum_buffer", "wide.bias.exp_avg"],
                "sinkgd": ["wide.bias.exp_avg"], "racs": ["tall.weight.row_scale", "tall.weight.col_scale"]}[CASES[tag][0]]
        assert all(ref[k].dtype == torch.bfloat16 for k in held), tag


@pytest.mark.parametrize("tag", list(CASES))
def test_checkpoint_resume_is_bit_exact(matrix_fsdp_run, tag):
    """save after 2 steps (torch.distributed.checkpoint) -> load into another model and optimizer -> 2 more steps
    equals the 4 uninterrupted steps on both ranks: weights and every state entry (the stochastic rounding's
    stream is seeded by the step count, so it draws the uninterrupted run's bits)."""
    _, report = matrix_fsdp_run
    for rank in report:
        assert rank["resumed"][tag] and all(rank["resumed"][tag].values()), rank["resumed"][tag]


@pytest.mark.parametrize("tag", [t for t in CASES if CASES[t][1] == "kahan"])
def test_two_shard_checkpoint_loads_into_one_process(matrix_fsdp_run, tag):
    """The state of a matrix rule carries the parameter's placements (momentum and compensation in its shape,
    NorMuon's per-row second moment as the rows of the whole ``(m,)``), so the 2-process checkpoint of uneven
    shards reshards: one process loads it and its 2 more steps equal the 2-process run's (as the comparison
    above: Muon bit for bit, the summed rules within the bound)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    out, _ = matrix_fsdp_run
    model = make(seed=1)
    opt = build(model, tag)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=out / f"dcp_{tag}")
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    train(model, opt, STEPS - 2, start=2)
    sharded = torch.load(out / f"{tag}.pt", weights_only=True)
    _compare(tag, sharded, full(model, opt), dict(make().named_parameters()))



def single_conv(tag, steps=STEPS):
    model = make_conv(tag)
    opt = build_conv(model, tag)
    train(model, opt, steps)
    return full(model, opt)


def _compare_conv(tag, sharded, ref):
    """The Conv1D run on 2 processes (``sharded``) against one process's (``ref``), full tensors by name. Muon: every
    weight and state entry bit for bit (the whole matrix gathered, its ratio of the whole (out, in)). NorMuon and SCALE
    sum the columns' squares over the shards (another order than one process's column reduction): float32 weights
    and NorMuon's v within rtol 1e-6 (measured 2.3e-7 / 2.4e-7: 1-2 float32 ulps); bfloat16 weights within one ulp in
    at most 0.1% of the elements and the Kahan compensation within the file's bound (measured: both 0.0). The AdamW
    biases' float32 exp_avg_sq: rtol 1e-6 (measured 1.9e-7 in 3 elements, the unsharded foreach bucket against the
    shard's per-parameter step). The rest bit for bit. A layout read wrongly moves the steps by 3-19% (LEFT21 1)."""
    rule, dtype, _ = CONV_CASES[tag]
    w0 = dict(make_conv(tag).named_parameters())
    assert sorted(sharded) == sorted(ref)
    for k, b in ref.items():
        a = sharded[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        d = (a.double() - b.double()).abs()
        summed = rule != "muon" and (k in w0 or k.endswith(".second_momentum_buffer"))
        if (summed and b.dtype == torch.float32) or k.endswith(".exp_avg_sq") and b.dtype == torch.float32:
            assert torch.allclose(a, b, rtol=1e-6, atol=0), (k, (d / b.double().abs()).max().item())
        elif summed and k in w0:  # bfloat16 weights
            size = torch.maximum(a.float().abs(), b.float().abs())
            assert (d <= ulp(size).double()).all(), (k, d.max().item())
            assert (d > 0).sum() <= max(2, d.numel() // 1000), (k, int((d > 0).sum()))
        elif rule != "muon" and k.endswith(".kahan_comp"):
            name = k[: -len(".kahan_comp")]
            held = (sharded[name].double() + a.double() - ref[name].double() - b.double()).abs()
            size = torch.maximum(sharded[name].double().abs(), ref[name].double().abs())
            moved = (ref[name].double() + b.double() - w0[name].double()).abs()
            assert (held <= ulp(size.float()).double() / 16 + 2.0 ** -22 * size + 4e-6 * moved).all(), \
                (k, held.max().item())
        else:
            assert torch.equal(a, b), (k, d.max().item())


@pytest.mark.parametrize("tag", list(CONV_CASES))
def test_conv1d_two_shards_equal_one_process(matrix_fsdp_run, tag):
    """GPT-2's Conv1D weights ([in, out]; 17 and 45 input rows: shards of 9 / 8 and 23 / 22) on 2 processes against
    one process, float32 and bfloat16 weights (:func:`_compare_conv`); create_optimizer(model) on the sharded model put
    both weights in a weight_layout="in_out" group (FSDP2 makes each layer an FSDPConv1D subclass); NorMuon's v is the
    whole (out,) on every rank."""
    out, report = matrix_fsdp_run
    sharded = torch.load(out / f"{tag}.pt", weights_only=True)
    _compare_conv(tag, sharded, single_conv(tag))
    for r, rows in zip(report, ({"odd.weight": [9, 40], "tall.weight": [23, 8]},
                                {"odd.weight": [8, 40], "tall.weight": [22, 8]})):
        assert r["in_out"][tag] == ["odd.weight", "tall.weight"], r["in_out"][tag]
        assert r["local"][tag] == {**rows, "odd.bias": [20], "tall.bias": [4]}, r["local"][tag]
    if CONV_CASES[tag][0] == "normuon":
        assert sharded["odd.weight.second_momentum_buffer"].shape == (40,)


@pytest.mark.parametrize("tag", list(CONV_CASES))
def test_conv1d_checkpoint_resumes_and_loads_into_one_process(matrix_fsdp_run, tag):
    """The Conv1D runs' DCP checkpoint after 2 steps: loaded into another sharded model and optimizer, 2 more steps
    equal the uninterrupted run bit for bit on both ranks; loaded into one process (NorMuon's v saved once,
    replicated; the momentum sharded as the weight), 2 more steps equal the 2-process run as above."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    out, report = matrix_fsdp_run
    for rank in report:
        assert rank["resumed"][tag] and all(rank["resumed"][tag].values()), rank["resumed"][tag]
    model = make_conv(tag, seed=1)
    opt = build_conv(model, tag)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=out / f"dcp_{tag}")
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    train(model, opt, STEPS - 2, start=2)
    _compare_conv(tag, torch.load(out / f"{tag}.pt", weights_only=True), full(model, opt))
