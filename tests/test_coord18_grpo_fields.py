"""LowMemGRPOConfig refuses a field only another setting reads, as ``lowmem train`` does (FOUND_OWNFIXB 4)."""
import pytest

from lowmem.config import ConfigError
from lowmem.trainers.trl import LowMemGRPOConfig


def test_ref_model_sync_steps_without_sync_ref_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^LowMemGRPOConfig\.ref_model_sync_steps=10 is read only with sync_ref_model"):
        LowMemGRPOConfig(str(tmp_path), ref_model_sync_steps=10, use_cpu=True, report_to="none")


def test_with_its_setting_or_at_its_default_it_is_accepted(tmp_path):
    LowMemGRPOConfig(str(tmp_path), ref_model_sync_steps=10, sync_ref_model=True, use_cpu=True, report_to="none")
    LowMemGRPOConfig(str(tmp_path), use_cpu=True, report_to="none")


def test_all_zero_reward_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"LowMemGRPOConfig\.reward_weights"):
        LowMemGRPOConfig(str(tmp_path), reward_weights=[0.0, 0.0], use_cpu=True, report_to="none")
    LowMemGRPOConfig(str(tmp_path), reward_weights=[0.0, 1.0], use_cpu=True, report_to="none")


def test_generation_kwargs_overriding_a_config_field_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^LowMemGRPOConfig\..*generation_kwargs.*temperature"):
        LowMemGRPOConfig(str(tmp_path), generation_kwargs={"temperature": 0.5}, use_cpu=True, report_to="none")
    LowMemGRPOConfig(str(tmp_path), generation_kwargs={"no_repeat_ngram_size": 3}, use_cpu=True, report_to="none")
