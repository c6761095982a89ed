#!/usr/bin/env bash
# The RAVE demo, offline on a CPU in a few minutes (see README / docs/training.md):
#   1. rave demo-data demo/data                        (synthetic backlit / well-lit / ground-truth images)
#   2. basicsr train -opt options/demo/train_rave_demo.yml   -> experiments/RAVE_demo/
#   3. rave enhance the demo validation images, and any folders of real photos given as arguments (plus
#      $RAVE_SHARED_DATA/backlit_samples when that variable names the project's shared data folder)
#   4. print PSNR against the demo ground truth before and after
# Earlier results are never overwritten: an existing demo/data is reused, BasicSR archives an existing
# experiments/RAVE_demo folder (..._archived_<time>), and rave enhance skips existing outputs unless
# --overwrite is given to this script (then demo/results is replaced).
# Usage: scripts/demo.sh [--overwrite] [PHOTO_FOLDER ...]   (outputs in demo/results/<folder name>)
set -euo pipefail
USAGE="usage: scripts/demo.sh [--overwrite] [PHOTO_FOLDER ...]"
OVERWRITE=""
PHOTOS=()
for arg in "$@"; do
  case "$arg" in
    --overwrite) OVERWRITE="--overwrite" ;;
    -*) echo "$USAGE" >&2; exit 2 ;;
    *) if [ ! -d "$arg" ]; then echo "scripts/demo.sh: $arg is not a folder; $USAGE" >&2; exit 2; fi
       PHOTOS+=("$(cd "$arg" && pwd)") ;;
  esac
done
if [ -n "${RAVE_SHARED_DATA:-}" ] && [ -d "${RAVE_SHARED_DATA}/backlit_samples" ]; then
  PHOTOS+=("$(cd "${RAVE_SHARED_DATA}/backlit_samples" && pwd)")
fi
cd "$(dirname "$0")/.."
BIN=""
if [ -x .venv/bin/python ]; then BIN=".venv/bin/"; fi
PY="${BIN}python"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

if [ -d demo/data/train_backlit ]; then
  echo "== demo data: reusing demo/data"
else
  echo "== demo data: writing demo/data"
  "${BIN}rave" demo-data demo/data
fi

echo "== training (options/demo/train_rave_demo.yml)"
"${BIN}basicsr" train -opt options/demo/train_rave_demo.yml
CHECKPOINT=experiments/RAVE_demo/models/net_g_latest.pth

echo "== enhancing with ${CHECKPOINT}"
"${BIN}rave" enhance demo/data/val_backlit -o demo/results/val --weights "${CHECKPOINT}" ${OVERWRITE}
for folder in ${PHOTOS[@]+"${PHOTOS[@]}"}; do
  "${BIN}rave" enhance "${folder}" -o "demo/results/$(basename "${folder}")" --weights "${CHECKPOINT}" ${OVERWRITE}
done

echo "== PSNR against the demo ground truth (demo/data/val_gt)"
"${PY}" - <<'PYEOF'
import rave_basicsr  # noqa: F401  (torchvision shim before basicsr)
from pathlib import Path
from basicsr.metrics.psnr_ssim import calculate_psnr
from rave_basicsr.utils.image_io import read_image
import numpy as np

def load(path):
    return np.round(read_image(str(path)).rgb * 255).astype(np.float64)

rows = []
for gt in sorted(Path('demo/data/val_gt').iterdir()):
    inp = next(Path('demo/data/val_backlit').glob(gt.stem + '.*'))
    out = next(Path('demo/results/val').glob(gt.stem + '.*'))
    rows.append((gt.stem, calculate_psnr(load(inp), load(gt), 0), calculate_psnr(load(out), load(gt), 0)))
for name, before, after in rows:
    print(f'{name:>16}  input {before:6.2f} dB  ->  enhanced {after:6.2f} dB')
print(f'{"mean":>16}  input {np.mean([r[1] for r in rows]):6.2f} dB  ->  enhanced {np.mean([r[2] for r in rows]):6.2f} dB')
PYEOF
