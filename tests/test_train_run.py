"""`lowmem train` runs: exact resume, adapter save and merge, full-model save, evaluation during
training, and the optimizer hyperparameters in effect recorded in metrics.json."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lowmem.cli import main
from lowmem.config import ConfigError
from lowmem.train import load_recipe, run

SMALL = dict(train_size=64, eval_size=16, batch_size=8, logging_steps=2, track_memory=False, seed=0)


def _run(out, **kw):
    return run(load_recipe(None, output_dir=str(out), **{**SMALL, **kw}))


def test_resume_is_exact_across_a_projection_refresh(tmp_path, capsys):
    """GaLore refreshes its projection every 3 steps (0, 3, 6): resuming at step 4 must replay the
    refresh at step 6 from the restored state and end on the uninterrupted run's weights."""
    recipe = dict(optim="galore_adamw", optim_args={"rank": 4, "update_proj_gap": 3}, lr=1e-2, steps=8, save_steps=4)
    _run(tmp_path / "full", **recipe)
    full = load_file(tmp_path / "full" / "model.safetensors")

    # a run killed after checkpoint-4 while writing checkpoint-6 (no optimizer.pt yet)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-4", part / "checkpoint-4")
    shutil.copytree(tmp_path / "full" / "checkpoint-8", part / "checkpoint-6")
    (part / "checkpoint-6" / "optimizer.pt").unlink()
    capsys.readouterr()
    m = _run(part, **recipe, resume_from_checkpoint=True)
    out = capsys.readouterr().out
    assert "skipping incomplete checkpoint" in out and "checkpoint-6" in out and "optimizer.pt" in out
    assert m["resumed_from"] == str(part / "checkpoint-4") and m["steps"] == 8
    resumed = load_file(part / "model.safetensors")
    start = load_file(tmp_path / "full" / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(resumed[k], start[k]) for k in start)  # it trained after the resume point
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-6, atol=1e-7, msg=k)

    # the later, incomplete checkpoint-6 was moved aside before the resumed run wrote its own (AUDIT-RESUME18 5)
    assert not (part / "checkpoint-6").exists() or (part / "checkpoint-6" / "optimizer.pt").exists()
    assert any((d / "checkpoint-6").is_dir() for d in part.glob("earlier-run-*"))

    # an explicit path must be complete: Trainer.train would silently start a fresh optimizer
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "full" / "checkpoint-8", again / "checkpoint-6")
    (again / "checkpoint-6" / "optimizer.pt").unlink()
    with pytest.raises(ConfigError, match=r"missing \['optimizer.pt'\]"):
        _run(again, **recipe, resume_from_checkpoint=str(again / "checkpoint-6"))


def test_resume_given_in_training_args_is_honoured(tmp_path):
    from safetensors.torch import save_file

    _run(tmp_path, optim="adamw", steps=4, save_steps=2, lr=1e-3)
    # mark the checkpoint's weights: a resumed run continues from them, a restarted one would not
    ckpt = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    name = next(k for k in ckpt if "embed" in k)
    ckpt[name] = ckpt[name] + 1.0
    save_file(ckpt, tmp_path / "checkpoint-4" / "model.safetensors", metadata={"format": "pt"})
    m = _run(tmp_path, optim="adamw", steps=6, save_steps=2, lr=1e-3, training_args={"resume_from_checkpoint": True})
    assert m["resumed_from"] == str(tmp_path / "checkpoint-4") and m["steps"] == 6
    final = load_file(tmp_path / "model.safetensors")
    assert (final[name] - ckpt[name]).abs().max() < 0.01  # 2 AdamW steps of lr 1e-3 from the checkpoint
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_lora_saves_adapter_and_merged_model_with_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem.kit import load_model_and_tokenizer

    m = _run(tmp_path, optim="adamw", lr=5e-2, steps=4, lora={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
             merge_adapters=True)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "tokenizer_config.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()  # the adapter, not a full copy
    assert m["merged_model"] == str(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    base, _ = load_model_and_tokenizer(None, seed=0)
    adapter = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    ids = tok(["12+7=19", "3+4=7"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        want, got = adapter(ids).logits, merged(ids).logits
        plain = load_model_and_tokenizer(None, seed=0)[0](ids).logits
    assert not torch.allclose(want, plain, atol=1e-4)  # the adapter learned something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_qlora_saves_adapter_and_a_loadable_merged_model(tmp_path):
    from transformers import AutoModelForCausalLM

    _run(tmp_path, optim="adamw", lr=1e-2, steps=2, quantization="nf4", lora={"r": 4, "target_modules": "all-linear"},
         merge_adapters=True)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # full precision, not 4-bit
    with torch.no_grad():
        assert torch.isfinite(merged(torch.tensor([[1, 5, 6]])).logits).all()


def test_full_finetune_saves_loadable_model_and_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem.kit import build_tiny_model

    m = _run(tmp_path, optim="adamw", lr=1e-2, steps=3)
    assert m["saved_model"] == str(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.decode(tok("12+7=19").input_ids, skip_special_tokens=True) == "12+7=19"
    start = dict(build_tiny_model(0)[0].named_parameters())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, start[n])]
    assert changed  # the trained weights were saved, not the initial ones


def test_eval_during_training_in_log_and_metrics(tmp_path, capsys):
    m = _run(tmp_path, optim="adamw", lr=1e-2, steps=6, eval_steps=2)
    steps = [h["step"] for h in m["eval_history"]]
    assert steps == [0, 2, 4, 6]  # before training, then every 2 steps (the evaluation after training is step 6's)
    losses = [h["eval_loss"] for h in m["eval_history"]]
    assert losses[0] == m["initial_loss"] and losses[-1] == pytest.approx(m["final_loss"])
    assert losses[3] < losses[2] < losses[1] < losses[0]
    assert "'eval_loss'" in capsys.readouterr().out  # logged during the run
    assert json.loads((tmp_path / "metrics.json").read_text())["eval_history"] == m["eval_history"]


def test_grpo_eval_during_training_on_held_out_prompts(tmp_path, capsys):
    """GRPO with eval_steps on the synthetic task: completions sampled for the eval_size held-out prompts
    are scored before training, every eval_steps and after; eval_reward (and TRL's eval_loss) are in the
    log and in metrics.json's eval_history."""
    m = _run(tmp_path, trainer="grpo", optim="adafactor", steps=4, eval_steps=2, eval_size=8, logging_steps=1,
             save_model=False, training_args={"num_generations": 4, "max_completion_length": 4})
    hist = m["eval_history"]
    assert [h["step"] for h in hist] == [0, 2, 4]
    assert all(0.0 <= h["eval_reward"] <= 1.0 and "eval_loss" in h for h in hist)
    assert m["initial_eval_reward"] == hist[0]["eval_reward"] and m["final_eval_reward"] == hist[-1]["eval_reward"]
    out = capsys.readouterr().out
    assert "'eval_reward'" in out and "held-out prompts' mean reward: initial" in out
    assert json.loads((tmp_path / "metrics.json").read_text())["eval_history"] == hist
    plain = _run(tmp_path / "plain", trainer="grpo", optim="adafactor", steps=1, logging_steps=1, save_model=False,
                 training_args={"num_generations": 4, "max_completion_length": 4})
    assert plain["eval_history"] == [] and "initial_eval_reward" not in plain  # no eval_steps: no evaluation


def test_effective_hyperparameters_are_read_back_from_the_optimizer(tmp_path):
    m = _run(tmp_path, optim="adamw", lr="3e-4", weight_decay=0.1, steps=2, training_args={"adam_beta2": "0.95"})
    groups = m["effective_hparams"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]  # norms and biases never decay
    for g in groups:
        assert g["lr"] == 3e-4 and g["betas"] == [0.9, 0.95] and g["eps"] == 1e-8
    assert sum(g["num_params"] for g in groups) == m["trainable_params"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["effective_hparams"] == groups

    m = _run(tmp_path / "galore", optim="galore_adamw", optim_args="rank=4,update_proj_gap=50", steps=1)
    ranks = sorted({g.get("rank") for g in m["effective_hparams"]}, key=str)
    assert 4 in ranks and all(g["lr"] == 1e-2 for g in m["effective_hparams"])


def test_cli_resume_flag(tmp_path, capsys):
    assert main(["train", "--steps", "2", "--save-steps", "2", "--output-dir", str(tmp_path), "--batch-size", "4"]) == 0
    assert main(["train", "--steps", "2", "--save-steps", "2", "--output-dir", str(tmp_path), "--batch-size", "4"]) == 0
    assert "holds ['checkpoint-2'] from an earlier run" in capsys.readouterr().out  # a restart is said, not silent
    capsys.readouterr()
    assert main(["train", "--steps", "3", "--output-dir", str(tmp_path), "--batch-size", "4", "--resume"]) == 0
    assert "from an earlier run" not in capsys.readouterr().out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["resumed_from"] == str(tmp_path / "checkpoint-2") and m["steps"] == 3


def test_cli_resume_before_the_recipe_takes_the_recipe(tmp_path, monkeypatch):
    import lowmem.train

    seen = []
    monkeypatch.setattr(lowmem.train, "run", lambda recipe: seen.append(recipe))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 3\n")
    assert main(["train", "--resume", str(recipe)]) == 0  # argparse gives the recipe to --resume
    assert seen[0].steps == 3 and seen[0].resume_from_checkpoint is True
    assert main(["train", str(recipe), f"--resume={tmp_path}"]) == 0
    assert seen[1].resume_from_checkpoint == str(tmp_path)
