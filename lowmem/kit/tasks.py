"""Synthetic tasks generated in code: deterministic by seed, no downloads.

All three build on addition of two small numbers, ``"12+7=19"``:

* :func:`sft_dataset` / :func:`tokenize_sft` / :func:`sft_collator` - supervised text (``"text"``),
  its tokenized form with ``labels``, and the collator padding each batch, for a plain ``transformers.Trainer``.
* :func:`preference_dataset` - DPO pairs: ``prompt``, ``chosen`` (the sum), ``rejected`` (a wrong sum).
* :func:`reward_dataset` + :func:`reward_fn` - GRPO prompts with an ``answer`` column and a
  verifiable reward with partial credit.

A fixed ~10% of all ``(a, b)`` pairs is held out (split ``"eval"``) and never appears in split
``"train"``, whatever the seed: evaluation loss measures generalisation, not memorisation.
"""

from __future__ import annotations

import random

from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:  # (datasets is imported where a dataset is built: lowmem.kit imports without it, e.g. on the GPU image)
    from datasets import Dataset

SPLITS = ("train", "eval")


def _Dataset() -> type[Dataset]:  # noqa: N802 (the class, imported where a dataset is built)
    from datasets import Dataset

    return Dataset


def _is_eval(a: int, b: int) -> bool:
    return (7 * a + 13 * b) % 10 == 3


def addition_problems(n: int, seed: int = 0, split: str = "train", max_operand: int = 49) -> list[tuple[int, int]]:
    """``n`` pairs ``(a, b)`` with ``0 <= a, b <= max_operand``, drawn with replacement from the split's pool.

    Args:
        n (`int`): Number of problems.
        seed (`int`, defaults to `0`): Same seed, same problems.
        split (`str`, defaults to `"train"`): ``"train"`` or ``"eval"`` (disjoint pools).
        max_operand (`int`, defaults to `49`): Largest operand; sums have at most 2-3 digits.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid: {list(SPLITS)}")
    pool = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1) if _is_eval(a, b) == (split == "eval")]
    rng = random.Random(f"{split}:{seed}")
    return [rng.choice(pool) for _ in range(n)]


def sft_dataset(n: int = 2000, seed: int = 0, split: str = "train", max_operand: int = 49) -> Dataset:
    """Supervised text task: one ``"text"`` column of lines ``"a+b=c"``."""
    return _Dataset().from_dict({"text": [f"{a}+{b}={a + b}" for a, b in addition_problems(n, seed, split, max_operand)]})


def tokenize_sft(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None,
                 padding: bool = True) -> Dataset:
    """Tokenize ``"text"`` for causal-LM training: ``input_ids``, ``attention_mask``, ``labels``.

    Each sequence gets the tokenizer's own special tokens plus ``eos``; ``max_length`` truncates.
    ``labels`` equal ``input_ids``.

    Args:
        padding (`bool`, defaults to `True`): Right-pad every row to the longest sequence of the dataset
            (or ``max_length``), labels with ``-100`` (ignored by the loss), so ``default_data_collator``
            batches it and the rows slice into tensors. `False`: unpadded rows for a padding collator
            (:func:`sft_collator`, what ``lowmem train`` uses), so each batch is only as long as its
            longest row.
    """
    ids = [tokenizer(t).input_ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []) for t in dataset["text"]]
    if not padding:
        ids = [seq[:max_length] if max_length else seq for seq in ids]
        return _Dataset().from_dict({"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids], "labels": ids})
    length = max_length or max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for seq in ids:
        seq = seq[:length]
        fill = length - len(seq)
        rows["input_ids"].append(seq + [pad] * fill)
        rows["attention_mask"].append([1] * len(seq) + [0] * fill)
        rows["labels"].append(seq + [-100] * fill)
    return _Dataset().from_dict(rows)


def sft_collator(tokenizer: PreTrainedTokenizerBase):
    """A data collator padding each batch of :func:`tokenize_sft` rows (``padding=False``) to its own
    longest row: ``input_ids`` with the pad token (``eos`` when the tokenizer has none), ``attention_mask``
    with 0, ``labels`` with ``-100``, so padding never enters the loss (transformers'
    ``DataCollatorForSeq2Seq``, which pads ``labels`` itself; ``DataCollatorForLanguageModeling`` would
    turn every pad-token id into ``-100``, real ``eos`` tokens included when ``pad == eos``)."""
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        raise ValueError("sft_collator: the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")


def preference_dataset(n: int = 512, seed: int = 0, split: str = "train", max_operand: int = 49) -> Dataset:
    """DPO pairs in TRL's standard format: ``prompt`` ``"a+b="``, ``chosen`` the sum, ``rejected`` a wrong sum
    (the sum shifted by 1..10 either way, never negative)."""
    rng = random.Random(f"dpo:{split}:{seed}")
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for a, b in addition_problems(n, seed, split, max_operand):
        s = a + b
        wrong = s + rng.choice([d for d in range(-10, 11) if d != 0 and s + d >= 0])
        rows["prompt"].append(f"{a}+{b}=")
        rows["chosen"].append(str(s))
        rows["rejected"].append(str(wrong))
    return _Dataset().from_dict(rows)


def reward_dataset(n: int = 256, seed: int = 0, split: str = "train", max_operand: int = 49) -> Dataset:
    """GRPO prompts: ``prompt`` ``"a+b="`` and ``answer`` (the sum as a string), passed to :func:`reward_fn`."""
    pairs = addition_problems(n, seed, split, max_operand)
    return _Dataset().from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]})


def score(completion: str, answer: str) -> float:
    """Reward of one completion, in ``[0, 1]``, with partial credit:

    * 0.5 x the fraction of the first ``len(answer)`` characters that are digits (format), and
    * 0.5 x the length of the common prefix with ``answer``, over ``len(answer)`` (correctness).

    The exact answer scores 1.0 whatever follows it; a random model already earns a little.
    """
    head = completion[: len(answer)]
    digits = sum(c.isdigit() for c in head) / len(answer)
    prefix = next((i for i, (c, t) in enumerate(zip(head, answer)) if c != t), len(head))
    return 0.5 * digits + 0.5 * prefix / len(answer)


def reward_fn(prompts: list, completions: list, answer: list[str] | None = None, **kwargs) -> list[float]:
    """TRL reward function (``GRPOTrainer(reward_funcs=reward_fn)``): :func:`score` of each completion.

    ``answer`` comes from the dataset column of that name (TRL forwards extra columns as keyword
    arguments); without it the answer is recomputed from the prompt ``"a+b="``. Conversational
    completions (lists of messages) are scored on the last message's content.
    """
    out = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if isinstance(completion, list):
            completion = completion[-1]["content"]
        if answer is not None:
            target = answer[i]
        else:
            text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
            a, b = text.rstrip("=").split("+")
            target = str(int(a) + int(b))
        out.append(score(completion, target))
    return out
