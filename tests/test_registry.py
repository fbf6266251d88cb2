"""The registry's public surface: names and entries, the local weight-decay rule, pricing metadata."""

from __future__ import annotations

import lowmem
from lowmem.optim import OptimizerEntry, get_entry, list_optimizers, optimizer_entries


def test_list_optimizers_returns_sorted_names_and_entries_come_separately():
    names = lowmem.list_optimizers()
    assert names == list_optimizers() and names == sorted(names) and len(names) == len(set(names))
    assert all(type(n) is str for n in names) and {"adamw", "adafactor", "galore_adamw"} <= set(names)
    entries = optimizer_entries()
    assert all(isinstance(e, OptimizerEntry) for e in entries)
    assert [e.name for e in entries] == names
    assert all(get_entry(n) is e for n, e in zip(names, entries))
    for n in names:  # every listed name builds (README: "any name from lowmem.list_optimizers()")
        assert get_entry(n).name == n
