"""The batch the training loop holds through the step (ESTIDS, issue 12): the token ids (and the collator's labels and
attention mask) are live at every moment of the step, the optimizer's step included, where no component held them.
The estimate was under the measured peak by the ids (8 B per token) and a few scalars; it now counts the Trainer's
three int64 tensors per token for each micro-batch of the step (``details["batch_input_bytes"]``)."""

from __future__ import annotations

import warnings

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def test_the_batch_inputs_are_counted_at_every_moment():
    from transformers import Qwen2Config

    from lowmem.memory import estimate_memory
    from lowmem.memory.estimate import peak_total
    from lowmem.memory.report import peak_stack

    config = Qwen2Config(**TINY, tie_word_embeddings=False)
    est = estimate_memory(config, "adamw", batch_size=2, seq_len=32, dtype="bf16", gradient_accumulation_steps=3)
    # input_ids, attention_mask, labels (int64) of each of the step's 3 micro-batches of 2 x 32 tokens
    assert est.details["batch_input_bytes"] == 3 * 8 * 2 * 32 * 3
    args = est.peak_args()
    assert args["inputs"] == est.details["batch_input_bytes"]
    without = peak_total(est.components(), **{**args, "inputs": 0})
    assert est.total == without + est.details["batch_input_bytes"]
    # the chart's stack sums to the total (the inputs shown in activations, as the tracker labels them)
    assert sum(peak_stack(est.components(), **args).values()) == est.total
    # DPO: a chosen and a rejected sequence per pair
    dpo = estimate_memory(config, "adamw", batch_size=2, seq_len=32, dtype="bf16", trainer="dpo")
    assert dpo.details["batch_input_bytes"] == 3 * 8 * (2 * 2) * 32


def test_never_under_the_measured_peak_by_the_ids():
    """bf16 and fp32 Qwen2 (the Llama formula), 1 x 64 tokens: before, the estimate was 520 / 524 B under the measured
    peak (the measurement's ids, 512 B, and a scalar); now over by what the Trainer's collator holds beyond them
    (labels and attention mask, 16 B per token) less those 8-12 B."""
    from transformers import Qwen2Config

    from lowmem.memory.measure import measure_memory

    for dtype in ("bf16", "fp32"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = measure_memory(Qwen2Config(**TINY, tie_word_embeddings=False), "adamw", batch_size=1, seq_len=64,
                               dtype=dtype, steps=2, device="cpu")
        over = r.estimate.total - r.measured["total"]
        assert 0 <= over <= 16 * 64 + 64, (dtype, over, r.table())


def test_the_tracker_holds_no_module_input_gradient():
    """Mamba2 (h=64, 2 layers, 4 heads of 32, state 8), AdamW fp32, 1 x 64 tokens: torch's ModTracker (inside the
    measurement's MemTracker) held a module input's gradient until all of the module's inputs had one (the gated norm's
    two inputs): the measured activations at the peak were 32,768 B (512 B per token) above the same step run without
    the tracker (10,404,624 B, which the trace counts), and the estimate's total 31,232 B under (one step)."""
    from transformers import Mamba2Config

    from lowmem.memory.measure import measure_memory

    config = Mamba2Config(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=32, state_size=8,
                          n_groups=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = measure_memory(config, "adamw", batch_size=1, seq_len=64, dtype="fp32", steps=1, device="cpu")
    over = r.estimate.total - r.measured["total"]
    assert 0 <= over <= r.estimate.details["batch_input_bytes"] + 64, (over, r.table())
