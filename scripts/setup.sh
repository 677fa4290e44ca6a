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
# what follows keeps the torch installed now: some extras (nnunet: nnunetv2) require torch unpinned,
# and pip would replace a CPU build with another (a CUDA one from PyPI)
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" > .venv/torch-constraint.txt
.venv/bin/pip install -q -c .venv/torch-constraint.txt -e ".${EXTRAS:+[$EXTRAS]}"
# nnU-Net pulls torchvision (through timm), and PyPI's build is linked to a CUDA torch: one that does not
# load beside the installed torch is removed (nnU-Net's default trainer runs without it; models of its
# trainer variants need torchvision from the index torch came from)
case ",$EXTRAS," in *,nnunet,*)
  if .venv/bin/pip show -q torchvision 2>/dev/null && ! .venv/bin/python -c "import torchvision" 2>/dev/null; then
    echo "setup.sh: torchvision does not load beside $(cat .venv/torch-constraint.txt); removing it" >&2
    .venv/bin/pip uninstall -q -y torchvision
  fi ;;
esac
# the built-in mr-brain model: deepbet without its GUI dependencies (what inference needs is in [brain])
case ",$EXTRAS," in *,brain,*) .venv/bin/pip install -q --no-deps "deepbet==1.0.2" ;; esac
