"""``--precision mixed`` (float32 master weights, bf16 autocast): the bf16 copies autocast makes of the weights are
those of every operand of its matmul ops, whatever the module (GPT-2's ``Conv1D`` runs ``torch.addmm``; once only
``nn.Linear`` weights were counted), checked against a measured autocast run of a tiny GPT-2."""

from __future__ import annotations

import torch

from lowmem.cli_budget import mixed_precision_estimate
from lowmem.memory.estimate import autocast_cast_bytes


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=1000, n_embd=256, n_layer=2, n_head=4, n_positions=64)


def test_autocast_copies_are_every_matmul_operand():
    """GPT-2: each Conv1D's weight and bias (``addmm``) and the tied head (``linear`` on ``wte``); not the position
    table (an embedding lookup) nor the layer norms. A Mixtral's fused experts: not at all under grouped_mm (transformers
    5's default experts kernel casts its input to the float32 weight; before, the estimate ran the eager loop and
    counted a copy of every expert weight), per expert slice in the eager loop."""
    from transformers import GPT2LMHeadModel, MixtralConfig

    config = _gpt2_config()
    copies = autocast_cast_bytes(config, torch.bfloat16)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    expected = {n: 2 * p.numel() for n, p in model.named_parameters() if ".c_" in n or n == "transformer.wte.weight"}
    assert copies == expected and len(expected) == 2 * 8 + 1
    assert autocast_cast_bytes(config, torch.float16) == expected

    moe = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4)
    copies = autocast_cast_bytes(moe, torch.bfloat16)
    assert not any("experts" in n for n in copies) and "model.layers.0.self_attn.q_proj.weight" in copies
    moe._experts_implementation = "eager"
    copies = autocast_cast_bytes(moe, torch.bfloat16)
    assert copies["model.layers.0.mlp.experts.gate_up_proj"] == 2 * 4 * 128 * 32
    assert copies["model.layers.0.mlp.experts.down_proj"] == 2 * 4 * 32 * 64
    assert "model.embed_tokens.weight" not in copies and "model.norm.weight" not in copies


def _measure_autocast(config, batch_size, seq_len, optimizer="adafactor"):
    from transformers import GPT2LMHeadModel

    from lowmem.memory.measure import PeakTracker
    from lowmem.optim import create_optimizer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    opt = create_optimizer(model, optimizer)
    opt.materialize_state()
    gen = torch.Generator().manual_seed(0)
    tracker = PeakTracker(model, opt)
    with tracker:
        for _ in range(2):  # what the Trainer's bf16=True runs: the forward under autocast, the backward outside
            ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
            tracker.next_step()
    return tracker.maxima


def test_mixed_precision_activations_of_a_gpt2_within_10_percent():
    """Measured (CPU autocast, 2 steps, batch 4 x 64): activations 17.58 MiB; estimated 17.31 (0.985; 16.57, 0.94,
    before the float32 residual stream's tensors were counted, tests/test_memory_mixed_residual.py). With only
    nn.Linear weights counted (the tied head) 13.07 (0.74)."""
    config = _gpt2_config()
    measured = _measure_autocast(config, 4, 64)
    est = mixed_precision_estimate(config, "bf16", optimizer="adafactor", batch_size=4, seq_len=64, device="cpu")
    ratio = est.activations / measured["activations"]
    assert 0.9 <= ratio <= 1.1, (est.activations, measured["activations"])
    assert est.details["autocast_weight_copies"] == sum(autocast_cast_bytes(config, torch.bfloat16).values())
