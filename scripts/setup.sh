#!/usr/bin/env bash
# Create .venv and install the project with its dev tools. Idempotent: a second run is quick.
# Installs nothing outside .venv; the browser for the UI tests is scripts/setup_tests.sh's job.
# torch goes in first, pinned (TORCH_VERSION, TORCH_INDEX_URL: see scripts/venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

venv_with_torch
venv_pip -e ".[dev]"

echo "setup: $(.venv/bin/python -c 'import torch, dagster, great_expectations as gx; print(f"torch {torch.__version__}, dagster {dagster.__version__}, GX {gx.__version__}")')"
