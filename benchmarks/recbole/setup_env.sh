#!/usr/bin/env bash
# Create benchmarks/recbole/.venv with RecBole 1.2.1, kept apart from the project's .venv
# because RecBole pins old numpy/pandas-era behaviour. Idempotent: a second run is quick.
#
# torch goes in first, pinned (scripts/venv.sh), so resolving recbole's unpinned `torch>=1.10`
# never pulls a multi-GB CUDA build; PIP_FIND_LINKS (or TORCH_INDEX_URL) must offer the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")"
source ../../scripts/venv.sh

venv_with_torch
# recbole's own requirements cover what it imports at run time (scipy, colorlog, colorama,
# tensorboard, thop, texttable, tabulate, plotly, psutil, ray, scikit-learn, pyyaml, tqdm);
# numpy 2 and pandas 3 break its dataset code.
if ! venv_has recbole 1.2.1; then
  venv_pip "torch==$TORCH_VERSION" "recbole==1.2.1" "numpy<2" "pandas<3"
fi
echo "setup: $(.venv/bin/python -c 'import torch, recbole, numpy, pandas; print(f"torch {torch.__version__}, recbole {recbole.__version__}, numpy {numpy.__version__}, pandas {pandas.__version__}")')"
