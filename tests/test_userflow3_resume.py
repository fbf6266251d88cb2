"""``--resume`` with another loss setting than the checkpoint's run (USERFLOW3's audit, session 16). A DPO run resumed
with ``beta: 0.3`` over a checkpoint trained at 0.2 (an SFT run with ``assistant_only_loss`` switched, a GRPO run with
other ``reward_weights``) went on with the new objective without a word: the run was not the uninterrupted one, and
nothing in its output said that the steps before the checkpoint trained another loss. The new value applies (the
Trainer reads it from the config); a ``UserWarning`` now names each changed field with both values, as for a changed
seed or batch (the record of the run in each checkpoint, ``lowmem_run.json``)."""

import json
import re
import types
import warnings

import pytest

from lowmem.train import RUN_RECORD, _warn_data_order, run_record
from lowmem.trainers import LowMemDPOConfig, LowMemGRPOConfig, LowMemSFTConfig

COMMON = dict(per_device_train_batch_size=4, report_to="none", use_cpu=True)


def _warned(tmp_path, cls, before, after):
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    old = cls(output_dir=str(tmp_path), **COMMON, **before)
    (ckpt / RUN_RECORD).write_text(json.dumps(run_record(old, 8)))
    trainer = types.SimpleNamespace(args=cls(output_dir=str(tmp_path), **COMMON, **after), train_dataset=[{}] * 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_data_order(trainer, str(ckpt))
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("cls, before, after, says", [
    (LowMemDPOConfig, dict(beta=0.2), dict(beta=0.3), r"beta=0\.3 \(the checkpoint's run: beta=0\.2\)"),
    (LowMemDPOConfig, dict(loss_type=["sigmoid"]), dict(loss_type=["ipo"]), r"loss_type=\['ipo'\].*\['sigmoid'\]"),
    (LowMemSFTConfig, dict(assistant_only_loss=False), dict(assistant_only_loss=True),
     r"assistant_only_loss=True \(the checkpoint's run: assistant_only_loss=False\)"),
    (LowMemGRPOConfig, dict(num_generations=4, reward_weights=[1.0, 0.5]), dict(num_generations=4, reward_weights=[1.0, 1.0]),
     r"reward_weights=\[1\.0, 1\.0\].*\[1\.0, 0\.5\]"),
])
def test_resume_with_another_loss_setting_says_so(tmp_path, cls, before, after, says):
    messages = _warned(tmp_path, cls, before, after)
    assert any(re.search(says, m) for m in messages), messages
    assert all("data order" not in m for m in messages)  # the rows follow the checkpoint: no data-order warning


def test_the_same_settings_and_an_old_record_warn_nothing(tmp_path):
    assert _warned(tmp_path, LowMemDPOConfig, dict(beta=0.2), dict(beta=0.2)) == []
    ckpt = tmp_path / "old" / "checkpoint-2"  # a record written before the loss settings were kept
    ckpt.mkdir(parents=True)
    (ckpt / RUN_RECORD).write_text(json.dumps({"seed": 42, "data_seed": None, "train_rows": 8, "global_batch": 4}))
    args = LowMemDPOConfig(output_dir=str(tmp_path), **COMMON, beta=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_data_order(types.SimpleNamespace(args=args, train_dataset=[{}] * 8), str(ckpt))
