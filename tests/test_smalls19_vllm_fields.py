"""SMALLS19 item 3: ``vllm_*`` fields set without ``use_vllm`` are refused by name in the Python API
(``LowMemGRPOConfig``, ``GVPOConfig``, ``BNPOConfig``), as ``lowmem train`` refuses them in a recipe. Before: the
Python configs took them and TRL generated with transformers, reading none of them.

TRL 1.16's source, read for this: ``GRPOTrainer.__init__`` copies ``vllm_mode``, ``vllm_gpu_memory_utilization``,
``vllm_tensor_parallel_size`` and the four importance-sampling fields, and reads every ``vllm_*`` value only under
``if self.use_vllm`` (``VLLMGeneration(...)``, the weight syncs, the correction of vLLM's log-probabilities, VESPO's
mode check); ``GRPOConfig.__post_init__`` only validates the clips and copies the deprecated
``vllm_importance_sampling_cap`` into ``vllm_importance_sampling_clip_max``. So every one of them is unused without
``use_vllm`` and every one is refused."""

import dataclasses
import re
import warnings

import pytest

from lowmem.config import ConfigError

# a valid value away from TRL 1.16's default, for each vllm_* field of GRPOConfig
VALUES = {
    "vllm_mode": "server", "vllm_model_impl": "transformers", "vllm_enable_sleep_mode": True,
    "vllm_structured_outputs_regex": "[0-9]+", "vllm_server_base_url": "http://127.0.0.1:8000",
    "vllm_server_host": "127.0.0.1", "vllm_server_port": 8001, "vllm_server_timeout": 10.0, "vllm_group_port": 51217,
    "vllm_gpu_memory_utilization": 0.5, "vllm_max_model_length": 512, "vllm_tensor_parallel_size": 2,
    "vllm_importance_sampling_correction": False, "vllm_importance_sampling_mode": "token_mask",
    "vllm_importance_sampling_clip_max": 2.0, "vllm_importance_sampling_clip_min": 0.1,
    "vllm_importance_sampling_cap": 2.0,
}
COMMON = dict(use_cpu=True, bf16=False, report_to=[], num_generations=2, per_device_train_batch_size=2)


def test_every_vllm_field_of_trls_grpo_config_is_covered():
    """Red when TRL adds or renames a vllm_* field: read its use in GRPOTrainer again (is it read without
    use_vllm?) and give it a value here."""
    from trl import GRPOConfig

    assert {f.name for f in dataclasses.fields(GRPOConfig) if f.name.startswith("vllm_")} == set(VALUES)


def _configs():
    from lowmem.trainers import BNPOConfig, GVPOConfig, LowMemGRPOConfig

    return (LowMemGRPOConfig, GVPOConfig, BNPOConfig)


@pytest.mark.parametrize("field", VALUES)
def test_python_configs_refuse_a_vllm_field_without_use_vllm(tmp_path, field):
    for cls in _configs():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # (vllm_importance_sampling_cap: deprecated)
            with pytest.raises(ConfigError, match=rf"^(.*, )?{cls.__name__}\.{field}={re.escape(repr(VALUES[field]))}(, .*)?: vLLM "
                                                  rf"generation settings, which need {cls.__name__}\.use_vllm=True"):
                cls(output_dir=str(tmp_path), **COMMON, **{field: VALUES[field]})


def test_python_configs_take_trls_defaults_and_use_vllm(tmp_path, monkeypatch):
    """TRL's defaults given explicitly pass (a saved config holds every field); with use_vllm=True the settings are
    TRL's to use (vllm's presence faked: the package is not installed here)."""
    from trl import GRPOConfig

    import lowmem.train

    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig) if f.name in VALUES}
    monkeypatch.setattr(lowmem.train, "_vllm_available", lambda: True)
    for cls in _configs():
        cls(output_dir=str(tmp_path), **COMMON, **defaults)
        config = cls(output_dir=str(tmp_path), **COMMON, use_vllm=True, vllm_mode="server",
                     vllm_gpu_memory_utilization=0.5, vllm_importance_sampling_mode="token_mask")
        assert config.vllm_gpu_memory_utilization == 0.5


@pytest.mark.parametrize("field", VALUES)
def test_lowmem_train_refuses_a_vllm_field_without_use_vllm(tmp_path, field):
    """The recipe path (lowmem.train.check_unavailable_fields), for every field."""
    from lowmem.train import load_recipe

    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    with pytest.raises(ConfigError, match=rf"^training_args\.{field}={re.escape(repr(VALUES[field]))}: vLLM generation settings, "
                                          r"which need training_args\.use_vllm=true"):
        load_recipe(None, trainer="grpo", output_dir=str(tmp_path / "out"), dataset=str(data), batch_size=4,
                    reward_funcs=["exact_match"], num_generations=4, **{field: VALUES[field]})
