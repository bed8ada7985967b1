"""Activations benchmark: extraction overhead, write and read throughput, memory at 1x and 10x.

For each scale of the synthetic log (1x = the default 3,000 users, 10x = 30,000) one process
builds the sequences, then a fresh one (as a pipeline step starts) takes a SASRec (hidden 64, 2 blocks; trained weights do not
change the cost, so it is freshly initialised) and measures:
- the bare forward pass over every user (same batches) vs `write_activations` at layer 2, with
  a writer thread (`writer_queue=2`) and on the caller's thread (`writer_queue=0`),
  interleaved `--repeats` times after one untimed run of each kind (the order rotating); the
  medians are reported, every run is kept with the load average; the headline ratio is the
  mode `write_activations` picks by default here (`default_writer_queue`), and each mode's
  forward time inside extraction shows what a writer thread costs the forward;
- write MB/s of the Parquet shards, reader rows/s into torch tensors (shuffled, batch 4096);
- peak RSS of the process (extraction only, so 1x vs 10x shows whether memory grows with data);
- latency of the README's DuckDB queries over the `activations` view.

    .venv/bin/python benchmarks/activations.py            # both scales
    .venv/bin/python benchmarks/activations.py --scales 1

Results: benchmarks/results/activations.json and a printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

README_QUERIES = {
    "rows and mean norm per model/layer": (
        "SELECT model, layer, count(*) AS rows, "
        "avg(sqrt(list_sum(list_transform(activation::FLOAT[], lambda x: x * x)))) AS mean_norm "
        "FROM activations GROUP BY ALL ORDER BY ALL"
    ),
    "top positions of one dimension with titles": (
        "SELECT a.user_idx, a.position, i.title, a.activation[5] AS dim_4 FROM activations a "
        "JOIN items i ON i.item_idx = a.item_idx WHERE a.model = 'sasrec' AND a.layer = 2 "
        "ORDER BY dim_4 DESC LIMIT 10"
    ),
}


def measure(scale: int, out: Path, threads: int, repeats: int, prepare: bool = False) -> dict:
    """Runs in its own process so that its peak RSS belongs to this scale alone; with
    `prepare`, only builds that scale's data (in an earlier process: an in-process build left
    the bare forward about 1 s slower at 10x, not the extraction, which skewed the ratio)."""
    import duckdb
    import torch

    from recsae_pipeline.activations.shards import (
        default_writer_queue,
        iter_activation_batches,
        write_activations,
    )
    from recsae_pipeline.data.batching import pad_right
    from recsae_pipeline.data.catalog import build_catalog
    from recsae_pipeline.data.sequences import SequenceConfig, build_sequences, read_sequences
    from recsae_pipeline.data.sources import SyntheticSource, ingest
    from recsae_pipeline.data.synthetic import SyntheticConfig
    from recsae_pipeline.models.recommender import Recommender, RecommenderConfig
    from recsae_pipeline.storage.registry import ArtifactPaths
    from recsae_pipeline.storage.warehouse import query, refresh_views

    torch.set_num_threads(threads)
    paths = ArtifactPaths(out / f"scale{scale}")
    if prepare:  # the data in a process of its own: the timed one starts as a pipeline step
        ingest(SyntheticSource(SyntheticConfig(n_users=3000 * scale)), paths)
        build_catalog(paths)
        build_sequences(paths, SequenceConfig())
        return {}
    sequences, num_items = read_sequences(paths.sequences)
    torch.manual_seed(0)
    model = Recommender(RecommenderConfig.sasrec(num_items)).eval()
    device = torch.device("cpu")
    max_len, batch_users = model.config.max_len, 256

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out_dir = paths.partition("sasrec", 2).activations

    def bare_forward() -> float:
        start = time.perf_counter()
        with torch.no_grad():  # the bare forward pass: same batches, no hook, nothing kept
            for i in range(0, len(sequences), batch_users):
                model(pad_right([s[-max_len:] for s in sequences[i : i + batch_users]]))
        return time.perf_counter() - start

    def extraction(writer_queue: int):
        return write_activations(
            model, sequences, 2, out_dir, device, batch_users=batch_users, writer_queue=writer_queue
        )

    # warm up (allocator, kernels, the shard files' pages): one untimed run of each kind, as
    # a few batches left the first timed run about twice as slow as the rest (it was always a
    # bare one, which flattered the ratio)
    bare_forward(), extraction(2), extraction(0)
    runs: dict[str, list[float]] = {"bare": [], "threaded": [], "synchronous": []}
    loads = [os.getloadavg()]
    reports = {}
    for repeat in range(repeats):
        order = list(runs)[repeat % 3 :] + list(runs)[: repeat % 3]
        for kind in order:
            if kind == "bare":
                runs[kind].append(bare_forward())
            else:
                reports[kind] = extraction(2 if kind == "threaded" else 0)
                runs[kind].append(reports[kind].seconds)
        loads.append(os.getloadavg())
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bare = statistics.median(runs["bare"])
    default_kind = "threaded" if default_writer_queue(device) else "synchronous"
    chosen = statistics.median(runs[default_kind])
    report = reports[default_kind]

    start, rows = time.perf_counter(), 0
    for batch in iter_activation_batches(
        paths.partition("sasrec", 2).activations, batch_size=4096, seed=0
    ):
        rows += len(batch["activation"])
    read_seconds = time.perf_counter() - start

    refresh_views(paths)
    latencies = {}
    for name, sql in README_QUERIES.items():
        query(paths.duckdb, sql).fetchall()  # warm the OS cache once
        start = time.perf_counter()
        query(paths.duckdb, sql).fetchall()
        latencies[name] = time.perf_counter() - start
    del duckdb
    return {
        "scale": scale,
        "users": len(sequences),
        "rows": report.rows,
        "dim": report.dim,
        "bare_forward_seconds": bare,
        "default_mode": default_kind,
        "extraction_seconds": chosen,
        "extraction_over_forward": chosen / bare,
        # best of the runs: other work on the machine only ever slows a run down
        "best_extraction_over_forward": min(runs[default_kind]) / min(runs["bare"]),
        "threaded_extraction_over_forward": statistics.median(runs["threaded"]) / bare,
        "bare_forward_spread_seconds": [min(runs["bare"]), max(runs["bare"])],
        "synchronous_extraction_over_forward": statistics.median(runs["synchronous"]) / bare,
        "extraction_forward_seconds": report.forward_seconds,
        "forward_seconds_inside": {k: r.forward_seconds for k, r in reports.items()},
        "runs_seconds": runs,
        "run_ratios": [t / b for t, b in zip(runs[default_kind], runs["bare"], strict=True)],
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": loads,
        "megabytes": report.bytes / 2**20,
        "write_mb_per_s": report.bytes / 2**20 / chosen,
        "reader_rows_per_s": rows / read_seconds,
        "reader_rows": rows,
        "peak_rss_mb": peak_rss_mb,
        "rss_before_extraction_mb": rss_before / 1024,
        "duckdb_seconds": latencies,
    }


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=2, help="interleaved runs of each kind per scale"
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.out_dir / "activations_data"
    if args.child is not None:
        print(json.dumps(measure(args.child, work, args.threads, args.repeats, args.prepare)))
        return
    results = []
    for scale in args.scales:
        print(f"== scale {scale}x ...", flush=True)
        command = [sys.executable, __file__, "--child", str(scale), "--threads", str(args.threads), "--repeats", str(args.repeats), "--out-dir", str(args.out_dir)]  # fmt: skip
        subprocess.run([*command, "--prepare"], check=True, capture_output=True, text=True)
        child = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "command": " ".join([".venv/bin/python benchmarks/activations.py", *sys.argv[1:]]),
        "commit": _git_commit(),
        "machine": f"{platform.node()} {platform.machine()} ({cpu_model()}), "
        f"{os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        "load_average_1_5_15_at_end": os.getloadavg(),
        "scales": results,
    }
    (args.out_dir / "activations.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        "| scale | users | rows | extraction (default mode) / bare forward | threaded / bare | synchronous / bare | write MB/s | reader rows/s | peak RSS MB | DuckDB query s | load (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        q = ", ".join(f"{v:.3f}" for v in r["duckdb_seconds"].values())
        print(
            f"| {r['scale']}x | {r['users']:,} | {r['rows']:,} | {r['extraction_over_forward']:.2f}x ({r['default_mode']}) | {r['threaded_extraction_over_forward']:.2f}x | {r['synchronous_extraction_over_forward']:.2f}x | {r['write_mb_per_s']:.1f} | {r['reader_rows_per_s']:,.0f} | {r['peak_rss_mb']:.0f} | {q} | {max(load[0] for load in r['load_average_1_5_15']):.1f} |"
        )


if __name__ == "__main__":
    main()
