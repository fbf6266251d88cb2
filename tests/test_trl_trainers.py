"""Every lowmem TRL trainer (SFT, DPO, GRPO, GVPO, BNPO): a few steps with a lowmem optimizer on the
tiny task; every trainable parameter moves; checkpoint + resume reproduces the uninterrupted run;
LoRA through peft_config leaves only the adapter in the optimizer."""

import pytest
import torch

from trl_helpers import KINDS, RL_KINDS, assert_lowmem_optimizer, inner_optimizer, make_trainer, trainable


@pytest.mark.parametrize("kind", KINDS)
def test_steps_move_every_parameter_and_resume_is_exact(kind, tiny_model_path, tmp_path):
    full = make_trainer(kind, tiny_model_path, str(tmp_path / "full"), 3, save_strategy="steps", save_steps=2)
    before = trainable(full)
    full.train()
    assert_lowmem_optimizer(full)
    after = trainable(full)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert (tmp_path / "full" / "checkpoint-2" / "optimizer.pt").is_file()

    resumed = make_trainer(kind, tiny_model_path, str(tmp_path / "full"), 3, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 3
    assert_lowmem_optimizer(resumed)
    for name, value in trainable(resumed).items():
        torch.testing.assert_close(value, after[name], msg=f"{kind}: {name} differs after resume")


@pytest.mark.parametrize("kind", KINDS)
def test_lora_adapter_only_in_optimizer(kind, tiny_model_path, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(kind, tiny_model_path, str(tmp_path), 2, peft_config=lora, lr=3e-2)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    before = trainable(trainer)
    assert before and all("lora_" in n for n in before)
    trainer.train()
    assert_lowmem_optimizer(trainer)  # holds exactly the trainable (adapter) parameters
    held = sum(p.numel() for g in inner_optimizer(trainer).param_groups for p in g["params"])
    assert held == sum(v.numel() for v in before.values())
    after = trainable(trainer)
    # lora_B starts at zero, so lora_A only moves from the second step on: two steps move both
    assert not [n for n in before if torch.equal(before[n], after[n])]
    for name, value in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name


@pytest.mark.parametrize("kind", RL_KINDS)
def test_gradient_accumulation_and_evaluation(kind, tiny_model_path, tmp_path):
    # generation batch of 16 split into 2 micro-batches of 8 (2 whole groups each for GVPO)
    trainer = make_trainer(kind, tiny_model_path, str(tmp_path), 2, gradient_accumulation_steps=2, eval_dataset=True)
    before = trainable(trainer)
    trainer.train()
    after = trainable(trainer)
    assert not [n for n in before if torch.equal(before[n], after[n])]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert evals and all(torch.isfinite(torch.tensor(h["eval_loss"])) for h in evals)


def test_without_lowmem_optim_trl_optimizer_is_kept(tiny_model_path, tmp_path):
    trainer = make_trainer("grpo", tiny_model_path, str(tmp_path), 1, optim=None)
    trainer.train()
    assert isinstance(inner_optimizer(trainer), torch.optim.AdamW)


def test_lowmem_optim_args_reach_the_optimizer(tiny_model_path, tmp_path):
    trainer = make_trainer("dpo", tiny_model_path, str(tmp_path), 1, optim="adamw",
                           lowmem_optim_args="betas=[0.8, 0.95]", weight_decay=0.05)
    trainer.train()
    groups = inner_optimizer(trainer).param_groups
    assert all(g["betas"] == (0.8, 0.95) for g in groups)
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}  # no decay on norm weights
