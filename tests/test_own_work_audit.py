"""A user who brings their own model, data, rewards and Trainer/TRL configs to `lowmem train`, following
README.md and docs/training.md literally (the OWNDATA helper's audit, 2026-11-30, eighth session). Each
test is a defect found that way; each was red before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowmem.cli import main


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A user's GPT-2 (learned position table of 16 positions: `n_positions`) with the kit's character
    tokenizer, saved with save_pretrained; no chat template, like the real gpt2."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lowmem.kit import build_tokenizer

    tok = build_tokenizer(model_max_length=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    path = tmp_path_factory.mktemp("gpt2-user")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_grpo_completion_length_fits_the_model_context(gpt2_dir, tmp_path, capsys):
    """GRPO on a model shorter than TRL's default max_completion_length=512 (GPT-2's n_positions): generation
    ran past the position table and crashed mid-step with `IndexError: index out of range in self` (a
    traceback, exit 1); on rotary models it ran on positions never trained, slowly. TRL's default now becomes
    the room the longest prompt leaves, with a note; a max_completion_length the user sets beyond it is an
    error before training."""
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(4)])
    recipe = tmp_path / "g.yaml"
    recipe.write_text("trainer: grpo\nreward_funcs: [exact_match]\nnum_generations: 2\n")
    out = tmp_path / "out"
    argv = ["train", str(recipe), "--model", gpt2_dir, "--dataset", str(prompts), "--steps", "1", "--batch-size", "2",
            "--output-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    # '<bos>3+3=' is 5 tokens of the character tokenizer: 16 - 5 = 11 left for the completion
    assert "note: max_completion_length=11, the room the longest prompt (5 tokens) leaves" in printed
    assert "n_positions" in printed or "max_position_embeddings=16" in printed
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1
    recipe.write_text("trainer: grpo\nreward_funcs: [exact_match]\nnum_generations: 2\nmax_completion_length: 12\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lowmem: error: max_completion_length=12 plus the longest prompt (5 tokens) exceeds the model's context" in err
    assert "set max_completion_length <= 11" in err


def test_prompt_token_lengths_standard_and_conversational(tokenizer):
    from lowmem.train import prompt_token_lengths

    from conftest import OWN_CHAT_TEMPLATE

    import copy

    tok = copy.deepcopy(tokenizer)  # the session's kit tokenizer, left without a template for other tests
    tok.chat_template = OWN_CHAT_TEMPLATE
    chat = [{"role": "user", "content": "12+7="}]
    rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)  # "u:12+7=|a:"
    assert prompt_token_lengths(["1+2=", chat, "12+7="], tok) == [
        len(tok("1+2=")["input_ids"]), len(tok(rendered, add_special_tokens=False)["input_ids"]), len(tok("12+7=")["input_ids"])]
    assert prompt_token_lengths(["1+2="], tok) == [5]  # <bos> + 4 characters


@pytest.mark.parametrize("extra, message", [
    ([], r"batch_size=4 gives 4 completions per generation \(batch_size x 1 process\(es\) x 1 steps_per_generation\), "
         r"not whole groups of num_generations=8 \(TRL default\): set batch_size to a multiple of 8 \(e.g. 8\) or "
         r"num_generations to a divisor of 4 \(\[2, 4\]\)"),
    (["--batch-size", "6"], r"batch_size=6 .* num_generations=4: set batch_size to a multiple of 4 \(e.g. 8\)"),
])
def test_grpo_batch_of_partial_groups_names_batch_size(tmp_path, capsys, extra, message):
    """`lowmem train --trainer grpo --batch-size 4` (TRL's default num_generations=8) stopped with TRL's
    'LowMemGRPOConfig: generation_batch_size (4) must be divisible by num_generations (8)': two fields the
    user never set. The error names batch_size and num_generations and what fits."""
    import re

    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    recipe = tmp_path / "g.yaml"
    recipe.write_text("trainer: grpo\nreward_funcs: [exact_match]\n" + ("num_generations: 4\n" if extra else ""))
    argv = ["train", str(recipe), "--dataset", str(prompts), "--batch-size", "4", "--output-dir", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search("lowmem: error: " + message, err), err


@pytest.mark.parametrize("text, expected, absent", [
    ("trainer: dpo\nmax_prompt_length: 32\nmax_completion_length: 16\n",
     ["max_prompt_length -> nothing in TRL 1.16", "max_completion_length -> max_length for sft / dpo"], "set trainer:"),
    # a DPO config of an older TRL with only max_completion_length was told to "set trainer: grpo"
    ("trainer: dpo\nmax_completion_length: 16\n", ["max_completion_length -> max_length for sft / dpo"], "set trainer: grpo"),
    ("trainer: grpo\nreward_funcs: [exact_match]\nmax_prompt_length: 32\n", ["GRPO prompts are not truncated"], "set trainer:"),
    # a whole GRPO config without trainer: still names the trainer
    ("num_generations: 4\nmax_completion_length: 8\n", ["set trainer: grpo / gvpo / bnpo"], "lowmem's spelling"),
])
def test_older_trl_length_keys_get_their_hint(tmp_path, text, expected, absent):
    """max_prompt_length (GRPOConfig / DPOConfig before TRL 1.0; written in most published configs) was
    'unknown recipe key' with did-you-mean max_completion_length, a field that means something else; a DPO
    config's max_completion_length was sent to trainer: grpo."""
    from lowmem.train import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("dataset: d.jsonl\n" + text)
    with pytest.raises(ValueError) as err:
        load_recipe(path)
    assert all(e in str(err.value) for e in expected) and absent not in str(err.value), str(err.value)
