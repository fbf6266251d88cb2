"""A newcomer's `LowMemTrainer`: `LowMemTrainingArguments(optim="galore_adamw", optim_target_modules=[...])`, the HF
Trainer's own spelling, trained with transformers' galore-torch, not lowmem's GaLore, without a word (NEWCOMER
audit). Now a warning names what runs and the field that picks lowmem's."""

import logging

import pytest

from lowmem.trainers import LowMemTrainingArguments

COMMON = dict(report_to="none", use_cpu=True, save_strategy="no")


@pytest.mark.parametrize("optim, lowmem", [
    ("galore_adamw", "galore_adamw"), ("adafactor", "adafactor"), ("galore_adamw_8bit", "galore_adamw8bit"),
    ("galore_adamw_layerwise", "galore_adamw_layerwise"), ("adamw_torch_4bit", "adamw4bit"),
])
def test_hf_optim_lowmem_implements_is_named(tmp_path, caplog, optim, lowmem):
    targets = {"optim_target_modules": ["q_proj"]} if optim.startswith("galore") else {}
    with caplog.at_level(logging.WARNING, logger="lowmem.trainers.hf"):
        LowMemTrainingArguments(str(tmp_path), optim=optim, **targets, **COMMON)
    assert (f"LowMemTrainingArguments(optim={optim!r}) without lowmem_optim runs transformers' own {optim!r}, not "
            f"lowmem's {lowmem!r}; set lowmem_optim={optim!r}") in caplog.text


@pytest.mark.parametrize("kwargs", [
    {}, {"optim": "adamw_torch"}, {"optim": "grokadamw"},
    {"optim": "galore_adamw", "optim_target_modules": ["q_proj"], "lowmem_optim": "galore_adamw"},
])
def test_no_warning_where_lowmem_has_nothing_else_to_offer(tmp_path, caplog, kwargs):
    """The default and AdamW (torch's, which lowmem's equals), a name lowmem does not implement, lowmem_optim set."""
    with caplog.at_level(logging.WARNING, logger="lowmem.trainers.hf"):
        LowMemTrainingArguments(str(tmp_path), **kwargs, **COMMON)
    assert "without lowmem_optim" not in caplog.text
