"""SMALLS task 3: estimate_memory under a Hugging Face 8-bit optim name (lion_8bit, adamw_8bit, ...) prices the
nn.Embedding weights' optimizer state at 32 bits, as those runs keep it (transformers' Trainer; lowmem's
lowmem_embeddings_32bit, registry.full_precision_embedding_groups); lowmem's own lion8bit quantizes it too."""

import warnings

import pytest

from lowmem.kit import build_tiny_model
from lowmem.memory import estimate_memory


def _real_state(name, embeddings_32bit):
    from lowmem.optim import create_optimizer
    from lowmem.trainers.hf import create_optimizer_embeddings_32bit

    model = build_tiny_model(seed=0)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = (create_optimizer_embeddings_32bit if embeddings_32bit else create_optimizer)(model, name, lr=1e-4)
        opt.materialize_state()
    return opt.state_bytes()


def test_lion_8bit_prices_the_embeddings_at_32_bits():
    config = build_tiny_model(seed=0)[0].config
    kw = dict(batch_size=1, seq_len=8, dtype="fp32", device="cpu")
    hf = estimate_memory(config, optimizer="lion_8bit", **kw)
    own = estimate_memory(config, optimizer="lion8bit", **kw)
    assert hf.optimizer_states == _real_state("lion8bit", True)
    assert own.optimizer_states == _real_state("lion8bit", False)
    # the tiny Llama's embedding: Lion's one moment, 4 B instead of ~1 B per element
    n = build_tiny_model(seed=0)[0].get_input_embeddings().weight.numel()
    assert hf.optimizer_states - own.optimizer_states > 2 * n
    assert any("32-bit" in n for n in hf.notes)
    # layerwise (lowmem train sets lowmem_embeddings_32bit only without it): the 8-bit embedding
    assert estimate_memory(config, optimizer="lion_8bit_layerwise", **kw).optimizer_states == \
        own.optimizer_states


@pytest.mark.parametrize("hf, own", [("adamw_8bit", "bnb_adamw8bit"), ("paged_lion_8bit", "bnb_paged_lion8bit")])
def test_bitsandbytes_names_closed_form(hf, own):
    """bitsandbytes' classes have no meta sizing (closed form): the embedding's state there is states x 4 B per
    element; the rest is the 8-bit closed form."""
    import math

    from lowmem.optim.recipes.bnb import BNB_OPTIMIZERS, state_bytes_closed_form

    model = build_tiny_model(seed=0)[0]
    config = model.config
    kw = dict(batch_size=1, seq_len=8, dtype="fp32", device="cpu")
    emb = model.get_input_embeddings().weight
    rest = [p for p in model.parameters() if p is not emb]
    states = BNB_OPTIMIZERS[own][3]
    expected = state_bytes_closed_form(own, rest) + states * 4 * emb.numel()
    assert estimate_memory(config, optimizer=hf, **kw).optimizer_states == expected
    n = emb.numel()
    assert estimate_memory(config, optimizer=own, **kw).optimizer_states == \
        state_bytes_closed_form(own, rest) + states * (n + 4 * math.ceil(n / 256))


def test_measure_memory_builds_the_hf_name_as_the_trainer_does():
    """measure_memory(optimizer="lion_8bit"): the optimizer built as LowMemTrainer builds it for that name (the
    embedding's state float32); its measured state equals the estimate's, and the real optimizer's."""
    from lowmem.memory.measure import measure_memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = measure_memory("tiny", optimizer="lion_8bit", steps=1, seq_len=8, dtype="fp32", device="cpu")
    assert res.measured["optimizer_states"] == res.estimate.optimizer_states == _real_state("lion8bit", True)


def test_budget_cli_prices_lion_8bit_as_it_runs(capsys):
    import json

    from lowmem.cli import main

    states = {}
    for name in ("lion_8bit", "lion8bit"):
        assert main(["budget", "tiny", "--optimizer", name, "--dtype", "fp32", "--seq-len", "8", "--device", "cpu",
                     "--json"]) == 0
        states[name] = json.loads(capsys.readouterr().out)["optimizer_states"]
    assert states == {"lion_8bit": _real_state("lion8bit", True), "lion8bit": _real_state("lion8bit", False)}


@pytest.mark.parametrize("hf, own", [("lion_8bit", "lion8bit"), ("adamw_8bit", "bnb_adamw8bit")])
def test_budget_search_prices_hf_8bit_names_as_lowmem_train_runs_them(hf, own):
    """search_budget (``lowmem budget --budget B --optimizer lion_8bit``) keeps the HF name for its full-rank,
    not-layerwise candidates: their optimizer state is estimate_memory's under that name (embeddings 32-bit); the
    layerwise ones (lowmem train quantizes the embeddings there) are the registered optimizer's."""
    from lowmem.memory.search import search_budget

    config = build_tiny_model(seed=0)[0].config
    kw = dict(batch_size=1, seq_len=8, dtype="fp32", device="cpu")
    found = search_budget(config, "1GiB", seq_len=8, batch_size=1, dtype="fp32", device="cpu", optimizers=[hf],
                          lora_ranks=[], checkpointing=[False])
    by_lw = {c.settings["layerwise"]: c for c in found}
    assert set(by_lw) == ({False, True} if own != "bnb_adamw8bit" else {False})
    assert by_lw[False].settings["optimizer"] == hf
    assert by_lw[False].components["optimizer_states"] == estimate_memory(config, optimizer=hf, **kw).optimizer_states
    if own != "bnb_adamw8bit":  # (bitsandbytes' classes have no layerwise candidates)
        assert by_lw[True].settings["optimizer"] == own
        assert by_lw[True].components["optimizer_states"] == \
            estimate_memory(config, optimizer=own, layerwise=True, **kw).optimizer_states
    assert by_lw[False].components["optimizer_states"] > estimate_memory(config, optimizer=own, **kw).optimizer_states


def test_budget_cli_search_passes_the_hf_name(capsys):
    """``lowmem budget tiny --budget B --optimizer lion_8bit --json``: the search's picks are priced under the HF name."""
    import json

    from lowmem.cli import main

    states = {}
    for name in ("lion_8bit", "lion8bit"):
        assert main(["budget", "tiny", "--optimizer", name, "--dtype", "fp32", "--seq-len", "8", "--device", "cpu",
                     "--budget", "1GiB", "--batch-size", "1", "--no-gradient-checkpointing", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        picks = out["candidates"] if isinstance(out, dict) else out
        states[name] = {c["settings"]["layerwise"]: c["components"]["optimizer_states"] for c in picks
                        if not c["settings"].get("lora")}  # (the LoRA candidates: the adapters' state)
    assert states["lion_8bit"][False] == _real_state("lion8bit", True)
    assert states["lion8bit"][False] == _real_state("lion8bit", False)
    assert states["lion_8bit"][True] == states["lion8bit"][True]
