"""What each process runs under ``accelerate launch`` (the shipped FSDP2 configuration with SHARDED_STATE_DICT) in
tests/test_oldckpt_trainer_resume.py, for each run tag given (tests/trainer_fsdp_script.py's RUNS: the tiny Llama,
``LowMemTrainer``, FSDP2 over gloo on CPU processes):

1. 4 steps with checkpoints at steps 2 and 4 written as before lowmem recorded per-shard state's placements:
   ``LowMemOptimizer.state_dict`` without its ``shard_placement`` entries (patched for this run only), so the
   Trainer's ``torch.distributed.checkpoint`` directories lack them; what this run's checkpoint-2 holds;
2. a model with other weights resumed from that ``checkpoint-2`` (``resume_from_checkpoint``: accelerate's
   ``load_fsdp_optimizer`` through DCP) to step 4, the warnings it gave recorded.

Rank 0 writes ``OUT/<tag>.json`` and ``OUT/<tag>_final.pt`` / ``<tag>_resumed.pt``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch


def old_format_state_dict():
    """``LowMemOptimizer.state_dict`` of a lowmem before the placement record: the same, without ``shard_placement``."""
    from lowmem.optim import LowMemOptimizer
    from lowmem.optim.sharded import PLACEMENT_KEY

    original = LowMemOptimizer.state_dict

    def state_dict(self):
        sd = original(self)
        return {**sd, "state": {k: {e: v for e, v in s.items() if e != PLACEMENT_KEY} for k, s in sd["state"].items()}}

    return original, state_dict


def saved_keys(checkpoint: Path) -> list[str]:
    import torch.distributed.checkpoint as dcp

    return sorted(dcp.FileSystemReader(str(checkpoint / "optimizer_0")).read_metadata().state_dict_metadata)


def run(out: Path, tag: str, rank: int) -> None:
    from trainer_fsdp_script import full_weights, losses, make_trainer, per_device, save_steps

    from lowmem.optim import LowMemOptimizer
    from lowmem.optim.sharded import PLACEMENT_KEY

    result: dict = {}
    original, old = old_format_state_dict()
    LowMemOptimizer.state_dict = old
    try:
        trainer = make_trainer(out / tag, tag, per_device(tag))
        trainer.train()
    finally:
        LowMemOptimizer.state_dict = original
    result["losses"] = losses(trainer)
    result["fsdp"] = trainer.is_fsdp_enabled and str(trainer.accelerator.state.fsdp_plugin.state_dict_type)
    checkpoint = out / tag / f"checkpoint-{save_steps(tag)}"
    keys = saved_keys(checkpoint)
    result["records_saved"] = [k for k in keys if k.endswith(PLACEMENT_KEY)]
    result["records_now"] = sum(PLACEMENT_KEY in s for s in trainer.optimizer.optimizer.state_dict()["state"].values())
    weights = full_weights(trainer.model)
    if rank == 0:
        torch.save(weights, out / f"{tag}_final.pt")

    resumed = make_trainer(out / f"{tag}_resumed", tag, per_device(tag), seed=1)  # other weights: the checkpoint sets them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            resumed.train(resume_from_checkpoint=str(checkpoint))
        except BaseException as err:  # noqa: BLE001 - recorded for the test (DCP's CheckpointException is one)
            result["error"] = f"{type(err).__name__}: {err}"[:3000]
    result["warned"] = [str(c.message) for c in caught if PLACEMENT_KEY in str(c.message)]
    if "error" not in result:
        result["resumed_losses"] = losses(resumed)
        weights = full_weights(resumed.model)
        if rank == 0:
            torch.save(weights, out / f"{tag}_resumed.pt")
    (out / f"{tag}_rank{rank}.json").write_text(json.dumps(result))


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from accelerate_fsdp_cpu import exit_without_finalizing, fsdp_on_cpu_processes

    fsdp_on_cpu_processes()
    torch.set_num_threads(1)
    out, tags = Path(argv[0]), argv[1:]
    rank = int(os.environ["RANK"])
    for tag in tags:
        run(out, tag, rank)
    exit_without_finalizing(0)


if __name__ == "__main__":
    main(sys.argv[1:])
