"""The budget search's words for what a second moment gives up come from the registry entry
(``OptimizerEntry.second_moment_words``), not from a table keyed by name: an entry registered with words is named by
them, one without by its form's words; words that could name nothing are refused at registration."""

from __future__ import annotations

import dataclasses

import pytest

from lowmem.memory.search import _optimizer_cost
from lowmem.optim import get_entry
from lowmem.optim.registry import _REGISTRY, register


class _Opt:  # (never built: registration only)
    def __init__(self, params, **kw):
        raise AssertionError


@pytest.mark.parametrize("form, base", [("factored", "adafactor"), ("blockwise", "adam_mini"), ("none", "lomo")])
def test_the_entrys_words_name_what_it_gives_up(form, base):
    entry = get_entry(base)
    assert entry.second_moment == form and entry.second_moment_words is None
    plain_cost, plain = _optimizer_cost(base, entry, None, 64)
    assert plain[-1] == ("no second moment" if form == "none" else f"{form} second moment")
    worded = dataclasses.replace(entry, second_moment_words="row/column sums, not per element")
    cost, gives = _optimizer_cost(base, worded, None, 64)
    assert gives[-1] == "row/column sums, not per element" and gives[:-1] == plain[:-1]
    assert cost == plain_cost  # priced from the form alone


@pytest.mark.parametrize("name", ["racs", "sm3"])
def test_racs_and_sm3_say_which_statistics_they_keep(name):
    _, gives = _optimizer_cost(name, get_entry(name), None, 64)
    assert "row/column" in gives[-1] and gives[-1] == get_entry(name).second_moment_words


@pytest.mark.parametrize("moment, words", [("full", "per element"), (None, "per element"), ("factored", ""),
                                           ("factored", "  "), ("factored", 3)])
def test_words_that_name_nothing_are_refused(moment, words):
    with pytest.raises(ValueError, match=r"second_moment_words=.*needs a non-empty string and second_moment one of"):
        register("smalls17_probe", _Opt, state_precision="fp32", second_moment=moment, second_moment_words=words)
    assert "smalls17_probe" not in _REGISTRY


def test_registered_words_reach_the_entry():
    try:
        entry = register("smalls17_probe", _Opt, state_precision="fp32", second_moment="factored",
                         second_moment_words="row sums only")
        assert get_entry("smalls17_probe").second_moment_words == "row sums only"
        assert _optimizer_cost("smalls17_probe", entry, None, 64)[1] == ["row sums only"]
    finally:
        _REGISTRY.pop("smalls17_probe", None)
