"""FSDP2 (``fully_shard``) with a lowmem optimizer: two processes over gloo on the CPU.

    torchrun --nproc_per_node 2 examples/fsdp2.py        # or: python examples/fsdp2.py (launches torchrun)
    python examples/fsdp2.py galore_adamw                 # another optimizer (subspace ones at rank 8)

Every decoder layer of the kit's tiny Llama is sharded on dimension 0 over the processes; the
optimizer is built *after* ``fully_shard`` (which replaces the parameters by DTensors) and steps each
rank's shard. Each rank trains on its own half of every batch. Supported optimizers and what is per
shard: docs/distributed.md. The optimizer's state is checkpointed with torch.distributed.checkpoint.
"""

import os
import sys
import tempfile

import torch

if "LOCAL_RANK" not in os.environ:  # run as a plain script: launch ourselves with torchrun
    from torch.distributed.run import main as torchrun

    torchrun(["--standalone", "--nproc_per_node", "2", __file__, *sys.argv[1:]])
    sys.exit(0)

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import lowmem
from lowmem.dist_exit import exit_process
from lowmem.optim import get_entry
from lowmem.kit import load_model_and_tokenizer, sft_dataset, tokenize_sft

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))

torch.manual_seed(0)
model, tokenizer = load_model_and_tokenizer()
# the character vocabulary (73 rows) padded to 80: every shard of the embedding and head holds whole
# rows of an even split, which per-shard state (8-/4-bit codes, MicroAdam) needs to be checkpointed
# through torch.distributed.checkpoint (docs/distributed.md, "Checkpoints")
model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8 * world)
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
# any optimizer of docs/distributed.md's table, e.g. `python examples/fsdp2.py galore_adamw` (rank 8:
# the attention and MLP weights projected, bases from the gathered gradient)
name = sys.argv[1] if len(sys.argv) > 1 else "adamw8bit"
extra = {"rank": 8, "update_proj_gap": 10} if get_entry(name).subspace else {}
optimizer = lowmem.create_optimizer(model, name, lr=3e-3, **extra)  # after fully_shard

data = tokenize_sft(sft_dataset(512), tokenizer).with_format("torch")[:]
losses = []
for step in range(30):
    rows = slice(16 * step % 512, 16 * step % 512 + 16)
    mine = slice(rows.start + rank * 16 // world, rows.start + (rank + 1) * 16 // world)  # this rank's half
    loss = model(input_ids=data["input_ids"][mine], attention_mask=data["attention_mask"][mine],
                 labels=data["labels"][mine]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())

# a new folder for each run, chosen on rank 0 (a fixed /tmp path was overwritten by the next run, with torch's warning)
checkpoint = [tempfile.mkdtemp(prefix="lowmem_fsdp2_example_") if rank == 0 else None]
dist.broadcast_object_list(checkpoint, src=0)
checkpoint = checkpoint[0]
dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=checkpoint)
if rank == 0:
    print(f"loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f}; state of this rank's shards: "
          f"{optimizer.state_bytes():,} bytes; optimizer checkpoint in {checkpoint}")
first, last = losses[0], sum(losses[-5:]) / 5
assert last < first, "the loss should fall"
# destroy the group and end without interpreter finalization: a gloo worker thread still releasing its last tensors
# can otherwise abort a finished run ("terminate called without an active exception"; lowmem/dist_exit.py)
exit_process(0)
