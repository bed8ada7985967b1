"""Fuzz the tabular, MovieLens and RecBole readers with many examples (issue 13, item 6).

The same property as recsae_pipeline_tests/test_fuzz_readers.py (`fuzz_support.check_case`):
each example ends in a DataSourceError naming the file, or in tables meeting the raw
contracts, with nothing half-written. Prints per reader how many examples ran, per input
class, and every class that broke the property (known: pinned by an xfail test; NEW: not yet).

    .venv/bin/python benchmarks/fuzz_readers.py                 # --examples 3000 --seed 0
    .venv/bin/python benchmarks/fuzz_readers.py --examples 200 --readers tabular --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings

from recsae_pipeline_tests.fuzz_support import READERS, Case, cases, check_case, known_break


def fuzz_reader(reader: str, examples: int, random_seed: int) -> dict:
    """Run `examples` cases of `reader` without stopping at a failure; counts and breaks."""
    ran: Counter[str] = Counter()
    breaks: dict[str, dict] = defaultdict(lambda: {"count": 0, "known": None, "example": None})

    @seed(random_seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],  # every example counts once: no shrinking, no replay
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases(reader))
    def run(case: Case) -> None:
        input_class = case.input_class.split(" in ")[0]
        ran[input_class] += 1
        with tempfile.TemporaryDirectory() as tmp:
            failure = check_case(case, Path(tmp))
        if failure is None:
            return
        entry = breaks[f"{input_class} | {failure.signature}"]
        entry["count"] += 1
        entry["known"] = known_break(failure)
        data = dict(case.files)[case.mutated]
        if entry["example"] is None or len(data) < len(entry["example"]["input"]):
            entry["example"] = {"file": case.mutated, "input": data, "detail": failure.detail}

    start = time.perf_counter()
    run()
    for entry in breaks.values():
        entry["example"]["input"] = repr(entry["example"]["input"][:120])
    return {
        "examples": sum(ran.values()),
        "seconds": round(time.perf_counter() - start, 1),
        "input_classes": dict(ran.most_common()),
        "breaks": dict(breaks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=3000, help="examples per reader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readers", nargs="+", choices=sorted(READERS), default=sorted(READERS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = {}
    for reader in args.readers:
        result = results[reader] = fuzz_reader(reader, args.examples, args.seed)
        print(f"\n{reader}: {result['examples']} examples in {result['seconds']} s")
        print("  " + ", ".join(f"{k} {v}" for k, v in result["input_classes"].items()))
        if not result["breaks"]:
            print("  no input class broke the property")
        for key, entry in sorted(result["breaks"].items()):
            tag = f"known: {entry['known']}" if entry["known"] else "NEW"
            print(f"  {entry['count']:5d}  {key}  [{tag}]")
            print(f"         e.g. {entry['example']['file']} = {entry['example']['input']}")
            print(f"         {entry['example']['detail'].splitlines()[0][:160]}")
    new = sum(not e["known"] for r in results.values() for e in r["breaks"].values())
    print(f"\n{new} break(s) not pinned by a test yet")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "readers": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
