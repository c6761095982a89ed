#!/usr/bin/env bash
# Create ./.venv and install rave-basicsr with its test extra (idempotent).
#
# torch comes first so that basicsr 1.4.2 (an sdist whose setup.py imports torch) can be built without pip's
# build isolation, which would otherwise install a second, throwaway torch. Override the torch pair for your
# platform with RAVE_TORCH, e.g. RAVE_TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cu121".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${RAVE_TORCH:-"torch==2.14.1 torchvision==0.29.1"}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade "pip>=23" setuptools wheel
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet $TORCH_SPEC
.venv/bin/python -m pip install --quiet --no-build-isolation basicsr==1.4.2
.venv/bin/python -m pip install --quiet -e '.[test]'
.venv/bin/python -c "import rave_basicsr, torch; print(f'rave-basicsr {rave_basicsr.__version__} ready (torch {torch.__version__})')"
