#!/usr/bin/env bash
# Create benchmarks/sparsify/.venv with EleutherAI's sparsify (eai-sparsify 1.3.3), kept apart
# from the project's .venv so its transformers/datasets/accelerate pins never touch ours.
# Idempotent: a second run only checks.
#
# torch goes in first, pinned, so resolving sparsify's unpinned `torch` never pulls a
# multi-GB CUDA build; PIP_FIND_LINKS (or TORCH_INDEX_URL) must offer the CPU wheel. triton is
# left out on purpose: without it sparsify falls back to its eager (dense) decoder.
# pyarrow is the runner's Parquet reader (the activations are hive-partitioned Parquet).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
SPARSIFY_VERSION=1.3.3

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  .venv/bin/pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION" \
    2> >(grep -v "^WARNING: Location" >&2)
fi
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('eai-sparsify') == '$SPARSIFY_VERSION' else 1)" 2>/dev/null; then
  .venv/bin/pip install -q "torch==$TORCH_VERSION" "eai-sparsify==$SPARSIFY_VERSION" "pyarrow>=15" \
    2> >(grep -v "^WARNING: Location" >&2)
fi
echo "setup: $(.venv/bin/python -c 'import importlib.metadata as m, torch, pyarrow, sparsify; v = m.version("eai-sparsify"); print(f"torch {torch.__version__}, eai-sparsify {v}, pyarrow {pyarrow.__version__}")')"
