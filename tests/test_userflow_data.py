"""A user's own JSON Lines files with a bad line: each is one error naming the file and the line a text editor
shows (before: pyarrow's "in row 3", which counts rows of a read block, or a row index of the loaded table),
and a column that mixes strings with numbers, which ``datasets`` 5 reads as JSON, turning ``"19"`` into 19."""

import re

import pytest

from lowmem.data import load_sources

GOOD = '{"prompt": "1+1=", "completion": "2"}\n'


def _file(tmp_path, *lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join(line.encode() if isinstance(line, str) else line for line in lines))
    return str(path)


@pytest.mark.parametrize("bad, says", [
    ('{"prompt": "1+1=", "completion": "2"\n', r"line 4 column 37: Expecting ',' delimiter in \{\"prompt\""),
    ('{"prompt": "1+1=", "completion": "2"} trailing\n', r"line 4 column 39: Extra data"),
    ('["1+1=", "2"]\n', r"line 4 is list \['1\+1=', '2'\], not a JSON object; expected one object per line"),
    (b'{"prompt": "1+1=", "completion": "\xff"}\n', r"line 4 is not UTF-8 text"),
])
def test_a_malformed_line_names_file_and_line(tmp_path, bad, says):
    """Lines 1-2 good, line 3 blank (skipped, as datasets and TRL skip it), line 4 bad. Before: "JSON parse error:
    ... in row 3" / "Column() changed from object to string in row 0", or for bytes that are no UTF-8 no file at all
    ("'utf-8' codec can't decode byte 0xff")."""
    path = _file(tmp_path, GOOD, GOOD, "\n", bad, GOOD)
    with pytest.raises(ValueError, match=f"^dataset: could not read '{re.escape(path)}' as json: {re.escape(path)} {says}"):
        load_sources(path, "sft")


def test_a_malformed_json_array_names_line_and_column(tmp_path):
    path = _file(tmp_path, '[{"prompt": "1+1=", "completion": "2"},\n {"prompt": "1+1=" "completion": "2"}]\n',
                 name="d.json")
    with pytest.raises(ValueError, match=f"^dataset: could not read '{re.escape(path)}' as json: {re.escape(path)} line 2 column 20: Expecting ',' delimiter; expected one "
                                         "JSON array of objects"):
        load_sources(path, "sft")


@pytest.mark.parametrize("bad, column", [('{"prompt": "1+1="}\n', "completion"), ("null\n", "prompt"),
                                         ("{}\n", "prompt")])
def test_a_missing_value_names_row_and_line(tmp_path, bad, column):
    """A blank line before the bad one: the row (0-based, of the table) and the line differ."""
    path = _file(tmp_path, GOOD, "\n", "   \n", bad)
    with pytest.raises(ValueError, match=rf"column '{column}' of row 1 \(line 4\) is NoneType None"):
        load_sources(path, "sft")


def test_an_empty_text_names_its_lines(tmp_path):
    path = _file(tmp_path, GOOD, "\n", '{"prompt": "1+1=", "completion": "  "}\n')
    with pytest.raises(ValueError, match=r"rows \[1\], 0-based; lines \[3\]\)"):
        load_sources(path, "sft")


@pytest.mark.parametrize("lines, says", [
    (['{"prompt": "1+1=", "answer": "2"}\n', '{"prompt": "2+2=", "answer": 4}\n'],
     r"column 'answer' of .* holds strings and other values \(line 1: '2'; line 2: int 4\), so datasets reads it as "
     r"JSON and turns the string '2' into int 2"),
    (['{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}\n',
      '{"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": 3}]}\n'],
     r"column 'messages\[\].content' of .* \(line 1: '2'; line 2: int 3\)"),
])
def test_strings_mixed_with_numbers_are_refused(tmp_path, lines, says):
    """datasets 5.2 read the first file's answer column as [2, 4] (ints; the reward functions compared them with
    strings and never matched), the second's contents as 2 and 3, silently."""
    path = _file(tmp_path, *lines)
    trainer = "grpo" if "answer" in lines[0] else "sft"
    with pytest.raises(ValueError, match=says):
        load_sources(path, trainer)


def test_mixed_values_that_survive_reading_pass(tmp_path):
    """Strings that are no JSON text are read back as they are: a column mixing them with numbers or objects is
    the user's choice (a reward function may take both)."""
    path = _file(tmp_path, '{"prompt": "1+1=", "meta": "none", "answer": "two"}\n',
                 '{"prompt": "2+2=", "meta": {"a": 1}, "answer": 4}\n')
    ds, fmt = load_sources(path, "grpo")
    assert ds["meta"] == ["none", {"a": 1}] and ds["answer"] == ["two", 4] and fmt.extra_columns == ("meta", "answer")


def test_cli_prints_the_line(tmp_path, capsys):
    from lowmem.cli import main

    path = _file(tmp_path, GOOD, '{"prompt": "1+1=", "completion": "2",}\n')
    assert main(["train", "--dataset", path, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{path} line 2 column 38: Expecting property name" in err and "in row" not in err


def test_a_byte_order_mark_is_not_line_1s_error(tmp_path):
    """A file saved by a Windows editor starts with a UTF-8 BOM, which datasets reads; the line is still found."""
    path = _file(tmp_path, b"\xef\xbb\xbf" + GOOD.encode(), '{"prompt": "1+1="}\n')
    with pytest.raises(ValueError, match=r"column 'completion' of row 1 \(line 2\) is NoneType None"):
        load_sources(path, "sft")
    path = _file(tmp_path, b"\xef\xbb\xbf" + GOOD.encode(), '{"prompt": "1+1=", "completion": "2",}\n', name="e.jsonl")
    with pytest.raises(ValueError, match=r"e.jsonl line 2 column 38: Expecting property name"):
        load_sources(path, "sft")


@pytest.mark.parametrize("columns", [{"prompt": ["1+1=", "1+2="], "completion": ["2", "3"]},
                                     {"prompt": {"0": "1+1=", "1": "1+2="}, "completion": {"0": "2", "1": "3"}}])
def test_column_wise_json_says_to_write_rows(tmp_path, columns):
    """pandas' DataFrame.to_json() (orient='columns') / json.dump(df.to_dict('list')) write one object of columns;
    datasets reads it as one row of lists / dicts. Before: "column 'prompt' of row 0 is list ['1+1=', '1+2=']"."""
    import json

    path = _file(tmp_path, json.dumps(columns), name="d.json")
    with pytest.raises(ValueError, match=r"one row whose columns \['prompt', 'completion'\] each hold 2 values: the file "
                                         r"is column-wise JSON .*orient='records', lines=True"):
        load_sources(path, "sft")


def test_one_conversational_row_is_no_column_wise_json(tmp_path):
    import json

    row = {"prompt": [{"role": "user", "content": "1+1="}], "completion": [{"role": "assistant", "content": "2"}]}
    path = _file(tmp_path, json.dumps([row]), name="d.json")
    assert load_sources(path, "sft")[1].name == "prompt-completion"


STRICT = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}{{ m['role'][0] }}:{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}a:{% endif %}")


@pytest.mark.parametrize("trainer, row", [
    ("sft", {"messages": [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1="},
                          {"role": "assistant", "content": "2"}]}),
    ("grpo", {"prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1="}], "answer": "2"}),
    ("dpo", {"prompt": [{"role": "system", "content": "add"}], "chosen": [{"role": "assistant", "content": "2"}],
             "rejected": [{"role": "assistant", "content": "3"}]}),
])
def test_a_row_the_chat_template_refuses_names_it(tmp_path, trainer, row):
    """A template that raises on a row (Gemma's "System role not supported", Mistral's alternation rule): before, a
    jinja2 TemplateError traceback when TRL prepared the data (SFT, DPO) or at the first generation (GRPO), after the
    model loaded (exit 1)."""
    import json

    from lowmem.data import check_template_renders, load_train_data
    from lowmem.kit import build_tokenizer

    ok = {k: ([m for m in v if m["role"] != "system"] or [{"role": "user", "content": "1+1="}])
          if isinstance(v, list) else v for k, v in row.items()}
    path = _file(tmp_path, json.dumps(ok) + "\n", "\n", json.dumps(row) + "\n")
    data = load_train_data(path, trainer)
    tok = build_tokenizer()
    tok.chat_template = STRICT
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: the chat template refuses row 1 \(line 3\) "
                                         r"\(roles \['system', .*TemplateError: System role not supported"):
        check_template_renders(tok, data, source=path)
    check_template_renders(tok, load_train_data(_file(tmp_path, json.dumps(ok) + "\n", name="ok.jsonl"), trainer))


def test_lowmem_train_checks_the_rows_with_the_template(tmp_path, own_model_dir, capsys):
    import json

    from lowmem.cli import main

    row = {"prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1="}], "answer": "2"}
    path = _file(tmp_path, json.dumps(row) + "\n")
    (tmp_path / "strict.jinja").write_text(STRICT)
    assert main(["train", "--trainer", "grpo", "--model", own_model_dir, "--dataset", path, "--lr", "1e-3",
                 "--output-dir", str(tmp_path / "out"), "--chat-template", str(tmp_path / "strict.jinja"),
                 "--reward-funcs", "exact_match"]) == 2
    err = capsys.readouterr().err
    assert "the chat template refuses row 0 (line 1)" in err, err


def test_a_one_row_file_names_its_line(tmp_path):
    """A one-line JSON Lines file is also one JSON document: its row still has its line (after blank lines)."""
    path = _file(tmp_path, "\n", "\n", '{"prompt": "1+1=", "completion": null}\n')
    with pytest.raises(ValueError, match=r"column 'completion' of row 0 \(line 3\) is NoneType None"):
        load_sources(path, "sft")


@pytest.mark.parametrize("trainer, others", [("dpo", ("chosen", "rejected")), ("sft", ("completion",))])
def test_a_prompt_repeated_in_its_answers_is_refused(tmp_path, trainer, others):
    """Implicit-prompt pairs converted to the explicit form with the prompt kept in chosen / rejected: TRL renders
    prompt + chosen, so the user turn was trained on twice, silently."""
    import json

    user = [{"role": "user", "content": "1+1="}]
    good = {"prompt": user, **{c: [{"role": "assistant", "content": "2"}] for c in others}}
    bad = {"prompt": user, **{c: user + [{"role": "assistant", "content": "2"}] for c in others}}
    path = _file(tmp_path, json.dumps(good) + "\n", json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"row 1 \(line 2\): .* start with the 1 message\(s\) of 'prompt'; TRL appends "
                                         r"them to the prompt, so those turns would appear twice"):
        load_sources(path, trainer)
    assert load_sources(_file(tmp_path, json.dumps(good) + "\n", name="ok.jsonl"), trainer)[0].num_rows == 1
