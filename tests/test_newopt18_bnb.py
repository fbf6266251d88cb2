"""transformers' rmsprop_bnb* / paged_ademamix* names (bitsandbytes entries of lowmem/optim/recipes/bnb.py) and the
names lowmem refuses (lowmem/train.py HF_OPTIM_REFUSED): what a config written for the Hugging Face Trainer gets."""

from __future__ import annotations

import copy

import pytest
import torch

from lowmem.config import ConfigError
from lowmem.train import HF_OPTIM_NAMES, HF_OPTIM_REFUSED, resolve_optim_name

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("name", sorted(HF_OPTIM_REFUSED))
def test_unmapped_names_are_refused_naming_the_field_why_and_the_mapped_names(name, tmp_path):
    with pytest.raises(ConfigError, match=rf"^optim='{name}' is a Hugging Face optimizer name lowmem does not map: "
                                          r".*(package|device|NPU).*Hugging Face names lowmem maps: \[.*'rmsprop_bnb_8bit'"):
        resolve_optim_name(name)
    from lowmem.trainers.hf import LowMemTrainingArguments

    with pytest.raises(ValueError, match=rf"^LowMemTrainingArguments\.lowmem_optim='{name}' is a Hugging Face"):
        LowMemTrainingArguments(str(tmp_path), lowmem_optim=name, report_to=[], use_cpu=True)


def test_every_transformers_optim_name_is_mapped_or_refused():
    from transformers.training_args import OptimizerNames

    from lowmem.optim import list_optimizers

    names = {o.value for o in OptimizerNames}
    layerwise = {n for n in names if n.endswith("_layerwise") and n[: -len("_layerwise")] in HF_OPTIM_NAMES}
    lowmem = set(list_optimizers())
    assert names - layerwise - set(HF_OPTIM_NAMES) - set(HF_OPTIM_REFUSED) - lowmem == set()


@pytest.mark.parametrize("optim, bits", [("rmsprop_bnb", 32), ("rmsprop_bnb_32bit", 32), ("rmsprop_bnb_8bit", 8)])
def test_rmsprop_bnb_equals_what_the_hf_trainer_builds(optim, bits, tmp_path):
    """transformers builds bitsandbytes' ``RMSprop(groups, lr, optim_bits=...)`` (no adam_epsilon: set here to 1e-6, it
    must not reach eps); lowmem's entry under the same TrainingArguments steps the same weights, and keeps the
    embeddings 32-bit for the 8-bit name as the Trainer does."""
    from transformers import Trainer, TrainingArguments

    from lowmem.trainers.hf import LowMemTrainingArguments, optimizer_cls_and_kwargs

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    args = TrainingArguments(str(tmp_path), optim=optim, learning_rate=1e-3, weight_decay=0.0, adam_epsilon=1e-6,
                             report_to=[], use_cpu=True)
    hf_cls, hf_kw = Trainer.get_optimizer_cls_and_kwargs(args, base)
    assert hf_cls is bnb.optim.RMSprop and hf_kw["optim_bits"] == bits
    name = resolve_optim_name(optim)[0]
    models = {}
    for who in ("hf", "lowmem"):
        model = copy.deepcopy(base)
        cls, kw = optimizer_cls_and_kwargs(model, name, args=args)
        if who == "hf":
            opt = hf_cls([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in kw["params"]], **hf_kw)
        else:
            opt = cls(**kw)
            assert opt.param_groups[0]["eps"] == 1e-8 and opt.param_groups[0]["betas"][0] == 0.99  # (alpha)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            model(torch.randn(16, 96, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        models[who] = model
    for p, q in zip(models["hf"].parameters(), models["lowmem"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    largs = LowMemTrainingArguments(str(tmp_path), lowmem_optim=optim, report_to=[], use_cpu=True)
    assert largs.lowmem_embeddings_32bit is (bits == 8)


@pytest.mark.parametrize("name", ["bnb_rmsprop", "bnb_rmsprop8bit"])
def test_rmsprop_bnb_state_bytes_closed_form_and_refusals(name):
    from lowmem.optim import create_optimizer
    from lowmem.optim.recipes.bnb import state_bytes_closed_form

    ps = [torch.nn.Parameter(torch.randn(80, 64)), torch.nn.Parameter(torch.randn(64))]
    opt = create_optimizer(ps, name, lr=1e-3)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    real = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    assert real == state_bytes_closed_form(name, ps)
    for bad, match in (({"momentum": 0.9}, r"momentum=0.9: expected 0 \(bitsandbytes' RMSprop ignores"),
                       ({"centered": True}, r"centered=True: expected False"), ({"alpha": 0.0}, r"alpha=0.0")):
        with pytest.raises(ValueError, match=match):
            create_optimizer(ps, name, **bad)


@pytest.mark.parametrize("optim, name", [("paged_ademamix_32bit", "bnb_paged_ademamix"),
                                         ("paged_ademamix_8bit", "bnb_paged_ademamix8bit")])
def test_paged_ademamix_maps_with_the_hf_trainers_hyperparameters_and_refuses_cpu(optim, name, tmp_path):
    """The Trainer's kwargs (betas triple from adam_beta1 / adam_beta2 and optim_args beta1 / beta3, alpha, eps) are
    what lowmem's factory hands bitsandbytes; CPU parameters are refused as for every paged entry."""
    from transformers import Trainer, TrainingArguments

    from lowmem.optim import create_optimizer
    from lowmem.optim.recipes.bnb import _ademamix_betas
    from lowmem.trainers.hf import trainer_hparams

    assert resolve_optim_name(optim) == (name, False)
    args = TrainingArguments(str(tmp_path), optim=optim, optim_args="beta1=0.8,beta3=0.999,alpha=8", learning_rate=2e-3,
                             adam_beta2=0.95, adam_epsilon=1e-7, report_to=[], use_cpu=True)
    _, hf_kw = Trainer.get_optimizer_cls_and_kwargs(args, torch.nn.Linear(4, 4))
    ours = _ademamix_betas(trainer_hparams(name, args))
    for key in ("betas", "alpha", "eps", "lr"):
        assert ours[key] == pytest.approx(hf_kw[key]), key
    unpaged = "ademamix8bit" if name.endswith("8bit") else "ademamix"  # (the engine's recipe of the same format)
    with pytest.raises(ValueError, match=rf"pages its state in CUDA unified memory.*on the CPU.*\['{unpaged}'\]"):
        create_optimizer([torch.nn.Parameter(torch.randn(8, 8))], name)


@pytest.mark.cuda
@pytest.mark.parametrize("name, cls", [("bnb_paged_ademamix", "PagedAdEMAMix"), ("bnb_paged_ademamix8bit", "PagedAdEMAMix8bit")])
def test_paged_ademamix_steps_like_bitsandbytes_on_cuda(name, cls):
    if not torch.cuda.is_available():
        pytest.skip("CUDA only")
    from lowmem.optim import create_optimizer

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(128, 96, device="cuda"))]
    theirs = [torch.nn.Parameter(ours[0].detach().clone())]
    a = create_optimizer(ours, name, lr=1e-3, betas=(0.9, 0.95), beta3=0.999)
    b = getattr(bnb.optim, cls)(theirs, lr=1e-3, betas=(0.9, 0.95, 0.999))
    for _ in range(3):
        g = torch.randn_like(ours[0])
        ours[0].grad, theirs[0].grad = g.clone(), g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(ours[0], theirs[0])
