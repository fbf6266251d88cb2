"""What each process runs under ``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` in
tests/test_trainer_fsdp.py: ``LowMemTrainer`` on the tiny Llama with FSDP2 over gloo (CPU processes,
made FSDP by :func:`accelerate_fsdp_cpu.fsdp_on_cpu_processes`), for each run tag given:

1. 4 steps (checkpoints at steps 2 and 4 through the Trainer: ``torch.distributed.checkpoint``);
   losses, the gathered final weights, how the parameters and the optimizer state are laid out;
2. a model with other weights resumed from ``checkpoint-2`` (``resume_from_checkpoint``) to step 4;
3. ``lowmem_layerwise=True``: the error it raises;
4. ``reshard:SOURCE:TAG``: ``SOURCE/TAG/checkpoint-2``, written by another number of processes,
   resumed here to step 4.

Run tags starting ``moe_`` train a tiny Mixtral (:func:`build_moe`: fused experts ``gate_up_proj [4, 64, 64]``,
``down_proj [4, 64, 32]`` per layer, built from a config) instead of the tiny Llama, ``qwen_moe_`` a tiny Qwen2-MoE.

Rank 0 writes ``OUT/<tag>.json`` and ``OUT/<tag>_final.pt`` / ``<tag>_resumed.pt``.

    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 tests/trainer_fsdp_script.py OUT adamw ...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

# run tag -> (lowmem_optim, lowmem_optim_args, weight dtype). float64 weights (the optimizers' state stays
# float32) make the comparison with one process tight, as in tests/test_fsdp.py; the float32 pair
# (torch.optim.AdamW, the Trainer's own, against lowmem's adamw) measures what float32 reaches.
# Quantized moments: min_quant_size 128 quantizes every matrix (norms, 64 elements, stay float32), blocks of
# 64 elements (every half-shard holds whole blocks).
QUANT = {"block_size": 64, "min_quant_size": 128}
RUNS: dict[str, tuple[str | None, dict, torch.dtype]] = {
    "torch_adamw": (None, {}, torch.float32),
    "adamw_fp32": ("adamw", {}, torch.float32),
    "adamw": ("adamw", {}, torch.float64),
    "adamw8bit": ("adamw8bit", QUANT, torch.float64),
    # the default min_quant_size (4096): q / o projections (4096 elements), embedding and head (5120) are
    # quantized in one process and on their half-shards (2048, 2560 elements): the size of the whole tensor
    "adamw8bit_default": ("adamw8bit", {"block_size": 64}, torch.float64),
    "adafactor": ("adafactor", {}, torch.float64),
    "galore_adamw": ("galore_adamw", {"rank": 4, "update_proj_gap": 2}, torch.float64),
    "galore_left": ("galore_adamw", {"rank": 4, "update_proj_gap": 2, "proj_type": "left"}, torch.float64),
    "fira_adamw": ("fira_adamw", {"rank": 4, "update_proj_gap": 2}, torch.float64),
    "apollo_adamw": ("apollo_adamw", {"rank": 4, "update_proj_gap": 2}, torch.float64),
    "adamw4bit": ("adamw4bit", QUANT, torch.float64),
    "stable_spam": ("stable_spam", {}, torch.float64),
    "muon": ("muon", {}, torch.float64),
    # a plain transformers.Trainer given optimizer_cls_and_kwargs (lowmem's groups over the unsharded model)
    "plain_galore": ("galore_adamw", {"rank": 4, "update_proj_gap": 2}, torch.float64),
    # BAdam (freeze_inactive=False: several processes): a switch every step, so checkpoint-2 is saved right at a
    # switch; badam_mid: a switch every 2 steps, saved at step 3, one step into the second block
    "badam": ("badam", {"freeze_inactive": False, "switch_every": 1, "switch_mode": "ascending"}, torch.float64),
    "badam_mid": ("badam", {"freeze_inactive": False, "switch_every": 2, "switch_mode": "ascending"}, torch.float64),
    "adam_mini": ("adam_mini", {}, torch.float64),
    "spam": ("spam", {}, torch.float64),
    # blocks of 32: every shard (the norms' 32 of 64 elements too) holds whole top-k and quantization blocks
    "microadam": ("microadam", {"topk_block_size": 32, "quant_block_size": 32}, torch.float64),
    "lomo": ("lomo", {}, torch.float64),
    "adalomo": ("adalomo", {}, torch.float64),
    # gradient accumulation (2 micro-batches per step) with clipping that acts (grad norms 3-7 > 0.05)
    "adamw_accum_clip": ("adamw", {}, torch.float64),
    "galore_accum_clip": ("galore_adamw", {"rank": 4, "update_proj_gap": 2}, torch.float64),
    "muon_accum_clip": ("muon", {}, torch.float64),
    "adafactor_accum_clip": ("adafactor", {}, torch.float64),
    # the tiny Mixtral (build_moe): GaLore projects each expert's matrices (its state stacked per expert, FSDP2's
    # Shard(0) giving each rank whole experts); 8-bit moments / MicroAdam on the experts' local shards (whole blocks).
    # Rank 2: at the refresh of step 3 one expert (layer 1, expert 2) has a gradient of rank 2 (few tokens routed
    # to it: singular values 1, 0.16, 2e-7, ...), so a rank-4 SVD basis takes 2 directions from rounding noise, which
    # the reduce-scatter's summation order (1e-11 in the gradient) turns elsewhere (measured: a basis row 0.86 away,
    # the expert's weights 1.9e-3 from one process after step 4); at rank 2 every refresh's subspace is set by the
    # data (test_trainer_fsdp checks sigma_2 >= 1e-3 sigma_1 in the one-process run)
    "moe_galore_adamw": ("galore_adamw", {"rank": 2, "update_proj_gap": 2}, torch.float64),
    "moe_apollo_adamw": ("apollo_adamw", {"rank": 4, "update_proj_gap": 2}, torch.float64),
    "moe_adamw8bit": ("adamw8bit", QUANT, torch.float64),
    "moe_microadam": ("microadam", {"topk_block_size": 32, "quant_block_size": 32}, torch.float64),
    # float32: the experts kernel transformers chooses by default (grouped_mm), as a user runs it; the Trainer's own
    # torch.optim.AdamW under the same FSDP2 run measures what float32 reaches
    "moe_torch_adamw_fp32": (None, {}, torch.float32),
    "moe_galore_fp32": ("galore_adamw", {"rank": 2, "update_proj_gap": 2}, torch.float32),
    "moe_adamw8bit_fp32": ("adamw8bit", QUANT, torch.float32),
    # a tiny Qwen2-MoE (build_moe(kind="qwen2_moe")): fused experts beside a shared expert and its 1-row gate, whose
    # shard on rank 1 is empty
    "qwen_moe_galore_adamw": ("galore_adamw", {"rank": 2, "update_proj_gap": 2}, torch.float64),
    "qwen_moe_adamw8bit": ("adamw8bit", QUANT, torch.float64),
}
PLAIN = {"plain_galore"}
# TrainingArguments of a run tag beyond training_args' own (the one-process reference takes them too)
ACCUM_CLIP = {"gradient_accumulation_steps": 2, "max_grad_norm": 0.05}
TAG_ARGS: dict[str, dict] = {"badam_mid": {"save_steps": 3}, **{t: ACCUM_CLIP for t in RUNS if t.endswith("_accum_clip")}}
STEPS = 4
SAVE_STEPS = 2
GLOBAL_BATCH = 8


def training_args(out, tag: str, per_device_batch: int, **extra):
    """The run's ``LowMemTrainingArguments`` (the same for the FSDP2 run and the one-process reference)."""
    from lowmem.trainers import LowMemTrainingArguments

    name, hp, _ = RUNS[tag]
    if tag in PLAIN:
        name, hp = None, {}
    fields = dict(
        lowmem_optim=name, lowmem_optim_args=dict(hp) if name else None,
        **({"optim": "adamw_torch", "weight_decay": 0.0} if name is None else {"weight_decay": 0.01}),
        learning_rate=1e-2, max_steps=STEPS, per_device_train_batch_size=per_device_batch, logging_steps=1,
        save_strategy="steps", save_steps=SAVE_STEPS, use_cpu=True, report_to="none", disable_tqdm=True,
        dataloader_pin_memory=False, seed=0)
    return LowMemTrainingArguments(str(out), **{**fields, **TAG_ARGS.get(tag, {}), **extra})


def save_steps(tag: str) -> int:
    """The step of a run's first checkpoint (the one resumed)."""
    return TAG_ARGS.get(tag, {}).get("save_steps", SAVE_STEPS)


def batch_per_step(tag: str, processes: int) -> int:
    """Sequences per process and micro-batch: the global batch over the processes and the accumulated micro-batches."""
    return GLOBAL_BATCH // processes // TAG_ARGS.get(tag, {}).get("gradient_accumulation_steps", 1)


def build_moe(seed: int, dtype: torch.dtype, kind: str = "mixtral"):
    """A tiny transformers Mixtral with fused experts (2 layers of 4 experts, top-2 routing, hidden 64 as the tiny
    Llama's) from a config, offline, and the kit's tokenizer; vocabulary 80 (73 tokens padded: even shards).
    float64: the eager experts loop (``grouped_mm``, the default where it dispatches, takes no float64); float32:
    transformers' default (``grouped_mm``); identical weights
    for identical ``seed``, the global RNG untouched. ``kind="qwen2_moe"``: a Qwen2-MoE of the same sizes (experts
    ``[4, 64, 64]`` / ``[4, 64, 32]``, a shared expert of 64, its gate ``[1, 64]``, attention biases)."""
    import transformers

    from lowmem.kit.tokenizer import build_tokenizer

    tok = build_tokenizer()
    common = dict(vocab_size=80, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "mixtral":
        cfg, cls = transformers.MixtralConfig(intermediate_size=32, num_local_experts=4, **common), transformers.MixtralForCausalLM
    else:
        cfg = transformers.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                          num_experts=4, **common)
        cls = transformers.Qwen2MoeForCausalLM
    if dtype == torch.float64:
        cfg._experts_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    return model.to(dtype), tok


def make_trainer(out, tag: str, per_device_batch: int, seed: int = 0, **extra):
    from transformers import default_data_collator

    from lowmem.kit import build_tiny_model, sft_dataset, tokenize_sft
    from lowmem.trainers import LowMemTrainer

    if tag.startswith(("moe_", "qwen_moe_")):
        model, tok = build_moe(seed, RUNS[tag][2], "qwen2_moe" if tag.startswith("qwen_") else "mixtral")
    else:
        model, tok = build_tiny_model(seed, dtype=RUNS[tag][2])
        with torch.random.fork_rng(devices=[]):  # 73 -> 80 rows: even shards (per-shard codes checkpoint only those)
            torch.manual_seed(seed)
            model.resize_token_embeddings(len(tok), pad_to_multiple_of=8, mean_resizing=False)
    data = tokenize_sft(sft_dataset(64, seed=0), tok)
    if tag in PLAIN:
        from transformers import Trainer

        from lowmem.trainers import optimizer_cls_and_kwargs

        args = training_args(out, tag, per_device_batch, **extra)
        name, hp, _ = RUNS[tag]
        return Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                       optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, name, args=args, **hp))
    return LowMemTrainer(model=model, args=training_args(out, tag, per_device_batch, **extra), train_dataset=data,
                         data_collator=default_data_collator)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def full_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter gathered whole (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def layout(trainer, tag: str) -> dict:
    """How the parameters and the optimizer's state are laid out on this rank."""
    from torch.distributed.tensor import DTensor, Shard

    model, opt = trainer.model, trainer.optimizer.optimizer
    params = list(model.parameters())
    state = []  # per parameter with state: (global numel, local numel, largest state tensor's local numel, types, rows)
    for p in params:
        st = opt.state.get(p, {})
        tensors = [v for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
        if tensors:
            local = p.to_local() if isinstance(p, DTensor) else p
            state.append((p.numel(), local.numel(),
                          max((v.to_local() if isinstance(v, DTensor) else v).numel() for v in tensors),
                          sorted({type(v).__name__ for v in tensors}), p.shape[0] if p.dim() else 1))
    experts = []  # per fused experts weight [E, A, B]: (E, this rank's E, {state entry: its leading size})
    for p in params:
        if p.dim() == 3 and opt.state.get(p):
            local = p.to_local() if isinstance(p, DTensor) else p
            experts.append((p.shape[0], local.shape[0], {k: (v.to_local() if isinstance(v, DTensor) else v).shape[0]
                                                         for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim() > 0}))
    return {
        "experts": experts,
        "fsdp": trainer.is_fsdp_enabled, "distributed_type": str(trainer.accelerator.distributed_type),
        "dtensor": all(isinstance(p, DTensor) for p in params),
        "shard0": all(isinstance(p, DTensor) and tuple(p.placements) == (Shard(0),) for p in params),
        # (BAdam's blocks are the decoder layers: embeddings, final norm and head stay out by default)
        "optimizer_holds_model_params": {id(p) for g in opt.param_groups for p in g["params"]} == {
            id(p) for n, p in model.named_parameters() if RUNS[tag][0] != "badam" or ".layers." in n},
        "optimizer": type(opt).__name__,
        "state_bytes": opt.state_bytes() if hasattr(opt, "state_bytes") else None,
        "state": state,
    }


def per_device(tag: str = "adamw") -> int:
    return batch_per_step(tag, int(os.environ["WORLD_SIZE"]))


def run(out: Path, tag: str, rank: int) -> None:
    result: dict = {}
    trainer = make_trainer(out / tag, tag, per_device(tag))
    trainer.train()
    result["losses"] = losses(trainer)
    result["layout"] = layout(trainer, tag)
    weights = full_weights(trainer.model)
    if rank == 0:
        torch.save(weights, out / f"{tag}_final.pt")

    resumed = make_trainer(out / f"{tag}_resumed", tag, per_device(tag), seed=1)  # other weights: the checkpoint sets them
    resumed.train(resume_from_checkpoint=str(out / tag / f"checkpoint-{save_steps(tag)}"))
    result["resumed_losses"] = losses(resumed)
    weights = full_weights(resumed.model)
    if rank == 0:
        torch.save(weights, out / f"{tag}_resumed.pt")
        (out / f"{tag}.json").write_text(json.dumps(result))


def layerwise(out: Path, rank: int) -> None:
    trainer = make_trainer(out / "layerwise", "adamw", per_device(), lowmem_layerwise=True, save_strategy="no")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = {"error": None}
    try:
        trainer.train()
    except Exception as err:  # noqa: BLE001 - recorded for the test
        result["error"] = f"{type(err).__name__}: {err}"
    else:  # (what happened when nothing refused)
        after = full_weights(trainer.model)
        result["losses"] = losses(trainer)
        result["max_change"] = max((after[n] - before[n]).abs().max().item() for n in before)
        if rank == 0:
            torch.save(after, out / "layerwise_final.pt")
    if rank == 0:
        (out / "layerwise.json").write_text(json.dumps(result))


def reshard(out: Path, source: Path, tag: str, rank: int) -> None:
    """Resume ``source/<tag>/checkpoint-2`` (written by another number of processes) on this many."""
    trainer = make_trainer(out / f"{tag}_resharded", tag, per_device(tag), seed=1)
    result = {"error": None}
    try:
        trainer.train(resume_from_checkpoint=str(source / tag / f"checkpoint-{SAVE_STEPS}"))
    except Exception as err:  # noqa: BLE001 - recorded for the test
        result["error"] = f"{type(err).__name__}: {err}"
    else:
        result["losses"] = losses(trainer)
        weights = full_weights(trainer.model)
        if rank == 0:
            torch.save(weights, out / f"{tag}_resharded.pt")
    if rank == 0:
        (out / f"{tag}_resharded.json").write_text(json.dumps(result))


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from accelerate_fsdp_cpu import exit_without_finalizing, fsdp_on_cpu_processes

    fsdp_on_cpu_processes()
    torch.set_num_threads(1)
    out, tags = Path(argv[0]), argv[1:]
    rank = int(os.environ["RANK"])
    for tag in tags:
        if tag == "layerwise":
            layerwise(out, rank)
        elif tag.startswith("reshard:"):  # reshard:SOURCE_DIR:TAG
            _, source, name = tag.split(":")
            reshard(out, Path(source), name, rank)
        else:
            run(out, tag, rank)
    exit_without_finalizing(0)  # (not Python's finalization: a gloo worker thread could abort it, see there)


if __name__ == "__main__":
    main(sys.argv[1:])
