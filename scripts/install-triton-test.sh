#!/usr/bin/env bash
# A venv that hosts a real Triton Inference Server for tests/test_triton.py: PyPI's nvidia-pytriton
# bundles the server binary (it runs on CPU). Its Python backend needs the interpreter it was built
# against, Debian's /usr/bin/python3.11, so this venv is made from that one and not from .venv.
# Torch goes in first, pinned to .venv's version, so that no CUDA wheels are pulled in.
# Idempotent and quiet: does nothing when the venv already has both.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PACSWORKER_TRITON_VENV:-$HOME/.cache/pacsworker/triton-venv}
python=${PACSWORKER_TRITON_PYTHON:-/usr/bin/python3.11}
has() { "$venv/bin/python" -c "import importlib.util, sys; sys.exit(not all(map(importlib.util.find_spec, sys.argv[1:])))" "$@" 2>/dev/null; }
[ -x "$venv/bin/python" ] && has pytriton torch && exit 0
if [ ! -x "$python" ]; then
  echo "install-triton-test.sh: $python is missing (Debian: apt-get install python3.11 python3.11-venv)" >&2
  exit 1
fi
torch_version=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)
mkdir -p "$(dirname "$venv")"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }
quiet "$venv/bin/pip" install -q --upgrade pip
has torch || quiet "$venv/bin/pip" install -q "torch==$torch_version"
quiet "$venv/bin/pip" install -q nvidia-pytriton
has pytriton torch
