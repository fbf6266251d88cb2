"""FIXMATH21 2: ``use_vllm`` on without the vllm package is refused by one implementation
(``lowmem.trainers.trl.refuse_use_vllm_without_vllm``) on both routes, before any model loads: ``lowmem train``'s
recipe names ``training_args.use_vllm`` (a YAML ``true``), the Python API's configs ``<ConfigClass>.use_vllm`` (Python's
``True``). Before, the check was written twice in different words (lowmem/train.py ``check_unavailable_fields``:
"use_vllm=true ... (or drop use_vllm ...)", trainers/trl.py: "<Config>.use_vllm=True ... (or use_vllm=False ...)").
vllm's presence is faked both ways (``lowmem.train._vllm_available``, which both routes read)."""

from __future__ import annotations

import pytest

import lowmem.train
from lowmem.config import ConfigError
from lowmem.train import load_recipe

COMMON = dict(use_cpu=True, bf16=False, report_to=[], num_generations=2, per_device_train_batch_size=2)


def _configs():
    from lowmem.trainers import BNPOConfig, GVPOConfig, LowMemGRPOConfig

    return (LowMemGRPOConfig, GVPOConfig, BNPOConfig)


def _recipe(tmp_path, trainer, **training_args):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2", "answer": "2"}\n')
    return load_recipe(None, trainer=trainer, output_dir=str(tmp_path / "out"), dataset=str(data), batch_size=4,
                       reward_funcs=["exact_match"], num_generations=4, **training_args)


@pytest.mark.parametrize("trainer", ["grpo", "gvpo", "bnpo"])
def test_lowmem_train_names_training_args_use_vllm(tmp_path, monkeypatch, trainer):
    monkeypatch.setattr(lowmem.train, "_vllm_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^training_args\.use_vllm=true needs the vllm package, which is not "
                                          r"installed: pip install 'trl\[vllm\]' \(or training_args\.use_vllm=false: TRL "
                                          r"then generates with transformers\)$"):
        _recipe(tmp_path, trainer, use_vllm=True)
    assert _recipe(tmp_path, trainer, use_vllm=False).training_args["use_vllm"] is False
    monkeypatch.setattr(lowmem.train, "_vllm_available", lambda: True)
    assert _recipe(tmp_path, trainer, use_vllm=True).training_args["use_vllm"] is True


def test_the_python_configs_name_their_class(tmp_path, monkeypatch):
    for cls in _configs():
        monkeypatch.setattr(lowmem.train, "_vllm_available", lambda: False)
        name = cls.__name__
        with pytest.raises(ConfigError, match=rf"^{name}\.use_vllm=True needs the vllm package, which is not installed: "
                                              rf"pip install 'trl\[vllm\]' \(or {name}\.use_vllm=False: TRL then "
                                              r"generates with transformers\)$"):
            cls(output_dir=str(tmp_path), use_vllm=True, **COMMON)
        assert cls(output_dir=str(tmp_path), use_vllm=False, **COMMON).use_vllm is False
        monkeypatch.setattr(lowmem.train, "_vllm_available", lambda: True)
        assert cls(output_dir=str(tmp_path), use_vllm=True, **COMMON).use_vllm is True


def test_one_implementation_for_both_routes(monkeypatch):
    """Both routes call the same function: lowmem train's check (check_unavailable_fields) and the configs'
    __post_init__ raise what refuse_use_vllm_without_vllm raises with their prefix (its default: the class's name)."""
    from lowmem.trainers import trl

    calls = []
    real = trl.refuse_use_vllm_without_vllm
    monkeypatch.setattr(trl, "refuse_use_vllm_without_vllm", lambda v, prefix=None: calls.append(prefix) or real(v, prefix))
    monkeypatch.setattr(lowmem.train, "_vllm_available", lambda: False)
    with pytest.raises(ConfigError):
        lowmem.train.check_unavailable_fields({"use_vllm": True})
    with pytest.raises(ConfigError, match=r"^LowMemGRPOConfig\.use_vllm=True"):
        trl.LowMemGRPOConfig(output_dir="unused", use_vllm=True, **COMMON)
    assert calls == ["training_args.", None]
    with pytest.raises(ConfigError, match=r"^x\.use_vllm=True needs"):
        real({"use_vllm": True}, prefix="x.")
    real({"use_vllm": False}, prefix="x.")  # off: nothing to check
