#!/usr/bin/env bash
# Create .venv and install the project with its dev tools. Idempotent: a second run is quick.
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

# The browser tests (pytest -m ui) drive the system Chromium and chromedriver; without them
# they skip. As root with apt, install them (refreshing the package lists only if needed).
apt_install_browser() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    chromium chromium-driver >/dev/null
}
BROWSER_HINT="browser tests will be skipped; enable them with: apt-get install -y chromium chromium-driver"
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ -z "${RECSAE_SKIP_BROWSER:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium and chromium-driver for the browser tests (RECSAE_SKIP_BROWSER=1 skips this)"
    apt_install_browser || { apt-get update -q >/dev/null && apt_install_browser; } ||
      echo "setup: apt-get could not install chromium; $BROWSER_HINT" >&2
  else
    echo "setup: no /usr/bin/chromium or /usr/bin/chromedriver: $BROWSER_HINT"
  fi
fi
echo "setup: $(.venv/bin/python -c 'import torch, dagster, great_expectations as gx; print(f"torch {torch.__version__}, dagster {dagster.__version__}, GX {gx.__version__}")')"
