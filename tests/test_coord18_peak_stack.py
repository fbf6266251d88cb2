"""The bar chart's stack of the peak sums to the estimate's total for layerwise + gradient accumulation too
(FOUND_PEAKFIX 1: the loss's moment holds every kept gradient)."""
import pytest
from transformers import MixtralConfig

from lowmem.memory.estimate import estimate_memory
from lowmem.memory.report import peak_stack


@pytest.mark.parametrize("accumulation,seq_len", [(1, 256), (2, 64), (2, 256)])
def test_layerwise_peak_stack_sums_to_the_total(accumulation, seq_len):
    cfg = MixtralConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512)
    e = estimate_memory(cfg, "adafactor", batch_size=2, seq_len=seq_len, dtype="bf16", device="cpu", layerwise=True,
                        gradient_accumulation_steps=accumulation)
    assert sum(peak_stack(e.components(), **e.peak_args()).values()) == e.total
