"""The addition task written out as a user's own data files, in each TRL format (tests of lowmem.data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowmem.kit import addition_problems


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def sft_rows(kind: str, n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """``kind``: ``text``, ``messages``, ``prompt-completion`` or ``prompt-completion-conv``."""
    rows = []
    for a, b in addition_problems(n, seed, split):
        prompt, answer = f"{a}+{b}=", str(a + b)
        rows.append({
            "text": {"text": prompt + answer},
            "messages": {"messages": user(prompt) + assistant(answer)},
            "prompt-completion": {"prompt": prompt, "completion": answer},
            "prompt-completion-conv": {"prompt": user(prompt), "completion": assistant(answer)},
        }[kind])
    return rows


def dpo_rows(n: int, seed: int = 0, conversational: bool = True) -> list[dict[str, Any]]:
    """Right sum (chosen) vs the sum shifted by 1..10 (rejected)."""
    rows = []
    for i, (a, b) in enumerate(addition_problems(n, seed)):
        s = a + b
        wrong = s + (1 + i % 10) * (1 if i % 2 or s < 11 else -1)
        prompt, chosen, rejected = f"{a}+{b}=", str(s), str(wrong)
        if conversational:
            rows.append({"prompt": user(prompt), "chosen": assistant(chosen), "rejected": assistant(rejected)})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def rl_rows(n: int, seed: int = 0, conversational: bool = False) -> list[dict[str, Any]]:
    """``prompt`` and the extra column ``answer`` (reaches the reward functions as a keyword argument)."""
    return [{"prompt": user(f"{a}+{b}=") if conversational else f"{a}+{b}=", "answer": str(a + b)}
            for a, b in addition_problems(n, seed)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(path))
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    from datasets import Dataset

    Dataset.from_list(rows).to_csv(str(path), index=False)
    return path
