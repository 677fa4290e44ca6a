#!/usr/bin/env bash
# Creates .venv with pacsworker installed. Torch is installed first so that no CUDA wheels are
# pulled in on CPU machines (set TORCH_SPEC to pick another build, e.g. on a GPU host).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
EXTRAS=${1:-brain}
[ -d .venv ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
# the built-in mr-brain model: deepbet without its GUI dependencies (what inference needs is in [brain])
case ",$EXTRAS," in *,brain,*) .venv/bin/pip install -q --no-deps "deepbet==1.0.2" ;; esac
