"""A float64 parameter with a float32 / bfloat16 state of a rule that computes in its state's precision (CAME,
Adafactor: ``MomentRule.computes_in_state_precision``): the engine casts the gradient to float32 once (FOUND_AUDITFIX
4b; its count: tests/test_auditnew_lion_came.py::test_float64_parameters_step_allocates_what_it_reports)."""

import pytest
import torch

from lowmem import create_optimizer


def _stepped(name, grads, **kw):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(24, 16, dtype=torch.float64))
    opt = create_optimizer([p], name, **kw)
    for g in grads:
        opt.step_param(p, g)
    return p, opt


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["came", "adafactor"])
def test_float64_parameter_steps_with_its_gradient_in_float32(name, state_dtype):
    """Bit for bit the step of the gradient rounded to float32 (the parameter stays float64, the state is the
    state_dtype); a float64 state (state_dtype="param") is not cast: it differs from the rounded gradient's step."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(24, 16, generator=gen, dtype=torch.float64) for _ in range(3)]
    p, opt = _stepped(name, grads, state_dtype=state_dtype)
    q, _ = _stepped(name, [g.float().double() for g in grads], state_dtype=state_dtype)
    assert p.dtype == torch.float64 and torch.equal(p, q)
    assert {v.dtype for v in opt.state[p].values() if v.is_floating_point() and v.dim() > 0} == {
        getattr(torch, state_dtype)}
    p64, _ = _stepped(name, grads, state_dtype="param")
    q64, _ = _stepped(name, [g.float().double() for g in grads], state_dtype="param")
    assert not torch.equal(p64, q64)
