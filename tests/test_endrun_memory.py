"""The memory a ``lowmem train`` run reports: evaluations are measured too. ``memory.peak`` is the peak of a
training step (MemoryCallback); an evaluation runs ``per_device_eval_batch_size`` rows (64 by default, here 8x
the training batch) with the optimizer state alive, and peaked 39% above it (2.53 vs 1.82 MiB of live tensors on
the tiny Llama), which the summary and metrics.json did not show: a run sized by them could run out of memory
in its last evaluation. Counts of live tensors (PeakTracker), not process measurements."""

from __future__ import annotations

import io

import pytest

from lowmem.train import load_recipe, run


def test_the_evaluation_peak_is_measured_and_reported(tmp_path):
    from rich.console import Console

    printed = io.StringIO()
    m = run(load_recipe(None, output_dir=str(tmp_path), optim="adamw", lr=1e-3, steps=2, batch_size=8, train_size=32,
                        eval_size=64, logging_steps=1, save_model=False), console=Console(file=printed, width=400))
    mem = m["memory"]
    assert mem["evaluation"] > mem["peak"]  # one eval batch of 64 rows against training batches of 8
    assert mem["evaluation"] >= mem["weights"] + mem["optimizer_states"]  # the final evaluation holds both
    assert "evaluation" in printed.getvalue().split("peak memory")[1]


def test_the_evaluation_peak_equals_the_live_tensors_of_an_evaluation(tiny_model):
    """The callback's number against PeakTracker around a whole ``evaluate()`` of one batch (the region differs by
    the batch's own input tensors, created before the prediction step: a few KB)."""
    from transformers import TrainingArguments  # noqa: F401  (the Trainer's import cost, outside the measurement)

    from lowmem.kit import sft_collator, sft_dataset, tokenize_sft
    from lowmem.memory.measure import PeakTracker
    from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments
    from lowmem.trainers.memory_callback import MemoryCallback

    model, tok = tiny_model
    evals = tokenize_sft(sft_dataset(64, 0, "eval"), tok, padding=False)

    def trainer(callbacks):
        args = LowMemTrainingArguments("unused", lowmem_optim="adamw", per_device_eval_batch_size=64, report_to="none",
                                       use_cpu=True)
        return LowMemTrainer(model=model, args=args, eval_dataset=evals, data_collator=sft_collator(tok),
                             callbacks=callbacks)

    cb = MemoryCallback(track_steps=2)
    trainer([cb]).evaluate()
    plain = trainer([])
    tracker = PeakTracker(model)
    with tracker:
        plain.evaluate()
    assert 0.95 * tracker.peak["total"] <= cb.peak["evaluation"] <= tracker.peak["total"]


@pytest.mark.cuda
def test_the_evaluation_peak_on_cuda_is_the_allocators_peak_of_the_evaluation(tiny_model):
    """CUDA: the allocator's peak from the start of training (or the step before) to ``on_evaluate``."""
    import torch

    from lowmem.kit import sft_collator, sft_dataset, tokenize_sft
    from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments
    from lowmem.trainers.memory_callback import MemoryCallback

    model, tok = tiny_model
    data = tokenize_sft(sft_dataset(64, 0, "eval"), tok, padding=False)
    cb = MemoryCallback()
    args = LowMemTrainingArguments("unused", lowmem_optim="adamw", max_steps=1, per_device_train_batch_size=8,
                                   per_device_eval_batch_size=64, eval_on_start=True, eval_strategy="steps",
                                   eval_steps=1, report_to="none", save_strategy="no")
    trainer = LowMemTrainer(model=model.cuda(), args=args, train_dataset=data, eval_dataset=data,
                            data_collator=sft_collator(tok), callbacks=[cb])
    trainer.train()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights < cb.peak["evaluation"] <= torch.cuda.max_memory_allocated() + cb.peak["peak"]
