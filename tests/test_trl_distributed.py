"""GVPO and BNPO with two processes (gloo on CPU, what ``accelerate launch`` sets up).

Rewards are gathered over processes before the group statistics; each process must then train on
its own slice of whole groups. Checked on every step of a 2-step run: both processes see the same
gathered rewards, BNPO's advantages on a process are its slice of :func:`bnpo_advantages` over the
whole batch, GVPO's rewards and group ids are its slice, and the weights stay identical.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lowmem.trainers import bnpo_advantages

pytestmark = pytest.mark.distributed
WORLD = 2
GROUP = 4  # num_generations in trl_helpers.make_trainer; 8 completions (2 groups) per process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, model_path: str, out_dir: str, kinds: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    for kind in kinds:  # one spawn for every kind (each process's imports are most of the time)
        _train_one(rank, model_path, out_dir, kind)
    from lowmem.dist_exit import exit_process

    exit_process(0, distributed=True)  # no finalization: a gloo thread could abort it (lowmem/dist_exit.py)


def _train_one(rank: int, model_path: str, out_dir: str, kind: str) -> None:
    from trl_helpers import make_trainer

    trainer = make_trainer(kind, model_path, os.path.join(out_dir, f"{kind}-{rank}"), 2, use_cpu=True)
    records, seen = [], {}
    calculate_rewards, generate_and_score = trainer._calculate_rewards, trainer._generate_and_score_completions

    def spy_rewards(*args, **kwargs):
        seen["rewards"] = calculate_rewards(*args, **kwargs)  # gathered over processes
        return seen["rewards"]

    def spy_batch(inputs):
        out = generate_and_score(inputs)
        records.append({"rewards": seen["rewards"].detach().clone(), "n": len(inputs),
                        **{k: out[k].detach().clone() for k in ("advantages", "gvpo_rewards", "gvpo_group_ids") if k in out}})
        return out

    trainer._calculate_rewards, trainer._generate_and_score_completions = spy_rewards, spy_batch
    trainer.train()
    assert trainer.accelerator.num_processes == WORLD and trainer.accelerator.process_index == rank
    torch.save({"records": records, "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}},
               os.path.join(out_dir, f"{kind}-{rank}.pt"))


KINDS = ["bnpo", "gvpo"]


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    """Both kinds trained one after the other by the same two processes: the folder of their records."""
    out = tmp_path_factory.mktemp("trl_distributed")
    mp.spawn(_worker, args=(_free_port(), tiny_model_path, str(out), KINDS), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_train_on_their_slice_of_whole_groups(kind, trained):
    runs = [torch.load(trained / f"{kind}-{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for key, value in runs[0]["weights"].items():
        assert torch.equal(value, runs[1]["weights"][key]), key
    assert len(runs[0]["records"]) == len(runs[1]["records"]) == 2
    for step in range(2):
        gathered = runs[0]["records"][step]["rewards"]
        assert gathered.shape[0] == WORLD * runs[0]["records"][step]["n"]
        for rank, run in enumerate(runs):
            rec = run["records"][step]
            torch.testing.assert_close(rec["rewards"], gathered, equal_nan=True)
            local = slice(rank * rec["n"], (rank + 1) * rec["n"])
            if kind == "bnpo":
                expected = bnpo_advantages(gathered, GROUP)[local].to(rec["advantages"].dtype)
                torch.testing.assert_close(rec["advantages"], expected)
            else:
                torch.testing.assert_close(rec["gvpo_rewards"], gathered.nansum(dim=1)[local])
                assert rec["gvpo_group_ids"].tolist() == [i // GROUP for i in range(local.start, local.stop)]
