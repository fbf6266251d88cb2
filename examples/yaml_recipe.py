"""``lowmem train configs/adafactor.yaml`` from Python: load a YAML recipe, override fields, run.

    python examples/yaml_recipe.py
"""

from pathlib import Path

from lowmem.train import load_recipe, run

recipe = load_recipe(
    Path(__file__).resolve().parent.parent / "configs" / "adafactor.yaml",
    steps=150, output_dir="outputs/example-yaml",  # the same overrides as the CLI flags
)
metrics = run(recipe)  # prints losses and memory, writes outputs/example-yaml/metrics.json
assert metrics["final_loss"] < metrics["initial_loss"]
