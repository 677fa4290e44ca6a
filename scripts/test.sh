#!/usr/bin/env bash
# Installs what the tests need (Debian packages: Redis, PostgreSQL, Orthanc + DICOMweb, DCMTK, dicom3tools,
# docker-compose for parsing, Chromium and npm for the OHIF Viewer test; OHIF's prebuilt app from the
# npm registry) and runs the whole suite against those real servers.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v redis-server >/dev/null || need+=(redis-server)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need+=(postgresql)  # the ledger's tests on PostgreSQL
[ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
[ -x /usr/bin/storescu ] || need+=(dcmtk)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v chromium >/dev/null || need+=(chromium)
command -v npm >/dev/null || need+=(npm)
command -v curl >/dev/null || need+=(curl)  # the first-result tutorial waits for /healthz with it
[ -x /usr/bin/python3.11 ] || need+=(python3.11)  # the Triton test server's interpreter
/usr/bin/python3.11 -c "import ensurepip" 2>/dev/null || need+=(python3.11-venv)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
  else
    echo "missing Debian packages: ${need[*]} (run: sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
bash scripts/setup.sh test,brain,nnunet  # nnunet: tests/test_nnunet.py trains and runs real nnU-Net models
bash scripts/install-monai-deploy-test.sh  # MONAI Deploy App SDK + Holoscan, test-only, torch untouched
bash scripts/install-triton-test.sh  # a real Triton server (nvidia-pytriton) in a venv of Debian's python3.11
# OHIF Viewer's prebuilt static app for tests/test_ohif.py: fetched once into a cache outside the repo
if [ -z "${PACSWORKER_OHIF_DIST:-}" ]; then
  ohif_version=3.13.2
  ohif_dir=${PACSWORKER_OHIF_DIR:-$HOME/.cache/pacsworker/ohif-$ohif_version}
  if [ ! -f "$ohif_dir/dist/index.html" ]; then
    ohif_tmp=$(mktemp -d)
    (cd "$ohif_tmp" && npm pack --silent "@ohif/app@$ohif_version" >/dev/null && tar xzf ./*.tgz)
    mkdir -p "$ohif_dir"
    rm -rf "$ohif_dir/dist" "$ohif_dir/dist.partial"
    mv "$ohif_tmp/package/dist" "$ohif_dir/dist.partial" && mv "$ohif_dir/dist.partial" "$ohif_dir/dist"
    rm -rf "$ohif_tmp"
  fi
  export PACSWORKER_OHIF_DIST=$ohif_dir/dist
fi
# static checks over src/ first, configured in pyproject.toml: lint and import order, then types
echo "static checks: ruff check src, mypy (src/pacsworker)" >&2
.venv/bin/ruff check --quiet src
.venv/bin/mypy --no-error-summary
export PACSWORKER_REQUIRE_SERVERS=1
exec .venv/bin/python -m pytest "$@"
