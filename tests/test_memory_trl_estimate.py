"""``estimate_memory(trainer="sft" | "dpo" | "grpo")``: lowmem's TRL 1.16 trainers against measured runs.

What a plain estimate missed for them (tiny Llama h=256, 2 layers, fp32, CPU, adafactor, ``MemoryCallback``):
TRL's configs turn gradient checkpointing on; DPO runs the chosen and the rejected sequences of each pair in one
forward (twice the batch) and keeps a reference model (a copy: its weights); GRPO generates with a KV cache in a phase
of its own; the loss runs TRL's fused LM head (tiles, no logits). Peak estimate / measured, before (the plain estimate
at the run's batch and length) and now: DPO 4 pairs x 66 tokens 19.66 / 24.81 MiB (0.79) -> 25.73 (1.04); GRPO 4
completions of 25 + 40 tokens 19.49 / 14.91 (1.31, no checkpointing) -> 14.22 (0.95); GRPO with 4 kv heads, 32
completions of 25 + 64 tokens generated together 24.98 / 22.10 MiB of live storages (1.13) -> 20.13 (0.91); under
TRL's default ``bf16=True`` (autocast) 18.12 / 22.09 (0.82) -> 22.04 (0.998) with the generation traced under autocast."""

from __future__ import annotations

import copy
import random
import sys
import warnings

import pytest
import torch

from lowmem.memory import estimate_memory
from lowmem.memory.activations import FUSED_CPU_TILE_TEMPS, fused_head_bytes

SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4)


class LiveStorages(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the storages that ops under the mode return and that are still alive (each storage once; the
    storages of ``existing``, e.g. the parameters, which views such as ``weight.t()`` return, are not counted)."""

    def __init__(self, existing=()):
        from torch.multiprocessing.reductions import StorageWeakRef

        super().__init__()
        self.live, self.peak = {}, 0
        self.existing = {StorageWeakRef(t.untyped_storage()) for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef

        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                key = StorageWeakRef(o.untyped_storage())
                if key not in self.existing:
                    self.live.setdefault(key, o.untyped_storage().nbytes())
        for key in [k for k in self.live if k.expired()]:
            del self.live[key]
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def _model(kv_heads=2):
    from lowmem.kit import build_tiny_model

    return build_tiny_model(num_key_value_heads=kv_heads, **SHAPE)


def _digits(rng, n):
    return "".join(rng.choice("0123456789") for _ in range(n))


def _callback():
    from lowmem.trainers.memory_callback import MemoryCallback

    return MemoryCallback(track_steps=2)


def _quiet():
    return warnings.catch_warnings()


def test_dpo_peak_against_a_measured_run(tmp_path):
    """4 pairs of 24 + 40 digits (66 tokens with the special ones), a reference copy, TRL's defaults (checkpointing,
    ``bf16=True``: autocast with float32 weights, i.e. ``--precision mixed``): measured peak 24.81 MiB (the tracker
    counts the reference's weights, which its forward touches), estimated 25.21 (1.016; a plain mixed estimate of the
    same batch: 19.00, 0.77)."""
    from lowmem.cli_budget import mixed_precision_estimate

    from datasets import Dataset

    from lowmem.trainers import LowMemDPOConfig, LowMemDPOTrainer

    model, tok = _model()
    rng = random.Random(0)
    rows = [{"prompt": _digits(rng, 24), "chosen": _digits(rng, 40), "rejected": _digits(rng, 40)} for _ in range(8)]
    args = LowMemDPOConfig(output_dir=str(tmp_path), lowmem_optim="adafactor", per_device_train_batch_size=4, max_steps=1,
                           report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3, logging_steps=1)
    cb = _callback()
    trainer = LowMemDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tok, callbacks=[cb])
    pairs, seq_len = next(iter(trainer.get_train_dataloader()))["input_ids"].shape
    assert pairs == 8  # chosen and rejected in one batch
    with _quiet():
        warnings.simplefilter("ignore")
        trainer.train()
        est = mixed_precision_estimate(model.config, "bf16", optimizer="adafactor", batch_size=4, seq_len=seq_len,
                                       device="cpu", trainer="dpo", gradient_checkpointing=None)
    assert args.bf16 and est.settings["gradient_checkpointing"] is True and est.settings["reference"] == "copy"
    assert est.details["reference_weights"] == (sum(p.numel() * 4 for p in model.parameters())
                                                 + sum(b.numel() * b.element_size() for b in model.buffers()))
    assert 0.90 <= est.total / cb.peak["peak"] <= 1.10, (est.table(), cb.peak)


def test_grpo_training_peak_against_a_measured_run(tmp_path):
    """4 completions of 16 tokens after 25-token prompts, generated 4 at a time, float32 (``bf16=False``): the training
    step is the peak, 13.56 MiB measured, 12.99 estimated (0.96)."""
    from datasets import Dataset

    from lowmem.trainers import LowMemGRPOConfig, LowMemGRPOTrainer

    model, tok = _model()
    rng = random.Random(0)
    prompts = Dataset.from_list([{"prompt": _digits(rng, 24)} for _ in range(4)])
    args = LowMemGRPOConfig(output_dir=str(tmp_path), lowmem_optim="adafactor", per_device_train_batch_size=4, max_steps=1,
                            report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3, num_generations=4, bf16=False,
                            max_completion_length=16, generation_kwargs={"min_new_tokens": 16})
    cb = _callback()
    trainer = LowMemGRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                                args=args, train_dataset=prompts, processing_class=tok, callbacks=[cb])
    prompt_len = len(tok(prompts[0]["prompt"])["input_ids"])
    with _quiet():
        warnings.simplefilter("ignore")
        trainer.train()
        est = estimate_memory(model.config, "adafactor", batch_size=4, seq_len=prompt_len + 16, dtype="fp32", device="cpu",
                              trainer="grpo", gradient_checkpointing=None, max_completion_length=16)
    assert est.settings["generation_batch_size"] == 4 and est.settings["reference"] == "none"
    assert 0.90 <= est.total / cb.peak["peak"] <= 1.10, (est.table(), cb.peak)


@pytest.mark.slow
def test_grpo_log_prob_forwards_against_a_measured_run(tmp_path):
    """GRPO with a reference model (``beta=0.1``: a copy, TRL's default without LoRA) and a generation batch of 8 above
    the micro-batch of 4 (``steps_per_generation=2``), so TRL 1.16 runs both no-grad log-probability forwards (the old
    policy's and the reference's) before the training micro-batch. The estimate leaves them out because they never set
    the peak (docs/memory.md): measured here, every live storage in each of them 1.96 MiB against the run's 7.73 MiB
    (with the two models' weights 11.36 MiB more); the whole run measured 19.09 MiB, estimated 19.18 (1.005), float32,
    checkpointing (TRL's default), 4 completions of 25 + 16 tokens per micro-batch."""
    from datasets import Dataset

    from lowmem.trainers import LowMemGRPOConfig, LowMemGRPOTrainer

    model, tok = _model()
    model.save_pretrained(tmp_path / "model")  # TRL builds the reference from the policy's path
    tok.save_pretrained(tmp_path / "model")
    rng = random.Random(0)
    prompts = Dataset.from_list([{"prompt": _digits(rng, 24)} for _ in range(8)])
    args = LowMemGRPOConfig(output_dir=str(tmp_path / "out"), lowmem_optim="adafactor", per_device_train_batch_size=4,
                            max_steps=1, report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3,
                            num_generations=4, steps_per_generation=2, beta=0.1, bf16=False, max_completion_length=16,
                            generation_kwargs={"min_new_tokens": 16})
    with _quiet():
        warnings.simplefilter("ignore")
        trainer = LowMemGRPOTrainer(model=str(tmp_path / "model"), args=args, train_dataset=prompts, processing_class=tok,
                                    reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions])
    held = {id(t): t for m in (trainer.model, trainer.ref_model) for t in (*m.parameters(), *m.buffers())}
    counter = LiveStorages(held.values())
    log_prob_peaks = []
    original = trainer._get_per_token_logps_and_entropies

    def log_probs(*a, **k):  # each no-grad log-probability forward's own peak of live storages
        if torch.is_grad_enabled():  # the training micro-batch's forward
            return original(*a, **k)
        before, counter.peak = counter.peak, sum(counter.live.values())
        try:
            return original(*a, **k)
        finally:
            log_prob_peaks.append(counter.peak)
            counter.peak = max(before, counter.peak)

    trainer._get_per_token_logps_and_entropies = log_probs
    with _quiet(), counter:
        warnings.simplefilter("ignore")
        trainer.train()
    measured = counter.peak + sum(t.untyped_storage().nbytes() for t in held.values())
    prompt_len = len(tok(prompts[0]["prompt"])["input_ids"])
    est = estimate_memory(trainer.model.config, "adafactor", batch_size=4, seq_len=prompt_len + 16, dtype="fp32",
                          device="cpu", trainer="grpo", gradient_checkpointing=None, max_completion_length=16,
                          generation_batch_size=8, reference="copy")
    assert len(log_prob_peaks) >= 2  # the old policy's and the reference's
    assert max(log_prob_peaks) < 0.5 * counter.peak  # never the peak: the training micro-batch holds more
    assert 0.95 <= est.total / measured <= 1.05, (est.table(), measured, log_prob_peaks)


def test_generation_phase_against_every_live_storage():
    """``model.generate`` on 32 prompts of 25 tokens, 32 new tokens, 4 kv heads: the prompt's no-grad forward (its
    peak inside one layer's MLP) and its KV cache are the phase's peak: 12.96 MiB over every live storage (as
    ``PeakTracker``); estimated 13.09 (1.009). With one layer's saved tensors as the prompt forward's working set it
    was 19.35 (1.49)."""
    model, tok = _model(kv_heads=4)
    ids = torch.randint(5, 15, (32, 25))
    counter = LiveStorages([*model.parameters(), *model.buffers()])
    with torch.no_grad(), counter:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                       do_sample=False, pad_token_id=tok.pad_token_id)
    est = estimate_memory(model.config, "adafactor", batch_size=4, seq_len=57, dtype="fp32", device="cpu", trainer="grpo",
                          generation_batch_size=32, max_completion_length=32)
    gen = est.details["activation_parts"]["generation"]
    assert gen == pytest.approx(counter.peak, rel=0.10), (gen, counter.peak)
    assert est.details["activation_parts"]["kv_cache"] == 2 * 2 * 32 * 4 * 64 * 57 * 4


def _autocast_generate_peak(model, tok, prompts, prompt_len, new_tokens):
    """Every live storage but the parameters' over ``model.generate`` with the forward in autocast as TRL's
    ``bf16=True`` leaves it (accelerate wraps the forward in ``torch.autocast``; ``unwrap_model`` keeps the wrapper)."""
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    ids = torch.randint(5, 15, (prompts, prompt_len))
    counter = LiveStorages([*model.parameters(), *model.buffers()])
    with torch.no_grad(), counter:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    del model.forward
    return counter.peak


@pytest.mark.parametrize("prompt_len, new_tokens", [(8, 24), (60, 4)])
def test_autocast_generation_against_every_live_storage(prompt_len, new_tokens):
    """GRPO's generation under TRL's ``bf16=True``: within each forward autocast's weight cache holds the bf16 copy of
    every linear weight, and the KV cache is float32 (rotated keys in the float32 tables' dtype; the values promoted by
    ``DynamicCache``'s ``torch.cat`` onto its empty float32 start). 32 prompts, 4 kv heads, 8 + 24 tokens (the end of
    decoding is the peak): 7.13 MiB live, 7.09 traced (0.994; the pure bf16 formula, before: 2.50); 60 + 4 tokens (the
    prompt's forward is the peak: float32 residual stream and norms, the weight cache): 26.23 live, 26.21 traced (0.999;
    before 15.70). 25 + 64: 15.90 live, 15.82 traced (0.995; before 6.95)."""
    from lowmem.cli_budget import mixed_precision_estimate

    model, tok = _model(kv_heads=4)
    measured = _autocast_generate_peak(model, tok, 32, prompt_len, new_tokens)
    seq_len = prompt_len + new_tokens
    est = mixed_precision_estimate(model.config, "bf16", optimizer="adafactor", batch_size=4, seq_len=seq_len, device="cpu",
                                   trainer="grpo", generation_batch_size=32, max_completion_length=new_tokens,
                                   gradient_checkpointing=None)
    parts = est.details["activation_parts"]
    assert parts["generation"] == pytest.approx(measured, rel=0.03), (parts, measured)
    # the phase (no gradients live: those counted at the activations' peak are taken off) against the training phase's
    early = est.details["gradients_with_activations"]
    assert est.activations == max(parts["training"], parts["generation"] - early)
    # keys and values of both layers, float32, for the seq_len - 1 tokens the last step's forward leaves cached
    assert parts["kv_cache"] == 2 * 2 * 32 * 4 * 64 * (seq_len - 1) * 4
    moment = "decode" if new_tokens > prompt_len else "prefill"
    assert parts["generation"] == parts[moment] > parts["prefill" if moment == "decode" else "decode"]


@pytest.mark.slow
def test_grpo_generation_peak_against_a_measured_run(tmp_path):
    """TRL's GRPO with its defaults (``bf16=True``, checkpointing), 4 kv heads, 32 completions of 25 + 64 tokens
    generated together (``steps_per_generation=8``): the end of decoding is the run's peak, the weights and every live
    storage 22.09 MiB; estimated 22.04 (0.998; before the autocast generation was traced: 18.12, 0.82). Without a
    ``MemoryCallback``: with it attached 2.7 MiB more storages are live at that moment (24.81 MiB: its tracker's
    module hooks, torch's ``ModTracker``, keep one float32 hidden state per generation forward alive; docs/memory.md)."""
    from datasets import Dataset

    from lowmem.cli_budget import mixed_precision_estimate
    from lowmem.trainers import LowMemGRPOConfig, LowMemGRPOTrainer

    model, tok = _model(kv_heads=4)
    rng = random.Random(0)
    prompts = Dataset.from_list([{"prompt": _digits(rng, 24)} for _ in range(16)])
    args = LowMemGRPOConfig(output_dir=str(tmp_path), lowmem_optim="adafactor", per_device_train_batch_size=4, max_steps=1,
                            report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3, num_generations=4,
                            steps_per_generation=8, max_completion_length=64, generation_kwargs={"min_new_tokens": 64})
    trainer = LowMemGRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [1.0] * len(completions), args=args,
                                train_dataset=prompts, processing_class=tok)
    counter = LiveStorages([*model.parameters(), *model.buffers()])
    with _quiet(), counter:
        warnings.simplefilter("ignore")
        trainer.train()
    measured = counter.peak + sum(p.numel() * p.element_size() for p in model.parameters())
    prompt_len = len(tok(prompts[0]["prompt"])["input_ids"])
    est = mixed_precision_estimate(model.config, "bf16", optimizer="adafactor", batch_size=4, seq_len=prompt_len + 64,
                                   device="cpu", trainer="grpo", gradient_checkpointing=None, max_completion_length=64,
                                   generation_batch_size=32)
    assert args.bf16 and est.settings["generation_batch_size"] == 32
    assert 0.95 <= est.total / measured <= 1.05, (est.table(), measured)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_against_trls_kernel_on_cpu(dtype):
    """TRL's ``ChunkedLogProbFunction`` forward and backward (528 tokens, vocabulary 4000, h=256), every live storage:
    the tile and its torch fold's float32 temporaries, the float32 gradients; the weight's own gradient excluded."""
    from trl.kernels import ChunkedLogProbFunction

    tokens, vocab, hidden = 528, 4000, 256
    torch.manual_seed(0)
    weight = torch.randn(vocab, hidden, dtype=dtype, requires_grad=True)
    hidden_states = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    counter = LiveStorages([weight, hidden_states, targets])
    with counter:
        h = hidden_states * 1.0
        ChunkedLogProbFunction.apply(h, weight, None, targets, 1.0, vocab, None, 1.0, ("log_probs",))[0].sum().backward()
    measured = counter.peak - weight.grad.numel() * weight.grad.element_size() - h.numel() * h.element_size()
    parts = fused_head_bytes(tokens, vocab, hidden, dtype.itemsize, dtype.itemsize, "cpu", dtype.itemsize, True)
    assert parts["logits"] + parts["loss_backward"] == pytest.approx(measured, rel=0.10), (parts, measured)
    cuda = fused_head_bytes(tokens, vocab, hidden, dtype.itemsize, dtype.itemsize, "cuda", dtype.itemsize, True)
    assert parts["loss_backward"] - cuda["loss_backward"] == FUSED_CPU_TILE_TEMPS * tokens * vocab * 4


def test_trl_trainers_replace_the_logits_by_the_fused_head():
    """Llama-3-8B, 1 x 4096 tokens: the plain loss's logit-sized tensors (12 B per logit, 6.3 GB) are not in a TRL run."""
    plain = estimate_memory("llama-3-8b", "adamw", batch_size=1, seq_len=4096)
    sft = estimate_memory("llama-3-8b", "adamw", batch_size=1, seq_len=4096, trainer="sft", gradient_checkpointing=False)
    p, f = plain.details["activation_parts"], sft.details["activation_parts"]
    assert p["logits"] + p["loss_backward"] == 4096 * 128256 * 12
    # the fused head: the tile (4096 x 32768 bf16), the float32 gradients of the hidden states and of the head (2.1 GB)
    assert f["logits"] + f["loss_backward"] < 0.4 * (p["logits"] + p["loss_backward"])
    assert f["loss_backward"] >= 128256 * 4096 * 4 + 4096 * 32768 * 2
    assert f["layers"] == p["layers"] and sft.weights == plain.weights
    lora = estimate_memory("llama-60m", "adamw", trainer="dpo", lora={"r": 8}, gradient_checkpointing=None)
    assert lora.settings["reference"] == "adapter" and lora.details["reference_weights"] == 0


@pytest.mark.parametrize("kw, words", [
    ({"trainer": "ppo"}, "trainer='ppo'"),
    ({"trainer": "dpo", "reference": "frozen"}, "reference='frozen'"),
    ({"trainer": "sft", "reference": "copy"}, "reference='copy' needs trainer"),
    ({"trainer": "dpo", "reference": "adapter"}, "needs lora"),
    ({"trainer": "dpo", "generation_batch_size": 8}, "generation_batch_size=8 needs trainer='grpo'"),
    ({"trainer": "grpo", "generation_batch_size": 0}, "generation_batch_size=0"),
    ({"trainer": "grpo", "max_completion_length": 64, "seq_len": 64}, "max_completion_length=64"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing='yes'"),
])
def test_bad_trainer_fields_name_the_field(kw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("[", r"\[")):
        estimate_memory("llama-60m", **{"seq_len": 64, **kw})


def test_budget_cli_trainer_fields(capsys):
    import json

    from lowmem.cli import main

    assert main(["budget", "llama-60m", "--trainer", "dpo", "--seq-len", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["trainer"] == "dpo" and out["settings"]["gradient_checkpointing"] is True
    assert out["details"]["reference_weights"] > 0
    assert main(["budget", "llama-60m", "--trainer", "grpo", "--seq-len", "64", "--no-gradient-checkpointing",
                 "--max-completion-length", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["gradient_checkpointing"] is False and out["settings"]["max_completion_length"] == 32
    assert main(["budget", "llama-60m", "--trainer", "dpo", "--budget", "1GiB"]) == 2
    assert "--trainer is estimated only" in capsys.readouterr().err


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
