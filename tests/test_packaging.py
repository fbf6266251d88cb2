"""Packaging: every subpackage ships, and `trainers/` is importable as `lowmem.trainers` from a built wheel
(the editable install is what the rest of the suite runs on)."""

from __future__ import annotations

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
    assert found | {"lowmem.trainers"} == listed


def test_built_wheel_imports_lowmem_trainers(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("lowmem-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lowmem/trainers/hf.py" in names and "lowmem/trainers/gvpo.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import lowmem.trainers, lowmem.optim; print(lowmem.trainers.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"},
                         check=True, capture_output=True, text=True).stdout
    assert Path(out.strip()).is_relative_to(site)  # the wheel's copy, not the checkout


def test_import_lowmem_is_light_and_api_resolves_lazily():
    code = ("import sys, lowmem; assert 'torch' not in sys.modules, 'import lowmem pulled in torch'; "
            "assert callable(lowmem.create_optimizer) and callable(lowmem.estimate_memory); "
            "assert {'create_optimizer', 'list_optimizers', 'estimate_memory'} <= set(dir(lowmem))")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
