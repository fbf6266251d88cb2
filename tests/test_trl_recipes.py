"""configs/{dpo,grpo,gvpo,bnpo}.yaml run through lowmem.train (what `lowmem train` does) and show
the reward (or the DPO margin) rising in metrics.json, with a lowmem optimizer."""

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from lowmem.train import load_recipe, run

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["dpo", "grpo", "gvpo", "bnpo"])
def test_recipe_runs_and_improves(name, tmp_path):
    recipe = load_recipe(CONFIGS / f"{name}.yaml", output_dir=str(tmp_path), save_model=False)
    assert recipe.trainer == name and recipe.optim == "adafactor"
    out = io.StringIO()
    run(recipe, console=Console(file=out, width=200))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["trainer"] == name and metrics["steps"] == recipe.steps
    assert metrics["optimizer_state_bytes"] < metrics["adamw_state_bytes"] / 10
    if name == "dpo":
        assert metrics["final_margin"] > metrics["initial_margin"] + 0.1
        assert "margin" in out.getvalue()
    else:
        assert metrics["final_reward"] > metrics["initial_reward"] + 0.15
        assert len(metrics["reward_history"]) == recipe.steps
        assert "mean reward" in out.getvalue()
