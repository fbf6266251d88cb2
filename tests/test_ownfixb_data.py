"""OWNFIXB (session 18): the twins of tests/test_audit18_owndata.py's refusals that must stay accepted."""

from __future__ import annotations

import json

CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
CALLING_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}"
                    "{% for tc in m.get('tool_calls') or [] %}<call {{ tc['function']['name'] }}>{% endfor %}"
                    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}|{% endfor %}"
                    "{% if add_generation_prompt %}a:{% endif %}")


def test_tool_calls_a_template_renders_pass(tmp_path):
    """A template that prints ``tool_calls`` renders the row differently without them: accepted (the refusal is for
    templates that drop the calls, AUDIT-OWNDATA18 7), and rows without tool_calls are not compared at all."""
    from lowmem.data import check_template_renders, load_train_data
    from lowmem.kit.tokenizer import build_tokenizer

    rows = [{"messages": [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                          {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3"}]}] * 2
    path = tmp_path / "calls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = build_tokenizer()
    tok.chat_template = CALLING_TEMPLATE
    data = load_train_data(str(path), "sft")
    check_template_renders(tok, data, source=str(path))
    assert data.rendered_with == CALLING_TEMPLATE
