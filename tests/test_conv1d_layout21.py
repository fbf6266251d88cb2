"""LEFT21 1: transformers' Conv1D weights (GPT-2 family, stored ``[in, out]``, the transpose of nn.Linear's ``[out, in]``)
under the three rules that depend on which side is the output: Muon's ``adjust_lr_fn="original"`` ratio
``sqrt(max(1, out / in))``, NorMuon's per-output-neuron second moment (Li et al. 2025, Algorithm 1) and SCALE's
per-output-unit normalization (Glentis et al. 2025). ``create_optimizer(model, ...)`` puts the Conv1D weights in a
group of their own with ``weight_layout="in_out"`` (:data:`lowmem.optim.registry.LAYOUT_AWARE`), and the rules read
it: a Conv1D layer steps as the nn.Linear layer holding the transposed weights and gradients would, transposed.
Until this change the three were refused on such weights (AUDQLORA19 2, tests/test_fixmodels19_conv1d.py).

Measured (3 steps, lr 0.1, 16 -> 48 and 48 -> 16 layers): bit for bit for muon (both ratios) and normuon, float32 and
bfloat16 weights, in every path (the foreach buckets, the per-parameter lean step in one block and in blocks of 64
elements, the whole-tensor step); scale equal to float rounding in float32 (at most 2.4e-7 on steps of 0.53: the
Conv1D weight's columns' RMS is summed over blocks of rows, the nn.Linear weight's rows' is one reduction) and bit for
bit in bfloat16 (the rounding to bfloat16 absorbs it).

Mutations: see the commit message (LEFT21 1)."""

import warnings

import pytest
import torch
from torch import nn

import lowmem

pytest.importorskip("transformers")


class _OneLayer(nn.Module):
    """Embedding -> one ``i -> o`` projection (nn.Linear ``[o, i]`` or transformers' Conv1D ``[i, o]``) -> head."""

    def __init__(self, conv: bool, i: int, o: int, dtype: torch.dtype):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = nn.Embedding(10, i)
        self.fc = Conv1D(o, i) if conv else nn.Linear(i, o, bias=False)
        if conv:
            self.fc.bias.requires_grad_(False)
        self.head = nn.Linear(o, 10, bias=False)
        self.to(dtype)

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return self.head


#: (foreach, chunk_numel): the multi-tensor buckets; the per-parameter lean step in one block; in blocks of 64 elements
#: (several blocks of rows); the whole-tensor step
PATHS = [(True, "default"), (False, "default"), (False, 64), (False, None)]
RULES = [("muon", {"adjust_lr_fn": "original"}), ("muon", {}), ("normuon", {}), ("normuon", {"update_scale": "preserve_norm"}),
         ("scale", {})]


def _update(name, conv, kw, shape, dtype, path, steps=3, groups=None):
    """The update of ``fc`` after ``steps`` steps from the same weights and gradients (``[out, in]``; the Conv1D
    layer holds their transposes), returned ``[out, in]`` in float32. ``groups``: build the optimizer from these
    parameter groups (a function of the model) instead of the model."""
    o, i = shape
    torch.manual_seed(0)
    w = torch.randn(o, i).to(dtype)
    gs = [torch.randn(o, i).to(dtype) for _ in range(steps)]
    m = _OneLayer(conv, i, o, dtype)
    with torch.no_grad():
        m.fc.weight.copy_(w.t() if conv else w)
    opt = lowmem.create_optimizer(m if groups is None else groups(m), name, lr=0.1, foreach=path[0], **kw)
    if path[1] != "default":
        opt.chunk_numel = path[1]
    for g in gs:
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        m.fc.weight.grad = (g.t() if conv else g).clone()
        opt.step()
    d = m.fc.weight.detach().float() - (w.t() if conv else w).float()
    return (d.t() if conv else d), opt


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"foreach={p[0]}-chunk={p[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(48, 16), (16, 48)], ids=lambda s: f"{s[1]}to{s[0]}")
@pytest.mark.parametrize("name, kw", RULES, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
def test_conv1d_steps_as_the_transposed_linear(name, kw, shape, dtype, path):
    a, opt = _update(name, True, kw, shape, dtype, path)
    b, _ = _update(name, False, kw, shape, dtype, path)
    assert b.abs().max() > 0.1
    if name == "scale" and dtype == torch.float32:  # (the columns' RMS summed over blocks of rows: float rounding)
        assert (a - b).abs().max() <= 4e-7
    else:
        assert torch.equal(a, b), float((a - b).abs().max())
    layouts = {g.get("weight_layout") for g in opt.param_groups if any(p.dim() == 2 for p in g["params"])}
    assert "in_out" in layouts


@pytest.mark.parametrize("name, kw", RULES[:1] + RULES[2:], ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
def test_the_layout_matters(name, kw):
    """Without the group's weight_layout (parameter groups as before, the Conv1D weight read as [out, in]) the
    rules step it per input feature: measured 0.03 .. 0.19 apart on steps of 0.16 .. 0.54, so the equality above is
    the layout's doing."""
    def plain(m):
        return [{"params": [m.fc.weight]}, {"params": [m.emb.weight, m.head.weight], **(
            {"use_muon": False} if name != "scale" else {})}]
    a, _ = _update(name, True, kw, (48, 16), torch.float32, (False, "default"), groups=plain)
    b, _ = _update(name, False, kw, (48, 16), torch.float32, (False, "default"))
    assert float((a - b).abs().max() / b.abs().max()) > 0.05


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=2))


@pytest.mark.parametrize("name, kw", [("muon", {"adjust_lr_fn": "original", "lr": 0.02}), ("muon", {"lr": 1e-2}),
                                      ("normuon", {"lr": 1e-2}), ("scale", {"lr": 1e-2})],
                         ids=["muon-original", "muon", "normuon", "scale"])
def test_gpt2_trains(name, kw):
    """A tiny GPT-2 (2 layers, 32 wide) fits one batch: 8 steps lower its loss by more than a quarter (measured
    3.70 -> 1.69 muon original, 2.34 muon, 2.34 normuon, 2.53 scale), every Conv1D weight (attn.c_attn, attn.c_proj,
    mlp.c_fc, mlp.c_proj of 2 layers: 8) in the in_out group."""
    from lowmem.optim.registry import conv1d_weights

    model = _gpt2()
    opt = lowmem.create_optimizer(model, name, **kw)
    conv = conv1d_weights(model)
    in_out = [p for g in opt.param_groups if g.get("weight_layout") == "in_out" for p in g["params"]]
    assert len(in_out) == len(conv) == 8 and all(id(p) in conv for p in in_out)
    ids = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.75 * losses[0], losses


def test_weight_layout_is_refused_where_it_cannot_apply():
    from transformers.pytorch_utils import Conv1D

    model = _gpt2()
    with pytest.raises(ValueError, match="weight_layout is set per layer"):
        lowmem.create_optimizer(model, "normuon", weight_layout="in_out")
    with pytest.raises(ValueError, match=r"weight_layout.*one of \['out_in', 'in_out'\]"):
        lowmem.create_optimizer([{"params": [nn.Parameter(torch.randn(4, 8))], "weight_layout": "transposed"}], "muon")
    experts = nn.Parameter(torch.randn(2, 4, 8))
    opt = lowmem.create_optimizer([{"params": [experts], "use_muon": True, "weight_layout": "in_out"}], "muon")
    experts.grad = torch.randn_like(experts)
    with pytest.raises(ValueError, match=r"applies to 2-D weights.*\[2, 4, 8\]"):
        opt.step()
    head = Conv1D(8, 4)
    opt = lowmem.create_optimizer([{"params": [head.weight], "scale_role": "head", "weight_layout": "in_out"}], "scale")
    head.weight.grad = torch.randn_like(head.weight)
    with pytest.raises(ValueError, match="scale_role='hidden'"):
        opt.step()


def test_state_is_per_output_neuron_and_round_trips(tmp_path):
    """NorMuon's second moment of a Conv1D weight [in, out] has one number per output neuron (out); a checkpoint of
    the GPT-2 optimizer loads back into a fresh one and steps the same."""
    model = _gpt2()
    opt = lowmem.create_optimizer(model, "normuon", lr=1e-2)
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    w = model.transformer.h[0].mlp.c_fc.weight  # [32, 128]: in 32, out 128
    assert opt.state[w]["second_momentum_buffer"].shape == (128,)
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    opt2 = lowmem.create_optimizer(model, "normuon", lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    assert torch.equal(opt2.state[w]["second_momentum_buffer"], opt.state[w]["second_momentum_buffer"])


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"foreach={p[0]}-chunk={p[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name, kw", RULES[:1] + RULES[2:4], ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
def test_step_transient_of_a_conv1d_weight(name, kw, dtype, path):
    """step_transient_bytes() against the traced peak of a step of a 256 x 64 Conv1D weight ([in, out] = [64, 256])
    in its in_out group: SCALE's exactly (the column normalization, as the embedding role's; measured 3,072 B at
    chunks of 256 elements, 66,560 B whole, float32), Muon's and NorMuon's a bound by the products' workspace (3 MiB a
    CPU thread) over the traced 73,728 .. 278,528 B, as for the nn.Linear twin."""
    from test_nonfinite_check_bytes import _AllLive

    m = _OneLayer(True, 64, 256, dtype)
    key = "scale_role" if name == "scale" else "use_muon"
    opt = lowmem.create_optimizer([{"params": [m.fc.weight], key: "hidden" if name == "scale" else True,
                                    "weight_layout": "in_out"}], name, lr=0.1, foreach=path[0], **kw)
    if path[1] != "default":
        opt.chunk_numel = 256 if path[1] == 64 else path[1]
    g = torch.randn(m.fc.weight.shape).to(dtype)
    m.fc.weight.grad = g.clone()
    opt.step()
    m.fc.weight.grad = g.clone()
    with _AllLive() as t:
        opt.step()
    if name == "scale":
        assert t.peak == opt.step_transient_bytes()
    else:
        assert t.peak <= opt.step_transient_bytes()


def test_a_muon_checkpoint_saved_before_loads():
    """A GPT-2 Muon checkpoint from before LEFT21 1 (the same groups, the targeted one without weight_layout) loads,
    and the group keeps 'in_out'."""
    model = _gpt2()
    opt = lowmem.create_optimizer(model, "muon", lr=1e-3)
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g.pop("weight_layout", None)
    opt2 = lowmem.create_optimizer(model, "muon", lr=1e-3)
    opt2.load_state_dict(sd)
    assert [g.get("weight_layout") for g in opt2.param_groups].count("in_out") == 1
