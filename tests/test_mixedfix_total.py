"""MIXEDFIX: `lowmem budget --precision mixed`'s total against measured autocast steps (torch's MemTracker: a
dispatch-level count, the same on every machine) on a small Llama, and the two moments the mixed estimate combines:
the backward's (the pure-dtype run's moment plus what autocast saves beyond it) and the forward's end (traced)."""

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
    32,968,024 for 32,717,156 (1.0077), 32,197,464 (0.984) without the forward's end, now 32,723,304 (1.0002)."""
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
def test_mixed_moments_are_the_backward_and_the_forward_end(seq_len):
    """Each backward moment of the mixed run is the pure bf16 run's (activations a_m, bf16 gradients g_m) with the
    autocast extra X, float32 gradients (2 g_m) and the bf16 copies of the formed gradients' weights freed (g_m):
    (a_m + g_m) + X. The forward's end F (traced) holds no gradient. So the activations are max(a + X, F) and the
    backward's moment a + X + the pure run's gradients_with_activations (1 x 16: the backward's; 1 x 256: F)."""
    from lowmem.cli_budget import mixed_gradients_with_activations, mixed_precision_estimate
    from lowmem.memory import estimate_memory

    cfg, kw = _config(), dict(optimizer="adamw", batch_size=1, seq_len=seq_len, device="cpu")
    mixed = mixed_precision_estimate(cfg, "bf16", **kw)
    low = estimate_memory(cfg, dtype="bf16", **kw)
    early, backward = mixed.details["gradients_with_activations"], low.activations + mixed.details["autocast_extra_saved"]
    forward_end = mixed.details["autocast_forward_peak"]
    assert (forward_end > backward) == (seq_len == 256)
    assert mixed.activations == max(backward, forward_end)
    assert mixed.activations + early == max(backward + low.details["gradients_with_activations"], forward_end)
    assert mixed.details["activation_parts"]["gradients_at_peak"] == early
    # gradient accumulation: every gradient with the activations (None) whatever the precision; quantized: the float32's
    assert mixed_gradients_with_activations(None, None, False) is None
    assert mixed_gradients_with_activations(7, 3, True) == 7 and mixed_gradients_with_activations(7, 3, False) == 3
