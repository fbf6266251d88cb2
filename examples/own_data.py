"""Fine-tune on your own data files: the SFT, DPO and GRPO recipes on local JSONL of configs/*_jsonl.yaml,
from Python (the same as ``lowmem train configs/sft_jsonl.yaml`` and so on, run from the repository root).

    python examples/own_data.py

The files live in examples/data/: conversational SFT rows (``messages``), DPO pairs
(``prompt``/``chosen``/``rejected``) and GRPO prompts with an ``answer`` column, plus a chat template
for the embedded tiny model and a reward function in a file. Swap in your own model directory
(``model=``) and files (``dataset=``); see docs/training.md, "Training on your own data".
"""

import os
from pathlib import Path

from lowmem.train import load_recipe, run

ROOT = Path(__file__).resolve().parent.parent
OUT = Path.cwd() / "outputs"
os.chdir(ROOT)  # the recipes' data, template and reward paths are relative to the repository root

sft = run(load_recipe("configs/sft_jsonl.yaml", steps=40, output_dir=str(OUT / "sft-jsonl"), save_model=False))
assert sft["final_loss"] < sft["initial_loss"] - 1.0, sft  # held-out chat rows (eval_dataset)

dpo = run(load_recipe("configs/dpo_jsonl.yaml", steps=20, output_dir=str(OUT / "dpo-jsonl"), save_model=False))
assert dpo["final_margin"] > dpo["initial_margin"], dpo  # chosen-minus-rejected log-prob margin

grpo = run(load_recipe("configs/grpo_jsonl.yaml", steps=30, output_dir=str(OUT / "grpo-jsonl"), save_model=False))
assert grpo["final_reward"] > grpo["initial_reward"] + 0.1, grpo  # weighted file reward + exact_match
