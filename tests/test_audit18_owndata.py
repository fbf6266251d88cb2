"""Outside audit OWNDATA18 (session 18): the user's own data, reward functions and configs.

Each test pins one defect found from the docs (docs/training.md): a user's own data, reward functions or config fields
that were dropped, misread or refused only after the model loaded. The defects are fixed (each fixing commit names its
finding id, ``AUDIT-OWNDATA18 n``); the tests, once strict xfails, now guard the fixed behaviour.
"""

from __future__ import annotations

import json

import pytest
import yaml

# ---------------------------------------------------------------------------------------------------------------------
# 1. two reward functions with the same name: TRL logs them as one metric (the mean of both), metrics.json keeps one


@pytest.mark.parametrize("kind", ["builtin", "files"])
def test_reward_funcs_with_one_name_are_refused_or_named_apart(tmp_path, kind):
    """``lowmem train`` of ``reward_funcs: [r1.py:reward, r2.py:reward]`` (one returns 1.0, the other 0.0) logged
    ``rewards/reward/mean: 0.5`` every step and metrics.json's ``reward_func_histories`` held one entry,
    ``{'reward': [0.5, 0.5]}``: TRL names each function by ``__name__`` and averages a metric's values per step, so the
    two rewards were one number and neither could be read. Wanted: an error naming the entries that share a name (or
    names kept apart, ``reward`` / ``reward_2``)."""
    from lowmem.rewards import load_reward_funcs

    if kind == "builtin":
        entries = [{"name": "format", "pattern": r"\d+"}, {"name": "format", "pattern": r"<answer>.*</answer>"}]
    else:
        for i, value in ((1, 1.0), (2, 0.0)):
            (tmp_path / f"r{i}.py").write_text(f"def reward(completions, **kwargs):\n    return [{value}] * len(completions)\n")
        entries = [f"{tmp_path / 'r1.py'}:reward", f"{tmp_path / 'r2.py'}:reward"]
    try:
        funcs = load_reward_funcs(entries, ["prompt", "answer"])
    except ValueError as err:  # the fix may refuse them: the message names the shared name
        assert ("format" if kind == "builtin" else "reward") in str(err)
        return
    names = [f.__name__ for f in funcs]
    assert len(set(names)) == len(names), names


# ---------------------------------------------------------------------------------------------------------------------
# 2. a saved DatasetDict's 'valid' / 'dev' / 'val' split: a folder of files knows these names, load_from_disk does not


def _saved_dict(tmp_path, eval_name):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(10)]
    path = tmp_path / f"dd_{eval_name}"
    DatasetDict({"train": Dataset.from_list(rows[:8]), eval_name: Dataset.from_list(rows[8:])}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("eval_name", ["valid", "dev"])
def test_saved_dataset_dict_valid_split_is_an_eval_split(tmp_path, eval_name):
    """docs/training.md, Files: a folder of files names its eval split ``validation`` / ``valid`` / ``dev`` / ``val``
    (the Hub's convention; ``lowmem.data._split_files``), but a ``save_to_disk`` folder only ``validation`` / ``test`` /
    ``eval`` (``SPLIT_PREFERENCE``). So ``eval_dataset: <that folder>`` is an error, and ``dataset: <that folder>``
    alone trains on ``train`` with no ``note:`` about the held-out split (``held_out_split`` returns None), where the
    same data as ``train.jsonl`` + ``valid.jsonl`` files gets both right."""
    from lowmem.data import held_out_split, load_train_data

    path = _saved_dict(tmp_path, eval_name)
    files = tmp_path / "files"
    files.mkdir()
    for split in ("train", eval_name):
        (files / f"{split}.jsonl").write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    assert held_out_split(files) is not None  # the folder of files: its valid / dev file is held out
    assert held_out_split(path) is not None
    data = load_train_data(str(path), "sft", eval_dataset=str(path))
    assert data.eval.num_rows == 2


# ---------------------------------------------------------------------------------------------------------------------
# 3. TrainingArguments' do_train / do_predict: LLaMA-Factory's meaning ignored, without a word


@pytest.mark.parametrize("field, value", [("do_train", False), ("do_predict", True)])
def test_script_only_fields_are_refused(tmp_path, field, value):
    """``TrainingArguments.do_train`` / ``do_eval`` / ``do_predict`` are "not directly used by Trainer", only by scripts;
    LLaMA-Factory reads them (``do_train: false`` = no training, ``do_predict: true`` = generate on the eval set). A
    LLaMA-Factory YAML with ``do_train: false`` given to ``lowmem train`` trained 3 steps and wrote its outputs
    (checked: tiny model, configs/data/addition_chat.jsonl). The project's rule for other tools' configs: every field
    applies as there or is an error naming it; this one is neither."""
    from lowmem.config import ConfigError
    from lowmem.train import build_training_args, load_recipe

    (tmp_path / "t.jsonl").write_text('{"text": "1+1=2"}\n{"text": "2+2=4"}\n')
    recipe = {"trainer": "sft", "dataset": "t.jsonl", "lr": 1e-3, "steps": 2, "output_dir": str(tmp_path / "out"),
              "training_args": {field: value}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=field):
        build_training_args(load_recipe(path))


# ---------------------------------------------------------------------------------------------------------------------
# 4. exact_match reduces the dataset's answer column to its last number: fractions / LaTeX / tuples score wrong


@pytest.mark.parametrize("completion, answer, expected", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),   # MATH-500's bare LaTeX answer column: the right answer scored 0
    ("\\boxed{2}", "\\frac{1}{2}", 0.0),              # ... and a wrong one 1
    ("The answer is 4", "3/4", 0.0),                 # '3/4' read as its last number, 4
    ("\\boxed{3/4}", "3/4", 1.0),
    ("\\boxed{(3, 5)}", "(3, 5)", 1.0),
    ("\\boxed{2}", "\\sqrt{2}", 0.0),
])
def test_exact_match_reads_the_answer_column_whole(completion, answer, expected):
    """docs/training.md, Rewards: the final-answer rule (``<answer>``, ``\\boxed{}``, ``####``, else the last number)
    "applies to the column" too (``lowmem.rewards.exact_match_reward`` calls ``extract_final_answer`` on the target).
    For a column that holds the answer itself (MATH-500's ``answer``: ``\\frac{14}{3}``; any fraction, root, interval
    or tuple) rule 4 keeps only its last number, so a completion ``\\boxed{2}`` for ``\\frac{1}{2}`` earns 1.0 and the
    right ``\\boxed{\\frac{1}{2}}`` 0.0: GRPO is rewarded for the wrong answers, silently. Wanted: the column's text whole
    when it has no ``<answer>`` / ``\\boxed{}`` / ``####`` (the last-number rule is for free-form completions)."""
    from lowmem.rewards import BUILTIN_REWARDS

    assert BUILTIN_REWARDS["exact_match"](prompts=["q"], completions=[completion], answer=[answer]) == [expected]


# ---------------------------------------------------------------------------------------------------------------------
# 5. a PhiMoE model directory: TRL's SFT loss fails at the first step (AttributeError num_experts), after loading


def _tiny_phimoe(path):
    import torch
    import transformers

    from lowmem.kit.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    cfg = transformers.PhimoeConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, vocab_size=len(tok),
                                    max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_sft_on_a_phimoe_model_trains_or_is_refused_before_loading(tmp_path):
    """A tiny PhiMoE (transformers' ``PhimoeConfig``: ``num_local_experts``, no ``num_experts`` alias, unlike Mixtral's
    config) saved with save_pretrained, SFT on ``messages`` JSONL: the model loads, then TRL 1.16's
    ``_fused_forward`` (trl/trainer/utils.py:1679) reads ``text_config.num_experts`` for the router aux loss and the run
    stops with a traceback at the first step. A plain forward works; OLMoE / Qwen3-MoE / Mixtral (which have the
    name) train. Wanted: it trains (lowmem gives the config the alias, or turns the aux loss off with a note), or an
    error before the model loads naming the model type and the fix (``router_aux_loss_coef: 0.0``)."""
    from lowmem.config import ConfigError
    from lowmem.train import load_recipe, run

    model = _tiny_phimoe(tmp_path / "phimoe")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+1="},
                                                     {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                            for i in range(8)))
    recipe = load_recipe(None, trainer="sft", model=model, dataset=str(data), optim="adamw", lr=1e-3, steps=1,
                         batch_size=4, output_dir=str(tmp_path / "out"), save_model=False)
    try:
        out = run(recipe)
    except (ConfigError, ValueError) as err:
        assert "router_aux_loss_coef" in str(err) and not isinstance(err, AttributeError)
        return
    assert out["steps"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# 6. GRPO's generation_kwargs overriding GRPOConfig's own fields (max_completion_length, temperature, ...): accepted


@pytest.mark.parametrize("key, value, field", [("max_new_tokens", 100, "max_completion_length"),
                                               ("temperature", 0.5, "temperature"),
                                               ("top_p", 0.5, "top_p")])
def test_grpo_generation_kwargs_that_shadow_config_fields_are_refused(tmp_path, key, value, field):
    """TRL 1.16's GRPOTrainer (grpo_trainer.py:1155-1173) builds the sampling GenerationConfig from its fields
    (``max_new_tokens=max_completion_length``, ``temperature``, ``top_p``, ...) and then ``update``s it with
    ``generation_kwargs``: ``{max_new_tokens: 100}`` beside ``max_completion_length: 4`` generates up to 100 tokens
    (past lowmem's context check, ``fit_completion_length``, which reads max_completion_length; dr_grpo's loss still
    divides by 4), and ``{temperature: 0.5}`` samples at 0.5 while the policy's log-probabilities and the loss use the
    config's 1.0 (``add_fused_lm_head(temperature=self.temperature)``, :1068): the ratio is taken for another distribution
    than the sampled one. lowmem accepts the pair without a word. Wanted: an error naming
    ``generation_kwargs.<key>`` and the GRPOConfig field to set instead."""
    from lowmem.config import ConfigError
    from lowmem.train import build_training_args, load_recipe

    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                                              for i in range(8)))
    recipe = {"trainer": "grpo", "dataset": "p.jsonl", "reward_funcs": ["exact_match"], "lr": 1e-3, "steps": 2,
              "batch_size": 4, "output_dir": str(tmp_path / "out"),
              "training_args": {"num_generations": 4, "max_completion_length": 4, "generation_kwargs": {key: value}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=rf"generation_kwargs.*{key}|{key}.*generation_kwargs"):
        build_training_args(load_recipe(path))


# ---------------------------------------------------------------------------------------------------------------------
# 7. an assistant tool call (content "" + tool_calls) under a chat template that never prints tool_calls: trained as ""

TINY_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                 "{{ eos_token }}{% endif %}|{% endfor %}{% if add_generation_prompt %}a:{% endif %}")  # the shipped one
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                  {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3"}]},
    {"prompt": [{"role": "user", "content": "1+2?"}], "completion": [{"role": "assistant", "content": "",
                                                                     "tool_calls": [CALL]}]},
], ids=["messages", "prompt-completion"])
def test_tool_calls_a_template_drops_are_refused(tmp_path, row):
    """docs/training.md: an assistant message with empty content is an error "not a tool call", and a ``tools`` column
    that the template renders the same as without it is an error naming the column (the model would learn the calls
    without seeing the tools). The twin case passes: rows whose assistant turns are tool calls (``content: ""``,
    ``tool_calls: [...]``, the OpenAI / TRL tool-calling format) under a template that never prints ``tool_calls``
    (the shipped tiny template; many base models' templates) render as ``u:1+2?|a:<eos>|``: SFT trains the model to
    answer with nothing, the prompt-completion row's whole completion is gone, and ``check_template_renders`` says
    nothing. Wanted: the same check as for ``tools``: rendered with and without ``tool_calls`` equal -> an error naming
    the row, ``tool_calls`` and the fix (a tool-calling ``chat_template``)."""
    from lowmem.data import check_template_renders, load_train_data
    from lowmem.kit.tokenizer import build_tokenizer

    path = tmp_path / "calls.jsonl"
    path.write_text((json.dumps(row) + "\n") * 3)
    tok = build_tokenizer()
    tok.chat_template = TINY_TEMPLATE
    data = load_train_data(str(path), "sft")
    with pytest.raises(ValueError, match="tool_calls"):
        check_template_renders(tok, data, source=str(path), eval_source="eval_split")


# ---------------------------------------------------------------------------------------------------------------------
# 8. DPO fields that only another setting reads: accepted and ignored (label_smoothing's check has no siblings)


@pytest.mark.parametrize("field, value", [("discopop_tau", 0.1), ("ref_model_sync_steps", 10),
                                          ("ref_model_mixup_alpha", 0.9), ("f_alpha_divergence_coef", 0.25)])
# (f_alpha_divergence_coef 0.25, not TRL's default 0.5: a saved DPOConfig writes every field at its default, and those
#  stay accepted; tests/test_ownfixb_fields.py)
def test_dpo_fields_that_cannot_apply_are_refused(tmp_path, field, value):
    """``lowmem.train.check_dpo_fields`` refuses ``label_smoothing`` with a ``loss_type`` that never reads it (the
    project's rule: a value that cannot apply is an error naming the field). Its siblings pass: in TRL 1.16
    ``discopop_tau`` is read only by ``loss_type: discopop`` (dpo_trainer.py:1487), ``ref_model_sync_steps`` /
    ``ref_model_mixup_alpha`` only by the SyncRefModelCallback that ``sync_ref_model: true`` adds (callbacks.py:151),
    ``f_alpha_divergence_coef`` only under ``f_divergence_type: alpha_divergence`` (dpo_trainer.py:1364). A config with
    ``ref_model_sync_steps: 10`` (the user wants TR-DPO) trains plain DPO against a frozen reference, without a word."""
    from lowmem.config import ConfigError
    from lowmem.train import build_training_args, load_recipe

    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1),
                                                          "rejected": str(i + 2)}) + "\n" for i in range(8)))
    recipe = {"trainer": "dpo", "dataset": "p.jsonl", "lr": 1e-3, "steps": 2, "batch_size": 4,
              "output_dir": str(tmp_path / "out"), "training_args": {field: value}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=field):
        build_training_args(load_recipe(path))


# ---------------------------------------------------------------------------------------------------------------------
# 9. SFT fields that only another setting reads: accepted and ignored


@pytest.mark.parametrize("field, value, named", [("packing_strategy", "wrapped", "packing_strategy"),
                                                 ("gradient_checkpointing_kwargs", {"use_reentrant": True},
                                                  "(gradient|activation)_checkpointing_kwargs"),  # transformers 5's new name
                                                 ("dataset_text_field", "body", "dataset_text_field")])
def test_sft_fields_that_cannot_apply_are_refused(tmp_path, field, value, named):
    """TRL 1.16's SFTTrainer reads ``packing_strategy`` only with ``packing: true`` (sft_trainer.py:916-920, 1480);
    transformers reads ``gradient_checkpointing_kwargs`` only with ``gradient_checkpointing: true``; and on
    prompt-completion rows (which win over ``text``, docs/training.md Formats) ``dataset_text_field`` names a column that
    is never trained on (here ``body``, present in the file). Each is accepted without a word. lowmem already refuses
    the same kind of thing elsewhere (``padding_free`` without packing's rules, ``completion_only_loss`` on data without a
    completion, ``label_smoothing`` with a loss that does not read it, a ``dataset_text_field`` naming no column)."""
    from lowmem.config import ConfigError
    from lowmem.train import build_training_args, load_recipe

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1),
                                                          "body": f"{i}+1={i + 1}"}) + "\n" for i in range(8)))
    recipe = {"trainer": "sft", "dataset": "d.jsonl", "lr": 1e-3, "steps": 2, "batch_size": 4,
              "output_dir": str(tmp_path / "out"), "training_args": {field: value}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises((ConfigError, ValueError), match=named):
        from lowmem.data import recipe_data

        loaded = load_recipe(path)
        recipe_data(loaded)  # the data checks (dataset_text_field is checked against the columns there)
        build_training_args(loaded)


# ---------------------------------------------------------------------------------------------------------------------
# 10. a UTF-8 byte-order mark (Excel's "CSV UTF-8", Windows Notepad): CSV refused with pyarrow's KeyError, text trains on it


@pytest.mark.parametrize("suffix, body, first", [
    (".csv", "prompt,completion\n1+1=,2\n2+2=,4\n", {"prompt": "1+1=", "completion": "2"}),
    (".txt", "1+1=2\n2+2=4\n", {"text": "1+1=2"}),
])
def test_utf8_bom_files_read_as_their_text(tmp_path, suffix, body, first):
    """JSON / JSON Lines with a byte-order mark read fine (datasets' json builder drops it); CSV and text do not:
    Excel's "CSV UTF-8 (comma delimited)" always writes one, and the run stops with ``dataset: could not read ... as csv:
    KeyError: 'Field "\\ufeffprompt" does not exist in schema'`` (the header's first name is ``\\ufeffprompt``), which
    names neither the BOM nor the fix; a ``.txt`` file's first row becomes ``'\\ufeff1+1=2'`` and trains on the mark (a
    byte-level tokenizer's EF BB BF tokens) without a word. Wanted: read as ``utf-8-sig`` (the mark dropped), or an error
    naming the byte-order mark and the fix."""
    from lowmem.data import load_train_data

    path = tmp_path / f"data{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    try:
        data = load_train_data(str(path), "sft")
    except ValueError as err:  # the other fix: an error that names the mark
        assert "byte-order mark" in str(err) or "BOM" in str(err), err
        return
    assert data.train[0] == first


# ---------------------------------------------------------------------------------------------------------------------
# 11. reward_weights all zero: every reward is 0, every advantage 0, GRPO trains nothing without a word


@pytest.mark.parametrize("funcs, weights", [(["exact_match", "format"], [0.0, 0.0]), (["exact_match"], [0.0])])
def test_all_zero_reward_weights_are_refused(tmp_path, funcs, weights):
    """TRL sums ``reward_weights[i] * reward_i`` into the one reward GRPO's advantages are taken from (group-normalised);
    with every weight 0 that sum is 0 for every completion, each group's advantages are 0, and the policy gradient is 0
    (with the default ``beta: 0`` the run changes nothing; the per-function rewards are still logged, so the log looks
    alive). lowmem checks ``reward_weights`` for length and finiteness only. A weight of 0 beside a non-zero one is
    fine (a function logged, not trained on); all of them 0 cannot apply. Wanted: an error naming ``reward_weights``."""
    from lowmem.config import ConfigError
    from lowmem.data import recipe_data
    from lowmem.train import build_training_args, load_recipe

    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                                              for i in range(8)))
    recipe = {"trainer": "grpo", "dataset": "p.jsonl", "reward_funcs": funcs, "reward_weights": weights, "lr": 1e-3,
              "steps": 2, "batch_size": 4, "output_dir": str(tmp_path / "out"),
              "training_args": {"num_generations": 4, "max_completion_length": 4}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises((ConfigError, ValueError), match="reward_weights"):
        loaded = load_recipe(path)
        recipe_data(loaded)
        build_training_args(loaded)


# ---------------------------------------------------------------------------------------------------------------------
# 12. exact_match on a row whose answer is missing (JSON null): str(None) = "None" is the target


def test_exact_match_on_a_missing_answer_is_not_a_score():
    """A GRPO file where some rows have no ``answer`` (``null``, or the key left out: datasets fills None) loads
    (lowmem.data checks ``prompt`` only), and ``exact_match_reward`` scores ``str(None)``: every completion of those
    rows gets 0.0, silently pulling their group's advantages, and a completion that says ``None`` gets 1.0. TRL's
    contract has the value for this, ``None`` (no reward for that sample: NaN, left out of the mean). Wanted: ``None``
    for a row without an answer (or, the other fix, an error at load naming the rows without one)."""
    from lowmem.rewards import BUILTIN_REWARDS

    out = BUILTIN_REWARDS["exact_match"](prompts=["q", "q", "r"], completions=["None", "7", "19"], answer=[None, None, "19"])
    assert out == [None, None, 1.0]


# ---------------------------------------------------------------------------------------------------------------------
# 13. TRL's accuracy rewards without math_verify: accepted at load, ImportError at the first reward call


def _math_verify_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("math_verify") is None


@pytest.mark.skipif(not _math_verify_missing(), reason="math_verify is installed: the reward works")
@pytest.mark.parametrize("name", ["accuracy_reward", "reasoning_accuracy_reward"])
def test_trl_accuracy_reward_without_math_verify_is_refused_at_load(name):
    """docs/training.md, Rewards: TRL's own rewards are ``trl.rewards:<name>`` (the ``trl grpo`` script's names map
    there), and "a package it imports that is missing" is an error when the run starts, before the model loads. TRL's
    ``accuracy_reward`` / ``reasoning_accuracy_reward`` import ``math_verify`` inside the call
    (trl/rewards/accuracy_rewards.py:65, 281), so ``load_reward_funcs`` accepts them and the run stops at the first
    reward call, after the model loaded and the first completions were generated. Wanted: the error at load (TRL has
    ``trl.import_utils.is_math_verify_available``), naming the function and ``pip install math-verify``."""
    from lowmem.rewards import load_reward_funcs

    with pytest.raises(ValueError, match="math.verify"):
        load_reward_funcs([f"trl.rewards:{name}"], ["prompt", "solution"])


# ---------------------------------------------------------------------------------------------------------------------
# 14. SFT rows with 'text' and a 'prompt' column but no 'completion': detected as text, TRL takes them as prompt-completion


@pytest.mark.parametrize("kind", ["text", "messages"])
def test_sft_text_rows_with_a_prompt_column_are_refused_or_trained_as_text(tmp_path, kind):
    """lowmem.data detects ``{"prompt": ..., "text": ...}`` rows as the language-modeling format with ``prompt`` an
    extra column, and ``lowmem train --trainer sft --dataset pt.jsonl`` goes on; TRL 1.16's SFT ``tokenize_fn``
    (sft_trainer.py:1322) tests ``"prompt" in example`` first, so after the model loaded the run stops with a traceback,
    ``KeyError: 'completion'`` (checked). Wanted: an error naming ``prompt`` / the missing ``completion`` (or ``text``
    rows trained as text, the extra ``prompt`` column removed before TRL sees it)."""
    from lowmem.data import load_train_data

    path = tmp_path / "pt.jsonl"
    body = {"text": lambda i: f"{i}+1={i + 1}",  # messages + prompt: detected as messages, the same TRL path
            "messages": lambda i: [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": str(i + 1)}]}
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", kind: body[kind](i)}) + "\n" for i in range(4)))
    try:
        data = load_train_data(str(path), "sft")
    except ValueError as err:
        assert "completion" in str(err), err
        return
    assert "prompt" not in data.train.column_names, (data.format, data.train.column_names)
