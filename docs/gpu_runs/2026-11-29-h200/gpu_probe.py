"""Ad hoc probe (2026-11-29): where lowmem's CUDA step time goes vs torch AdamW(fused). Not part of the repo."""
import os, sys, time, json
import torch
sys.path.insert(0, os.getcwd())
import lowmem
from lowmem.bench_gpu import build_module

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
spec = sys.argv[2] if len(sys.argv) > 2 else "model:llama-350m"
budget = float(sys.argv[3]) if len(sys.argv) > 3 else 150
t0 = time.time()
mod, _, desc = build_module(spec, dev)
params = list(mod.parameters())
g = torch.Generator(device=dev).manual_seed(1)
for p in params:
    p.grad = torch.randn(p.shape, device=dev, generator=g) * 1e-3
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

def timeit(opt, n=5):
    opt.step(); sync(); opt.step(); sync()
    t = time.perf_counter()
    for _ in range(n):
        opt.step()
    sync()
    return (time.perf_counter() - t) / n * 1e3

rows = []
def add(name, make):
    if time.time() - t0 > budget:
        rows.append((name, "not reached")); return
    try:
        opt = make(); ms = timeit(opt)
        extra = ""
        if dev == "cuda" and hasattr(opt, "state_bytes"):
            from torch.profiler import profile, ProfilerActivity
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                opt.step(); sync()
            ev = prof.key_averages()
            launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
            syncs = sum(e.count for e in ev if "Synchronize" in e.key or e.key in ("aten::item", "aten::_local_scalar_dense"))
            top = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
            extra = f"launches {launches} syncs/item {syncs} top-cpu " + "; ".join(f"{e.key} {e.self_cpu_time_total/1e3:.1f}ms x{e.count}" for e in top)
        rows.append((name, f"{ms:.2f} ms {extra}"))
        del opt
    except Exception as e:
        rows.append((name, "error " + repr(e)[:200]))
    if dev == "cuda":
        torch.cuda.empty_cache()
    print(rows[-1], flush=True)

def lm(name, chunk="default", check=True, **kw):
    def make():
        o = lowmem.create_optimizer(mod, name, lr=1e-5, **kw)
        if chunk != "default":
            o.chunk_numel = chunk
        o.skip_nonfinite = check
        return o
    return make

print(desc, f"{sum(p.numel() for p in params)/1e6:.1f}M params", flush=True)
add("torch AdamW fused", lambda: torch.optim.AdamW(params, lr=1e-5, fused=True))
add("torch AdamW foreach", lambda: torch.optim.AdamW(params, lr=1e-5, foreach=True))
add("adamw", lm("adamw"))
add("adamw check off", lm("adamw", check=False))
add("adamw chunk None", lm("adamw", chunk=None))
add("adamw chunk None check off", lm("adamw", chunk=None, check=False))
add("adamw chunk 2^24", lm("adamw", chunk=2**24))
add("galore_adamw", lm("galore_adamw"))
add("galore_adamw chunk None check off", lm("galore_adamw", chunk=None, check=False))
add("adamw8bit", lm("adamw8bit"))
add("adamw8bit chunk None", lm("adamw8bit", chunk=None))
add("adamw4bit chunk None", lm("adamw4bit", chunk=None))
add("muon", lm("muon"))
add("apollo_adamw", lm("apollo_adamw"))
add("adam_mini", lm("adam_mini"))
print("ROWS", json.dumps(rows))
