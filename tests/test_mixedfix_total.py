"""MIXEDFIX: `lowmem budget --precision mixed`'s total against measured autocast steps (torch's MemTracker: a
dispatch-level count, the same on every machine) on a small Llama, and what the mixed estimate takes for
the step's activations and gradients at their peak: since 2026-12-01 the autocast step traced (they were the
backward's moment, the pure-dtype run's plus what autocast saves beyond it, and the forward's end)."""

import pytest
import torch
from transformers import LlamaConfig


def _config():
    return LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False)


@pytest.mark.slow  # 3-5 s: the autocast traces of the estimate and a measured step
@pytest.mark.parametrize("seq_len", [16, 256])
def test_mixed_total_is_the_measured_step_peak(seq_len):
    """1 x 16 (weights dominate; the step's moment): 26,840,664 B for 26,430,876 measured (1.0155) with the float32
    estimate's gradients_with_activations, now 26,383,208 (0.9982). 1 x 256 (the forward's end, no gradient):
    32,968,024 for 32,717,156 (1.0077), 32,197,464 (0.984) without the forward's end, then 32,723,304 (1.0002). Since
    the plain case is the traced autocast step (2026-12-01): 1 x 16 26,431,392 (1.0000), 1 x 256 32,725,352 (1.0003)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import LlamaForCausalLM

    import lowmem
    from lowmem.cli_budget import mixed_precision_estimate

    cfg = _config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    opt = lowmem.create_optimizer(model, "adamw", lr=1e-3)
    opt.materialize_state()
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the fused kernel's first-step state
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    measured = sum(v.get("Total", 0) for v in tracker.get_tracker_snapshot("peak").values())
    est = mixed_precision_estimate(cfg, "bf16", optimizer="adamw", batch_size=1, seq_len=seq_len, device="cpu")
    assert est.total == pytest.approx(measured, rel=0.01), (est.total, measured, est.details["gradients_with_activations"])


def test_autocast_forward_peak_is_a_real_forwards():
    """The traced forward's end (fake tensors) is the most activation bytes a real CPU autocast forward of the float32
    model holds, its loss included (MemTracker's ACT peak): 12,942,352 B both at 1 x 256."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    from transformers import LlamaForCausalLM

    from lowmem.cli_budget import autocast_forward_peak_bytes

    cfg = _config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().train()
    ids = torch.randint(0, cfg.vocab_size, (1, 256))
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    del out
    measured = tracker.get_tracker_snapshot("peak")[torch.device("cpu")][_MemRefType.ACT]
    assert autocast_forward_peak_bytes(cfg, torch.bfloat16, None, 1, 256) == measured


@pytest.mark.parametrize("seq_len", [16, 256])
def test_plain_mixed_activations_are_the_traced_autocast_step(seq_len):
    """Without checkpointing, quantization or a trainer the mixed run's activations and the gradients at their peak
    are the autocast step's, traced (``autocast_step_bytes``: forward and loss under autocast, backward outside, on
    fake tensors), as for checkpointed and quantized runs; equal to MemTracker's measured activations + gradients at
    the step's peak (1 x 16: 6,656,200 B; 1 x 256: 12,944,400). Before 2026-12-01 (FOUND_EST12 2) they were the pure
    bf16 run's moment plus the autocast extra, or the traced forward's end: 5,557,120 and 12,942,352."""
    from lowmem.cli_budget import autocast_step_bytes, mixed_gradients_with_activations, mixed_precision_estimate

    cfg, kw = _config(), dict(optimizer="adamw", batch_size=1, seq_len=seq_len, device="cpu")
    mixed = mixed_precision_estimate(cfg, "bf16", **kw)
    step = autocast_step_bytes(cfg, torch.bfloat16, None, 1, seq_len, False)
    assert mixed.details["autocast_step"]["total"] == step["total"]
    early = mixed.details["gradients_with_activations"]
    ids = 8 * seq_len  # the trace's token ids: the batch's input_ids, counted in batch_input_bytes, not twice (EST19)
    assert mixed.activations == step["total"] - ids
    assert early == min(mixed.gradients, step["backward_peak"] - step["total"])
    assert mixed.activations + early == step["backward_peak"] - ids
    assert mixed.activations >= mixed.details["autocast_forward_peak"]  # (the step's forward holds its end)
    assert mixed.details["activation_parts"]["gradients_at_peak"] == early
    assert any("step under bfloat16 autocast, traced" in n for n in mixed.notes)
    # gradient accumulation: every gradient with the activations (None) whatever the precision; quantized: the float32's
    assert mixed_gradients_with_activations(None, None, False) is None
    assert mixed_gradients_with_activations(7, 3, True) == 7 and mixed_gradients_with_activations(7, 3, False) == 3
