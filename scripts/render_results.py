"""Render the README's results section from the committed files in benchmarks/results/.

    .venv/bin/python scripts/render_results.py            # rewrite README.md's section
    .venv/bin/python scripts/render_results.py --check    # exit 1 when README.md differs
    # keep a run's reports/results.json as a named result file, with the command behind it:
    .venv/bin/python scripts/render_results.py --take data/reports/results.json \
        --as default_run --command "recsae materialize"

recsae_pipeline_tests/test_readme_results.py runs the check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsae_pipeline.report.readme import render, replace_section  # noqa: E402
from recsae_pipeline.storage.atomic import write_bytes, write_json  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a diff")
    parser.add_argument("--take", type=Path, help="a run's reports/results.json to keep")
    parser.add_argument("--as", dest="name", help="its name under benchmarks/results/")
    parser.add_argument("--command", help="the command that produced the run")
    args = parser.parse_args()
    if args.take:
        if not (args.name and args.command):
            parser.error("--take needs --as NAME and --command '...'")
        run = json.loads(args.take.read_text()) | {"command": args.command}
        print(f"wrote {write_json(run, RESULTS_DIR / f'{args.name}.json')}")
    readme = README.read_text()
    rendered = replace_section(readme, render(RESULTS_DIR))
    if args.check:
        if rendered != readme:
            print(
                "README.md's results section differs from the result files; run "
                "`.venv/bin/python scripts/render_results.py`",
                file=sys.stderr,
            )
            return 1
        return 0
    if rendered != readme:
        write_bytes(rendered.encode(), README)
        print("README.md: results section rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
