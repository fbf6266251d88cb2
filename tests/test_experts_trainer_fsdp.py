"""Tiny MoE models (transformers' Mixtral, and Qwen2-MoE with its shared expert; fused experts ``gate_up_proj
[4, 64, 64]``, ``down_proj [4, 64, 32]`` per layer, built from a config, offline: tests/trainer_fsdp_script.py
``build_moe``) trained by the HF Trainer
(``LowMemTrainer``, ``lowmem_optim=...``) under accelerate's FSDP2 plugin, as a user runs it:
``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` (here with ``SHARDED_STATE_DICT``: the optimizer's
pieces in torch.distributed.checkpoint directories) on 2 CPU processes over gloo (accelerate's FSDP branch applied to
CPU processes: tests/accelerate_fsdp_cpu.py). FSDP2 shards every parameter on dimension 0, so each rank holds 2 whole
experts of 4 and steps them alone.

Each run: 4 steps of global batch 8 (4 sequences per process), checkpoints at steps 2 and 4, then a model with other
weights resumed from ``checkpoint-2``, against one process with the whole batch of 8 (in this process): the logged
losses within 1e-6 relative, the weights within 1e-6, the resumed run's weights bit for bit (``check_run`` of
tests/test_trainer_fsdp.py). The tolerance: float64 weights and float32 optimizer state, so the runs differ only by the
summation order of the two halves' gradients (FSDP2's reduce-scatter, ~1e-11 in a gradient here) and of the per-shard
reductions; measured as below. A routing decision taken otherwise (a top-2 choice flipped) or a state entry of another
rank's expert would be off by 1e-3 or more. The default suite runs ``moe_galore_adamw`` in test_trainer_fsdp.py's one
launch (the shipped ``FULL_STATE_DICT`` configuration); this file is ``slow`` (one launch of 9 runs, ~90 s on 2 busy
cores; `lowmem train` on a MoE model directory, 3 launches, ~85 s).
"""

from __future__ import annotations

import pytest

from test_trainer_fsdp import accelerate_launch, check_run, reference, sharded_config  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# GaLore (rank 2: every refresh's subspace set by the data, see trainer_fsdp_script.RUNS), APOLLO (random bases seeded
# by each expert's index in the whole stack), 8-bit AdamW (blocks of 64) and MicroAdam (blocks of 32) on the experts'
# local shards (every shard holds whole blocks)
MOE = ["moe_galore_adamw", "moe_apollo_adamw", "moe_adamw8bit", "moe_microadam",
       # a tiny Qwen2-MoE: the experts beside a shared expert, whose 1-row gate [1, 64] leaves rank 1 an empty shard
       "qwen_moe_galore_adamw", "qwen_moe_adamw8bit"]
# float32 weights and transformers' default experts kernel (grouped_mm), as a user runs it
FP32 = ["moe_torch_adamw_fp32", "moe_galore_fp32", "moe_adamw8bit_fp32"]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experts_trainer_fsdp")
    accelerate_launch(sharded_config(out), "trainer_fsdp_script.py", str(out), *MOE, *FP32)
    return out


@pytest.mark.parametrize("tag", MOE)
def test_moe_trainer_fsdp2_matches_one_process_and_resumes_exactly(moe_run, reference, tag):
    """Measured: max |weight difference| from one process 5.3e-9 GaLore, 3.4e-8 APOLLO, 0.0 adamw8bit and
    MicroAdam; losses within 2.4e-7 relative; this rank's state 0.53 / 0.55 / 0.50 / 0.50 of one process's (GaLore's and
    APOLLO's bases of the attention weights kept whole on every rank); the experts' stacked state (moments,
    bases, ``proj_meta``) holds the rank's 2 experts; every resume bit for bit through the DCP checkpoint. The tiny
    Qwen2-MoE: GaLore 6.4e-9 (its 1-row shared-expert gate trained full-rank, a warning says so), adamw8bit 0.0;
    0.54 / 0.50 of one process's state.
    Mutation: each expert seeded by its index on the rank (``sharded.matrix_offsets`` all 0): APOLLO 6.6e-2 (red)."""
    assert sorted(p.name for p in (moe_run / tag / "checkpoint-2" / "optimizer_0").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]
    check_run(moe_run, tag, reference)


def test_moe_trainer_fsdp2_float32_grouped_mm(moe_run, reference):
    """float32 weights through ``grouped_mm`` (the experts kernel transformers picks): the reduce-scatter's summation
    order now shows at float32's resolution, amplified by Adam's first nearly-sign steps, so the yardstick is the
    Trainer's own ``torch.optim.AdamW`` in the same FSDP2 run (measured 4.0e-6 from one process). GaLore stays within
    1.5 x that (measured 4.8e-7); 8-bit AdamW within 1e-3 (measured 5.2e-5: a 1-ulp gradient difference moves a
    value across an 8-bit code boundary, a step of 1/127 of its block's absmax; an expert's state from another rank, or
    a flipped top-2 choice, is off by 1e-2 and more); losses within 1e-5 relative (measured <= 2.4e-7); every resume
    bit for bit."""
    torch_run = check_run(moe_run, "moe_torch_adamw_fp32", reference, loss_rtol=1e-5, weight_atol=1e-3)
    galore = check_run(moe_run, "moe_galore_fp32", reference, loss_rtol=1e-5, weight_atol=1e-3, bytes_ratio=0.56)
    assert galore["weight_diff"] <= 1.5 * torch_run["weight_diff"], (galore["weight_diff"], torch_run["weight_diff"])
    check_run(moe_run, "moe_adamw8bit_fp32", reference, loss_rtol=1e-5, weight_atol=1e-3)


LOWMEM_RECIPE = ("model: {model}\noptim: galore_adamw\noptim_args: {{rank: 2, update_proj_gap: 2}}\nlr: 0.01\ntrain_size: 32\n"
                 "eval_size: 8\nsteps: 4\nsave_steps: 2\nlogging_steps: 1\ntrack_memory: false\n")


def test_lowmem_train_moe_under_fsdp2(tmp_path):
    """`lowmem train` on a local MoE model directory (the tiny Mixtral saved with ``save_pretrained``: float32,
    transformers' default experts kernel, written in Mixtral's per-expert layout ``block_sparse_moe.experts.N.w1``)
    under the shipped configuration and under ``SHARDED_STATE_DICT`` (where `lowmem train` gathers and saves the final
    model itself): the final model has one process's keys and weights (measured 1.05e-6; the float32 tolerance of
    test_trainer_fsdp's `lowmem train` tests) and loads back with ``from_pretrained``; checkpoints complete;
    process 0 holds 0.53 of one process's state; ``--resume`` from checkpoint-2 ends bit for bit."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lowmem.train import checkpoint_missing, load_recipe, run
    from test_trainer_fsdp import CONFIG
    from trainer_fsdp_script import build_moe

    model, tok = build_moe(0, torch.float32)
    model.save_pretrained(tmp_path / "mixtral")
    tok.save_pretrained(tmp_path / "mixtral")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(LOWMEM_RECIPE.format(model=tmp_path / "mixtral"))
    run(load_recipe(recipe, batch_size=8, output_dir=str(tmp_path / "one")))
    one_w = load_file(tmp_path / "one" / "model.safetensors")
    assert any(".block_sparse_moe.experts.0.w1." in k for k in one_w), sorted(one_w)[:5]
    for config, name in ((CONFIG, "two"), (sharded_config(tmp_path), "sharded")):
        out = tmp_path / name
        accelerate_launch(config, "lowmem_train_fsdp_cpu.py", "train", str(recipe), "--batch-size", "4", "--output-dir", str(out))
        assert checkpoint_missing(out / "checkpoint-2") == [] and checkpoint_missing(out / "checkpoint-4") == []
        got = load_file(out / "model.safetensors")
        assert got.keys() == one_w.keys()
        for k in one_w:
            torch.testing.assert_close(got[k], one_w[k], rtol=1e-4, atol=5e-5, msg=k)
        one_m, two_m = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "one", out))
        assert two_m["optimizer_state_bytes"] < 0.56 * one_m["optimizer_state_bytes"], (two_m, one_m)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    reference_model = AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    for (k, a), b in zip(loaded.state_dict().items(), reference_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5, msg=k)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-2", resumed / "checkpoint-2")
    accelerate_launch(CONFIG, "lowmem_train_fsdp_cpu.py", "train", str(recipe), "--resume", "--batch-size", "4",
                      "--output-dir", str(resumed))
    assert json.loads((resumed / "metrics.json").read_text())["resumed_from"] == str(resumed / "checkpoint-2")
    two_w, res_w = load_file(tmp_path / "two" / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in two_w:
        assert torch.equal(res_w[k], two_w[k]), k
