"""Pure-bfloat16 training: float32 weights vs bfloat16 weights rounded to nearest vs bfloat16 weights with
``bf16_stochastic_round=True`` or ``kahan_summation=True`` (docs/optimizers.md, "Pure-bfloat16 training"), on the
kit's tiny Llama.

    python examples/pure_bf16.py                       # adamw, lr 1e-4, 60 steps, seed 0 (about 20 s on a CPU)
    python examples/pure_bf16.py --optim adamw,adamw8bit,galore_adamw --lr 1e-4,1e-3 --steps 300 --seeds 3

Every run computes in bfloat16 (autocast); only the weights' storage differs: float32 (a master copy's
precision), bfloat16 with each step's float32 result rounded to nearest (updates under half a bfloat16 ulp of
the weight are lost), bfloat16 rounded stochastically (unbiased), bfloat16 with a Kahan compensation (2 B per
parameter more). Prints the held-out loss of each, one line per optimizer, learning rate and seed (JSON), then
the means.

One seed of the same comparison, with state bytes and step times beside the losses (no autocast: the bfloat16 rows
compute in bfloat16, the baseline is torch's AdamW on the same weights):

    lowmem bench adamw adamw:bf16_stochastic_round=true adamw:kahan_summation=true --dtype bfloat16 --lr 1e-4 --steps 300
"""

import argparse
import json
import math
import statistics

import torch

from lowmem.bench import _batches, _eval_loss
from lowmem.kit import load_model_and_tokenizer
from lowmem.optim import create_optimizer

MODES = {"float32": (torch.float32, None), "bf16_nearest": (torch.bfloat16, None),
         "bf16_stochastic": (torch.bfloat16, "bf16_stochastic_round"), "bf16_kahan": (torch.bfloat16, "kahan_summation")}


def run(name: str, lr: float, steps: int, seed: int, dtype: torch.dtype, option: str | None) -> tuple[float, float]:
    """(initial, final) held-out loss of ``steps`` steps of ``name`` on weights stored in ``dtype``."""
    model, tok = load_model_and_tokenizer(None, seed=seed)
    model = model.to(dtype)
    batches, evals = _batches(tok, steps, 16, seed)
    hp = {"lr": lr, **({"rank": 16} if "galore" in name else {})}
    if option is not None:
        hp[option] = True
    opt = create_optimizer(model, name, **hp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = _eval_loss(model, evals)
    torch.manual_seed(seed)
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return first, _eval_loss(model, evals)


def _at_least_1(text: str) -> int:
    """An argparse type: an int >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _lrs(text: str) -> list[float]:
    """An argparse type: comma-separated learning rates, each a finite number > 0."""
    out = []
    for item in text.split(","):
        try:
            lr = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {item!r}") from None
        if not (math.isfinite(lr) and lr > 0):
            raise argparse.ArgumentTypeError(f"each learning rate must be a finite number > 0, got {item!r}")
        out.append(lr)
    return out


def _optims(text: str) -> list[str]:
    """An argparse type: comma-separated registered optimizer names (``lowmem list``)."""
    from lowmem.optim import list_optimizers

    names, valid = text.split(","), list_optimizers()
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown optimizer(s) {unknown}; valid: {', '.join(valid)}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optim", type=_optims, default="adamw", help="comma-separated optimizer names (default adamw)")
    ap.add_argument("--lr", type=_lrs, default="1e-4", help="comma-separated learning rates (default 1e-4)")
    ap.add_argument("--steps", type=_at_least_1, default=60, help="optimizer steps, >= 1 (default 60)")
    ap.add_argument("--seeds", type=_at_least_1, default=1, help="seeds 0..N-1, N >= 1 (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    summary: dict[tuple, dict[str, list[float]]] = {}
    for name in args.optim:
        for lr in args.lr:
            for seed in range(args.seeds):
                row = {"optim": name, "lr": lr, "seed": seed}
                for mode, (dtype, option) in MODES.items():
                    first, last = run(name, lr, args.steps, seed, dtype, option)
                    assert last < first, f"{name} lr {lr} {mode}: loss {first:.4f} -> {last:.4f} did not fall"
                    row[mode] = round(last, 4)
                    summary.setdefault((name, lr), {}).setdefault(mode, []).append(last)
                print(json.dumps(row), flush=True)
    print(f"\nheld-out loss after {args.steps} steps (mean over {args.seeds} seed(s)):")
    print("| optimizer | lr | " + " | ".join(MODES) + " |")
    for (name, lr), by in summary.items():
        print(f"| {name} | {lr:g} | " + " | ".join(f"{statistics.mean(by[m]):.3f}" for m in MODES) + " |")


if __name__ == "__main__":
    main()
