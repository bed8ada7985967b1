"""Scale-out benchmark: the `sae` asset trained in process against `torchrun` through Pipes.

Copies one materialized partition's inputs (sequences, the model, its activations) from a
storage root into a temporary one, then materializes the `sae` asset there with each
launcher, `--repeats` times, and reports wall time, the training loop's rows/s and the
held-out FVU. The source root is never written to.

    .venv/bin/python benchmarks/scaleout.py [--data-dir data] [--partition sasrec.layer2]
        [--nproc 2] [--rows-seen 500000] [--repeats 2]

Results: benchmarks/results/scaleout.json and a printed table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def copy_inputs(source: Path, target: Path, model: str, layer: int) -> None:
    from recsae_pipeline.storage.registry import ArtifactPaths

    src, dst = ArtifactPaths(source), ArtifactPaths(target)
    for a, b in (
        (src.sequences_dir, dst.sequences_dir),
        (src.model_dir(model), dst.model_dir(model)),
        (
            src.partition_dir("activations", model, layer),
            dst.partition_dir("activations", model, layer),
        ),
    ):
        if not a.exists():
            raise SystemExit(f"{a} is missing: run `recsae materialize` on {source} first")
        shutil.copytree(a, b)


def run_once(root: Path, partition: str, launcher: str, nproc: int, rows_seen: int) -> dict:
    import dagster as dg

    from recsae_pipeline.defs.assets import sae as sae_assets
    from recsae_pipeline.defs.resources import StorageRoot, TorchDevice
    from recsae_pipeline.storage.registry import ArtifactPaths, parse_partition_key

    config = {"launcher": launcher, "nproc_per_node": nproc, "rows_seen": rows_seen}
    started = time.perf_counter()
    result = dg.materialize(
        [sae_assets.sae],
        resources={"storage": StorageRoot(path=str(root)), "device": TorchDevice(device="cpu")},
        partition_key=partition,
        run_config={"ops": {"sae": {"config": config}}},
    )
    wall = time.perf_counter() - started
    assert result.success
    metrics_path = ArtifactPaths(root).partition_dir("sae", *parse_partition_key(partition))
    metrics = json.loads((metrics_path / "metrics.json").read_text())
    return {
        "launcher": launcher,
        "nproc_per_node": nproc if launcher == "torchrun" else 1,
        "wall_s": round(wall, 2),
        "train_s": round(metrics["seconds"], 2),
        "rows_per_s": round(metrics["rows_per_second"]),
        "heldout_fvu": metrics["heldout"]["fvu"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--partition", default="sasrec.layer2")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rows-seen", type=int, default=500_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    from recsae_pipeline.storage.registry import parse_partition_key

    model, layer = parse_partition_key(args.partition)
    rows = []
    with tempfile.TemporaryDirectory(prefix="recsae-scaleout-") as tmp:
        root = Path(tmp)
        copy_inputs(Path(args.data_dir).resolve(), root, model, layer)
        for _ in range(args.repeats):
            for launcher in ("in_process", "torchrun"):
                row = run_once(root, args.partition, launcher, args.nproc, args.rows_seen)
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = ROOT / "results" / "scaleout.json"
    out.write_text(json.dumps({"partition": args.partition, "runs": rows}, indent=2) + "\n")
    print(f"\n{'launcher':<12} {'ranks':>5} {'wall s':>7} {'train s':>8} {'rows/s':>8} {'FVU':>8}")
    for r in rows:
        print(
            f"{r['launcher']:<12} {r['nproc_per_node']:>5} {r['wall_s']:>7.1f} {r['train_s']:>8.1f} "
            f"{r['rows_per_s']:>8,} {r['heldout_fvu']:>8.4f}"
        )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
