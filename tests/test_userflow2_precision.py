"""A TRL / HF Trainer config's precision and generation fields that cannot apply on this machine: each is one error
naming the field before the model loads (before: ``fp16: true`` on the CPU trained in float32 without a word;
``bf16_full_eval: true`` on the CPU was transformers' "Your setup doesn't support bf16/gpu. You need to assign use_cpu",
a field the user never wrote; ``use_vllm: true`` without vllm an ImportError traceback from inside TRL)."""

import importlib.util

import pytest

from lowmem.config import ConfigError
from lowmem.train import build_training_args, load_recipe


def _recipe(tmp_path, trainer="sft", **fields):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n' if trainer == "grpo" else '{"text": "1+1=2"}\n')
    kw = dict(trainer=trainer, output_dir=str(tmp_path / "out"), dataset=str(data), batch_size=4)
    if trainer == "grpo":
        kw["reward_funcs"] = ["exact_match"]
        fields = {"num_generations": 4, **fields}
    return load_recipe(None, **kw, **fields)


@pytest.mark.parametrize("fields, where", [({"fp16": True}, "no GPU is visible"),
                                           ({"fp16": True, "use_cpu": True}, "use_cpu=true")])
def test_fp16_on_the_cpu_is_an_error_naming_it(tmp_path, monkeypatch, fields, where):
    """transformers 5.23 + accelerate on the CPU: mixed_precision 'fp16' with native_amp False, the forward in
    float32 (measured with a forward hook); lowmem's run ended "metrics: ..." with exit 0."""
    import lowmem.train

    monkeypatch.setattr(lowmem.train, "_accelerator_visible", lambda: False)
    recipe = _recipe(tmp_path, **fields)
    with pytest.raises(ConfigError, match=rf"^fp16=true \(float16 mixed precision\) applies on a GPU only, and this "
                                          rf"run trains on the CPU \({where}\).*bf16: true"):
        build_training_args(recipe)


def test_fp16_where_a_gpu_is_visible_and_bf16_on_the_cpu_pass(tmp_path, monkeypatch):
    import lowmem.train

    monkeypatch.setattr(lowmem.train, "_accelerator_visible", lambda: False)
    args = build_training_args(_recipe(tmp_path, bf16=True))
    assert args.bf16 and args.use_cpu  # bfloat16 autocast on the CPU applies
    args = build_training_args(_recipe(tmp_path, fp16_full_eval=True))  # a cast for evaluation: the CPU does it
    assert args.fp16_full_eval and not args.fp16
    monkeypatch.setattr(lowmem.train, "_accelerator_visible", lambda: True)
    lowmem.train.check_half_precision({"fp16": True})  # a GPU: TRL / transformers take it from here


def test_bf16_full_eval_on_the_cpu_gets_use_cpu(tmp_path, monkeypatch):
    """Before: transformers' "Your setup doesn't support bf16/gpu. You need to assign use_cpu" for bf16_full_eval
    alone (lowmem set use_cpu for bf16 only)."""
    import lowmem.train

    monkeypatch.setattr(lowmem.train, "_accelerator_visible", lambda: False)
    args = build_training_args(_recipe(tmp_path, bf16_full_eval=True))
    assert args.bf16_full_eval and args.use_cpu


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
@pytest.mark.parametrize("trainer", ["grpo", "gvpo", "bnpo"])
def test_use_vllm_without_vllm_names_the_field_and_the_install(tmp_path, trainer):
    """The real check (nothing patched): vllm is not installed in this environment."""
    with pytest.raises(ConfigError, match=r"^training_args\.use_vllm=true needs the vllm package, which is not installed: "
                                          r"pip install 'trl\[vllm\]'"):
        load_recipe(None, trainer=trainer, output_dir=str(tmp_path / "out"), dataset=_data(tmp_path), batch_size=4,
                    reward_funcs=["exact_match"], num_generations=4, use_vllm=True, vllm_mode="colocate")


def _data(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    return str(data)


def test_fp16_with_bfloat16_weights_names_both_fields(tmp_path, monkeypatch):
    """On a GPU: dtype bfloat16 sets bf16, and transformers said "At most one of fp16 and bf16 can be True", a field
    the user never wrote."""
    import lowmem.train

    monkeypatch.setattr(lowmem.train, "_accelerator_visible", lambda: True)
    with pytest.raises(ConfigError, match=r"^fp16=true \(float16 mixed precision\) and dtype='bfloat16' .* conflict"):
        build_training_args(_recipe(tmp_path, fp16=True, dtype="bfloat16"))


@pytest.mark.parametrize("fields, named", [({"dtype": "bfloat16"}, r"dtype='bfloat16' \(which sets bf16: true\)"),
                                           ({"bf16": True}, r"bf16=true")])
def test_bf16_on_a_gpu_without_it_names_the_field(tmp_path, monkeypatch, fields, named):
    """A pre-Ampere GPU (T4, V100): transformers' "Your setup doesn't support bf16/gpu. You need to assign use_cpu"
    (use_cpu is no fix there); counted here with torch.cuda's answers patched (no GPU on this machine)."""
    import torch

    import lowmem.train

    monkeypatch.setattr(lowmem.train, "_accelerator_visible", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(lowmem.train, "_cuda_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match=rf"^{named}: this GPU \(Tesla T4\) has no bfloat16 support .* fp16: true"):
        build_training_args(_recipe(tmp_path, **fields))


def test_the_python_configs_refuse_fp16_on_the_cpu(tmp_path, monkeypatch):
    """The same check for a Python user of lowmem.trainers' configs (before: float32 training, no word)."""
    import lowmem.train
    from lowmem.trainers import LowMemTrainingArguments

    monkeypatch.setattr(lowmem.train, "_accelerator_visible", lambda: False)
    with pytest.raises(ConfigError, match=r"^LowMemTrainingArguments.fp16=true \(float16 mixed precision\) applies on a GPU"):
        LowMemTrainingArguments(output_dir=str(tmp_path), fp16=True, report_to=[])
    assert LowMemTrainingArguments(output_dir=str(tmp_path), report_to=[]).fp16 is False


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_the_python_grpo_configs_refuse_use_vllm_without_vllm(tmp_path):
    """Before: TRL's ImportError when the trainer was built, after the model loaded."""
    from lowmem.trainers import BNPOConfig, GVPOConfig, LowMemGRPOConfig

    for cls in (LowMemGRPOConfig, GVPOConfig, BNPOConfig):
        with pytest.raises(ConfigError, match=rf"^{cls.__name__}.use_vllm=True needs the vllm package"):
            cls(output_dir=str(tmp_path), use_vllm=True, use_cpu=True, bf16=False, report_to=[], num_generations=2,
                per_device_train_batch_size=2)


def test_vllm_settings_without_use_vllm_are_an_error(tmp_path):
    """A TRL GRPO example's vllm_mode: server / vllm_gpu_memory_utilization with use_vllm dropped (vllm not installed
    here): TRL generated with transformers and ignored them, without a word. TRL's defaults (a saved GRPOConfig
    holds every vllm_ field) pass."""
    with pytest.raises(ConfigError, match=r"^training_args.vllm_gpu_memory_utilization=0.5, training_args.vllm_mode="
                                          r"'server': vLLM generation settings, which need training_args.use_vllm=true"):
        _recipe(tmp_path, "grpo", vllm_mode="server", vllm_gpu_memory_utilization=0.5, vllm_server_port=8000)
    assert _recipe(tmp_path, "grpo", vllm_mode="colocate", vllm_server_port=8000).training_args["vllm_mode"] == "colocate"
