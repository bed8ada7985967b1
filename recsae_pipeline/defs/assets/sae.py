"""SAE assets: a TopK sparse autoencoder per activations partition, trained on the torch
device resource, with reconstruction, sparsity and spliced-recommendation metrics."""

from dataclasses import asdict
from pathlib import Path
from typing import Literal

import dagster as dg
import numpy as np
import pyarrow as pa
from pydantic import Field

from recsae_pipeline.data.sequences import read_sequences
from recsae_pipeline.defs.assets.activations import activation_deps
from recsae_pipeline.defs.checks import check_result
from recsae_pipeline.defs.config import knob, to_domain
from recsae_pipeline.defs.partitions import partition_asset, partition_of
from recsae_pipeline.defs.pipes import launch
from recsae_pipeline.defs.progress import throttled_log
from recsae_pipeline.defs.resources import StorageRoot, TorchDevice
from recsae_pipeline.distributed.ranks import sae_result
from recsae_pipeline.models.artifacts import load_recommender
from recsae_pipeline.report.plots import new_figure, save_figure
from recsae_pipeline.sae.evaluation import (
    SaeBounds,
    reconstruction_check,
    splice_check,
    splice_quality,
)
from recsae_pipeline.sae.export import export_saelens, saelens_hook_name
from recsae_pipeline.sae.model import SaeConfig
from recsae_pipeline.sae.training import SaeTrainConfig, train_sae
from recsae_pipeline.storage.atomic import write_json, write_parquet

GROUP = "sae"


class SaeAssetConfig(dg.Config):
    """TopK SAE (Gao et al. 2024) knobs, BatchTopK or an L1 ReLU SAE on request; defaults
    train in well under a minute per partition on a CPU."""

    expansion: int = knob(SaeConfig, "expansion", "Latents = expansion x hidden size.")
    k: int = knob(SaeConfig, "k", "Active latents per row.")
    batch_topk: bool = knob(SaeConfig, "batch_topk")
    whitening_shrinkage: float | None = knob(
        SaeConfig,
        "whitening_shrinkage",
        "Encode in the basis (cov + λ·mean eigenvalue·I)^-1/2 of the init sample, λ = this; "
        "unset: the hidden basis.",
    )
    l1_coefficient: float | None = knob(
        SaeConfig,
        "l1_coefficient",
        "Set: a ReLU SAE with this L1 penalty instead of a top-k (k is then ignored; not "
        "with batch_topk).",
    )
    lr: float | None = knob(
        SaeTrainConfig, "lr", "Adam lr; unset: 2e-4 / sqrt(latents / 2^14) (sparsify)."
    )
    batch_size: int = knob(SaeTrainConfig, "batch_size")
    rows_seen: int = knob(
        SaeTrainConfig, "rows_seen", "Training rows (epochs over the partition as needed)."
    )
    seed: int = knob(SaeTrainConfig, "seed")
    heldout_users_modulo: int = knob(
        train_sae, "heldout_users_modulo", "Users with user_idx % m == 0 are held out."
    )
    max_fvu: float = knob(SaeBounds, "max_fvu", "Check bound: held-out FVU at most this.")
    max_dead_fraction: float = knob(
        SaeBounds, "max_dead_fraction", "Check bound: latents never active on held-out rows."
    )
    min_recovered: float = knob(
        SaeBounds, "min_recovered", "Check bound: fraction of NDCG@10 recovered when spliced."
    )
    launcher: Literal["in_process", "torchrun"] = Field(
        default="in_process",
        description="torchrun: train in an external DDP process launched through Dagster Pipes.",
    )
    nproc_per_node: int = Field(default=2, description="torchrun ranks (processes or GPUs).")


@partition_asset(
    "sae",
    group=GROUP,
    kinds={"pytorch", "safetensors"},
    deps=activation_deps(),
    checks={
        "reconstruction_and_sparsity": "Held-out FVU and dead fraction within the configured bounds.",
        "spliced_quality_recovered": "Splicing the reconstruction into the model recovers enough of NDCG@10 (vs zero-ablating the layer).",
    },
    blocking=True,
    description="TopK SAE on one (model, layer) of activations: sae.safetensors + config.json + "
    "metrics.json + training curve under sae/model=<m>/layer=<l>/; loadable with TopKSae.load, "
    "and as saelens/ with sae_lens.SAE.load_from_disk.",
)
def sae(
    context: dg.AssetExecutionContext,
    config: SaeAssetConfig,
    storage: StorageRoot,
    device: TorchDevice,
) -> dg.MaterializeResult:
    part = partition_of(context, storage.paths)
    dev = device.torch_device
    shards, out = part.activations, part.sae
    model = load_recommender(storage.paths.model_dir(part.model), dev)
    sae_config = to_domain(config, SaeConfig, d_in=model.config.hidden_size)
    train_config = to_domain(config, SaeTrainConfig)
    log = throttled_log(context)

    def progress(rows: int, total: int, point: dict) -> None:
        message = f"{context.partition_key}: {rows:,}/{total:,} rows, FVU {point['fvu']:.4f}, dead {point['dead_fraction']:.1%}"
        log(message, rows >= total)

    launched = {}  # metadata rank 0 reported through Pipes
    if config.launcher == "torchrun":
        extras = {
            "shards": str(shards),
            "out": str(out),
            "sae": asdict(sae_config),
            "train": asdict(train_config),
            "heldout_users_modulo": config.heldout_users_modulo,
        }
        message, launched = launch(context, "sae", extras, config.nproc_per_node, dev.type)
        result = sae_result(message, dev)
    else:
        result = train_sae(
            shards,
            train_config,
            sae_config,
            dev,
            heldout_users_modulo=config.heldout_users_modulo,
            on_progress=progress,
        )
    result.sae.save(out)
    hook_name = saelens_hook_name(part.model, part.layer)
    export_saelens(result.sae, part.sae_saelens, hook_name, model=part.model, layer=part.layer)
    sequences, _ = read_sequences(storage.paths.sequences)
    quality = splice_quality(model, part.layer, result.sae, sequences, dev)
    heldout, recovered = result.heldout, quality.fraction_recovered
    metrics = {
        "heldout": heldout,
        "ndcg@10_original": quality.original,
        "ndcg@10_spliced": quality.spliced,
        "ndcg@10_zero_ablated": quality.zero_ablated,
        "fraction_recovered": recovered,
        "rows_seen": result.rows_seen,
        "seconds": result.seconds,
        "rows_per_second": result.rows_per_second,
        "lr": result.lr,
        "curve": [p._asdict() for p in result.curve],
    }
    write_json(metrics, part.sae_metrics)
    users = {"user": np.arange(len(quality.per_user["original"]), dtype=np.int32)}
    write_parquet(pa.table(users | quality.per_user), part.sae_splice_users)
    curve = _curve_plot(result.curve, context.partition_key, part.report("sae"))
    context.log.info(
        f"{context.partition_key}: FVU {heldout['fvu']:.4f}, L0 {heldout['l0']:.1f}, dead {heldout['dead_fraction']:.1%}; "
        f"NDCG@10 {quality.original:.4f} -> spliced {quality.spliced:.4f} (zero-ablated "
        f"{quality.zero_ablated:.4f}, recovered {recovered:.1%})"
    )
    bounds = to_domain(config, SaeBounds)
    return dg.MaterializeResult(
        check_results=[
            check_result("reconstruction_and_sparsity", reconstruction_check(heldout, bounds)),
            check_result("spliced_quality_recovered", splice_check(quality, bounds)),
        ],
        metadata={
            **launched,
            "path": dg.MetadataValue.path(str(out)),
            "saelens_export": dg.MetadataValue.path(str(part.sae_saelens)),
            "saelens_hook_name": hook_name,
            "latents": sae_config.n_latents,
            "k": sae_config.k,
            "heldout_fvu": dg.MetadataValue.float(round(heldout["fvu"], 4)),
            "heldout_l0": dg.MetadataValue.float(round(heldout["l0"], 2)),
            "dead_fraction": dg.MetadataValue.float(round(heldout["dead_fraction"], 4)),
            "ndcg@10_original": dg.MetadataValue.float(round(quality.original, 4)),
            "ndcg@10_spliced": dg.MetadataValue.float(round(quality.spliced, 4)),
            "ndcg@10_zero_ablated": dg.MetadataValue.float(round(quality.zero_ablated, 4)),
            "fraction_recovered": dg.MetadataValue.float(round(recovered, 4)),
            "train_seconds": dg.MetadataValue.float(round(result.seconds, 1)),
            "training_curve": dg.MetadataValue.md(curve),
        },
    )


def _curve_plot(curve: list, title: str, path: Path) -> str:
    fig, (left, right) = new_figure(9, 3.2, ncols=2)
    rows = [p.rows_seen for p in curve]
    left.plot(rows, [p.fvu for p in curve], color="#4c72b0")
    left.set_yscale("log")
    left.set_xlabel("rows seen")
    left.set_ylabel("training FVU")
    right.plot(rows, [p.dead_fraction for p in curve], color="#c44e52")
    right.set_xlabel("rows seen")
    right.set_ylabel("dead fraction")
    fig.suptitle(f"SAE {title}")
    return save_figure(fig, path)
