"""Helpers for parametrizing the suite within CI's time (README: the default suite stays under 15 minutes on 2
cores)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest


def slow_beyond(names: Iterable[str], default: Iterable[str]) -> list:
    """``names`` as parameters, those outside ``default`` marked ``slow`` (they run with ``LOWMEM_SLOW=1`` or
    ``-m slow``). Every name in ``default`` must be among ``names``: a renamed entry fails here, it does not
    silently drop out of the default suite."""
    names, default = list(names), set(default)
    missing = default - set(names)
    if missing:
        raise ValueError(f"slow_beyond: {sorted(missing)} not among the parameters {names}")
    return [n if n in default else pytest.param(n, marks=pytest.mark.slow) for n in names]
