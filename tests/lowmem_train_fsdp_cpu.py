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
    from accelerate_fsdp_cpu import exit_without_finalizing, fsdp_on_cpu_processes

    fsdp_on_cpu_processes()
    import lowmem.train

    lowmem.train._refuse_fsdp_on_cpu = lambda training_args: None
    from lowmem.cli import main

    try:
        code = main(sys.argv[1:])
    except SystemExit as stop:  # (lowmem: error: ... and argparse's exits)
        if not isinstance(stop.code, (int, type(None))):
            raise
        code = stop.code
    # no interpreter finalization: a gloo worker thread could abort it (accelerate_fsdp_cpu.exit_without_finalizing)
    exit_without_finalizing(code or 0)
