"""AUDITFIX: a 0-d parameter (CLIP's ``logit_scale``, a learned temperature, a scalar gate) steps as the same value
held in a one-element tensor does, for the element-wise recipes whose ``chunk_state`` skipped a 0-d moment
(``moments.AdamMoments``: adamw, adamw8bit's small tensors, ...; ``LionMoments``: tests/test_auditnew_lion_came.py).
The engine passes the gradient flattened (``grad.view(-1)[start:stop]``, shape ``[1]``) and the un-viewed 0-d moment
fails: ``output with shape [] doesn't match the broadcast shape [1]`` on every path but float32 multi-tensor.
Fixed in moments.py ``AdamMoments.chunk_state`` (a 0-d moment is viewed too; the commit names ``FOUND_AUDITFIX``
item 1b): every case below equals the one-element run bit for bit."""

from __future__ import annotations

import pytest
import torch

import lowmem


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
@pytest.mark.parametrize("dtype, foreach", [(torch.float32, False), (torch.float64, None), (torch.bfloat16, None)],
                         ids=["fp32-single", "fp64", "bf16"])
def test_zero_dim_parameter_steps_as_a_one_element_tensor(name, dtype, foreach):
    p = torch.nn.Parameter(torch.tensor(1.5, dtype=dtype))
    q = torch.nn.Parameter(torch.tensor([1.5], dtype=dtype))
    op = lowmem.create_optimizer([p], name, lr=0.1, weight_decay=0.1, foreach=foreach)
    oq = lowmem.create_optimizer([q], name, lr=0.1, weight_decay=0.1, foreach=foreach)
    for k in range(3):
        p.grad = torch.tensor(0.3 * (k + 1) - 0.5, dtype=dtype)
        q.grad = p.grad.view(1).clone()
        op.step()
        oq.step()
    assert p.shape == () and torch.equal(p.view(1), q) and not torch.equal(q, torch.tensor([1.5], dtype=dtype))
