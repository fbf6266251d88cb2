"""Resume audit (outside-in, through the HF Trainer): N steps straight vs N/2 + ``resume_from_checkpoint`` + N/2
for optimizer families whose state carries a schedule beside the moments, with the checkpoint placed *inside*
the schedule's window (between two subspace refreshes, inside a BAdam block, ...), so that a resumed run that
lost the window's position would refresh / switch at another step and end elsewhere.

What is compared: every weight and every optimizer state tensor, ``torch.equal`` (bit for bit): on the CPU, one
thread, the same kernels run in the same order in both runs, so the math is deterministic. Each case is placed so
that the schedule fires in the resumed half (a refresh at step 4 for update_proj_gap=4 resumed at 2, a BAdam
switch at 3 resumed at 2, MicroAdam's window of m=4 gradients resumed at 3)."""

from __future__ import annotations

import pytest
import torch
from transformers import default_data_collator

from lowmem.kit import build_tiny_model, sft_dataset, tokenize_sft
from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments

COMMON = dict(report_to="none", use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, seed=0,
              learning_rate=1e-2, per_device_train_batch_size=4)


@pytest.fixture(scope="module")
def train_data(tokenizer):
    return tokenize_sft(sft_dataset(64, seed=0), tokenizer)


def _train(out_dir, train_data, name, optim_args, steps, save_steps=None, resume=None, dtype=None, **extra):
    torch.manual_seed(0)
    model, _ = build_tiny_model(0)
    if dtype is not None:
        model.to(dtype)
    args = LowMemTrainingArguments(
        str(out_dir), lowmem_optim=name, lowmem_optim_args=dict(optim_args), max_steps=steps,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, **{**COMMON, **extra})
    trainer = LowMemTrainer(model=model, args=args, train_dataset=train_data, data_collator=default_data_collator)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer.optimizer.optimizer


def _flat(sd):
    """Every tensor of a state_dict()'s state (and extra top-level entries), by a stable key."""
    out = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            out[f"state.{i}.{k}"] = v
    for top, v in sd.items():
        if top in ("state", "param_groups"):
            continue
        for k, t in (v.items() if isinstance(v, dict) else [("", v)]):
            out[f"{top}.{k}"] = t
    return out


def _assert_same_run(a_model, a_opt, b_model, b_opt):
    ref = dict(a_model.named_parameters())
    for k, p in b_model.named_parameters():
        assert torch.equal(p, ref[k]), f"weight {k} differs: max |d| = {(p - ref[k]).abs().max().item():.3g}"
    sa, sb = _flat(a_opt.state_dict()), _flat(b_opt.state_dict())
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"optimizer state {k} differs"
        else:
            assert sa[k] == sb[k], k


# name, optim_args, total steps, checkpoint step. update_proj_gap=4 refreshes at steps 0, 4, 8: the checkpoint
# at 2 or 6 is between two refreshes and the resumed half crosses one.
CASES = {
    "galore_adamw": ({"rank": 4, "update_proj_gap": 4, "scale": 1.0}, 6, 2),
    "apollo_adamw": ({"rank": 4, "update_proj_gap": 4}, 6, 2),  # random basis: seed and refresh count must resume
    "apollo_mini": ({"update_proj_gap": 4, "scale": 8.0}, 6, 2),
    "frugal": ({"rank": 4, "update_proj_gap": 4, "projection": "randk"}, 6, 2),  # random coordinate selection
    "fira_adamw": ({"rank": 4, "update_proj_gap": 4}, 6, 2),
    "osd_adamw": ({"rank": 4, "proj_lr": 0.01}, 4, 2),
    "adamw4bit": ({"min_quant_size": 64, "block_size": 64}, 4, 2),
    "adamw4bit_rank1": ({"min_quant_size": 64, "block_size": 64}, 4, 2),
    "galore_adamw8bit": ({"rank": 4, "update_proj_gap": 4, "min_quant_size": 16, "block_size": 64, "scale": 1.0}, 6, 2),
    "microadam": ({"k_init": 0.1, "m": 4, "quant_block_size": 64, "topk_block_size": 128}, 6, 3),  # window of m=4 grads
    # BAdam: block switches every 3 steps, random order; the checkpoint is 2 steps into the first block
    "badam": ({"switch_every": 3, "freeze_inactive": True}, 6, 2),
    "spam": ({"reset_interval": 4, "warmup_steps": 2, "grad_accu_steps": 2, "threshold": 50.0}, 6, 3),
    "adagrad_snsm": ({"rank": 4, "update_proj_gap": 4}, 6, 2, {"learning_rate": 0.03}),  # (lr beside learning_rate: refused, SILENT 3)
}
# ~2 s each: the default suite keeps one per kind of schedule not resumed elsewhere inside its window (random basis,
# random coordinates, block schedule, gradient window); galore_adamw across a refresh is tests/test_train_run.py's.
DEFAULT = {"apollo_adamw", "frugal", "badam", "microadam"}


@pytest.mark.parametrize("name", [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_resume_inside_the_schedule_window_is_bit_exact(tmp_path, train_data, name):
    optim_args, steps, at, *more = CASES[name]
    extra = more[0] if more else {}
    full, full_opt = _train(tmp_path / "full", train_data, name, optim_args, steps, save_steps=at, **extra)
    resumed, resumed_opt = _train(tmp_path / "resumed", train_data, name, optim_args, steps,
                                  resume=str(tmp_path / "full" / f"checkpoint-{at}"), **extra)
    _assert_same_run(full, full_opt, resumed, resumed_opt)
    # and the resumed half did train (the checkpoint's weights are not the final ones)
    from safetensors.torch import load_file
    ckpt = load_file(tmp_path / "full" / f"checkpoint-{at}" / "model.safetensors")
    final = dict(resumed.named_parameters())
    assert any(not torch.equal(final[k], v) for k, v in ckpt.items() if k in final)


# Layerwise (stepped in the gradient hooks) with accumulation, and bfloat16 weights (state dtypes must survive the
# Trainer's optimizer.pt: float32 moments / BAdam's float32 master copy beside bf16 weights)
VARIANTS = {
    "badam-layerwise-accumulation": ("badam", {"switch_every": 3}, dict(lowmem_layerwise=True, gradient_accumulation_steps=2)),
    "apollo-layerwise-accumulation": ("apollo_adamw", {"rank": 4, "update_proj_gap": 4},
                                      dict(lowmem_layerwise=True, gradient_accumulation_steps=2)),
    # the clipping coefficient of global_prev (the previous step's global norm) must travel in the checkpoint
    "badam-layerwise-clip": ("badam", {"switch_every": 3},
                             dict(lowmem_layerwise=True, gradient_accumulation_steps=2, max_grad_norm=0.05)),
    "badam-bf16-master": ("badam", {"switch_every": 3, "master_weights": True}, dict(dtype=torch.bfloat16)),
    "galore8bit-bf16": ("galore_adamw8bit", {"rank": 4, "update_proj_gap": 4, "min_quant_size": 16, "block_size": 64},
                        dict(dtype=torch.bfloat16)),
}


@pytest.mark.parametrize("variant", [v if v in ("badam-layerwise-accumulation", "badam-bf16-master") else
                                     pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS])
def test_resume_inside_the_window_layerwise_and_bf16(tmp_path, train_data, variant):
    name, optim_args, extra = VARIANTS[variant]
    full, full_opt = _train(tmp_path / "full", train_data, name, optim_args, 6, save_steps=2, **extra)
    resumed, resumed_opt = _train(tmp_path / "resumed", train_data, name, optim_args, 6,
                                  resume=str(tmp_path / "full" / "checkpoint-2"), **extra)
    _assert_same_run(full, full_opt, resumed, resumed_opt)
    if "dtype" in extra:
        assert all(p.dtype == torch.bfloat16 for p in resumed.parameters())
        dtypes = {k: v.dtype for st in resumed_opt.state_dict()["state"].values() for k, v in st.items()}
        # (and _assert_same_run compared every state tensor's dtype with the uninterrupted run's)
        want = ({"master": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32} if name == "badam" else
                {"exp_avg": torch.uint8, "exp_avg_absmax": torch.float32, "proj_right": torch.float32})
        assert {k: dtypes[k] for k in want} == want


def test_plain_trainer_with_optimizer_cls_and_kwargs_resumes_inside_the_window(tmp_path, train_data):
    """transformers.Trainer (not LowMemTrainer) given ``optimizer_cls_and_kwargs``: the optimizer is rebuilt from
    cls(**kwargs) in the resumed process and must draw the same random basis (APOLLO) as the uninterrupted run."""
    from transformers import Trainer, TrainingArguments

    from lowmem.trainers import optimizer_cls_and_kwargs

    def train(out, save_steps=None, resume=None):
        torch.manual_seed(0)
        model, _ = build_tiny_model(0)
        args = TrainingArguments(str(out), max_steps=6, save_strategy="steps" if save_steps else "no",
                                 save_steps=save_steps or 500, **COMMON)
        trainer = Trainer(model=model, args=args, train_dataset=train_data, data_collator=default_data_collator,
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, "apollo_adamw", args=args, rank=4,
                                                                            update_proj_gap=4))
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer.optimizer.optimizer

    full, full_opt = train(tmp_path / "full", save_steps=2)
    resumed, resumed_opt = train(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    _assert_same_run(full, full_opt, resumed, resumed_opt)
