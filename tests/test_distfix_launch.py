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
