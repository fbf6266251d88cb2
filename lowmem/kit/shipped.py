"""Files lowmem ships besides code: the recipes of ``configs/``.

In the repository they live in ``configs/`` at the top level; a built wheel carries them as
``lowmem/configs/*.yaml`` (``pyproject.toml`` maps the package ``lowmem.configs`` to ``configs/``).
:func:`configs_dir` finds them in either layout, so ``lowmem train`` without a recipe runs
``default.yaml`` from a checkout, an editable install and a regular install alike.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # .../lowmem


def configs_dir() -> Path:
    """The folder of the shipped recipes: ``lowmem/configs`` of an installed wheel, else the checkout's
    ``configs/``. Raises ``FileNotFoundError`` naming both places when neither exists."""
    for candidate in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if (candidate / "default.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"lowmem's recipes are in neither {_PACKAGE / 'configs'} nor {_PACKAGE.parent / 'configs'}")


def shipped_recipe(name: str) -> Path:
    """Path of a shipped recipe by name (``"default"``, ``"qlora"``, ...); unknown names are a ValueError
    listing the shipped ones."""
    d = configs_dir()
    path = d / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no shipped recipe {name!r}; shipped: {', '.join(sorted(p.stem for p in d.glob('*.yaml')))}")
    return path


def _default_recipe() -> Path:
    try:
        return configs_dir() / "default.yaml"
    except FileNotFoundError:  # a source tree without configs/: lowmem.train reports the missing file
        return _PACKAGE.parent / "configs" / "default.yaml"


#: ``default.yaml`` of the shipped recipes (what ``lowmem train`` runs without a recipe).
DEFAULT_RECIPE = _default_recipe()
