"""Every row of a user's dataset is checked before training, not the first 1,000 (before: a bad row 1,500 reached
TRL: a traceback mid-run, a row trained on as the text "None", or a chat template's refusal after the model loaded).
Each error names the file, the row (and its line for JSON Lines) and the column."""

import json

import pytest
from datasets import Dataset

from lowmem.data import TrainData, check_embedded_alphabet, check_template_renders, detect_format, load_train_data

N, BAD = 1500, 1234  # a bad row past the first 1,000


def _chat(i):
    return [{"role": "system", "content": "add"}, {"role": "user", "content": f"{i}+{i}"},
            {"role": "assistant", "content": str(2 * i)}]


def _rows(kind):
    if kind == "messages":
        return [{"messages": _chat(i)} for i in range(N)]
    if kind == "prompt-completion":
        return [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(N)]
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(N)]


def _jsonl(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("trainer, kind, change, message", [
    ("sft", "messages", lambda r: r.pop("messages"), r"column 'messages' of row 1234 \(line 1235\) is NoneType None"),
    ("sft", "messages", lambda r: r.update(messages=[]), r"column 'messages' of row 1234 \(line 1235\) is list \[\]; "
                                                         r"expected a list of .* messages \(at least one\)"),
    ("sft", "messages", lambda r: r["messages"][1].pop("content"),
     r"column 'messages' of row 1234 \(line 1235\) is list \[.*\{'role': 'user'\}"),
    ("sft", "prompt-completion", lambda r: r.update(prompt=5), r"column 'prompt' of row 1234 \(line 1235\) is int 5; "
                                                               r"expected a string"),
    ("sft", "prompt-completion", lambda r: r.pop("completion"),
     r"column 'completion' of row 1234 \(line 1235\) is NoneType None; expected a string"),
    ("grpo", "prompt-only", lambda r: r.update(prompt=["1+1="]), r"column 'prompt' of row 1234 \(line 1235\) is list"),
])
def test_a_bad_row_past_the_first_thousand_is_named(tmp_path, trainer, kind, change, message):
    rows = _rows(kind)
    change(rows[BAD])
    path = _jsonl(tmp_path, rows)
    with pytest.raises(ValueError, match=rf"^{path}: {message}"):
        load_train_data(path, trainer)


@pytest.mark.parametrize("message, problem", [
    ({"role": "user", "content": None}, r"message 1 \(role 'user'\) has no content \(None"),
    ({"role": None, "content": "1+1"}, r"message 1 has role None; expected a role string"),
])
def test_a_message_without_content_or_role_is_named(message, problem):
    """Arrow fills a key a message lacks with None where others have it (a list of structs): the row passed the
    {role, content} check and the template rendered the text "None"."""
    rows = [{"messages": _chat(i)} for i in range(N)]
    rows[BAD]["messages"][1] = message
    with pytest.raises(ValueError, match=rf"^d.jsonl: column 'messages' of row 1234: {problem}"):
        detect_format(Dataset.from_list(rows), "sft", source="d.jsonl")
    rows[BAD]["messages"][1] = {"role": "assistant", "content": None, "tool_calls": [{"name": "add"}]}
    detect_format(Dataset.from_list(rows), "sft")  # a tool call's turn may have no content


def test_a_repeated_prompt_past_the_first_thousand_is_named():
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i}"}],
             "completion": [{"role": "assistant", "content": str(2 * i)}]} for i in range(N)]
    rows[BAD]["completion"] = rows[BAD]["prompt"] + rows[BAD]["completion"]
    with pytest.raises(ValueError, match=r"^d: row 1234: 'completion' start with the 1 message\(s\) of 'prompt'"):
        detect_format(Dataset.from_list(rows), "sft", source="d")


ALTERNATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 1) %}"
             "{{ raise_exception('Conversation roles must alternate system/user/assistant') }}{% endif %}"
             "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer():
    from lowmem.kit import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = ALTERNATE
    return tok


def test_template_refusing_the_roles_of_row_past_the_first_thousand(tmp_path, tokenizer):
    rows = _rows("messages")
    system, user, assistant = rows[BAD]["messages"]
    rows[BAD]["messages"] = [system, assistant, user]
    path = _jsonl(tmp_path, rows)
    data = load_train_data(path, "sft")
    with pytest.raises(ValueError, match=rf"^{path}: the chat template refuses row 1234 \(line 1235\) \(roles "
                                         r"\['system', 'assistant', 'user'\]\): TemplateError: Conversation roles"):
        check_template_renders(tokenizer, data, source=path)
    prompts = [{"prompt": _chat(i)[:2], "answer": "1"} for i in range(N)]
    prompts[BAD]["prompt"] = [_chat(0)[0], _chat(0)[2]]
    ds = Dataset.from_list(prompts)
    data = TrainData(ds, None, detect_format(ds, "grpo"))
    with pytest.raises(ValueError, match=r"refuses row 1234 \(roles \['system', 'assistant'\]\)"):
        check_template_renders(tokenizer, data, source="p")


def test_one_render_per_role_sequence_past_the_first_thousand():
    from lowmem.data import _rows_to_render

    rows = _rows("messages")
    rows[1100]["messages"] = rows[1100]["messages"][1:]  # a new sequence (user, assistant)
    rows[1300]["messages"] = rows[1300]["messages"][1:]  # seen
    ds = Dataset.from_list(rows)
    assert _rows_to_render(ds, detect_format(ds, "sft")) == list(range(1000)) + [1100]
    pairs = [{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
              "rejected": [{"role": "assistant", "content": "c"}]} for _ in range(N)]
    pairs[1400]["rejected"] = pairs[1400]["rejected"] * 2
    ds = Dataset.from_list(pairs)
    assert _rows_to_render(ds, detect_format(ds, "dpo")) == list(range(1000)) + [1400]


def test_embedded_alphabet_checked_past_the_first_thousand():
    rows = _rows("prompt-completion")
    rows[BAD]["completion"] = "Done."
    ds = Dataset.from_list(rows)
    with pytest.raises(ValueError, match=r"lacks 1 characters of this data \(1 kinds, e.g. \['D'\]\)"):
        check_embedded_alphabet(TrainData(ds, None, detect_format(ds, "sft")), source="d")


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_a_bad_row_in_a_folders_second_file_names_the_file(tmp_path, suffix):
    """Before: "shards: column 'prompt' of row 1534": the folder's row, in which file the user had to work out."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(2):
        rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(20 + k)]
        if k == 1:
            rows[14]["prompt"] = None
        if suffix == "jsonl":
            _jsonl(tmp_path, rows)
            (tmp_path / "d.jsonl").rename(folder / f"part-{k}.jsonl")
        else:
            Dataset.from_list(rows).to_parquet(str(folder / f"part-{k}.parquet"))
    line = ", line 15" if suffix == "jsonl" else ""
    with pytest.raises(ValueError, match=rf"column 'prompt' of row 34 \(file part-1.{suffix} row 14{line}\) is NoneType"):
        load_train_data(str(folder), "sft")


def _pair(i, chosen=None, rejected=None):
    user = {"role": "user", "content": f"{i}+1="}
    return {"chosen": chosen or [user, {"role": "assistant", "content": str(i + 1)}],
            "rejected": rejected or [user, {"role": "assistant", "content": str(i + 2)}]}


@pytest.mark.parametrize("chosen, rejected, problem", [
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"}],
     [{"role": "user", "content": "b"}, {"role": "assistant", "content": "2"}], r"the implicit prompt TRL extracts .* is empty"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"}],
     [{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"}], r"'chosen' and 'rejected' are the same messages"),
    ([{"role": "user", "content": "a"}], [{"role": "user", "content": "a"}, {"role": "assistant", "content": "2"}],
     r"the implicit prompt TRL extracts .* is empty"),
])
def test_implicit_prompt_pairs_checked_on_every_row(chosen, rejected, problem):
    """Before: TRL's DPOTrainer, after the model loaded: "Cannot apply chat template to an empty conversation. Provide
    at least one message." (no row named) for a pair sharing no leading message."""
    rows = [_pair(i) for i in range(N)]
    rows[BAD] = _pair(0, chosen, rejected)
    with pytest.raises(ValueError, match=rf"^d: row 1234: .*{problem}"):
        detect_format(Dataset.from_list(rows), "dpo", source="d")
    assert detect_format(Dataset.from_list(rows[:BAD]), "dpo").name == "implicit-prompt preference"


def test_content_parts_printed_as_python_text_and_non_string_content(tokenizer, tmp_path):
    """A template that prints ``content`` as it is (ChatML's ``{{ m['content'] }}``) on the multimodal parts form
    trained on "[{'type': 'text', 'text': '1+1'}]" literally; a number as content passed every check."""
    from lowmem.kit import build_tokenizer

    rows = [{"messages": [{"role": "system", "content": [{"type": "text", "text": "add"}]},
                          {"role": "user", "content": [{"type": "text", "text": f"{i}+{i}"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": str(2 * i)}]}]} for i in range(3)]
    ds = Dataset.from_list(rows)
    data = TrainData(ds, None, detect_format(ds, "sft"))
    with pytest.raises(ValueError, match=r"^d: row 0: the chat template renders the content parts of a 'system' message "
                                         r"as Python text"):
        check_template_renders(tokenizer, data, source="d")
    joins = build_tokenizer()
    joins.chat_template = ("{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}{{ p['text'] }}"
                           "{% endfor %}\n{% endfor %}")
    check_template_renders(joins, data, source="d")  # a template that takes parts
    bad = [{"messages": [{"role": "user", "content": f"add {i} and {i}"}, {"role": "assistant", "content": f"it is {i}"}]}
           for i in range(3)]
    bad[2]["messages"][1]["content"] = 4
    path = _jsonl(tmp_path, bad)
    with pytest.raises(ValueError, match=r"row 2 \(line 3\): message 1 \(role 'assistant'\) has content int 4; expected "
                                         r"a string"):
        load_train_data(path, "sft")


def test_empty_rows_of_a_folder_name_the_first_ones_file(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(2):
        rows = [{"prompt": f"{i}+{i}=", "completion": "  " if (k, i) in ((1, 3), (1, 5)) else str(2 * i)} for i in range(10)]
        (folder / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"2 of 20 rows have an empty or missing 'completion' \(rows \[13, 15\], 0-based; "
                                         r"the first is file part-1.jsonl row 3, line 4\)"):
        load_train_data(str(folder), "sft")


@pytest.mark.parametrize("via", ["arrow", "python"])
def test_empty_assistant_answers_are_named(tmp_path, via):
    """The conversational counterpart of an empty completion: an assistant turn with content "" (or whitespace)
    trained the model to answer with nothing, without a word."""
    import datasets

    from lowmem.data import check_nonempty

    rows = [{"messages": _chat(i)} for i in range(N)]
    rows[BAD]["messages"][2]["content"] = "  "
    rows[1400]["messages"][2]["content"] = ""
    if via == "arrow":
        path = _jsonl(tmp_path, rows)
        with pytest.raises(ValueError, match=rf"^{path}: 2 of 1500 rows have an assistant message with empty content in "
                                             r"'messages' \(rows \[1234, 1400\], 0-based; the first is row 1234 \(line "
                                             r"1235\)\)"):
            load_train_data(path, "sft")
    else:  # a column datasets reads as Json (types differing between rows): read into Python
        ds = Dataset.from_list(rows, features=datasets.Features({"messages": datasets.Json()}))
        fmt = detect_format(ds, "sft")
        with pytest.raises(ValueError, match=r"^d: 2 of 1500 rows .* \(rows \[1234, 1400\], 0-based"):
            check_nonempty(ds, fmt, "sft", source="d")
    rows[BAD]["messages"][2] = {"role": "assistant", "content": "", "tool_calls": [{"name": "add"}]}
    del rows[1400]
    load_train_data(_jsonl(tmp_path, rows), "sft")  # a tool call's turn may be empty (datasets: items as Json, Python)
    ds = Dataset.from_list(rows)  # a struct with tool_calls: Arrow
    check_nonempty(ds, detect_format(ds, "sft"), "sft")
