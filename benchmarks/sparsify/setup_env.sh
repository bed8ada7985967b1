#!/usr/bin/env bash
# Create benchmarks/sparsify/.venv with EleutherAI's sparsify (eai-sparsify 1.3.3), kept apart
# from the project's .venv so its transformers/datasets/accelerate pins never touch ours.
# Idempotent: a second run only checks.
#
# torch goes in first, pinned (scripts/venv.sh), so resolving sparsify's unpinned `torch` never
# pulls a multi-GB CUDA build; PIP_FIND_LINKS (or TORCH_INDEX_URL) must offer the CPU wheel.
# triton is left out on purpose: without it sparsify falls back to its eager (dense) decoder.
# pyarrow is the runner's Parquet reader (the activations are hive-partitioned Parquet); duckdb
# is imported by the project's storage helpers that the runner shares (recsae_pipeline.storage).
set -euo pipefail
cd "$(dirname "$0")"
source ../../scripts/venv.sh
SPARSIFY_VERSION=1.3.3

venv_with_torch
if ! venv_has eai-sparsify "$SPARSIFY_VERSION" || ! .venv/bin/python -c "import duckdb" 2>/dev/null; then
  venv_pip "torch==$TORCH_VERSION" "eai-sparsify==$SPARSIFY_VERSION" "pyarrow>=15" "duckdb>=1.1"
fi
echo "setup: $(.venv/bin/python -c 'import importlib.metadata as m, torch, pyarrow, duckdb, sparsify; v = m.version("eai-sparsify"); print(f"torch {torch.__version__}, eai-sparsify {v}, pyarrow {pyarrow.__version__}, duckdb {duckdb.__version__}")')"
