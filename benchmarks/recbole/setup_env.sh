#!/usr/bin/env bash
# Create benchmarks/recbole/.venv with RecBole 1.2.1, kept apart from the project's .venv
# because RecBole pins old numpy/pandas-era behaviour. Idempotent: a second run is quick.
#
# torch goes in first, pinned, so resolving recbole's unpinned `torch>=1.10` never pulls a
# multi-GB CUDA build; PIP_FIND_LINKS (or TORCH_INDEX_URL) must offer the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  .venv/bin/pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
fi
# recbole's own requirements cover what it imports at run time (scipy, colorlog, colorama,
# tensorboard, thop, texttable, tabulate, plotly, psutil, ray, scikit-learn, pyyaml, tqdm);
# numpy 2 and pandas 3 break its dataset code.
if ! .venv/bin/python -c "import recbole, sys; sys.exit(0 if recbole.__version__ == '1.2.1' else 1)" 2>/dev/null; then
  .venv/bin/pip install -q "torch==$TORCH_VERSION" "recbole==1.2.1" "numpy<2" "pandas<3" \
    2> >(grep -v "^WARNING: Location" >&2)
fi
echo "setup: $(.venv/bin/python -c 'import torch, recbole, numpy, pandas; print(f"torch {torch.__version__}, recbole {recbole.__version__}, numpy {numpy.__version__}, pandas {pandas.__version__}")')"
