"""``lowmem`` (the CLI) in a process whose accelerate runs FSDP on the CPU (test-only, see
tests/accelerate_fsdp_cpu.py). ``lowmem train`` refuses FSDP on CPU processes because accelerate
would run DDP there; with accelerate's FSDP branch applied to CPU processes that premise does not
hold, so the refusal is lifted here too, and everything else is ``lowmem train`` as shipped.

    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 tests/lowmem_train_fsdp_cpu.py train RECIPE.yaml
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from accelerate_fsdp_cpu import fsdp_on_cpu_processes

    fsdp_on_cpu_processes()
    import lowmem.train

    lowmem.train._refuse_fsdp_on_cpu = lambda training_args: None
    from lowmem.cli import main

    sys.exit(main(sys.argv[1:]))
