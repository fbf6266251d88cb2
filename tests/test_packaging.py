"""Packaging: every subpackage ships, and `trainers/` is importable as `lowmem.trainers` from a built wheel
(the editable install is what the rest of the suite runs on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lowmem").rglob("__init__.py")}
    assert found | {"lowmem.trainers", "lowmem.configs"} == listed


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    """A wheel built from the checkout, unpacked: (its file names, the folder to put on PYTHONPATH)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp / "dist").glob("lowmem-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    site = tmp / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return names, site


def _run_in(site: Path, cwd: Path, code: str) -> str:
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "HF_HOME": str(cwd / ".hf")}  # datasets' cache of the test, not the user's
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


# What the tests below ask of the installed wheel, in ONE fresh process (its imports of torch, transformers and
# TRL are most of each check's time): a JSON object per line, {"check": [...]}.
_WHEEL_CHECKS = """
import contextlib, io, json
def emit(key, value):
    print(json.dumps({key: value}), flush=True)

import lowmem.trainers, lowmem.optim
emit("trainers_file", lowmem.trainers.__file__)

import lowmem.train as t
from lowmem.kit.shipped import shipped_recipe
r = t.load_recipe(None)
emit("recipes", [str(t.DEFAULT_RECIPE), str(shipped_recipe("qlora")), f"{r.optim} {r.steps}"])
from lowmem.cli import build_parser
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    build_parser().parse_args(["train", "--help"])
emit("train_help", out.getvalue())

from lowmem.train import load_recipe
from lowmem.data import recipe_data
rows = []
for name in ("sft_jsonl", "dpo_jsonl", "grpo_jsonl"):
    r = load_recipe(shipped_recipe(name)); d = recipe_data(r)
    rows.append([r.dataset, r.eval_dataset, r.chat_template, r.reward_funcs, len(d.train), d.format.name])
emit("data_recipes", rows)
"""


@pytest.fixture(scope="module")
def wheel_checks(wheel_site, tmp_path_factory):
    """_WHEEL_CHECKS's answers, run from a folder outside the checkout with only the wheel on PYTHONPATH."""
    out = _run_in(wheel_site[1], tmp_path_factory.mktemp("wheel_run"), _WHEEL_CHECKS)
    answers = {}
    for line in out.splitlines():
        if line.startswith("{"):
            answers.update(json.loads(line))
    return answers


def test_built_wheel_imports_lowmem_trainers(wheel_site, wheel_checks):
    names, site = wheel_site
    assert "lowmem/trainers/hf.py" in names and "lowmem/trainers/gvpo.py" in names
    assert Path(wheel_checks["trainers_file"]).is_relative_to(site)  # the wheel's copy, not the checkout


def test_built_wheel_ships_the_recipes(wheel_site, wheel_checks):
    """`lowmem train` without a recipe runs configs/default.yaml from a regular (non-editable) install too."""
    names, site = wheel_site
    shipped = {f"lowmem/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert "lowmem/configs/default.yaml" in shipped and shipped <= set(names)
    default, qlora, fields = wheel_checks["recipes"]
    assert Path(default) == site / "lowmem" / "configs" / "default.yaml"
    assert Path(qlora) == site / "lowmem" / "configs" / "qlora.yaml"
    import yaml

    want = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert fields == f"{want['optim']} {want['steps']}"  # the recipe's values, not TrainRecipe's defaults
    assert "default.yaml" in wheel_checks["train_help"]


def test_built_wheel_recipes_find_their_data(wheel_site, wheel_checks):
    """The *_jsonl recipes of an installed wheel name data shipped beside them (lowmem/configs/data), found
    from any directory: relative paths in a recipe are from the recipe's folder."""
    names, site = wheel_site
    shipped = {f"lowmem/configs/data/{p.name}" for p in (ROOT / "configs" / "data").iterdir()}
    assert "lowmem/configs/data/addition_chat.jsonl" in shipped and shipped <= set(names)
    data = site / "lowmem" / "configs" / "data"
    (sft, sft_eval, sft_tmpl, _, sft_rows, sft_fmt), dpo, grpo = wheel_checks["data_recipes"]
    assert (Path(sft), Path(sft_eval), Path(sft_tmpl)) == (data / "addition_chat.jsonl", data / "addition_chat_eval.jsonl",
                                                           data / "tiny_chat_template.jinja")
    assert sft_rows > 0 and sft_fmt == "messages" and Path(dpo[0]) == data / "addition_prefs.jsonl" and dpo[4] > 0
    assert Path(grpo[0]) == data / "addition_prompts.jsonl" and grpo[3][0] == f"{data / 'addition_reward.py'}:digits_and_prefix"
    assert grpo[3][1] == "exact_match" and grpo[4] > 0
    from lowmem.rewards import resolve_reward

    assert callable(resolve_reward(grpo[3][0]))  # the wheel's reward file imports


def test_import_lowmem_is_light_and_api_resolves_lazily():
    code = ("import sys, lowmem; assert 'torch' not in sys.modules, 'import lowmem pulled in torch'; "
            "assert callable(lowmem.create_optimizer) and callable(lowmem.estimate_memory); "
            "assert {'create_optimizer', 'list_optimizers', 'estimate_memory'} <= set(dir(lowmem))")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_bitsandbytes_hub_kernel_notice_is_dropped_and_nothing_else():
    """`import lowmem` drops bitsandbytes' notice about a Hub kernel it cannot download (lowmem never
    downloads), and only that record of its logger."""
    import logging

    import lowmem  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")

    def passes(msg: str) -> bool:
        record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, ("No module named 'kernels'",), None)
        return all(f.filter(record) for f in logger.filters)

    assert not passes("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...")
    assert passes("some other bitsandbytes warning: %s")
