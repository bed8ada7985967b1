# Sourced (not run) by scripts/setup.sh and benchmarks/*/setup_env.sh, after they cd into the
# folder whose .venv they build. torch goes in first, pinned, so pip never resolves an unpinned
# `torch` (the project's or a benchmark's dependency) to a multi-GB CUDA build on a CPU-only
# machine: point TORCH_INDEX_URL at PyTorch's CPU wheel index
# (https://download.pytorch.org/whl/cpu), or PIP_FIND_LINKS at a folder holding the wheel, or
# TORCH_INDEX_URL at a CUDA index on a GPU machine.
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

# venv_pip ARGS...: quiet `pip install` into .venv, without the warnings about unreadable
# find-links locations.
venv_pip() {
  .venv/bin/pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

# venv_has DIST VERSION: whether .venv holds distribution DIST at VERSION (a local +cpu tag
# aside).
venv_has() {
  .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('$1').split('+')[0] == '$2' else 1)" 2>/dev/null
}

# venv_with_torch: .venv (made with $PYTHON when missing) holding torch==$TORCH_VERSION.
venv_with_torch() {
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
  fi
  if ! venv_has torch "$TORCH_VERSION"; then
    venv_pip ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
  fi
}
