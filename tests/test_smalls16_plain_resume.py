"""A plain ``transformers.Trainer`` with a lowmem optimizer (``optimizer_cls_and_kwargs``: the one way to give it one
under FSDP, where ``optimizers=`` is refused) resuming an FSDP2 SHARDED_STATE_DICT checkpoint saved before lowmem
recorded per-shard state's placements (no ``shard_placement`` entries; docs/distributed.md, "Re-sharded parameters"):

* ``transformers.Trainer`` fails inside torch.distributed.checkpoint with "Missing key in checkpoint state_dict:
  optimizer.state.<fqn>.shard_placement." (transformers -> accelerate's ``load_fsdp_optimizer`` -> ``dcp.load``: no
  code of lowmem's runs between the target's ``state_dict()`` and that error, so lowmem cannot retry there; the
  message docs/training.md names, with the fix);
* ``lowmem.trainers.LowMemTrainer`` given the same plain ``TrainingArguments`` and ``optimizer_cls_and_kwargs`` (it is
  transformers' Trainer plus lowmem's resume checks; ``LowMemOptimizerMixin`` first in a user's own Trainer
  subclass is the same) resumes it with the retry, one warning per process, the run exact.

Two CPU processes through ``accelerate launch`` (this file is the script: ``python THIS OUT``), as
tests/test_oldckpt_trainer_resume.py."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # (one launch of 2 processes, 3 runs of at most 4 steps)

NAME, HP = "adamw8bit", {"block_size": 64, "min_quant_size": 128}  # (per-shard codes and scales: records)


def _trainer(kind: str, out: Path, seed: int):
    from transformers import Trainer, TrainingArguments, default_data_collator

    from lowmem.kit import build_tiny_model, sft_dataset, tokenize_sft
    from lowmem.trainers import LowMemTrainer, optimizer_cls_and_kwargs

    model, tok = build_tiny_model(seed, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):  # (even shards, as tests/trainer_fsdp_script.py)
        torch.manual_seed(seed)
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=8, mean_resizing=False)
    data = tokenize_sft(sft_dataset(64, seed=0), tok)
    args = TrainingArguments(str(out), learning_rate=1e-2, weight_decay=0.01, max_steps=4,
                             per_device_train_batch_size=8 // int(os.environ["WORLD_SIZE"]), logging_steps=1,
                             save_strategy="steps", save_steps=2, use_cpu=True, report_to="none", disable_tqdm=True,
                             dataloader_pin_memory=False, seed=0)
    cls = Trainer if kind == "plain" else LowMemTrainer
    return cls(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
               optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, NAME, args=args, **HP))


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _resume(kind: str, out: Path, checkpoint: Path, result: dict) -> None:
    from lowmem.optim.sharded import PLACEMENT_KEY

    trainer = _trainer(kind, out / kind, seed=1)  # other weights: the checkpoint sets them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint))
            result[f"{kind}_losses"] = _losses(trainer)
        except BaseException as err:  # noqa: BLE001 - recorded for the test (DCP's CheckpointException is one)
            result[f"{kind}_error"] = f"{type(err).__name__}: {err}"[:3000]
    result[f"{kind}_warned"] = [str(c.message) for c in caught if PLACEMENT_KEY in str(c.message)]
    result[f"{kind}_fsdp"] = bool(trainer.is_fsdp_enabled)


def main(argv: list[str]) -> None:
    here = Path(__file__).parent
    sys.path.insert(0, str(here))
    from accelerate_fsdp_cpu import exit_without_finalizing, fsdp_on_cpu_processes
    from oldckpt_trainer_script import old_format_state_dict, saved_keys

    from lowmem.optim import LowMemOptimizer
    from lowmem.optim.sharded import PLACEMENT_KEY

    fsdp_on_cpu_processes()
    torch.set_num_threads(1)
    out, rank = Path(argv[0]), int(os.environ["RANK"])
    result: dict = {}
    original, old = old_format_state_dict()
    LowMemOptimizer.state_dict = old  # (checkpoints written as before the placement record, this run only)
    try:
        first = _trainer("plain", out / "first", seed=0)
        first.train()
    finally:
        LowMemOptimizer.state_dict = original
    result["losses"] = _losses(first)
    checkpoint = out / "first" / "checkpoint-2"
    result["records_saved"] = [k for k in saved_keys(checkpoint) if k.endswith(PLACEMENT_KEY)]
    result["records_now"] = sum(PLACEMENT_KEY in s for s in first.optimizer.optimizer.state_dict()["state"].values())
    for kind in ("plain", "lowmem"):
        _resume(kind, out, checkpoint, result)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    exit_without_finalizing(0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from test_trainer_fsdp import accelerate_launch, sharded_config

    out = tmp_path_factory.mktemp("plain_resume")
    accelerate_launch(sharded_config(out), Path(__file__).name, str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_plain_trainer_hits_dcps_missing_record_and_lowmem_trainer_resumes(runs):
    for rank, got in enumerate(runs):
        assert got["plain_fsdp"] and got["lowmem_fsdp"], rank
        assert got["records_saved"] == [] and got["records_now"] > 0, (rank, got)  # an old-format checkpoint
        # transformers.Trainer: DCP's refusal, the text docs/training.md names
        said = got.get("plain_error", "")
        assert said.startswith("CheckpointException") and "Missing key in checkpoint state_dict: optimizer.state." in said
        assert ".shard_placement" in said, said
        # LowMemTrainer with the same plain TrainingArguments and optimizer_cls_and_kwargs: resumed, warned, exact
        assert "lowmem_error" not in got, (rank, got.get("lowmem_error"))
        assert len(got["lowmem_warned"]) == 1 and "loaded unchecked" in got["lowmem_warned"][0], (rank, got)
        assert got["lowmem_losses"] == got["losses"], (rank, got)


if __name__ == "__main__":
    main(sys.argv[1:])
