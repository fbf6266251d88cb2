"""Fine-tune on your own data files: the SFT, DPO and GRPO recipes on local JSONL of configs/*_jsonl.yaml,
from Python (the same as ``lowmem train configs/sft_jsonl.yaml`` and so on, from any directory).

    python examples/own_data.py

The files live in configs/data/ (lowmem/configs/data in an installed wheel): conversational SFT rows
(``messages``), DPO pairs (``prompt``/``chosen``/``rejected``) and GRPO prompts with an ``answer``
column, plus a chat template for the embedded tiny model and a reward function in a file. Swap in your own model directory
(``model=``) and files (``dataset=``); see docs/training.md, "Training on your own data".
"""

from pathlib import Path

from lowmem.kit.shipped import shipped_recipe  # configs/ of the checkout, or lowmem/configs of a wheel
from lowmem.train import load_recipe, run

OUT = Path.cwd() / "outputs"  # the recipes' data, template and reward paths are relative to the recipe files

sft = run(load_recipe(shipped_recipe("sft_jsonl"), steps=40, output_dir=str(OUT / "sft-jsonl"), save_model=False))
assert sft["final_loss"] < sft["initial_loss"] - 1.0, sft  # held-out chat rows (eval_dataset)

dpo = run(load_recipe(shipped_recipe("dpo_jsonl"), steps=20, output_dir=str(OUT / "dpo-jsonl"), save_model=False))
assert dpo["final_margin"] > dpo["initial_margin"], dpo  # chosen-minus-rejected log-prob margin

grpo = run(load_recipe(shipped_recipe("grpo_jsonl"), steps=30, output_dir=str(OUT / "grpo-jsonl"), save_model=False))
assert grpo["final_reward"] > grpo["initial_reward"] + 0.1, grpo  # weighted file reward + exact_match
