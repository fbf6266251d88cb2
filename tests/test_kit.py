import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowmem.kit import (
    ALPHABET,
    addition_problems,
    build_tiny_model,
    load_model_and_tokenizer,
    preference_dataset,
    reward_dataset,
    reward_fn,
    score,
    sft_collator,
    sft_dataset,
    tokenize_sft,
)


def test_tokenizer_round_trip_and_fixed_vocab(tokenizer):
    text = "12+7=19, hello world! (a-b)/c"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1  # one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [0, 1, 2, 3]
    assert len(tokenizer) == 4 + len(ALPHABET)
    assert tokenizer.convert_tokens_to_ids(" ") == 4 + ALPHABET.index(" ")
    assert tokenizer("Z").input_ids[1] == tokenizer.unk_token_id


def test_tiny_model_is_seeded_and_keeps_global_rng():
    state = torch.get_rng_state()
    a, _ = build_tiny_model(seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = build_tiny_model(seed=0)
    c, _ = build_tiny_model(seed=1)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["model.layers.0.self_attn.q_proj.weight"], pc["model.layers.0.self_attn.q_proj.weight"])


def test_save_and_reload_by_path(tiny_model_path, tiny_model):
    model, tok = tiny_model
    for loaded, ltok in [
        load_model_and_tokenizer(tiny_model_path),
        (AutoModelForCausalLM.from_pretrained(tiny_model_path, local_files_only=True),
         AutoTokenizer.from_pretrained(tiny_model_path, local_files_only=True)),
    ]:
        sd = loaded.state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
        assert ltok("3+4=7").input_ids == tok("3+4=7").input_ids
        assert ltok.pad_token_id == tok.pad_token_id and ltok.eos_token_id == tok.eos_token_id
    bf16, _ = load_model_and_tokenizer(tiny_model_path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16


def test_load_refuses_non_local_path():
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model_and_tokenizer("meta-llama/Llama-3.2-1B")


def test_tasks_deterministic_and_splits_disjoint():
    assert sft_dataset(50, seed=3)["text"] == sft_dataset(50, seed=3)["text"]
    assert sft_dataset(50, seed=3)["text"] != sft_dataset(50, seed=4)["text"]
    train, held = set(addition_problems(3000, 0, "train")), set(addition_problems(500, 0, "eval"))
    assert train and held and not train & held
    for text in sft_dataset(20)["text"]:
        lhs, rhs = text.split("=")
        assert sum(map(int, lhs.split("+"))) == int(rhs)
    with pytest.raises(ValueError, match="valid"):
        addition_problems(1, split="test")


def test_tokenize_sft_labels(tokenizer):
    ds = tokenize_sft(sft_dataset(8), tokenizer)
    lengths = {len(r) for r in ds["input_ids"]}
    assert len(lengths) == 1
    for ids, mask, labels in zip(ds["input_ids"], ds["attention_mask"], ds["labels"]):
        n = sum(mask)
        assert ids[n - 1] == tokenizer.eos_token_id and labels[:n] == ids[:n] and all(x == -100 for x in labels[n:])


def test_preference_pairs():
    ds = preference_dataset(64, seed=1)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    for p, c, r in zip(ds["prompt"], ds["chosen"], ds["rejected"]):
        a, b = map(int, p.rstrip("=").split("+"))
        assert int(c) == a + b and int(r) != a + b and int(r) >= 0


def test_reward_partial_credit():
    ds = reward_dataset(4)
    prompts, answers = ds["prompt"], ds["answer"]
    assert reward_fn(prompts, answers, answer=answers) == [1.0] * 4
    assert reward_fn(prompts, answers) == [1.0] * 4  # recomputed from the prompt
    assert score("xyz", "47") == 0.0
    assert score("40", "47") == 0.75  # two digits, first one right
    assert score("9", "47") == 0.25
    assert 0.0 < score("4 ", "47") < score("47<", "47") == 1.0
    assert reward_fn(["1+2="], [[{"role": "assistant", "content": "3"}]]) == [1.0]


def test_sft_collator_pads_each_batch_and_the_loss_ignores_padding(tokenizer):
    """lowmem train's synthetic SFT path: unpadded rows, each batch padded to its own longest row. The loss
    of a padded batch is the token-weighted mean of the rows' own (unpadded) losses, and equals the loss of
    the same rows padded to the longest of the whole dataset (the previous scheme): eval losses unchanged."""
    model, _ = build_tiny_model(0)
    texts = sft_dataset(32, split="eval")
    rows = tokenize_sft(texts, tokenizer, padding=False)
    assert len({len(r) for r in rows["input_ids"]}) > 1 and rows["labels"] == rows["input_ids"]
    batch = sft_collator(tokenizer)([rows[i] for i in range(8)])
    longest = max(len(rows[i]["input_ids"]) for i in range(8))
    assert batch["input_ids"].shape == (8, longest)  # the batch's longest row, not the dataset's
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == -100).all() and (batch["input_ids"][pad] == tokenizer.pad_token_id).all()
    with torch.no_grad():
        loss = model(**batch).loss.item()
        own = [(model(**sft_collator(tokenizer)([rows[i]])).loss.item(), len(rows[i]["input_ids"]) - 1) for i in range(8)]
        weighted = sum(l * n for l, n in own) / sum(n for _, n in own)  # n: predicted tokens (labels shift by one)
        assert loss == pytest.approx(weighted, rel=1e-5)
        full = tokenize_sft(texts, tokenizer, max_length=longest + 5).with_format("torch")[:8]  # padded further
        assert full["input_ids"].shape[1] > longest
        assert model(**full).loss.item() == pytest.approx(loss, rel=1e-5)


def test_sft_loss_falls(tiny_model):
    """A hand-written loop: 60 Adafactor steps take the held-out loss well below its start."""
    from lowmem import create_optimizer

    torch.manual_seed(0)
    model, tok = tiny_model
    train = tokenize_sft(sft_dataset(640), tok).with_format("torch")
    held = tokenize_sft(sft_dataset(64, split="eval"), tok).with_format("torch")[:]  # dict of tensors

    def eval_loss():
        with torch.no_grad():
            return model(input_ids=held["input_ids"], attention_mask=held["attention_mask"], labels=held["labels"]).loss.item()

    opt = create_optimizer(model, "adafactor", lr=1e-2, relative_step=False, scale_parameter=False)
    before = eval_loss()
    for step in range(60):
        batch = train[step * 10 % 640: step * 10 % 640 + 16]
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()
    after = eval_loss()
    assert before > 4.0 and after < 0.6 * before, (before, after)
