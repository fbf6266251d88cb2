"""The traced architectures' quantized bases (issue 12): the estimate traces a step of a model without bitsandbytes'
layers, so its quantized linears run stand-ins (``activations.kbit_linears``) that allocate what bitsandbytes' CPU
training path allocates (the weight de-quantized in the forward and again in the backward, the 8-bit rows' scales)
and keep what its autograd contexts keep (``MatMul8bitFp``'s ``ctx.A``, the input, to the end of the backward pass).
Without them (the largest de-quantized weight and the held inputs added to every moment instead) h64 LoRA r=64
all-linear 1 x 32 fp32 was Phi3 int8 0.950, nf4 0.980 of the measured peak; GPT-NeoX (below) 0.966, 0.999."""

import os
import weakref

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("OMP_NUM_THREADS", "1")

from lowmem.memory.activations import kbit_linears  # noqa: E402

LORA = {"r": 64, "lora_alpha": 16, "target_modules": "all-linear"}


class _NewStorages(TorchDispatchMode):
    """The bytes of each storage an operation makes (not its views)."""

    def __init__(self):
        super().__init__()
        self.seen, self.made = set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        views = [r.alias_info is not None for r in func._schema.returns]
        for o, view in zip(out if isinstance(out, (tuple, list)) else [out], views):
            if isinstance(o, torch.Tensor) and not view:
                key = StorageWeakRef(o.untyped_storage())
                if key not in self.seen:
                    self.seen.add(key)
                    self.made.append(o.untyped_storage().nbytes())
        return out


def _bnb_layer(kind):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    w = torch.randn(32, 64)
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def _stand_in(kind):
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    model[0].weight.requires_grad_(False)
    model.lowmem_kbit = (kind, torch.float32, frozenset({"0"}), 64 if kind == "nf4" else 0)
    return model


def _allocations(layer, context):
    """(bytes the forward makes, bytes the backward makes, whether the input lives on after the forward)."""
    leaf = torch.randn(1, 8, 64, requires_grad=True)
    x = leaf * 1.0  # not a leaf: only the graph can keep it
    alive = weakref.ref(x)
    with context:
        fwd = _NewStorages()
        with fwd:
            y = layer(x)
        del x
        held = alive() is not None
        bwd = _NewStorages()
        with bwd:
            y.sum().backward()
    return sorted(fwd.made), sorted(bwd.made), held


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_stand_ins_allocate_and_keep_what_bitsandbytes_does(kind):
    """The same storages' bytes in the forward and the backward as bitsandbytes' own layer (CPU), and an 8-bit
    layer's input kept by the graph (a 4-bit layer's is not)."""
    import contextlib

    real = _allocations(_bnb_layer(kind), contextlib.nullcontext())
    model = _stand_in(kind)
    mine = _allocations(model[0], kbit_linears(model))
    assert mine[2] == real[2] == (kind == "int8")
    if kind == "int8":  # MatMul8bitFp: the codes in the input's dtype and the rows' scales, forward and backward
        assert mine[:2] == real[:2], (mine, real)
    else:  # MatMul4Bit: the weight de-quantized in the backward; the forward's own kernel (gemm_4bit) as counted
        assert mine[1] == real[1], (mine, real)
        assert max(mine[0]) >= max(real[0]), (mine, real)


def test_stand_ins_are_removed_and_need_the_estimates_mark():
    model = _stand_in("int8")
    with kbit_linears(model):
        assert "forward" in vars(model[0])
    assert "forward" not in vars(model[0])
    del model.lowmem_kbit
    with kbit_linears(model):
        assert "forward" not in vars(model[0])


def _phi3(path):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    Phi3ForCausalLM(Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               tie_word_embeddings=False, pad_token_id=0, eos_token_id=0,
                               bos_token_id=0)).save_pretrained(path)
    return str(path)


def _gpt_neox(path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128,
                                     tie_word_embeddings=False)).save_pretrained(path)
    return str(path)


def _check(path, quantization, rank, b, s, ckpt, bound):
    from lowmem.memory.measure import measure_memory

    r = measure_memory(path, quantization=quantization, lora={**LORA, "r": rank}, dtype="fp32", device="cpu",
                       batch_size=b, seq_len=s, gradient_checkpointing=ckpt)
    assert r.estimate.total >= r.measured["total"], (r.estimate.total, r.measured["total"])
    assert r.ratios()["total"] <= bound, r.ratios()


@pytest.mark.slow
def test_phi3_int8_large_adapters_few_tokens(tmp_path):
    """Was 0.950 (1,987,468 B estimated, 2,091,276 measured); the trace's moments: 2,092,044 (1.0004). Traced bytes
    (MemTracker): the bound is the count's, not noise."""
    _check(_phi3(tmp_path), "int8", 64, 1, 32, False, 1.01)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "nf4"])
@pytest.mark.parametrize("rank, b, s, ckpt", [(64, 1, 32, True), (8, 1, 64, False), (8, 1, 64, True), (8, 4, 96, False),
                                              (8, 4, 96, True)])
@pytest.mark.parametrize("arch", ["phi3", "gpt_neox"])
def test_traced_quantized_bases_are_never_under(tmp_path, arch, quantization, rank, b, s, ckpt):
    """Few and many tokens, checkpointed or not (before: r=8 1.015-1.074, r=64 1 x 32 checkpointed 0.980-0.984; after
    1.0004-1.017). Within the 4-bit tests' tolerance."""
    _check((_phi3 if arch == "phi3" else _gpt_neox)(tmp_path), quantization, rank, b, s, ckpt, 1.10)
