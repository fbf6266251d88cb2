"""MemoryCallback in a real Trainer run (CPU): components equal the live tensors they describe."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

from transformers import Trainer, TrainingArguments

import lowmem
from lowmem.kit import build_tiny_model, save_tiny_model, sft_dataset, tokenize_sft
from lowmem.trainers.memory_callback import MemoryCallback


def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, **kw)


def test_callback_with_plain_trainer(tmp_path):
    model, tok = build_tiny_model()
    data = tokenize_sft(sft_dataset(64), tok)
    opt = lowmem.create_optimizer(model, "adamw", lr=1e-3)
    cb = MemoryCallback(track_steps=2)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=data, optimizers=(opt, None), callbacks=[cb])
    trainer.train()
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert cb.peak["gradients"] == n_bytes
    assert cb.peak["optimizer_states"] == opt.state_bytes()  # 2 fp32 moments + CPU step counters
    assert cb.peak["weights"] >= n_bytes
    assert cb.peak["activations"] > 0 and cb.peak["peak"] >= cb.peak["weights"]
    assert len(cb.history) == 3
    logged = [h for h in trainer.state.log_history if "memory/optimizer_states_mib" in h]
    assert logged and logged[-1]["memory/optimizer_states_mib"] == pytest.approx(opt.state_bytes() / 2**20, abs=1e-3)


def test_callback_with_qlora_trainer(tmp_path):
    from lowmem.quant import load_quantized_model

    path = save_tiny_model(tmp_path / "tiny")
    model = load_quantized_model(path, "nf4", lora={"r": 8, "target_modules": "all-linear"}, dtype="bf16", device="cpu")
    _, tok = build_tiny_model()
    data = tokenize_sft(sft_dataset(32), tok)
    opt = lowmem.create_optimizer(model, "adamw", lr=1e-3)
    cb = MemoryCallback(track_steps=1)
    Trainer(model=model, args=_args(tmp_path / "out"), train_dataset=data, optimizers=(opt, None), callbacks=[cb]).train()
    lora = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert cb.peak["gradients"] == lora
    assert cb.peak["optimizer_states"] == 2 * lora + 4 * sum(1 for p in model.parameters() if p.requires_grad)


def test_tracker_accepts_several_forward_passes_per_step():
    """RL and DPO steps run the policy several times (generation, reference, policy): torch's
    MemTracker refuses a second root forward; ours resets per-module statistics and keeps counting."""
    from lowmem.memory.measure import PeakTracker

    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 32)
    with PeakTracker(model, opt) as tracker:
        with torch.no_grad():
            model(x)  # e.g. generation / reference log-probs
        model(x).sum().backward()  # the policy pass
        opt.step()
    assert tracker.maxima["gradients"] == sum(p.numel() * 4 for p in model.parameters())
    assert tracker.maxima["activations"] > 0
