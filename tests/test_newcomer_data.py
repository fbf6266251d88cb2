"""DPO pairs in other tools' spellings (NEWCOMER audit): Intel/orca_dpo_pairs' `system` + `question` + `chosen` +
`rejected` and LLaMA-Factory's alpaca pairwise `instruction` + `input` + `chosen` + `rejected` fit TRL's implicit-
prompt format (no `prompt` column), whose prompt is the start chosen and rejected share. The question column was not
read and every pair trained without its prompt (tiny Qwen3: chosen 'Four.' / rejected 'Five.' shared 'F'); now that
is an error naming the column and the rename. A copy of a prompt that both already hold is no error."""

import pytest
import trl.data_utils  # noqa: F401 - imported at collection (the implicit-prompt check reads TRL's extract_prompt)
from datasets import Dataset

from lowmem.data import detect_format


def _msgs(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.mark.parametrize("row, named", [
    ({"system": "Be terse.", "question": "2+2?", "chosen": "Four.", "rejected": "Five."}, ["question", "system"]),
    ({"instruction": "2+2?", "input": "", "chosen": "Four.", "rejected": "Five."}, ["instruction"]),  # empty: unread ok
    ({"question": "3+3?", "chosen": _msgs("2+2?", "4"), "rejected": _msgs("2+2?", "5")}, ["question"]),
])
def test_a_prompt_column_beside_an_implicit_pair_is_refused(row, named):
    with pytest.raises(ValueError) as err:
        detect_format(Dataset.from_list([row] * 3), "dpo", source="pairs.jsonl")
    text = str(err.value)
    assert text.startswith(f"pairs.jsonl: column(s) {named} are not read: 'chosen' + 'rejected' without 'prompt'"), text
    assert f"Name the prompt column 'prompt' (rename {named[0]!r}" in text


@pytest.mark.parametrize("row, columns", [
    ({"question": "2+2?", "chosen": _msgs("2+2?", "4"), "rejected": _msgs("2+2?", "5")}, ("chosen", "rejected")),
    ({"question": "hi", "chosen": "Human: hi Assistant: a", "rejected": "Human: hi Assistant: b"}, ("chosen", "rejected")),
    ({"source": "hh", "chosen": "Human: hi Assistant: a", "rejected": "Human: hi Assistant: b"}, ("chosen", "rejected")),
    ({"source": "s", "prompt": "2+2?", "chosen": "Four.", "rejected": "Five."}, ("prompt", "chosen", "rejected")),
])
def test_pairs_whose_prompt_is_read_still_load(row, columns):
    """The prompt inside both (a prompt-like column is then a copy), metadata columns, an explicit prompt."""
    assert detect_format(Dataset.from_list([row] * 3), "dpo", source="pairs.jsonl").columns == columns


@pytest.mark.parametrize("row, hint", [
    ({"question": "q", "response_j": "a", "response_k": "b"},
     "StackExchange-paired 'question' / 'response_j' / 'response_k' (response_j the preferred answer): rename them "
     "'prompt' / 'chosen' / 'rejected'"),
    ({"prompt": "q", "chosen_response": "a", "rejected_response": "b"},  # was "the format of trainer: grpo"
     "Did you mean to name the column(s) 'chosen_response' -> 'chosen', 'rejected_response' -> 'rejected'?"),
    ({"instruction": "q", "preferred": "a", "dispreferred": "b"},
     "Did you mean to name the column(s) 'instruction' -> 'prompt', 'preferred' -> 'chosen', 'dispreferred' -> "
     "'rejected'?"),
])
def test_preference_columns_of_other_spellings_get_their_renames(row, hint):
    """`lowmem train --trainer dpo` on pairs spelt as other datasets spell them: the error said only which formats
    are accepted (StackExchange-paired, TRL's own former example), or pointed at GRPO for a lone 'prompt'."""
    with pytest.raises(ValueError, match="fit no dpo dataset format") as err:
        detect_format(Dataset.from_list([row]), "dpo", source="pairs.jsonl")
    assert str(err.value).endswith(hint), str(err.value)
