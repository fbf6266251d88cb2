"""DISTFIX: what accelerate's launch environment asks for, checked before any model loads (FOUND_DIST18 1-3)."""

import pytest

from lowmem.config import ConfigError


def test_accelerate_fp16_on_cpu_refused_by_the_trainers_config_and_bf16_wins(tmp_path, monkeypatch):
    """LowMemTrainingArguments (the Python API) refuses accelerate's fp16 on the CPU as lowmem train does; with bf16
    set TrainingArguments takes bf16 over the variable, so nothing is refused; without the variable nothing is."""
    import lowmem.train
    from lowmem.trainers import LowMemTrainingArguments

    monkeypatch.setattr(lowmem.train, "_accelerator_visible", lambda: False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    LowMemTrainingArguments(output_dir=str(tmp_path), lowmem_optim="adamw", report_to=[])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match=r"LowMemTrainingArguments\.mixed_precision: fp16 from accelerate"):
        LowMemTrainingArguments(output_dir=str(tmp_path), lowmem_optim="adamw", report_to=[])
    args = LowMemTrainingArguments(output_dir=str(tmp_path), lowmem_optim="adamw", report_to=[], bf16=True, use_cpu=True)
    assert args.mixed_precision == "bf16"


@pytest.fixture
def fsdp_env(monkeypatch):
    """A GPU machine assumed; no launcher variables from the calling shell."""
    import lowmem.train

    for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP", "FSDP_ACTIVATION_CHECKPOINTING", "WORLD_SIZE",
              "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(lowmem.train, "_accelerator_visible", lambda: True)
    return monkeypatch


def test_layerwise_under_fsdp_refused_naming_the_key_the_user_wrote(tmp_path, fsdp_env):
    """Both ways of asking for layerwise mode (training_args' lowmem_layerwise becomes the recipe's layerwise in
    load_recipe), both ways of asking for FSDP; without FSDP it builds."""
    from lowmem.train import build_training_args, load_recipe

    out = str(tmp_path / "out")
    build_training_args(load_recipe(None, optim="adamw", steps=2, layerwise=True, output_dir=out))
    fsdp_env.setenv("ACCELERATE_USE_FSDP", "true")
    build_training_args(load_recipe(None, optim="adamw", steps=2, output_dir=out))  # FSDP alone: no refusal
    with pytest.raises(ConfigError, match=r"^layerwise: true \(layerwise mode\) does not work under FSDP "
                                          r"\(ACCELERATE_USE_FSDP=true"):
        build_training_args(load_recipe(None, optim="adamw", steps=2, layerwise=True, output_dir=out))
    fsdp_env.delenv("ACCELERATE_USE_FSDP")
    recipe = load_recipe(None, optim="adamw", steps=2, output_dir=out,
                         training_args={"lowmem_layerwise": True, "fsdp": "full_shard"})
    with pytest.raises(ConfigError, match=r"^layerwise: true .* under FSDP \(training_args.fsdp="
                                          r"'full_shard'\)"):
        build_training_args(recipe)


def test_fsdp_activation_checkpointing_with_gradient_checkpointing_names_both(tmp_path, fsdp_env):
    """The accelerate config's fsdp_activation_checkpointing (only under FSDP) or fsdp_config's
    activation_checkpointing, with the recipe's gradient_checkpointing or training_args' own; each alone builds."""
    from lowmem.train import build_training_args, load_recipe

    out = str(tmp_path / "out")
    fsdp_env.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    build_training_args(load_recipe(None, optim="adamw", steps=2, gradient_checkpointing=True, output_dir=out))
    fsdp_env.setenv("ACCELERATE_USE_FSDP", "true")
    build_training_args(load_recipe(None, optim="adamw", steps=2, output_dir=out))  # FSDP's checkpointing alone
    with pytest.raises(ConfigError, match=r"^training_args.gradient_checkpointing=true and fsdp_activation_"
                                          r"checkpointing: true in the accelerate config .* keep one"):
        build_training_args(load_recipe(None, optim="adamw", steps=2, output_dir=out,
                                        training_args={"gradient_checkpointing": True}))
    fsdp_env.delenv("ACCELERATE_USE_FSDP")
    recipe = load_recipe(None, optim="adamw", steps=2, gradient_checkpointing=True, output_dir=out, training_args={
        "fsdp": "full_shard", "fsdp_config": {"version": 2, "activation_checkpointing": True}})
    with pytest.raises(ConfigError, match=r"^gradient_checkpointing: true \(the recipe\) and training_args.fsdp_config"
                                          r".activation_checkpointing=true"):
        build_training_args(recipe)
    recipe = load_recipe(None, optim="adamw", steps=2, output_dir=out, training_args={
        "fsdp": "full_shard", "fsdp_config": {"version": 2, "fsdp_activation_checkpointing": True},
        "activation_checkpointing": True})
    with pytest.raises(ConfigError, match=r"^training_args.activation_checkpointing=true and training_args.fsdp_config"
                                          r".fsdp_activation_checkpointing=true"):
        build_training_args(recipe)
