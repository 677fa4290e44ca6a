#!/usr/bin/env bash
# Installs MONAI Deploy App SDK 4.0 and Holoscan into .venv for tests/test_monai_deploy.py, if they
# are missing (about 570 MB; they run applications on the CPU). The venv's torch stays as installed:
# the SDK does not ask for torch, and a constraints file pins it (and numpy) so that no resolver
# step can swap in a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
SDK_VERSION=4.0.0
HOLOSCAN_VERSION=4.6.0  # what the SDK 4.0 resolves to here; pinned so that a new Holoscan does not change the tests
if "$PY" -c "import sys; from importlib.metadata import version as v
sys.exit(v('monai-deploy-app-sdk') != '$SDK_VERSION' or v('holoscan-cu13') != '$HOLOSCAN_VERSION')" 2>/dev/null; then
  exit 0  # installed already
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" - >"$constraints" <<'EOF'
from importlib.metadata import version
for name in ("torch", "numpy", "pydicom", "highdicom", "monai"):
    try:
        print(f"{name}=={version(name)}")
    except Exception:
        pass
EOF
.venv/bin/pip install -q --disable-pip-version-check -c "$constraints" "monai-deploy-app-sdk==$SDK_VERSION" "holoscan-cu13==$HOLOSCAN_VERSION"
"$PY" -W ignore -c "import monai.deploy.core, monai.deploy.operators.dicom_seg_writer_operator"
