"""What comes out of a ``lowmem train`` run, checked the way a user loads it: the adapter of a LoRA run with
peft's ``AutoPeftModelForCausalLM`` from another directory, and the metrics of a run with
``load_best_model_at_end`` (which weights were saved, which step each eval loss belongs to)."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lowmem.train import load_recipe, run

SMALL = dict(train_size=64, eval_size=16, batch_size=8, logging_steps=2, track_memory=False, seed=0)


def test_the_adapter_names_its_base_model_by_an_absolute_path(tmp_path, tiny_model_path, monkeypatch):
    """``--model base`` (a path relative to the current directory, as users type it): peft wrote
    ``base_model_name_or_path: "base"`` into adapter_config.json, so ``AutoPeftModelForCausalLM`` loaded from
    any other directory took ``base`` for a Hub id (offline: OSError)."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model_path, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    run(load_recipe(None, model="base", output_dir="out", optim="adamw", lr=5e-2, steps=2,
                    lora={"r": 4, "target_modules": "all-linear"}, **SMALL))
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    monkeypatch.chdir(tmp_path / "out")  # the user loads it from elsewhere
    auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    manual = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")),
                                       str(tmp_path / "out")).eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        want = manual(ids).logits
        torch.testing.assert_close(auto(ids).logits, want)
    # docs/training.md "Merging an adapter later": the merge without merge_adapters, as the page writes it
    from transformers import AutoTokenizer

    auto.merge_and_unload().save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(str(tmp_path / "out")).save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def best_run(tmp_path_factory):
    """lr 0.05 on the synthetic task: eval loss 2.56 at step 2, 3.17 at step 4, worse at step 6; the Trainer
    loads checkpoint-2 at the end (load_best_model_at_end) and that is the model saved."""
    from rich.console import Console

    out, printed = tmp_path_factory.mktemp("best"), io.StringIO()
    m = run(load_recipe(None, output_dir=str(out), optim="adamw", lr=0.05, steps=6, save_steps=2, eval_steps=2,
                        training_args={"load_best_model_at_end": True, "metric_for_best_model": "eval_loss"}, **SMALL),
            console=Console(file=printed, width=400))
    return out, m, printed.getvalue()


def test_load_best_model_at_end_keeps_each_steps_own_eval_loss(best_run):
    """``eval_history`` merged the evaluation after training (of the best model, loaded from checkpoint-2) into
    the entry of step 6: it said step 6 had step 2's loss."""
    out, m, _ = best_run
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    logged = {h["step"]: h["eval_loss"] for h in state["log_history"] if "eval_loss" in h}  # the Trainer's own log
    assert logged[6] != logged[2]
    assert [(h["step"], h["eval_loss"]) for h in m["eval_history"]] == sorted(logged.items())


def test_load_best_model_at_end_says_which_step_was_saved(best_run):
    """metrics.json and the summary said 'final ... after 6 steps' of a model that was step 2's."""
    out, m, printed = best_run
    assert m["steps"] == 6 and m["best_model_step"] == 2
    assert m["final_loss"] == pytest.approx(m["eval_history"][1]["eval_loss"])  # the saved (best) model's loss
    assert m["best_metric"] == pytest.approx(m["final_loss"])
    assert json.loads((out / "metrics.json").read_text())["best_model_step"] == 2
    assert "the best checkpoint, step 2" in printed


def test_saved_weights_get_the_permissions_of_the_umask(tmp_path):
    """safetensors (0.8) creates its files 0600: the model a run saved, and its checkpoints' weights, were readable by
    their owner only under umask 022 (a serving process of another user, or a group-shared folder, got 'Permission
    denied'), while metrics.json and the Trainer's other files are 0644."""
    old = os.umask(0o022)
    try:
        run(load_recipe(None, output_dir=str(tmp_path), optim="adamw", lr=1e-3, steps=2, save_steps=2, **SMALL))
    finally:
        os.umask(old)
    for f in (tmp_path / "model.safetensors", tmp_path / "checkpoint-2" / "model.safetensors",
              tmp_path / "config.json", tmp_path / "metrics.json"):
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_a_strict_umask_keeps_the_saved_model_private(tmp_path):
    """The umask decides, as for open(): 077 gives 0600 (nothing is loosened beyond what the user asked)."""
    from lowmem.kit import save_tiny_model  # through lowmem.io.install_staged too

    old = os.umask(0o077)
    try:
        save_tiny_model(tmp_path / "m", seed=0)
    finally:
        os.umask(old)
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "m").iterdir()} == {0o600}


@pytest.mark.parametrize("first, second", [("lora", "full"), ("full", "lora")])
def test_a_run_into_an_output_dir_of_another_kind_of_model_leaves_only_its_own(tmp_path, tiny_model_path, first, second):
    """A full fine-tune into the output_dir of a LoRA run left adapter_config.json / adapter_model.safetensors beside
    the new model.safetensors, and AutoModelForCausalLM.from_pretrained(OUTPUT_DIR) attached the old adapter to the
    new weights (transformers loads an adapter it finds); a LoRA run over a full fine-tune left the old config.json +
    model.safetensors, which from_pretrained loaded under the new adapter."""
    from transformers import AutoModelForCausalLM

    kinds = {"lora": dict(lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}), "full": {}}
    for kind in (first, second):
        run(load_recipe(None, model=tiny_model_path, output_dir=str(tmp_path), optim="adamw", lr=5e-2, steps=2,
                        **kinds[kind], **SMALL))
    names = {p.name for p in tmp_path.iterdir()}
    if second == "full":
        assert not names & {"adapter_config.json", "adapter_model.safetensors"}
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
        assert not any("lora" in n for n, _ in model.named_parameters())
    else:
        assert not names & {"model.safetensors", "config.json"}


def test_the_model_card_names_the_saved_model_and_its_base(tmp_path, own_model_dir):
    """TRL writes README.md (a model card) with the run's hub_model_id, None offline, for a base it calls None when it is
    a local directory: 'fine-tuned version of [None](https://huggingface.co/None)' and
    pipeline("text-generation", model="None"), which asked the Hub for 'None' when run."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n"
                            for a in range(8) for b in range(2)))
    out = tmp_path / "out"
    run(load_recipe(None, model=own_model_dir, dataset=str(data), output_dir=str(out), optim="adamw", lr=1e-3,
                    steps=1, save_steps=1, **{k: v for k, v in SMALL.items() if k not in ("train_size", "eval_size")}))
    card = (out / "README.md").read_text()
    assert "None" not in card and f'model="{out.resolve()}"' in card and str(Path(own_model_dir).resolve()) in card
