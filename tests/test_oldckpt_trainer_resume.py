"""An FSDP2 Trainer checkpoint (SHARDED_STATE_DICT: torch.distributed.checkpoint) of per-shard state (adamw8bit's
codes and scales, MicroAdam's window) written before lowmem recorded its placements (no ``shard_placement`` entries:
docs/distributed.md, "Re-sharded parameters") resumes with no user action: DCP refuses it ("Missing key in
checkpoint state_dict: optimizer.state.<fqn>.shard_placement"), and ``LowMemTrainer._load_optimizer_and_scheduler``
loads it again from a target without the records; ``load_state_dict`` loads it unchecked with one warning per process,
and the run goes on exactly as the run that never stopped. Two CPU processes through ``accelerate launch``
(tests/oldckpt_trainer_script.py; accelerate's FSDP branch applied to CPU processes as in tests/test_trainer_fsdp.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from test_trainer_fsdp import accelerate_launch, sharded_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # (one launch of 2 processes, 2 runs of 2 x 4 steps each)

TAGS = ["adamw8bit", "microadam"]


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("oldckpt")
    accelerate_launch(sharded_config(out), "oldckpt_trainer_script.py", str(out), *TAGS)
    return out


@pytest.mark.parametrize("tag", TAGS)
def test_an_older_sharded_trainer_checkpoint_resumes_warned_and_exact(old_run, tag):
    final = torch.load(old_run / f"{tag}_final.pt", weights_only=True)
    for rank in range(2):
        got = json.loads((old_run / f"{tag}_rank{rank}.json").read_text())
        assert got["fsdp"] == "StateDictType.SHARDED_STATE_DICT", got["fsdp"]
        # the checkpoint is of the old format (no record), where lowmem now writes one per parameter with codes
        assert got["records_saved"] == [] and got["records_now"] > 0, (rank, got)
        assert "error" not in got, (rank, got.get("error"))
        assert len(got["warned"]) == 1, (rank, got["warned"])
        said = got["warned"][0]
        assert f"of {got['records_now']} sharded parameter(s) was loaded from a checkpoint that does not record" in said
        assert "loaded unchecked" in said and "Save a new checkpoint to have it checked" in said, said
        assert got["resumed_losses"] == got["losses"], (rank, got)
    resumed = torch.load(old_run / f"{tag}_resumed.pt", weights_only=True)
    for n, v in final.items():
        assert torch.equal(resumed[n], v), (tag, n)
