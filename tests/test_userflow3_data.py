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
