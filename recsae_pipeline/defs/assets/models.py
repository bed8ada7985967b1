"""Model assets: SASRec baseline, LLM-architecture teacher, SLMRec student (and its CE-only
ablation), the teacher's layer probe and the evaluation table, with their checks."""

from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from recsae_pipeline.data.sequences import read_sequences
from recsae_pipeline.defs.assets.data import sequences
from recsae_pipeline.defs.pipes import launch
from recsae_pipeline.defs.resources import StorageRoot, TorchDevice
from recsae_pipeline.defs.versioning import content_versioned
from recsae_pipeline.distributed.ranks import train_result
from recsae_pipeline.models.artifacts import load_recommender, read_metrics, save_recommender
from recsae_pipeline.models.distillation import DistillConfig, train_student
from recsae_pipeline.models.metrics import PopularityScorer
from recsae_pipeline.models.probe import layer_scores
from recsae_pipeline.models.profiling import profile_inference
from recsae_pipeline.models.recommender import Recommender, RecommenderConfig, student_from_teacher
from recsae_pipeline.models.training import (
    EpochReport,
    TrainConfig,
    TrainResult,
    evaluate,
    train_recommender,
)
from recsae_pipeline.report.plots import new_figure, save_figure
from recsae_pipeline.storage.atomic import write_json, write_parquet

GROUP = "models"
MODELS = ("sasrec", "teacher", "student", "student_ce")


class TrainingOptions(dg.Config):
    """Optimisation knobs shared by every model (AdamW, clipping, early stopping on valid NDCG@10)."""

    max_epochs: int = Field(
        default=200, description="Upper bound; early stopping usually ends sooner."
    )
    patience: int = Field(
        default=10, description="Epochs without a better validation NDCG@10 before stopping."
    )
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    progress_bar: bool = Field(
        default=True, description="tqdm bar over batches on stderr (only when it is a terminal)."
    )

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            max_epochs=self.max_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            grad_clip=self.grad_clip,
            patience=self.patience,
            seed=self.seed,
            progress=self.progress_bar,
        )


class SasrecConfig(TrainingOptions):
    """SASRec+ (hidden 64, 2 blocks): item table learned end to end."""

    hidden: int = 64
    layers: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_len: int = Field(default=50, description="Inputs keep their last max_len items.")
    launcher: Literal["in_process", "torchrun"] = Field(
        default="in_process",
        description="torchrun: train in an external DDP process launched through Dagster Pipes.",
    )
    nproc_per_node: int = Field(default=2, description="torchrun ranks (processes or GPUs).")


class TeacherConfig(TrainingOptions):
    """A deep Llama-architecture backbone over a projection of the frozen SASRec item vectors.

    Defaults are sized so the embedded data trains in minutes on a CPU; see configs/ for the
    GPU-sized setting (hidden 128+, longer training)."""

    hidden: int = 64
    layers: int = 8
    heads: int = 2
    ffn_mult: int = Field(default=2, description="Llama MLP width as a multiple of hidden.")
    dropout: float = 0.1
    max_len: int = 50
    lr: float = 2e-3
    max_epochs: int = 12
    patience: int = 3
    pretrained_path: str | None = Field(
        default=None,
        description="Local `transformers` checkpoint directory for the backbone (never a hub id).",
    )


class StudentConfig(TrainingOptions):
    """The teacher's first layers, trained with SLMRec's loss (or CE only for the ablation)."""

    layers: int = Field(default=2, description="Student depth; must divide the teacher's.")
    lambda_cosine: float = 1.0
    lambda_l2: float = 0.1
    lambda_supervision: float = 0.1
    lr: float = 2e-3
    max_epochs: int = 12
    patience: int = 3
    teacher_tolerance: float = Field(
        default=0.05,
        description="Warn when test NDCG@10 falls more than this fraction below the teacher's.",
    )


def _data(storage: StorageRoot) -> tuple[list[np.ndarray], int]:
    return read_sequences(storage.paths.sequences)


def _epoch_logger(context: dg.AssetExecutionContext, name: str):
    def log(report: EpochReport) -> None:
        terms = " ".join(f"{k}={v:.4f}" for k, v in report.loss_terms.items() if k != "ce")
        context.log.info(
            f"{name} epoch {report.epoch}: loss {report.train_loss:.4f} {terms} | valid NDCG@10 "
            f"{report.valid['ndcg@10']:.4f} HR@10 {report.valid['hr@10']:.4f} (best epoch "
            f"{report.best_epoch}) | {report.seconds:.1f}s, ETA <= {report.eta_seconds / 60:.1f} min"
        )

    return log


def _param_count(model: Recommender) -> int:
    """Trainable and frozen weights a deployment would ship (frozen item table included)."""
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n == "item_table"
    )


def _curve(result: TrainResult, name: str, path: Path) -> str:
    fig, ax = new_figure()
    epochs = [r.epoch for r in result.history]
    ax.plot(epochs, [r.train_loss for r in result.history], color="#4c72b0", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    twin = ax.twinx()
    twin.plot(
        epochs, [r.valid["ndcg@10"] for r in result.history], color="#dd8452", label="valid NDCG@10"
    )
    twin.axvline(result.best_epoch, color="grey", linestyle=":", linewidth=1)
    twin.set_ylabel("valid NDCG@10")
    ax.set_title(f"{name}: best epoch {result.best_epoch}")
    fig.legend(loc="upper center", ncols=2, fontsize=8, bbox_to_anchor=(0.5, 0.93))
    return save_figure(fig, path)


def _finish(
    context: dg.AssetExecutionContext,
    name: str,
    model: Recommender,
    result: TrainResult,
    storage: StorageRoot,
    device: torch.device,
    data: tuple[list[np.ndarray], int],
    extra: dict[str, Any] | None = None,
) -> dg.MaterializeResult:
    """Evaluate on test, save the model directory atomically, return metadata for the UI."""
    seqs, num_items = data
    test = evaluate(model, seqs, num_items, "test", device)
    metrics = {
        "valid": result.best_valid,
        "test": test,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": result.train_seconds,
        "params": _param_count(model),
        "history": [
            {
                "epoch": r.epoch,
                "train_loss": r.train_loss,
                **r.loss_terms,
                "valid_ndcg@10": r.valid["ndcg@10"],
                "seconds": r.seconds,
            }
            for r in result.history
        ],
        **(extra or {}),
    }
    path = save_recommender(model, storage.paths.model_dir(name), metrics)
    curve = _curve(result, name, storage.paths.reports_dir / f"training_{name}.png")
    context.log.info(
        f"{name}: test NDCG@10 {test['ndcg@10']:.4f}, HR@10 {test['hr@10']:.4f}; saved to {path}"
    )
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "params": metrics["params"],
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "train_seconds": dg.MetadataValue.float(round(result.train_seconds, 1)),
            **{
                f"valid_{k}": dg.MetadataValue.float(round(v, 4))
                for k, v in result.best_valid.items()
                if "@10" in k
            },
            **{
                f"test_{k}": dg.MetadataValue.float(round(v, 4))
                for k, v in test.items()
                if "@10" in k or k.endswith("mrr")
            },
            "training_curve": dg.MetadataValue.md(curve),
        }
    )


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"pytorch", "safetensors"},
    deps=[sequences],
    description="SASRec+ baseline: small GPT-2-block backbone, item table learned end to end, "
    "full-softmax cross-entropy at every position, early stopping on validation NDCG@10.",
)
@content_versioned(lambda paths, _: [paths.model_dir("sasrec")])
def sasrec(
    context: dg.AssetExecutionContext,
    config: SasrecConfig,
    storage: StorageRoot,
    device: TorchDevice,
) -> dg.MaterializeResult:
    seqs, num_items = _data(storage)
    dev = device.torch_device
    torch.manual_seed(config.seed)
    model = Recommender(
        RecommenderConfig.sasrec(
            num_items,
            hidden=config.hidden,
            d_item=config.hidden,
            layers=config.layers,
            heads=config.heads,
            dropout=config.dropout,
            max_len=config.max_len,
        )
    )
    launched = {}  # metadata rank 0 reported through Pipes
    if config.launcher == "torchrun":
        out = storage.paths.model_dir("sasrec")
        extras = {
            "sequences": str(storage.paths.sequences),
            "out": str(out),
            "model": asdict(model.config),
            "train": asdict(config.train_config()),
        }
        message, launched = launch(context, "sasrec", extras, config.nproc_per_node, dev.type)
        model, result = load_recommender(out, dev), train_result(message)
    else:
        result = train_recommender(
            model,
            seqs,
            num_items,
            config.train_config(),
            dev,
            on_epoch=_epoch_logger(context, "sasrec"),
        )
    done = _finish(context, "sasrec", model, result, storage, dev, (seqs, num_items))
    return dg.MaterializeResult(metadata={**launched, **done.metadata})


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"pytorch", "safetensors"},
    deps=[sasrec],
    description="Teacher: deep Llama-architecture backbone (default 8 layers); items enter as a "
    "learned projection of the frozen SASRec item vectors, scores against that table.",
)
@content_versioned(lambda paths, _: [paths.model_dir("teacher")])
def teacher(
    context: dg.AssetExecutionContext,
    config: TeacherConfig,
    storage: StorageRoot,
    device: TorchDevice,
) -> dg.MaterializeResult:
    seqs, num_items = _data(storage)
    dev = device.torch_device
    item_table = load_recommender(storage.paths.model_dir("sasrec"), dev).item_vectors.detach()
    torch.manual_seed(config.seed)
    model = Recommender(
        RecommenderConfig.teacher(
            num_items,
            d_item=item_table.shape[1],
            hidden=config.hidden,
            layers=config.layers,
            heads=config.heads,
            ffn_mult=config.ffn_mult,
            dropout=config.dropout,
            max_len=config.max_len,
            pretrained_path=config.pretrained_path,
        ),
        item_table=item_table,
    )
    result = train_recommender(
        model,
        seqs,
        num_items,
        config.train_config(),
        dev,
        on_epoch=_epoch_logger(context, "teacher"),
    )
    return _finish(
        context,
        "teacher",
        model,
        result,
        storage,
        dev,
        (seqs, num_items),
        {"pretrained_path": config.pretrained_path},
    )


def _student(
    context: dg.AssetExecutionContext,
    name: str,
    config: StudentConfig,
    distill: bool,
    storage: StorageRoot,
    device: TorchDevice,
) -> dg.MaterializeResult:
    seqs, num_items = _data(storage)
    dev = device.torch_device
    trained_teacher = load_recommender(storage.paths.model_dir("teacher"), dev)
    model = student_from_teacher(trained_teacher, layers=config.layers)
    distill_config = DistillConfig(
        distill, config.lambda_cosine, config.lambda_l2, config.lambda_supervision
    )
    result = train_student(
        model,
        trained_teacher,
        seqs,
        num_items,
        config.train_config(),
        distill_config,
        dev,
        on_epoch=_epoch_logger(context, name),
    )
    extra = {
        "distill": distill,
        "teacher_tolerance": config.teacher_tolerance,
        "distill_config": distill_config.__dict__,
    }
    return _finish(context, name, model, result, storage, dev, (seqs, num_items), extra)


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"pytorch", "safetensors"},
    deps=["teacher"],
    description="SLMRec student: the teacher's first layers, trained with CE + cosine and L2 "
    "alignment of block hidden states to the teacher + next-item heads on intermediate blocks.",
)
@content_versioned(lambda paths, _: [paths.model_dir("student")])
def student(
    context: dg.AssetExecutionContext,
    config: StudentConfig,
    storage: StorageRoot,
    device: TorchDevice,
) -> dg.MaterializeResult:
    return _student(context, "student", config, True, storage, device)


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"pytorch", "safetensors"},
    deps=["teacher"],
    description="Ablation: the same student, initialised the same way, trained on cross-entropy only.",
)
@content_versioned(lambda paths, _: [paths.model_dir("student_ce")])
def student_ce(
    context: dg.AssetExecutionContext,
    config: StudentConfig,
    storage: StorageRoot,
    device: TorchDevice,
) -> dg.MaterializeResult:
    return _student(context, "student_ce", config, False, storage, device)


class LayerProbeConfig(dg.Config):
    probe_epochs: int = Field(default=2, description="Epochs of the per-layer linear probes.")
    seed: int = 0


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"pytorch", "parquet"},
    deps=["teacher"],
    description="SLMRec's redundancy analysis: next-item quality read from each teacher layer "
    "(the teacher's own head on that layer, and a linear probe trained on it).",
)
@content_versioned(lambda paths, _: [paths.layer_probe])
def layer_probe(
    context: dg.AssetExecutionContext,
    config: LayerProbeConfig,
    storage: StorageRoot,
    device: TorchDevice,
) -> dg.MaterializeResult:
    seqs, num_items = _data(storage)
    dev = device.torch_device
    model = load_recommender(storage.paths.model_dir("teacher"), dev)
    scores = layer_scores(
        model, seqs, num_items, dev, probe_epochs=config.probe_epochs, seed=config.seed
    )
    rows = [
        {
            "layer": s.layer,
            "readout_ndcg@10": s.readout["ndcg@10"],
            "readout_hr@10": s.readout["hr@10"],
            "probe_ndcg@10": s.probe["ndcg@10"],
            "probe_hr@10": s.probe["hr@10"],
        }
        for s in scores
    ]
    path = write_parquet(pa.Table.from_pylist(rows), storage.paths.layer_probe)
    fig, ax = new_figure()
    layers = [r["layer"] for r in rows]
    ax.plot(layers, [r["probe_ndcg@10"] for r in rows], marker="o", label="trained linear probe")
    ax.plot(
        layers,
        [r["readout_ndcg@10"] for r in rows],
        marker="s",
        label="teacher's head (no training)",
    )
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("test NDCG@10")
    ax.set_xticks(layers)
    ax.legend(fontsize=8)
    ax.set_title("Next-item quality by layer")
    plot = save_figure(fig, storage.paths.reports_dir / "layer_probe.png")
    storage.refresh_duckdb()
    table = "| layer | probe NDCG@10 | readout NDCG@10 |\n|---|---|---|\n" + "\n".join(
        f"| {r['layer']} | {r['probe_ndcg@10']:.4f} | {r['readout_ndcg@10']:.4f} |" for r in rows
    )
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "layers": dg.MetadataValue.md(table),
            "plot": dg.MetadataValue.md(plot),
        }
    )


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"pytorch", "parquet"},
    deps=["sasrec", "teacher", "student", "student_ce"],
    description="One table for popularity, SASRec, teacher, student and the CE-only student: "
    "full-ranking HR/NDCG/MRR@10/20 (each user's seen items filtered), SLMRec's sampled "
    "protocol (1 positive + 999 seeded negatives), parameters, training time, inference cost.",
)
@content_versioned(lambda paths, _: [paths.recommender_eval])
def recommender_eval(
    context: dg.AssetExecutionContext, storage: StorageRoot, device: TorchDevice
) -> dg.MaterializeResult:
    seqs, num_items = _data(storage)
    dev = device.torch_device
    rows = []
    scorers: dict[str, Any] = {"popularity": PopularityScorer(seqs, num_items)}
    for name in MODELS:
        scorers[name] = load_recommender(storage.paths.model_dir(name), dev)
    for name, scorer in scorers.items():
        # Models were scored on test when trained (and a reload reproduces that exactly).
        saved = read_metrics(storage.paths.model_dir(name)) if name != "popularity" else {}
        test = saved.get("test") or evaluate(scorer, seqs, num_items, "test", dev)
        cost = profile_inference(
            scorer, seqs, dev, max_len=getattr(getattr(scorer, "config", None), "max_len", 50)
        )
        rows.append(
            {
                "model": name,
                **{k: v for k, v in test.items()},
                "params": saved.get("params", 0),
                "layers": getattr(getattr(scorer, "config", None), "layers", 0),
                "train_seconds": saved.get("train_seconds", 0.0),
                "best_epoch": saved.get("best_epoch", 0),
                "ms_per_1000_users": cost.ms_per_1000_users,
                "peak_inference_mb": cost.peak_memory_mb,
            }
        )
        context.log.info(
            f"{name}: test NDCG@10 {test['ndcg@10']:.4f}, {cost.ms_per_1000_users:.0f} ms / 1000 users"
        )
    path = write_parquet(pa.Table.from_pylist(rows), storage.paths.recommender_eval)
    write_json(rows, storage.paths.reports_dir / "recommender_eval.json")
    storage.refresh_duckdb()
    by_name = {r["model"]: r for r in rows}
    teacher_row, student_row = by_name["teacher"], by_name["student"]
    summary = {
        "student_speedup_vs_teacher": teacher_row["ms_per_1000_users"]
        / max(student_row["ms_per_1000_users"], 1e-9),
        "student_relative_ndcg10_loss": 1
        - student_row["ndcg@10"] / max(teacher_row["ndcg@10"], 1e-12),
        "distilled_minus_ce_only_ndcg10": student_row["ndcg@10"] - by_name["student_ce"]["ndcg@10"],
    }
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "table": dg.MetadataValue.md(_eval_markdown(rows)),
            "plots": dg.MetadataValue.md(_eval_plots(rows, storage.paths.reports_dir)),
            **{k: dg.MetadataValue.float(round(v, 4)) for k, v in summary.items()},
        }
    )


def _eval_markdown(rows: list[dict[str, Any]]) -> str:
    cols = [
        "hr@10",
        "ndcg@10",
        "mrr@10",
        "hr@20",
        "ndcg@20",
        "sampled_hr@10",
        "sampled_ndcg@10",
        "sampled_mrr",
    ]
    head = "| model | " + " | ".join(cols) + " | params | train s | ms/1k users | peak MB |"
    sep = "|---" * (len(cols) + 5) + "|"
    lines = [
        f"| {r['model']} | "
        + " | ".join(f"{r[c]:.4f}" for c in cols)
        + f" | {r['params']:,} | {r['train_seconds']:.0f} | {r['ms_per_1000_users']:.0f} | {r['peak_inference_mb']:.0f} |"
        for r in rows
    ]
    note = "\n\nFull ranking over all items with each user's seen items filtered (RecBole's general-recommender convention; its sequential models rank against all items, see benchmarks/recommenders.py); sampled = 1 positive + 999 seeded negatives (SLMRec)."
    return "\n".join([head, sep, *lines]) + note


def _eval_plots(rows: list[dict[str, Any]], reports: Path) -> str:
    fig, (left, right) = new_figure(9, 3.5, ncols=2)
    names = [r["model"] for r in rows]
    left.bar(names, [r["ndcg@10"] for r in rows], color="#4c72b0")
    left.set_ylabel("test NDCG@10 (full ranking)")
    left.tick_params(axis="x", rotation=30)
    models = [r for r in rows if r["model"] != "popularity"]
    right.scatter(
        [r["ms_per_1000_users"] for r in models], [r["ndcg@10"] for r in models], color="#dd8452"
    )
    for r in models:
        right.annotate(
            r["model"],
            (r["ms_per_1000_users"], r["ndcg@10"]),
            fontsize=8,
            xytext=(3, 3),
            textcoords="offset points",
        )
    right.set_xlabel("inference ms per 1,000 users")
    right.set_ylabel("test NDCG@10")
    return save_figure(fig, reports / "recommender_eval.png")


def _model_checks(name: str) -> list[dg.AssetChecksDefinition]:
    @dg.asset_check(
        asset=name,
        name="beats_popularity",
        blocking=True,
        description=f"{name} beats popularity on validation NDCG@10.",
    )
    def beats_popularity(storage: StorageRoot, device: TorchDevice) -> dg.AssetCheckResult:
        seqs, num_items = _data(storage)
        popular = evaluate(
            PopularityScorer(seqs, num_items),
            seqs,
            num_items,
            "valid",
            device.torch_device,
            sampled=False,
        )["ndcg@10"]
        ours = read_metrics(storage.paths.model_dir(name))["valid"]["ndcg@10"]
        return dg.AssetCheckResult(
            passed=ours > popular,
            description=f"valid NDCG@10 {ours:.4f} vs popularity {popular:.4f}",
            metadata={"model_valid_ndcg@10": ours, "popularity_valid_ndcg@10": popular},
        )

    @dg.asset_check(
        asset=name,
        name="finite_weights",
        blocking=True,
        description=f"No NaN or Inf in any {name} weight.",
    )
    def finite_weights(storage: StorageRoot) -> dg.AssetCheckResult:
        model = load_recommender(storage.paths.model_dir(name), torch.device("cpu"))
        bad = [k for k, v in model.state_dict().items() if not torch.isfinite(v).all()]
        return dg.AssetCheckResult(
            passed=not bad,
            description="all finite" if not bad else f"non-finite: {', '.join(bad)}",
            metadata={"tensors": len(model.state_dict()), "non_finite": len(bad)},
        )

    return [beats_popularity, finite_weights]


@dg.asset_check(
    asset=student,
    blocking=False,
    description="The student's test NDCG@10 is within the configured tolerance of the teacher's (warning only).",
)
def student_close_to_teacher(storage: StorageRoot) -> dg.AssetCheckResult:
    ours = read_metrics(storage.paths.model_dir("student"))
    theirs = read_metrics(storage.paths.model_dir("teacher"))
    loss = 1 - ours["test"]["ndcg@10"] / max(theirs["test"]["ndcg@10"], 1e-12)
    tolerance = ours.get("teacher_tolerance", 0.05)
    return dg.AssetCheckResult(
        passed=loss <= tolerance,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"relative NDCG@10 loss {loss:+.1%} (tolerance {tolerance:.0%})",
        metadata={
            "student_ndcg@10": ours["test"]["ndcg@10"],
            "teacher_ndcg@10": theirs["test"]["ndcg@10"],
            "relative_loss": loss,
        },
    )


model_checks = [check for name in MODELS for check in _model_checks(name)] + [
    student_close_to_teacher
]
