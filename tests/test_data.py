"""lowmem.data and lowmem.rewards: loading local data in every file kind, TRL format detection, chat
templates, recipe-field validation, reward functions. No model is trained here (fast)."""

from __future__ import annotations

import copy
import json

import pytest
from own_data import dpo_rows, rl_rows, sft_rows, write_csv, write_jsonl, write_parquet

from lowmem.data import (
    detect_format,
    ensure_chat_template,
    load_local_dataset,
    load_train_data,
    read_chat_template,
    split_eval,
)
from lowmem.rewards import (
    answers_equal,
    exact_match_reward,
    extract_final_answer,
    format_reward,
    load_reward_funcs,
    resolve_reward,
)
from lowmem.train import TrainRecipe

# ---- loading ---------------------------------------------------------------------------------


def test_load_each_file_kind(tmp_path):
    rows = sft_rows("prompt-completion", 10)
    for path in (write_jsonl(tmp_path / "d.jsonl", rows), write_parquet(tmp_path / "d.parquet", rows),
                 write_csv(tmp_path / "d.csv", rows)):
        ds = load_local_dataset(path)
        assert len(ds) == 10 and ds.column_names == ["prompt", "completion"], path
        assert ds[0] == rows[0]
    (tmp_path / "d.json").write_text(json.dumps(rows))  # a JSON array
    assert load_local_dataset(tmp_path / "d.json")[3] == rows[3]
    (tmp_path / "t.txt").write_text("1+2=3\n\n  \n4+5=9\n")  # blank lines are skipped
    ds = load_local_dataset(tmp_path / "t.txt")
    assert ds.column_names == ["text"] and ds["text"] == ["1+2=3", "4+5=9"]


def test_load_folder_of_files_and_saved_datasets(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", sft_rows("text", 4, seed=1))
    write_jsonl(folder / "b.jsonl", sft_rows("text", 6, seed=2))
    (folder / ".hidden.jsonl").write_text("not json\n")  # hidden files are skipped
    assert len(load_local_dataset(folder)) == 10

    # files named for splits (the Hub's convention): train* is the training set, validation* / test* the eval set
    splits = tmp_path / "splits"
    splits.mkdir()
    write_jsonl(splits / "train.jsonl", sft_rows("text", 9))
    write_jsonl(splits / "test.jsonl", sft_rows("text", 3, split="eval"))
    assert (len(load_local_dataset(splits)), len(load_local_dataset(splits, split="eval"))) == (9, 3)
    data = load_train_data(str(splits), "sft", eval_dataset=str(splits))
    assert (len(data.train), len(data.eval)) == (9, 3)
    with pytest.raises(ValueError, match="has no file named for an eval split"):
        load_local_dataset(folder, split="eval")
    write_jsonl(splits / "extra.jsonl", sft_rows("text", 2))
    with pytest.raises(ValueError, match=r"files of no split \['extra.jsonl'\]"):
        load_local_dataset(splits)
    (splits / "extra.jsonl").unlink()
    (splits / "train.jsonl").unlink()
    with pytest.raises(ValueError, match=r"has splits \['test'\]; expected a train split"):
        load_local_dataset(splits)

    Dataset.from_list(sft_rows("messages", 7)).save_to_disk(str(tmp_path / "saved"))
    ds = load_local_dataset(tmp_path / "saved")
    assert len(ds) == 7 and ds.column_names == ["messages"]

    DatasetDict({"train": Dataset.from_list(sft_rows("text", 5)), "test": Dataset.from_list(sft_rows("text", 2))}
                ).save_to_disk(str(tmp_path / "dict"))
    assert len(load_local_dataset(tmp_path / "dict")) == 5
    assert len(load_local_dataset(tmp_path / "dict", split="eval")) == 2  # validation / test / eval
    data = load_train_data(str(tmp_path / "dict"), "sft", eval_dataset=str(tmp_path / "dict"))
    assert (len(data.train), len(data.eval)) == (5, 2)

    DatasetDict({"other": Dataset.from_list(sft_rows("text", 2))}).save_to_disk(str(tmp_path / "nosplit"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['other'\]; expected a split named 'train'"):
        load_local_dataset(tmp_path / "nosplit")


def test_load_errors_name_what_was_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset: '.*missing.jsonl' does not exist .*never downloads"):
        load_local_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty file\(s\) .*empty.jsonl.*expected at least one row"):
        load_local_dataset(tmp_path / "empty.jsonl")
    (tmp_path / "header.csv").write_text("prompt,completion\n")
    with pytest.raises(ValueError, match=r"header.csv' is empty \(no rows\); expected at least one row"):
        load_local_dataset(tmp_path / "header.csv")
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"unknown file extension\(s\) \['.xlsx'\].*expected one of \['.csv', '.json'"):
        load_local_dataset(tmp_path / "data.xlsx")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="holds no data files"):
        load_local_dataset(tmp_path / "nothing")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", sft_rows("text", 2))
    write_csv(mixed / "b.csv", sft_rows("text", 2))
    with pytest.raises(ValueError, match=r"mixes file kinds \['csv', 'json'\]"):
        load_local_dataset(mixed)
    (tmp_path / "bad.jsonl").write_text('{"text": "1+1=2"}\n{not json\n')
    with pytest.raises(ValueError, match=r"could not read .*bad.jsonl' as json"):
        load_local_dataset(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="eval_dataset: "):
        load_train_data(str(write_jsonl(tmp_path / "ok.jsonl", sft_rows("text", 3))), "sft",
                        eval_dataset=str(tmp_path / "nope.jsonl"))


def test_split_eval_is_seeded_and_disjoint():
    from datasets import Dataset

    ds = Dataset.from_list(sft_rows("text", 50))
    ds = ds.add_column("i", list(range(50)))
    train, evals = split_eval(ds, 0.2, seed=3)
    assert (len(train), len(evals)) == (40, 10)
    assert not set(train["i"]) & set(evals["i"])
    assert split_eval(ds, 0.2, seed=3)[1]["i"] == evals["i"] != split_eval(ds, 0.2, seed=4)[1]["i"]
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"eval_split must be a fraction in \(0, 1\)"):
            split_eval(ds, bad, 0)
    with pytest.raises(ValueError, match="leaves no training rows"):
        split_eval(ds.select(range(1)), 0.5, 0)


# ---- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("trainer", "rows", "name", "conversational"), [
    ("sft", sft_rows("text", 4), "text", False),
    ("sft", sft_rows("messages", 4), "messages", True),
    ("sft", sft_rows("prompt-completion", 4), "prompt-completion", False),
    ("sft", sft_rows("prompt-completion-conv", 4), "prompt-completion", True),
    ("dpo", dpo_rows(4, conversational=False), "preference", False),
    ("dpo", dpo_rows(4, conversational=True), "preference", True),
    ("dpo", [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
             for r in dpo_rows(4, conversational=True)], "implicit-prompt preference", True),
    ("grpo", rl_rows(4), "prompt-only", False),
    ("bnpo", rl_rows(4, conversational=True), "prompt-only", True),
])
def test_detect_format(trainer, rows, name, conversational):
    from datasets import Dataset

    fmt = detect_format(Dataset.from_list(rows), trainer)
    assert (fmt.name, fmt.conversational) == (name, conversational)
    if trainer in ("grpo", "bnpo"):
        assert fmt.extra_columns == ("answer",)  # passed to the reward functions


def test_detect_format_errors_list_columns_and_accepted_formats():
    from datasets import Dataset

    ds = Dataset.from_list([{"question": "1+1=", "response": "2"}])
    with pytest.raises(ValueError, match=r"columns \['question', 'response'\] fit no sft dataset format; accepted: "
                                         r"'text' .*'messages' .*'prompt' \+ 'completion'"):
        detect_format(ds, "sft", source="my.jsonl")
    with pytest.raises(ValueError, match=r"fit no dpo dataset format; accepted: 'prompt' \+ 'chosen' \+ 'rejected'"):
        detect_format(Dataset.from_list(sft_rows("prompt-completion", 2)), "dpo")
    with pytest.raises(ValueError, match=r"fit no grpo dataset format; accepted: 'prompt'"):
        detect_format(Dataset.from_list(sft_rows("text", 2)), "grpo")
    # a number where text belongs; a message list missing 'content'
    with pytest.raises(ValueError, match=r"column 'text' of row 0 is int 5; expected a string"):
        detect_format(Dataset.from_list([{"text": 5}]), "sft")
    rows = sft_rows("prompt-completion", 300)
    rows[250]["completion"] = None  # a missing value deep in the file
    with pytest.raises(ValueError, match=r"column 'completion' of row 250 is NoneType None; expected a string"):
        detect_format(Dataset.from_list(rows), "sft")
    with pytest.raises(ValueError, match=r"column 'messages' of row 0 .*expected a list of \{'role': ..., 'content': ...\}"):
        detect_format(Dataset.from_list([{"messages": [{"role": "user", "text": "hi"}]}]), "sft")
    # dataset_text_field renames the text column (TRL's SFTConfig field)
    assert detect_format(Dataset.from_list([{"body": "1+1=2"}]), "sft", text_field="body").name == "body"


def test_eval_set_must_match_training_format(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows("messages", 4))
    evals = write_jsonl(tmp_path / "eval.jsonl", sft_rows("text", 4))
    with pytest.raises(ValueError, match=r"eval_dataset .* is text \(standard.*but dataset .* is messages"):
        load_train_data(str(train), "sft", eval_dataset=str(evals))
    data = load_train_data(str(train), "sft", eval_split=0.25, seed=0)
    assert (len(data.train), len(data.eval)) == (3, 1) and data.summary()["eval_rows"] == 1


# ---- chat templates --------------------------------------------------------------------------


def test_chat_template_from_string_or_file(tmp_path, tokenizer):
    from datasets import Dataset

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert read_chat_template(template) == template
    (tmp_path / "t.jinja").write_text(template)
    assert read_chat_template(str(tmp_path / "t.jinja")) == template
    with pytest.raises(FileNotFoundError, match=r"chat_template: file '.*nope.jinja' does not exist"):
        read_chat_template(str(tmp_path / "nope.jinja"))
    with pytest.raises(ValueError, match="neither an existing .jinja file nor a Jinja template"):
        read_chat_template("chatml")

    fmt = detect_format(Dataset.from_list(sft_rows("messages", 2)), "sft")
    tok = copy.deepcopy(tokenizer)  # the session tokenizer stays untouched
    assert tok.chat_template is None
    with pytest.raises(ValueError, match=r"data.jsonl: the messages \(conversational.*tokenizer of model 'm' has no chat "
                                         r"template; set chat_template in the recipe"):
        ensure_chat_template(tok, fmt, None, model="m", source="data.jsonl")
    ensure_chat_template(tok, fmt, str(tmp_path / "t.jinja"), model="m")
    assert tok.chat_template == template
    text_fmt = detect_format(Dataset.from_list(sft_rows("text", 2)), "sft")
    ensure_chat_template(copy.deepcopy(tokenizer), text_fmt, None, model=None)  # standard data needs none


# ---- recipe fields ---------------------------------------------------------------------------


def test_recipe_data_fields_are_validated(tmp_path):
    data = str(tmp_path / "d.jsonl")  # not read at validation time
    assert TrainRecipe().task is None and TrainRecipe(dataset=data).dataset == data
    assert TrainRecipe(dataset=data, eval_split="0.1").eval_split == 0.1  # YAML 1.1 reads 1e-1 as a string
    assert TrainRecipe(chat_template="later.jinja").chat_template == "later.jinja"  # read when the run starts
    cases = [
        (dict(dataset=data, task="addition"), r"dataset=.* and task='addition' are exclusive"),
        (dict(dataset=5), r"dataset=5: expected a (non-empty )?string"),
        (dict(dataset=""), r"dataset='': expected a non-empty string"),
        (dict(eval_split=0.1), "eval_split needs dataset"),
        (dict(eval_dataset=data), "eval_dataset needs dataset"),
        (dict(dataset=data, eval_split=1.0), r"eval_split=1.0: expected a fraction in \(0, 1\)"),
        (dict(dataset=data, eval_split="abc"), r"eval_split='abc'"),
        (dict(dataset=data, eval_split=True), r"eval_split=True"),
        (dict(dataset=data, eval_split=0.1, eval_dataset=data), "eval_dataset and eval_split are exclusive"),
        (dict(chat_template="plain words"), "neither an existing .jinja file nor a Jinja template"),
        (dict(chat_template=""), r"chat_template=''"),
        (dict(trainer="grpo", dataset=data), r"trainer 'grpo' on dataset=.* needs reward_funcs"),
        (dict(trainer="sft", reward_funcs=["exact_match"]), "reward_funcs is for trainer grpo, gvpo or bnpo; trainer is 'sft'"),
        (dict(trainer="grpo", reward_funcs=["nope"]), r"Unknown reward 'nope' in reward_funcs\[0\]: expected a built-in name"),
        (dict(trainer="grpo", reward_funcs=[3]), r"reward_funcs(\[0\]=3|=\[3\])"),
        (dict(trainer="grpo", reward_funcs=[{"pattern": "x"}]), r"a mapping entry needs 'name'"),
        (dict(trainer="grpo", reward_funcs=[{"name": "format", "pattern": "("}]), r"reward_funcs\[0\] pattern '\('"),
        (dict(trainer="grpo", reward_funcs=["exact_match"], reward_weights=[1, 2]),
         r"reward_weights has 2 entries \(\[1.0, 2.0\]\) but reward_funcs has 1"),
        (dict(trainer="grpo", reward_funcs=["exact_match"], reward_weights=["x"]), r"reward_weights(\[0\]='x'|=\['x'\])"),
        (dict(trainer="grpo", reward_funcs=["exact_match"], reward_weights=[float("nan")]), r"reward_weights(\[0\]|=\[nan\])"),
        (dict(trainer="grpo", reward_weights=[1.0]), "reward_weights needs reward_funcs"),
        (dict(trainer="bnpo", reward_funcs=["exact_match", "format"], reward_weights=[1.0, 0.5]),
         "BNPO averages one advantage per reward function with equal weight"),
        (dict(trainer="grpo", reward_funcs=["exact_match"], reward_weights=[1.0], training_args={"reward_weights": [1.0]}),
         "both as a recipe field and in training_args"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            TrainRecipe(**fields)
    r = TrainRecipe(trainer="grpo", reward_funcs=["exact_match"], reward_weights=["0.5"])
    assert r.reward_funcs == ["exact_match"] and r.reward_weights == [0.5]


# ---- rewards ---------------------------------------------------------------------------------


def test_extract_final_answer_and_exact_match():
    assert extract_final_answer("<think>2+2 is 4</think><answer> 4 </answer>") == "4"
    assert extract_final_answer(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_final_answer("Natalia sold 48 clips... #### 72") == "72"
    assert extract_final_answer("the sum is 1,234.") == "1,234"
    assert extract_final_answer(" Paris ") == "Paris"
    assert answers_equal("1,000", "1000.0") and not answers_equal("12", "13") and answers_equal("a  b", "a b")
    completions = ["19", "the answer is 19", [{"role": "assistant", "content": "<answer>20</answer>"}], "abc"]
    assert exact_match_reward(completions, answer=["19", "#### 19", "19", "19"]) == [1.0, 1.0, 0.0, 0.0]
    assert exact_match_reward(["7"], solution=["7"]) == [1.0]
    with pytest.raises(ValueError, match=r"needs a dataset column 'answer' or 'solution'; the dataset has \['label'\]"):
        exact_match_reward(["7"], label=["7"], trainer_state=None)


def test_format_reward():
    good, bad = "<think>a</think>\n<answer>4</answer>", "<answer>4</answer>"
    assert format_reward([good, bad, [{"role": "assistant", "content": good}]]) == [1.0, 0.0, 1.0]
    fn = resolve_reward({"name": "format", "pattern": r"\d+"})
    assert fn.__name__ == "format" and fn(prompts=["p", "p"], completions=["42", "4a"]) == [1.0, 0.0]


def test_reward_from_file_and_module(tmp_path, monkeypatch, request):
    import sys

    # imported below as the module my_rewards of the cwd: not left in sys.modules for later tests of that name
    request.addfinalizer(lambda: sys.modules.pop("my_rewards", None))
    (tmp_path / "my_rewards.py").write_text(
        "def longer(prompts, completions, scale=1.0, **kwargs):\n"
        "    return [scale * len(c) for c in completions]\n"
        "NOT_CALLABLE = 3\n"
    )
    fn = resolve_reward(f"{tmp_path / 'my_rewards.py'}:longer")
    assert fn.__name__ == "longer" and fn(["p"], ["abc"]) == [3.0]
    monkeypatch.chdir(tmp_path)  # relative paths and modules are found from the current directory
    assert resolve_reward("my_rewards.py:longer")(["p"], ["ab"]) == [2.0]
    assert resolve_reward("my_rewards:longer")(["p"], ["ab"]) == [2.0]
    assert resolve_reward({"name": "my_rewards:longer", "scale": 0.5})(["p"], ["ab"]) == [1.0]
    fns = load_reward_funcs(["exact_match", "addition", "my_rewards.py:longer"])
    assert [f.__name__ for f in fns] == ["exact_match", "addition", "longer"]
    with pytest.raises(FileNotFoundError, match=r"reward function 'missing.py:f': file 'missing.py' does not exist"):
        resolve_reward("missing.py:f")
    with pytest.raises(ValueError, match=r"'my_rewards.py' has no attribute 'shorter'; its functions: \['longer'\]"):
        resolve_reward("my_rewards.py:shorter")
    with pytest.raises(ValueError, match=r"'NOT_CALLABLE' is a int, not a function"):
        resolve_reward("my_rewards.py:NOT_CALLABLE")
    with pytest.raises(ValueError, match=r"module 'no_such_module_xyz' not found"):
        resolve_reward("no_such_module_xyz:f")
    assert resolve_reward("trl.rewards:think_format_reward").__name__ == "think_format_reward"  # TRL's own rewards


def test_addition_reward_matches_the_kit():
    from lowmem.kit import reward_fn

    fn = resolve_reward("addition")
    prompts, completions = ["12+7=", "1+1="], ["19", "3x"]
    assert fn(prompts, completions, answer=["19", "2"]) == reward_fn(prompts, completions, answer=["19", "2"])
    assert fn(prompts, completions) == reward_fn(prompts, completions)


def test_sft_format_precedence_follows_trl():
    """TRL's SFTTrainer looks for 'prompt' first, then 'messages', then the text column."""
    from datasets import Dataset

    both = [{**m, **pc, "text": "x"} for m, pc in zip(sft_rows("messages", 2), sft_rows("prompt-completion", 2))]
    assert detect_format(Dataset.from_list(both), "sft").name == "prompt-completion"
    assert detect_format(Dataset.from_list([{**r, "text": "x"} for r in sft_rows("messages", 2)]), "sft").name == "messages"


def test_several_sources_concatenate(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", sft_rows("messages", 5, seed=1))
    b = write_parquet(tmp_path / "b.parquet", sft_rows("messages", 3, seed=2))
    data = load_train_data([str(a), str(b)], "sft", eval_dataset=[str(b)])
    assert (len(data.train), len(data.eval), data.format.name) == (8, 3, "messages")
    assert data.train[5] == sft_rows("messages", 3, seed=2)[0]  # in order
    text = write_jsonl(tmp_path / "t.jsonl", sft_rows("text", 2))
    with pytest.raises(ValueError, match=r"dataset\[1\] '.*t.jsonl' is text .*but dataset\[0\] .* is messages"):
        load_train_data([str(a), str(text)], "sft")
    extra = write_jsonl(tmp_path / "e.jsonl", [{**r, "source": "x"} for r in sft_rows("messages", 2)])
    with pytest.raises(ValueError, match=r"dataset\[1\] .* has columns .*expected the same columns and types"):
        load_train_data([str(a), str(extra)], "sft")
    with pytest.raises(FileNotFoundError, match=r"dataset\[1\]: '.*nope.jsonl' does not exist"):
        load_train_data([str(a), str(tmp_path / "nope.jsonl")], "sft")
    assert TrainRecipe(dataset=[str(a), str(b)]).dataset == [str(a), str(b)]
    with pytest.raises(ValueError, match=r"dataset=\[\]"):
        TrainRecipe(dataset=[])


def test_chat_template_syntax_error_is_named_before_the_run(tmp_path):
    """A template with a Jinja syntax error fails when the recipe is checked, naming the file and line (it was a
    jinja2 traceback from inside TRL at the first row); transformers' own tags (``{% generation %}``) still parse."""
    from lowmem.data import read_chat_template

    bad = tmp_path / "chat.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(ValueError, match=r"chat_template .*chat.jinja: Jinja syntax error on line 2: unexpected '}'"):
        read_chat_template(str(bad))
    with pytest.raises(ValueError, match=r"chat_template \(the recipe's text\): Jinja syntax error on line 1: Unexpected end"):
        read_chat_template("{% for m in messages %}{{ m.content }}")
    ok = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    assert read_chat_template(ok) == ok


def test_rows_with_empty_learned_text_are_refused_over_the_whole_file(tmp_path):
    """An empty ``text`` / ``completion`` / ``chosen`` / ``rejected`` / RL ``prompt`` anywhere in the file
    (also past the rows detect_format checks) is an error naming the column and the rows; an empty
    prompt is fine for SFT (unconditional text)."""
    rows = [{"text": f"row {i}"} for i in range(1200)]
    rows[3]["text"], rows[1100]["text"] = "", "  \n"
    with pytest.raises(ValueError, match=r"2 of 1200 rows have an empty or missing 'text' \(rows \[3, 1100\]"):
        load_train_data(str(write_jsonl(tmp_path / "sft.jsonl", rows)), "sft")
    pc = [{"prompt": "", "completion": "a"}, {"prompt": "q", "completion": "b"}]
    assert len(load_train_data(str(write_jsonl(tmp_path / "pc.jsonl", pc)), "sft").train) == 2
    pc[1]["completion"] = ""
    with pytest.raises(ValueError, match=r"'completion' \(rows \[1\]"):
        load_train_data(str(write_jsonl(tmp_path / "pc2.jsonl", pc)), "sft")
    dpo = [{"prompt": "q", "chosen": "a", "rejected": ""}]
    with pytest.raises(ValueError, match="'rejected'"):
        load_train_data(str(write_jsonl(tmp_path / "dpo.jsonl", dpo)), "dpo")
    rl = [{"prompt": "1+1=", "answer": "2"}, {"prompt": " ", "answer": "3"}]
    with pytest.raises(ValueError, match=r"'prompt' \(rows \[1\]"):
        load_train_data(str(write_jsonl(tmp_path / "rl.jsonl", rl)), "grpo")
