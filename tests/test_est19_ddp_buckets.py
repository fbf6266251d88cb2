"""EST19 (issue 12): DDP's gradient buckets are a component of their own, in the estimate (``ddp=True``) and in the
measured report (MemoryCallback / PeakTracker), not activations. Two gloo processes (``torch.multiprocessing``, forked), the tiny
Llama wrapped in ``DistributedDataParallel`` (``gradient_as_bucket_view`` False, the Trainer's default, and True), lowmem's
AdamW, two steps of 2 x 32 tokens tracked by MemoryCallback's hooks as the Trainer calls them; one process without DDP
beside them. Before: the buckets' 333,568 B were in the measured activations (996,104 B for 669,704 without DDP) and
nowhere in the estimate (total 0.837 of the measured peak)."""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

import pytest
import torch

from lowmem.kit import build_tiny_model

pytestmark = pytest.mark.distributed

BATCH, SEQ = 2, 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tracked_steps(rank: int, world: int, port: int, view: bool, out: str) -> None:
    """Two steps under MemoryCallback (its hooks in the Trainer's order); rank 0 writes ``callback.peak``. Under DDP a
    communication hook is registered inside the first tracked step, as layerwise mode's ``attach_ddp`` does at its first
    training step (``register_comm_hook`` hands ``ddp.reducer`` to C++: the tracker's stand-in for it lives only
    inside DDP's ``_pre_forward``)."""
    import torch.distributed as dist

    from lowmem import create_optimizer
    from lowmem.kit import build_tiny_model
    from lowmem.trainers.memory_callback import MemoryCallback

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, _ = build_tiny_model(0)
        wrapped = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=view) if world > 1 else model
        opt = create_optimizer(model, "adamw", lr=1e-3)
        gen = torch.Generator().manual_seed(rank)
        cb = MemoryCallback(track_steps=2)
        for step in range(2):
            state = SimpleNamespace(global_step=step)
            ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=gen)
            cb.on_step_begin(None, state, None, model=model, optimizer=opt)
            if world > 1 and step == 0:  # (as layerwise mode's first training step: the reducer passed to C++)
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                wrapped.register_comm_hook(None, allreduce_hook)
            wrapped(input_ids=ids, labels=ids).loss.backward()
            cb.on_pre_optimizer_step(None, state, None, model=model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            cb.on_step_end(None, state, None, model=model, optimizer=opt)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(cb.peak, f)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _measure(tmp_path, world: int, view: bool = False) -> dict[str, int]:
    out = str(tmp_path / f"peak_{world}_{view}.json")
    if world == 1:
        _tracked_steps(0, 1, 0, view, out)
    else:
        # forked from this process (its imports done: a spawned process took ~30 s to import them on 2 busy cores)
        torch.multiprocessing.start_processes(_tracked_steps, args=(world, _free_port(), view, out), nprocs=world,
                                              start_method="fork")
    with open(out) as f:
        return json.load(f)


def _estimate(**kw):
    from lowmem.kit import build_tiny_model
    from lowmem.memory import estimate_memory

    return estimate_memory(build_tiny_model(0)[0].config, "adamw", batch_size=BATCH, seq_len=SEQ, dtype="fp32",
                           device="cpu", max_grad_norm=None, **kw)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    return _measure(tmp_path_factory.mktemp("one"), 1)


def test_ddp_buckets_are_their_own_component_measured_and_estimated(tmp_path, one):
    """gradient_as_bucket_view=False: the buckets measured 333,568 B (every trainable gradient's bytes, as the reducer
    reports), the activations those of one process; the estimate names the same bytes and its total is within 0.2% of
    the tracked peak (2,033,816 / 2,032,284 = 1.0008: the batch's three int64 tensors where the test holds one)."""
    two = _measure(tmp_path, 2)
    est = _estimate(ddp=True)
    grads = sum(p.numel() * p.element_size() for p in build_tiny_model(0)[0].parameters())
    assert two["ddp_buckets"] == est.ddp_buckets == grads == 333_568
    assert "ddp_buckets" not in one
    assert two["activations"] == one["activations"], (two, one)  # before: + the buckets (996,104 vs 669,704)
    assert two["gradients"] == one["gradients"] and two["optimizer_states"] == one["optimizer_states"]
    assert two["peak"] == one["peak"] + grads
    assert 1.0 <= est.total / two["peak"] < 1.002, (est.total, two["peak"])
    assert _estimate().total == est.total - grads  # one process: no bucket


def test_ddp_gradient_as_bucket_view_keeps_the_gradients_with_the_activations(tmp_path, one):
    """gradient_as_bucket_view=True: no copy (no ddp_buckets), the gradients are the buckets' views, live through
    the next forward: the measured peak is the activations' peak with every gradient (2,004,124 B for 1,698,716 in
    one process); the estimate counts them so (2,005,656 B, 1.0008), not with the backward's early gradients only."""
    two = _measure(tmp_path, 2, view=True)
    est = _estimate(ddp=True, gradient_as_bucket_view=True)
    assert "ddp_buckets" not in two and est.ddp_buckets == 0
    assert two["peak"] > one["peak"]
    assert 1.0 <= est.total / two["peak"] < 1.002, (est.total, two["peak"])


def test_ddp_settings_are_checked():
    with pytest.raises(ValueError, match="gradient_as_bucket_view=True is DDP's setting: it needs ddp=True"):
        _estimate(gradient_as_bucket_view=True)
    with pytest.raises(ValueError, match="Invalid ddp=1: expected True or False"):
        _estimate(ddp=1)
    with pytest.raises(ValueError, match="gradient_as_bucket_view=True with layerwise=True is not estimated"):
        _estimate(ddp=True, gradient_as_bucket_view=True, layerwise=True)


def test_budget_cli_ddp_counts_the_buckets(tmp_path, capsys):
    """``lowmem budget --ddp`` (estimate only): the buckets (the gradients' bytes: in bf16 those of the precision the
    estimate assumes) in the JSON and the table; refused with ``--measure`` or ``--budget`` by name."""
    from lowmem.cli import main

    build_tiny_model(0)[0].config.save_pretrained(tmp_path)
    argv = ["budget", str(tmp_path), "--device", "cpu", "--batch-size", str(BATCH), "--seq-len", str(SEQ),
            "--optimizer", "adamw"]
    for dtype in ("fp32", "bf16"):
        assert main([*argv, "--dtype", dtype, "--ddp", "--json"]) == 0
        got = __import__("json").loads(capsys.readouterr().out)
        assert got["ddp_buckets"] == got["gradients"] == (333_568 if dtype == "fp32" else got["gradients"]) > 0, got
    assert main([*argv, "--dtype", "fp32", "--ddp"]) == 0
    assert "ddp_buckets" in capsys.readouterr().out
    assert main([*argv, "--dtype", "fp32"]) == 0
    assert "ddp_buckets" not in capsys.readouterr().out
    for extra in (["--measure"], ["--budget", "1GiB"]):
        assert main([*argv, "--ddp", *extra]) == 2
        assert "--ddp is estimate only" in capsys.readouterr().err
