"""`lowmem train` end to end on a user's own model directory and data files, as a person using
`trl sft` or LLaMA-Factory would run it: each TRL format, each trainer, rewards from a file and
built-in, and every bad input answered with one line and exit code 2 (nothing written)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import yaml
from own_data import dpo_rows, rl_rows, sft_rows, write_csv, write_jsonl, write_parquet
from rich.console import Console

from lowmem.cli import main
from lowmem.train import TrainRecipe, run

QUIET = dict(save_model=False, track_memory=False)


def _run(**fields) -> tuple[dict, str]:
    fields.setdefault("lr", 1e-2)  # required with a model of one's own; these runs were tuned at 1e-2
    out = io.StringIO()
    metrics = run(TrainRecipe(**fields), console=Console(file=out, width=200))
    assert json.loads((Path(fields["output_dir"]) / "metrics.json").read_text())["steps"] == metrics["steps"]
    return metrics, out.getvalue()


# ---- SFT -------------------------------------------------------------------------------------


def test_sft_text_jsonl_with_eval_file(own_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows("text", 600))
    evals = write_jsonl(tmp_path / "eval.jsonl", sft_rows("text", 64, split="eval"))
    m, log = _run(model=own_model_dir, dataset=str(train), eval_dataset=str(evals), steps=40, logging_steps=10,
                  output_dir=str(tmp_path / "out"), **QUIET)
    assert m["data"] == {"format": "text", "conversational": False, "columns": ["text"], "extra_columns": [],
                         "train_rows": 600, "eval_rows": 64}
    assert m["final_loss"] < m["initial_loss"] - 1.0, (m["initial_loss"], m["final_loss"])
    assert m["steps"] == 40 and "eval loss: initial" in log


def test_sft_messages_parquet_with_eval_split(own_model_dir, tmp_path):
    train = write_parquet(tmp_path / "chat.parquet", sft_rows("messages", 660))
    m, _ = _run(model=own_model_dir, dataset=str(train), eval_split=0.1, steps=40, logging_steps=10,
                output_dir=str(tmp_path / "out"), save_model=True, track_memory=False)
    assert (m["data"]["format"], m["data"]["conversational"]) == ("messages", True)
    assert (m["data"]["train_rows"], m["data"]["eval_rows"]) == (594, 66)
    assert m["final_loss"] < m["initial_loss"] - 1.0, (m["initial_loss"], m["final_loss"])
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved.chat_template and "u:1+2=|" in saved.apply_chat_template([{"role": "user", "content": "1+2="}],
                                                                            tokenize=False)


def test_sft_conversational_prompt_completion_saved_dataset_and_template_file(tiny_model_path, tmp_path):
    """A model without a chat template, given one by the recipe (a .jinja file); a save_to_disk
    DatasetDict whose 'test' split is the eval set. Loss on the completion only (TRL's default)."""
    from conftest import OWN_CHAT_TEMPLATE
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(sft_rows("prompt-completion-conv", 600)),
                 "test": Dataset.from_list(sft_rows("prompt-completion-conv", 64, split="eval"))}
                ).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "chat.jinja").write_text(OWN_CHAT_TEMPLATE)
    m, _ = _run(model=tiny_model_path, dataset=str(tmp_path / "saved"), eval_dataset=str(tmp_path / "saved"),
                chat_template=str(tmp_path / "chat.jinja"), steps=40, logging_steps=10,
                output_dir=str(tmp_path / "out"), **QUIET)
    assert (m["data"]["format"], m["data"]["conversational"], m["data"]["eval_rows"]) == ("prompt-completion", True, 64)
    assert m["final_loss"] < m["initial_loss"] - 1.0, (m["initial_loss"], m["final_loss"])


def test_sft_cli_two_csv_files_without_eval_set(own_model_dir, tmp_path, capsys):
    rows = sft_rows("prompt-completion", 400)
    first, second = write_csv(tmp_path / "a.csv", rows[:300]), write_csv(tmp_path / "b.csv", rows[300:])
    recipe = tmp_path / "recipe.yaml"
    # max_length: an SFTConfig field at the top level, valid because --dataset makes this TRL's SFTTrainer
    recipe.write_text(yaml.safe_dump({"trainer": "sft", "steps": 30, "logging_steps": 5, "save_model": False,
                                      "track_memory": False, "max_length": 64}))
    rc = main(["train", str(recipe), "--dataset", str(first), "--dataset", str(second), "--model", own_model_dir,
               "--lr", "1e-2", "--output-dir", str(tmp_path / "o")])
    assert rc == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["data"]["format"] == "prompt-completion" and m["data"]["train_rows"] == 400 and m["initial_loss"] is None
    hist = m["train_loss_history"]
    assert len(hist) == 6 and hist[-1] < hist[0] - 0.5, hist
    assert "training loss (no eval set)" in capsys.readouterr().out


# ---- DPO -------------------------------------------------------------------------------------


def _implicit(row: dict) -> dict:
    """TRL's implicit-prompt form: the prompt written into both chosen and rejected."""
    return {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}


@pytest.mark.parametrize(("form", "rows", "fmt"), [
    ("conversational", dpo_rows(256, conversational=True), ("preference", True)),
    ("implicit prompt", [_implicit(r) for r in dpo_rows(256, conversational=True)], ("implicit-prompt preference", True)),
])
def test_dpo_margin_rises(own_model_dir, tmp_path, form, rows, fmt):
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    m, log = _run(trainer="dpo", model=own_model_dir, dataset=str(data), steps=30, logging_steps=10,
                  output_dir=str(tmp_path / "out"), training_args={"beta": 0.1}, **QUIET)
    assert (m["data"]["format"], m["data"]["conversational"]) == fmt
    assert m["final_margin"] > m["initial_margin"] + 0.05, (m["initial_margin"], m["final_margin"])
    assert "margin" in log


@pytest.mark.parametrize("trainer", ["sft", "dpo"])
def test_users_eval_on_start_false_is_kept(own_model_dir, tmp_path, trainer):
    """lowmem evaluates before training for its before/after summary, unless the user's config says
    ``eval_on_start: false``: theirs wins (no evaluation at step 0), and the initial numbers are null."""
    rows = sft_rows("text", 80) if trainer == "sft" else dpo_rows(16)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    extra = {"eval_split": 0.2} if trainer == "sft" else {}
    m, log = _run(trainer=trainer, model=own_model_dir, dataset=str(data), steps=2, logging_steps=1,
                  output_dir=str(tmp_path / "out"), training_args={"eval_on_start": False}, **extra, **QUIET)
    initial, final = ("initial_loss", "final_loss") if trainer == "sft" else ("initial_margin", "final_margin")
    assert m[initial] is None and m[final] is not None
    assert "not evaluated (eval_on_start: false)" in log


# ---- GRPO / GVPO / BNPO ----------------------------------------------------------------------

RL_ARGS = {"num_generations": 4, "max_completion_length": 6}


def test_grpo_reward_function_from_a_file(own_model_dir, tmp_path):
    """The user's reward in a .py file; the extra column 'answer' arrives as a keyword argument."""
    (tmp_path / "my_reward.py").write_text(
        "from lowmem.kit import score\n\n"
        "def digits_then_sum(prompts, completions, answer, **kwargs):\n"
        "    return [score(c, a) for c, a in zip(completions, answer)]\n"
    )
    data = write_jsonl(tmp_path / "prompts.jsonl", rl_rows(256))
    m, log = _run(trainer="grpo", model=own_model_dir, dataset=str(data), steps=30, logging_steps=1,
                  reward_funcs=[f"{tmp_path / 'my_reward.py'}:digits_then_sum"], output_dir=str(tmp_path / "out"),
                  training_args=RL_ARGS, **QUIET)
    assert m["data"]["extra_columns"] == ["answer"]
    assert m["final_reward"] > m["initial_reward"] + 0.15, m["reward_history"]
    assert "mean reward" in log


def test_grpo_builtin_rewards_with_weights(own_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", rl_rows(256))
    m, _ = _run(trainer="grpo", model=own_model_dir, dataset=str(data), steps=30, logging_steps=1,
                reward_funcs=["addition", "exact_match"], reward_weights=[1.0, 0.5], output_dir=str(tmp_path / "out"),
                training_args=RL_ARGS, **QUIET)
    assert m["final_reward"] > m["initial_reward"] + 0.15, m["reward_history"]
    per_func = m["reward_func_histories"]
    assert sorted(per_func) == ["addition", "exact_match"] and len(per_func["exact_match"]) == 30
    last = -1  # the logged total is the weighted sum of the functions' means
    assert m["reward_history"][last] == pytest.approx(per_func["addition"][last]
                                                      + 0.5 * per_func["exact_match"][last], abs=1e-3)


@pytest.mark.parametrize(("trainer", "extra", "conversational"), [
    ("gvpo", {"beta": 0.1, "reference_policy": "sampling"}, True),
    ("bnpo", {"reward_range": [0.0, 1.0]}, False),
])
def test_gvpo_bnpo_on_own_data(own_model_dir, tmp_path, trainer, extra, conversational):
    data = write_jsonl(tmp_path / "prompts.jsonl", rl_rows(256, conversational=conversational))
    m, _ = _run(trainer=trainer, model=own_model_dir, dataset=str(data), steps=30, logging_steps=1,
                reward_funcs=["addition"], output_dir=str(tmp_path / "out"), training_args={**RL_ARGS, **extra}, **QUIET)
    assert m["data"]["conversational"] is conversational
    assert m["final_reward"] > m["initial_reward"] + 0.15, m["reward_history"]


# ---- bad inputs: one line, exit code 2, nothing written ----------------------------------------


def _bad_inputs(tmp_path: Path, tiny_model_path: str) -> dict[str, tuple[list[str], str]]:
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+1=", "response": "2"}])
    write_jsonl(tmp_path / "chat.jsonl", sft_rows("messages", 8))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("text\n")
    (tmp_path / "data.xlsx").write_text("x")
    (tmp_path / "tmpl.yaml").write_text(yaml.safe_dump({"chat_template": str(tmp_path / "gone.jinja")}))
    return {
        "missing file": (["--dataset", str(tmp_path / "nope.jsonl")], r"dataset: '.*nope.jsonl' does not exist"),
        "no format": (["--dataset", str(tmp_path / "qa.jsonl")],
                      r"columns \['question', 'response'\] fit no sft dataset format; accepted: 'text'"),
        "no chat template": (["--dataset", str(tmp_path / "chat.jsonl"), "--model", tiny_model_path, "--lr", "1e-2"],
                             r"is conversational, but the tokenizer of model .* has no chat template; set chat_template"),
        "empty file": (["--dataset", str(tmp_path / "empty.jsonl")], r"empty file\(s\)"),
        "empty dataset": (["--dataset", str(tmp_path / "header.csv")], r"header.csv' is empty"),
        "unknown extension": (["--dataset", str(tmp_path / "data.xlsx")], r"unknown file extension\(s\) \['.xlsx'\]"),
        "missing template file": ([str(tmp_path / "tmpl.yaml"), "--dataset", str(tmp_path / "chat.jsonl")],
                                  r"chat_template: file '.*gone.jinja' does not exist"),
    }


@pytest.mark.parametrize("case", ["missing file", "no format", "no chat template", "empty file", "empty dataset",
                                  "unknown extension", "missing template file"])
def test_bad_dataset_exits_2_with_one_line(case, tmp_path, tiny_model_path, capsys):
    argv, message = _bad_inputs(tmp_path, tiny_model_path)[case]
    out = tmp_path / "out"
    rc = main(["train", *argv, "--output-dir", str(out), "--steps", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("lowmem: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not out.exists()


def test_bad_reward_function_exits_2(tmp_path, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", rl_rows(8))
    (tmp_path / "r.py").write_text("def other(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    recipe = tmp_path / "grpo.yaml"
    for funcs, message in [([f"{tmp_path / 'r.py'}:mine"], r"has no attribute 'mine'; its functions: \['other'\]"),
                           ([f"{tmp_path / 'gone.py'}:f"], r"file '.*gone.py' does not exist"),
                           (["exact"], r"Unknown reward 'exact'")]:
        recipe.write_text(yaml.safe_dump({"trainer": "grpo", "dataset": str(data), "reward_funcs": funcs}))
        rc = main(["train", str(recipe), "--output-dir", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and re.search(message, err), err
        assert not (tmp_path / "out").exists()


# ---- a subword tokenizer with ChatML (special tokens, newlines) -----------------------------------


def test_sft_and_grpo_with_a_bpe_chatml_model(bpe_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "12+7="}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n"
    assert len(tok("12+7=19").input_ids) < 7  # subwords, not characters

    train = write_jsonl(tmp_path / "chat.jsonl", sft_rows("messages", 600))
    evals = write_jsonl(tmp_path / "chat_eval.jsonl", sft_rows("messages", 64, split="eval"))
    m, _ = _run(model=bpe_model_dir, dataset=str(train), eval_dataset=str(evals), steps=40, logging_steps=10,
                output_dir=str(tmp_path / "sft"), **QUIET)
    assert m["final_loss"] < m["initial_loss"] - 1.0, (m["initial_loss"], m["final_loss"])

    prompts = write_jsonl(tmp_path / "prompts.jsonl", rl_rows(256, conversational=True))
    m, _ = _run(trainer="grpo", model=bpe_model_dir, dataset=str(prompts), steps=30, logging_steps=1,
                reward_funcs=["addition"], output_dir=str(tmp_path / "grpo"), training_args=RL_ARGS, **QUIET)
    assert m["final_reward"] > m["initial_reward"] + 0.1, m["reward_history"]


@pytest.mark.parametrize("trainer", ["gvpo", "bnpo"])
def test_rl_eval_steps_on_an_eval_split(own_model_dir, tmp_path, trainer):
    """GVPO / BNPO on a user's prompts with eval_split: the held-out prompts are evaluated before training,
    every eval_steps and after (eval_reward in eval_history); without an eval set, eval_steps is an error."""
    data = write_jsonl(tmp_path / "prompts.jsonl", rl_rows(24))
    m, log = _run(trainer=trainer, model=own_model_dir, dataset=str(data), eval_split=0.25, steps=2, eval_steps=1,
                  logging_steps=1, reward_funcs=["addition"], output_dir=str(tmp_path / "out"),
                  training_args=RL_ARGS, batch_size=8, **QUIET)
    assert m["data"]["eval_rows"] == 6 and [h["step"] for h in m["eval_history"]] == [0, 1, 2]
    assert all(0.0 <= h["eval_reward"] <= 1.0 for h in m["eval_history"]) and "held-out prompts" in log
    with pytest.raises(ValueError, match="eval_steps=1 needs a held-out set"):
        TrainRecipe(trainer=trainer, dataset=str(data), reward_funcs=["addition"], eval_steps=1)


def test_grpo_with_a_local_reward_model(own_model_dir, tmp_path):
    """A reward-model directory (sequence classification, one label) beside a built-in reward: TRL loads
    it by path and scores every completion; both appear in reward_func_histories."""
    import torch
    from transformers import LlamaForSequenceClassification

    from lowmem.kit import build_tokenizer, tiny_config

    tok = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        rm = LlamaForSequenceClassification(tiny_config(tok, num_labels=1))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    data = write_jsonl(tmp_path / "prompts.jsonl", rl_rows(32))
    m, _ = _run(trainer="grpo", model=own_model_dir, dataset=str(data), steps=3, logging_steps=1,
                reward_funcs=[str(tmp_path / "rm"), "addition"], output_dir=str(tmp_path / "out"),
                training_args=RL_ARGS, **QUIET)
    assert sorted(m["reward_func_histories"]) == ["addition", "rm"] and len(m["reward_func_histories"]["rm"]) == 3
    from lowmem.rewards import resolve_reward

    with pytest.raises(FileNotFoundError, match=r"reward-model directory '.*missing' does not exist"):
        resolve_reward(str(tmp_path / "missing"))  # when the run starts, before the model loads
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_reward(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="takes no keyword arguments"):
        TrainRecipe(trainer="grpo", reward_funcs=[{"name": str(tmp_path / "rm"), "scale": 2}])
