"""ESTFIX16 (FOUND_EST12 1): moments.grad_element_bytes reads the gradient dtype the engine names
(moments.counting_gradient) before the group's scan, and the name does not outlive its block."""

import pytest
import torch

from lowmem.optim.moments import counting_gradient, grad_element_bytes


def test_told_dtype_comes_before_the_groups_scan_and_ends_with_its_block():
    group = {"params": [torch.zeros(2, dtype=torch.float64), torch.zeros(2)]}
    assert grad_element_bytes(group) == 8  # (not told: any float64 parameter of the group)
    with counting_gradient(torch.float32):
        assert grad_element_bytes(group) == 4
        assert grad_element_bytes(group, torch.zeros(1, dtype=torch.float64)) == 8  # (a float64 state: 8, as before)
        with counting_gradient(torch.float64):
            assert grad_element_bytes(group) == 8
        assert grad_element_bytes(group) == 4
    with counting_gradient(torch.bfloat16):  # (a low-precision gradient: the engine's float32 copy)
        assert grad_element_bytes(group) == 4
    with pytest.raises(RuntimeError), counting_gradient(torch.float32):
        raise RuntimeError("a count that raised")
    assert grad_element_bytes(group) == 8
    assert grad_element_bytes({"params": [torch.zeros(2)]}) == 4
