#!/usr/bin/env bash
# Prepare the one-shot GPU check (scripts/gpu_check.sh) on a machine with package access, before a GPU session.
#
# The GPU machine has torch, torchvision, timm, OpenCV, NumPy, SciPy and pytest but no network, and lacks
# basicsr, open_clip_torch and a few small packages. This script fills two git-ignored folders that travel with
# the working tree (carry them: [".whl", ".gpu_data"]):
#   .whl/       CPython 3.12 x86-64 wheels of what that machine lacks (basicsr 1.4.2 built here as a pure-Python
#               wheel; lmdb, charset_normalizer and wcwidth as manylinux wheels; the rest pure Python), at the
#               versions this project is tested with (those of the virtualenv below); gpu_check.sh installs only
#               those the machine does not have;
#   .gpu_data/  a copy of the shared data the GPU tests read (official checkpoints, backlit photos, reference
#               outputs). Never commit it: the files carry no licence that allows redistribution.
# Idempotent: files already there are kept. Prints the size of both folders.
#
#   bash scripts/gpu_prepare.sh     # uses ./.venv (scripts/setup.sh); override with VENV=/path/to/venv and
#                                   # RAVE_SHARED_DATA=/path/to/shared/data (default: the tests' default,
#                                   # tests/shared_data.py's shared_data_dir)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV=${VENV:-$REPO/.venv}
WHEELS=$REPO/.whl
DATA=$REPO/.gpu_data
PY="$VENV/bin/python"

die() { echo "gpu_prepare: error: $*" >&2; exit 2; }
[ -x "$PY" ] || die "no virtualenv with torch and basicsr's build requirements at $VENV (run scripts/setup.sh, or set \
VENV=/path/to/venv)"
SHARED=${RAVE_SHARED_DATA:-$("$PY" -c "from tests.shared_data import shared_data_dir; print(shared_data_dir())")}
for folder in official_checkpoints backlit_samples reference_outputs; do
    [ -d "$SHARED/$folder" ] || die "$SHARED/$folder is missing (set RAVE_SHARED_DATA to the shared data folder)"
done
mkdir -p "$WHEELS" "$DATA"

# the version of a distribution in the build virtualenv (the one the test suite passes with)
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# --- basicsr: only an sdist exists; its setup.py imports torch, hence no build isolation (as scripts/setup.sh)
if ! ls "$WHEELS"/basicsr-1.4.2-*.whl >/dev/null 2>&1; then
    echo "gpu_prepare: building basicsr 1.4.2 (pure Python, no CUDA extensions)"
    BASICSR_EXT='' "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WHEELS" basicsr==1.4.2
fi
case "$(ls "$WHEELS"/basicsr-1.4.2-*.whl)" in
    *-py3-none-any.whl) ;;
    *) die "the basicsr wheel is not pure Python: $(ls "$WHEELS"/basicsr-1.4.2-*.whl)" ;;
esac

# --- the rest, for CPython 3.12 on x86-64 Linux. Imported when the GPU tests run:
#   open_clip_torch (guidance encoders) -> ftfy -> wcwidth; lmdb (basicsr's file client, rave prepare-lmdb);
#   requests + urllib3, idna, certifi, charset_normalizer (basicsr.utils.download_util, imported by
#   basicsr.archs); pytest-timeout (per-test time limits). Declared by basicsr, installed for completeness:
#   addict, yapf -> platformdirs, future. gpu_check.sh installs only those the GPU machine does not have.
PACKAGES=(open_clip_torch ftfy wcwidth lmdb addict yapf platformdirs future requests urllib3 idna certifi
          charset_normalizer pytest-timeout)
SPECS=()
for package in "${PACKAGES[@]}"; do
    SPECS+=("$package==$(version "$package")")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${SPECS[@]}"

# --- the shared data (copied file by file; an existing identical file is kept)
for folder in official_checkpoints backlit_samples reference_outputs; do
    mkdir -p "$DATA/$folder"
    for file in "$SHARED/$folder"/*; do
        target="$DATA/$folder/$(basename "$file")"
        cmp -s "$file" "$target" 2>/dev/null || install -m 644 "$file" "$target"
    done
done

echo "gpu_prepare: wheels in .whl/:"
ls -1 "$WHEELS"
echo "gpu_prepare: sizes (carry both, at most 64 MiB with the working tree):"
du -sh "$WHEELS" "$DATA"
du -sch "$WHEELS" "$DATA" | tail -1
