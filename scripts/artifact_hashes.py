"""sha256 of every artifact under a storage root, to check that a refactor keeps behaviour.

    .venv/bin/python scripts/artifact_hashes.py DATA_DIR > hashes.json
    .venv/bin/python scripts/artifact_hashes.py --compare before.json after.json

Wall-clock fields (any JSON key naming seconds, a time or a date) are dropped before a JSON
file is hashed, so two runs of the same code hash the same; Parquet files are hashed by
their decoded rows (schema and values, rows in sorted order since DuckDB writes parallel
aggregates in any order; wall-clock columns dropped, the storage root replaced by `<root>`),
so a writer's version string does not count.
Version records (`.versions/`) and the DuckDB file hold provenance and timings, not results,
and are listed separately.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

WALL_CLOCK = re.compile(
    r"second|time|date|_at$|elapsed|duration|_s$|ms_per|peak_.*mb", re.IGNORECASE
)
SKIP_PARTS = {".versions", ".scratch", "rejected", ".locks"}


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not WALL_CLOCK.search(str(k))}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def file_digest(path: Path, root: Path) -> str:
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        else:
            text = json.dumps(_strip(obj), sort_keys=True)
            return hashlib.sha256(text.encode()).hexdigest()
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        table = table.select([c for c in table.column_names if not WALL_CLOCK.search(c)])
        rows = sorted(
            json.dumps(r, sort_keys=True, default=str).replace(str(root), "<root>")
            for r in table.to_pylist()
        )
        h = hashlib.sha256(str(table.schema.remove_metadata()).encode())
        for r in rows:
            h.update(r.encode())
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(
            p in SKIP_PARTS or p.startswith(".scratch") for p in rel.parts
        ):
            continue
        if path.suffix in {".duckdb", ".wal", ".log"} or "transcripts" in rel.parts:
            continue
        out[str(rel)] = file_digest(path, root)
    return out


def compare(before: dict[str, str], after: dict[str, str]) -> int:
    same = sorted(k for k in before if after.get(k) == before[k])
    changed = sorted(k for k in before if k in after and after[k] != before[k])
    gone = sorted(set(before) - set(after))
    new = sorted(set(after) - set(before))
    print(
        f"{len(same)} identical, {len(changed)} changed, {len(gone)} only before, {len(new)} only after"
    )
    for label, keys in (("changed", changed), ("only before", gone), ("only after", new)):
        for k in keys:
            print(f"  {label}: {k}")
    return 0 if not (changed or gone or new) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args(argv)
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.paths)
        return compare(a, b)
    json.dump(hashes(Path(args.paths[0])), sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
