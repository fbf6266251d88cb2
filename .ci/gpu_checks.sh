#!/usr/bin/env bash
# The GPU checks of issues 12 and 15 in one command (docs/benchmarks.md, "GPU checklist").
#
#   bash .ci/gpu_checks.sh prepare     # HERE, on the CPU machine, before calling the device's `run`:
#                                      # copies bitsandbytes (its Python code and CUDA 13 library only,
#                                      # about 9 MB) from .venv into build/gpu_site and records the commit
#   bash .ci/gpu_checks.sh [ARGS]      # THERE (run tool, carry ["build/gpu_site"]): python -m lowmem.bench_gpu
#                                      # --device cuda --out $OUT ARGS; in $OUT: results.md (THE file to paste:
#                                      # the markdown report, then the JSON report), report.md, report.json, log.txt
#
# Session 16's run: `bash .ci/gpu_checks.sh --budget 390` (timeout_s=480): env, bf16:llama-7b-layer (bfloat16
# write-backs: round-to-nearest / stochastic rounding / Kahan, step time and peak), time+memory:llama-350m (adamw
# first, then racs, alice, sm3, normuon, lion, microadam, ...), memory:llama-7b-layer, equal:cuda-vs-cpu,
# pytest:cuda (every cuda-marked test file: lowmem.bench_gpu.cuda_test_files(), tests/test_gpu16_*.py and session 20's
# tests/test_buckets20_cuda.py among them). docs/benchmarks.md "GPU checklist".
#
# Nothing is installed there: the device image's python3 already holds a CUDA torch, transformers, peft,
# accelerate and pytest, and installing lowmem's pins (torch 2.13 CPU, trl, datasets) is impossible offline
# and would replace its torch. lowmem runs from the working tree (PYTHONPATH), bitsandbytes from the
# carried build/gpu_site. The checks import neither trl nor datasets.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=build/gpu_site

if [ "${1:-}" = prepare ]; then
    set -e
    PY=.venv/bin/python
    [ -x "$PY" ] || { echo "no .venv: create it first (README.md, Set up)" >&2; exit 2; }
    BNB=$("$PY" -c 'import bitsandbytes, os; print(os.path.dirname(bitsandbytes.__file__))')
    rm -rf "$SITE" && mkdir -p "$SITE"
    # Python files and the CPU / CUDA 13.x libraries (the device's torch is cu130), no __pycache__
    (cd "$BNB/.." && find bitsandbytes -name __pycache__ -prune -o -type f \
        \( -name '*.py' -o -name py.typed -o -name 'libbitsandbytes_cpu.so' -o -name 'libbitsandbytes_cuda13*.so' \) -print \
        | tar -cf - -T -) | tar -xf - -C "$SITE"
    cp -r "$BNB"/../bitsandbytes-*.dist-info "$SITE"/
    { git rev-parse HEAD; git status --porcelain | wc -l | sed 's/$/ files changed or untracked at prepare time/'; } > "$SITE/commit.txt"
    du -sh "$SITE"
    # the cuda-marked tests must collect as they will there: without datasets and trl (the device image has neither);
    # a file that does not import is named here (there it is one error row: --continue-on-collection-errors)
    "$PY" - <<'EOF' | tail -4
import sys
for name in ("datasets", "trl"):
    sys.modules[name] = None  # as absent as on the device
import pytest
from lowmem.bench_gpu import cuda_test_files
rc = pytest.main(["-q", "-p", "no:randomly", "-n", "0", "-m", "cuda", "--co", "-p", "no:cacheprovider",
                  "--continue-on-collection-errors", *cuda_test_files()])
print("cuda tests collected without datasets / trl:", "ok" if rc in (0, 5) else f"pytest rc {rc}: the files named ERROR above"
      " will be error rows of pytest:cuda")
EOF
    echo "prepared $SITE: now call the run tool (docs/benchmarks.md, GPU checklist)"
    exit 0
fi

OUT=${OUT:-build/gpu_out}
mkdir -p "$OUT"
[ -d "$SITE/bitsandbytes" ] || echo "WARNING: $SITE missing (run 'bash .ci/gpu_checks.sh prepare' here and carry it):" \
    "the 8-bit rows will fail" | tee -a "$OUT/log.txt"
export PYTHONPATH="$PWD:$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
PY=$(command -v python3)
{ echo "+ $(date -u) $PY"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' 2>&1
} | tee -a "$OUT/log.txt"
"$PY" -m lowmem.bench_gpu --device cuda --out "$OUT" "$@" 2>&1 | tee -a "$OUT/log.txt"
rc=${PIPESTATUS[0]}
echo "+ $(date -u) exit $rc" | tee -a "$OUT/log.txt"
echo "results (one file, markdown + JSON): $OUT/results.md"
exit "$rc"
