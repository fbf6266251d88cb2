"""FIXES2: a parameter group the caller gives with a matrix-only target key (rank, use_muon, use_sinkgd) on
1-D parameters only is refused (SILENT 12 / 13); a flat list, and a group holding a matrix too, stay valid."""

import pytest
import torch
from torch import nn


@pytest.mark.parametrize("name,key,value", [("galore_adamw", "rank", 4), ("fira_adamw", "rank", 4),
                                            ("muon", "use_muon", True), ("normuon", "use_muon", True),
                                            ("sinkgd", "use_sinkgd", True)])
def test_vector_only_group_with_target_key_is_refused(name, key, value):
    from lowmem.optim import create_optimizer

    w, b = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.zeros(16))
    with pytest.raises(ValueError, match=rf"parameter group 1: {key}=.* fewer than 2 dimensions only \[\(16,\)\]"):
        create_optimizer([{"params": [w], key: value}, {"params": (p for p in [b]), key: value}], name)


@pytest.mark.parametrize("name", ["galore_adamw", "apollo_adamw", "muon", "sinkgd"])
def test_flat_vector_list_and_mixed_group_still_build_and_step(name):
    from lowmem.optim import create_optimizer

    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.zeros(16))
    key = {"galore_adamw": "rank", "apollo_adamw": "rank"}.get(name, "use_" + name)
    value = 4 if key == "rank" else True
    for opt in (create_optimizer([b], name), create_optimizer([{"params": iter([w, b]), key: value}], name)):
        assert opt.param_groups[0]["params"][-1] is b
        b.grad, w.grad = torch.ones_like(b), torch.ones_like(w)
        opt.step()


@pytest.mark.parametrize("name", ["galore_adamw", "apollo_adamw", "fira_adamw"])
def test_group_added_later_with_rank_on_vectors_only_is_refused(name):
    from lowmem.optim import create_optimizer

    w, b, w2 = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.zeros(16)), nn.Parameter(torch.randn(8, 16))
    opt = create_optimizer([w], name, rank=4)
    with pytest.raises(ValueError, match=r"parameter group 1: rank=4 .* fewer than 2 dimensions only \[\(16,\)\]"):
        opt.add_param_group({"params": [b], "rank": 4})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b]})  # (no rank: an AdamW group, valid)
    opt.add_param_group({"params": [w2], "rank": 4})
    assert len(opt.param_groups) == 3


def test_a_set_of_parameters_is_still_torchs_error():
    from lowmem.optim import create_optimizer

    with pytest.raises(TypeError, match="ordered collections"):
        create_optimizer([{"params": {nn.Parameter(torch.zeros(4, 4))}, "rank": 2}], "galore_adamw")
