#!/usr/bin/env bash
# Remakes the pictures in docs/images/ by running the tests that check what they show (the status
# page in Chromium, OHIF showing a SEG and its SR, the overlay of `pacsworker run`).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs/images
PACSWORKER_DOCS_IMAGES=1 PACSWORKER_REQUIRE_SERVERS=1 .venv/bin/python -m pytest -q \
  tests/test_operator_views.py::test_the_status_page_reads_in_a_browser \
  tests/test_tutorials.py::test_first_model_tutorial \
  tests/test_ohif.py
ls -l docs/images/
