"""MIXEDFIX: `lowmem budget --precision mixed`'s total against a measured autocast step (torch's MemTracker: a
dispatch-level count, the same on every machine), on a small Llama whose weights dominate its activations, and the
backward's moment of the mixed estimate as the pure-dtype run's moment plus what autocast saves beyond it."""

import pytest
import torch
from transformers import LlamaConfig


def _config():
    return LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.mark.slow  # 3 s: the autocast traces of the estimate and a measured step
def test_mixed_total_is_the_measured_step_peak():
    """Before (the float32 estimate's gradients_with_activations beside the autocast activations): 26,840,664 B for
    26,430,876 measured (1.0155); now 26,383,208 (0.9982: the step's moment, weights + state + every gradient; the
    estimate under it by the embedding's backward rounding)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import LlamaForCausalLM

    import lowmem
    from lowmem.cli_budget import mixed_precision_estimate

    cfg = _config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    opt = lowmem.create_optimizer(model, "adamw", lr=1e-3)
    opt.materialize_state()
    ids = torch.randint(0, cfg.vocab_size, (1, 16))

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
    est = mixed_precision_estimate(cfg, "bf16", optimizer="adamw", batch_size=1, seq_len=16, device="cpu")
    assert est.total == pytest.approx(measured, rel=0.01), (est.total, measured, est.details["gradients_with_activations"])


def test_mixed_backward_moment_is_the_pure_moment_plus_the_autocast_extra():
    """Each backward moment of the mixed run is the pure bf16 run's (activations a_m, bf16 gradients g_m) with the
    autocast extra X, float32 gradients (2 g_m) and the bf16 copies of the formed gradients' weights freed (g_m):
    (a_m + g_m) + X. So the mixed activations plus its gradients_with_activations are the pure run's plus X, the
    gradients' part the pure run's, in its own (and the GRPO/report) activation parts too."""
    from lowmem.cli_budget import mixed_gradients_with_activations, mixed_precision_estimate
    from lowmem.memory import estimate_memory

    cfg, kw = _config(), dict(optimizer="adamw", batch_size=1, seq_len=16, device="cpu")
    mixed = mixed_precision_estimate(cfg, "bf16", **kw)
    low = estimate_memory(cfg, dtype="bf16", **kw)
    early = mixed.details["gradients_with_activations"]
    assert early == low.details["gradients_with_activations"] == mixed.details["activation_parts"]["gradients_at_peak"]
    assert mixed.activations + early == low.activations + low.details["gradients_with_activations"] + mixed.details["autocast_extra_saved"]
    # gradient accumulation: every gradient with the activations (None) whatever the precision; quantized: the float32's
    assert mixed_gradients_with_activations(None, None, False) is None
    assert mixed_gradients_with_activations(7, 3, True) == 7 and mixed_gradients_with_activations(7, 3, False) == 3
