"""Resume audit: a checkpoint loaded into another configuration (another rank, block size, window, projection,
quantization, BAdam schedule, number or order of parameters) is a ``ValueError`` naming what differs, and the
optimizer keeps its groups and state and the model its weights, so the run can go on or be rebuilt (not a
silent partial load). Each case trains both sides a step or two first, so the receiving optimizer has state to lose.
The state dicts travel through ``torch.save`` / ``torch.load(weights_only=True)``, as the Trainer's ``optimizer.pt``."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from lowmem import create_optimizer
from lowmem.kit import build_tiny_model

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _model():
    torch.manual_seed(0)
    return build_tiny_model(0)[0]


def _train(model, opt, steps):
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _snapshot(model, opt):
    sd = opt.state_dict()
    state = {(i, k): v.clone() for i, s in sd["state"].items() for k, v in s.items()}
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return state, groups, weights, grads, [id(g) for g in opt.param_groups]


def _assert_untouched(before, model, opt):
    state, groups, weights, grads, group_ids = _snapshot(model, opt)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    assert groups == before[1]
    assert all(torch.equal(weights[k], before[2][k]) for k in weights)
    assert grads == before[3]  # (BAdam's frozen blocks)
    assert group_ids == before[4]


def _params(model, keep=lambda n: True, reverse=False):
    ps = [p for n, p in model.named_parameters() if keep(n)]
    return ps[::-1] if reverse else ps


# (label, saving optimizer, loading optimizer (built on the model), what the error must say)
CASES = [
    ("galore rank", lambda m: create_optimizer(m, "galore_adamw", rank=8, update_proj_gap=5),
     lambda m: create_optimizer(m, "galore_adamw", rank=4, update_proj_gap=5), r"rank=8 \(this optimizer: 4\)"),
    ("apollo rank", lambda m: create_optimizer(m, "apollo_adamw", rank=4), lambda m: create_optimizer(m, "apollo_adamw", rank=2),
     r"rank=4 \(this optimizer: 2\)"),
    ("frugal projection", lambda m: create_optimizer(m, "frugal", rank=4, projection="randk"),
     lambda m: create_optimizer(m, "frugal", rank=4, projection="columns"), r"projection='randk' \(this optimizer: 'columns'\)"),
    ("8bit -> 4bit", lambda m: create_optimizer(m, "adamw8bit", min_quant_size=64, block_size=64),
     lambda m: create_optimizer(m, "adamw4bit", min_quant_size=64, block_size=64), r"adamw4bit: parameter 0 .*'exp_avg'.*shape"),
    ("8bit block size", lambda m: create_optimizer(m, "adamw8bit", min_quant_size=64, block_size=64),
     lambda m: create_optimizer(m, "adamw8bit", min_quant_size=64, block_size=128), r"block_size=64 \(this optimizer: 128\)"),
    ("microadam window", lambda m: create_optimizer(m, "microadam", m=4), lambda m: create_optimizer(m, "microadam", m=8),
     r"m=4 \(this optimizer: 8\)"),
    ("badam switch_every", lambda m: create_optimizer(m, "badam", switch_every=3),
     lambda m: create_optimizer(m, "badam", switch_every=5), r"switch_every=3 \(this optimizer: 5\)"),
    ("badam seed", lambda m: create_optimizer(m, "badam", switch_every=3), lambda m: create_optimizer(m, "badam", switch_every=3, seed=1),
     r"seed=0 \(this optimizer: 1\)"),
    ("badam order", lambda m: create_optimizer(m, "badam", switch_every=3),
     lambda m: create_optimizer(m, "badam", switch_every=3, switch_mode="ascending"), r"switch_mode='random' \(this optimizer: 'ascending'\)"),
    ("parameters in another order", lambda m: create_optimizer(_params(m), "adamw"),
     lambda m: create_optimizer(_params(m, reverse=True), "adamw"), r"parameter 1 of shape \(64,\): loaded state 'exp_avg'.*shape \(64, 64\)"),
    ("another optimizer", lambda m: create_optimizer(m, "adamw"), lambda m: create_optimizer(m, "adafactor"), r"betas"),
]


@pytest.mark.parametrize("label,save,load,match", CASES, ids=[c[0] for c in CASES])
def test_a_checkpoint_of_another_configuration_is_refused_and_changes_nothing(label, save, load, match):
    m = _model()
    opt = save(m)
    _train(m, opt, 2)
    sd = _roundtrip(opt.state_dict())
    target = _model()
    topt = load(target)
    _train(target, topt, 1)
    before = _snapshot(target, topt)
    with pytest.raises(ValueError, match=match):
        topt.load_state_dict(sd)
    _assert_untouched(before, target, topt)
    _train(target, topt, 1)  # and it still steps


def test_badam_checkpoint_without_the_active_blocks_state_is_refused_and_changes_nothing():
    """BAdam's own post-load check (a schedule inside a block whose Adam state the dict lacks, what a DCP load
    without prepare_load gives) used to raise after the state had loaded."""
    m = _model()
    opt = create_optimizer(m, "badam", switch_every=3)
    _train(m, opt, 2)
    sd = _roundtrip(opt.state_dict())
    sd["state"] = {}
    target = _model()
    topt = create_optimizer(target, "badam", switch_every=3, seed=0)
    _train(target, topt, 4)  # one switch: another block active, with its own state
    before = _snapshot(target, topt)
    with pytest.raises(ValueError, match=r"2 step\(s\) into block .* none of that block's parameters has Adam state"):
        topt.load_state_dict(sd)
    _assert_untouched(before, target, topt)
    assert (topt._period, topt._steps) == (1, 1)


def test_badam_checkpoint_resumes_with_another_freeze_inactive():
    """freeze_inactive only says whether the inactive blocks' gradients are computed (DDP needs it off): a
    checkpoint of a single-process run (on) resumes with it off and continues as the uninterrupted run."""
    m = _model()
    opt = create_optimizer(m, "badam", switch_every=3, freeze_inactive=True)
    _train(m, opt, 2)
    sd = _roundtrip(opt.state_dict())
    target = _model()
    target.load_state_dict(m.state_dict())
    topt = create_optimizer(target, "badam", switch_every=3, freeze_inactive=False)
    topt.load_state_dict(sd)
    assert all(g["freeze_inactive"] is False for g in topt.param_groups)
    assert all(p.requires_grad for p in target.parameters())
    _train(m, opt, 3)
    _train(target, topt, 3)  # across the switch at step 3
    for (k, a), b in zip(m.named_parameters(), target.parameters()):
        assert torch.equal(a, b), k


def test_another_number_of_parameters_names_the_counts():
    """A checkpoint of a model with another number of parameters (other target modules, another layer count):
    torch's message 'loaded state dict contains a parameter group that doesn't match the size of optimizer's group'
    names neither the group nor the counts."""
    m = _model()
    opt = create_optimizer(_params(m), "adamw")
    _train(m, opt, 1)
    sd = _roundtrip(opt.state_dict())
    target = _model()
    topt = create_optimizer(_params(target, keep=lambda n: "layers.1." not in n), "adamw")
    n_saved, n_here = len(sd["param_groups"][0]["params"]), len(topt.param_groups[0]["params"])
    with pytest.raises(ValueError, match=rf"group 0.*{n_saved}.*{n_here}"):
        topt.load_state_dict(sd)
