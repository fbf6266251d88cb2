"""ESTREF (FOUND_EST17 2): lowmem's DPO / GRPO (GVPO, BNPO) trainers freeze the reference model TRL is given or loads
(``trainers.trl.freeze_reference``). TRL 1.16 left it trainable; under bf16 autocast over float32 weights autocast then
cached a bf16 copy of every reference weight until the loss. Freezing changes neither the loss nor the gradients.
The estimator's reference (``activations._fake_reference``) is frozen too: a traced DPO step with a reference copy
equals a real CPU autocast step with a frozen copy to the byte."""

import copy
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_memory_trl_estimate import LiveStorages, _digits, _model  # noqa: E402


def _dpo_trainer(tmp_path):
    from datasets import Dataset

    from lowmem.trainers import LowMemDPOConfig, LowMemDPOTrainer

    model, tok = _model()
    rng = random.Random(0)
    rows = [{"prompt": _digits(rng, 8), "chosen": _digits(rng, 12), "rejected": _digits(rng, 12)} for _ in range(2)]
    args = LowMemDPOConfig(output_dir=str(tmp_path), lowmem_optim="adafactor", per_device_train_batch_size=2,
                           max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LowMemDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                                train_dataset=Dataset.from_list(rows), processing_class=tok)


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_dpo_reference_is_frozen_and_the_step_unchanged(tmp_path):
    trainer = _dpo_trainer(tmp_path)
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert all(p.requires_grad for p in trainer.model.parameters())
    batch = next(iter(trainer.get_train_dataloader()))
    loss, grads = _loss_and_grads(trainer, batch)
    trainer.ref_model.requires_grad_(True)  # TRL's own reference, as before
    loss_before, grads_before = _loss_and_grads(trainer, batch)
    assert torch.equal(loss, loss_before) and grads.keys() == grads_before.keys() and len(grads) > 0
    assert all(torch.equal(grads[n], grads_before[n]) for n in grads)
    assert not any(p.grad is not None for p in trainer.ref_model.parameters())


def test_grpo_reference_loaded_by_trl_is_frozen(tmp_path):
    from datasets import Dataset

    from lowmem.trainers import LowMemGRPOConfig, LowMemGRPOTrainer

    model, tok = _model()
    model.save_pretrained(tmp_path / "model")  # TRL loads the reference from the policy's path
    tok.save_pretrained(tmp_path / "model")
    args = LowMemGRPOConfig(output_dir=str(tmp_path / "out"), lowmem_optim="adafactor", per_device_train_batch_size=4,
                            max_steps=1, report_to=[], use_cpu=True, save_strategy="no", num_generations=4, beta=0.1,
                            max_completion_length=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = LowMemGRPOTrainer(model=str(tmp_path / "model"), args=args, processing_class=tok,
                                    train_dataset=Dataset.from_list([{"prompt": "12"}] * 4),
                                    reward_funcs=lambda completions, **kw: [1.0] * len(completions))
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert all(p.requires_grad for p in trainer.model.parameters())


@pytest.mark.parametrize("ckpt", [True, False])
def test_traced_reference_copy_is_a_real_step_with_a_frozen_copy(ckpt):
    """Tiny Llama h=256, 2 layers, 4 x 33, TRL's step under bf16 autocast with a frozen reference copy: the most
    activation and gradient bytes live at once equal the trace's ``backward_peak``; not checkpointed the frozen
    copy's step is lower than the trainable copy's (the cached bf16 weight copies)."""
    from test_est17_dpo_reference import _traced

    from lowmem.memory.activations import trl_fused_head

    def real(frozen):
        model, _ = _model()
        model.float().train()
        ref = copy.deepcopy(model).requires_grad_(not frozen)
        if ckpt:
            from lowmem.quant import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        torch.manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (4, 33))
        with trl_fused_head(model, "cpu"), trl_fused_head(ref, "cpu"):
            mode = LiveStorages([*model.parameters(), *model.buffers(), *ref.parameters(), *ref.buffers()])
            with mode:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
                    with torch.no_grad():
                        lp = ref(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
                    loss = loss + 0 * lp.sum()
                    del lp
                loss.backward()
                del loss
        return model.config, mode.peak

    config, peak = real(frozen=True)
    assert _traced(config, ckpt, "copy")["backward_peak"] == peak
    if not ckpt:
        assert peak < real(frozen=False)[1]
