"""EST17 (issue 12, residual a): DPO's reference forward inside the traced step (``activations.traced_activation_bytes(
..., reference=...)``). TRL 1.16's ``DPOTrainer._compute_loss`` runs the reference's no-grad forward with its fused head
after the policy's forward and before its backward, under the step's autocast: the autocast cache then also holds the
reference's ``dtype`` weight copies (lowmem's trainers freeze it; TRL did not), on top of the policy's checkpoints or saved
tensors. The trace against a real CPU step (every storage the ops return, parameters of both models excluded) is
exact: tiny Llama h=256, 2 layers, 4 sequences x 33 tokens."""

import contextlib
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _real_dpo_step(ckpt: bool, reference: str, seqs: int = 4, seq_len: int = 33) -> tuple:
    """The most bytes live at once (activations and gradients; parameters and buffers excluded) in a real CPU step as
    TRL's DPO runs it under ``bf16=True``: the policy's forward, the reference's no-grad forward, the loss, the
    backward outside autocast."""
    from test_memory_trl_estimate import LiveStorages, _model

    from lowmem.memory.activations import trl_fused_head

    model, _ = _model()
    model.float().train()
    ref = copy.deepcopy(model).requires_grad_(False) if reference == "copy" else None  # frozen, as lowmem's trainers
    if reference == "adapter":
        import warnings

        from peft import get_peft_model

        from lowmem.memory.estimate import lora_config

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, lora_config(LORA))
    if ckpt:
        from lowmem.quant import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (seqs, seq_len))
    kept = [*model.parameters(), *model.buffers(), *(ref.parameters() if ref is not None else ()),
            *(ref.buffers() if ref is not None else ())]
    with trl_fused_head(model, "cpu"), trl_fused_head(ref if ref is not None else model, "cpu"):
        mode = LiveStorages(kept)
        with mode:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
                with torch.no_grad(), (model.disable_adapter() if ref is None else contextlib.nullcontext()):
                    lp = (ref or model)(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
                loss = loss + 0 * lp.sum()
                del lp
            loss.backward()
            del loss
    return model.config, mode.peak


def _traced(config, ckpt: bool, reference, lora=None, seqs: int = 4, seq_len: int = 33) -> dict:
    from lowmem.memory.activations import traced_activation_bytes
    from lowmem.memory.estimate import build_meta_model, lora_config

    model = build_meta_model(config, torch.float32)
    if lora is not None:
        import warnings

        from peft import get_peft_model

        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = get_peft_model(model, lora_config(lora))
    return traced_activation_bytes(model, config, seqs, seq_len, ckpt, fused_head=True, autocast=torch.bfloat16,
                                   reference=reference)


@pytest.mark.parametrize("ckpt", [True, False])
def test_traced_dpo_step_with_a_reference_copy_is_a_real_ones(ckpt):
    """A separate reference (``ref_model``): the traced step's most activation and gradient bytes equal the real
    step's to the byte, and, not checkpointed, are above the step without the reference forward (its working set
    beside the policy's activations)."""
    config, peak = _real_dpo_step(ckpt, "copy")
    traced = _traced(config, ckpt, "copy")
    assert traced["backward_peak"] == peak
    without = _traced(config, ckpt, None)["backward_peak"]  # frozen copy, checkpointed: the recomputing backward
    assert without < peak if not ckpt else without == peak  # is the peak, the reference forward below it


def test_traced_dpo_step_with_the_adapter_reference_is_a_real_ones():
    """LoRA, the reference = the policy with its adapters disabled (TRL's default with peft), not checkpointed."""
    config, peak = _real_dpo_step(False, "adapter")
    assert _traced(config, False, "adapter", LORA)["backward_peak"] == peak


@pytest.mark.parametrize("kw, words", [
    (dict(reference="ref"), "reference='ref'"),
    (dict(reference="copy", fused_head=False), "fused_head must be True"),
    (dict(reference="copy", head_parts={"logits": 0, "loss_backward": 0}), "head_parts must be None"),
])
def test_bad_reference_names_the_field(kw, words):
    from test_memory_trl_estimate import _model

    from lowmem.memory.activations import traced_activation_bytes
    from lowmem.memory.estimate import build_meta_model

    model, _ = _model()
    meta = build_meta_model(model.config, torch.float32)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("[", r"\[")):
        traced_activation_bytes(meta, model.config, 1, 8, **{"fused_head": True, **kw})


@pytest.mark.slow  # 1.6-2.5 s: a 9-layer real step and its trace
def test_reference_copy_in_a_truncated_trace_is_the_real_step():
    """A stack of 9 uniform layers is traced through its first 6 and stitched (``activations._stitch_layers``); the
    reference copy runs whole inside the head's segment, which is played once: its autocast weight copies grow with
    every layer (a copy cut like the policy's trace would hold 6 layers' copies). The stitched step equals a real CPU
    autocast step of the 9-layer model and its copy to the byte."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_memory_trl_estimate import LiveStorages

    from lowmem.memory.activations import trl_fused_head

    cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=9, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().train()
    ref = copy.deepcopy(model).requires_grad_(False)  # frozen, as lowmem's trainers freeze it
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with trl_fused_head(model, "cpu"), trl_fused_head(ref, "cpu"):
        mode = LiveStorages([*model.parameters(), *model.buffers(), *ref.parameters(), *ref.buffers()])
        with mode:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
                with torch.no_grad():
                    lp = ref(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
                loss = loss + 0 * lp.sum()
                del lp
            loss.backward()
            del loss
    assert _traced(cfg, False, "copy", seqs=2, seq_len=16)["backward_peak"] == mode.peak


@pytest.mark.slow  # 2-3.5 s: a real step and the estimate
def test_traced_architecture_dpo_estimate_is_the_real_step():
    """``estimate_memory(trainer="dpo")`` of a traced architecture (Mistral with a sliding window, not the Llama
    formula), float32, not checkpointed: the step's trace holds the reference copy's forward, so the activations (no
    gradient at their peak) equal a real CPU step's most live bytes (9,411,172 B, 8 x 40 tokens); before, the Llama
    formula's no-grad layer was added on top of the trace (9,511,648 B)."""
    from transformers import MistralConfig, MistralForCausalLM

    from test_memory_trl_estimate import LiveStorages

    from lowmem.memory import estimate_memory
    from lowmem.memory.activations import trl_fused_head

    cfg = MistralConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=73, sliding_window=16)
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).float().train()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, cfg.vocab_size, (8, 40))
    with trl_fused_head(model, "cpu"), trl_fused_head(ref, "cpu"):
        mode = LiveStorages([*model.parameters(), *model.buffers(), *ref.parameters(), *ref.buffers()])
        with mode:
            loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
            with torch.no_grad():
                lp = ref(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
            loss = loss + 0 * lp.sum()
            del lp
            loss.backward()
            del loss
    est = estimate_memory(cfg, "adamw", batch_size=4, seq_len=40, dtype="fp32", device="cpu", trainer="dpo",
                          gradient_checkpointing=False)
    assert est.settings["reference"] == "copy"
    assert est.activations + (est.details["gradients_with_activations"] or 0) == mode.peak
