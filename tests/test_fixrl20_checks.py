"""FIXRL20: the RL trainers' checks before the model loads (AUDRL19 9, 7, 2, 8, 10, 3, 4)."""

from __future__ import annotations

import pytest


def _args(cls, tmp_path, **kw):
    fields = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=4, report_to="none", bf16=False, save_strategy="no", disable_tqdm=True,
                  logging_steps=1, seed=0)
    fields.update(kw)
    return cls(**fields)


def _classes(kind):
    from lowmem.trainers import BNPOConfig, BNPOTrainer, GVPOConfig, GVPOTrainer, LowMemGRPOConfig, LowMemGRPOTrainer

    return {"grpo": (LowMemGRPOConfig, LowMemGRPOTrainer), "gvpo": (GVPOConfig, GVPOTrainer),
            "bnpo": (BNPOConfig, BNPOTrainer)}[kind]


@pytest.fixture
def no_model_load(monkeypatch):
    """TRL's policy load replaced by a sentinel error: a check that runs before it raises its own error first."""
    import trl.trainer.grpo_trainer as grpo_module

    def loaded(*args, **kwargs):
        raise RuntimeError("the policy model was loaded")

    monkeypatch.setattr(grpo_module, "create_model_from_path", loaded)


# AUDRL19 9: reward_weights / reward_funcs count mismatch, refused before the model loads, in all three trainers; a
# single callable counts as one function; a matching count goes on to the load.
@pytest.mark.parametrize("kind, weights, funcs, says", [
    ("grpo", [1.0, 0.5], 1, "reward_weights has 2 entries .* reward_funcs has 1"),
    ("gvpo", [1.0], 2, "reward_weights has 1 entries .* reward_funcs has 2"),
    ("bnpo", [1.0, 1.0, 1.0], 2, "reward_weights has 3 entries .* reward_funcs has 2"),
    ("grpo", [1.0, 0.5], None, "reward_weights has 2 entries .* reward_funcs has 1"),
    ("grpo", [1.0, 0.5], 2, None),
])
def test_reward_weights_count_is_checked_before_the_model_loads(kind, weights, funcs, says, tiny_model_path, tmp_path,
                                                                no_model_load):
    from lowmem.kit import reward_dataset, reward_fn

    config_cls, trainer_cls = _classes(kind)
    args = _args(config_cls, tmp_path, reward_weights=weights)
    reward_funcs = reward_fn if funcs is None else [reward_fn] * funcs
    if says is None:
        with pytest.raises(RuntimeError, match="policy model was loaded"):
            trainer_cls(model=tiny_model_path, reward_funcs=reward_funcs, args=args, train_dataset=reward_dataset(16, 0))
    else:
        with pytest.raises(ValueError, match=f"{config_cls.__name__}.{says}"):
            trainer_cls(model=tiny_model_path, reward_funcs=reward_funcs, args=args, train_dataset=reward_dataset(16, 0))
