"""Adam-mini (Zhang et al. 2024): parity with the adam-mini 1.1.1 package on Llama and Qwen2 models built
from configs, the partition create_optimizer builds from a model, its state size, flat parameter lists,
explicit groups, the chunked step and the Trainer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lowmem.optim import create_optimizer
from lowmem.optim.recipes.adam_mini import AdamMini, adam_mini_groups, partition_block

# ---- parity with the adam-mini package ------------------------------------------------------------

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
STEPS = 6


def _model(kind: str) -> nn.Module:
    """Tiny float32 models with grouped-query attention (4 query heads, 2 key / value heads of 8 rows):
    Llama (untied head, no biases) and Qwen2 (biases on q / k / v, head tied to the embedding)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    sizes = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**sizes, tie_word_embeddings=False))
    return Qwen2ForCausalLM(Qwen2Config(**sizes, tie_word_embeddings=True))


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (2, 12), generator=g) for _ in range(STEPS)]


def _package(model: nn.Module) -> torch.optim.Optimizer:
    from adam_mini import Adam_mini  # on CPU it needs no torch.distributed (it counts CUDA devices: 0)

    return Adam_mini(model.named_parameters(), dim=32, n_heads=4, n_kv_heads=2, verbose=False, **HP)


OURS = {
    "create_optimizer": lambda m: create_optimizer(m, "adam_mini", **HP),
    "create_optimizer_whole": lambda m: create_optimizer(m, "adam_mini", **HP),
    "create_optimizer_chunked": lambda m: create_optimizer(m, "adam_mini", **HP),
    "AdamMini": lambda m: AdamMini(m.named_parameters(), dim=32, n_heads=4, n_kv_heads=2, verbose=False, **HP),
}
CHUNK = {"create_optimizer_whole": None, "create_optimizer_chunked": 40}  # 40: norms in pieces, whole rows / heads


def _ours(label: str, model: nn.Module) -> torch.optim.Optimizer:
    opt = OURS[label](model)
    if label in CHUNK:
        opt.chunk_numel = CHUNK[label]
    return opt


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("label", sorted(OURS))
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_same_gradients_same_step_as_the_package(kind, label):
    """Both optimizers step from the same gradients (the package's model's, copied): after every step
    every parameter agrees to float32 rounding (max abs diff measured: 6e-8, one float32 ulp of the norm
    weights near 1), for every block kind: per-head q / k (two key heads of grouped-query attention),
    per-row embedding / head / v / o / MLP, per-tensor norms, per-element Qwen2 biases, a tied head."""
    base = _model(kind)
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    opt_t, opt_o = _package(theirs), _ours(label, ours)
    start = [p.detach().clone() for p in base.parameters()]
    worst = 0.0
    for ids in _batches():
        opt_t.zero_grad(set_to_none=True)
        _loss(theirs, ids).backward()
        for pt, po in zip(theirs.parameters(), ours.parameters()):
            po.grad = pt.grad.clone()
        opt_t.step()
        opt_o.step()
        for (name, pt), po in zip(theirs.named_parameters(), ours.parameters()):
            torch.testing.assert_close(po, pt, rtol=0, atol=3e-7, msg=lambda m: f"{kind} {label} {name}: {m}")
            worst = max(worst, (po - pt).abs().max().item())
    moved = max((p - s).abs().max().item() for p, s in zip(theirs.parameters(), start))
    assert moved > 0.05  # a real trajectory (lr 1e-2), not a comparison of two near-still models
    assert worst <= 2.4e-7, worst  # two float32 ulps at 1.0


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_trajectory_matches_the_package(kind):
    """Each optimizer trains its own copy on the same batches (six steps): the losses agree to 5e-6 and
    the weights to 5e-5 (measured: losses 0 / 4.8e-7, weights 1.2e-7 on Llama, 5.5e-6 on Qwen2, all but
    2.4e-7 of it in the k_proj biases, whose per-element Adam steps amplify the rounding differences of
    their small gradients; with shared gradients the steps agree to 6e-8, above)."""
    base = _model(kind)
    runs = {}
    for label, make in (("package", _package), ("ours", OURS["create_optimizer"])):
        model = copy.deepcopy(base)
        opt = make(model)
        losses = []
        for ids in _batches():
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, ids)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[label] = (model, losses)
    (theirs, lt), (ours, lo) = runs["package"], runs["ours"]
    assert max((p - q).abs().max().item() for p, q in zip(theirs.parameters(), base.parameters())) > 0.05
    torch.testing.assert_close(torch.tensor(lo), torch.tensor(lt), rtol=0, atol=5e-6)
    diffs = {n: (po - pt).abs().max().item() for (n, pt), po in zip(theirs.named_parameters(), ours.parameters())}
    assert max(diffs.values()) <= 5e-5, sorted(diffs.items(), key=lambda kv: kv[1])[-3:]
    assert max(v for n, v in diffs.items() if "k_proj.bias" not in n) <= 2e-6


# ---- the partition -------------------------------------------------------------------------------


def test_partition_of_a_qwen2_model_and_its_state():
    """Blocks per parameter as the paper / adam-mini partition them, one float per block in the state,
    state_bytes() exact: 4 bytes per parameter (first moment) + 4 per block + the step counters."""
    model = _model("qwen2")
    opt = create_optimizer(model, "adam_mini", weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: g for g in opt.param_groups for p in g["params"]}
    assert len(by_name) == len(names)  # every trainable parameter once (the tied head is the embedding)
    blocks = {n: g["block"] for n, g in by_name.items()}
    assert blocks["model.embed_tokens.weight"] == "row"
    layer = "model.layers.0."
    assert {blocks[layer + f"self_attn.{k}_proj.weight"] for k in "qk"} == {"head"}
    assert {blocks[layer + f"self_attn.{k}_proj.bias"] for k in "qkv"} == {"element"}
    assert {blocks[layer + k] for k in ("self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
                                        "mlp.up_proj.weight", "mlp.down_proj.weight")} == {"row"}
    assert {blocks[n] for n in names.values() if "norm" in n} == {"tensor"}
    assert all(g["head_dim"] == 8 for g in opt.param_groups if g["block"] == "head")
    assert {n for n, g in by_name.items() if g["weight_decay"] == 0.0} == {n for n in names.values() if "norm" in n or "bias" in n}
    opt.materialize_state()
    expected_blocks = {"model.embed_tokens.weight": 96, layer + "self_attn.q_proj.weight": 4, layer + "self_attn.k_proj.weight": 2,
                       layer + "self_attn.v_proj.weight": 16, layer + "self_attn.o_proj.weight": 32,
                       layer + "mlp.gate_proj.weight": 48, layer + "mlp.down_proj.weight": 32,
                       layer + "input_layernorm.weight": 1, layer + "self_attn.q_proj.bias": 32}
    params = dict(model.named_parameters())
    for n, nb in expected_blocks.items():
        st = opt.state[params[n]]
        assert st["exp_avg_sq"].shape == (nb,), n
        assert st["exp_avg"].shape == params[n].shape
    total = sum(p.numel() for p in params.values())
    blocks_total = sum(opt.state[p]["exp_avg_sq"].numel() for p in params.values())
    assert opt.state_bytes() == 4 * total + 4 * blocks_total + 4 * len(params)
    assert blocks_total < 0.1 * total


def test_bytes_per_parameter_of_a_llama_7b_layer():
    """One decoder layer of Llama-2-7B (meta device): 4.0007 bytes/param (AdamW: 8): 4 for the first
    moment, 4 per block (34 370 blocks for 202M parameters)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, layer_idx=0)
    opt = create_optimizer(layer, "adam_mini", head_dim=128)
    opt.materialize_state()
    params = list(layer.parameters())
    numel = sum(p.numel() for p in params)
    per_param = (opt.state_bytes() - 4 * len(params)) / numel  # the step counters aside
    # blocks: q, k 32 heads each; v, o 4096 rows; gate, up 11008; down 4096; two norms 1 each
    assert per_param == pytest.approx(4 + 4 * (2 * 32 + 3 * 4096 + 2 * 11008 + 2) / numel, rel=1e-12)
    assert per_param < 4.001


@pytest.mark.parametrize("name,shape,expected", [
    ("model.layers.3.self_attn.q_proj.weight", (32, 16), "head"),
    ("h.0.attn.key.weight", (16, 16), "head"),
    ("base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight", (4, 16), "row"),  # 4 rows, head_dim 8
    ("base_model.model.layers.0.self_attn.q_proj.lora_B.default.weight", (32, 4), "head"),
    ("model.layers.0.self_attn.q_proj.bias", (32,), "element"),
    ("model.layers.0.self_attn.q_norm.weight", (8,), "tensor"),
    ("transformer.wte.weight", (50, 16), "row"),
    ("model.layers.0.mlp.experts.down_proj", (4, 16, 32), "row"),  # one block per output neuron of each expert
    ("model.norm.weight", (16,), "tensor"),
    ("fc1.weight", (16, 16), "tensor"),  # no name adam-mini knows: one block
])
def test_partition_block_rules(name, shape, expected):
    assert partition_block(name, shape, head_dim=8) == expected


def test_flat_parameters_are_one_block_per_tensor_and_groups_choose():
    a, b, c = nn.Parameter(torch.randn(12, 5)), nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(8, 3))
    opt = create_optimizer([a, b], "adam_mini")
    opt.materialize_state()
    assert [opt.state[p]["exp_avg_sq"].numel() for p in (a, b)] == [1, 1]
    opt = create_optimizer([{"params": [a], "block": "row"}, {"params": [c], "block": "head", "head_dim": 4},
                            {"params": [b], "block": "element"}], "adam_mini")
    opt.materialize_state()
    assert [opt.state[p]["exp_avg_sq"].numel() for p in (a, c, b)] == [12, 2, 7]
    with pytest.raises(ValueError, match="head_dim"):
        create_optimizer([{"params": [a], "block": "head"}], "adam_mini")
    with pytest.raises(ValueError, match=r"shape\[-2\]"):
        create_optimizer([{"params": [a], "block": "head", "head_dim": 5}], "adam_mini")  # 12 rows
    with pytest.raises(ValueError, match=r"shape\[-2\]"):
        create_optimizer([{"params": [b], "block": "head", "head_dim": 1}], "adam_mini")  # a vector
    with pytest.raises(ValueError, match="block"):
        create_optimizer([{"params": [a], "block": "column"}], "adam_mini")


def test_model_errors_and_warnings():
    model = _model("llama")
    with pytest.raises(ValueError, match="block='row'.*parameter groups"):
        create_optimizer(model, "adam_mini", block="row")
    layer = model.model.layers[0]  # no config: the head size must be given
    with pytest.raises(ValueError, match="head_dim"):
        create_optimizer(layer, "adam_mini")
    opt = create_optimizer(layer, "adam_mini", head_dim=4)  # 32 query rows, 16 key rows: 8 and 4 heads
    opt.materialize_state()
    assert opt.state[layer.self_attn.k_proj.weight]["exp_avg_sq"].numel() == 4
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.warns(UserWarning, match="no query / key projection"):  # GPT-2's fused c_attn: not per head
        create_optimizer(gpt2, "adam_mini")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_optimizer(nn.Sequential(nn.Linear(4, 4)), "adam_mini")  # not a Transformer: no warning


def test_adam_mini_constructor_checks():
    model = _model("llama")
    with pytest.raises(ValueError, match="n_heads"):
        AdamMini(model.named_parameters(), dim=30, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        AdamMini(model.named_parameters(), dim=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="named_parameters"):
        AdamMini(model.parameters(), dim=32, n_heads=4)
    opt = AdamMini(model.named_parameters(), dim=32, n_heads=4, weight_decay=0.1, verbose=False)
    # adam-mini's decay rule: none on names with norm / ln / bias
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.1]


# ---- the chunked step --------------------------------------------------------------------------------


@pytest.mark.parametrize("hp", [{}, {"block": "row"}, {"block": "head", "head_dim": 4}, {"block": "element"},
                                {"block": "row", "state_dtype": "bfloat16"}], ids=str)
def test_chunked_step_equals_whole_tensor_step(hp):
    """36 x 29 in chunks of ~128 elements (whole rows / heads; a whole-tensor block reduced over the
    chunks first): equal to the unchunked step (bit for bit but for the reduction order of a
    whole-tensor block)."""
    results = []
    for chunk in (None, 128):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(36, 29))
        opt = create_optimizer([p], "adam_mini", weight_decay=0.1, **hp)
        opt.chunk_numel = chunk
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            p.grad = torch.randn(36, 29, generator=gen)
            opt.step()
        if chunk is not None:
            assert len(opt._chunk_bounds(p, opt.param_groups[0], opt.state[p])) > 1
        results.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    (pw, sw), (pc, sc) = results
    if hp.get("block", "tensor") == "tensor":
        torch.testing.assert_close(pc, pw, rtol=1e-6, atol=1e-7)
        for k in sw:
            torch.testing.assert_close(sc[k], sw[k], rtol=1e-5, atol=1e-8)
        return
    assert torch.equal(pc, pw)
    assert all(torch.equal(sc[k], sw[k]) for k in sw)


# ---- the Trainer and the CLI --------------------------------------------------------------------------


def test_lowmem_trainer_builds_the_partition(tmp_path, tokenizer):
    from transformers import default_data_collator

    from lowmem.kit import build_tiny_model, sft_dataset, tokenize_sft
    from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments

    model, _ = build_tiny_model(0)
    data = tokenize_sft(sft_dataset(16, seed=0), tokenizer)
    args = LowMemTrainingArguments(tmp_path, lowmem_optim="adam_mini", learning_rate=2e-3, weight_decay=0.1, max_steps=2,
                                   report_to="none", use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False,
                                   save_strategy="no")
    trainer = LowMemTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    trainer.train()
    opt = trainer.optimizer.optimizer
    head = [g for g in opt.param_groups if g["block"] == "head"]
    assert head and all(g["head_dim"] == 16 for g in head)  # 64 hidden / 4 heads, from the config
    assert {g["block"] for g in opt.param_groups} == {"head", "row", "tensor"}
    assert all(g["initial_lr"] == 2e-3 for g in opt.param_groups)
    assert opt.state[model.model.layers[0].self_attn.q_proj.weight]["exp_avg_sq"].numel() == 4


def test_lowmem_list_shows_adam_mini(capsys):
    from lowmem.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if "adam_mini" in row)
    assert "4 " in line or "4.0" in line or "│ 4 " in line


def test_groups_are_the_builders(tmp_path):
    """adam_mini_groups is what create_optimizer uses; the groups carry only valid keys."""
    model = _model("llama")
    groups = adam_mini_groups(model, weight_decay=0.1)
    opt = create_optimizer(model, "adam_mini", weight_decay=0.1)
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in g["params"]] for g in opt.param_groups]
