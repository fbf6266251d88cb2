"""EST17 (issue 12, residual d): a 4-bit base without checkpointing read 1.0105 / 1.0317 (estimate / measured, tiny
Llama nf4 LoRA, 1 x 16 / 2 x 64, AdamW, CPU autocast). The trace was right and the measurement low: bitsandbytes'
``gemm_4bit`` (its 4-bit linear's forward on the CPU) is one operator to a ``TorchDispatchMode``, which sees its output
only, not the whole weight it de-quantizes inside (and, double-quantized, the blocks' float32 scales), so the forward's
peak (the last layer's ``down_proj``) read 704,640 B low and the measured peak fell in the backward. The tracker now
counts that workspace (``measure.op_workspace_bytes``), and the stand-in's forward holds the scales too: traced ==
measured, total 1.0105 -> 1.0001, 1.0317 -> 1.0005."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def _linear4bit(out_features=96, in_features=128, double=True):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                            compress_statistics=double)
    lin.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features), requires_grad=False, quant_type="nf4",
                                   compress_statistics=double)
    return lin.cpu().train()


@pytest.mark.parametrize("double", [True, False])
def test_tracker_counts_gemm_4bit_workspace(double):
    """A no-grad forward of a bitsandbytes 4-bit linear under the tracker: its most activation bytes are the output
    beside the float32 weight ``gemm_4bit`` de-quantizes (and the double-quantized blocks' float32 scales), as
    ``op_workspace_bytes`` counts them from the operator's arguments."""
    from lowmem.memory.measure import PeakTracker

    lin = _linear4bit(double=double)
    state = lin.weight.quant_state
    assert bool(state.nested) == double
    x = torch.randn(2, 8, 128)
    tracker = PeakTracker(lin, device="cpu")
    with tracker, torch.no_grad():
        y = lin(x)
    scales = 4 * state.absmax.numel() if double else 0  # (nested: the 8-bit codes of the blocks' scales)
    assert tracker.maxima["activations"] == y.numel() * 4 + 96 * 128 * 4 + scales


def test_other_operators_have_no_workspace():
    from lowmem.memory.measure import op_workspace_bytes

    x = torch.zeros(3, 4)
    assert op_workspace_bytes(torch.ops.aten.mm.default, (x, x.t()), {}) == []


@pytest.mark.slow  # 2-4 s: a quantized model loaded and stepped twice
@pytest.mark.parametrize("seq_len", [16, 64])
def test_traced_nf4_step_without_checkpointing_is_the_measured(seq_len):
    """The trace's most activation and gradient bytes at once equal the measured step's (plus the trace's own token
    ids, 8 B per token): before, 36,472 B (1 x 16) and 199,672 B (1 x 64) over the measurement."""
    import tempfile

    from test_est12_mixed_quant import LORA, _config, _measured, _quant
    from transformers import LlamaForCausalLM

    from lowmem.cli_budget import autocast_step_bytes

    path = tempfile.mkdtemp()
    torch.manual_seed(0)
    LlamaForCausalLM(_config()).float().save_pretrained(path)
    traced = autocast_step_bytes(_config(), torch.bfloat16, LORA, 1, seq_len, False, quantization=_quant("nf4"))
    assert traced["backward_peak"] == _measured(path, "nf4", seq_len, False) + 8 * seq_len
