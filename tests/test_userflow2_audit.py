"""An outside user's TRL-style run on their own model directory and data (a tiny Qwen2 saved with save_pretrained and
a PreTrainedTokenizerFast with a chat template): the defects found and fixed in session 13's audit.

- ``dataset_name`` (``trl sft --config``'s key) made every SFTConfig field of the config an unknown key too
  (``max_length``, ``assistant_only_loss``: checked against the synthetic task's TrainingArguments).
- A chat template's refusal (Gemma's "System role not supported") came after the model's weights loaded.
- TRL's SFTTrainer dropped the rows that truncation to ``max_length`` left without a trained token, without a word
  (12 rows, 3 long prompts: 9 trained, ``metrics.json`` said 12)."""

import json

import pytest
import transformers
from datasets import Dataset

from lowmem.config import ConfigError

REFUSE_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                 "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A tiny Qwen2 directory: config, weights, a fast tokenizer (the kit's characters) with a chat template."""
    from lowmem.kit import build_tokenizer

    path = tmp_path_factory.mktemp("models") / "qwen2"
    tok = build_tokenizer()
    tok.chat_template = REFUSE_SYSTEM
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dataset_name_checks_the_config_as_sfts(tmp_path):
    from lowmem.train import _recipe_keys

    with pytest.raises(ConfigError, match=r"unknown recipe key\(s\) \['dataset_name'\]; lowmem's spelling: dataset_name "
                                          r"-> dataset .* any field of the sft trainer's LowMemSFTConfig"):
        _recipe_keys({"dataset_name": "d.jsonl", "max_length": 64, "assistant_only_loss": True, "packing": False}, "")


def test_template_refusal_before_the_model_loads(tmp_path, qwen2, monkeypatch):
    import lowmem.train
    from lowmem.data import recipe_data
    from lowmem.train import load_recipe

    rows = [{"messages": [{"role": "user", "content": f"{i}+1"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(5)]
    rows[3]["messages"].insert(0, {"role": "system", "content": "add"})
    recipe = load_recipe(None, model=qwen2, dataset=_jsonl(tmp_path / "c.jsonl", rows), lr=1e-4,
                         output_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"c.jsonl: the chat template refuses row 3 \(line 4\) \(roles \['system', "
                                         r"'user', 'assistant'\]\): TemplateError: System role not supported"):
        recipe_data(recipe)  # the data and the tokenizer only

    def no_model(*a, **k):
        raise AssertionError("the model loaded before the data's template check")

    monkeypatch.setattr(lowmem.train, "load_policy", no_model)
    from lowmem.cli import main

    assert main(["train", "--model", qwen2, "--dataset", str(tmp_path / "c.jsonl"), "--lr", "1e-4", "--steps", "1",
                 "--output-dir", str(tmp_path / "o")]) == 2


def test_dropped_rows_are_matched_in_order():
    from lowmem.train import dropped_rows

    before = Dataset.from_dict({"prompt": ["a", "b", "a", "c", "d"], "completion": ["1", "2", "1", "3", "4"]})
    after = before.select([0, 2, 4]).map(lambda r: {"completion": r["completion"] + "</s>"})  # TRL's "Adding EOS"
    assert dropped_rows(before, after, ("prompt", "completion")) == [1, 3]
    assert dropped_rows(before, before, ("prompt", "completion")) == []
    assert dropped_rows(before, after.remove_columns("prompt"), ("prompt", "completion")) is None


def test_rows_truncation_empties_are_an_error_naming_them(tmp_path, qwen2, capsys):
    """End to end (1.8 s): prompt-completion rows whose prompt fills max_length (completion_only_loss, TRL's
    default for this format, keep_start) were dropped by TRL's SFTTrainer; keep_end trains on all of them."""
    from lowmem.cli import main

    rows = [{"prompt": ("the sum of two numbers is " * 8 if i % 4 == 0 else "") + f"{i}+{i}=", "completion": str(2 * i)}
            for i in range(8)]
    data = _jsonl(tmp_path / "pc.jsonl", rows)
    recipe = tmp_path / "r.yaml"
    text = (f"model_name_or_path: {qwen2}\ndataset: {data}\nlearning_rate: 1.0e-4\nmax_steps: 1\n"
            f"per_device_train_batch_size: 2\nmax_length: 32\noutput_dir: {tmp_path / 'o'}\n")
    recipe.write_text(text)
    assert main(["train", str(recipe)]) == 2
    assert ("max_length=32: 2 of 8 rows of dataset (rows [0, 4], 0-based) keep no trained token after truncation"
            in capsys.readouterr().err)
    recipe.write_text(text + "truncation_mode: keep_end\n")
    assert main(["train", str(recipe)]) == 0
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["data"]["train_rows"] == 8


@pytest.mark.parametrize("implicit", [False, True])
def test_dpo_pairs_truncation_empties_are_an_error(tmp_path, qwen2, capsys, implicit):
    """TRL's DPOTrainer drops the pairs whose prompt alone fills max_length (keep_start) without a word: 2 of 4 here.
    With an implicit prompt TRL rewrites the columns, so the rows are counted, not named."""
    from lowmem.cli import main

    long = "the sum of two numbers is " * 4
    rows = [{"prompt": (long if i % 2 == 0 else "") + f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)}
            for i in range(4)]
    if implicit:
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    data = _jsonl(tmp_path / "p.jsonl", rows)
    assert main(["train", "--trainer", "dpo", "--model", qwen2, "--dataset", data, "--lr", "1e-6", "--steps", "1",
                 "--batch-size", "2", "--output-dir", str(tmp_path / "o"), "--max_length", "24"]) == 2
    rows_named = "" if implicit else " (rows [0, 2], 0-based)"
    assert (f"max_length=24: 2 of 4 rows of dataset{rows_named} keep no trained token after truncation" in
            capsys.readouterr().err)


def test_train_takes_trls_config_flag(tmp_path):
    """`lowmem train --config x.yaml` (`trl sft --config`'s spelling) was "unknown recipe key(s) ['config']; did you
    mean ['fsdp_config']?"."""
    from lowmem.cli import build_parser, recipe_from_args

    data = _jsonl(tmp_path / "d.jsonl", [{"text": "1+1=2"}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"dataset: {data}\nmax_steps: 3\noutput_dir: {tmp_path / 'o'}\nmax_length: 16\n")
    parser = build_parser()
    loaded = recipe_from_args(parser.parse_args(["train", "--config", str(recipe)]))
    assert (loaded.steps, loaded.dataset, loaded.training_args["max_length"]) == (3, data, 16)
    with pytest.raises(ConfigError, match=r"two recipes: .* and --config .*; give one"):
        recipe_from_args(parser.parse_args(["train", str(tmp_path / "other.yaml"), "--config", str(recipe)]))


def test_load_best_model_at_end_without_evaluations_is_an_error(tmp_path):
    """Before: trained, kept the last weights, said nothing (no evaluation ever picks a best checkpoint)."""
    from lowmem.train import build_training_args, load_recipe

    data = _jsonl(tmp_path / "d.jsonl", [{"text": f"{i}+1"} for i in range(10)])
    kw = dict(dataset=data, output_dir=str(tmp_path / "o"), load_best_model_at_end=True)
    with pytest.raises(ConfigError, match=r"^load_best_model_at_end=true needs evaluations .* evaluates never"):
        build_training_args(load_recipe(None, **kw))
    args = build_training_args(load_recipe(None, **kw, eval_split=0.2, eval_steps=2, save_steps=4))
    assert args.load_best_model_at_end


def test_attn_implementation_gets_lowmems_spelling():
    from lowmem.train import _recipe_keys

    with pytest.raises(ConfigError, match=r"attn_implementation -> model_init_kwargs: \{attn_implementation: ...\} for "
                                          r"trainer: dpo"):
        _recipe_keys({"attn_implementation": "eager", "dataset": "d.jsonl"}, "")
