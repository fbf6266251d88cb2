"""Data a user converts from other tools' formats (USERFLOW3's audit, session 16): sharegpt's role names kept inside
``{role, content}`` messages (``human`` / ``gpt``: the ``from`` / ``value`` keys renamed, the values not) were rendered
by the chat template as roles of their own (``<|im_start|>gpt``), trained without a word; the model learned a turn
format it is never prompted with, and ``assistant_only_loss`` / a GRPO prompt's generation turn knew no such role."""

import json

import pandas as pd
import pytest

from lowmem.data import load_train_data


def _rows(roles):
    return [{"messages": [{"role": r, "content": f"turn {k} of row {i}"} for k, r in enumerate(roles)]} for i in range(5)]


@pytest.mark.parametrize("suffix, parts", [("jsonl", False), ("parquet", False), ("jsonl", True)])
@pytest.mark.parametrize("roles, bad", [(["human", "gpt"], "human"), (["system", "user", "gpt"], "gpt")])
def test_sharegpt_role_names_are_refused_with_the_rename(tmp_path, suffix, parts, roles, bad):
    """Checked by Arrow compute on a column of {role, content} structs, and in Python where a content of parts
    (``[{"type": "text", ...}]``) beside string contents gives the column another type."""
    path = tmp_path / f"chat.{suffix}"
    rows = _rows(["user", "assistant"]) + _rows(roles)
    if parts:
        rows[0]["messages"][0]["content"] = [{"type": "text", "text": "turn 0 of row 0"}]
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pd.DataFrame(rows).to_parquet(path)
    with pytest.raises(ValueError, match=rf"row 5\b.*role '{bad}'.*human -> user, gpt -> assistant"):
        load_train_data(str(path), "sft")


def test_sharegpt_role_names_in_a_grpo_prompt_are_refused(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "human", "content": f"{i}+1="}], "answer": str(i + 1)}) + "\n"
                            for i in range(4)))
    with pytest.raises(ValueError, match=r"role 'human'"):
        load_train_data(str(path), "grpo")


def test_the_usual_roles_pass(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = _rows(["system", "user", "assistant", "tool", "assistant"]) + _rows(["developer", "user", "assistant"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_train_data(str(path), "sft").train.num_rows == 10


SYSTEM_TEXT = "You are a calculator."


def _system_rows(kind):
    user, answer = {"role": "user", "content": "what is 1 plus 1?"}, {"role": "assistant", "content": "2."}
    return {"pc": {"prompt": "what is 1 plus 1?", "completion": " 2."},
            "messages": {"messages": [user, answer]},
            "text": {"text": "what is 1 plus 1? 2."},
            "dpo": {"prompt": [user], "chosen": [answer], "rejected": [{"role": "assistant", "content": "3."}]}}[kind]


@pytest.mark.parametrize("kind, trainer, fix", [
    ("pc", "sft", "prepend"), ("messages", "sft", "role"), ("text", "sft", "prepend"),
    ("dpo", "dpo", "role"),
])
@pytest.mark.parametrize("column", ["system", "system_prompt"])
def test_a_system_column_beside_the_format_is_refused(tmp_path, kind, trainer, fix, column):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({column: SYSTEM_TEXT, **_system_rows(kind)}) + "\n" for _ in range(3)))
    with pytest.raises(ValueError, match=rf"column '{column}' is not read.*{SYSTEM_TEXT}.*{fix}"):
        load_train_data(str(path), trainer)


def test_a_system_column_already_in_the_messages_passes(tmp_path):
    row = _system_rows("messages")
    row["messages"] = [{"role": "system", "content": SYSTEM_TEXT}] + row["messages"]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"system": SYSTEM_TEXT, **row}) + "\n" for _ in range(3)))
    assert load_train_data(str(path), "sft").format.extra_columns == ("system",)
    path.write_text("".join(json.dumps({"system": "", **_system_rows("pc")}) + "\n" for _ in range(3)))
    assert load_train_data(str(path), "sft").format.name == "prompt-completion"  # an empty one loses nothing

