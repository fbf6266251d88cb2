"""LowMemOptimizer as a torch optimizer: complex parameters refused, copies (``copy.deepcopy``, ``pickle``) that
continue bit for bit and share nothing mutable with the original, torch's load-state-dict hooks around the whole
load (FOUND_AUDITOPT 1, 3, 5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.optim import create_optimizer

# ---- complex parameters -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "galore_adamw", "adam_mini"])
def test_a_complex_parameter_is_refused_naming_it_before_any_state(name):
    real, cplx = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8, dtype=torch.complex64))
    hp = {"rank": 2} if name == "galore_adamw" else {}
    with pytest.raises(ValueError, match=rf"parameter group 0 of optimizer '{name}', parameter 1 of shape \(8, 8\) is "
                       r"complex \(torch.complex64\).*torch.view_as_real.*\(8, 8, 2\)"):
        create_optimizer([real, cplx], name, lr=1e-2, **hp)
    opt = create_optimizer([real], name, lr=1e-2, **hp)
    with pytest.raises(ValueError, match=r"parameter group 1 of optimizer .*, parameter 0 .*complex"):
        opt.add_param_group({"params": [cplx]})
    assert len(opt.param_groups) == 1 and not opt.state  # (the group is not kept)


def test_the_refusal_names_the_way_that_trains_like_torch():
    """The way the message names: a real ``[..., 2]`` parameter viewed as complex trains as torch.optim.AdamW trains
    the complex one."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, dtype=torch.complex64, generator=g)
    p, q = nn.Parameter(torch.view_as_real(w).clone()), nn.Parameter(w.clone())
    o1 = create_optimizer([p], "adamw", lr=0.1, weight_decay=0.01)
    o2 = torch.optim.AdamW([q], lr=0.1, weight_decay=0.01)
    for _ in range(3):
        grad = torch.randn(4, 4, dtype=torch.complex64, generator=g)
        p.grad, q.grad = torch.view_as_real(grad).clone(), grad.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(torch.view_as_complex(p.detach()), q.detach(), rtol=1e-6, atol=1e-6)
