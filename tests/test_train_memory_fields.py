"""`lowmem train` recipe fields for memory: quantization (QLoRA), lora, gradient_checkpointing,
layerwise, for SFT and the TRL trainers."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowmem.train import load_recipe, run

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_qlora_recipe_trains_adapters_of_a_4bit_model(tmp_path):
    m = run(load_recipe(CONFIGS / "qlora.yaml", steps=30, output_dir=str(tmp_path)))
    assert m["quantization"] == "nf4" and m["lora"]["r"] == 8
    assert m["final_loss"] < m["initial_loss"] - 0.2
    # LoRA r=8 on the 7 linear layers of 2 blocks (hidden 64): only adapters are trainable
    assert 0 < m["trainable_params"] < 0.25 * 83_392
    assert (tmp_path / "metrics.json").is_file()
    # the adapter's base model is saved with the run's outputs, not in a temporary folder
    import json

    base = json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base) == tmp_path.resolve() / "base_model" and (Path(base) / "config.json").is_file()


# DPO (a reference pass) and GRPO (generation) in the default run; GVPO and BNPO are GRPO's trainer with another
# loss on the same 4-bit model with adapters: slow (their recipes run in tests/test_trl_recipes.py)
@pytest.mark.parametrize("trainer", ["dpo", "grpo", pytest.param("gvpo", marks=pytest.mark.slow),
                                     pytest.param("bnpo", marks=pytest.mark.slow)])
def test_trl_trainers_run_on_a_4bit_model_with_adapters(tmp_path, trainer):
    extra = {"training_args": {"num_generations": 4, "max_completion_length": 6}} if trainer != "dpo" else {}
    recipe = load_recipe(
        CONFIGS / f"{trainer}.yaml", steps=2, batch_size=4, train_size=16, output_dir=str(tmp_path),
        save_model=False, **extra,
    )
    recipe.quantization, recipe.lora = "nf4", {"r": 4, "target_modules": "all-linear"}
    m = run(recipe)
    assert m["steps"] == 2 and m["trainable_params"] < 0.25 * 83_392
    assert m["optimizer_state_bytes"] > 0
    assert m["optimizer_state_sharded"] is False  # one process: the whole state
    # peak memory by component (MemoryCallback, on by default), through generation and reference passes
    assert all(m["memory"][k] > 0 for k in ("weights", "gradients", "optimizer_states", "activations", "peak"))


def test_lora_without_quantization_and_layerwise_checkpointing(tmp_path):
    m = run(load_recipe(None, steps=20, output_dir=str(tmp_path), save_model=False, lr=0.05,
                        lora={"r": 8, "target_modules": ["q_proj", "v_proj"]}))
    # r * (in + out) per adapted layer: q_proj 64 -> 64, v_proj 64 -> 32 (2 kv heads x 16), 2 layers
    assert m["final_loss"] < m["initial_loss"] and m["trainable_params"] == 2 * (8 * (64 + 64) + 8 * (64 + 32))
    m = run(load_recipe(None, steps=10, output_dir=str(tmp_path / "lw"), save_model=False,
                        layerwise=True, gradient_checkpointing=True))
    assert m["layerwise"] is True and m["final_loss"] < m["initial_loss"]


@pytest.mark.parametrize("key, value, match", [
    ("quantization", "int3", "nf4"),
    ("lora", {"rank": 8}, "valid"),
])
def test_bad_memory_fields_are_clear_errors(key, value, match):
    with pytest.raises(ValueError, match=match):
        load_recipe(None, **{key: value})
