"""bfloat16 weights in the multi-tensor buckets on CUDA (written without a GPU; run by the ``pytest:cuda`` check).

On the CPU the buckets equal the per-parameter step bit for bit (tests/test_bf16_buckets.py). On CUDA the operations
are the same, but torch's per-tensor division by a number multiplies by its reciprocal where the multi-tensor one
divides, so a float32 result may differ in its last bit, and a bfloat16 weight by one unit in the last place where
that lands on a rounding boundary: asserted here as at most 1% of the weights' elements apart, by at most one ulp.
The stochastic rounding draws the same bits on both paths (each weight's own CUDA generator stream). ``DEVICE`` set to
``"cpu"`` in a scratch copy is how this file was checked without a GPU (then nothing differs)."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import create_optimizer

DEVICE = "cuda"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                   reason="needs a CUDA GPU")]
SHAPES = [(64, 48), (300,), (1000, 70), (3,)]
ROUNDING = {"nearest": {}, "sr": {"bf16_stochastic_round": True}, "kahan": {"kahan_summation": True}}


#: the rules with a bf16_bucket_direction (BF16RULES), as a name of the test and (registered name, settings); the
#: quantized rules with fused=False (fused=None on CUDA sends the weights to bitsandbytes' kernel, on both paths)
RULES = {"adamw": ("adamw", {}), "lion": ("lion", {}), "ademamix": ("ademamix", {}), "sm3": ("sm3", {"momentum": 0.9}),
         "adafactor": ("adafactor", {"lr": None, "beta1": 0.9}), "came": ("came", {}),
         **{n: (n, {"min_quant_size": 1, "block_size": 64,
                    **({"fused": False} if n in ("adamw8bit", "lion8bit") else {})})
            for n in ("adamw8bit", "adamw4bit", "ademamix8bit", "lion8bit")}}


def _run(name, foreach, rounding, moments):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, torch.bfloat16)) for s in SHAPES]
    rule, kw = RULES[name]
    kw = {"lr": 1e-3, **kw}
    if kw["lr"] is None:  # (Adafactor's relative step: no lr)
        del kw["lr"]
    if name in ("adamw8bit", "adamw4bit", "ademamix8bit", "lion8bit") and moments != "float32":
        pytest.skip("the quantized rules' unquantized moments are float32")
    opt = create_optimizer([{"params": ps, **ROUNDING[rounding]}], rule, weight_decay=0.1, state_dtype=moments,
                           foreach=foreach, **kw)
    opt.chunk_numel = 4096  # (the (1000, 70) weight in pieces: its stream continued piece by piece)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, torch.bfloat16)
        opt.step()
    return [p.detach().float().cpu() for p in ps]


@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
@pytest.mark.parametrize("rounding", list(ROUNDING))
@pytest.mark.parametrize("name", list(RULES))
def test_cuda_bf16_buckets_match_the_per_parameter_step(name, rounding, moments):
    got, want = _run(name, True, rounding, moments), _run(name, False, rounding, moments)
    for a, b in zip(got, want):
        apart = a != b
        assert apart.float().mean().item() <= 0.01
        ulp = torch.maximum(a.abs(), b.abs()) * 2.0**-7
        assert bool(((a - b).abs()[apart] <= ulp[apart]).all())
