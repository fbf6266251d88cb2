"""BAdam's checkpoints as ``torch.distributed.checkpoint`` handles them (what accelerate and the Trainer
save under FSDP2): ``get_optimizer_state_dict`` keeps only ``state`` and ``param_groups`` (the top-level
``"badam"`` schedule entry is dropped), ``set_optimizer_state_dict`` refuses a parameter that requires
gradients without a state entry, and a ``SHARDED_STATE_DICT`` load fills only the entries the new optimizer
asks for. One process, the state dicts shaped as DCP leaves them; the 2-process runs through the Trainer
are in tests/test_trainer_fsdp.py (``badam``)."""

from __future__ import annotations

import copy

import pytest
import torch

from lowmem.optim import create_optimizer
from test_badam import tiny_llama, train

HP = dict(lr=1e-2, switch_every=3, seed=5, switch_mode="ascending")


def _dcp_view(sd: dict) -> dict:
    """What DCP's get_optimizer_state_dict keeps of an optimizer's state_dict()."""
    return {"state": sd["state"], "param_groups": sd["param_groups"]}


def test_schedule_survives_without_the_badam_entry_and_every_parameter_has_an_entry():
    """Saved 1 step into block 1 (4 steps, switch_every=3): the schedule travels in the parameter groups and
    the resumed run equals the uninterrupted one bit for bit; block 0's parameters (freed at the switch) still
    have (empty) entries. Before: 'the state dict has no 'badam' entry' at the Trainer's resume, and torch's
    'Missing optimizer state for parameter' for the freed block."""
    steps, first = 7, 4
    full = tiny_llama()
    resumed = copy.deepcopy(full)
    train(full, create_optimizer(full, "badam", **HP), steps)

    opt = create_optimizer(resumed, "badam", **HP)
    train(resumed, opt, first)
    sd = opt.state_dict()
    assert len(sd["state"]) == sum(len(g["params"]) for g in sd["param_groups"])  # one entry per parameter
    assert {(g["badam_period"], g["badam_steps"]) for g in sd["param_groups"]} == {(1, 1)}
    fresh = tiny_llama(seed=7)
    fresh.load_state_dict(resumed.state_dict())
    opt2 = create_optimizer(fresh, "badam", **HP)
    opt2.load_state_dict(_dcp_view(sd))
    assert opt2.active_block == opt.active_block == 1
    assert all("badam_period" not in g for g in opt2.param_groups)  # (the live groups keep their own settings)
    train(fresh, opt2, steps - first, start=first)
    for (n, a), b in zip(full.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)


def test_a_block_in_progress_without_its_state_refuses():
    """A SHARDED_STATE_DICT load gives the new optimizer only the entries it asked for: when that lacks the
    active block's Adam state, the load refuses instead of restarting the block's moments silently."""
    model = tiny_llama()
    opt = create_optimizer(model, "badam", **HP)
    train(model, opt, 4)
    sd = _dcp_view(opt.state_dict())
    sd["state"] = {k: {} for k in sd["state"]}  # what DCP fills into a request without the block's entries
    with pytest.raises(ValueError, match=r"1 step\(s\) into block 1.*prepare_load\(1, 1\)"):
        create_optimizer(tiny_llama(), "badam", **HP).load_state_dict(sd)
    # right at a switch the new block has no state yet: that loads
    model = tiny_llama()
    opt = create_optimizer(model, "badam", **HP)
    train(model, opt, 3)
    sd = _dcp_view(opt.state_dict())
    sd["state"] = {k: {} for k in sd["state"]}
    opt2 = create_optimizer(tiny_llama(), "badam", **HP)
    opt2.load_state_dict(sd)
    assert opt2.active_block == 1


def test_the_request_of_a_new_optimizer_matches_the_checkpoint():
    """A DCP load fills the entries the new optimizer holds when it asks. At a switch (steps 0) state_dict()
    holds the new block's fresh state (self.state keeps none: it is allocated at the block's first step), and
    prepare_load(period, steps) (what LowMemTrainer calls under FSDP2) takes the checkpoint's schedule and
    allocates that block: the same entries, so nothing is left unloaded and DCP asks for nothing missing."""
    for first in (3, 4):  # at the switch to block 1; one step into it
        model = tiny_llama()
        opt = create_optimizer(model, "badam", **{**HP, "freeze_inactive": False})
        train(model, opt, first)
        held = {p: dict(s) for p, s in opt.state.items()}
        sd = opt.state_dict()
        assert {p: dict(s) for p, s in opt.state.items()}.keys() == held.keys()  # state_dict() leaves the state as it was
        saved = {k for k, v in sd["state"].items() if v}
        new = create_optimizer(tiny_llama(), "badam", **{**HP, "freeze_inactive": False})
        new.prepare_load(sd["param_groups"][0]["badam_period"], sd["param_groups"][0]["badam_steps"])
        request = new.state_dict()
        assert {k for k, v in request["state"].items() if v} == saved, first
        assert all(request["state"][k].keys() == sd["state"][k].keys() for k in saved)
