"""The budget search's default candidates and their words (SEARCH16, FOUND_INTEG16 1): ``racs`` is tried by default
(Adafactor's state and price, a step transient of rows and columns), RACS / SM3 say what their row / column statistics
are (not Adafactor's "factored second moment"), and a full fine-tuning candidate of pure bfloat16 weights says that it
rounds small updates off unless ``bf16_stochastic_round`` / ``kahan_summation`` is on. Estimates only (meta device):
exact byte counts, machine-independent."""

from __future__ import annotations

import json
import warnings

import pytest

from lowmem.cli import main
from lowmem.memory.search import BF16_ROUNDING_NOTE, _optimizer_cost, default_optimizers, search_budget
from lowmem.optim import get_entry

KW = dict(budget="1TiB", seq_len=32, batch_size=1, device="cpu", checkpointing=(False,), lora_ranks=(8,), quantization=(None,))


def _search(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return search_budget("tiny", **{**KW, **kw})


def test_racs_is_a_default_candidate_priced_as_adafactor_and_smaller_per_parameter():
    """racs has Adafactor's price (1.5, + 0.5 layerwise) and state class. Its step transient was the smaller per
    parameter in bfloat16 (Llama-2-7B layerwise: 15.79 vs 17.62 GiB, SEARCH16, session 16) while Adafactor stepped a
    bfloat16 weight whole; since FIXMEM21 (AUDMEM21 1) Adafactor steps it in chunks: Llama-2-7B layerwise 15.79 GiB
    both (Adafactor's transient 1.95 GiB -> 128 MiB), the tiny model's layerwise Adafactor the smaller (66,846 B vs
    racs 68,126; 1,068,624 B before) and first at the same price. The multi-tensor step (Adafactor's bfloat16 bucket
    of whole tensors) keeps racs the smaller."""
    assert "racs" in default_optimizers() and "sm3" not in default_optimizers()
    # bfloat16 weights on CUDA, as the Llama-2-7B search
    found = _search(dtype="bf16", device="cuda", optimizers=["adafactor", "racs"], lora_ranks=())
    rows = {(c.settings["optimizer"], c.settings["layerwise"]): c for c in found if not c.settings.get("lora")}
    assert set(rows) == {("adafactor", False), ("adafactor", True), ("racs", False), ("racs", True)}
    for lw in (False, True):
        assert rows["racs", lw].cost == rows["adafactor", lw].cost == 1.5 + 0.5 * lw
    assert rows["racs", False].components["optimizer_transient"] < rows["adafactor", False].components["optimizer_transient"]
    assert rows["racs", False].total < rows["adafactor", False].total
    assert rows["adafactor", True].components["optimizer_transient"] < rows["racs", True].components["optimizer_transient"]
    assert [c.settings["optimizer"] for c in found if c.settings["layerwise"]] == ["adafactor", "racs"]


@pytest.mark.parametrize("name, words", [("racs", "row/column scaling, not per element"),
                                         ("sm3", "row/column max accumulators, not per element"),
                                         ("adafactor", "factored second moment"), ("came", "factored second moment"),
                                         ("adam_mini", "blockwise second moment")])
def test_row_and_column_optimizers_say_what_they_keep(name, words):
    """The price is the metadata's (1.5 for a factored / blockwise second moment); the words are Adafactor's only for
    Adafactor-style factored moments (CAME is Adafactor's plus a confidence)."""
    entry = get_entry(name)
    assert _optimizer_cost(name, entry, None, 4096) == (1.5, [words])


def test_pure_bf16_full_finetuning_rows_note_the_rounding_unless_an_option_keeps_small_updates():
    found = _search(dtype="bf16", optimizers=["adamw", "racs"])
    full = [c for c in found if not c.settings.get("lora")]
    lora = [c for c in found if c.settings.get("lora")]
    assert len(full) == 4 and lora
    assert all(BF16_ROUNDING_NOTE in c.gives_up for c in full)
    assert not any(BF16_ROUNDING_NOTE in c.gives_up for c in lora)  # (adapters are float32)
    # AdamW, full fine-tuning: the note is unpriced (the reference still costs 0)
    assert [c.cost for c in full if c.settings["optimizer"] == "adamw" and not c.settings["layerwise"]] == [0.0]
    for opt in ("bf16_stochastic_round", "kahan_summation"):
        kept = _search(dtype="bf16", optimizers=["adamw"], lora_ranks=(), optim_args={opt: True})
        assert kept and not any(BF16_ROUNDING_NOTE in c.gives_up for c in kept), opt
    for dtype in ("fp32", "fp16"):
        assert not any(BF16_ROUNDING_NOTE in c.gives_up for c in _search(dtype=dtype, optimizers=["adamw"], lora_ranks=()))


def test_budget_cli_explains_the_bf16_note_once_under_the_table(capsys):
    args = ["budget", "tiny", "--device", "cpu", "--seq-len", "32", "--batch-size", "1", "--budget", "1GiB",
            "--optimizer", "adamw", "--no-gradient-checkpointing"]
    assert main([*args, "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert out.count("note: 'bf16 weights") == 1 and "bf16_stochastic_round=true" in out and "kahan_summation=true" in out
    assert main([*args, "--dtype", "fp32"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert main([*args, "--dtype", "bf16", "--json"]) == 0
    cands = json.loads(capsys.readouterr().out)["candidates"]
    assert {BF16_ROUNDING_NOTE in c["gives_up"] for c in cands if not c["settings"].get("lora")} == {True}


@pytest.mark.parametrize("args", [{"kahan_summation": True}, {"bf16_stochastic_round": True}, {"foo": 1}])
def test_a_bitsandbytes_candidate_refuses_options_it_does_not_take(args):
    """bitsandbytes' optimizers have no rounding option (create_optimizer refuses one): a search that took
    ``kahan_summation`` for ``bnb_adamw8bit`` would have dropped the bf16 note of rows that round to nearest."""
    with pytest.raises(ValueError, match=rf"Unknown hyperparameter\(s\) \['{next(iter(args))}'\] for optimizer 'bnb_adamw8bit'"):
        _search(dtype="bf16", optimizers=["bnb_adamw8bit"], lora_ranks=(), optim_args=args)


def test_estimate_memory_refuses_unknown_options_of_a_bitsandbytes_optimizer():
    """estimate_memory sizes a bitsandbytes optimizer in closed form, without its constructor: it refuses the names
    create_optimizer refuses (it sized a run ``lowmem train`` would refuse; FOUND_SEARCH16 1)."""
    from lowmem.memory import estimate_memory

    with pytest.raises(ValueError, match=r"Unknown hyperparameter\(s\) \['kahan_summation'\] for optimizer 'bnb_adamw8bit'"):
        estimate_memory("tiny", "bnb_adamw8bit", {"kahan_summation": True}, dtype="bf16")
    assert estimate_memory("tiny", "bnb_adamw8bit", {"min_8bit_size": 4096}, dtype="bf16").optimizer_states > 0
