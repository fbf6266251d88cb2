"""LEFT21 2: the ``vllm_*`` fields without ``use_vllm`` and the ``reward_weights`` count / all-zero checks were written
twice, in different words: in ``lowmem train`` (lowmem/train.py ``check_unavailable_fields`` /
``check_training_args_reward_weights``, lowmem/rewards.py ``validate_reward_fields``) and in the Python API
(trainers/trl.py ``refuse_vllm_fields_without_use_vllm`` / ``check_reward_weights_count``). Now one function each
(:func:`lowmem.trainers.trl.refuse_vllm_fields_without_use_vllm`, :func:`lowmem.rewards.check_reward_weights`) that both
call with a prefix: ``training_args.X`` (``lowmem train``'s recipe key, YAML's ``true``) or ``<ConfigClass>.X``
(Python's ``True``). Here both routes, on the same values, refuse the same ones with the same message but for the
prefix, and pass the same ones."""

import warnings

import pytest

from lowmem.config import ConfigError

COMMON = dict(use_cpu=True, bf16=False, report_to=[], num_generations=2, per_device_train_batch_size=2)

VLLM_CASES = [{"vllm_mode": "server"}, {"vllm_gpu_memory_utilization": 0.5, "vllm_mode": "server"},
              {"vllm_importance_sampling_mode": "token_mask", "vllm_server_port": 8001},
              {"vllm_mode": "colocate"}, {"vllm_server_port": 8000}, {}]  # (the last three: TRL's defaults, pass)


def _python(cls_name, kwargs, tmp_path):
    """The Python API's message for a config built with ``kwargs`` (None: it builds)."""
    import lowmem.trainers as T

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            getattr(T, cls_name)(output_dir=str(tmp_path), **COMMON, **kwargs)
        except ConfigError as err:
            return str(err).replace(f"{cls_name}.", "<key>.").replace("=True", "=<true>")
    return None


def _recipe(ta):
    """lowmem train's message for ``training_args`` ``ta`` (None: accepted)."""
    from lowmem.train import check_unavailable_fields

    try:
        check_unavailable_fields(dict(ta))
    except ConfigError as err:
        return str(err).replace("training_args.", "<key>.").replace("=true", "=<true>")
    return None


@pytest.mark.parametrize("values", VLLM_CASES, ids=lambda v: "-".join(v) or "none")
@pytest.mark.parametrize("cls_name", ["LowMemGRPOConfig", "GVPOConfig", "BNPOConfig"])
def test_vllm_fields_one_rule_both_routes(tmp_path, cls_name, values):
    a, b = _recipe(values), _python(cls_name, values, tmp_path)
    assert a == b
    assert (a is None) == (values.get("vllm_mode", "colocate") == "colocate" and values.get("vllm_server_port", 8000) == 8000
                           and len(values) <= 1)
    if a is not None:
        assert a.startswith("<key>.") and "which need <key>.use_vllm=<true>" in a


REWARD_CASES = [([1.0, 0.5], 1), ([1.0], 2), ([1.0, 1.0, 1.0], 2), ([0.0, 0.0], 2), ([0.5, 1.0], 2), ([0.0, 1.0], 2),
                ([2.0], 1)]


def _recipe_weights(weights, n, tmp_path):
    """lowmem train's message for ``training_args.reward_weights`` (and, the same rule, the recipe's own
    ``reward_weights`` field, named without a prefix) with ``n`` reward functions."""
    from lowmem.train import load_recipe

    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    funcs = ["exact_match", "format", "exact_match"][:n]
    out = []
    for where in ("training_args", "field"):
        kw = {"training_args": {"reward_weights": weights}} if where == "training_args" else {"reward_weights": weights}
        try:
            load_recipe(None, trainer="grpo", output_dir=str(tmp_path / "o"), dataset=str(data), batch_size=4,
                        num_generations=4, reward_funcs=funcs, **kw)
            out.append(None)
        except ValueError as err:
            msg = str(err)
            out.append(msg.replace("training_args.", "<key>.", 1) if where == "training_args" else "<key>." + msg)
    assert out[0] == out[1]
    return out[0]


def _python_weights(weights, n, tmp_path):
    from lowmem.trainers import LowMemGRPOConfig
    from lowmem.trainers.trl import check_reward_weights_count

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = LowMemGRPOConfig(output_dir=str(tmp_path), reward_weights=weights, **COMMON)
            check_reward_weights_count(config, [lambda **k: [0.0]] * n)
        except ValueError as err:
            return str(err).replace("LowMemGRPOConfig.", "<key>.")
    return None


@pytest.mark.parametrize("weights, n", REWARD_CASES, ids=str)
def test_reward_weights_one_rule_both_routes(tmp_path, weights, n):
    a, b = _recipe_weights(weights, n, tmp_path), _python_weights(weights, n, tmp_path)
    assert a == b
    if len(weights) != n:
        assert a == (f"<key>.reward_weights has {len(weights)} entries ({weights}) but reward_funcs has {n}; expected "
                     "one weight per reward function")
    elif not any(weights):
        assert a.startswith(f"<key>.reward_weights={weights}: all weights are 0")
    else:
        assert a is None


def test_the_synthetic_task_takes_one_weight():
    """lowmem train without reward_funcs (lowmem.kit.reward_fn, one function): the same rule with one function."""
    from lowmem.rewards import check_reward_weights

    with pytest.raises(ValueError, match=r"^training_args\.reward_weights has 2 entries \(\[1.0, 0.5\]\) but reward_funcs is "
                                         r"unset: the synthetic task has one reward function"):
        check_reward_weights([1.0, 0.5], None, prefix="training_args.")
    with pytest.raises(ValueError, match=r"^training_args\.reward_weights=\[0.0\]: all weights are 0"):
        check_reward_weights([0.0], None, prefix="training_args.")
    check_reward_weights([2.0], None, prefix="training_args.")
