"""From a fixed seed, 60 steps on CPU with a lowmem optimizer (Adafactor): GRPO, GVPO and BNPO
raise the mean reward of the verifiable addition task; DPO raises the chosen-minus-rejected margin.
Full fine-tuning of the freshly initialised tiny model, and a LoRA adapter through peft_config on
top of a briefly SFT-trained base (see ``sft_warm_model``). ~2-4 s per run on one CPU core."""

import contextlib
import io
import statistics

import pytest

from trl_helpers import RL_KINDS, assert_lowmem_optimizer, make_trainer, metric_series, sft_warm_model

STEPS = 60
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=LORA_MODULES, task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def warm_base(tiny_model_path, tmp_path_factory):
    return sft_warm_model(tiny_model_path, str(tmp_path_factory.mktemp("warm")), steps=20)


# each kind's loss learns in the default run (GRPO with both model paths; BNPO through the adapter, GVPO full);
# the other two pairs are slow: the same loss on the other model path (tests/test_trl_trainers.py steps every
# kind on both)
SLOW_PAIRS = {("bnpo", "full"), ("gvpo", "lora")}


@pytest.mark.parametrize("kind,adapter", [
    pytest.param(k, a, marks=pytest.mark.slow) if (k, a) in SLOW_PAIRS else (k, a) for k in RL_KINDS for a in ("full", "lora")])
def test_reward_rises(kind, adapter, tiny_model_path, warm_base, tmp_path):
    """The mean reward of the same 256 held-out prompts (4 sampled completions each) before and after 60 steps.
    With LoRA on the warm base the reward starts at 0.39 of this task's ~0.5 reachable in 60 steps: measured on an
    AMD EPYC, lr 0.05, seeds 0-2, GRPO 0.386-0.393 -> 0.476-0.492, BNPO the same to 0.01; from scratch (full) 0.07
    -> 0.50-0.55. The per-step training reward's first-5 vs last-10 means, which this test read before, rose by
    only +0.03 for GRPO / LoRA seed 0 there (+0.12-0.34 on an Intel Xeon): a 64-completion batch per step and
    learning within the first 5 steps made it too noisy a yardstick for a 0.1 margin."""
    from lowmem.kit import reward_dataset

    lora = adapter == "lora"
    trainer = make_trainer(kind, warm_base if lora else tiny_model_path, str(tmp_path), STEPS, lr=0.05 if lora else 1e-2,
                           peft_config=_lora() if lora else None, per_device_train_batch_size=16,
                           eval_dataset=True, per_device_eval_batch_size=64, eval_strategy="no")
    trainer.eval_dataset = reward_dataset(256, 0, "eval")
    with contextlib.redirect_stdout(io.StringIO()):
        before = trainer.evaluate()["eval_reward"]
        trainer.train()
        after = trainer.evaluate()["eval_reward"]
    assert_lowmem_optimizer(trainer)
    rewards = metric_series(trainer, "reward")
    assert len(rewards) == STEPS
    print(f"{kind}/{adapter}: held-out reward {before:.3f} -> {after:.3f}; training reward first 5 steps "
          f"{statistics.mean(rewards[:5]):.3f} -> last 10 {statistics.mean(rewards[-10:]):.3f}")
    assert after > before + (0.05 if lora else 0.15), (before, after)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_dpo_margin_rises(adapter, tiny_model_path, warm_base, tmp_path):
    # margin and accuracy on a fixed set of 64 training pairs, before and after (per-batch margins are noisy;
    # on held-out pairs this tiny model's margin does not improve within 60 steps)
    lora = adapter == "lora"
    trainer = make_trainer("dpo", warm_base if lora else tiny_model_path, str(tmp_path), STEPS, lr=0.3 if lora else 1e-2,
                           peft_config=_lora() if lora else None, per_device_train_batch_size=16,
                           eval_dataset="train", per_device_eval_batch_size=64, eval_strategy="no")
    with contextlib.redirect_stdout(io.StringIO()):
        before = trainer.evaluate()
        trainer.train()
        after = trainer.evaluate()
    assert_lowmem_optimizer(trainer)
    start, end = before["eval_rewards/margins"], after["eval_rewards/margins"]
    accuracy = after["eval_rewards/accuracies"]
    print(f"dpo/{adapter}: chosen-minus-rejected margin {start:.3f} -> {end:.3f}, accuracy {accuracy:.3f}")
    assert start == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert end > (0.1 if not lora else 0.015) and accuracy > (0.6 if not lora else 0.55), (end, accuracy)
