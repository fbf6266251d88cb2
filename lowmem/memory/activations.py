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
  ``transformers`` must ``repeat_kv``, i.e. with a padding mask), the kernel output, and the
  float32 log-sum-exp per head. The ``o_proj`` input is the kernel output itself: the flash kernels
  (CPU and CUDA) write it in ``(batch, seq, heads, head_dim)`` layout, so ``transformers``'
  ``transpose(1, 2).contiguous()`` is a view of the same storage, not a copy (measured: one storage).
* **SwiGLU MLP**: ``gate`` (saved by SiLU), ``silu(gate)`` and ``up`` (saved by the product), the
  product (saved by ``down_proj``): ``4 e i``.
* **LoRA** (peft): each adapted linear saves the rank-``r`` output of ``lora_A``; when the adapter
  dtype differs from the activations' (peft keeps adapters in float32) the input is cast, and the
  cast copy is saved (the input itself then is not, unless the base weight trains); dropout saves its output and
  a mask (CUDA: bool) or noise (CPU: the adapter's dtype). peft's forward of an adapted linear holds float32
  temporaries of its output's size (``lora_B``'s output, its scaled copy, the sum): a moment of its own in the
  last layer's forward and, checkpointed, its recomputation (:func:`recomputed_layer_bytes`).
* **Head and loss**: the float32 ``log_softmax`` output that ``cross_entropy`` saves and, at the
  start of the backward pass (the moment of the activations' peak), the two float32 gradients of that
  size. The logits in the head's dtype and their float32 copy (``ForCausalLMLoss`` upcasts) are not
  saved: they are freed when the loss returns (``e_head + 4 + 4 <= 12`` bytes per logit at the end of
  the forward pass, ``4 + 8`` at the start of the backward pass).

``e`` is the byte size of the activations' dtype, ``h`` the hidden size, ``i`` the MLP width.
No dropout inside the block (Llama has none), no sequence/tensor parallelism. With gradient
checkpointing (``transformers``' per-decoder-layer checkpointing) each layer keeps only its input
(``e h``), and one layer is recomputed at a time during the backward pass, with the gradients of its MLP's gate
and up outputs (``2 e i``) and of its output (``e h``) beside its tensors (in float32 the first norm's upcast of
its input is the checkpoint itself: :func:`recomputed_layer_correction`).
Rotary ``cos``/``sin`` tables are shared by all layers and counted once (small).
"""

from __future__ import annotations

import contextlib
import difflib
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
    #: the adapted linear's name in its block (``q_proj``, ..., ``down_proj``; ``""``: not one of :data:`LINEARS`) and
    #: its output features (0: unknown), for the checkpointed layer's recomputation (:func:`recomputed_layer_bytes`)
    name: str = ""
    out_features: int = 0
    #: bytes per element of what dropout saves beside its output: torch's fused ``native_dropout`` (CUDA) a bool mask,
    #: 1; on the CPU ``F.dropout`` multiplies by a noise tensor of the input's dtype (the adapter's), which it saves
    mask_bytes: int = 1


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
    head_parts: dict[str, int] | None = None,
    down_grad_bytes: int = 0,
    head_grad_bytes: int = 0,
    position_ids_per_sequence: bool = False,
    embeddings_require_grad: bool = True,
    kept_inputs: dict[str, int] | None = None,
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
            output head's dtype); ``None``: ``act_bytes``. Kept for callers: the logits are not live at
            the activations' peak whatever their dtype (only the float32 ``log_softmax`` is).
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
        head_parts (`dict` or `None`, defaults to `None`): ``logits`` and ``loss_backward`` of another loss head
            (TRL's fused LM head, :func:`fused_head_bytes`) in place of the plain ``cross_entropy``'s.
        down_grad_bytes (`int`, defaults to `0`): Bytes of the MLP ``down_proj`` weight's gradient (``i h`` elements of
            the weight's dtype; 0 when the weight is frozen, as under LoRA): the first gradient a layer's backward
            forms, live as a temporary beside the layer's tensors, its incoming gradient and the gradient of its
            input (``e i`` per token) until autograd hands it to the weight (:func:`down_proj_moment_bytes`).
        head_grad_bytes (`int`, defaults to `0`): Bytes of the output head weight's gradient (``V h`` elements of the
            weight's dtype; 0 when the head is frozen): the first gradient the backward forms, a temporary beside the
            gradient of the logits and of the head's input until autograd hands it to the weight
            (:func:`head_moment_bytes`; the activations' peak when the tokens are few beside the vocabulary's rows).
        position_ids_per_sequence (`bool`, defaults to `False`): The batch comes with position ids of its own, one
            row per sequence (``(batch_size, seq_len)``: a collator's ``position_ids``). ``False``: transformers'
            default ``position_ids = arange(seq_len)[None]``, ``(1, seq_len)`` whatever the batch, so the rotary
            tables (``rope``: the cos and sin every layer's attention saves, one pair shared by the layers) are
            ``2 s d e``, not ``2 b s d e``. A padding-free batch (TRL's ``padding_free``, and ``packing`` with
            ``"bfd"``: one row of ``b s`` tokens) is ``batch_size=1, seq_len=b s`` either way.
        embeddings_require_grad (`bool`, defaults to `True`): The first layer's input (the embeddings' output) needs
            a gradient: the input embedding trains, or checkpointing made it (``enable_input_require_grads``).
            ``False`` (LoRA, a frozen embedding, no checkpointing): the first layer's input RMSNorm saves neither its
            input nor its ``rsqrt`` (nothing upstream to differentiate), ``4 h + 4`` bytes per token fewer. Mistral
            h=128, 2 layers, LoRA r=8 all-linear, fp32, 2 x 64: 66,048 B over the saved tensors before.
        kept_inputs (`dict[str, int]` or `None`, defaults to `None`): Without checkpointing: bytes per token, by input
            (``"qkv"``, ``"o_proj"``, ``"gate_up"``, ``"down_proj"``), of one layer's linear inputs that the count above
            has saved (by an adapter: freed at that linear's backward) and that a linear's autograd context keeps to the
            end of the backward pass as well (bitsandbytes' 8-bit matmuls: ``MatMul8bitFp``'s ``ctx.A``;
            ``estimate.int8_kept_input_bytes``). The last layer's ``down_proj`` input is then live at its MLP's gate and
            up gradients (``last_layer_moment``, ``layer_backward``), and every later layer's at the first layer's
            (``kept_inputs_first_layer``). Ignored with checkpointing (the held inputs count at every moment there).

    Returns:
        `dict[str, int]`: ``layers`` (all decoder layers, or the checkpoints plus one recomputed
        layer), ``lora``, ``final_norm``, ``logits``, ``loss_backward``, ``norm_backward`` and (without checkpointing)
        ``layer_backward`` (what the final norm's and the last layer's backward hold beyond the loss's moment),
        ``head_backward`` (what the output head's backward holds beyond the loss's and the final norm's moments), ``rope``
        and ``total``; not in the total, the backward's moments: with checkpointing ``checkpoint_head``,
        ``checkpoint_layer`` (the larger of the recomputed layer's two moments) and ``checkpoint_layer_gates`` (its
        MLP's gate and up gradients), without ``norm_moment``, ``last_layer_moment`` (the gate and up gradients) and
        ``last_layer_down_moment`` (the ``down_proj`` weight's gradient being formed) and ``head_step_moment`` (the head
        weight's gradient complete, before the final norm's backward: layerwise mode's head step) and
        ``kept_inputs_first_layer`` (``kept_inputs``' bytes live at the first layer's moment beyond its own tensors) and,
        with adapters on q / k / v or gate / up, ``first_adapters_moment`` (the layers' last moment, every gradient
        formed).
    """
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    a = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or a
    d = getattr(config, "head_dim", None) or h // a
    V = config.vocab_size
    e = act_bytes
    tokens = batch_size * seq_len
    kept = dict(kept_inputs or {})

    saves = set(LINEARS if saved_inputs is None else saved_inputs)
    norm = 4 * h + 4 + e * h * trainable_norms
    kv_dim = (kv if native_gqa else a) * d
    attention = e * (2 * a * d + 2 * kv_dim) + 4 * a + e * h * bool(saves & {"q_proj", "k_proj", "v_proj"})
    mlp = 3 * e * i + e * i * ("down_proj" in saves) + e * h * bool(saves & {"gate_proj", "up_proj"})
    per_layer = 2 * norm + attention + mlp

    lora_per_token = 0
    for m in lora_layers:
        lora_per_token += m.rank * m.adapter_bytes
        if m.adapter_bytes != e or m.dropout > 0:
            lora_per_token += m.in_features * m.adapter_bytes
        if m.dropout > 0:
            lora_per_token += m.in_features * m.mask_bytes  # the mask (CUDA) or noise (CPU)
    lora_per_layer = lora_per_token // max(L, 1)

    head = {
        "final_norm": tokens * (4 * h + 4 + e * h * trainable_norms + e * h * trainable_head),
        "logits": tokens * V * 4,  # the saved float32 log_softmax; the logits (``he``) and their copy are freed
        "loss_backward": tokens * V * 8,
    }
    if head_parts is not None:
        head.update(logits=head_parts["logits"], loss_backward=head_parts["loss_backward"])
    # the final RMSNorm's backward (after the loss's tensors are freed) forms float32 temporaries of the hidden states:
    # with a trainable weight 3, and the upcast incoming gradient when the activations are not float32 (measured: 3.0
    # fp32, 3.8-3.9 bf16); with a frozen one (LoRA) NORM_BACKWARD_TEMPS in both (every live storage at the peak, llama
    # h=128-256, LoRA q/v and all-linear, 2 x 64: fp32 and bf16 alike; 3 / 4 counted, the estimate 0.97 / 0.96 of the
    # measured activations once the adapters' uncast inputs were no longer counted as saved)
    norm_temps = (3 + (e != 4)) if trainable_norms else NORM_BACKWARD_TEMPS
    head["norm_backward"] = max(0, tokens * h * 4 * norm_temps - head["logits"] - head["loss_backward"])
    # the output head's backward (before the final norm's: the loss's tensors freed) forms its weight's gradient beside
    # the logits' gradient and its input's (head_moment_bytes)
    if head_parts is None:
        head["head_backward"] = max(0, head_moment_bytes(tokens, V, h, e, head_bytes or e, head_grad_bytes)
                                    - head["logits"] - head["loss_backward"] - head["norm_backward"])
    layer_lora: dict[str, LoraShape] = {}  # one layer's adapted linears by name
    for m in lora_layers:
        if m.name in LINEARS and m.out_features:
            layer_lora.setdefault(m.name, m)
    if gradient_checkpointing:
        # each layer keeps its input; in the backward pass one layer at a time is recomputed,
        # after the head's tensors are freed: the peak is the larger of the two moments. The backward through the
        # recomputed layer holds, beside its tensors, the gradients of the MLP's gate and up outputs (2 e i per token;
        # measured 1154-3045 elements per token for i=688-1376, h=256-512, fp32 and bf16)
        # (and the gradient of the product, e i, when down_proj saved no input: otherwise its backward freed the product)
        gates = tokens * (per_layer + lora_per_layer + 2 * e * i + e * i * ("down_proj" not in saves)
                          + recomputed_layer_correction(h, e))
        # and before them, the down_proj weight's gradient being formed (down_proj_moment_bytes), and before any of its
        # gradients, its recomputation at an adapted linear (peft's float32 temporaries: recomputed_layer_bytes)
        recompute = tokens * recomputed_layer_bytes(h, i, a, kv * d, d, e, layer_lora, saves, trainable_norms)
        one_layer = max(gates, gates + down_proj_moment_bytes(tokens, i, e, down_grad_bytes), recompute)
        layers = tokens * L * e * h + max(0, one_layer - sum(head.values()))
        lora = 0
    else:
        # the last layer's backward runs after the head's tensors are freed, with its saved tensors and the gradients
        # of its MLP's gate and up outputs (2 e i per token, as above): the larger of the two moments. Measured (fp32 /
        # bf16, h=256-768, vocabulary 100-1000): activations 0.91-0.96 of the measured before, 0.97-1.00 now
        # (a first layer whose input needs no gradient: its input norm saves neither the input nor its rsqrt)
        # (and its q/k/v adapters' dropout saves no noise: its input needs no gradient either; lora_A saves the output)
        first_free = 4 * h + 4 + sum(m.in_features * m.mask_bytes for n, m in layer_lora.items()
                                     if n in ("q_proj", "k_proj", "v_proj") and m.dropout > 0)
        layers = tokens * L * per_layer - (tokens * first_free if not embeddings_require_grad and L else 0)
        lora = tokens * lora_per_token
        # (or before them, beside the layer's incoming gradient, the down_proj weight's gradient being formed)
        down = tokens * e * (h + i) + down_grad_bytes if down_grad_bytes else 0
        # (the gradient of the MLP's product beside them when down_proj saved no input: its backward frees no product),
        # and the gradient of the layer's output (the final norm's tensors are freed by then: llama fp32 h=128, LoRA
        # q/v, 2 x 64: 0.973 of the measured activations without these two, the peak at that moment)
        gate_grads = tokens * (e * i * (2 + ("down_proj" not in saves)) + e * h)
        # (and its down_proj's input when the 8-bit matmul's context keeps it past the adapter's backward: tiny Llama
        # int8 LoRA r=8 all-linear, bf16, 4 x 96 tokens: the peak, down_proj's input gradient summed from its base and
        # adapter branches, 3 e i + e h per token beside the layer's tensors and its input: 0.987 of the measured
        # total without it)
        gate_grads += tokens * kept.get("down_proj", 0)
        head["layer_backward"] = max(0, max(gate_grads, down) - sum(head.values()))
        # the last layer's forward at an adapted linear (peft's temporaries: recomputed_layer_bytes(forward=True)),
        # beside every earlier layer's tensors, the embeddings' output and the last layer's input (held by Python)
        last = recomputed_layer_bytes(h, i, a, kv * d, d, e, layer_lora, saves, trainable_norms, forward=True)
        if last:
            ahead = tokens * (last + e * h * (1 + (L > 1)) - per_layer - lora_per_layer)
            head["layer_forward"] = max(0, ahead - sum(head.values()))
    # the rotary tables: cos and sin of the position ids' shape (transformers' default ids are (1, s), shared by the
    # batch; measured at b = 2, 4: the activations (b - 1) 2 s d e under the per-token count, ESTFIX)
    rope_positions = tokens if position_ids_per_sequence else seq_len
    parts = {"layers": layers, "lora": lora, **head, "rope": 2 * rope_positions * d * e}
    parts["total"] = sum(parts.values())
    if gradient_checkpointing:  # the two moments of the checkpointed backward (not in the total: it holds the larger)
        parts["checkpoint_head"], parts["checkpoint_layer"] = sum(head.values()), one_layer
        parts["checkpoint_layer_gates"] = gates
        parts["checkpoint_layer_recompute"] = recompute
    else:  # the backward's moments after the loss's (not in the total: it holds the largest), for the gradients then live
        rest = layers + lora + parts["rope"]
        parts["norm_moment"] = rest + head["final_norm"] + tokens * h * 4 * norm_temps
        # the output head's weight gradient complete (layerwise: its step): autograd runs a leaf's AccumulateGrad before
        # the next backward node, so the final norm's backward temporaries are not made yet; the head's backward has
        # freed its saved input and made its input's gradient, the same e h per token (``final_norm`` holds it)
        parts["head_step_moment"] = rest + head["final_norm"]
        # (with the gradient of the layer's output and, when down_proj saved no input, the product's: layer_backward's)
        parts["last_layer_moment"] = rest + gate_grads
        parts["last_layer_down_moment"] = rest + down
        # the first layer's first adapters' backward (q / k / v, or without them gate / up), the layers' last moment (its
        # last adapter's weight gradient being formed, every other gradient formed): the gradient of the layer's input
        # (the residual's, e h), the input the adapters save (the normed hidden states, e h; with an 8-bit base among
        # every layer's kept inputs) and the gradient of lora_A's output (e r; at gate / up their outputs' gradients are
        # freed by then: measured). Measured (tiny Llama, LoRA all-linear, fp32, CPU; traced): r=128, 1 x 16 the peak there,
        # estimate 0.997 (full precision, nf4) and 0.989 (int8) of the measured total without this moment, r=64, 1 x 32
        # 0.992 / 0.998 / 0.995 (int8 minus nf4 there: every layer's kept inputs but the first's q / k / v input, which
        # both hold); gate / up / down adapters only, r=128, 1 x 16: nf4 0.995, int8 0.984
        qkv = [m.rank for n, m in layer_lora.items() if n in ("q_proj", "k_proj", "v_proj")]
        gate_up = [m.rank for n, m in layer_lora.items() if n in ("gate_proj", "up_proj")]
        if qkv or gate_up:
            inputs = sum(kept.values()) * L if kept.get("qkv" if qkv else "gate_up") else e * h
            parts["first_adapters_moment"] = tokens * (e * h + inputs + e * max(qkv or gate_up)) + parts["rope"]
        # the first layer's moment: every later layer's kept inputs, and its own down_proj's (their adapters' backward ran)
        if kept:
            parts["kept_inputs_first_layer"] = tokens * (sum(kept.values()) * max(L - 1, 0) + kept.get("down_proj", 0))
    return parts


def head_moment_bytes(tokens: int, vocab: int, hidden: int, act_bytes: int, head_bytes: int, head_grad_bytes: int) -> int:
    """What the output head's backward holds beside the layers' tensors and the final norm's (``final_norm``): the
    gradient of the logits (``V e_head`` per token; the loss's float32 ``log_softmax`` and its gradients are freed
    by then), the gradient of the head's input (``e h`` per token, ``mm`` writes it first) and the head weight's
    gradient being formed (``head_grad_bytes``: ``mm`` writes it as a new tensor, which autograd then hands to
    ``.grad``; 0 when the head is frozen). Larger than the loss's moment (``12 V`` per token) when the tokens are few
    beside the weight: Qwen2 h=384, vocabulary 8000, fp32, 1 x 128 tokens: 16,580,608 B beside 12,288,000 (the
    measured activations' maximum, at the head's weight-gradient ``mm``: 32,458,248 B, the estimate 0.868 of it before
    this term, 1.000 with it)."""
    return tokens * (vocab * head_bytes + hidden * act_bytes) + head_grad_bytes


def down_proj_moment_bytes(tokens: int, intermediate: int, act_bytes: int, down_grad_bytes: int) -> int:
    """What a layer's backward holds at its ``down_proj`` (the first linear it differentiates) beyond the moment of its
    MLP's gate and up gradients (``2 e i`` per token), signed: the weight's gradient being formed (``down_grad_bytes``;
    ``mm`` writes it as a new tensor, which autograd then hands to ``.grad``) beside the gradient of the ``down_proj``
    input (``e i`` per token), in place of those two gate and up gradients. Large when the tokens are few beside the
    weight (``down_grad_bytes > e i`` per token). Measured (every live storage at the activations' peak; Llama fp32,
    checkpointed, h=768, i=2048, 512 tokens; h=512, i=2048, 128 tokens): the peak is there, the down_proj weight's
    gradient and its input's gradient live as temporaries beside the recomputed layer's tensors."""
    if not down_grad_bytes:
        return -tokens * act_bytes * intermediate  # (frozen: the input's gradient only, below the gate and up moment)
    return down_grad_bytes - tokens * act_bytes * intermediate


def recomputed_layer_correction(hidden: int, act_bytes: int) -> int:
    """Bytes per token the checkpointed layer's backward holds beyond ``per_layer`` (its tensors as a forward saves
    them), ``e h - 4 h [e = 4]``:

    * ``+ e h``: the gradient of the layer's output (its incoming gradient; the next layer's input's, or the final
      norm's), live through the layer's backward beside the gradients it forms;
    * ``- 4 h`` when the activations are float32: the first RMSNorm's float32 upcast of the layer's input is then the
      input itself (``Tensor.to`` returns it), which is the checkpoint already counted (``e h`` per layer); in bf16 /
      fp16 it is a separate float32 copy.

    Measured (every live storage at the recomputed last layer's backward peak; Llama h=256, i=688, 4 layers, batch
    4 x 64): fp32 29,978 B per token, bf16 16,538, bf16 with LoRA r=8 (float32 adapters) 24,762; the formula without
    this term 30,360, 16,216 (0.980 of the measured activations), 24,312 (0.982), with it 30,360, 16,728, 24,824."""
    return act_bytes * hidden - 4 * hidden * (act_bytes == 4)


#: float32 hidden-sized temporaries of a frozen RMSNorm's backward (its ``pow``, ``mul`` and ``div`` results and the
#: float32 incoming gradient; measured fp32 and bf16, llama h=128-256 under LoRA: 5): the final norm's, and a
#: recomputed layer's post-attention norm's
NORM_BACKWARD_TEMPS = 5


def recomputed_layer_bytes(hidden: int, intermediate: int, heads: int, kv_dim: int, head_dim: int, act_bytes: int,
                           lora: dict[str, LoraShape], saved_inputs: set[str] | frozenset[str],
                           trainable_norms: bool, forward: bool = False) -> int:
    """Bytes per token the checkpointed last layer's recomputation holds beside the checkpoints at its largest moment:
    its post-attention RMSNorm's backward (the layer's attention tensors, the layer's output gradient and
    :data:`NORM_BACKWARD_TEMPS` float32 temporaries) or peft's forward of an adapted linear (``base(x) + lora_B(lora_A(dropout(x))) * scaling``, then the cast back to the
    base result's dtype), before any of that layer's gradients is formed. ``lora``: the layer's adapted linears by
    name (:data:`LINEARS`); the moment of each in forward order is

    * the recomputed layer's tensors saved so far: each RMSNorm's ``rsqrt`` (4 B) and float32 upcast (``4 h`` when the
      activations are not float32: otherwise the upcast is the norm's input itself), the normalized value when the
      norm trains (``e h``), each adapted linear's saved adapter tensors (its input cast to the adapter's dtype
      ``in a``, when that differs from ``e``, and the rank-``r`` output ``r a``), the rotated queries and keys, the
      values, the kernel's output and log-sum-exp, the MLP's gate, ``silu(gate)`` and up outputs (``e i`` each);
    * what the layer's Python code holds without autograd saving it: the input norm's output (``e h``, until the
      values), the residual after the attention and the second norm's output (``e h`` each, through the MLP: the MLP's
      argument), the MLP's product (``e i``, the ``down_proj`` input);
    * the adapted linear's own temporaries: the base result (``e out``), ``lora_B``'s output and its product with
      ``scaling`` (or that product and the sum with the base result): ``(e + 2 a) out``. At ``down_proj``, the last
      linear, the non-reentrant checkpoint stops the recomputation when ``lora_B`` saves its input, before its output:
      the base result and the adapter's saved tensors only;
    * the backward's tensors then live (measured, not derived: every storage live at the moment): the gradient of the
      layer's output and the final norm's backward's, ``2 e h``, and in bf16 / fp16 that backward's float32 gradient of
      its input, ``4 h``.

    ``forward``: the layer's own forward instead (no checkpointing: the last layer's, beside every earlier layer's
    tensors), which holds no gradient, has no norm backward and runs ``down_proj`` to its end.

    Measured (every live storage at the step's peak, llama 2 layers, 2 x 64 tokens, LoRA all-linear: bf16 h=256, i=344,
    r=8, the peak at ``up_proj``'s moment, 17,832 B per token = this count; the gate and up gradients' moment of the
    formula without it: 16,768 B, the estimate 0.956 of the measured activations)."""
    h, i, e = hidden, intermediate, act_bytes
    outs = {"q_proj": heads * head_dim, "k_proj": kv_dim, "v_proj": kv_dim, "o_proj": h,
            "gate_proj": i, "up_proj": i, "down_proj": h}

    def kept(name: str) -> int:  # the adapter's tensors the recomputation saves
        m = lora.get(name)
        if m is None:
            return 0
        cast = m.adapter_bytes != e or m.dropout > 0
        return m.rank * m.adapter_bytes + m.in_features * m.adapter_bytes * cast + m.in_features * m.mask_bytes * (m.dropout > 0)

    def input_saved(names: tuple[str, ...]) -> bool:  # one of these linears saves its input itself (not a cast copy)
        return any(n in saved_inputs and (n not in lora or not (lora[n].adapter_bytes != e or lora[n].dropout > 0))
                   for n in names)

    def moment(name: str, held: int) -> int:
        m = lora[name]
        temporaries = e * outs[name] + (2 * m.adapter_bytes * outs[name] if name != "down_proj" or forward else 0)
        # with dropout, peft's forward still holds the input's cast copy beside the dropout's output and noise
        temporaries += m.in_features * m.adapter_bytes * (m.adapter_bytes != e and m.dropout > 0)
        return saved + kept(name) + held + temporaries + forward_gradients

    norm = 4 * h * (e != 4) + 4 + e * h * trainable_norms
    forward_gradients = 0 if forward else 2 * e * h + 4 * h * (e != 4)  # the backward's, live through the recomputation
    moments = []
    saved = norm  # the input norm's
    for name in ("q_proj", "k_proj", "v_proj"):
        if name in lora:
            moments.append(moment(name, e * h))
        saved += kept(name) + e * outs[name]  # (the queries and keys replaced by their rotations, the same size)
    saved += e * heads * head_dim + 4 * heads + e * h * input_saved(("q_proj", "k_proj", "v_proj"))  # kernel output, lse
    if "o_proj" in lora:
        moments.append(moment("o_proj", 0))
    saved += kept("o_proj") + norm  # then the residual after the attention and the second norm's output, held
    # the second norm's backward (the MLP's tensors freed): its float32 temporaries beside the layer's output gradient
    # (float32 activations: the residual is the norm's saved upcast)
    if not forward:
        moments.append(saved + e * h * (e == 4) + e * h + NORM_BACKWARD_TEMPS * 4 * h)
    for name in ("gate_proj", "up_proj"):
        if name in lora:
            moments.append(moment(name, 2 * e * h))
        saved += kept(name) + e * i * (2 if name == "gate_proj" else 1)  # gate and silu(gate); up
    mlp_input_saved = input_saved(("gate_proj", "up_proj"))
    saved += e * h * mlp_input_saved
    if "down_proj" in lora:  # the residual, the MLP's input (its argument) unless saved, the product
        moments.append(moment("down_proj", e * h + e * h * (not mlp_input_saved) + e * i))
    return max(moments, default=0)


#: TRL 1.16's fused LM head (``trl.kernels.ChunkedLogProbFunction``): tokens per tile row block, and the tile width
#: lowmem's TRL trainers use, ``min(vocab, 32768)`` (``trainers.hf.fused_head_tiles``; TRL's own is always 32768)
FUSED_TOKEN_CHUNK, FUSED_VOCAB_CHUNK = 4096, 32768
#: On a device without Triton (CPU) TRL folds each tile in torch: float32 temporaries of the tile's size live at once
#: in the backward's ``_backward_tile`` (the upcast, the scaled logits, ``log_p``, ``p``, the gradient, the target
#: mask's float copy and the products being formed). Measured (every live storage but the weight's; 528 x 4000,
#: 300 x 1000 and 2000 x 3000 tiles, float32 and bf16): 6.98-7.21 tile-sized float32 tensors beside the tile buffer.
#: None on CUDA (a Triton kernel)
FUSED_CPU_TILE_TEMPS = 7


def fused_head_bytes(tokens: int, vocab: int, hidden: int, act_bytes: int, compute_bytes: int, device: str,
                     head_bytes: int = 4, trainable_head: bool = True) -> dict[str, int]:
    """Bytes of TRL's fused LM head (``model(..., fused_lm_head=True)``: SFT, DPO, GRPO), which replaces the logits.

    The forward projects ``hidden @ weight.T`` in tiles of ``[min(tokens, 4096), min(vocab, 32768)]`` into one buffer
    and keeps per-token statistics (``ChunkedLogProbFunction.forward``); it saves the scored hidden states (gathered:
    a copy), the targets and two float32 per-token values. Its backward (the activations' peak) allocates the float32
    gradient of the hidden states, the tile buffer again, on CPU the tile-sized float32 temporaries of the torch fold
    (:data:`FUSED_CPU_TILE_TEMPS`), and a float32 gradient of the head's weight, which is a copy beyond the weight's
    gradient when the head is not float32.

    Args:
        tokens (`int`): Scored tokens of the micro-batch (at most batch x sequence).
        vocab (`int`): Vocabulary size.
        hidden (`int`): Hidden size.
        act_bytes (`int`): Bytes per element of the hidden states.
        compute_bytes (`int`): Bytes per element of the tile (the autocast dtype, else the hidden states').
        device (`str`): ``"cpu"`` (torch fold) or ``"cuda"`` (Triton).
        head_bytes (`int`, defaults to `4`): Bytes per element of the head's weight.
        trainable_head (`bool`, defaults to `True`): The head's weight gets a gradient.

    Returns:
        `dict[str, int]`: ``logits`` (what the forward saves) and ``loss_backward`` (the backward's tensors).
    """
    tile_elems = min(tokens, FUSED_TOKEN_CHUNK) * min(vocab, FUSED_VOCAB_CHUNK)
    saved = tokens * (hidden * act_bytes + 8 + 4 + 4)
    backward = tokens * hidden * 4 + tile_elems * compute_bytes
    backward += tile_elems * 4 * FUSED_CPU_TILE_TEMPS if device == "cpu" else 0
    backward += vocab * hidden * 4 if trainable_head and head_bytes != 4 else 0
    return {"logits": saved, "loss_backward": backward}


def nograd_layer_bytes(config: Any, tokens: int, act_bytes: int) -> int:
    """Peak bytes of one decoder layer in a forward without gradients (generation's prompt forward, a reference
    model's log-probabilities): nothing is saved, each intermediate is freed once consumed, so the peak is inside the
    MLP: the layer's input (the residual), the normalized input, the gate and up projections, the activated gate and
    their product, ``(2 h + 4 i) e`` per token (``i``: ``intermediate_size``, else ``n_inner``, else ``4 h``).
    Measured on a tiny Llama's ``generate`` prompt forward (every live storage, 800-960 tokens): 1.01.
    """
    h = config.hidden_size
    i = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    return tokens * (2 * h + 4 * i) * act_bytes


#: ``model_type`` values whose decoder block :func:`llama_activation_bytes` models (RMSNorm, rotary attention,
#: SwiGLU MLP); every other architecture is traced (:func:`traced_activation_bytes`), and so are these with a sliding
#: window (:func:`llama_formula_applies`)
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


def sliding_window_layers(config: Any) -> bool:
    """Whether any decoder layer of ``config`` attends within a sliding window (``sliding_window`` set, and, where the
    config lists ``layer_types``, a ``"sliding_attention"`` layer among them: Qwen2 / Qwen3 with
    ``use_sliding_window`` from ``max_window_layers`` on; Mistral's ``sliding_window`` applies to every layer)."""
    if getattr(config, "sliding_window", None) is None:
        return False
    types = getattr(config, "layer_types", None)
    return types is None or any("sliding" in str(t) for t in types)


def llama_formula_applies(config: Any) -> bool:
    """Whether :func:`llama_activation_bytes` models ``config``'s step: a :data:`LLAMA_FAMILY` block with causal
    attention and no mask tensor. A sliding window is an explicit ``(b, 1, s, s)`` float mask that each layer's attention
    keeps for its backward, which the formula does not count: Mistral (h=384, 4 layers, window 64), AdamW, fp32,
    measured / formula activations at 1 x 512 tokens 115.44 / 107.44 MiB, at 4 x 512 461.02 / 429.76 (total 0.948 of
    the measured peak; the trace: 461.02, exact). Such a config is traced (:func:`traced_activation_bytes`)."""
    return getattr(config, "model_type", None) in LLAMA_FAMILY and not sliding_window_layers(config)


def decoder_layers(model: Any, num_layers: int):
    """The ``nn.ModuleList`` of ``model``'s ``num_layers`` decoder blocks (the largest list of that length).

    Raises:
        ValueError: No module list of that length (not a decoder-only stack the estimate can model).
    """
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if not lists:
        raise ValueError(f"no list of num_hidden_layers={num_layers} decoder blocks in {type(model).__name__}: "
                         "its activations cannot be estimated")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _fused_experts(mod: Any) -> bool:
    """A transformers fused-experts module (``gate_up_proj`` of shape ``(E, ., .)``)."""
    return getattr(getattr(mod, "gate_up_proj", None), "ndim", 0) == 3 and hasattr(mod, "num_experts") and hasattr(mod, "act_fn")


def _experts_kernel(mod: Any) -> str | None:
    """The registered experts kernel a fused-experts module dispatches to (``config._experts_implementation`` of
    transformers' ``@use_experts_implementation`` classes: ``grouped_mm``, the default whenever it can dispatch, or
    ``batched_mm``), or ``None`` for the eager per-expert loop (``"eager"``, or a class without the decorator)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    impl = getattr(getattr(mod, "config", None), "_experts_implementation", None)
    if not hasattr(mod, "is_transposed") or impl in (None, "eager") or impl not in ALL_EXPERTS_FUNCTIONS:
        return None
    return impl


@contextlib.contextmanager
def traced_experts(model: Any):
    """Fused experts as a device runs them, on fake tensors, for the duration of the block.

    A registered kernel (``grouped_mm``, ``batched_mm``) has no data-dependent shape (the routed tokens are sorted, the
    offsets counted, each kernel takes all ``tokens * top_k`` rows) and runs as is, whatever the routing: one
    ``(S, .)`` input saved per projection and one ``(E, ., .)`` weight gradient formed in the backward. Only
    ``grouped_mm`` is redirected, to transformers' own fallback operator (``transformers::grouped_mm_fallback``, in
    place of ``_grouped_mm``): the same outputs, forward and backward, and fake kernels for every dtype (torch's
    ``_grouped_mm`` meta kernel accepts only bfloat16). The fallback's autograd saves its input and weight always;
    torch's saves the input only for the weight's gradient, so a frozen expert weight (LoRA on the experts: peft's
    adapters beside the frozen 3-D weight) goes through :func:`_frozen_weight_grouped_mm` (no input saved, the
    input's gradient only). The eager per-expert loop (``experts_implementation="eager"``) selects experts with
    ``nonzero``, which fake tensors cannot run: it is traced with an even routing (:func:`_balanced_experts_forward`)."""
    import transformers.integrations.moe as moe

    patched = []
    for mod in model.modules():
        if _fused_experts(mod) and _experts_kernel(mod) is None:
            mod.forward = _balanced_experts_forward.__get__(mod)
            patched.append(mod)
    native = moe._grouped_mm
    moe._grouped_mm = _traced_grouped_mm
    try:
        yield
    finally:
        moe._grouped_mm = native
        for mod in patched:
            del mod.forward


def _bnb_linear_functions():
    """The traced stand-ins of bitsandbytes' k-bit matmuls (``MatMul8bitFp``, ``MatMul4Bit``: their CPU training
    path), allocating what they allocate and keeping what their autograd contexts keep, on the trace's fake tensors."""
    import torch

    class Int8(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, weight, bias):
            # the codes de-quantized in the input's dtype (``CB.to(A.dtype)``) times the rows' float32 scales
            cb = torch.empty(weight.shape, dtype=a.dtype, device=a.device)
            cb.mul_(torch.empty(weight.shape[0], 1, dtype=torch.float32, device=a.device))
            out = torch.nn.functional.linear(a, cb, bias)
            ctx.a, ctx.shape = a, a.shape  # ``ctx.A``: held by the context to the end of the backward pass
            return out

        @staticmethod
        def backward(ctx, grad):
            if grad.dim() == 3:
                grad = grad.reshape(-1, grad.shape[-1]).contiguous()
            cb = torch.empty((grad.shape[-1], ctx.shape[-1]), dtype=ctx.a.dtype, device=grad.device)
            cb.mul_(torch.empty(cb.shape[0], 1, dtype=torch.float32, device=grad.device))
            return torch.matmul(grad.to(ctx.a.dtype), cb).view(ctx.shape), None, None

    class Nf4(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, weight, bias, compute, blocksize):
            # double quantization: the blocks' float32 scales de-quantized first (``gemm_4bit``'s
            # ``dequantize_blockwise(...) + absmax_offset``), alive to its end beside the weight
            scales = (torch.empty(weight.shape.numel() // blocksize, dtype=torch.float32, device=a.device)
                      if blocksize else None)
            w = torch.empty(weight.shape, dtype=compute, device=a.device)  # ``dequantize_4bit``
            # bitsandbytes' ``gemm_4bit`` is a custom operator, on no autocast list: under autocast it runs in the
            # input's (compute) dtype, no copy of either operand (the linear under autocast made two: tiny Llama nf4
            # LoRA 1 x 16 traced 1.27 of the measured)
            with torch.autocast(a.device.type, enabled=False):
                out = torch.nn.functional.linear(a, w.to(a.dtype), bias)
            ctx.shape, ctx.compute, ctx.blocksize = weight.shape, compute, blocksize
            del scales
            return out

        @staticmethod
        def backward(ctx, grad):
            if ctx.blocksize:  # double quantization: the blocks' absmax de-quantized (float32) first
                torch.empty(ctx.shape.numel() // ctx.blocksize, dtype=torch.float32, device=grad.device)
            w = torch.empty(ctx.shape, dtype=ctx.compute, device=grad.device).to(grad.dtype)
            return torch.matmul(grad, w), None, None, None, None

    return Int8, Nf4


@contextlib.contextmanager
def kbit_linears(model: Any):
    """While tracing, ``model``'s quantized linears run :func:`_bnb_linear_functions`' stand-ins: what bitsandbytes'
    layers de-quantize (the weight, in the forward and again in the backward) and keep (an 8-bit layer's input,
    ``ctx.A``), at the moments it lives. ``model.lowmem_kbit`` (set by the estimate) is ``(kind: "int8" or "nf4" for
    any 4-bit type, the 4-bit compute dtype, the quantized linears' names without peft's wrapping, the 4-bit absmax
    block size with double quantization or 0)``; without it nothing changes."""
    spec = getattr(model, "lowmem_kbit", None)
    if spec is None:
        yield
        return
    import torch

    kind, compute, names, blocksize = spec
    int8, nf4 = _bnb_linear_functions()
    patched = []
    from .estimate import bnb_quantizes
    from transformers.pytorch_utils import Conv1D

    for name, mod in model.named_modules():  # (the names without peft's wrapping: its model, base layers)
        if name.removeprefix("base_model.model.").removesuffix(".base_layer") in names and bnb_quantizes(mod):
            def forward(x, mod=mod):
                # (GPT-2's Conv1D: bitsandbytes holds its (in, out) weight transposed, an (out, in) linear's)
                weight = mod.weight.t() if isinstance(mod, Conv1D) else mod.weight
                if kind == "int8":
                    return int8.apply(x, weight, mod.bias)
                bias = None if mod.bias is None else mod.bias.to(compute)
                out = nf4.apply(x.to(compute), weight, bias, compute, blocksize)
                return out.to(x.dtype)
            mod.forward = forward
            patched.append(mod)
    if kind == "nf4":
        # peft wraps a 4-bit layer in its own LoRA layer (``lora.bnb.Linear4bit``, not the ``lora.Linear`` the meta model
        # has), whose forward clones the base output and, outside CUDA autocast, casts the adapters' input and output:
        # the wrapper runs that forward
        from peft.tuners.lora import bnb as peft_bnb

        for name, mod in model.named_modules():
            base = getattr(mod, "base_layer", None)
            if (base is not None and base in patched and hasattr(mod, "lora_A")
                    and hasattr(peft_bnb, "Linear4bit")):
                mod.forward = peft_bnb.Linear4bit.forward.__get__(mod)
                patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward


@contextlib.contextmanager
def unpacked_positions():
    """transformers' packed-sequence detection (``masking_utils.find_packed_sequence_indices``) answers "not packed"
    for the duration of the block. A real run reads it from the position ids (``(packed[:, -1] == 0).all()``, a host
    read) and, for the default ``arange`` ids, skips the mask (``is_causal``); on fake tensors it cannot read them
    (``is_tracing``) and builds the ``(b, 1, s, s)`` bool mask, which each checkpointed layer then holds. The traces
    run the default ids (one sequence per row). Before: OLMo2 h=128, 2 layers, 2 x 64, fp32, checkpointed, AdamW:
    activations 8,192 B (the mask) and the backward's peak 106,496 B over the same step run on real tensors (the total
    1.0117 of the measured peak); Gemma3 4,096 B (session 14, ESTFIX)."""
    import transformers.masking_utils as masking

    native = masking.find_packed_sequence_indices
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = native


def _traced_grouped_mm(input: Any, weight: Any, offs: Any) -> Any:
    """transformers' ``_grouped_mm`` on fake tensors: its fallback operator, whose autograd matches torch's
    ``_grouped_mm`` when the weight gets a gradient (input and weight saved; ``(S, k)`` and ``(E, k, n)`` gradients),
    and :func:`_frozen_weight_grouped_mm` when it does not."""
    import torch

    input = input.to(weight.dtype)
    if weight.requires_grad or not torch.is_grad_enabled():
        return torch.ops.transformers.grouped_mm_fallback(input, weight, offs=offs)
    return _frozen_weight_grouped_mm(input, weight, offs)


def _frozen_weight_grouped_mm(input: Any, weight: Any, offs: Any) -> Any:
    """``grouped_mm`` of ``input`` ``(S, k)`` by a weight ``(E, k, n)`` that gets no gradient, with torch's
    ``_grouped_mm`` autograd: the weight (a parameter) and the offsets are saved, not the input; the backward forms
    the input's gradient ``grad @ weight^T`` only (measured, Qwen2-MoE with LoRA on the experts: the fallback's saved
    inputs were four ``(S, h)`` copies beyond the real step's, 1.083 of its activations)."""
    import torch

    global _FrozenWeightGroupedMM
    if _FrozenWeightGroupedMM is None:
        class _Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, w, o):
                ctx.save_for_backward(w, o)
                return torch.ops.transformers.grouped_mm_fallback(x, w, offs=o)

            @staticmethod
            def backward(ctx, grad):
                w, o = ctx.saved_tensors
                return torch.ops.transformers.grouped_mm_fallback(grad, w.transpose(-2, -1), offs=o), None, None

        _FrozenWeightGroupedMM = _Function
    return _FrozenWeightGroupedMM.apply(input, weight, offs)


_FrozenWeightGroupedMM = None


def _fold_in_place(*args: Any, **kwargs: Any) -> None:
    """Stands for TRL's Triton tile kernels (``_forward_kernel`` / ``_backward_kernel``) in a trace for a CUDA target:
    they fold a tile into the per-token statistics, or turn it into the logits' gradient, in place (nothing
    allocated)."""


def _addmm_fp32_on_device(trl_addmm_fp32: Any) -> Any:
    """TRL's ``_addmm_fp32`` (``trl_addmm_fp32``) as it runs on CUDA, for a trace on fake CPU tensors: a 16-bit tile's
    product accumulated into the float32 gradient by ``torch.addmm(..., out_dtype=torch.float32, out=acc)`` (nothing
    allocated, when this torch has ``out_dtype``); otherwise TRL's own (float32 operands: ``.float()`` returns them,
    nothing allocated; a torch without ``out_dtype``: the float32 copies, as on CUDA)."""
    import torch
    import trl.kernels.chunked_logprob as kernels

    def addmm(acc: Any, a: Any, b: Any) -> None:
        if kernels._MM_OUT_DTYPE and a.dtype in (torch.float16, torch.bfloat16):
            return None
        return trl_addmm_fp32(acc, a, b)

    return addmm


@contextlib.contextmanager
def trl_fused_head(model: Any, device: str = "cpu"):
    """TRL's fused LM head on ``model`` for the duration of the block (``trl.trainer.utils.add_fused_lm_head``, as
    lowmem's TRL trainers add it: ``model(..., labels=..., fused_lm_head=True)`` returns per-token log-probabilities,
    the logits never formed), with the tile width lowmem's trainers use, ``min(vocab, 32768)``
    (``trainers.hf.fused_head_tiles``). On a CPU (fake CPU tensors too) TRL folds each tile in torch.

    ``device="cuda"``: the head as it runs on a CUDA device with Triton, traced on fake CPU tensors. Only TRL's
    device-specific kernels differ, and they allocate nothing: the tile folds (Triton kernels, in place on the tile
    and the per-token statistics: :func:`_fold_in_place`) and the float32 accumulation of a 16-bit tile's products
    (``addmm`` with ``out_dtype``: :func:`_addmm_fp32_on_device`); the tile buffer, the hidden states' copy, the
    float32 gradients and statistics are the same tensors. On CUDA TRL scores only the labelled positions
    (``hidden[mask]``, a gathered copy, where the CPU path copies by ``reshape`` a sliced, non-contiguous
    ``[:, :-1]``): with every position labelled (as estimated) the same bytes, up to the boolean index's 16 B per
    token inside the forward.

    Raises:
        ValueError: TRL is not installed, or has no fused head (another version than lowmem's trainers use), or
            ``device`` is not ``"cpu"`` or ``"cuda"``."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"Invalid device={device!r} for TRL's fused head: expected 'cpu' or 'cuda'")
    try:
        import trl.kernels.chunked_logprob as kernels
        import trl.trainer.utils as trl_utils
        from trl.trainer.utils import add_fused_lm_head
    except ImportError as exc:
        raise ValueError(f"trainer=... estimates TRL's fused LM head, which this TRL does not have ({exc})") from exc
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the head is added beneath
    had = lm.__dict__.get("forward")
    default = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    on_device = {"_forward_tile": _fold_in_place, "_backward_tile": _fold_in_place,
                 "_addmm_fp32": _addmm_fp32_on_device(kernels._addmm_fp32)} if device == "cuda" else {}
    kept = {name: getattr(kernels, name) for name in on_device}
    add_fused_lm_head(lm)
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(default, lm.config.get_text_config().vocab_size)
    for name, fn in on_device.items():
        setattr(kernels, name, fn)
    try:
        yield
    finally:
        for name, fn in kept.items():
            setattr(kernels, name, fn)
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = default
        if had is None:
            del lm.forward
        else:
            lm.forward = had


def _balanced_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """A transformers fused-experts forward (``gate_up_proj`` / ``down_proj`` of shape ``(E, ., .)``, the eager
    loop of ``MixtralExperts.forward``) with the routing replaced by an even split: each expert takes
    ``ceil(tokens * top_k / E)`` tokens. The eager loop saves, per routed token, the same tensors whatever the
    routing, so the total is that of any routing (up to the rounding); fake tensors cannot run the
    data-dependent ``nonzero`` of the real routing. Every expert is hit (as with the real routing of a batch of
    thousands of tokens): each expert's slice ``gate_up_proj[e]`` gets a weight-sized gradient in the backward
    (``select_backward``), summed into the weight's, which the measured eager step holds too."""
    import torch
    from torch.nn import functional as F

    tokens, top_k = hidden_states.shape[0], top_k_index.shape[-1]
    per_expert = -(-tokens * top_k // self.num_experts)
    final = torch.zeros_like(hidden_states)
    idx = torch.arange(per_expert, device=hidden_states.device) % max(tokens, 1)
    pos = torch.zeros_like(idx)
    for e in range(self.num_experts):
        gate, up = F.linear(hidden_states[idx], self.gate_up_proj[e]).chunk(2, dim=-1)
        out = F.linear(self.act_fn(gate) * up, self.down_proj[e]) * top_k_weights[idx, pos, None]
        final.index_add_(0, idx, out.to(final.dtype))
    return final


def traced_activation_bytes(
    model: Any,
    config: Any,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    cache: dict | None = None,
    head_parts: dict[str, int] | None = None,
    fused_head: bool = False,
    fused_head_device: str = "cpu",
    autocast: Any = None,
    reference: str | None = None,
) -> dict[str, int]:
    """Activation bytes of any decoder-only causal LM, from the tensors autograd saves in one forward pass of
    ``model`` on fake CPU tensors (the meta ``model``'s parameters are made fake CPU ones: nothing is allocated, and
    attention runs the flash kernel a device runs, not the math path of meta tensors, which saves the ``s x s``
    scores): the architecture's own code decides what is saved (attention
    variants and their masks, GeLU / GeGLU MLPs, parallel blocks, Conv1D, logit soft-capping, MoE experts).

    Each saved tensor's storage is counted once (``torch.autograd.graph.saved_tensors_hooks``; parameters
    excluded) and attributed to the decoder layer that saved it first, or to the rest (embeddings, final norm,
    head, loss). Added to the saved tensors, as in :func:`llama_activation_bytes`: at the start of the backward
    pass the two float32 logit-sized gradients of the loss. With ``gradient_checkpointing`` each layer keeps its
    input (``e h`` per token) and one layer is recomputed at a time after the head's tensors are freed; the
    recomputed layer holds its tensors and the gradients its backward forms (traced: :func:`_trace_saved` with
    ``backward``), and the parts add ``checkpoint_head`` and ``checkpoint_layer``, the two moments (not in the total).
    Mixture-of-experts layers (transformers' fused ``gate_up_proj`` / ``down_proj`` experts) run the kernel the model
    dispatches to (:func:`traced_experts`: ``grouped_mm`` by default; the eager loop with an even routing).

    That is the path of TRL's fused head counted by formula (``head_parts``). Otherwise (the model's own loss, MoE
    models too, or TRL's fused head itself with ``fused_head``) the
    training step itself is traced (:func:`_traced_step_bytes`: forward and ``loss.backward()`` with the weights'
    gradients and the model's own checkpointing, every live storage followed), and the parts are ``layers``,
    ``other``, ``backward`` (the rest at the activations' peak), ``total``, ``backward_peak`` (activations and
    gradients at once), ``first_gradient_moment`` and ``gradient_moment`` (the activations when the first weight's
    gradient is complete and the most at a later one: layerwise mode's steps) and ``forward_saved`` (not in the total).

    Args:
        model (`nn.Module`): The causal LM on the meta device (with its adapters and ``requires_grad`` flags:
            a frozen linear does not save its input).
        config (`PretrainedConfig`): Its text config (``num_hidden_layers``, ``hidden_size``, ``vocab_size``).
        batch_size (`int`): Sequences per step.
        seq_len (`int`): Tokens per sequence.
        gradient_checkpointing (`bool`, defaults to `False`): Per-layer checkpointing.
        cache (`dict` or `None`, defaults to `None`): ``(batch_size, seq_len, ...) -> traced bytes`` kept between
            calls on the same model (the budget search asks for several batches and checkpointing choices). A batch
            above 2 is extrapolated from the traces at 1 and 2 (what a forward saves is affine in the batch; the step's
            trace: above 3, from 2 and 3).
        head_parts (`dict` or `None`, defaults to `None`): ``logits`` and ``loss_backward`` of TRL's fused LM head
            (:func:`fused_head_bytes`): the traced float32 ``log_softmax`` is replaced by its ``logits``.
        fused_head (`bool`, defaults to `False`): The step is traced with TRL's fused LM head itself
            (:func:`trl_fused_head`) instead of the model's loss; not with ``head_parts``.
        fused_head_device (`str`, defaults to `"cpu"`): The device the fused head runs on: ``"cpu"`` (TRL's torch fold
            of each tile) or ``"cuda"`` (its Triton kernels, which allocate nothing; traced on fake CPU tensors).
        autocast (`torch.dtype` or `None`, defaults to `None`): The step's forward (its loss included) runs under
            ``torch.autocast("cpu", autocast)`` and its backward outside it, as the Trainer's mixed precision runs a
            float32 ``model`` (its ``dtype`` weight copies, float32 residual stream and norms, float32 gradients: all
            in the trace); only for the traced step (not with ``head_parts``).
        reference (`str` or `None`, defaults to `None`): DPO's reference forward (TRL 1.16's
            ``DPOTrainer._compute_loss``): after the policy's forward, before its backward, the reference's no-grad
            forward with TRL's fused head over the same sequences, under the same autocast (:func:`_reference_forward`):
            ``"copy"`` a separate model (its weights excluded; whole; frozen, as lowmem's trainers freeze it, so
            autocast caches none of its ``dtype`` weight copies: the transient ones of a layer at a time), ``"adapter"`` the policy
            with its adapters disabled; ``None`` / ``"none"``: no reference forward. Only with ``fused_head``.

    Returns:
        `dict[str, int]`: ``layers``, ``other`` (outside the decoder layers: embeddings, final norm, logits,
        log-softmax, rotary tables, masks), ``loss_backward`` and ``total``.

    Raises:
        ValueError: The model cannot be traced on fake tensors (the message names the model type and why).
    """
    layers = decoder_layers(model, config.num_hidden_layers)
    cache = {} if cache is None else cache
    if head_parts is None:
        return _traced_step_bytes(model, config, layers, batch_size, seq_len, gradient_checkpointing, cache,
                                  fused_head and fused_head_device, autocast, reference_kind(reference, fused_head))
    if reference not in (None, "none"):
        raise ValueError("reference traces DPO's reference forward in the step itself: head_parts must be None")
    if autocast is not None:
        raise ValueError("autocast traces the step itself: head_parts must be None")
    if fused_head:
        raise ValueError("fused_head=True traces TRL's fused head itself: head_parts must be None")

    def saved_at(b: int) -> tuple[list[int], int, list[int]]:
        key = (b, seq_len, "backward") if gradient_checkpointing else (b, seq_len)
        if key not in cache:
            cache[key] = _trace_saved(model, config, layers, b, seq_len, backward=gradient_checkpointing)
        return cache[key]

    if batch_size <= 2:
        per_layer, other, backward = (*saved_at(batch_size), None)[:3]
    else:  # what a forward saves is affine in the batch (masks and rotary tables are shared): two traces serve all
        (l1, o1, b1), (l2, o2, b2) = ((*saved_at(b), [])[:3] for b in (1, 2))
        per_layer = [a + (batch_size - 1) * (b - a) for a, b in zip(l1, l2)]
        other = o1 + (batch_size - 1) * (o2 - o1)
        backward = [a + (batch_size - 1) * (b - a) for a, b in zip(b1, b2)]
    tokens = batch_size * seq_len
    e = model.get_input_embeddings().weight.element_size()
    loss_backward = tokens * config.vocab_size * 8
    if head_parts is not None:  # the fused head saves no logit-sized tensor
        other = max(0, other - tokens * config.vocab_size * 4) + head_parts["logits"]
        loss_backward = head_parts["loss_backward"]
    if gradient_checkpointing:
        # the recomputed layer's backward: its saved tensors still alive plus the gradients being formed (traced)
        head = other + loss_backward
        layer_part = tokens * len(layers) * e * config.hidden_size + max(0, max(backward, default=0) - head)
    else:
        layer_part = sum(per_layer)
    parts = {"layers": layer_part, "other": other, "loss_backward": loss_backward}
    parts["total"] = sum(parts.values())
    if gradient_checkpointing:  # the two moments of the checkpointed backward (not in the total: it holds the larger)
        parts["checkpoint_head"], parts["checkpoint_layer"] = head, max(backward, default=0)
    return parts


def layer_kinds(config: Any, layers: Any) -> list[tuple]:
    """One hashable kind per decoder layer: layers of one kind run the same operations on the same shapes, so their
    step segments (:func:`_stitch_layers`) are equal up to where they start.

    A kind is the layer's ``config.layer_types`` entry (Gemma2/3's sliding and full attention, Qwen2's
    ``max_window_layers``), every submodule's class and plain attributes (``sliding_window``, ``is_sliding``,
    ``attention_type``; not the layer's index), every parameter's and buffer's name, shape, dtype and
    ``requires_grad`` (MoE layers every ``decoder_sparse_step``-th layer, ``mlp_only_layers``, LoRA targets, BAdam's
    frozen blocks), and whether it is the first layer (its input comes from the embeddings: with a frozen embedding it
    needs no gradient, so its backward forms none). Anything not recognised makes two layers different kinds: a
    longer truncated trace, never a wrong one."""
    types = getattr(config, "layer_types", None)
    scalars = (bool, int, float, str, type(None))
    kinds = []
    for i, layer in enumerate(layers):
        sig: list = [i == 0, types[i] if isinstance(types, (list, tuple)) and i < len(types) else None]
        for name, mod in layer.named_modules():
            attrs = tuple(sorted((k, v) for k, v in vars(mod).items()
                                 if not k.startswith("_") and k not in ("layer_idx", "layer_index", "training", "gradient_checkpointing") and isinstance(v, scalars)))
            sig.append((name, type(mod).__qualname__, attrs))
        sig.extend((n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in layer.named_parameters())
        sig.extend((n, tuple(b.shape), str(b.dtype)) for n, b in layer.named_buffers())
        kinds.append(tuple(sig))
    return kinds


def _contexts(kinds: list[tuple]) -> list[tuple]:
    """Each layer's kind with its neighbours' (a storage one layer makes may be freed in the next one's segment)."""
    return [(kinds[j - 1] if j else None, kinds[j], kinds[j + 1] if j + 1 < len(kinds) else None)
            for j in range(len(kinds))]


def truncated_layers(kinds: list[tuple]) -> int:
    """How many leading decoder layers a truncated trace keeps (:func:`_stitch_layers`, which plays the whole stack
    as the prefix's layers up to its third-to-last, then repeats of inner layers, then the prefix's last two): the
    shortest prefix

    * whose last three layers are of the kinds of the stack's last three (the last two play the stack's last two: what
      follows the last layer's forward and precedes its backward is the head, and a layer's output may live until the
      head runs, e.g. a bfloat16 input of the last layer),
    * in whose inner layers before those (``1 .. m - 3``) every layer of the stack played by a repeat appears at least
      twice with the same kinds before and after it (:func:`_contexts`): the repeated one is then not the first of its
      kind, whose backward frees what all layers of that kind share (rotary tables, masks made before the layers).

    Six for a uniform stack; the whole stack when it has no such shorter prefix."""
    n = len(kinds)
    ctx = _contexts(kinds)
    for m in range(6, n - 1):
        inner = _contexts(kinds[:m])[1:m - 2]
        if kinds[m - 3:m] == kinds[n - 3:] and all(inner.count(c) >= 2 for c in set(ctx[m - 2:n - 2])):
            return m
    return n


def _stitch_layers(steps: list, kinds: list[tuple], m: int) -> list | None:
    """The step of the whole model, from the step of its first ``m`` decoder layers (boundary records between
    segments: :func:`_trace_saved` with ``whole_step``).

    The traced step is a sequence of segments: ``pre`` (embeddings, masks, rotary tables), each layer's forward
    ``("f", i)``, ``mid`` (final norm, head, loss, their backward), each layer's backward ``("b", i)`` from the last
    (with checkpointing, its recomputation), ``post`` (the embeddings' backward). Within a segment the bytes live and
    the weights' gradients, relative to where the segment begins, are the layer kind's own (the same operations on
    the same shapes); what a segment leaves behind (the saved tensors of a forward, the gradients of a backward) is
    carried into the next. So the whole step is the segments re-played in the whole model's order, each from where
    the previous one ends: layer 0's own, then each later layer's from the truncated trace's last layer of its kind.
    The prefix's layers up to its third-to-last play themselves; the stack's layers after them up to its third-to-last
    are played by the prefix's last inner layer with the same kinds around it (:func:`_representatives`); the
    stack's last two by the prefix's last two (:func:`truncated_layers`: e.g. a bfloat16 layer's input is freed only
    when the next layer starts, after the last layer's forward hook). A storage a layer made and the head's segments
    free (a cache's key or value, freed with the model's output) is freed once per layer played. Exact, not
    approximate (``tests/test_memory_truncated.py`` compares it with the whole stack's trace).

    Returns:
        `list` or `None`: ``(bytes live, weights' gradient bytes, done)`` after each operation that allocates;
        ``None`` when the trace is not that sequence of segments (then the whole model is traced).
    """
    # a storage a layer made and the head's segments free (``"~"``, :func:`_trace_saved`'s ``drop``) is taken out of
    # the prefix's step (as if it stayed) and freed again below once for each layer of the whole stack
    kept, frees, held = [], [], 0
    for name, a, g, done, label in steps:
        if name == "~":
            held += a
            frees.append((len(kept), label, a))
        else:
            kept.append((name, a + held, g, done, label))
    segs: list[list] = []  # [label, live at its start, gradients at its start, [(live, gradients, done)], index]
    for name, a, g, done, label in kept:
        if name == "|":
            segs.append([label, a, g, [], len(segs)])
        elif segs:
            segs[-1][3].append((a - segs[-1][1], g - segs[-1][2], done))
        else:
            return None
    labels = [sg[0] for sg in segs]
    expected = ["pre", *[("f", i) for i in range(m)], "mid", *[("b", i) for i in reversed(range(m))]]
    if labels[:len(expected)] != expected or any(lab != "post" for lab in labels[len(expected):]):
        return None
    deltas = [(nxt[1] - sg[1], nxt[2] - sg[2]) for sg, nxt in zip(segs, segs[1:])] + [(0, 0)]
    by_label = {lab: i for i, lab in enumerate(labels) if lab != "post"}
    n = len(kinds)
    rep = _representatives(kinds, m)
    ctx = _contexts(kinds)
    source = [*range(m - 2), *(rep[ctx[j]] for j in range(m - 2, n - 2)), m - 2, m - 1]  # the prefix's layer playing each
    order = [by_label["pre"]] + [by_label[("f", source[j])] for j in range(n)] + [by_label["mid"]]
    order += [by_label[("b", source[j])] for j in reversed(range(n))]
    order += [i for i, lab in enumerate(labels) if lab == "post"]
    out, live, grads, start = [], 0, 0, {}
    for i in order:
        start.setdefault(i, len(out))  # mid and post: played once
        out.extend((live + a, grads + g, done) for a, g, done in segs[i][3])
        live, grads = live + deltas[i][0], grads + deltas[i][1]
    # the frees: at their place in the head's segment (rows of ``kept`` -> rows of ``out``), once per layer played
    row_of, rows = {}, 0
    bounds = [k for k, (name, *_) in enumerate(kept) if name == "|"]
    for k in range(len(kept) + 1):
        seg_i = sum(1 for b in bounds if b < k) - 1
        row_of[k] = (seg_i, k - bounds[seg_i] - 1 if seg_i >= 0 else 0)
    plays = {}
    for r in source:
        plays[r] = plays.get(r, 0) + 1
    less = [0] * (len(out) + 1)
    for k, (_, born), nbytes in frees:
        seg_i, within = row_of[k]
        times = plays.get(born[1], 0) if born[1] < m else 0
        if seg_i in start and times:
            less[start[seg_i] + within] += nbytes * times
    total = 0
    for idx in range(len(out)):
        total += less[idx]
        if total:
            a, g, done = out[idx]
            out[idx] = (a - total, g, done)
    return out


def _representatives(kinds: list[tuple], m: int) -> dict:
    """Each inner layer's context (:func:`_contexts`) -> the last inner layer of a prefix of ``m`` layers (among
    layers ``1 .. m - 3``) in that context: its forward follows a layer's forward of the same kind and precedes one,
    its backward likewise, as the stack's inner layer's."""
    return {c: i for i, c in enumerate(_contexts(kinds[:m])) if 0 < i < m - 2}


def _layers_parent(model: Any, layers: Any) -> tuple[Any, str]:
    """The module holding ``layers`` and the attribute it is under."""
    for mod in model.modules():
        for name, child in mod.named_children():
            if child is layers:
                return mod, name
    raise ValueError(f"the decoder layers are not a child of any module of {type(model).__name__}")


REFERENCES = ("copy", "adapter", "none")


def reference_kind(reference: str | None, fused_head: bool | str) -> str | None:
    """``reference`` as :func:`_trace_saved` takes it: ``None`` for no reference forward (``None`` / ``"none"``),
    else ``"copy"`` / ``"adapter"``, which TRL 1.16 runs with its fused head only (DPO's ``_compute_loss``).

    Raises:
        ValueError: ``reference`` is not one of :data:`REFERENCES` / ``None``, or is given without ``fused_head``."""
    if reference is not None and reference not in REFERENCES:
        raise ValueError(f"Invalid reference={reference!r}: expected one of {list(REFERENCES)} or None")
    if reference in (None, "none"):
        return None
    if not fused_head:
        raise ValueError(f"reference={reference!r} is DPO's reference forward, which runs TRL's fused head: "
                         "fused_head must be True")
    return reference


def _fake_reference(model: Any, params: set) -> Any:
    """DPO's separate reference model (``reference="copy"``: ``DPOTrainer``'s ``ref_model``, or the policy reloaded)
    for a trace of ``model``'s step: the causal LM of ``model``'s (base) config in its weights' dtype, every parameter a
    fake CPU tensor of ``model``'s fake-tensor mode (one per shape and dtype, as :func:`~lowmem.memory.estimate.
    on_fake_device` makes them; frozen, as lowmem's trainers freeze it (``trainers.trl.freeze_reference``; TRL
    does not, and autocast then cached its ``dtype`` weight copies as the policy's until the loss)), its buffers too; their storages are added to ``params`` (not counted). A quantized
    policy's stand-ins (``lowmem_kbit``) are the reference's too (TRL loads it with the same quantization)."""
    import torch
    from torch import nn

    from .estimate import _sizing_mode, build_meta_model

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ref = build_meta_model(base.config, base.get_input_embeddings().weight.dtype)
    mode = _sizing_mode(model)
    made: dict[tuple, Any] = {}
    with mode:
        for mod in ref.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    key = (tuple(p.shape), p.dtype)
                    if key not in made:
                        made[key] = torch.empty(p.shape, dtype=p.dtype)
                    mod._parameters[name] = nn.Parameter(made[key], requires_grad=False)
            for name, b in list(mod._buffers.items()):
                if b is not None and b.device.type == "meta":
                    mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    from torch.multiprocessing.reductions import StorageWeakRef

    params |= {StorageWeakRef(t.untyped_storage()) for t in [*ref.parameters(), *ref.buffers()]}
    if getattr(base, "lowmem_kbit", getattr(model, "lowmem_kbit", None)) is not None:
        ref.lowmem_kbit = getattr(base, "lowmem_kbit", None) or model.lowmem_kbit
    ref.train(model.training)
    return ref


def _reference_forward(model: Any, reference: str, ids: Any, device: str, ref: Any = None) -> Any:
    """DPO's reference forward in a trace of ``model``'s step (TRL 1.16 ``DPOTrainer._compute_loss``: after the
    policy's forward, under ``torch.no_grad()`` and the step's autocast, ``ref(..., labels=..., fused_lm_head=True)``;
    its per-token log-probabilities returned): ``"copy"`` a separate model (:func:`_fake_reference`, whole),
    ``"adapter"`` ``model`` itself with its adapters disabled (peft's ``disable_adapter``; a model without adapters:
    itself). ``ref``: the copy, made before the trace follows the storages (its parameters are no step's). Returns
    the log-probabilities (alive until the DPO loss is formed)."""
    import contextlib

    import torch

    if reference == "copy":
        ctx = contextlib.ExitStack()
        ctx.enter_context(trl_fused_head(ref, device))
        ctx.enter_context(kbit_linears(ref))
        ctx.enter_context(traced_experts(ref))
    else:
        ref = model
        ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with ctx, torch.no_grad():
        return ref(input_ids=ids, labels=ids, fused_lm_head=True).log_probs


def _traced_step_bytes(model: Any, config: Any, layers: Any, batch_size: int, seq_len: int, checkpointed: bool,
                       cache: dict, fused_head: str | bool = False, autocast: Any = None,
                       reference: str | None = None) -> dict[str, int]:
    """:func:`traced_activation_bytes` with the model's own loss: the step traced as a device runs it (forward, then
    ``loss.backward()`` with the weights' gradients, the model's own checkpointing), every live storage followed
    (:func:`_trace_saved`'s fourth item). ``total`` is the most bytes of activations live at once; ``backward_peak``
    the most bytes of activations and weight gradients live at once in the backward pass (the gradients fill as the
    activations are freed: an early layer's backward holds the later layers' gradients). A batch above 3 is
    extrapolated from the traces at 2 and 3, operation by operation.

    Only the first decoder layers are traced, enough to hold each kind of layer (:func:`layer_kinds`,
    :func:`truncated_layers`: six of a uniform stack, twenty of Gemma3-1B's 26 (five sliding and one full
    attention layers, repeated)), and the whole step is stitched from their segments (:func:`_stitch_layers`), exactly; a trace that does
    not split into those segments is done again on the whole stack."""
    from torch import nn

    kinds = layer_kinds(config, layers)
    parent, attr = _layers_parent(model, layers)

    def whole_at(b: int) -> tuple[list, int, list, int]:
        # (fused_head: the device TRL's fused head runs on, "cpu" / "cuda"; False: the model's own loss)
        key = (b, seq_len, "step", checkpointed, "fused head", fused_head) if fused_head else (b, seq_len, "step", checkpointed)
        if autocast is not None:  # (the float32 model's step under autocast: another trace)
            key = (*key, "autocast", str(autocast))
        if reference is not None:  # (DPO's reference forward inside the step: another trace)
            key = (*key, "reference", reference)
        if key not in cache:
            m = cache.get("step layers", truncated_layers(kinds))
            while True:
                sub = layers if m == len(layers) else nn.ModuleList(list(layers)[:m])
                setattr(parent, attr, sub)
                try:
                    per_layer, other, _, whole = _trace_saved(model, config, sub, b, seq_len, backward=True,
                                                              checkpointed=checkpointed, whole_step=True,
                                                              fused_head=fused_head, autocast=autocast,
                                                              reference=reference)
                finally:
                    setattr(parent, attr, layers)
                if m == len(layers) or _stitch_layers(whole["steps"], kinds, m) is not None:
                    break
                m = cache["step layers"] = len(layers)  # not the expected segments: the whole stack
            cache[key] = (per_layer, other, whole["steps"], m)
        return cache[key]

    if batch_size <= 3:
        per_layer, other, steps, m = whole_at(batch_size)
    else:  # the same operations at every batch, each one's bytes affine in it: two traces serve all, step by step
        # (at 2 and 3: at a batch of 1 attention may take another kernel, e.g. GPT-2's math path on fake CPU tensors)
        (p1, o1, t1, m1), (p2, o2, t2, m) = whole_at(2), whole_at(3)
        if m1 != m:
            raise AssertionError("the traces at batches 2 and 3 kept different numbers of layers")

        def ext(a: int, b: int) -> int:
            return a + (batch_size - 2) * (b - a)

        per_layer, other = [ext(a, b) for a, b in zip(p1, p2)], ext(o1, o2)
        # the operations matched by name and segment (in case a batch takes an operation more or less)
        matcher = difflib.SequenceMatcher(None, [(t[0], t[4]) for t in t1], [(t[0], t[4]) for t in t2], autojunk=False)
        steps = [(n, ext(t1[i + k][1], a2), g2, done, seg) for i, j, size in matcher.get_matching_blocks()
                 for k, (n, a2, g2, done, seg) in enumerate(t2[j:j + size])]
    if m < len(layers):
        stitched = _stitch_layers(steps, kinds, m)
        if stitched is None:
            raise AssertionError("the extrapolated trace lost its segments")
        rep, ctx = _representatives(kinds, m), _contexts(kinds)
        saved = sum(per_layer) + sum(per_layer[rep[c]] for c in ctx[m - 2:len(kinds) - 2])
    else:
        stitched = [(a, g, done) for n, a, g, done, _ in steps if n not in ("|", "~")]
        saved = sum(per_layer)
    # until the embeddings' backward: a tied head's moment is the estimate's own (two weight-sized tensors with every
    # gradient, ``tied_embedding_backward``), an untied embedding's gradient is the step's moment (every gradient)
    steps = [(a, g) for a, g, done in stitched if not done]
    act = max((a for a, _ in steps), default=0)
    tokens = batch_size * seq_len
    e = model.get_input_embeddings().weight.element_size()
    layer_part = tokens * len(layers) * e * config.hidden_size if checkpointed else saved
    parts = {"layers": layer_part, "other": other, "backward": max(0, act - layer_part - other), "total": act}
    parts["backward_peak"] = max((a + g for a, g in steps), default=act)
    # layerwise mode (each parameter steps in its hook once its gradient is accumulated, and frees it): the activations
    # live at the first accumulation (the output head's, right after the loss's moment) and the most live at any later
    # one (the decoder layers' gradients; with checkpointing, during a layer's recomputation)
    # (the rows where a gradient was accumulated: the weights' gradient bytes grow; the activations then, without it)
    moments = [a for (a, g), (_, before) in zip(steps[1:], steps) if g > before]
    if moments:
        parts["first_gradient_moment"] = moments[0]
        parts["gradient_moment"] = max(moments[1:], default=0)
        # each accumulation's activations and the bytes of the gradient it completed (layerwise: that parameter steps)
        parts["gradient_moments"] = [(a, g - before) for (a, g), (_, before) in zip(steps[1:], steps) if g > before]
    # what the forward saves and the loss's two gradients: the activations layerwise mode counts with a tied model's
    # steps, as before the step was traced (the trace also holds the tied head's gradient through the backward, and
    # the per-parameter transient is a bound: with both, GPT-2 layerwise adamw8bit was 1.078 of the measured peak)
    # (TRL's fused head: no logit-sized gradient; its backward's tiles counted by the trace)
    parts["forward_saved"] = act if checkpointed or fused_head else saved + other + tokens * config.vocab_size * 8
    return parts


def _trace_saved(model: Any, config: Any, layers: Any, batch_size: int, seq_len: int,
                 backward: bool = False, checkpointed: bool = False, whole_step: bool = False,
                 fused_head: str | bool = False, autocast: Any = None, reference: str | None = None) -> tuple:
    """``(bytes saved by each decoder layer, bytes saved outside them, each layer's backward peak)`` in one meta
    forward of ``model`` (and, with ``backward``, its backward down to the input embeddings).

    A layer's backward peak is the largest sum, between the gradient of its output and that of its input (tensor
    hooks), of its own saved tensors still alive and every storage alive that no forward saved: the gradients being
    formed (of its output, its intermediates, its input). A checkpointed layer's recomputation and backward hold that
    beside the checkpoints (Llama: the MLP's gate and up gradients, ``2 e i`` per token, in
    :func:`llama_activation_bytes`). The weights' gradients are not formed (``torch.autograd.grad`` to the embeddings'
    output): they are counted with the gradients. Without ``backward``: the saved bytes per layer.

    With ``backward`` the fourth item (with ``whole_step``; the third is then not computed) is the whole step as a
    device runs it (``loss.backward()``, the weights'
    gradients formed and accumulated; with ``checkpointed`` the model's own non-reentrant per-layer checkpointing):
    ``{"steps": [(the operation's name, bytes live that are neither weights nor gradients, bytes of the weights'
    gradients, whether the decoder layers' backward is over) after each operation that allocates, forward and
    backward, and after each weight's gradient is accumulated (``"accumulate"``)]}``. It counts what the formulas miss: the weight gradient a
    linear layer's backward forms before it is accumulated, the tensors saved outside the layers and still live,
    and the gradients already formed when an early layer's backward runs (the step's peak for small activations).
    With ``checkpointed`` the first three items are not meaningful (the checkpoints replace the saved tensors). With
    ``fused_head`` (the device it runs on, ``"cpu"`` / ``"cuda"``; ``True``: ``"cpu"``) the loss is TRL's fused LM
    head's (:func:`trl_fused_head`) instead of the model's own. With ``autocast`` (a dtype) the forward and its loss
    run under ``torch.autocast("cpu", autocast)``, the backward outside it (the Trainer's mixed precision). With
    ``reference`` (``"copy"`` / ``"adapter"``) DPO's reference forward runs between the forward and the backward
    (:func:`_reference_forward`), inside the ``mid`` segment (played once: a separate reference is whole, never
    truncated; the policy's own layers' segment marks are not set again)."""
    import contextlib

    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    from .estimate import _sizing_mode, on_fake_device

    # fake CPU tensors, not meta ones: on meta, scaled_dot_product_attention decomposes into its math path (the s x s
    # scores saved); on a device it runs a flash kernel (its output and log-sum-exp saved), as in training
    if any(p.device.type == "meta" for p in model.parameters()):
        on_fake_device(model, "cpu")
        for mod in model.modules():  # meta buffers (rotary tables, position ids): fake CPU ones of the same mode
            for name, b in list(mod._buffers.items()):
                if b is not None and b.device.type == "meta":
                    with _sizing_mode(model):
                        mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    mode = _sizing_mode(model)
    params = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
    params |= {StorageWeakRef(b.untyped_storage()) for b in model.buffers()}
    owner: dict[Any, tuple[int, int]] = {}  # storage -> (layer index or -1, bytes)
    current = [-1]

    def pack(t):
        if t.device.type != "meta":  # every tensor of the trace is a fake CPU one
            key = StorageWeakRef(t.untyped_storage())
            if key not in params and key not in owner:
                owner[key] = (current[0], t.untyped_storage().nbytes())
        return t

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, -1)))
    if whole_step:  # the step's segments (:func:`_stitch_layers`): before the layers, each layer's forward, ...
        last = len(layers) - 1
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(
                lambda m, a, i=i: None if in_backward[0] or in_reference[0] else mark(("f", i))))
            if i == last:
                hooks.append(layer.register_forward_hook(
                    lambda m, a, o: None if in_backward[0] or in_reference[0] else mark("mid")))
    was_training = model.training
    model.train()
    autocast_cls = torch.autocast
    # peft's LoRA on 3-D expert weights (ParamWrapper) opens torch.autocast(device_type=<the weight's device>,
    # enabled=False); torch refuses device_type "meta" (RuntimeError). On meta it would change nothing: no autocast
    torch.autocast = lambda device_type, *a, **k: contextlib.nullcontext() if device_type == "meta" else autocast_cls(device_type, *a, **k)
    live: dict[Any, int] = {}  # every storage the ops return (backward pass), weakly
    alive: dict[Any, int] = {}  # every storage the ops return (forward and backward), weakly
    grads: dict[Any, int] = {}  # the weights' accumulated gradients
    window = [-1]  # the layer whose backward runs
    peaks = [0] * len(layers)
    by_layer: list[list] = [[] for _ in layers]  # each layer's saved storages
    whole: dict[str, list] = {"steps": []}
    in_backward = [False]
    in_reference = [False]  # (DPO's reference forward runs: the policy's layers' hooks set no segment)
    tail = [False]  # the embeddings' backward (a tied head's two gradients summed): after the decoder layers'
    not_live: set = set()

    act, grad_bytes = [0], [0]  # bytes in ``alive`` (not gradients), in ``grads``
    alive_keys: dict[Any, Any] = {}  # each key of ``alive`` itself (its storage may have died)

    def drop(key) -> None:
        """A storage of ``alive`` was freed. After the layers' forward (``mid``, ``post``), one that a decoder layer
        made (e.g. a cache's key or value, freed with the model's output) is recorded, ``("~", bytes, 0, done,
        (segment, the layer's segment))``: :func:`_stitch_layers` frees it once per layer of the whole stack."""
        n = alive.pop(key)
        act[0] -= n
        del alive_keys[key]
        origin = born.pop(key, "pre")
        if segment[0] in ("mid", "post") and isinstance(origin, tuple):
            whole["steps"].append(("~", n, 0, tail[0], (segment[0], origin)))

    def mark(label) -> None:
        """A segment of the step begins (``whole_step``): the bytes live now, the freed storages taken out (a
        boundary record, named ``"|"``, then the segment's operations carry its label)."""
        for key in [key for key in alive_keys.values() if key.expired()]:
            drop(key)
        whole["steps"].append(("|", act[0], grad_bytes[0], tail[0], label))
        segment[0] = label

    segment = ["pre"]
    born: dict[Any, Any] = {}  # the segment each storage of ``alive`` was made in
    if whole_step:
        whole["steps"].append(("|", 0, 0, False, "pre"))

    class _Live(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            added = False
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor):
                    key = StorageWeakRef(o.untyped_storage())
                    if key not in params:
                        if whole_step and key in alive and alive_keys[key].expired():  # a freed storage's address reused
                            drop(key)
                        if whole_step and key not in alive and key not in grads:
                            alive[key], alive_keys[key] = o.untyped_storage().nbytes(), key
                            born[key] = segment[0]
                            act[0] += alive[key]
                            added = True
                        if in_backward[0] and key not in not_live:
                            live.setdefault(key, o.untyped_storage().nbytes())
            if added:  # the live bytes only grow when an operation allocates: the peaks are after those
                for key in [key for key in alive_keys.values() if key.expired()]:
                    drop(key)
                whole["steps"].append((func.__name__, act[0], grad_bytes[0], tail[0], segment[0]))
            k = window[0]
            if in_backward[0] and not whole_step and k >= 0:
                for key in [key for key in live if key.expired()]:
                    del live[key]
                mine = sum(n for key, n in by_layer[k] if not key.expired())
                unsaved = sum(n for key, n in live.items() if key not in owner and key not in grads)
                peaks[k] = max(peaks[k], mine + unsaved)
            return out

    def accumulated(p):
        key = StorageWeakRef(p.grad.untyped_storage())
        if key not in grads:
            grads[key] = p.grad.untyped_storage().nbytes()
            grad_bytes[0] += grads[key]
            act[0] -= alive.pop(key, 0)
            alive_keys.pop(key, None)
            born.pop(key, None)
            if whole_step:  # the moment a weight's gradient is complete (layerwise mode steps it here)
                for k in [k for k in alive_keys.values() if k.expired()]:
                    drop(k)
                whole["steps"].append(("accumulate", act[0], grad_bytes[0], tail[0], segment[0]))

    embedded = []

    def settle_embedded() -> None:
        """The embeddings' output is kept in ``embedded`` only (a scaled copy enters the layers, e.g. Gemma's): not
        one of the backward's storages; and not held for the whole step (live as long as a layer keeps it)."""
        if not embedded:
            return
        not_live.add(StorageWeakRef(embedded[0].untyped_storage()))
        if embedded[0].requires_grad:
            def tail_hook(grad):
                tail[0] = True
                if whole_step:
                    mark("post")

            embedded[0].register_hook(tail_hook)
        embedded.clear()

    if backward:
        def enter(i):
            def hook(grad):
                window[0] = i
                if whole_step:
                    mark(("b", i))
            return hook

        def leave(i):
            return lambda grad: window.__setitem__(0, -1 if window[0] == i else window[0])

        def first(x):
            return x[0] if isinstance(x, (tuple, list)) else x

        for i, layer in enumerate(layers):
            def on_input(m, a, kw, i=i):
                x = a[0] if a else kw.get("hidden_states")
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    x.register_hook(leave(i))

            def on_output(m, a, o, i=i):
                if isinstance(first(o), torch.Tensor) and first(o).requires_grad:
                    first(o).register_hook(enter(i))

            hooks.append(layer.register_forward_pre_hook(on_input, with_kwargs=True))
            hooks.append(layer.register_forward_hook(on_output))
        # (not the reference forward's through the policy itself: kept here, its output would outlive its first layer)
        hooks.append(model.get_input_embeddings().register_forward_hook(
            lambda m, a, o: None if in_reference[0] else embedded.append(o)))
        trainable = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
        hooks.extend(p.register_post_accumulate_grad_hook(accumulated) for p in trainable)
        if checkpointed:
            from ..quant import enable_activation_checkpointing

            enable_activation_checkpointing(model)
    # (DPO's separate reference, made before the storages are followed: its parameters are excluded like the policy's)
    ref_model = _fake_reference(model, params) if reference == "copy" else None
    try:
        head = (trl_fused_head(model, "cpu" if fused_head is True else fused_head) if fused_head
                else contextlib.nullcontext())
        with mode, traced_experts(model), unpacked_positions(), kbit_linears(model), head, (_Live() if backward else contextlib.nullcontext()):
            ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
            with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
                  autocast_cls("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()):
                loss = model(input_ids=ids, labels=ids, **({"fused_lm_head": True} if fused_head else {})).loss
                if reference is not None:
                    if backward:  # (the trace lets go of the policy's embeddings' output before the reference runs)
                        settle_embedded()
                    in_reference[0] = True
                    try:
                        ref_out = _reference_forward(model, reference, ids, "cpu" if fused_head is True else fused_head,
                                                     ref_model)
                    finally:
                        in_reference[0] = False
                    loss = loss + 0 * ref_out.sum()  # (the DPO loss reads both; its log-probs freed with the loss's inputs)
                    del ref_out
            if backward:
                settle_embedded()
                for key, (i, n) in owner.items():
                    if i >= 0:
                        by_layer[i].append((key, n))
                in_backward[0] = True
                loss.backward()
            del loss
    except Exception as exc:  # noqa: BLE001  (what the model's code raised on fake tensors, re-raised with its name)
        raise ValueError(f"activations of model_type={getattr(config, 'model_type', None)!r} cannot be traced on fake "
                         f"tensors ({type(exc).__name__}: {exc}); its memory cannot be estimated") from exc
    finally:
        torch.autocast = autocast_cls
        for h in hooks:
            h.remove()
        if backward:
            for p in model.parameters():
                p.grad = None
            if checkpointed:
                (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.train(was_training)
    per_layer = [0] * len(layers)
    other = 0
    for idx, nbytes in owner.values():
        if idx < 0:
            other += nbytes
        else:
            per_layer[idx] += nbytes
    if not backward:
        return per_layer, other
    return per_layer, other, [max(p, q) for p, q in zip(peaks, per_layer)], whole
