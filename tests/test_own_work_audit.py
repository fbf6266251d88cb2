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
            "--lr", "1e-2", "--output-dir", str(out)]
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
    argv = ["train", str(recipe), "--dataset", str(prompts), *(extra or ["--batch-size", "4"]), "--output-dir", str(tmp_path / "o")]
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


def test_dpo_full_finetune_trains_in_the_recipe_dtype_from_one_copy(tiny_model_path, tmp_path, monkeypatch):
    """`dtype: bfloat16` with trainer: dpo (or grpo) was silently ignored: lowmem loaded the model in bf16, then
    handed TRL the directory, and TRL loaded the policy and reference in its own default float32 (the saved
    model was float32), while lowmem's bf16 copy stayed alive beside it for the whole run. TRL now gets
    model_init_kwargs {dtype: ...} and lowmem loads no copy of its own."""
    import lowmem.train
    from safetensors import safe_open

    def no_second_copy(recipe):
        raise AssertionError("the policy was loaded by lowmem as well as by TRL")

    monkeypatch.setattr(lowmem.train, "load_policy", no_second_copy)
    pairs = _jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)}
                                              for a in range(4)])
    out = tmp_path / "out"
    recipe = tmp_path / "d.yaml"
    recipe.write_text(f"trainer: dpo\nmodel: {tiny_model_path}\ndataset: {pairs}\ndtype: bfloat16\nsteps: 1\nlr: 1e-2\n"
                      f"batch_size: 2\noutput_dir: {out}\n")
    assert main(["train", str(recipe)]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}


@pytest.mark.parametrize("text, expected", [
    ("trust_remote_code: true\n", "trust_remote_code=true: lowmem never runs a model's remote code"),
    ("model_init_kwargs: {trust_remote_code: true}\n", "model_init_kwargs.trust_remote_code=true: lowmem never runs"),
    ("model_init_kwargs: {dtype: auto}\n", "model_init_kwargs.dtype='auto': expected one of"),
    ("dtype: float16\nmodel_init_kwargs: {torch_dtype: bfloat16}\n",
     "dtype is 'float16' in the recipe and model_init_kwargs.torch_dtype is 'bfloat16'; give it once"),
])
def test_trl_model_loading_fields(tmp_path, text, expected):
    """trust_remote_code: true (a field of TRL's configs) reached TRL, which ran the model directory's code;
    model_init_kwargs' dtype is the recipe's dtype (one value, checked)."""
    from lowmem.train import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("trainer: dpo\n" + text)
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_recipe(path)


def test_model_init_kwargs_dtype_is_the_recipe_dtype(tmp_path):
    from lowmem.train import build_training_args, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("trainer: grpo\nmodel_init_kwargs: {torch_dtype: bfloat16, attn_implementation: eager}\n"
                    "trust_remote_code: false\n")
    recipe = load_recipe(path, output_dir=str(tmp_path / "o"))
    assert recipe.dtype == "bfloat16" and recipe.training_args == {"model_init_kwargs": {"attn_implementation": "eager"}}
    args = build_training_args(recipe)
    assert args.model_init_kwargs == {"attn_implementation": "eager", "dtype": "bfloat16"} and not args.trust_remote_code
    assert build_training_args(load_recipe(None, trainer="dpo", output_dir=str(tmp_path))).model_init_kwargs == {
        "dtype": "float32"}


def test_sft_text_under_another_column_name_suggests_dataset_text_field(tmp_path):
    """A parquet of one string column 'content' got 'fits no sft dataset format' and no way forward; TRL's
    SFTConfig.dataset_text_field trains on it (lowmem supports it), and the error now says so."""
    import pandas as pd

    from lowmem.data import load_train_data

    path = tmp_path / "notes.parquet"
    pd.DataFrame({"id": [1, 2], "content": ["hello there", "general kenobi"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"set dataset_text_field: content \(a top-level recipe key\)"):
        load_train_data(str(path), "sft")
    assert load_train_data(str(path), "sft", text_field="content").format.name == "content"


def test_reward_function_failing_on_conversational_completions_is_one_line(tmp_path):
    """A reward written for strings (re.findall on each completion) met conversational completions (lists of
    messages) in the middle of TRL's step: a traceback through TRL ending in `re`. It is a ValueError naming
    the reward, the line of the user's file, and how to get a completion's text."""
    from lowmem.rewards import resolve_reward

    path = tmp_path / "my_rewards.py"
    path.write_text("import re\n\ndef correct(prompts, completions, answer, **kw):\n"
                    "    return [float(re.findall(r'\\d+', c)[-1] == a) for c, a in zip(completions, answer)]\n")
    fn = resolve_reward(f"{path}:correct", columns=["prompt", "answer"])
    assert fn(prompts=["1+1="], completions=["it is 2"], answer=["2"]) == [1.0]  # strings: as before
    chat = [[{"role": "assistant", "content": "it is 2"}]]
    with pytest.raises(ValueError) as err:
        fn(prompts=[[{"role": "user", "content": "1+1="}]], completions=chat, answer=["2"])
    text = str(err.value)
    assert text.startswith(f"reward function '{path}:correct' raised TypeError: expected string")
    assert f"({path}, line 4)" in text and "completion[-1]['content']" in text
    with pytest.raises(ValueError, match=r"raised KeyError: 'x' \(.*my_rewards.py, line 2\)$"):  # no hint: not that case
        path.write_text("def bad(prompts, completions, **kw):\n    return {}['x']\n")
        resolve_reward(f"{path}:bad", columns=["prompt"])(prompts=["p"], completions=["c"])


@pytest.mark.parametrize("text", ["dataset: d.jsonl\n", "trainer: dpo\nlora: {r: 4}\n"])
def test_model_init_kwargs_where_lowmem_loads_the_model(tmp_path, text):
    """SFTConfig's model_init_kwargs (attn_implementation, ...) went to TRL with a model lowmem had loaded:
    'The `model_init_kwargs` will be ignored' in the log, and the run went on without them."""
    from lowmem.train import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(text + "model_init_kwargs: {attn_implementation: eager}\n")
    with pytest.raises(ValueError, match=r"model_init_kwargs=\{'attn_implementation': 'eager'\}: lowmem loads the "
                                         r"model itself here \((trainer sft|lora / quantization)"):
        load_recipe(path)
    path.write_text(text + "model_init_kwargs: {dtype: bfloat16}\n")
    assert load_recipe(path).dtype == "bfloat16"  # dtype applies everywhere: it is the recipe's field


def test_user_data_outside_the_embedded_models_alphabet(tmp_path, capsys):
    """`lowmem train --dataset my.jsonl` without --model trained the embedded tiny model on the user's text,
    every capital letter and newline encoded as <unk> without a word. It is an error naming the characters and
    the fix; data within the alphabet (the shipped configs/*_jsonl.yaml) still trains."""
    rows = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "What is 1 plus 2?"},
                                                          {"role": "assistant", "content": "It is 3.\nDone"}]}])
    assert main(["train", "--dataset", str(rows), "--output-dir", str(tmp_path / "o"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "no model is given, and the embedded tiny model's character tokenizer" in err
    assert "lacks 4 characters of this data (4 kinds" in err and "'\\n'" in err and "--model DIR" in err
    from lowmem.data import check_embedded_alphabet, load_train_data

    check_embedded_alphabet(load_train_data(str(_jsonl(tmp_path / "ok.jsonl", [{"text": "12+7=19, ok!"}])), "sft"))


@pytest.mark.parametrize("key, expected", [
    ("no_cuda: true", "no_cuda -> use_cpu (transformers 5's name)"),
    ("evaluation_strategy: steps", "evaluation_strategy -> eval_strategy"),
    ("overwrite_output_dir: true", "overwrite_output_dir -> nothing: transformers 5 dropped it"),
    ("logging_dir: logs", "logging_dir -> nothing: transformers 5 dropped it"),
    ("group_by_length: true", "group_by_length -> train_sampling_strategy: group_by_length"),
])
@pytest.mark.parametrize("nested", [False, True])
def test_transformers_4_training_arguments_get_their_v5_spelling(tmp_path, key, expected, nested):
    """A TrainingArguments config written for transformers 4 (overwrite_output_dir, no_cuda, logging_dir, ...)
    got 'unknown recipe key' with did-you-mean output_dir / logging_steps (other fields) or nothing; the
    message now names what transformers 5 calls it, or that it is gone, at the top level and in training_args."""
    from lowmem.train import load_recipe

    path = tmp_path / "r.yaml"
    name, value = key.split(": ")
    path.write_text("dataset: d.jsonl\n" + (f"training_args: {{{name}: {value}}}\n" if nested else key + "\n"))
    with pytest.raises(ValueError) as err:
        load_recipe(path)
    assert expected in str(err.value) and "did you mean ['output_dir']" not in str(err.value), str(err.value)


@pytest.mark.parametrize("ref, expected", [
    ("accuracy_reward", "(a `trl grpo` script name: here 'trl.rewards:accuracy_reward')"),
    ("my_rewards.correct", "(the `trl grpo` script's dotted form: here 'my_rewards:correct', or 'path/to/my_rewards.py:correct')"),
    ("nope", "Unknown reward 'nope' in reward_funcs[0]: expected"),
])
def test_trl_script_reward_spellings(ref, expected):
    """`--reward_funcs accuracy_reward` and `--reward_funcs my_rewards.correct` (what `trl grpo` takes) were
    'Unknown reward' with no way to write them; the error now says lowmem's spelling."""
    from lowmem.rewards import resolve_reward

    with pytest.raises(ValueError) as err:
        resolve_reward(ref)
    assert expected in str(err.value), str(err.value)
    assert resolve_reward("trl.rewards:think_format_reward").__name__ == "think_format_reward"


def test_assistant_only_loss_without_generation_markers_names_the_field(own_model_dir, tmp_path, capsys):
    """assistant_only_loss: true with a chat template lacking {% generation %} stopped with TRL's 'The chat
    template is not training-compatible ... patching is not supported': neither the field nor whose template."""
    rows = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "1+2="},
                                                          {"role": "assistant", "content": "3"}]}] * 2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {own_model_dir}\ndataset: {rows}\nassistant_only_loss: true\nsteps: 1\nbatch_size: 2\nlr: 1e-2\n"
                      f"output_dir: {tmp_path / 'o'}\n")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "lowmem: error: " in err and "assistant_only_loss=true needs a chat template that marks the assistant's" in err
    assert f"the tokenizer's of {own_model_dir}; set chat_template / --chat-template" in err


def test_nested_reward_weights_count_is_checked_with_the_recipe(tmp_path):
    """training_args: {reward_weights: [1, 0.5]} (GRPOConfig's field) beside one reward function (say after
    --reward-funcs replaced the recipe's) failed in TRL's constructor after the model loaded."""
    from lowmem.train import load_recipe

    path = tmp_path / "g.yaml"
    path.write_text("trainer: grpo\ndataset: p.jsonl\nreward_funcs: [format, exact_match]\n"
                    "training_args: {reward_weights: [1.0, 0.5]}\n")
    assert load_recipe(path).training_args["reward_weights"] == [1.0, 0.5]
    with pytest.raises(ValueError, match=r"training_args.reward_weights has 2 entries \(\[1.0, 0.5\]\) but reward_funcs has 1"):
        load_recipe(path, reward_funcs=["format"])
