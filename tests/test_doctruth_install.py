"""README's install and test commands are .ci/run's, and constraints.txt pins what they install.

A reviewer's clean install runs README's commands; CI runs the block after ``<!-- test-command -->`` verbatim
(extracted by .ci/run's own awk). These tests keep the two, pyproject's ranges and constraints.txt consistent.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI_INSTALL = 'pip install -c constraints.txt -e ".[dev]"'

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_ci_extracts_readmes_test_command():
    """.ci/run's own awk line, run on README, gives the documented command (the one CI runs)."""
    awk = re.search(r"cmd=\$\((awk .*? README\.md)\)", (ROOT / ".ci" / "run").read_text()).group(1)
    cmd = subprocess.run(["bash", "-c", awk], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert cmd == f'python3 -m venv .venv && . .venv/bin/activate && {CI_INSTALL} && python -m pytest -n 2'


def test_setup_command_installs_as_ci_does():
    """README's first command installs with the same constraints, without the test extra, then runs the demo."""
    block = re.search(r"## Install.*?```bash\n(.*?)\n```", README, re.DOTALL).group(1)
    assert block == "python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e . && lowmem train"
    assert CI_INSTALL in (ROOT / "constraints.txt").read_text()  # the file's own header says the same


def test_constraints_satisfy_pyproject():
    """Every requirement of pyproject (base, dev and plot extras) is pinned in constraints.txt, inside its range."""
    pins = _pins()
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    for text in reqs:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{text} excludes the pinned {pins[name]}"


def test_readme_names_the_pinned_versions():
    """README: "constraints.txt pins the versions we test (torch 2.13.0, transformers 5.23.0, ...)" and
    "pyproject.toml allows only trl 1.16.x"."""
    pins = _pins()
    sentence = re.search(r"`constraints\.txt` pins the versions we test \((.*?)\)", README, re.DOTALL).group(1)
    named = dict(re.findall(r"([\w-]+) (\d+\.\d+\.\d+)", sentence))
    assert len(named) == 7
    for name, version in named.items():
        assert pins[canonicalize_name(name)] == version, name
    trl = next(Requirement(r) for r in _pyproject()["project"]["dependencies"] if r.startswith("trl"))
    assert "allows only `trl` 1.16.x" in README
    assert trl.specifier.contains("1.16.9") and not trl.specifier.contains("1.17.0")
    assert not trl.specifier.contains("1.15.9")


def test_every_installed_requirement_is_pinned():
    """The whole requirement tree of lowmem[dev,plot] as installed here is pinned (a package left out could float
    to a version no one tested). torch's own requirements are skipped: they depend on its build (a CUDA
    wheel adds nvidia-* and triton), which README leaves to the user."""
    pins = _pins()
    seen: set[str] = set()
    unpinned, off = [], []

    def walk(name: str, extras: tuple[str, ...] = ()) -> None:
        key = canonicalize_name(name)
        if key in seen:
            return
        seen.add(key)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            return  # an optional requirement not installed
        if key != "lowmem":
            if key not in pins:
                unpinned.append(f"{name} {dist.version}")
            elif dist.version.split("+")[0] != pins[key]:
                off.append(f"{name} {dist.version} (pinned {pins[key]})")
        if key == "torch":
            return
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                walk(req.name, tuple(req.extras))

    walk("lowmem", ("dev", "plot"))
    assert {"torch", "transformers", "trl", "galore-torch", "matplotlib"} <= seen
    assert not unpinned, f"installed but not in constraints.txt: {unpinned}"
    assert not off, f"installed versions differ from constraints.txt: {off}"
