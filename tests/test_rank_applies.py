"""A projected group's ``rank`` must apply to at least one of its 2-D parameters (no silent fallback).

A 2-D ``m x n`` parameter is projected when ``rank < min(m, n)``; a group whose rank is at or above the
smaller side of every 2-D parameter would train entirely full-rank (full-size state) whatever the user
asked: a ``ValueError`` naming ``rank``, the shapes and the valid range ``1 .. max(min(m, n)) - 1``, at
construction, before any state exists (``check_rank_applies`` in every projection recipe's
``validate_group``). A group where the rank applies to some parameters keeps the per-parameter warning
for the others. The paths that build optimizers for users surface the same error: the registry (a model's
``target_modules``), the HF Trainer integration, ``lowmem train``, ``lowmem budget`` / the estimator.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lowmem.optim import create_optimizer, optimizer_entries
from lowmem.optim.recipes.subspace import RankError, check_rank_applies

PROJECTED = [e.name for e in optimizer_entries() if e.recipe is not None and e.recipe.projection is not None]
TINY_RANGE = "valid: rank 1 .. 63"  # the tiny Llama's weights: (64, 64), (32, 64), (128, 64), (64, 128)


def _params(*shapes):
    return [nn.Parameter(torch.randn(s)) for s in shapes]


def test_every_projection_recipe_is_covered():
    assert {"galore_adamw", "galore_adafactor", "fira_adamw", "frugal", "osd_adamw", "apollo_adamw", "apollo_mini",
            "adamw_snsm", "sgd_sm", "adagrad_snsm", "galore_adamw8bit", "fira_adamw8bit", "frugal8bit"} <= set(PROJECTED)


@pytest.mark.parametrize("name", PROJECTED)
def test_rank_above_every_side_is_an_error_with_the_range(name):
    """rank 24 >= the smaller side (24) of both weights: refused at construction, naming rank, the shapes and
    1 .. 23; nothing is built."""
    with pytest.raises(ValueError, match=r"rank 24 >= the smaller side of every 2-D parameter .*\(24, 40\), \(40, 24\).*"
                                         r"valid: rank 1 \.\. 23 ") as err:
        create_optimizer([{"params": _params((24, 40), (40, 24), (40,)), "rank": 24}], name)
    assert isinstance(err.value, RankError) and (err.value.rank, err.value.side) == (24, 24)


@pytest.mark.parametrize("name", ["galore_adamw", "apollo_adamw", "adamw_snsm", "frugal8bit"])
def test_add_param_group_refuses_before_any_state(name):
    """A refused group is not added, and the optimizer's groups and state are as before (it still steps)."""
    good = _params((24, 40))
    opt = create_optimizer([{"params": good, "rank": 4}], name)
    bad = _params((8, 40), (40, 16))
    with pytest.raises(ValueError, match=r"rank 16 .*\(8, 40\), \(40, 16\).*valid: rank 1 \.\. 15 "):
        opt.add_param_group({"params": bad, "rank": 16})
    assert len(opt.param_groups) == 1 and not opt.state
    good[0].grad = torch.randn(24, 40)
    opt.step()
    assert set(opt.state) == {good[0]}


def test_range_is_the_largest_smaller_side_minus_one():
    with pytest.raises(RankError, match=r"valid: rank 1 \.\. 39 \(the largest smaller side, 40, minus 1\)"):
        check_rank_applies({"params": _params((8, 40), (40, 100), (64, 12)), "rank": 40})
    check_rank_applies({"params": _params((8, 40), (40, 100), (64, 12)), "rank": 39})  # applies to (40, 100)
    with pytest.raises(RankError, match="no rank applies to a parameter with a side of 1"):
        check_rank_applies({"params": _params((1, 40)), "rank": 1})


def test_groups_where_rank_cannot_mean_anything_else_are_left_alone():
    """No rank (a full-rank group), or no 2-D parameter (biases, norms: never projected), is no error for
    check_rank_applies; a group the caller gives with rank on vectors only is refused by create_optimizer (SILENT 12)."""
    check_rank_applies({"params": _params((6, 4)), "rank": None})
    check_rank_applies({"params": _params((40,)), "rank": 64})  # (a batch (3, 4, 5) is its 4 x 5 matrices: test_experts_subspace)
    check_rank_applies({"params": [], "rank": 64})
    with pytest.raises(ValueError, match=r"parameter group 0: rank=128 on parameters of fewer than 2 dimensions only"):
        create_optimizer([{"params": _params((40,)), "rank": 128}], "galore_adamw")  # (SILENT 12: it stepped AdamW)
    create_optimizer(_params((40,)), "galore_adamw")  # a flat list of vectors takes the default rank: still valid


def test_mixed_group_keeps_the_per_parameter_warning():
    """rank 8 applies to the 16 x 16 weight: no error; the 6 x 4 one trains full-rank with a warning."""
    p, q = _params((6, 4), (16, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = create_optimizer([{"params": [p, q], "rank": 8}], "galore_adamw")
    hits = [str(w.message) for w in caught if "full-rank" in str(w.message)]
    assert hits == ["galore_adamw: rank 8 >= smaller side of a (6, 4) parameter; training it full-rank instead"], hits
    p.grad, q.grad = torch.randn(6, 4), torch.randn(16, 16)
    opt.step()
    assert opt.state[p]["exp_avg"].shape == (6, 4) and opt.state[q]["exp_avg"].shape == (16, 8)  # right-projected


# ---- the paths that build optimizers for users --------------------------------------------------


def test_registry_default_rank_on_the_tiny_model(tiny_model):
    """create_optimizer(model, ...): the default rank 128 applies to none of the tiny model's weights; with
    target_modules the range is that of the targeted weights."""
    model, _ = tiny_model
    with pytest.raises(ValueError, match=rf"rank 128 >= .*\(64, 64\) x4, \(32, 64\) x4.*{TINY_RANGE} "):
        create_optimizer(model, "galore_adamw")
    with pytest.raises(ValueError, match=r"rank 32 >= .*\(32, 64\) x4\).*valid: rank 1 \.\. 31 "):
        create_optimizer(model, "fira_adamw", rank=32, target_modules=["k_proj", "v_proj"])
    opt = create_optimizer(model, "apollo_adamw", rank=16)
    assert any(g.get("rank") == 16 for g in opt.param_groups)


def test_hf_trainer_surfaces_the_error(tiny_model, tmp_path):
    from transformers import TrainingArguments

    from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments, optimizer_cls_and_kwargs

    model, _ = tiny_model
    args = LowMemTrainingArguments(str(tmp_path), lowmem_optim="galore_adamw", lowmem_optim_args={"rank": 128},
                                   max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=rf"rank 128 >= the smaller side.*{TINY_RANGE} "):
        LowMemTrainer(model=model, args=args).create_optimizer()
    # transformers' spelling: optim_target_modules and an optim_args string
    hf = TrainingArguments(str(tmp_path), report_to="none", optim_args="rank=32", optim_target_modules=["k_proj"])
    with pytest.raises(ValueError, match=r"rank 32 >= .*\(32, 64\) x2\).*valid: rank 1 \.\. 31 "):
        optimizer_cls_and_kwargs(model, "galore_adamw", args=hf)  # (it builds the optimizer once to check it)


def test_lowmem_train_is_one_line_and_exit_2(tmp_path, capsys):
    from lowmem.cli import main

    code = main(["train", "--optim", "galore_adamw", "--optim-args", "rank=128", "--steps", "1",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("lowmem: error: ") and "rank 128 >=" in err, err
    assert TINY_RANGE in err, err


def test_lowmem_bench_refuses_a_rank_above_the_tiny_model(tmp_path, capsys):
    """`lowmem bench --rank 128` on the tiny task: before, its galore_adamw row timed a full-rank AdamW."""
    from lowmem.cli import main

    code = main(["bench", "galore_adamw", "--rank", "128", "--steps", "6", "--repeats", "1", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "rank 128 >=" in err and TINY_RANGE in err, (code, err)


def test_budget_and_estimator_refuse_with_the_same_message(capsys):
    from lowmem.cli import main
    from lowmem.memory import estimate_memory

    with pytest.raises(ValueError) as est:
        estimate_memory("tiny", "galore_adamw", batch_size=1, seq_len=16)
    assert "rank 128 >=" in str(est.value) and TINY_RANGE in str(est.value)
    assert main(["budget", "tiny", "--optimizer", "galore_adamw", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lowmem: error: {est.value}", (err, str(est.value))
    assert main(["budget", "tiny", "--optimizer", "galore_adamw", "--optim-args", "rank=16", "--device", "cpu"]) == 0


def test_error_names_the_group_and_optimizer():
    """The engine prefixes a recipe's validate_group error with the group and optimizer (the recipe's check sees
    only the group's dict); the error keeps its type and attributes."""
    opt = create_optimizer([{"params": _params((24, 40)), "rank": 4}], "galore_adamw")
    with pytest.raises(RankError, match=r"^parameter group 1 of optimizer 'galore_adamw': rank 8 >= the smaller side") as err:
        opt.add_param_group({"params": _params((6, 4)), "rank": 8})
    assert (err.value.rank, err.value.side) == (8, 4)
    with pytest.raises(ValueError, match=r"^parameter group 0 of optimizer 'frugal': proj_type='full'"):
        create_optimizer([{"params": _params((24, 40)), "rank": 4, "proj_type": "full", "projection": "columns"}], "frugal")
