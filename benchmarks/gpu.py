"""The CUDA paths on one GPU: every trainer and the activation writer of the default pipeline
run on the accelerator, against the CPU-trained models of a default store.

Reads a default store's `data/` (`--data`: the sequences and the models that `recsae
materialize` trained on the CPU) and, on `--device` (default `cuda`), through the same
functions the assets call:
- `sasrec`, `teacher`, `student`, `student_ce`: each trained from scratch as its asset trains it
  (same configs, seeds, schedules; the teacher over the device-trained SASRec's item vectors,
  the students from that teacher's initialisation), timed; its test NDCG@10 against the
  store's CPU-trained model, paired over the same test users with a bootstrap 95% CI;
- `evaluation`: each store model scored on the CPU and on the device (the same weights):
  the share of test users whose target rank is the same, and the NDCG@10 difference;
- `activations`: `write_activations` of the store's SASRec at every layer on the device into
  `--work` (a store `benchmarks/sae.py --data-dir` reads), timed against the bare forward pass
  over the same batches, and the largest difference from the same extraction on the CPU;
- `teacher_large`: the teacher at configs/gpu-large.yaml's sizes (hidden 128, 8 layers, 4
  heads, FFN 4x, batch 512, patience 5, 40 epochs at most) on the default data.

    .venv/bin/python benchmarks/gpu.py --data /tmp/recsae-h0/data --work /tmp/gpu-store
    .venv/bin/python benchmarks/gpu.py --data ... --device cpu --quick   # a check, on the CPU

`--quick` caps every training at 2 epochs (a check that the script runs, no figures).
Results: benchmarks/results/gpu.json (`--out`), rewritten after each stage so a run cut short
keeps the stages it finished; then `benchmarks/sae.py --device cuda --data-dir <work>/data`
for the SAE against sparsify on the same GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.activations import cpu_model  # noqa: E402
from recsae_pipeline.activations.shards import load_activations, write_activations  # noqa: E402
from recsae_pipeline.data.batching import pad_right  # noqa: E402
from recsae_pipeline.data.sequences import read_sequences  # noqa: E402
from recsae_pipeline.models.artifacts import initial_state, load_recommender  # noqa: E402
from recsae_pipeline.models.distillation import DistillConfig, train_student  # noqa: E402
from recsae_pipeline.models.metrics import full_ranking_metrics, per_user_ndcg  # noqa: E402
from recsae_pipeline.models.recommender import (  # noqa: E402
    Recommender,
    RecommenderConfig,
    student_from_teacher,
)
from recsae_pipeline.models.training import (  # noqa: E402
    LLAMA_TRAINING,
    SASREC_TRAINING,
    TrainConfig,
    TrainResult,
    train_recommender,
    user_ranks,
)
from recsae_pipeline.report.stats import compare  # noqa: E402
from recsae_pipeline.storage.atomic import write_json  # noqa: E402
from recsae_pipeline.storage.registry import ArtifactPaths  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "gpu.json"
MODELS = ("sasrec", "teacher", "student", "student_ce")
LARGE_TEACHER = {"hidden_size": 128, "num_layers": 8, "num_heads": 4, "ffn_mult": 4}
"""configs/gpu-large.yaml's teacher sizes (its schedule: LARGE_TRAINING)."""
LARGE_TRAINING = dataclasses.replace(LLAMA_TRAINING, max_epochs=40, patience=5, batch_size=512)
STUDENT_LAYERS = 2
"""The student asset's default depth (`student_from_teacher`'s)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _test_ranks(
    model: Recommender, sequences: list[np.ndarray], device: torch.device
) -> torch.Tensor:
    """Each user's 0-based full-ranking rank of their test target."""
    ranks, _ = user_ranks(model, sequences, "test", device)
    return ranks


def _trained(
    name: str,
    train: Callable[[], TrainResult],
    model: Recommender,
    cpu_model: Recommender,
    sequences: list[np.ndarray],
    device: torch.device,
) -> dict[str, Any]:
    """Train on the device, then its test NDCG@10 against the CPU-trained model's."""
    _sync(device)
    start = time.perf_counter()
    result = train()
    _sync(device)
    seconds = time.perf_counter() - start
    ours = per_user_ndcg(_test_ranks(model, sequences, device), 10).tolist()
    theirs = per_user_ndcg(_test_ranks(cpu_model, sequences, device), 10).tolist()
    c = compare(
        name, "test NDCG@10", f"{device.type}-trained", ours, "cpu-trained", theirs, "users"
    )
    print(f"{name}: {seconds:.1f} s, {result.epochs_run} epochs", flush=True)
    return {
        "seconds": seconds,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "seconds_per_epoch": [round(r.seconds, 4) for r in result.history],
        "best_valid_ndcg@10": result.best_valid["ndcg@10"],
        "test_vs_cpu_trained": c.as_dict(),
    }


def _trained_recommender(
    name: str, model: Recommender, cpu_model: Recommender, sequences: list[np.ndarray],
    num_items: int, config: TrainConfig, device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """`_trained` for a model of the default next-item loss (`train_recommender`)."""
    return _trained(
        name, lambda: train_recommender(model, sequences, num_items, config, device), model,
        cpu_model, sequences, device,
    )  # fmt: skip


def _capped(config: TrainConfig, quick: bool) -> TrainConfig:
    return dataclasses.replace(config, max_epochs=2, progress_bar=False) if quick else config


def stage_models(
    paths: ArtifactPaths, sequences: list[np.ndarray], num_items: int, device: torch.device,
    quick: bool,
) -> dict[str, Any]:  # fmt: skip
    """The four model assets' training on the device, as the assets train them."""
    cpu = {name: load_recommender(paths.model_dir(name), device) for name in MODELS}
    out: dict[str, Any] = {}

    torch.manual_seed(SASREC_TRAINING.seed)
    sasrec = Recommender(RecommenderConfig.sasrec(num_items))
    out["sasrec"] = _trained_recommender(
        "sasrec", sasrec, cpu["sasrec"], sequences, num_items, _capped(SASREC_TRAINING, quick),
        device,
    )  # fmt: skip

    item_table = sasrec.item_vectors.detach()
    torch.manual_seed(LLAMA_TRAINING.seed)
    teacher = Recommender(
        RecommenderConfig.teacher(num_items, d_item=item_table.shape[1]), item_table=item_table
    )
    init = initial_state(teacher)
    config = _capped(LLAMA_TRAINING, quick)
    out["teacher"] = _trained_recommender(
        "teacher", teacher, cpu["teacher"], sequences, num_items, config, device
    )

    for name, distill in (("student", True), ("student_ce", False)):
        initial = Recommender(teacher.config, item_table=item_table)
        initial.load_state_dict(init)
        torch.manual_seed(LLAMA_TRAINING.seed)
        student = student_from_teacher(initial.to(device), num_layers=STUDENT_LAYERS)
        distill_config = DistillConfig(distill=distill)
        out[name] = _trained(
            name, lambda s=student, d=distill_config: train_student(
                s, teacher, sequences, num_items, config, d, device
            ), student, cpu[name], sequences, device,
        )  # fmt: skip
    return out


def stage_evaluation(
    paths: ArtifactPaths, sequences: list[np.ndarray], device: torch.device
) -> dict[str, Any]:
    """The same saved weights scored on the CPU and on the device."""
    out = {}
    for name in MODELS:
        ranks = {
            kind: _test_ranks(load_recommender(paths.model_dir(name), d), sequences, d)
            for kind, d in (("cpu", torch.device("cpu")), ("device", device))
        }
        out[name] = {
            "same_rank_share": float((ranks["cpu"] == ranks["device"]).double().mean()),
            "cpu_ndcg@10": full_ranking_metrics(ranks["cpu"])["ndcg@10"],
            "device_ndcg@10": full_ranking_metrics(ranks["device"])["ndcg@10"],
        }
    return out


def stage_activations(
    paths: ArtifactPaths, work: ArtifactPaths, sequences: list[np.ndarray], device: torch.device,
    repeats: int,
) -> dict[str, Any]:  # fmt: skip
    """write_activations on the device vs the bare forward, and vs the CPU's extraction."""
    model = load_recommender(paths.model_dir("sasrec"), device).eval()
    max_len, batch_users = model.config.max_len, 256

    def bare() -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(sequences), batch_users):
                batch = pad_right([s[-max_len:] for s in sequences[i : i + batch_users]])
                model(batch.to(device))
        _sync(device)
        return time.perf_counter() - start

    out: dict[str, Any] = {}
    for layer in range(1, model.config.num_layers + 1):
        target = work.partition("sasrec", layer).activations
        bare_runs, extraction_runs = [], []
        bare()  # warm-up: kernels, allocator
        for _ in range(repeats):
            bare_runs.append(bare())
            start = time.perf_counter()
            report = write_activations(model, sequences, layer, target, device, batch_users)
            extraction_runs.append(time.perf_counter() - start)
        cpu_dir = work.root / "cpu-activations" / f"layer={layer}"
        write_activations(
            load_recommender(paths.model_dir("sasrec"), torch.device("cpu")),
            sequences, layer, cpu_dir, torch.device("cpu"), batch_users,
        )  # fmt: skip
        budget = 8 << 30
        on_device = load_activations(target, budget)["activation"]
        on_cpu = load_activations(cpu_dir, budget)["activation"]
        scale = float(on_cpu.abs().max())
        out[f"layer{layer}"] = {
            "rows": report.rows,
            "bare_forward_seconds": float(np.median(bare_runs)),
            "extraction_seconds": float(np.median(extraction_runs)),
            "extraction_over_forward": float(np.median(extraction_runs) / np.median(bare_runs)),
            "runs_seconds": {"bare": bare_runs, "extraction": extraction_runs},
            "max_abs_difference_to_cpu": float((on_device - on_cpu).abs().max()),
            "max_abs_activation": scale,
        }
    return out


def stage_teacher_large(
    paths: ArtifactPaths, sequences: list[np.ndarray], num_items: int, device: torch.device,
    quick: bool,
) -> dict[str, Any]:  # fmt: skip
    """configs/gpu-large.yaml's teacher sizes and schedule on the default data."""
    item_table = load_recommender(paths.model_dir("sasrec"), device).item_vectors.detach()
    torch.manual_seed(LARGE_TRAINING.seed)
    config = RecommenderConfig.teacher(num_items, d_item=item_table.shape[1], **LARGE_TEACHER)
    teacher = Recommender(config, item_table=item_table)
    cpu_teacher = load_recommender(paths.model_dir("teacher"), device)
    train = _capped(LARGE_TRAINING, quick)
    result = _trained_recommender(
        "teacher_large", teacher, cpu_teacher, sequences, num_items, train, device
    )
    return result | {
        "sizes": LARGE_TEACHER,
        "parameters": sum(p.numel() for p in teacher.parameters()),
    }


def environment(device: torch.device) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "device": str(device),
        "commit": os.environ.get("RECSAE_COMMIT") or _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    return facts


def _git_commit() -> str:
    import subprocess

    done = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown (no git here: set RECSAE_COMMIT)"


STAGES = ("evaluation", "activations", "models", "teacher_large")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="a default store's data/")
    parser.add_argument("--work", type=Path, default=Path("/tmp/recsae-gpu"))
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--repeats", type=int, default=3, help="timed extraction runs")
    parser.add_argument("--quick", action="store_true", help="2 epochs per model: a check")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    paths, work = ArtifactPaths(args.data), ArtifactPaths(args.work / "data")
    if not paths.model_dir("student_ce").is_dir():
        raise SystemExit(f"{args.data} has no trained models: run `recsae materialize` first")
    sequences, num_items = read_sequences(paths.sequences)
    command = "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {
        "command": command,
        "environment": environment(device),
        "users": len(sequences),
        "num_items": num_items,
        "quick": args.quick,
        "stages": {},
    }
    for stage in args.stages:
        start = time.perf_counter()
        print(f"== {stage}", flush=True)
        if stage == "evaluation":
            facts = stage_evaluation(paths, sequences, device)
        elif stage == "activations":
            facts = stage_activations(paths, work, sequences, device, args.repeats)
        elif stage == "models":
            facts = stage_models(paths, sequences, num_items, device, args.quick)
        else:
            facts = stage_teacher_large(paths, sequences, num_items, device, args.quick)
        result["stages"][stage] = facts | {"stage_seconds": time.perf_counter() - start}
        write_json(result, args.out)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
