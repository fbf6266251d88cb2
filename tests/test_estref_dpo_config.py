"""ESTREF (FOUND_SILENTFIX 3): ``LowMemDPOConfig`` refuses what ``lowmem train`` refuses (``check_dpo_fields``):
``beta=0`` (the sigmoid loss has no gradient) and a ``label_smoothing`` that no ``loss_type`` entry reads."""

import pytest

from lowmem.config import ConfigError
from lowmem.trainers import LowMemDPOConfig

KW = dict(output_dir="/tmp/estref_unused", report_to=[], use_cpu=True)


@pytest.mark.parametrize("fields, match", [
    (dict(beta=0.0), r"^LowMemDPOConfig\.beta=0 for DPO: .*valid: a float > 0"),
    (dict(label_smoothing=0.1), r"^LowMemDPOConfig\.label_smoothing=0.1 with loss_type=\['sigmoid'\]: .*valid: "),
])
def test_refused_fields_name_the_config(fields, match):
    with pytest.raises(ConfigError, match=match):
        LowMemDPOConfig(**KW, **fields)


@pytest.mark.parametrize("fields", [dict(beta=0.05), dict(label_smoothing=0.1, loss_type=["robust"])])
def test_applied_fields_still_build(fields):
    config = LowMemDPOConfig(**KW, **fields)
    assert all(getattr(config, k) == v for k, v in fields.items())
