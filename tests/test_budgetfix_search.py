"""``lowmem budget --budget`` narrowed by the flags given, its argument errors and "nothing fits" (BUDGETFIX,
FOUND_BUDGETAUDIT 2-5). Estimates only (meta device): exact byte counts, machine-independent."""

from __future__ import annotations

import json

import pytest

from lowmem.cli import main

SEQ = 64
CPU = ["--device", "cpu", "--dtype", "fp32", "--seq-len", str(SEQ)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("budgetfix-search")
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def test_subspace_optimizer_and_its_rank_narrow_the_search(llama_dir, capsys):
    """``--optimizer galore_adamw --optim-args rank=8``: every candidate is GaLore at rank 8 (not the default ranks
    16 / 8 / 4, and no LoRA candidate trained with AdamW)."""
    assert main(["budget", llama_dir, *CPU, "--budget", "8MiB", "--top", "40", "--json", "--optimizer", "galore_adamw",
                 "--optim-args", "rank=8", "--batch-size", "1", "--no-gradient-checkpointing"]) == 0
    cands = json.loads(capsys.readouterr().out)["candidates"]
    assert cands and {(c["settings"]["optimizer"], c["settings"]["optim_args"].get("rank")) for c in cands} == {("galore_adamw", 8)}
    assert not any(c["settings"].get("lora") for c in cands)


@pytest.mark.parametrize("flags, named", [(["--optim-args", "betas=[0.8,0.9]"], "--optimizer"),
                                          (["--layerwise", "--lora-r", "8"], "--layerwise"),
                                          (["--quantization", "nf4"], "--lora-r"), (["--no-double-quant"], "--no-double-quant"),
                                          (["--lora-targets", "q_proj"], "--lora-targets")],
                         ids=["optim-args-alone", "layerwise-lora", "quant-alone", "double-quant", "targets"])
def test_flags_the_search_cannot_apply_are_errors_naming_them(llama_dir, capsys, flags, named):
    assert main(["budget", llama_dir, *CPU, "--budget", "8MiB", *flags]) == 2
    assert named in capsys.readouterr().err


@pytest.mark.slow
def test_nothing_fits_reports_the_smallest_configuration_and_the_shortfall(llama_dir, capsys):
    """``SearchResult.smallest`` is the least batch-1 total of the grid (each configuration listed at batch 1 under an
    unlimited budget), also when the budget holds a configuration's weights, gradients and state but not its
    activations, and the CLI's message says it and how far the budget is short (one byte)."""
    from lowmem.memory.report import fmt_bytes
    from lowmem.memory.search import search_budget

    kw = dict(seq_len=SEQ, batch_size=1, dtype="fp32", device="cpu", optimizers=["adafactor"], lora_ranks=[16],
              quantization=["nf4"], full_finetuning=False)
    every = search_budget(llama_dir, "1TiB", **kw)
    small = min(every, key=lambda c: c.total)
    none = search_budget(llama_dir, small.total - 1, **kw)
    assert not none and none.smallest.total == small.total and none.smallest.settings == small.settings
    assert main(["budget", llama_dir, *CPU, "--batch-size", "1", "--budget", f"{small.total - 1}B", "--optimizer", "adafactor",
                 "--lora-r", "16", "--quantization", "nf4"]) == 1
    err = capsys.readouterr().err
    assert f"needs {fmt_bytes(small.total)} ({small.total:,} B), 1 B more" in err, err


@pytest.mark.parametrize("kw, field", [({"budget": 0}, "budget"), ({"batch_size": 0}, "batch_size"),
                                       ({"batch_size": 2.0}, "batch_size"), ({"top": -1}, "top")])
def test_search_budget_argument_errors_name_the_field(llama_dir, kw, field):
    from lowmem.memory.search import search_budget

    args = {"budget": "8MiB", "seq_len": SEQ, "dtype": "fp32", "device": "cpu", **kw}
    with pytest.raises(ValueError, match=field):
        search_budget(llama_dir, **args)
