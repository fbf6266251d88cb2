"""FOUND_NEWFIX 3 (SMALLS): a quantized run without ``lora`` trains lowmem.quant.DEFAULT_LORA's adapters; the early meta
check (lowmem.train.check_optimizer_on_meta) attaches the same ones, so a subspace rank too large for them is refused
before a 4-bit model loads, with the message the build over the real adapters gives."""

import warnings

import pytest

from lowmem.optim import create_optimizer
from lowmem.train import TrainRecipe, build_training_args, check_optimizer_on_meta


def _error(build):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build()
    except ValueError as err:
        return str(err)
    return None


def test_load_quantized_model_uses_the_exported_default(monkeypatch):
    """The default is the constant (not a second literal): load_quantized_model attaches DEFAULT_LORA's adapters."""
    import lowmem.quant

    assert dict(lowmem.quant.DEFAULT_LORA) == {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
    with pytest.raises(TypeError):
        lowmem.quant.DEFAULT_LORA["r"] = 8  # read-only: nobody changes every run's default by accident
    monkeypatch.setattr(lowmem.quant, "DEFAULT_LORA", {"r": 3, "lora_alpha": 6, "target_modules": ["q_proj"]})
    seen = []
    monkeypatch.setattr(lowmem.quant, "attach_lora", lambda model, cfg: seen.append(cfg) or model)
    import peft
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", lambda m, **k: m)
    monkeypatch.setattr(lowmem.quant, "bnb_config", lambda *a, **k: None)
    monkeypatch.setattr(lowmem.quant, "keep_4bit_trainable_on_cpu", lambda m: None)
    monkeypatch.setattr(lowmem.quant, "check_some_layer_quantized", lambda m, q: 1)  # (the stand-in model has no layers)
    lowmem.quant.load_quantized_model(".", gradient_checkpointing=False, device="cpu")
    assert seen[0].r == 3 and seen[0].target_modules == {"q_proj"}


@pytest.mark.parametrize("rank", [8, 15, 16, 32])
def test_default_adapters_are_checked_on_meta(rank):
    """nf4 without lora: galore's rank against the r=16 default adapters (16 x 64 and 64 x 16 on the tiny Llama) is
    refused exactly when the build over the tiny model with those adapters refuses it (rank >= 16)."""
    from lowmem.kit import build_tiny_model
    from lowmem.quant import DEFAULT_LORA, attach_lora
    from lowmem.train import lora_config

    recipe = TrainRecipe(optim="galore_adamw", optim_args={"rank": rank}, lr=1e-3, steps=1, quantization="nf4")
    model = attach_lora(build_tiny_model(seed=0)[0], lora_config(dict(DEFAULT_LORA)))
    real = _error(lambda: create_optimizer(model, "galore_adamw", lr=1e-3, rank=rank))
    meta = _error(lambda: check_optimizer_on_meta(recipe, build_training_args(recipe)))
    assert meta == real and (real is None) == (rank < 16), (rank, meta, real)
