"""Every recipe in configs/ runs end to end as README shows it, `lowmem train RECIPE.yaml`, and its comments
name only keys that exist. Parametrized over the folder: a new YAML is covered without editing this file.

The recipes run in this process through the CLI's `main` (the same argument parsing, recipe loading and
relative-path rebasing as the `lowmem` command), 1 optimizer step each, from a foreign working directory
(a recipe's relative paths are from its own folder, README "Your own data").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from lowmem.cli import main
from lowmem.train import RECIPE_KEYS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
# dpo/grpo/gvpo/bnpo.yaml already train in full in the default suite (tests/test_trl_recipes.py): their 1-step
# run here (2-3 s each on the loaded 2-core machine) is slow; every other recipe, a new one included, runs by default
RUN_ELSEWHERE = {"dpo.yaml", "grpo.yaml", "gvpo.yaml", "bnpo.yaml"}
RUNS = [pytest.param(p, marks=pytest.mark.slow) if p.name in RUN_ELSEWHERE else p for p in RECIPES]


def test_the_folder_holds_the_recipes_readme_lists():
    """README's "Recipes in `configs/`" sentence names every shipped recipe, and only those."""
    readme = (CONFIGS.parent / "README.md").read_text()
    sentence = re.search(r"Recipes in `configs/`:(.*?)\n\n", readme, re.DOTALL).group(1)
    named = set(re.findall(r"`(\w+)`", sentence))
    assert named == {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.name)
def test_recipe_trains_through_lowmem_train(path, tmp_path, monkeypatch):
    want = yaml.safe_load(path.read_text())
    monkeypatch.chdir(tmp_path)  # not the repository: relative paths must resolve from the recipe's folder
    rc = main(["train", str(path), "--steps", "1", "--output-dir", str(tmp_path / "out"), "--save_model", "false"])
    assert rc == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["steps"] == 1
    assert m["trainer"] == want.get("trainer", "sft") and m["optimizer"] == want["optim"]
    assert m["quantization"] == want.get("quantization")
    assert 0 < m["optimizer_state_bytes"] <= m["adamw_state_bytes"]
    assert not (tmp_path / "out" / "model.safetensors").exists()  # --save_model false, a recipe key as a flag
    # the recipe's optimizer settings are the ones in effect (lr: null = the demo's 1e-2, default.yaml's comment)
    groups = m["effective_hparams"]
    assert {g["lr"] for g in groups} == {want["lr"] if want.get("lr") is not None else 1e-2}
    for key, value in (want.get("optim_args") or {}).items():  # (a subspace recipe's settings: its targeted groups)
        having = [g for g in groups if key in g]
        assert having and all(g[key] == value for g in having), (key, value, groups)
    if "weight_decay" in want:
        assert max(g["weight_decay"] for g in groups) == want["weight_decay"]
    if want["optim"] == "adafactor":  # adafactor.yaml: "relative_step=False, scale_parameter=False and the recipe's lr"
        assert all(not g["relative_step"] and not g["scale_parameter"] for g in groups)


def _comment_keys(text: str) -> set[str]:
    """The settings a comment offers: a commented-out line (``# task: addition``), ``or eval_split: 0.1``,
    ``set trainer: gvpo``, ``(dataset: PATH ...)``; not prose (``per step: ...``)."""
    keys = set()
    for line in text.splitlines():
        if "#" not in line:
            continue
        comment = line.split("#", 1)[1]
        keys |= set(re.findall(r"(?:^\s*|\bor |\bset |\()([a-z][a-z0-9_]*): ", comment))
    return keys - {"none"}  # grpo_jsonl.yaml: "equal reward_weights or none: it averages ..." is prose


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_comments_name_real_keys(path):
    """A key a comment offers (``# task: addition``, ``# or eval_split: 0.1``) is a recipe key; the SFTConfig
    fields a comment names (``packing``, ``completion_only_loss``) are SFTConfig's."""
    from trl import SFTConfig

    text = path.read_text()
    for key in _comment_keys(text):
        assert key in RECIPE_KEYS, f"{path.name}: the comment names {key!r}, not a recipe key"
    for field in re.findall(r"any SFTConfig field: ([\w, ]+)", text):
        for name in (f.strip() for f in field.split(",") if f.strip()):
            assert name in SFTConfig.__dataclass_fields__, f"{path.name}: {name!r} is not an SFTConfig field"
    # a commented-out setting (a whole comment line `# key: value  # why`) is one the recipe accepts when uncommented
    from lowmem.train import load_recipe

    for line in text.splitlines():
        setting = re.match(r"\s*#\s*([a-z][a-z0-9_]*): (.+?)(?:\s{2,}#.*)?$", line)
        if setting and setting.group(1) in RECIPE_KEYS:
            value = yaml.safe_load(setting.group(2))
            assert getattr(load_recipe(path, **{setting.group(1): value}), setting.group(1)) == value, line
    # default.yaml's inline claims: the embedded model (model null), the recipe `lowmem train` runs without one
    if path.name == "default.yaml":
        import lowmem.train

        assert lowmem.train.DEFAULT_RECIPE == path and lowmem.train.DEMO_LR == 1e-2
