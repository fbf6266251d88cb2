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


# AUDRL19 7: an eval batch that splits groups, refused by name (with what fits) when the config is built with evaluation
# on, when the trainer is built with an eval_dataset, and when evaluate() starts (the test_audit19_rl case); GVPO needs
# whole groups per process, GRPO / BNPO in the global batch (TRL's rule).
@pytest.mark.parametrize("kind", ["grpo", "gvpo", "bnpo"])
def test_eval_batch_splitting_groups_is_refused_when_the_config_is_built(kind, tmp_path):
    config_cls, _ = _classes(kind)
    with pytest.raises(ValueError, match=rf"{config_cls.__name__}.per_device_eval_batch_size=8 does not hold whole "
                                         r"groups of num_generations_eval=3 \(unset: num_generations\).* multiple of 3 "
                                         r"\(6 or 9\) or num_generations_eval to a divisor of 8 \(\[2, 4, 8\]\)"):
        _args(config_cls, tmp_path, per_device_train_batch_size=6, num_generations=3, eval_strategy="steps", eval_steps=1)
    with pytest.raises(ValueError, match=r"num_generations_eval=5[^(]*: .* multiple of 5 \(5 or 10\)"):
        _args(config_cls, tmp_path, num_generations_eval=5, eval_strategy="steps", eval_steps=1)
    _args(config_cls, tmp_path, num_generations_eval=2, eval_strategy="steps", eval_steps=1)  # 8 holds groups of 2


@pytest.mark.parametrize("kind", ["grpo", "gvpo", "bnpo"])
def test_eval_batch_splitting_groups_is_refused_when_the_trainer_gets_an_eval_dataset(kind, tiny_model_path, tmp_path,
                                                                                   no_model_load):
    from lowmem.kit import reward_dataset, reward_fn

    config_cls, trainer_cls = _classes(kind)
    args = _args(config_cls, tmp_path, per_device_train_batch_size=6, num_generations=3)  # eval_strategy "no"
    with pytest.raises(ValueError, match="per_device_eval_batch_size=8 does not hold whole groups"):
        trainer_cls(model=tiny_model_path, reward_funcs=reward_fn, args=args, train_dataset=reward_dataset(12, 0),
                    eval_dataset=reward_dataset(4, 0, "eval"))
    with pytest.raises(RuntimeError, match="policy model was loaded"):  # without an eval_dataset: nothing to check yet
        trainer_cls(model=tiny_model_path, reward_funcs=reward_fn, args=args, train_dataset=reward_dataset(12, 0))


def test_gvpo_needs_whole_groups_per_process_grpo_in_the_global_batch(monkeypatch, tmp_path):
    """2 processes x 3 = 6 completions hold groups of 6 globally (TRL's GRPO rule) but not in each process (GVPO)."""
    from lowmem.trainers import GVPOConfig, LowMemGRPOConfig
    from lowmem.trainers.trl import check_eval_groups

    config = _args(LowMemGRPOConfig, tmp_path, per_device_train_batch_size=6, num_generations=6)
    config.per_device_eval_batch_size = 3
    check_eval_groups(config, 2)
    with pytest.raises(ValueError, match=r"=3 does not hold whole groups of num_generations_eval=6 .* multiple of 6 \(6\)"):
        check_eval_groups(config, 1)
    config.num_generations_eval = 4  # 3 x 2 = 6 completions: a per-device multiple of 4 / gcd(4, 2) = 2 fits
    with pytest.raises(ValueError, match=r"global eval batch \(3 x 2 process\(es\)\); .* multiple of 2 \(2 or 4\) or "
                                         r"num_generations_eval to a divisor of 6 \(\[2, 3, 6\]\)"):
        check_eval_groups(config, 2)
    gvpo = _args(GVPOConfig, tmp_path, per_device_train_batch_size=6, num_generations=6)
    gvpo.per_device_eval_batch_size = 3
    with pytest.raises(ValueError, match="GVPOConfig.per_device_eval_batch_size=3 .* per process"):
        check_eval_groups(gvpo, 2)


def correct(prompts, completions, answer, **kwargs):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


# AUDRL19 2: a reward function's keywords are checked against eval_dataset's columns too (each set of a dict, naming
# its key), before the model loads, and against an eval_dataset given to evaluate(), before generating.
def test_eval_datasets_columns_are_checked_before_the_model_loads(tiny_model_path, tmp_path, no_model_load):
    from datasets import Dataset

    from lowmem.kit import reward_dataset
    from lowmem.trainers import LowMemGRPOConfig, LowMemGRPOTrainer

    args = _args(LowMemGRPOConfig, tmp_path)
    bare = Dataset.from_dict({"prompt": ["1+1=", "2+2="]})
    with pytest.raises(ValueError, match=r"^eval_dataset\['held'\] \(columns \['prompt'\]\): reward function 'correct'"):
        LowMemGRPOTrainer(model=tiny_model_path, reward_funcs=[correct], args=args, train_dataset=reward_dataset(16, 0),
                          eval_dataset={"same": reward_dataset(4, 0, "eval"), "held": bare})
    with pytest.raises(RuntimeError, match="policy model was loaded"):  # an eval set with the column passes
        LowMemGRPOTrainer(model=tiny_model_path, reward_funcs=[correct], args=args, train_dataset=reward_dataset(16, 0),
                          eval_dataset=reward_dataset(4, 0, "eval"))


def test_an_eval_dataset_given_to_evaluate_is_checked_before_generating(tiny_model_path, tmp_path, monkeypatch):
    from datasets import Dataset

    from lowmem.kit import reward_dataset
    from lowmem.trainers import LowMemGRPOConfig, LowMemGRPOTrainer

    trainer = LowMemGRPOTrainer(model=tiny_model_path, reward_funcs=correct, args=_args(LowMemGRPOConfig, tmp_path),
                                train_dataset=reward_dataset(16, 0))

    def generated(*args, **kwargs):
        raise RuntimeError("generated")

    monkeypatch.setattr(trainer, "_generate_and_score_completions", generated)
    with pytest.raises(ValueError, match=r"^eval_dataset \(columns \['prompt'\]\): reward function 'correct'"):
        trainer.evaluate(eval_dataset=Dataset.from_dict({"prompt": ["1+1=", "2+2="]}))
    with pytest.raises(RuntimeError, match="generated"):  # with the column: on to generation
        trainer.evaluate(eval_dataset=reward_dataset(4, 0, "eval"))


# AUDRL19 8: reward functions of one logged name each get a metric <name>_<index> (the test_audit19_rl case trains a
# step); the names are worked out as TRL does (functools.partial unwrapped, a callable instance's class name), and a new
# name that is another function's is refused before the model loads.
def test_reward_functions_of_one_name_get_distinct_logged_names(tiny_model_path, tmp_path):
    import functools

    from lowmem.kit import reward_dataset, reward_fn
    from lowmem.trainers import LowMemGRPOConfig, LowMemGRPOTrainer

    class Scorer:
        def __call__(self, prompts, completions, **kwargs):
            return [0.0] * len(completions)

    funcs = [lambda prompts, completions, **kw: [0.0] * len(completions),
             lambda prompts, completions, **kw: [1.0] * len(completions),
             functools.partial(reward_fn), reward_fn, Scorer(), correct]
    trainer = LowMemGRPOTrainer(model=tiny_model_path, reward_funcs=funcs, args=_args(LowMemGRPOConfig, tmp_path),
                                train_dataset=reward_dataset(16, 0))
    assert trainer.reward_func_names == ["<lambda>_0", "<lambda>_1", "reward_fn_2", "reward_fn_3", "Scorer", "correct"]


def test_a_renamed_reward_that_is_another_functions_name_is_refused_before_the_model_loads(tiny_model_path, tmp_path,
                                                                                            no_model_load):
    from lowmem.kit import reward_dataset
    from lowmem.trainers import LowMemGRPOConfig, LowMemGRPOTrainer

    def make(name):
        def reward(prompts, completions, **kwargs):
            return [0.0] * len(completions)
        reward.__name__ = name
        return reward

    with pytest.raises(ValueError, match=r"the names \['a_1'\] are given to several entries \[1, 2\]"):
        LowMemGRPOTrainer(model=tiny_model_path, reward_funcs=[make("a"), make("a"), make("a_1")],
                          args=_args(LowMemGRPOConfig, tmp_path), train_dataset=reward_dataset(16, 0))


# AUDRL19 10: generation_kwargs that break TRL's generated batches, refused by name when the config is built (GVPO and
# BNPO's configs too); harmless values of the same keys and keys TRL does not mind pass.
@pytest.mark.parametrize("kind, key, value, says", [
    ("grpo", "num_return_sequences", 4, "set num_generations instead"),
    ("gvpo", "return_dict_in_generate", True, "a dict output fails"),
    ("bnpo", "output_scores", True, "reads only the generated token ids"),
    ("grpo", "output_hidden_states", True, "reads only the generated token ids"),
    ("grpo", "stop_strings", ["\n"], "could not locate a tokenizer"),
])
def test_generation_kwargs_that_break_the_batch_are_refused(kind, key, value, says, tmp_path):
    config_cls, _ = _classes(kind)
    import re

    with pytest.raises(ValueError, match=rf"^{config_cls.__name__}.generation_kwargs.{key}={re.escape(repr(value))}: .*{says}"):
        _args(config_cls, tmp_path, generation_kwargs={key: value})


def test_harmless_generation_kwargs_pass(tmp_path):
    from lowmem.trainers import LowMemGRPOConfig

    _args(LowMemGRPOConfig, tmp_path, generation_kwargs={"num_return_sequences": 1, "return_dict_in_generate": False,
                                                         "output_scores": False, "no_repeat_ngram_size": 2})


def infinite_first(prompts, completions, **kwargs):
    return [float("inf")] + [float(i % 2) for i in range(1, len(completions))]


# AUDRL19 3: an infinite reward is an error naming the function and the value in GRPO (the test_audit19_rl case), GVPO
# and BNPO alike (LowMemGRPOTrainer._calculate_rewards; before, GRPO zeroed the group's advantages without a word).
@pytest.mark.parametrize("kind", ["gvpo", "bnpo"])
def test_gvpo_and_bnpo_refuse_an_infinite_reward_naming_the_function(kind, tiny_model_path, tmp_path):
    from lowmem.kit import reward_dataset, reward_fn

    config_cls, trainer_cls = _classes(kind)
    trainer = trainer_cls(model=tiny_model_path, reward_funcs=[reward_fn, infinite_first],
                          args=_args(config_cls, tmp_path), train_dataset=reward_dataset(16, 0))
    with pytest.raises(ValueError, match=rf"reward function 'infinite_first' \(reward_funcs\[1\]\) returned inf for "
                                         rf"completion 0 .*: {kind.upper()} needs finite rewards"):
        trainer.train()


def test_check_finite_rewards():
    import math

    import torch

    from lowmem.trainers.trl import check_finite_rewards

    check_finite_rewards(torch.tensor([[1.0, math.nan], [0.0, 2.0]]), ["a", "b"])  # NaN (a None) passes
    with pytest.raises(ValueError, match=r"'b' \(reward_funcs\[1\]\) returned -inf for completion 1 .*\(1 infinite"):
        check_finite_rewards(torch.tensor([[1.0, 0.0], [0.0, -math.inf]]), ["a", "b"])
    big = torch.tensor([[1e39]], dtype=torch.float64).float()  # beyond float32: TRL's tensor holds inf
    with pytest.raises(ValueError, match=r"returned inf .*GRPO needs finite rewards \(a number beyond float32"):
        check_finite_rewards(big, ["a"])


def varied(prompts, completions, **kwargs):
    return [float(sum(map(ord, c)) % 3) / 2 for c in completions]


# AUDRL19 4: GVPO logs its centred rewards R_i - mean R as the completions' advantages (the test_audit19_rl case: one
# step); over two steps of two micro-batches each the log holds the last generation batch's, one value per completion.
def test_gvpo_logs_centred_rewards_one_per_completion(tiny_model_path, tmp_path):
    import torch

    from lowmem.kit import reward_dataset
    from lowmem.trainers import GVPOConfig, GVPOTrainer
    from lowmem.trainers.gvpo import gvpo_centred_rewards

    torch.testing.assert_close(gvpo_centred_rewards(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2),
                               torch.tensor([0.5, -0.5, 0.0, 0.0]))
    args = _args(GVPOConfig, tmp_path, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer = GVPOTrainer(model=tiny_model_path, reward_funcs=varied, args=args, train_dataset=reward_dataset(32, 0))
    trainer.train()
    rewards = torch.tensor(list(trainer._logs["rewards"]["varied"]))
    logged = torch.tensor(list(trainer._logs["advantages"]))
    assert len(rewards) == len(logged) == 8 and logged.abs().sum() > 0  # a reward spread: TRL's would differ
    torch.testing.assert_close(logged, gvpo_centred_rewards(rewards, 4))
