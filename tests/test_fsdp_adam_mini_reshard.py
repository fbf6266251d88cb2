"""FSDP2 Adam-mini checkpoints across layouts, and loads that must refuse.

Resharding (issue 13): the per-row ``v`` of 16 rows of 4-row heads cut by 3 processes (6 / 6 / 4
rows) and the per-head ``v`` of whole heads on 2 processes (8 / 8 rows: 2 heads each) are both saved
one number per row (``sharded.state_to_dtensor``, ``reduced_dim="rows"``), so a checkpoint of either
layout loads into the other (``torch.distributed.checkpoint``) and continues like the uninterrupted
run. Refusals: a state entry lost or ``None`` on the way, of another dtype, missing or unknown, a
checkpoint of another optimizer, or of settings that change the state's layout (``head_dim``,
``block``, quantization ``block_size``, GaLore's ``rank``) raise ``ValueError`` naming the parameter
and the entry (``sharded.check_loaded_state`` / ``check_same_settings``), never load half.
One spawn of 3 gloo processes (the 2-process layout on two of them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, os, socket, sys, tempfile
import torch, torch.distributed as dist
import torch.multiprocessing as mp
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)


def make(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(16, 4, bias=False)).to(torch.float64)


MESH = {}  # the layout in use: {"mesh": DeviceMesh, "group": its process group}


def sharded(seed=0):
    from torch.distributed.fsdp import fully_shard
    model = make(seed)
    for m in (model[0], model[2], model):
        fully_shard(m, mesh=MESH["mesh"])
    return model


def build(model, name="adam_mini", **hp):
    from lowmem.optim.registry import create_optimizer
    if name == "adam_mini":
        head = {"block": "head", "head_dim": 4}  # (the settings under test: the first weight's)
        return create_optimizer([{"params": [model[0].weight], **head, **hp}, {"params": [model[2].weight], **head}],
                                name, lr=1e-2)
    if name == "galore_adamw":
        return create_optimizer([{"params": [model[0].weight], "update_proj_gap": 2, **hp},
                                 {"params": [model[2].weight], "rank": None}], name, lr=1e-2)  # full-rank (the default
        # rank 128, above the 4 x 16 weight's sides, applied to nothing: an error)
    return create_optimizer([{"params": [model[0].weight]}, {"params": [model[2].weight]}], name, lr=1e-2, **hp)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 8, generator=g).double(), torch.randn(12, 4, generator=g).double()


def train(model, opt, steps):
    x, y = data()
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def full(model):
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


def error(fn):
    try:
        fn()
        return None
    except BaseException as e:  # (DCP's CheckpointException is a BaseException)
        return f"{type(e).__name__}: {e}"[:1500]


def uninterrupted(ckpt):
    # 4 steps, a DCP checkpoint after 2
    model = sharded()
    opt = build(model)
    train(model, opt, 2)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt,
             process_group=MESH["group"])
    train(model, opt, 2)
    return full(model), opt.state[model[0].weight]["exp_avg_sq"].numel()


def dcp_load(ckpt, opt_fn=build, edit=None):
    model = sharded(1)  # other weights: the checkpoint must set them
    opt = opt_fn(model)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=ckpt, process_group=MESH["group"])
    set_model_state_dict(model, sd["model"])
    if edit is not None:
        edit(sd["optim"]["state"]["0.weight"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    return model, opt


def resumed(ckpt, final):
    # (max |difference| from final, v's size after the load, the error if the load failed)
    try:
        model, opt = dcp_load(ckpt)
    except BaseException as e:
        return None, None, f"{type(e).__name__}: {e}"[:1500]
    v = opt.state[model[0].weight]["exp_avg_sq"].numel()
    train(model, opt, 2)
    again = full(model)
    return max((again[k] - final[k]).abs().max().item() for k in final), v, None


def plain_refusals(out, rank):
    # torch.save / torch.load(weights_only=True) of each rank's state_dict, into other settings
    res = {}
    for tag, saved_with, loaded_with in (
            ("head_dim", ("adam_mini", {}), ("adam_mini", {"head_dim": 8})),
            ("recipe", ("adam_mini", {}), ("adamw", {})),
            ("block_size", ("adamw8bit", {"block_size": 64, "min_quant_size": 16}),
             ("adamw8bit", {"block_size": 128, "min_quant_size": 16})),
            ("rank", ("galore_adamw", {"rank": 2}), ("galore_adamw", {"rank": 4}))):
        model = sharded()
        opt = build(model, saved_with[0], **saved_with[1])
        train(model, opt, 1)
        torch.save(opt.state_dict(), f"{out}.{tag}.{rank}")
        sd = torch.load(f"{out}.{tag}.{rank}", weights_only=True)
        opt = build(model, loaded_with[0], **loaded_with[1])
        before = ({k: v for k, v in opt.param_groups[0].items() if k != "params"},
                  {k: tuple(v.shape) for k, v in opt.state[model[0].weight].items()})
        res[tag] = error(lambda: opt.load_state_dict(sd))
        after = ({k: v for k, v in opt.param_groups[0].items() if k != "params"},
                 {k: tuple(v.shape) for k, v in opt.state[model[0].weight].items()})
        res[tag + "_kept"] = before == after  # a refused load leaves the optimizer as it was
        # the same settings load (the check is no blanket refusal)
        opt = build(model, saved_with[0], **saved_with[1])
        res[tag + "_same"] = error(lambda: opt.load_state_dict(torch.load(f"{out}.{tag}.{rank}", weights_only=True)))
    return res


def dcp_refusals(ckpt):
    import lowmem.optim.engine as E
    res = {}
    orig = E.state_from_dtensor
    E.state_from_dtensor = lambda v, p, s, k: None if k == "exp_avg_sq" else orig(v, p, s, k)  # lost on the way
    try:
        res["none"] = error(lambda: dcp_load(ckpt))
    finally:
        E.state_from_dtensor = orig
    res["missing"] = error(lambda: dcp_load(ckpt, edit=lambda s: s.pop("exp_avg_sq")))
    res["extra"] = error(lambda: dcp_load(ckpt, edit=lambda s: s.update(exp_avg_sq_row=s["exp_avg_sq"])))
    res["dtype"] = error(lambda: dcp_load(ckpt, edit=lambda s: s.update(exp_avg_sq=s["exp_avg_sq"].half())))
    res["rows_differ"] = error(lambda: dcp_load(ckpt, edit=lambda s: s["exp_avg_sq"].to_local()[1:2].add_(1.0)))
    res["head_dim"] = error(lambda: dcp_load(ckpt, lambda m: build(m, head_dim=8)))
    res["block_row"] = error(lambda: dcp_load(ckpt, lambda m: build(m, block="row")))
    return res


def worker(rank, world, port, tmp):
    # one spawn of 3 processes: the 3-process layout (6 / 6 / 4 rows: heads cut, one v per row) on all,
    # the 2-process one (8 / 8 rows: whole heads, one v per head, 2 per shard) on ranks 0 and 1
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    three = {"mesh": init_device_mesh("cpu", (3,)), "group": dist.group.WORLD}
    pair = dist.new_group([0, 1])  # (every rank takes part in creating it)
    two = {"mesh": DeviceMesh.from_group(pair, "cpu"), "group": pair} if rank < 2 else None
    alone = dist.new_group([0])  # FSDP2 on one process (16 rows: 4 whole heads, one v per head)
    one = {"mesh": DeviceMesh.from_group(alone, "cpu"), "group": alone} if rank == 0 else None
    res = {}
    MESH.update(three)
    final3, res["v3"] = uninterrupted(os.path.join(tmp, "ckpt3"))
    if rank < 2:
        MESH.update(two)
        final2, res["v2"] = uninterrupted(os.path.join(tmp, "ckpt2"))
        torch.save(final2, os.path.join(tmp, "final2.pt"))
        res["from_three"], res["from_three_v"], res["from_three_error"] = resumed(os.path.join(tmp, "ckpt3"), final3)  # 3 -> 2
        res["dcp"] = dcp_refusals(os.path.join(tmp, "ckpt3"))
        res["plain"] = plain_refusals(os.path.join(tmp, "plain"), rank)
    if rank == 0:  # 3 -> 1
        MESH.update(one)
        res["to_one"], res["to_one_v"], res["to_one_error"] = resumed(os.path.join(tmp, "ckpt3"), final3)
    dist.barrier()
    MESH.update(three)  # 2 -> 3
    res["from_two"], res["from_two_v"], res["from_two_error"] = resumed(
        os.path.join(tmp, "ckpt2"), torch.load(os.path.join(tmp, "final2.pt"), weights_only=True))
    torch.save(res, os.path.join(tmp, f"out.{rank}"))
    dist.barrier()
    dist.destroy_process_group()
    from lowmem.dist_exit import exit_process

    exit_process(0, distributed=True)  # no finalization: a gloo thread could abort it (lowmem/dist_exit.py)


if __name__ == "__main__":
    tmp = tempfile.mkdtemp()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(3, port, tmp), nprocs=3, join=True)
    print(json.dumps([torch.load(os.path.join(tmp, f"out.{r}"), weights_only=True) for r in range(3)]))
"""


@pytest.fixture(scope="module")
def reshard_run(tmp_path_factory):
    script = tmp_path_factory.mktemp("reshard") / "adam_mini_reshard.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.distributed
def test_adam_mini_v_reshards_between_uneven_and_even_layouts(reshard_run):
    """3 processes (6 / 6 / 4 rows, heads cut: one v per row) -> 2 processes (8 / 8, whole heads: one
    v per head) and back, and 3 -> FSDP2 on one process (4 whole heads): DCP save after 2 steps, load into a new model and optimizer on the other
    layout, 2 more steps = the uninterrupted run of the saving layout (float64 weights, float32 v:
    the heads' sums are added in another order). Was Size mismatch (16,) vs (2, 2) before the v of
    whole heads was saved per row too."""
    runs = reshard_run
    assert [r["from_two_error"] for r in runs] == [None] * 3, runs[0]["from_two_error"]
    assert [r["from_three_error"] for r in runs[:2]] == [None] * 2, runs[0]["from_three_error"]
    assert [r["v3"] for r in runs] == [6, 6, 4] and [r["v2"] for r in runs[:2]] == [2, 2]
    assert [r["from_two_v"] for r in runs] == [6, 6, 4]  # loaded into the other layout's v
    assert [r["from_three_v"] for r in runs[:2]] == [2, 2]
    assert runs[0]["to_one_error"] is None and runs[0]["to_one_v"] == 4 and runs[0]["to_one"] <= 1e-7, runs[0]
    for r in runs:
        assert r["from_two"] <= 1e-7, runs
    for r in runs[:2]:
        assert r["from_three"] <= 1e-7, runs


DCP_REFUSALS = {
    # a state entry lost on the way (it loaded as None before: a crash at the next step, or worse)
    "none": "loaded state 'exp_avg_sq' is NoneType None, expected a torch.float32 tensor of shape",
    "missing": "the loaded state has no 'exp_avg_sq' (expected a torch.float32 tensor of shape",
    "extra": "the loaded state has ['exp_avg_sq_row'], which this optimizer does not keep",
    "dtype": "loaded state 'exp_avg_sq' is a torch.float16 tensor of shape",
    # one v per row whose rows of one head differ: not the v of 4-row heads (a corrupt checkpoint)
    "rows_differ": "but the loaded rows 0..3 of this shard hold different numbers",
    # the same (16,) per-row tensor in the checkpoint; the saved settings would have replaced these
    "head_dim": "the checkpoint was saved with other settings head_dim=4 (this optimizer: 8)",
    "block_row": "the checkpoint was saved with other settings block='head' (this optimizer: 'row')",
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", sorted(DCP_REFUSALS))
def test_distributed_checkpoint_load_refuses_what_does_not_fit(reshard_run, case):
    """set_optimizer_state_dict after dcp.load of the 3-process checkpoint onto 2 processes: every
    rank raises ValueError naming the parameter, the entry, what was expected and what was found."""
    for r in reshard_run[:2]:
        msg = r["dcp"][case]
        assert msg is not None and msg.startswith("ValueError"), (case, msg)
        assert DCP_REFUSALS[case] in msg, (case, msg)
        # the parameter (its name, or its group, or its shape where the piece is converted)
        assert any(w in msg for w in ("adam_mini: parameter '0.weight' of shape (16, 8)", "adam_mini: parameter group 0",
                                      "state 'exp_avg_sq' of a sharded parameter of shape (16, 8)")), (case, msg)


PLAIN_REFUSALS = {
    "head_dim": "head_dim=4 (this optimizer: 8)",
    "recipe": "it was saved by another optimizer",
    "block_size": "block_size=64 (this optimizer: 128)",
    "rank": "rank=2 (this optimizer: 4)",
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", sorted(PLAIN_REFUSALS))
def test_state_dict_of_other_settings_refuses_and_keeps_the_optimizer(reshard_run, case):
    """Each rank's state_dict() through torch.save / torch.load(weights_only=True) into an optimizer
    of another head_dim / recipe / quantization block_size (64 vs 128) / GaLore rank: ValueError, and the
    optimizer keeps its own settings and state (torch's load had replaced them); the same settings
    load."""
    for r in reshard_run[:2]:
        msg = r["plain"][case]
        assert msg is not None and msg.startswith("ValueError") and PLAIN_REFUSALS[case] in msg, (case, msg)
        assert r["plain"][case + "_kept"] is True, case
        assert r["plain"][case + "_same"] is None, (case, r["plain"][case + "_same"])


# ---- the checks themselves (no processes) ----


def test_rows_of_blocks_and_back():
    """A v of k-row blocks saved one number per row and taken back; rows of a block that differ refuse."""
    import torch

    from lowmem.optim.sharded import blocks_of_rows, rows_of_blocks

    p = torch.empty(16, 8)
    v = torch.tensor([1.0, 2.0])
    rows = rows_of_blocks(v, 8)
    assert rows.tolist() == [1.0] * 4 + [2.0] * 4
    assert torch.equal(blocks_of_rows(rows, 2, "exp_avg_sq", p), v)
    assert rows_of_blocks(v, 2) is v and rows_of_blocks(torch.empty(0), 0).numel() == 0  # one per row; no rows
    rows[5] += 1.0
    with pytest.raises(ValueError, match=r"state 'exp_avg_sq' .*rows 4..7 of this shard hold different numbers"):
        blocks_of_rows(rows, 2, "exp_avg_sq", p)


def test_check_loaded_state_names_the_entry_expected_and_found():
    import torch

    from lowmem.optim.sharded import check_loaded_state

    expected = {"step": torch.zeros(()), "exp_avg": torch.empty(6, 8, device="meta"),
                "exp_avg_sq": torch.empty(6, device="meta")}
    good = {"step": torch.zeros(()), "exp_avg": torch.zeros(6, 8), "exp_avg_sq": torch.zeros(6)}
    check_loaded_state(good, expected, "w")
    cases = {
        "None": ({**good, "exp_avg_sq": None}, "w: loaded state 'exp_avg_sq' is NoneType None, expected a torch.float32 tensor of shape (6,)"),
        "missing": ({k: v for k, v in good.items() if k != "exp_avg"}, "w: the loaded state has no 'exp_avg' (expected a torch.float32 tensor of shape (6, 8))"),
        "shape": ({**good, "exp_avg_sq": torch.zeros(2)}, "'exp_avg_sq' is a torch.float32 tensor of shape (2,), expected a torch.float32 tensor of shape (6,)"),
        "dtype": ({**good, "exp_avg": torch.zeros(6, 8, dtype=torch.bfloat16)}, "'exp_avg' is a torch.bfloat16 tensor of shape (6, 8), expected a torch.float32"),
        "extra": ({**good, "exp_avg_sq_row": torch.zeros(6)}, "w: the loaded state has ['exp_avg_sq_row'], which this optimizer does not keep"),
    }
    for case, (saved, msg) in cases.items():
        with pytest.raises(ValueError) as e:
            check_loaded_state(saved, expected, "w")
        assert msg in str(e.value), (case, str(e.value))


def test_check_same_settings_refuses_only_what_changes_the_state():
    from lowmem.optim.sharded import check_same_settings

    def layout(group):  # stands for state_layout: v has rows / head_dim entries
        return {"exp_avg_sq (whole tensor)": ((16 // group["head_dim"],), "float32")}

    mine = {"params": [0], "lr": 1e-2, "block": "head", "head_dim": 8}
    check_same_settings(mine, {**mine, "lr": 3e-4}, layout, "g")  # the learning rate: torch's load wins
    check_same_settings(mine, {**mine, "initial_lr": 1e-2}, layout, "g")  # an LR scheduler's key
    with pytest.raises(ValueError, match=r"g: the checkpoint was saved with other settings head_dim=4 \(this optimizer: 8\)"
                                         r" that change its state \(exp_avg_sq \(whole tensor\): \(\(4,\), 'float32'\) saved"):
        check_same_settings(mine, {**mine, "head_dim": 4}, layout, "g")
    with pytest.raises(ValueError, match=r"has settings \['block_size'\] this optimizer does not know and lacks \['head_dim'\]"):
        check_same_settings(mine, {"params": [0], "lr": 1e-2, "block": "head", "block_size": 64}, layout, "g")
