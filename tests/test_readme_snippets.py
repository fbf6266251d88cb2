"""The README's Python snippets run as written (copy-paste), on the embedded tiny model."""

import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def test_use_snippet_runs_verbatim():
    from lowmem.kit import build_tiny_model

    block = python_blocks(README.read_text())[0]
    assert "create_optimizer" in block and "step_transient_bytes" in block
    model, _ = build_tiny_model()
    env = {"model": model}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (the snippet builds the tiny model; rank 16 applies to its weights)
        exec(compile(block, "README.md", "exec"), env)
    assert env["opt"].state_bytes() > 0
