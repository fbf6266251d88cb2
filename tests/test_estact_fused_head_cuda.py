"""TRL's fused LM head for a CUDA target on the traced step (issue 12): the estimate traces the training step with
TRL's own head on fake CPU tensors for a CUDA target too (it used the per-layer trace with the head's formula there,
``fused_head_bytes``). Only TRL's device-specific kernels differ, and on CUDA they allocate nothing: the Triton tile
folds (in place on the tile and the per-token statistics) and the float32 accumulation of a 16-bit tile's products
(``addmm`` with ``out_dtype``); ``trl_fused_head(model, "cuda")`` puts allocation-free stand-ins in their place.

What a CPU can check: the CUDA-target estimate against a real CPU step run with those same stand-ins (TRL's code
otherwise unchanged), so that the trace follows the head's own tensors. GPT-2 h=128, 2 layers, vocabulary 2000,
2 x 64 tokens, fp32, Adafactor: activations of the CUDA-target estimate / that step, before (per-layer trace and
formula) 5,219,844 B (0.85), now 1.00. Unmeasured on a GPU (the boolean-indexed gather of the labelled positions,
16 B per token inside the forward, is the known difference)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from lowmem.memory import estimate_memory

sys.path.insert(0, str(Path(__file__).parent))
from test_memory_archs import arch_config  # noqa: E402


def _measured_with_device_kernels(config, batch: int, seq: int, dtype: torch.dtype = torch.float32) -> dict:
    """Activations of two real CPU steps with TRL's fused head whose device kernels are the CUDA stand-ins."""
    from transformers import AutoModelForCausalLM

    from lowmem.memory.activations import trl_fused_head
    from lowmem.memory.measure import PeakTracker
    from lowmem.optim import create_optimizer

    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).train()
        opt = create_optimizer(model, "adafactor")
        opt.materialize_state()
        tracker = PeakTracker(model, opt)
        with trl_fused_head(model, "cuda"), tracker:
            for _ in range(2):
                ids = torch.randint(0, config.vocab_size, (batch, seq))
                loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
                loss.backward()
                del loss
                opt.step()
                opt.zero_grad(set_to_none=True)
                tracker.next_step()
    return tracker.maxima


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_target_fused_head_step_is_traced(dtype):
    """bf16: the 16-bit tiles' products accumulated into the float32 gradients without float32 copies."""
    config = arch_config("gpt2")
    measured = _measured_with_device_kernels(config, 2, 64, torch.float32 if dtype == "fp32" else torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cuda = estimate_memory(config, "adafactor", batch_size=2, seq_len=64, dtype=dtype, device="cuda", trainer="sft")
        cpu = estimate_memory(config, "adafactor", batch_size=2, seq_len=64, dtype=dtype, device="cpu", trainer="sft")
    assert "its training step, forward and backward" in " ".join(cuda.notes)
    assert cuda.activations == pytest.approx(measured["activations"], rel=0.02), cuda.activations / measured["activations"]
    # the CPU's torch fold: about 7 float32 tile-sized temporaries more (128 x 2000 tiles)
    assert cpu.activations - cuda.activations > 6 * 128 * 2000 * 4


def test_device_kernels_are_restored_and_the_device_checked():
    import trl.kernels.chunked_logprob as kernels

    from lowmem.memory.activations import trl_fused_head
    from lowmem.memory.estimate import build_meta_model

    model = build_meta_model(arch_config("gpt2"), torch.float32)
    before = (kernels._forward_tile, kernels._backward_tile, kernels._addmm_fp32)
    with trl_fused_head(model, "cuda"):
        assert kernels._forward_tile is not before[0] and kernels._addmm_fp32 is not before[2]
    assert (kernels._forward_tile, kernels._backward_tile, kernels._addmm_fp32) == before
    with trl_fused_head(model, "cpu"):
        assert (kernels._forward_tile, kernels._backward_tile, kernels._addmm_fp32) == before
    with pytest.raises(ValueError, match="device='xpu'"):
        with trl_fused_head(model, "xpu"):
            pass
