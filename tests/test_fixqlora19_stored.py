"""FIXQLORA19 (AUDQLORA19 5, 6, 9): a checkpoint stored quantized (config.json with a bitsandbytes
``quantization_config``, as '...-bnb-4bit' checkpoints) is read before the model loads (lowmem.quant.stored_quantization):
another ``quantization`` type is refused naming both; ``lora`` alone takes the stored quantization (k-bit preparation, the
CPU packing guard); a full fine-tune and ``merge_adapters`` are refused naming the field."""

import json
import warnings

import pytest

from lowmem.config import ConfigError

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "float32"}
INT8 = {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 5.0}
LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


def _dir(tmp_path, qc, name="m"):
    """A model directory as check_model_dir sees it: config.json (with ``qc`` as quantization_config) and a
    tokenizer file; nothing here loads it."""
    path = tmp_path / name
    path.mkdir()
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    if qc is not None:
        cfg["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "tokenizer.json").write_text("{}")
    return str(path)


def _recipe(**fields):
    from lowmem.train import TrainRecipe

    return TrainRecipe(**{"lr": 1e-3, **fields})


def test_stored_quantization_reads_the_config(tmp_path):
    from lowmem.quant import stored_quantization

    nf4 = stored_quantization(_dir(tmp_path, NF4, "nf4"))
    assert (nf4.quant_type, nf4.double_quant) == ("nf4", False)
    int8 = stored_quantization(_dir(tmp_path, INT8, "int8"))
    assert (int8.quant_type, int8.threshold) == ("int8", 5.0)
    assert stored_quantization(_dir(tmp_path, None, "plain")) is None
    assert stored_quantization(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="quant_method='gptq'.*bitsandbytes"):
        stored_quantization(_dir(tmp_path, {"quant_method": "gptq", "bits": 4}, "gptq"))


@pytest.mark.parametrize("asked, qc, stored", [("int8", NF4, "nf4"), ("fp4", NF4, "nf4"), ("nf4", INT8, "int8"),
                                               ({"quant_type": "int8", "threshold": 5.0}, NF4, "nf4")])
def test_another_quantization_type_is_refused_before_loading(tmp_path, asked, qc, stored):
    """The recipe and load_quantized_model refuse it (nothing loads: the directory holds no weights)."""
    from lowmem.quant import load_quantized_model

    path = _dir(tmp_path, qc)
    want = asked if isinstance(asked, str) else asked["quant_type"]
    with pytest.raises(ConfigError, match=rf"quantization='{want}'.*stored '{stored}'") as err:
        _recipe(model=path, quantization=asked, lora=LORA)
    assert "model=" in str(err.value)
    with pytest.raises(ValueError, match=rf"quantization='{want}'.*stored '{stored}'"):
        load_quantized_model(path, asked, lora=LORA, dtype="float32")


def test_same_type_is_accepted(tmp_path):
    r = _recipe(model=_dir(tmp_path, NF4), quantization="nf4", lora=LORA)
    assert r.quantization == "nf4" and getattr(r, "quantization_source", None) is None


@pytest.mark.parametrize("qc, expected", [(NF4, {"quant_type": "nf4", "double_quant": False}),
                                          (INT8, {"quant_type": "int8", "threshold": 5.0})])
def test_lora_alone_takes_the_stored_quantization(tmp_path, qc, expected):
    r = _recipe(model=_dir(tmp_path, qc), lora=LORA)
    assert r.quantization == expected and r.quantization_source == "model"


def test_full_fine_tune_of_a_stored_quantized_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="stored nf4.*full fine-tune.*set lora.*quantization: nf4"):
        _recipe(model=_dir(tmp_path, NF4))


@pytest.mark.parametrize("fields", [dict(quantization="nf4", lora=LORA), dict(lora=LORA), dict(quantization="nf4")])
def test_merge_adapters_on_a_stored_quantized_model_is_refused(tmp_path, fields):
    with pytest.raises(ConfigError, match="merge_adapters=true.*stored nf4.*unquantized checkpoint"):
        _recipe(model=_dir(tmp_path, NF4), merge_adapters=True, **fields)


def test_other_quant_method_is_refused_by_the_recipe(tmp_path):
    with pytest.raises(ConfigError, match="model=.*quant_method='awq'"):
        _recipe(model=_dir(tmp_path, {"quant_method": "awq", "bits": 4}), lora=LORA)


def test_plain_checkpoint_is_untouched(tmp_path):
    r = _recipe(model=_dir(tmp_path, None), lora=LORA, merge_adapters=True)
    assert r.quantization is None


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory, own_model_dir):
    """The tiny Llama saved 4-bit (nf4) by transformers + bitsandbytes."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = transformers.AutoModelForCausalLM.from_pretrained(
            own_model_dir, quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            device_map={"": "cpu"})
        path = tmp_path_factory.mktemp("nf4-model")
        m.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(own_model_dir).save_pretrained(path)
    return str(path)


def test_lora_alone_on_a_stored_nf4_dir_gets_kbit_preparation(nf4_dir, capsys):
    """load_policy goes through load_quantized_model: every 4-bit layer has the CPU packing guard (on any CPU), the
    non-quantized parameters are float32 (prepare_model_for_kbit_training), a note names the stored quantization."""
    import bitsandbytes as bnb

    from lowmem.quant import quantized_modules
    from lowmem.train import load_policy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, _ = load_policy(_recipe(model=nf4_dir, lora=LORA))
    layers = quantized_modules(model)
    assert layers and all(isinstance(m, bnb.nn.Linear4bit) and m.support_avx512bf16_for_cpu is False
                          for m in layers.values())
    assert "is stored quantized" in capsys.readouterr().out
