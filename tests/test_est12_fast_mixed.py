"""EST12: the mixed-precision estimate's autocast traces of a uniform decoder stack run its first three and four layers
and extrapolate (``estimate.layer_scaled_bytes``, ``cli_budget.autocast_forward_peak_bytes``): the same bytes as the
whole stack's trace (meta / fake-tensor counts, machine-independent), with fewer layers run. Llama-2-7B x 512
tokens: ``lowmem budget --precision mixed`` 9.3 -> 6.2 s (the traces 6.8 -> 1.2 s), every component unchanged."""

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig

from lowmem.cli_budget import autocast_forward_peak_bytes
from lowmem.memory.estimate import (autocast_cast_bytes, autocast_extra_saved_bytes, build_meta_model,
                                    uniform_decoder_layers)

LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


def _llama(layers=6):
    return LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def _qwen2():
    return Qwen2Config(hidden_size=64, intermediate_size=172, num_hidden_layers=6, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=True)


def _mixtral():
    return MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=256)


CASES = {"llama": (_llama, None), "qwen2-lora": (_qwen2, LORA), "mixtral": (_mixtral, None)}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if CASES[c][1] else c for c in CASES])  # LoRA: 4 s
def test_scaled_traces_equal_the_whole_stacks(case):
    """Cast copies (by name), extra saved bytes and the forward's end: the truncated traces extrapolated equal the whole
    stack's, to the byte."""
    make, lora = CASES[case]
    cfg = make()
    assert autocast_cast_bytes(cfg, torch.bfloat16, lora) == autocast_cast_bytes(cfg, torch.bfloat16, lora, scaled=False)
    assert (autocast_extra_saved_bytes(cfg, torch.bfloat16, lora, 2, 16)
            == autocast_extra_saved_bytes(cfg, torch.bfloat16, lora, 2, 16, scaled=False))
    assert (autocast_forward_peak_bytes(cfg, torch.bfloat16, lora, 1, 32)
            == autocast_forward_peak_bytes(cfg, torch.bfloat16, lora, 1, 32, scaled=False))


def test_scaled_traces_run_three_layers(monkeypatch):
    """The fast path is taken: a 12-layer Llama's forward-end trace runs 3 + 4 decoder layers (not 12), its cast trace
    4, its saved-bytes traces 2 x (3 + 4), and the numbers are the whole stack's."""
    from transformers.models.llama import modeling_llama

    calls = []
    forward = modeling_llama.LlamaDecoderLayer.forward

    def counted(self, *a, **k):
        calls.append(1)
        return forward(self, *a, **k)

    cfg = _llama(12)
    whole = autocast_forward_peak_bytes(cfg, torch.bfloat16, None, 1, 64, scaled=False)
    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", counted)
    assert autocast_forward_peak_bytes(cfg, torch.bfloat16, None, 1, 64) == whole
    assert len(calls) == 7
    calls.clear()
    autocast_cast_bytes(cfg, torch.bfloat16)
    assert len(calls) == 4
    calls.clear()
    autocast_extra_saved_bytes(cfg, torch.bfloat16, None, 1, 16)
    assert len(calls) == 14


def test_a_stack_of_two_kinds_is_traced_whole():
    """Layers that differ (Qwen2-MoE's dense mlp_only_layers, Qwen2's sliding-window layers past max_window_layers)
    are not one kind: no truncated trace; a uniform Llama and its LoRA-adapted copy are."""
    moe = Qwen2MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                         num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_experts=4,
                         num_experts_per_tok=2, mlp_only_layers=[1], max_position_embeddings=256)
    assert uniform_decoder_layers(build_meta_model(moe, torch.float32), moe) is None
    sliding = Qwen2Config(hidden_size=64, intermediate_size=172, num_hidden_layers=6, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, use_sliding_window=True, sliding_window=8,
                          max_window_layers=2, max_position_embeddings=256)
    assert uniform_decoder_layers(build_meta_model(sliding, torch.float32), sliding) is None
    llama = _llama()
    assert uniform_decoder_layers(build_meta_model(llama, torch.float32), llama) is not None
    assert uniform_decoder_layers(build_meta_model(_llama(4), torch.float32), _llama(4)) is None  # (4 layers: whole)


@pytest.mark.slow  # 3 s: four estimates (two precisions, each way)
def test_fast_path_gives_the_same_estimate(monkeypatch):
    """mixed_precision_estimate of a 6-layer Llama: every component, detail and note equal with the truncated traces
    and with the whole stack traced (uniform_decoder_layers answering None)."""
    import lowmem.memory.estimate as estimate
    from lowmem.cli_budget import mixed_precision_estimate

    cfg = _llama()
    kw = dict(optimizer="adamw", batch_size=1, seq_len=32, device="cpu")
    fast = mixed_precision_estimate(cfg, "bf16", **kw).to_dict()
    monkeypatch.setattr(estimate, "uniform_decoder_layers", lambda model, config: None)
    whole = mixed_precision_estimate(cfg, "bf16", **kw).to_dict()
    assert fast == whole
    assert fast["details"]["autocast_forward_peak"] > 0 and fast["details"]["autocast_extra_saved"] > 0
