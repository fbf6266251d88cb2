"""The drop-in classes (``lowmem.optim.AdamW``, ``GaLoreAdamW``, ``APOLLOAdamW``, ...) keep the
signature users know, written out by hand; their defaults must be the recipe's hyperparameter
specs (one source of truth), and every keyword they pass must be one the recipe knows."""

from __future__ import annotations

import inspect

import pytest
import torch

from lowmem.optim import optimizer_entries

CLASSES = [(e.name, e.factory) for e in optimizer_entries()
           if e.recipe is not None and inspect.isclass(e.factory)]


def test_there_are_migration_classes():
    assert len(CLASSES) >= 10


@pytest.mark.parametrize("name,cls", CLASSES, ids=[n for n, _ in CLASSES])
def test_signature_defaults_are_the_recipes_specs(name, cls):
    specs = cls.recipe.all_hparams()
    sig = inspect.signature(cls.__init__)
    checked = 0
    for pname, param in sig.parameters.items():
        if pname in specs and param.default is not inspect.Parameter.empty:
            assert param.default == specs[pname].default, (
                f"{cls.__name__}({pname}={param.default!r}) but the recipe '{name}' says {specs[pname].default!r}")
            checked += 1
    written = [n for n, q in sig.parameters.items() if n not in ('self', 'params', 'recipe') and q.kind != q.VAR_KEYWORD]
    assert checked or not written, f"{cls.__name__}: {written} are not hyperparameters of '{name}'"


@pytest.mark.parametrize("name,cls", CLASSES, ids=[n for n, _ in CLASSES])
def test_defaults_build_the_recipes_defaults(name, cls):
    """Constructed with its defaults, the class's group equals ``create_optimizer``'s defaults."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = cls([p])
    specs = cls.recipe.all_hparams()
    for key, value in opt.param_groups[0].items():
        if key in specs and key not in ("params",):
            assert value == specs[key].default or key in _ADAPTED.get(name, ()), (
                f"{cls.__name__}: group[{key!r}] = {value!r}, recipe default {specs[key].default!r}")


# classes whose constructor deliberately differs from the recipe default, with the reason
_ADAPTED: dict[str, tuple[str, ...]] = {}
