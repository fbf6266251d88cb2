"""An outside user's SFT run on their own model of an architecture the other tests leave out (a tiny Granite saved with
``save_pretrained``, a byte-level BPE tokenizer trained with ``tokenizers``, a chat template with a system turn and
``{% generation %}`` marks), with the SFTConfig loss fields a TRL config carries. Session 16's audit (USERFLOW3):

- ``completion_only_loss: true`` on data without a completion (a ``text`` CSV, ``messages`` Parquet) trained on every
  token (the system prompt and the user turns included) without a word: TRL applies it to prompt-completion rows only.
- ``assistant_only_loss: true`` with a row that has no assistant turn was TRL's ``RuntimeError`` traceback (exit 1)
  after the model loaded, saying the template "may be missing the {% generation %} keyword" (it was not).
- ``assistant_only_loss: true`` on standard (not conversational) data was TRL's ``ValueError`` after the model loaded.
- A ``tools`` column (tool-calling data) under a chat template that does not render ``tools``: TRL passes the column
  to the template, which drops it; the model trained on the calls without ever seeing the tool schemas."""

import json

import pandas as pd
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lowmem.config import ConfigError
from lowmem.data import recipe_data
from lowmem.train import load_recipe

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
SPECIAL = ["<unk>", "<|pad|>", "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"]
# Granite-style turns; the assistant's inside {% generation %} (TRL's assistant masks); tools not rendered
TEMPLATE = (
    "{%- for m in messages %}{{- '<|start_of_role|>' + m['role'] + '<|end_of_role|>' }}"
    "{%- if m['role'] == 'assistant' %}{% generation %}{{- m['content'] or '' }}"
    "{%- for tc in m.get('tool_calls') or [] %}{{ ' call ' + tc['function']['name'] }}{%- endfor %}"
    "{{- '<|end_of_text|>' }}{% endgeneration %}{%- else %}{{- m['content'] + '<|end_of_text|>' }}{%- endif %}"
    "{{- '\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}")
TOOLS_TEMPLATE = ("{%- if tools %}{{- 'TOOLS:' }}{%- for t in tools %}{{ ' ' + t['function']['name'] }}{%- endfor %}"
                  "{{- '\n' }}{%- endif %}" + TEMPLATE)
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "adds two numbers",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]


def _chat(a, b, turns=1):
    msgs = [SYSTEM]
    for _ in range(turns):
        msgs += [{"role": "user", "content": f"what is {a} plus {b}?"}, {"role": "assistant", "content": f"the answer is {a + b}."}]
    return msgs


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's folder: ``model/`` (Granite, BPE tokenizer with the template) and data files."""
    root = tmp_path_factory.mktemp("userflow3")
    corpus = [f"what is {a} plus {b}? the answer is {a + b}." for a in range(20) for b in range(20)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus + ["You are a helpful assistant. call calculator tool"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end_of_text|>", pad_token="<|pad|>",
                                               unk_token="<unk>", chat_template=TEMPLATE)
    cfg = transformers.GraniteConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                     embedding_multiplier=12.0, logits_scaling=4.0, residual_multiplier=0.22)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    pd.DataFrame([{"messages": _chat(a, 3, 1 + a % 2)} for a in range(8)]).to_parquet(root / "chat.parquet")
    pd.DataFrame([{"text": f"what is {a} plus 2? the answer is {a + 2}."} for a in range(8)]).to_csv(root / "text.csv", index=False)
    (root / "pc.jsonl").write_text("".join(json.dumps({"prompt": f"what is {a} plus 1?", "completion": f" {a + 1}."}) + "\n"
                                           for a in range(8)))
    rows = [{"messages": _chat(a, 1)} for a in range(6)]
    rows[3]["messages"] = rows[3]["messages"][:2]  # system + user only: no assistant turn
    (root / "no_answer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tools = []
    for a in range(6):
        msgs = _chat(a, 4)
        msgs[2:2] = [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": json.dumps({"a": a, "b": 4})}}]},
            {"role": "tool", "content": str(a + 4)}]
        tools.append({"messages": msgs, "tools": json.dumps(TOOLS)})
    (root / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tools))
    (root / "tools.jinja").write_text(TOOLS_TEMPLATE)
    return root


def _data(user, dataset, **fields):
    return recipe_data(load_recipe(None, model=str(user / "model"), dataset=str(user / dataset), lr=1e-3, **fields))


@pytest.mark.parametrize("dataset, says", [("text.csv", "text"), ("chat.parquet", "assistant_only_loss: true")])
def test_completion_only_loss_without_a_completion_is_refused(user, dataset, says):
    with pytest.raises(ConfigError, match=r"completion_only_loss=true .*prompt-completion") as err:
        _data(user, dataset, completion_only_loss=True)
    assert says in str(err.value)


def test_completion_only_loss_where_it_applies_passes(user):
    assert _data(user, "pc.jsonl", completion_only_loss=True).format.name == "prompt-completion"
    assert _data(user, "chat.parquet", completion_only_loss=True, assistant_only_loss=True).format.conversational
    assert _data(user, "chat.parquet", completion_only_loss=False).format.name == "messages"


def test_assistant_only_loss_row_without_an_assistant_turn_is_named(user):
    with pytest.raises(ConfigError, match=r"assistant_only_loss=true.* 1 row.* 3 \(line 4\).*\['system', 'user'\]"):
        _data(user, "no_answer.jsonl", assistant_only_loss=True)
    assert _data(user, "no_answer.jsonl").train.num_rows == 6  # without the field the row trains (every token)


@pytest.mark.parametrize("dataset", ["text.csv", "pc.jsonl"])
def test_assistant_only_loss_on_standard_data_is_refused_before_the_model_loads(user, dataset):
    with pytest.raises(ConfigError, match=r"assistant_only_loss=true .*conversational .*standard"):
        _data(user, dataset, assistant_only_loss=True)


def test_a_tools_column_the_template_ignores_is_refused(user):
    with pytest.raises(ValueError, match=r"'tools'.*does not render"):
        _data(user, "tools.jsonl", assistant_only_loss=True)


def test_a_tools_column_the_template_renders_passes(user):
    data = _data(user, "tools.jsonl", assistant_only_loss=True, chat_template=str(user / "tools.jinja"))
    assert data.format.extra_columns == ("tools",)


@pytest.mark.slow  # a whole run (3 s)
def test_standard_rows_beside_a_chat_template_get_a_note(user, tmp_path, capsys):
    """prompt / completion strings for a chat model: TRL renders only conversational rows with the chat template, so
    the run trained on 'what is 1 plus 1? 2.' without the turns the model is prompted with at inference."""
    from lowmem.cli import main

    assert main(["train", "--model", str(user / "model"), "--dataset", str(user / "pc.jsonl"), "--lr", "1e-3",
                 "--steps", "1", "--batch-size", "2", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "note: dataset" in out and "chat template is not applied" in out


def test_format_notes(user, tmp_path):
    from lowmem.data import format_notes

    tok = transformers.AutoTokenizer.from_pretrained(user / "model")
    assert "chat template is not applied" in " ".join(format_notes(_data(user, "pc.jsonl"), tok))
    assert format_notes(_data(user, "text.csv"), tok) == []  # language modeling: no template expected
    assert format_notes(_data(user, "chat.parquet"), tok) == []
    tok.chat_template = None
    assert format_notes(_data(user, "pc.jsonl"), tok) == []  # a base model: strings are what it takes
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{i}+1?"}], "answer": str(i + 1),
                                           "tools": json.dumps(TOOLS), "system": "Be brief."}) + "\n" for i in range(4)))
    data = recipe_data(load_recipe(None, model=str(user / "model"), dataset=str(prompts), lr=1e-3, trainer="grpo",
                                   reward_funcs=["exact_match"]))
    assert any("['tools', 'system'] reach the reward functions only" in n for n in format_notes(data, tok))


def test_padding_free_without_packing_is_refused_before_the_model_loads(user, tmp_path):
    """TRL 1.16 refuses padding_free without packing unless max_length is null (it does not truncate then), its own
    default 1024 included: `padding_free: true` alone failed after the model loaded."""
    kw = dict(model=str(user / "model"), dataset=str(user / "chat.parquet"), lr=1e-3, padding_free=True)
    with pytest.raises(ConfigError, match=r"padding_free=true without packing.*max_length: null.*packing: true"):
        load_recipe(None, **kw)
    assert load_recipe(None, **kw, packing=True).training_args["packing"]
    recipe = tmp_path / "recipe.yaml"  # a keyword override of None means "not given": the file's null is kept
    recipe.write_text(f"model: {user / 'model'}\ndataset: {user / 'chat.parquet'}\nlr: 1.0e-3\npadding_free: true\n"
                      "max_length: null\n")
    assert load_recipe(recipe).training_args["max_length"] is None


def test_grpo_completion_room_renders_prompts_with_chat_template_kwargs(user, tmp_path):
    """TRL's GRPO renders prompts with ``chat_template_kwargs`` (Qwen3's ``enable_thinking: false`` adds an empty
    think block to the generation prompt); the room left for ``max_completion_length`` was measured without them, so
    prompt + completion could overrun the model's context by what they add."""
    from lowmem.train import fit_completion_length, model_context_length

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"what is {i} plus 1?"}],
                                           "answer": str(i + 1)}) + "\n" for i in range(4)))
    template = TEMPLATE.replace("<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}",
                                "<|start_of_role|>assistant<|end_of_role|>' }}{%- if think is false %}"
                                "{{ 'the answer is the answer is the answer is ' * 8 }}{%- endif %}{%- endif %}")
    tok = transformers.AutoTokenizer.from_pretrained(user / "model")
    tok.chat_template = template
    recipe = load_recipe(None, model=str(user / "model"), dataset=str(prompts), lr=1e-3, trainer="grpo",
                         reward_funcs=["exact_match"], num_generations=4, batch_size=4,
                         chat_template_kwargs={"think": False})
    data = recipe_data(recipe)
    fit_completion_length(recipe, tok, [data.train])
    rendered = [tok.apply_chat_template(p, add_generation_prompt=True, think=False) for p in data.train["prompt"]]
    longest = max(len(ids if isinstance(ids, list) else ids["input_ids"]) for ids in rendered)
    assert recipe.training_args["max_completion_length"] == model_context_length(recipe.model)[0] - longest
