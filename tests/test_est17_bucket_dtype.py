"""EST17 (issue 12, residual c): the gradient dtype of a projected multi-tensor bucket's count. A group holding a
float64 parameter beside float32 ones (tests/test_muonfix_sweep.py's ``fp64-beside-fp32`` model, one group) keeps the
float64 one off the projected buckets (FOUND_FP64SWEEP 2-3), so a bucket's members all step in float32 (4 B per
gradient element). A count that read the gradient's width from the group's scan
(``moments.grad_element_bytes(group)`` without ``moments.counting_gradient``) would count the bucket's float32 members
at 8 B. Every recipe's step transient (test_muonfix_sweep's NAMES, the projected ones among them) is sized here with
every ``grad_element_bytes`` call recorded: each one made while a group holds a float64 parameter is told the counted
gradient's dtype, or reads a float64 state tensor; none scans (found 2026-12-01: the projected buckets' own counts,
``foreach_direction_bucket_transient_bytes`` / ``foreach_fold_bytes`` / ``foreach_post_update_bytes``, never read the
gradient's width; the told calls are the per-parameter and piece counts). The traced totals of that model are
test_muonfix_sweep's ``fp64-beside-fp32`` cases."""

import sys

import pytest
import torch
from test_muonfix_sweep import NAMES, _Tiny

import lowmem.optim.moments as M
from lowmem.optim.registry import create_optimizer, optimizer_entries

PROJECTED = ["adagrad_snsm", "adamw_snsm", "alice", "apollo_adamw", "apollo_mini", "fira_adamw", "fira_adamw8bit",
             "frugal", "frugal8bit", "galore_adafactor", "galore_adamw", "galore_adamw8bit", "osd_adamw", "sgd_sm"]


@pytest.fixture
def scans(monkeypatch):
    """Every call of ``grad_element_bytes`` that scans a group holding a float64 parameter (not told, no float64
    state tensor), with the function that made it."""
    seen = []
    real = M.grad_element_bytes

    def spy(group, stored=None):
        told = M._COUNTED_GRAD_DTYPE.get() is not None
        wide = stored is not None and stored.dtype == torch.float64
        if not told and not wide and any(getattr(p, "dtype", None) == torch.float64 for p in group.get("params", ())):
            seen.append(sys._getframe(1).f_code.co_qualname)
        return real(group, stored)

    for name, mod in list(sys.modules.items()):
        if name.startswith("lowmem.optim") and getattr(mod, "grad_element_bytes", None) is real:
            monkeypatch.setattr(mod, "grad_element_bytes", spy)
    return seen


@pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "per-parameter"])
def test_no_count_scans_the_group_for_the_gradient_dtype(scans, foreach):
    assert set(PROJECTED) <= set(NAMES)
    for name in NAMES:
        entry = next(e for e in optimizer_entries() if e.name == name)
        torch.manual_seed(0)
        model = _Tiny()
        model.l1.to(torch.float64)
        opt = create_optimizer(model, name, foreach=foreach, **entry.example_hparams)
        opt.chunk_numel = 600
        opt.materialize_state()
        opt.step_transient_bytes()
    assert scans == [], sorted(set(scans))
