#!/usr/bin/env bash
# The one-shot GPU check (issue #12), on a machine with one or more NVIDIA GPUs, in well under 8 minutes:
#   1. installs what the machine lacks from .whl/ (made by scripts/gpu_prepare.sh) into /tmp/site, offline;
#   2. pytest -m cuda tests/test_cuda.py: rave enhance on the GPU in every precision against the CPU and the official
#      outputs, exact tiling, RAVE and CLIP-LIT-Latent training in fp32/fp16/bf16 interrupted and resumed,
#      basicsr test, torchrun with nccl (at most $RAVE_GPU_TESTS_BUDGET s, default 200);
#   3. bench/bench_gpu.py: a 12-megapixel photo in each precision, the training stages at the originals' size
#      (at most $RAVE_GPU_BENCH_BUDGET s, default 240);
#   4. bench/gpu_report.py: bench/results/gpu.json and gpu.md (also when a step failed or ran out of time), copied
#      with the logs into $OUT when it is set, and a short summary.
# Exit code: 0 when no test failed (and some passed) and the benchmarks finished; 1 otherwise (after writing the
# results); 2 when the check cannot start (no GPU, no .whl/ or .gpu_data/, packages that do not import).
#
#   bash scripts/gpu_prepare.sh      # first, on a machine with package access
#   bash scripts/gpu_check.sh        # then on the GPU machine, with .whl and .gpu_data carried along
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY=${PYTHON:-python3}
SITE=${RAVE_GPU_SITE:-/tmp/site}
WORK=${RAVE_GPU_WORK:-/tmp/rave_gpu_check}
TESTS_BUDGET=${RAVE_GPU_TESTS_BUDGET:-200}
BENCH_BUDGET=${RAVE_GPU_BENCH_BUDGET:-240}
STARTED=$(date +%s)

die() { echo "gpu_check: error: $*" >&2; exit 2; }
elapsed() { echo $(( $(date +%s) - STARTED )); }

# --- what must be there before anything runs
compgen -G ".whl/*.whl" >/dev/null || die "no wheels in $REPO/.whl: run 'bash scripts/gpu_prepare.sh' on a machine \
with package access first and carry .whl and .gpu_data to this machine"
for folder in official_checkpoints backlit_samples reference_outputs; do
    [ -d ".gpu_data/$folder" ] || die "$REPO/.gpu_data/$folder is missing: run 'bash scripts/gpu_prepare.sh' first and \
carry .gpu_data to this machine"
done
command -v "$PY" >/dev/null || die "no $PY (set PYTHON=/path/to/python with torch)"
if ! "$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError as exc:
    sys.exit(f'gpu_check: error: torch is not importable by {sys.executable}: {exc}')
if not torch.cuda.is_available():
    import os
    sys.exit(f'gpu_check: error: no NVIDIA GPU is visible to torch {torch.__version__} (built for CUDA '
             f'{torch.version.cuda}; CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES", "unset")}). '
             'Run this check on a machine with an NVIDIA GPU and its driver.')
EOF
then
    exit 2
fi

rm -rf "$WORK"
mkdir -p "$WORK/measurements"
exec > >(tee "$WORK/check.log") 2>&1

# --- 1. the packages the machine lacks, offline, into $SITE (those it has are left alone, never shadowed)
echo "== installing from .whl/ into $SITE"
rm -rf "$SITE"
mkdir -p "$SITE"
mapfile -t MISSING < <("$PY" - <<'EOF'
import importlib.metadata as metadata
import pathlib
for wheel in sorted(pathlib.Path('.whl').glob('*.whl')):
    name = wheel.name.split('-')[0]
    try:
        print(f'# {name} {metadata.version(name)} is installed; not installing {wheel.name}', flush=True)
    except metadata.PackageNotFoundError:
        print(wheel)
EOF
)
WHEELS=()
for line in "${MISSING[@]}"; do
    if [[ $line == \#* ]]; then echo "${line#\# }"; else WHEELS+=("$line"); fi
done
if [ ${#WHEELS[@]} -gt 0 ]; then
    echo "installing: ${WHEELS[*]##*/}"
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --target "$SITE" "${WHEELS[@]}"
    else  # no pip: a wheel is a zip archive laid out for site-packages
        "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
            "$SITE" "${WHEELS[@]}"
    fi
fi
export PYTHONPATH="$SITE:$REPO" RAVE_SHARED_DATA="$REPO/.gpu_data" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
    RAVE_CACHE_DIR="$WORK/cache" RAVE_GPU_REPORT_DIR="$WORK/measurements"
"$PY" -c "import rave_basicsr, basicsr, open_clip, lmdb, pytest; print('imports ok: rave_basicsr', \
rave_basicsr.__version__, '| basicsr', basicsr.__version__, '| open_clip', open_clip.__version__)" \
    || die "the installed packages do not import (see above); re-run scripts/gpu_prepare.sh"

echo "== machine"
nvidia-smi || echo "(nvidia-smi not available)"
"$PY" - <<'EOF'
import torch
from rave_basicsr.utils.hardware import device_description
print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, '
      f'{torch.cuda.device_count()} GPU(s)')
for index in range(torch.cuda.device_count()):
    print(f'  cuda:{index}: {device_description(torch.device("cuda", index))}')
EOF

# --- 2. the tests; 3. the benchmarks (each bounded; a step that fails or times out does not stop the others)
run_step() {  # name budget command...: prints "exit N" or "timed out after N s" to $WORK/<name>.status
    local name=$1 budget=$2 code
    shift 2
    set +e
    timeout -k 15 "$budget" "$@" 2>&1 | tee "$WORK/$name.log"
    code=${PIPESTATUS[0]}
    set -e
    if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
        echo "timed out after $budget s" > "$WORK/$name.status"
    else
        echo "exit $code" > "$WORK/$name.status"
    fi
    echo "== $name: $(cat "$WORK/$name.status") (at $(elapsed) s)"
}

TIMEOUT_ARGS=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout "$(( TESTS_BUDGET - 30 ))")
echo "== tests (at most $TESTS_BUDGET s)"
run_step pytest "$TESTS_BUDGET" "$PY" -m pytest -m cuda tests/test_cuda.py -v -rA -p no:cacheprovider \
    --basetemp "$WORK/pytest-tmp" --junitxml "$WORK/junit.xml" "${TIMEOUT_ARGS[@]}"
echo "== benchmarks (at most $BENCH_BUDGET s)"
run_step bench "$BENCH_BUDGET" "$PY" bench/bench_gpu.py --device cuda --budget "$(( BENCH_BUDGET - 35 ))" \
    --out "$WORK/bench_gpu.json"

# --- 4. the report, whatever happened above
TESTS_STATUS=$(cat "$WORK/pytest.status")
BENCH_STATUS=$(cat "$WORK/bench.status")
echo "== report"
REPORT_RC=0
timeout -k 5 30 "$PY" bench/gpu_report.py --work "$WORK" --tests-status "$TESTS_STATUS" \
    --bench-status "$BENCH_STATUS" --out "$REPO/bench/results" || REPORT_RC=$?
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    for file in "$REPO/bench/results/gpu.json" "$REPO/bench/results/gpu.md" "$WORK/junit.xml" "$WORK/pytest.log" \
                "$WORK/bench.log" "$WORK/bench_gpu.json" "$WORK/check.log"; do
        [ -f "$file" ] && cp "$file" "$OUT/"
    done
    echo "gpu_check: results copied to $OUT"
fi
echo "gpu_check: finished in $(elapsed) s; results in bench/results/gpu.json and gpu.md, logs in $WORK"
# the report's verdict: every step exited 0, no test failed and at least one passed (1: not so, or no report)
[ "$REPORT_RC" -eq 0 ] || { echo "gpu_check: FAILED (tests: $TESTS_STATUS, benchmarks: $BENCH_STATUS)"; exit 1; }
