#!/usr/bin/env bash
# Installs what the tests need (Debian packages: Redis, Orthanc + DICOMweb, DCMTK, dicom3tools,
# docker-compose for parsing) and runs the whole suite against those real servers.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v redis-server >/dev/null || need+=(redis-server)
[ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
[ -x /usr/bin/storescu ] || need+=(dcmtk)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v docker-compose >/dev/null || need+=(docker-compose)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
  else
    echo "missing Debian packages: ${need[*]} (run: sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
bash scripts/setup.sh test,brain
export PACSWORKER_REQUIRE_SERVERS=1
exec .venv/bin/python -m pytest "$@"
