"""EST12: ``--precision mixed`` with a quantized base (bitsandbytes, LoRA). The autocast step is traced on fake
tensors with the estimate's stand-ins of bitsandbytes' CPU matmuls (``cli_budget.autocast_step_bytes(...,
quantization=...)``): checkpointed (4-bit and 8-bit) and 8-bit without checkpointing. Before -> after, total estimate
/ measured (tiny Llama h=256, 2 layers, vocab 128, LoRA r=8 all-linear, AdamW, CPU autocast, second step, MemTracker):
int8 1 x 16 0.9525 -> 1.0001, 1 x 256 1.1850 -> 1.0005, checkpointed 0.9688 -> 1.0001, 1.2671 -> 1.0006; nf4
checkpointed 1.1050 -> 1.0001, 1.1595 -> 1.0007; nf4 1 x 16 1.0929 -> 1.0105, 1 x 256 1.0599 -> 1.0004, 2 x 64
1.1104 -> 1.0317 (the trace's 4-bit LoRA layers run peft's own ``lora.bnb.Linear4bit.forward``: without it 1 x 256
traced 0.989 of the measured activations and gradients). The gradients component equals the measured (312,320 B)."""

import pytest
import torch
from transformers import LlamaConfig

LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}


def _config():
    return LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=128, max_position_embeddings=512, tie_word_embeddings=False)


def _quant(kind):
    return {"quant_type": "int8"} if kind == "int8" else {"quant_type": kind, "double_quant": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("est12_quant")
    torch.manual_seed(0)
    LlamaForCausalLM(_config()).float().save_pretrained(path)
    return path


def _measured(path, kind, seq_len, ckpt, optimizer=None):
    """PeakTracker's peak over a CPU autocast step of the quantized model: without an optimizer, the activations and
    gradients at the most (weights and constants left out); with one, the second step's total."""
    import lowmem
    from lowmem.memory.measure import PeakTracker
    from lowmem.quant import load_quantized_model

    torch.manual_seed(0)
    model = load_quantized_model(path, quantization=_quant(kind), lora=LORA, dtype=torch.float32, device="cpu",
                                 gradient_checkpointing=ckpt).train()
    opt = None
    if optimizer:
        opt = lowmem.create_optimizer(model, optimizer, lr=1e-3)
        opt.materialize_state()
    ids = torch.randint(0, 128, (1, seq_len))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        del loss
        if opt is not None:
            opt.step()
        (opt or model).zero_grad(set_to_none=True)

    step()  # (bitsandbytes' and the state's first step)
    tracker = PeakTracker(model, opt, device="cpu")
    with tracker:
        step()
    if opt is None:
        return tracker.peak["activations"] + tracker.peak["gradients"]
    return tracker.peak["total"]


@pytest.mark.slow  # 2-3 s each: a quantized model loaded and stepped
@pytest.mark.parametrize("kind,ckpt", [("int8", False), ("int8", True), ("nf4", True)])
def test_traced_quantized_autocast_step_is_a_real_ones(model_dir, kind, ckpt):
    """The trace's most activation and gradient bytes at once equal the measured step's (plus the trace's own token
    ids, 8 B per token). Before the 4-bit stand-in ran its matmul outside autocast, nf4 checkpointed 1 x 16 traced
    1.253 of the measured (the linear's two bf16 copies)."""
    from lowmem.cli_budget import autocast_step_bytes

    traced = autocast_step_bytes(_config(), torch.bfloat16, LORA, 1, 16, ckpt, quantization=_quant(kind))
    assert traced["backward_peak"] == _measured(model_dir, kind, 16, ckpt) + 8 * 16


@pytest.mark.slow
@pytest.mark.parametrize("kind,ckpt", [("int8", False), ("nf4", True), ("nf4", False)])
def test_quantized_mixed_total_is_not_under(model_dir, kind, ckpt):
    """The mixed estimate's total against the measured step, 1 x 256: never under by more than 0.1%, over by at most
    1% (before: int8 1.1850, nf4 checkpointed 1.1595, nf4 1.0599)."""
    from lowmem.cli_budget import mixed_precision_estimate

    measured = _measured(model_dir, kind, 256, ckpt, "adamw")
    est = mixed_precision_estimate(_config(), "bf16", optimizer="adamw", batch_size=1, seq_len=256, device="cpu",
                                   gradient_checkpointing=ckpt, quantization=_quant(kind), lora=LORA, max_grad_norm=None)
    assert est.details["autocast_step"] is not None
    assert 0.999 * measured <= est.total <= 1.01 * measured, (est.total, measured)


def test_the_4bit_stand_in_runs_outside_autocast():
    """bitsandbytes' gemm_4bit is a custom operator, on no autocast list: the stand-in's matmul makes no bfloat16 copy
    of its input or weight under autocast, and its output keeps the compute dtype; the 8-bit one's linear is cast, as
    bitsandbytes' MatMul8bitFp's F.linear is (a fake-tensor trace, fast)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lowmem.memory.activations import _bnb_linear_functions

    int8, nf4 = _bnb_linear_functions()
    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and (kwargs or {}).get("dtype") == torch.bfloat16:
                casts.append(tuple(args[0].shape))
            return out

    x = torch.zeros(4, 32)
    w = torch.zeros(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), Casts():
        out4 = nf4.apply(x, w, None, torch.float32, 64)
    assert casts == [] and out4.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16), Casts():
        out8 = int8.apply(x, w, None)
    assert sorted(casts) == [(4, 32), (16, 32)] and out8.dtype == torch.bfloat16
