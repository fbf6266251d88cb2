"""Activation memory of Llama-style decoder blocks: what autograd keeps for the backward pass.

The count follows Korthikanti et al. 2022, *Reducing Activation Recomputation in Large Transformer
Models* (Section 4.1, Eq. 1: bytes per layer as a sum over the tensors each op saves), adapted to
the Llama block as Hugging Face ``transformers`` runs it, tensor by tensor:

* **RMSNorm** (``LlamaRMSNorm``; twice per layer, once at the end): the input upcast to float32
  (``4h``), the normalized value before the weight (``e h``), and the weighted output that the next
  linear layers save (``e h``); plus one float32 ``rsqrt`` per token.
* **Attention** (SDPA / flash-attention kernels, which never materialize the ``s x s`` score
  matrix, so there is no ``5 a s^2`` term of Korthikanti's Eq. 1): rotated queries and keys, values
  (kv heads only when SDPA handles grouped-query attention natively, all heads when
  ``transformers`` must ``repeat_kv``, i.e. with a padding mask), the kernel output, the
  ``o_proj`` input (a contiguous copy), and the float32 log-sum-exp per head.
* **SwiGLU MLP**: ``gate`` (saved by SiLU), ``silu(gate)`` and ``up`` (saved by the product), the
  product (saved by ``down_proj``): ``4 e i``.
* **LoRA** (peft): each adapted linear saves the rank-``r`` output of ``lora_A``; when the adapter
  dtype differs from the activations' (peft keeps adapters in float32) the input is cast, and the
  cast copy is saved; dropout saves a mask and its output.
* **Head and loss**: logits in the head's dtype, their float32 copy (``ForCausalLMLoss`` upcasts),
  the saved ``log_softmax`` output, and, at the start of the backward pass, the two float32
  gradients of that size.

``e`` is the byte size of the activations' dtype, ``h`` the hidden size, ``i`` the MLP width.
No dropout inside the block (Llama has none), no sequence/tensor parallelism. With gradient
checkpointing (``transformers``' per-decoder-layer checkpointing) each layer keeps only its input
(``e h``), and one layer is recomputed at a time during the backward pass.
Rotary ``cos``/``sin`` tables are shared by all layers and counted once (small).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraShape:
    """One LoRA-adapted linear layer as the activation formula needs it."""

    in_features: int
    rank: int
    adapter_bytes: int
    dropout: float = 0.0


def llama_activation_bytes(
    config: Any,
    batch_size: int,
    seq_len: int,
    act_bytes: int,
    gradient_checkpointing: bool = False,
    head_bytes: int | None = None,
    lora_layers: list[LoraShape] = (),
    native_gqa: bool = True,
    saved_inputs: frozenset[str] | set[str] | None = None,
    trainable_norms: bool = True,
    trainable_head: bool = True,
) -> dict[str, int]:
    """Bytes of activations live at the peak of one training step, by part.

    Args:
        config (`PretrainedConfig`): A Llama-style config (``hidden_size``, ``intermediate_size``,
            ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``vocab_size``,
            optionally ``head_dim``).
        batch_size (`int`): Sequences per step (per device).
        seq_len (`int`): Tokens per sequence.
        act_bytes (`int`): Bytes per element of the hidden states (2 for bf16/fp16 models, 4 for
            float32 ones, and for k-bit models that peft prepared: it casts embeddings to float32).
        gradient_checkpointing (`bool`, defaults to `False`): Per-layer checkpointing.
        head_bytes (`int` or `None`, defaults to `None`): Bytes per element of the logits (the
            output head's dtype); ``None``: ``act_bytes``.
        lora_layers (`list[LoraShape]`, defaults to `()`): Adapted linear layers of the whole model.
        native_gqa (`bool`, defaults to `True`): SDPA receives kv heads un-repeated (no padding
            mask); ``False`` counts keys and values at all heads.
        saved_inputs (`set[str]` or `None`, defaults to `None`): The block's linear layers
            (``q_proj``, ..., ``down_proj``) whose input autograd keeps: those with a trainable
            weight or a LoRA adapter (a frozen linear only needs its weight for the backward
            pass). ``None``: all of them (full fine-tuning).
        trainable_norms (`bool`, defaults to `True`): A frozen RMSNorm weight does not need the
            normalized input saved.
        trainable_head (`bool`, defaults to `True`): A frozen output head does not save its input.

    Returns:
        `dict[str, int]`: ``layers`` (all decoder layers, or the checkpoints plus one recomputed
        layer), ``lora``, ``final_norm``, ``logits``, ``loss_backward``, ``rope`` and ``total``.
    """
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    a = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or a
    d = getattr(config, "head_dim", None) or h // a
    V = config.vocab_size
    e = act_bytes
    he = head_bytes or act_bytes
    tokens = batch_size * seq_len

    saves = set(LINEARS if saved_inputs is None else saved_inputs)
    norm = 4 * h + 4 + e * h * trainable_norms
    kv_dim = (kv if native_gqa else a) * d
    attention = e * (2 * a * d + 2 * kv_dim) + 4 * a + e * h * bool(saves & {"q_proj", "k_proj", "v_proj"})
    attention += e * a * d * ("o_proj" in saves)
    mlp = 3 * e * i + e * i * ("down_proj" in saves) + e * h * bool(saves & {"gate_proj", "up_proj"})
    per_layer = 2 * norm + attention + mlp

    lora_per_token = 0
    for m in lora_layers:
        lora_per_token += m.rank * m.adapter_bytes
        if m.adapter_bytes != e or m.dropout > 0:
            lora_per_token += m.in_features * m.adapter_bytes
        if m.dropout > 0:
            lora_per_token += m.in_features  # bool mask
    lora_per_layer = lora_per_token // max(L, 1)

    head = {
        "final_norm": tokens * (4 * h + 4 + e * h * trainable_norms + e * h * trainable_head),
        "logits": tokens * V * (he + (4 if he != 4 else 0) + 4),
        "loss_backward": tokens * V * 8,
    }
    if gradient_checkpointing:
        # each layer keeps its input; in the backward pass one layer at a time is recomputed,
        # after the head's tensors are freed: the peak is the larger of the two moments
        one_layer = tokens * (per_layer + lora_per_layer)
        layers = tokens * L * e * h + max(0, one_layer - sum(head.values()))
        lora = 0
    else:
        layers = tokens * L * per_layer
        lora = tokens * lora_per_token
    parts = {"layers": layers, "lora": lora, **head, "rope": 2 * tokens * d * e}
    parts["total"] = sum(parts.values())
    return parts
