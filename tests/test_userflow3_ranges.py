"""Config fields a pasted HF Trainer / TRL config carries whose invalid values nobody checked (USERFLOW3's audit,
session 16), each run with ``lowmem train`` on a tiny Granite: ``neftune_noise_alpha: -5`` failed at the first
step (``RuntimeError: uniform_ expects to return a [from, to) range``, a traceback, exit 1), ``dataloader_num_workers: -1`` with torch's ValueError once training started;
``label_smoothing_factor: 1.5`` (the NLL term weighted -0.5: trained away from the labels), ``ld_alpha: 1.5``,
``ref_model_mixup_alpha: 2.0`` (the reference extrapolated past the policy), ``top_entropy_quantile: 1.5`` and
``delta: -1`` trained without a word. Each is now refused when the config is built, naming the field and its range
(lowmem.config.RANGES, from the ranges transformers' and TRL's docs give)."""

import pytest

from lowmem.trainers import LowMemDPOConfig, LowMemGRPOConfig, LowMemSFTConfig

COMMON = dict(per_device_train_batch_size=4, report_to="none", use_cpu=True)
CASES = [
    (LowMemSFTConfig, "neftune_noise_alpha", -5.0, 5.0, r">= 0"),
    (LowMemSFTConfig, "label_smoothing_factor", 1.5, 0.1, r"in \[0, 1\)"),
    (LowMemSFTConfig, "label_smoothing_factor", -0.1, 0.0, r"in \[0, 1\)"),
    (LowMemSFTConfig, "dataloader_num_workers", -1, 0, r">= 0"),
    (LowMemDPOConfig, "ld_alpha", 1.5, 0.5, r"in \[0, 1\]"),
    (LowMemDPOConfig, "ref_model_mixup_alpha", 2.0, 0.6, r"in \[0, 1\]"),
    (LowMemDPOConfig, "ref_model_sync_steps", 0, 64, r"> 0"),
    (LowMemDPOConfig, "discopop_tau", 0.0, 0.05, r"> 0"),
    (LowMemDPOConfig, "precompute_ref_batch_size", 0, 8, r"> 0"),
    (LowMemGRPOConfig, "top_entropy_quantile", 1.5, 0.2, r"in \[0, 1\]"),
    (LowMemGRPOConfig, "delta", -1.0, 1.5, r"> 0"),
    # an int | str field (default 'auto'): checked as its annotation types it (0 was a ZeroDivisionError mid-preparation)
    (LowMemSFTConfig, "pad_to_multiple_of", 0, 8, r"> 0"),
    (LowMemDPOConfig, "pad_to_multiple_of", -8, 8, r"> 0"),
]
IDS = [f"{c.__name__}-{f}={bad}" for c, f, bad, *_ in CASES]


def _build(cls, **fields):
    extra = dict(num_generations=4) if cls is LowMemGRPOConfig else {}
    return cls(output_dir="unused", **COMMON, **extra, **fields)


@pytest.mark.parametrize("cls, field, bad, good, says", CASES, ids=IDS)
def test_an_out_of_range_value_is_refused_when_the_config_is_built(cls, field, bad, good, says):
    with pytest.raises(ValueError, match=rf"{field}={bad!r}: expected .*{says}"):
        _build(cls, **{field: bad})


@pytest.mark.parametrize("cls, field, bad, good, says", CASES, ids=IDS)
def test_a_value_in_range_passes(cls, field, bad, good, says):
    # (a field only another setting reads is refused without it: lowmem.train.DEPENDENT_FIELDS, session 18)
    needs = {"ref_model_sync_steps": {"sync_ref_model": True}, "ref_model_mixup_alpha": {"sync_ref_model": True}}
    assert getattr(_build(cls, **{field: good}, **needs.get(field, {})), field) == good


@pytest.mark.parametrize("cls", [LowMemSFTConfig, LowMemDPOConfig, LowMemGRPOConfig])
def test_a_string_default_of_a_ranged_field_passes(cls):
    """TRL's ``pad_to_multiple_of`` defaults to the string ``'auto'``: a range on it must not refuse that."""
    assert _build(cls, pad_to_multiple_of="auto").pad_to_multiple_of in ("auto", None)  # (TRL resolves it later)
