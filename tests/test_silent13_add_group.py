"""A group added later to Muon / SinkGD with use_muon / use_sinkgd on vectors only is refused, as at construction
(SILENT 13; FOUND_FIXES2 1); a vector group without the key still steps AdamW."""
import pytest
import torch
from torch import nn

from lowmem.optim import create_optimizer


@pytest.mark.parametrize("name,key", [("muon", "use_muon"), ("normuon", "use_muon"), ("sinkgd", "use_sinkgd")])
def test_added_vector_group_with_the_target_key_is_refused(name, key):
    w, b, c = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.zeros(16)), nn.Parameter(torch.zeros(4))
    opt = create_optimizer([w], name)
    with pytest.raises(ValueError, match=rf"{key}=True on parameters of fewer than 2 dimensions only"):
        opt.add_param_group({"params": [b], key: True})
    opt.add_param_group({"params": [c]})  # without the key: the default, AdamW for vectors
    for p in (w, c):
        p.grad = torch.ones_like(p)
    opt.step()
