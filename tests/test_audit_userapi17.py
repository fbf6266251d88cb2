"""The Python API path of a user with their own Hugging Face script (the USERAPI audit, session 17).

Each test is a defect found by following README.md / docs/training.md from Python (``LowMemTrainer``, a plain
``transformers.Trainer`` with a lowmem optimizer, ``LayerwiseOptimizer``), written as a strict xfail and red for its
stated reason; all nine are fixed (USERFIX, session 17), the markers removed, and the checks marked "USERFIX" added
for what each fix does."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

K = dict(per_device_train_batch_size=4, report_to=[], use_cpu=True, learning_rate=1e-2, lr_scheduler_type="constant",
         disable_tqdm=True)


@pytest.fixture
def lm_dataset():
    from datasets import Dataset

    ids = torch.randint(1, 70, (16, 12), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _lowmem_trainer(out, ds, callbacks=(), **kw):
    from lowmem.kit import build_tiny_model
    from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments

    model, _ = build_tiny_model(seed=0)
    args = LowMemTrainingArguments(str(out), **{**K, **kw})
    return LowMemTrainer(model=model, args=args, train_dataset=ds, callbacks=list(callbacks)), model


def test_resume_from_a_save_only_model_checkpoint_is_refused(tmp_path, lm_dataset):
    """docs/training.md: `lowmem train` refuses such a checkpoint ("cannot resume ... start a new run from its
    weights", lowmem.train.weights_only_checkpoint), and "checkpoints resume exactly" for LowMemTrainer. From
    Python the Trainer skips the missing optimizer.pt: the 8-bit moments start again from zero and the run is not
    the uninterrupted one (measured: weights 0.037 apart after 2 more steps of adamw8bit)."""
    t, _ = _lowmem_trainer(tmp_path, lm_dataset, lowmem_optim="adamw8bit", max_steps=2, save_steps=2,
                           save_only_model=True)
    t.train()
    assert not (tmp_path / "checkpoint-2" / "optimizer.pt").exists()
    t, _ = _lowmem_trainer(tmp_path, lm_dataset, lowmem_optim="adamw8bit", max_steps=4, save_steps=2,
                           save_only_model=True)
    with pytest.raises(ValueError, match="save_only_model|optimizer.pt"):
        t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def _nan_first_forward(model):
    calls = {"n": 0}

    def hook(mod, inp, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 1 else out

    model.model.layers[1].mlp.register_forward_hook(hook)


@pytest.mark.parametrize("layerwise", [True, False])
def test_layerwise_logged_grad_norm_of_a_nan_step(tmp_path, lm_dataset, layerwise):
    """docs/training.md (lowmem_layerwise): "the logged grad_norm is still the step's real global norm ... tested
    equal to the ordinary run's". With a NaN loss on step 1, the ordinary run logs grad_norm nan; the layerwise
    run logs 0.0 (trainers/hf.py layerwise_grad_norm returns None when the first hook met the NaN, and the
    Trainer's own norm over the freed gradients is 0): a user watching grad_norm sees a healthy-looking zero."""
    t, model = _lowmem_trainer(tmp_path, lm_dataset, lowmem_optim="adamw", lowmem_layerwise=layerwise, max_steps=1,
                               logging_steps=1, max_grad_norm=1.0, save_strategy="no")
    _nan_first_forward(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.train()
    norms = [h["grad_norm"] for h in t.state.log_history if "grad_norm" in h]
    assert len(norms) == 1 and math.isnan(norms[0]), norms


def test_layerwise_global_prev_keeps_its_coefficient_over_a_nan_step():
    """USERFIX (USERAPI 2): the step's norm is nan once a gradient is non-finite (what is logged); global_prev's next
    coefficient must not be computed from it (nan would make every later update nan) nor from the partial norm of the
    parameters stepped before the NaN arrived: the previous coefficient is kept."""
    from lowmem.optim.layerwise import LayerwiseOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = LayerwiseOptimizer(model, "adamw", lr=1e-2, max_grad_norm=0.5, clip_mode="global_prev")
    x = torch.randn(8, 4)
    model(x).pow(2).sum().backward()
    opt.step()
    coef = opt._clip_coef.clone()
    assert 0 < coef.item() < 1  # the first step's norm is above 0.5: clipping is active
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (model(x).pow(2).sum() * float("nan")).backward()
    assert math.isnan(opt._sq_norm_sum.sqrt().item())  # the step's norm: nan, as logged
    opt.step()
    assert torch.equal(opt._clip_coef, coef)
    model(x).pow(2).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_layerwise_optimizer_with_a_mismatched_accumulation_is_refused(tmp_path, lm_dataset):
    """docs/subspace.md "Layerwise updates": `LayerwiseOptimizer(model, name, accumulation_steps=N)` with `step()`
    closing each window. Handed to a plain `Trainer(optimizers=(opt, None))` whose gradient_accumulation_steps is
    2 (a user's existing script), every micro-batch's backward steps the weights: 2x the optimizer steps at 2x
    the scale, the Trainer's max_grad_norm clipping a no-op (it reads the freed gradients: grad_norm logged 0.0),
    and no warning (measured: weights 0.060 from LowMemTrainer(lowmem_layerwise=True)'s after 2 steps). The
    optimizer sees step() after 2 micro-batches with accumulation_steps=1: it can say so."""
    from transformers import Trainer, TrainingArguments

    from lowmem.kit import build_tiny_model
    from lowmem.optim.layerwise import LayerwiseOptimizer

    model, _ = build_tiny_model(seed=0)
    opt = LayerwiseOptimizer(model, "adamw", lr=1e-2)
    args = TrainingArguments(str(tmp_path), max_steps=1, gradient_accumulation_steps=2, save_strategy="no", **K)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset, optimizers=(opt, None))
    said = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.train()
        except (ValueError, RuntimeError) as err:
            said = "accumulation" in str(err)
    said = said or any("accumulation" in str(w.message) for w in caught)
    assert said, "a LayerwiseOptimizer(accumulation_steps=1) stepped every 2 micro-batches said nothing"


def test_resume_true_skips_or_names_a_truncated_checkpoint(tmp_path, lm_dataset, caplog):
    """`lowmem train --resume` skips an incomplete checkpoint with a warning naming the file
    (lowmem.train.checkpoint_problems, docs/training.md `resume_from_checkpoint`); the Python API's
    `trainer.train(resume_from_checkpoint=True)` (transformers' get_last_checkpoint) takes checkpoint-4 with a
    half-written optimizer.pt and raises `RuntimeError: PytorchStreamReader failed reading zip archive: failed
    finding central directory` without saying which file or checkpoint, or that checkpoint-2 is complete."""
    t, _ = _lowmem_trainer(tmp_path, lm_dataset, lowmem_optim="adamw", max_steps=4, save_steps=2)
    t.train()
    opt_file = tmp_path / "checkpoint-4" / "optimizer.pt"
    data = opt_file.read_bytes()
    opt_file.write_bytes(data[: len(data) // 2])  # a run killed while the Trainer wrote it
    t, _ = _lowmem_trainer(tmp_path, lm_dataset, lowmem_optim="adamw", max_steps=6, save_steps=2)
    try:
        t.train(resume_from_checkpoint=True)
    except Exception as err:  # noqa: BLE001
        assert "checkpoint-4" in str(err) and "optimizer.pt" in str(err), str(err)
    else:  # skipped with a warning naming it, resumed from the complete checkpoint-2 (as `lowmem train --resume`)
        said = [r.getMessage() for r in caplog.records if "checkpoint-4" in r.getMessage()]
        assert said and "optimizer.pt" in said[0] and t.state.global_step == 6, (said, t.state.global_step)
    # a path to it: an error naming the file (USERFIX: lowmem.trainers.hf.resume_checkpoint)
    data = opt_file.read_bytes()  # (the resumed run above wrote checkpoint-4 again)
    opt_file.write_bytes(data[: len(data) // 2])
    t, _ = _lowmem_trainer(tmp_path, lm_dataset, lowmem_optim="adamw", max_steps=6, save_steps=2)
    with pytest.raises(ValueError, match="checkpoint-4.*optimizer.pt"):
        t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


class _NaNOnFirstStep:
    """A TrainerCallback putting a NaN into one gradient entry before the first optimizer step (a bad batch)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class NaNGrad(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                if state.global_step == 0:
                    next(iter(model.parameters())).grad[0, 0] = float("nan")

        return NaNGrad()


@pytest.mark.parametrize("name", ["adamw_8bit", "bnb_lion8bit"])  # (paged_adamw_8bit: refused on CPU parameters since SILENT 27)
def test_hf_8bit_name_nan_gradient_does_not_corrupt_the_run(tmp_path, lm_dataset, name):
    """docs/training.md lists `paged_adamw_8bit` as a `lowmem_optim` value; lowmem.train maps it (and `adamw_8bit`)
    to bitsandbytes' own class, without the engine's non-finite skip (docs/optimizers.md "bitsandbytes' entries":
    "None of the guarantees above applies to them"). In the Trainer flow one NaN in one gradient entry makes
    model.embed_tokens.weight and its 32-bit moments NaN after one step, with no warning; the engine's `adamw8bit`
    (what README's "a step whose gradients hold NaN or Inf is skipped instead of corrupting the state" promises)
    skips the step with a UserWarning. Fixed: the step is skipped (or refused) as for the engine's names, or at
    least a warning names the non-finite gradient."""
    t, model = _lowmem_trainer(tmp_path, lm_dataset, lowmem_optim=name, max_steps=1, save_strategy="no",
                               callbacks=[_NaNOnFirstStep()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.train()
    warned = any("non-finite" in str(w.message) or "NaN" in str(w.message) for w in caught)
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    assert finite or warned, "the NaN gradient went into the weights without a word"
    # USERFIX: the step is skipped as the engine's are (lowmem.optim.recipes.bnb.skip_nonfinite_steps): weights and
    # state finite, the skip counted and named in a warning
    opt = t.optimizer.optimizer
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert finite and warned and opt.skipped_steps == 1 and all(torch.isfinite(v).all() for v in states)


@pytest.fixture(scope="module")
def peft_tiny(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from lowmem.kit import build_tiny_model

    model, _ = build_tiny_model(seed=0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    return get_peft_model(model, lora), lora, tmp_path_factory.mktemp("userapi-adapter")


def test_estimate_memory_of_a_peft_model_counts_its_adapters(peft_tiny):
    """docs/memory.md: `model` may be "a model (its .config)". A user with a peft model in their script calls
    `estimate_memory(model, "adamw", ...)`: the PeftModel's `.config` is the base model's, so the estimate is
    full fine-tuning's (optimizer_states 667,220 B for the 14,368 B that lora= gives; gradients of every
    weight), without a word. Fixed: the adapters (`model.peft_config`) are sized as `lora=` sizes them, or the call
    is a ValueError saying to pass the base model with `lora=`."""
    import lowmem

    model, lora, _ = peft_tiny
    kw = dict(batch_size=2, seq_len=16, dtype="fp32", device="cpu")
    try:
        got = lowmem.estimate_memory(model, "adamw", **kw)
    except ValueError as err:
        assert "lora" in str(err)
        return
    want = lowmem.estimate_memory(model.get_base_model().config, "adamw", lora=lora, **kw)
    assert got.optimizer_states == want.optimizer_states and got.gradients == want.gradients
    with pytest.raises(ValueError, match="lora= is given too"):  # USERFIX: both: which one? refused
        lowmem.estimate_memory(model, "adamw", lora=lora, **kw)


def test_estimate_memory_of_an_adapter_directory_says_what_it_is(peft_tiny):
    """A user's `model.save_pretrained(dir)` of a PeftModel writes adapter_config.json (no config.json);
    `estimate_memory(dir)` ("a local model directory") raises `ValueError: Unrecognized model in DIR. Should have a
    model_type key in its config.json`. Fixed: the adapter is sized (its base_model_name_or_path and its LoRA
    settings), or the error names the adapter directory and says to pass the base model with `lora=`."""
    import lowmem

    model, _, out = peft_tiny
    model.save_pretrained(out)
    try:
        lowmem.estimate_memory(str(out), "adamw", batch_size=2, seq_len=16, dtype="fp32", device="cpu")
    except ValueError as err:
        assert "adapter" in str(err) and "lora" in str(err), str(err)


def test_estimate_memory_reads_a_prequantized_directorys_quantization_config(tmp_path):
    """docs/memory.md: a local model directory, "only config.json is read". A pre-quantized checkpoint (a 4-bit
    model saved with save_pretrained, or a "-bnb-4bit" download) keeps `quantization_config` there, and
    `from_pretrained(dir)` loads it 4-bit; the estimate ignores it and sizes bf16
    weights (llama-60m with lora: weights 116,671,744 B, nf4's 144,279,808 B: prepare_model_for_kbit_training's float32
    embeddings), with no note. Fixed: the directory's quantization_config applies as `quantization=` would, or a
    note / error names it."""
    import json

    import lowmem
    from lowmem.memory.shapes import shape_config

    cfg = shape_config("llama-60m").to_dict()
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                                  "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16",
                                  "bnb_4bit_use_double_quant": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    kw = dict(lora={"r": 8, "target_modules": ["q_proj", "v_proj"]}, batch_size=1, seq_len=64)
    try:
        got = lowmem.estimate_memory(str(tmp_path), "adamw", **kw)
    except ValueError as err:
        assert "quantization" in str(err)
        return
    want = lowmem.estimate_memory(str(tmp_path), "adamw", quantization="nf4", **kw)
    assert got.weights == want.weights or any("quantization_config" in n for n in got.notes), (got.weights, want.weights)
    # USERFIX: the config's quantization applies (lowmem.memory.estimate.config_quantization), named in a note; the
    # same as quantization= with the config's own fields; another type, or another quant_method, is refused
    assert got.weights == want.weights and any("quantization_config" in n for n in got.notes), got.notes
    same = lowmem.estimate_memory(str(tmp_path), "adamw", quantization={"quant_type": "nf4", "double_quant": False,
                                                                         "compute_dtype": "bf16"}, **kw)
    assert same.total == got.total
    with pytest.raises(ValueError, match="quantization_config"):
        lowmem.estimate_memory(str(tmp_path), "adamw", quantization="int8", **kw)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        lowmem.estimate_memory(str(tmp_path), "adamw", **kw)


def test_optimizer_cls_and_kwargs_with_peft_config_trains_the_adapters(tiny_model_path, tmp_path):
    """README "Hugging Face Trainer. Pass optimizer_cls_and_kwargs=lowmem.trainers.optimizer_cls_and_kwargs(model,
    ...)": a TRL user adds it to their `SFTTrainer(model=model, peft_config=LoraConfig(...))`. The groups are built
    from `model` before TRL wraps it, so the optimizer gets the base weights, which peft then freezes, and none of
    the adapters: 2 steps leave every adapter weight as it was (0 of 4 trainable tensors in the optimizer), the loss
    never moves, and nothing says so. Fixed: the adapters train (the groups resolved when the Trainer builds the
    optimizer), or building an optimizer none of whose parameters requires grad is a ValueError / warning saying to
    use LowMemSFTTrainer (built after the adapters) or to build the pair from the peft model."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from lowmem.kit import sft_dataset
    from lowmem.trainers import optimizer_cls_and_kwargs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    args = SFTConfig(str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False,
                     learning_rate=1e-2, save_strategy="no", disable_tqdm=True)
    lora = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer = SFTTrainer(model=model, args=args, train_dataset=sft_dataset(8), peft_config=lora,
                                 optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, "adamw", args=args))
            before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
            trainer.train()
        except ValueError as err:
            assert "trainable" in str(err) or "requires_grad" in str(err), str(err)
            return
    if any("trainable" in str(w.message) or "requires_grad" in str(w.message) for w in caught):
        return
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before), "no adapter weight moved"


def test_bnb_nonfinite_skip_steps_as_bitsandbytes_and_runs_hooks_once():
    """USERFIX (USERAPI 5): the checked step (lowmem.optim.recipes.bnb.skip_nonfinite_steps) steps bit for bit as
    bitsandbytes' own class on finite gradients, and torch's step hooks run once per step."""
    import bitsandbytes as bnb

    from lowmem.optim.recipes.bnb import skip_nonfinite_steps

    torch.manual_seed(0)
    a, b = torch.nn.Linear(64, 80), torch.nn.Linear(64, 80)
    b.load_state_dict(a.state_dict())
    raw = bnb.optim.AdamW8bit(b.parameters(), lr=1e-2, min_8bit_size=16)
    ours = skip_nonfinite_steps(bnb.optim.AdamW8bit(a.parameters(), lr=1e-2, min_8bit_size=16), "bnb_adamw8bit")
    calls = []
    ours.register_step_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(4, 64)
    for _ in range(3):
        for m, o in ((a, ours), (b, raw)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    assert len(calls) == 3 and ours.skipped_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_estimate_memory_of_a_model_instance_notes_its_dtype_and_frozen_parameters():
    """USERFIX (the note beside USERAPI 6): a model instance is sized from its .config only; a float32 model with
    frozen embeddings, estimated with the default dtype (bf16), says both in its notes."""
    import lowmem
    from lowmem.kit import build_tiny_model

    model, _ = build_tiny_model(seed=0)
    model.float().get_input_embeddings().weight.requires_grad_(False)
    est = lowmem.estimate_memory(model, "adamw", batch_size=1, seq_len=8, device="cpu")
    text = " ".join(est.notes)
    assert "holds float32" in text and "1 of its" in text and "frozen" in text, est.notes
    same = lowmem.estimate_memory(build_tiny_model(seed=0)[0].float(), "adamw", batch_size=1, seq_len=8, dtype="fp32",
                                  device="cpu")
    assert not any("model.config" in n for n in same.notes), same.notes
