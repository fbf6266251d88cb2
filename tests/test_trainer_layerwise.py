"""Layerwise mode through the Trainer (`lowmem_layerwise=True`): gradient accumulation, clipping,
checkpoints. transformers' own layerwise GaLore forbids accumulation and saves no optimizer state."""

from __future__ import annotations

import pytest
import torch
from transformers import default_data_collator

from lowmem.kit import build_tiny_model, sft_dataset, tokenize_sft
from lowmem.optim.layerwise import LayerwiseOptimizer
from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments

COMMON = dict(report_to="none", use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, seed=0,
              learning_rate=1e-2, per_device_train_batch_size=4, gradient_accumulation_steps=2)


@pytest.fixture(scope="module")
def train_data(tokenizer):
    return tokenize_sft(sft_dataset(96, seed=0), tokenizer)


def _train(out_dir, train_data, layerwise, steps=6, resume=None, max_grad_norm=0.0, save_steps=None, name="adamw",
           optim_args=None, **extra):
    torch.manual_seed(0)
    model, _ = build_tiny_model(0)
    args = LowMemTrainingArguments(
        out_dir, lowmem_optim=name, lowmem_optim_args=optim_args, lowmem_layerwise=layerwise, max_steps=steps, max_grad_norm=max_grad_norm,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, **{**COMMON, **extra},
    )
    trainer = LowMemTrainer(model=model, args=args, train_dataset=train_data, data_collator=default_data_collator)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_layerwise_with_accumulation_follows_the_ordinary_run(tmp_path, train_data):
    ref, _ = _train(tmp_path / "plain", train_data, layerwise=False)
    lw, trainer = _train(tmp_path / "layerwise", train_data, layerwise=True)
    assert isinstance(trainer.optimizer.optimizer, LayerwiseOptimizer)
    assert all(p.grad is None for p in lw.parameters())  # gradients were freed in their hooks
    start = dict(build_tiny_model(0)[0].named_parameters())
    ref_params = dict(ref.named_parameters())
    assert any(not torch.equal(p, start[k]) for k, p in ref_params.items())
    for k, p in lw.named_parameters():
        torch.testing.assert_close(p, ref_params[k], rtol=1e-5, atol=1e-6, msg=k)


def test_layerwise_clipping_uses_previous_global_norm_and_disables_trainer_clipping(tmp_path, train_data):
    _, trainer = _train(tmp_path / "clip", train_data, layerwise=True, steps=2, max_grad_norm=0.5)
    assert trainer.args.max_grad_norm == 0.5  # the user's args untouched (AUDIT-LAYER18 1)
    assert trainer._clip_grad_norm(trainer.model) is None  # the Trainer's own clipping skipped: the hooks clip
    opt = trainer.optimizer.optimizer
    assert opt.max_grad_norm == 0.5 and opt.clip_mode == "global_prev"


def test_layerwise_resume_from_checkpoint(tmp_path, train_data):
    galore = dict(name="galore_adamw", optim_args={"rank": 8, "update_proj_gap": 2})  # refreshes on both sides
    full, _ = _train(tmp_path / "full", train_data, layerwise=True, save_steps=3, **galore)
    resumed, _ = _train(tmp_path / "resumed", train_data, layerwise=True, resume=str(tmp_path / "full" / "checkpoint-3"),
                        **galore)
    ref = dict(full.named_parameters())
    for k, p in resumed.named_parameters():
        torch.testing.assert_close(p, ref[k], rtol=1e-6, atol=1e-7, msg=k)


def test_layerwise_requires_an_optimizer():
    with pytest.raises(ValueError, match="lowmem_layerwise"):
        LowMemTrainingArguments("unused", lowmem_layerwise=True, report_to="none")


def test_layerwise_logs_the_real_grad_norm(tmp_path, train_data):
    """The logged grad_norm in layerwise mode is the step's global norm (not 0, though no p.grad is left):
    the same as the ordinary run's pre-clip norm, step for step (AdamW layerwise follows the ordinary run)."""
    def norms(trainer):
        return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]

    _, plain = _train(tmp_path / "plain", train_data, layerwise=False, steps=3, logging_steps=1)
    _, lw = _train(tmp_path / "layerwise", train_data, layerwise=True, steps=3, logging_steps=1)
    ref, got = norms(plain), norms(lw)
    assert len(ref) == len(got) == 3 and all(n > 0 for n in ref)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=0)
