#!/usr/bin/env bash
# Create .venv and install the project with its dev tools. Idempotent: a second run is quick.
# Installs nothing outside .venv; the browser for the UI tests is scripts/setup_tests.sh's job.
#
# torch is installed first, pinned, so pip never resolves an unpinned `torch` to a multi-GB
# CUDA build on a CPU-only machine. Elsewhere, point TORCH_INDEX_URL at PyTorch's CPU wheel
# index (https://download.pytorch.org/whl/cpu) or at a CUDA one on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  .venv/bin/pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
fi
.venv/bin/pip install -q -e ".[dev]" 2> >(grep -v "^WARNING: Location" >&2)

echo "setup: $(.venv/bin/python -c 'import torch, dagster, great_expectations as gx; print(f"torch {torch.__version__}, dagster {dagster.__version__}, GX {gx.__version__}")')"
