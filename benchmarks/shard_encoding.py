"""Shard encoding benchmark: what the activation column costs the Parquet writer, by schema.

Writes the same float32 activations (`--rows` x `--dim`, 10x the default data's rows by
default; random normal, as near-random as real hidden states) the way `write_activations`
does (`parquet_writer`, activation values plain, `--row-group-rows` per row group), under:
- `nullable`: the schema before commit 4de1d25, a nullable list of nullable floats;
- `not_null`: `activation_schema`'s column now, nothing nullable;
- `flat`: the same values as one plain float column, no list (not the data contract: the
  floor a list's repetition levels sit on).
Each is written `--repeats` times, interleaved; wall and process CPU seconds are kept (the
medians and every run), with a bootstrap 95% CI of the not-null / nullable ratio of
medians. The `nullable` and `not_null` files are read back through DuckDB and their rows
hashed: the schema change must not change a value.

    .venv/bin/python benchmarks/shard_encoding.py

Result: benchmarks/results/shard_encoding.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from benchmarks.activations import cpu_model  # noqa: E402
from recsae_pipeline.activations.shards import (  # noqa: E402
    _ACTIVATION_LEAF,
    activation_schema,
)
from recsae_pipeline.storage.atomic import parquet_writer, write_json  # noqa: E402
from recsae_pipeline.storage.sql import read_parquet  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "shard_encoding.json"


def git_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()


def tables(acts: np.ndarray, group: int) -> dict[str, tuple[pa.Schema, list[pa.Table]]]:
    """Per layout: its schema and the row groups to write (zero-copy views of `acts`)."""
    rows, dim = acts.shape
    nullable = pa.schema([("activation", pa.list_(pa.float32(), dim))])
    not_null = pa.schema([activation_schema(dim).field("activation")])
    flat = pa.schema([pa.field("activation", pa.float32(), nullable=False)])
    out: dict[str, tuple[pa.Schema, list[pa.Table]]] = {}
    for name, schema in (("nullable", nullable), ("not_null", not_null), ("flat", flat)):
        groups = []
        for start in range(0, rows, group):
            values = pa.array(acts[start : start + group].reshape(-1))
            column = (
                values
                if name == "flat"
                else pa.FixedSizeListArray.from_arrays(values, type=schema.field("activation").type)
            )
            groups.append(pa.table({"activation": column}, schema=schema))
        out[name] = (schema, groups)
    return out


def write(path: Path, schema: pa.Schema, groups: list[pa.Table]) -> tuple[float, float]:
    """Wall and process CPU seconds of writing `groups` as one shard (with its close)."""
    wall, cpu = time.perf_counter(), time.process_time()
    nested = pa.types.is_fixed_size_list(schema.field("activation").type)
    writer = parquet_writer(path, schema, plain=[_ACTIVATION_LEAF if nested else "activation"])
    for table in groups:
        writer.write_table(table, row_group_size=table.num_rows)
    writer.close()
    return time.perf_counter() - wall, time.process_time() - cpu


def rows_hash(path: Path) -> str:
    """sha256 of every row as DuckDB reads it, in file order."""
    digest = hashlib.sha256()
    query = f"SELECT activation::FLOAT[] AS activation FROM {read_parquet(path)}"
    for batch in duckdb.sql(query).to_arrow_reader():
        values = batch.column("activation").flatten()
        digest.update(values.to_numpy(zero_copy_only=False).astype(np.float32).tobytes())
    return digest.hexdigest()


def ratio_ci(a: list[float], b: list[float], draws: int = 10_000) -> list[float]:
    """Bootstrap 95% CI of median(a) / median(b), the runs of each resampled on their own."""
    rng = np.random.default_rng(0)
    x, y = np.asarray(a), np.asarray(b)
    ratios = np.median(rng.choice(x, (draws, len(x))), axis=1) / np.median(
        rng.choice(y, (draws, len(y))), axis=1
    )
    return [float(v) for v in np.percentile(ratios, [2.5, 97.5])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=808_743, help="10x the default data's")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--row-group-rows", type=int, default=65_536)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    acts = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32)
    layouts = tables(acts, args.row_group_rows)
    runs: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / f"{name}.parquet" for name in layouts}
        for name, (schema, groups) in layouts.items():  # warm up: page cache, allocator
            write(paths[name], schema, groups)
        for repeat in range(args.repeats):
            names = list(layouts)[repeat % 3 :] + list(layouts)[: repeat % 3]
            for name in names:
                wall, cpu = write(paths[name], *layouts[name])
                runs[name]["wall"].append(wall)
                runs[name]["cpu"].append(cpu)
        hashes = {name: rows_hash(paths[name]) for name in ("nullable", "not_null")}
        sizes = {name: paths[name].stat().st_size for name in layouts}
    medians = {
        name: {kind: statistics.median(v) for kind, v in r.items()} for name, r in runs.items()
    }
    out = {
        "benchmark": "benchmarks/shard_encoding.py",
        "command": "benchmarks/shard_encoding.py " + " ".join(sys.argv[1:]),
        "commit": git_commit(),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
        "rows": args.rows,
        "dim": args.dim,
        "row_group_rows": args.row_group_rows,
        "repeats": args.repeats,
        "megabytes": acts.nbytes / 2**20,
        "median_seconds": medians,
        "runs_seconds": runs,
        "file_bytes": sizes,
        "not_null_over_nullable": {
            kind: {
                "ratio": medians["not_null"][kind] / medians["nullable"][kind],
                "ci95": ratio_ci(runs["not_null"][kind], runs["nullable"][kind]),
            }
            for kind in ("wall", "cpu")
        },
        "same_values": hashes["nullable"] == hashes["not_null"],
        "rows_sha256": hashes,
        "load_average_at_end": os.getloadavg(),
    }
    print(f"wrote {write_json(out, args.out)}")
    for name, m in medians.items():
        print(f"  {name}: wall {m['wall']:.3f} s, CPU {m['cpu']:.3f} s (medians)")
    for kind, r in out["not_null_over_nullable"].items():
        print(f"  not_null / nullable {kind}: {r['ratio']:.2f}x, 95% CI {r['ci95']}")
    print(f"  same values under both list schemas: {out['same_values']}")
    return 0 if out["same_values"] else 1


if __name__ == "__main__":
    sys.exit(main())
