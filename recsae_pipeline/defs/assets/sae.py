"""SAE assets: a TopK sparse autoencoder per activations partition, trained on the torch
device resource, with reconstruction, sparsity and spliced-recommendation metrics."""

from dataclasses import asdict
from pathlib import Path
from typing import Literal

import dagster as dg
import torch
from pydantic import Field

from recsae_pipeline.activations.hooks import edit_hidden
from recsae_pipeline.activations.shards import partition_dir
from recsae_pipeline.data.sequences import read_sequences
from recsae_pipeline.defs.assets.activations import activations
from recsae_pipeline.defs.partitions import feature_partitions, model_layer
from recsae_pipeline.defs.pipes import launch
from recsae_pipeline.defs.progress import throttled_log
from recsae_pipeline.defs.resources import StorageRoot, TorchDevice
from recsae_pipeline.defs.versioning import content_versioned, partition_output
from recsae_pipeline.distributed.ranks import sae_result
from recsae_pipeline.models.artifacts import load_recommender
from recsae_pipeline.models.training import evaluate
from recsae_pipeline.report.plots import new_figure, save_figure
from recsae_pipeline.sae.model import SaeConfig
from recsae_pipeline.sae.training import SaeTrainConfig, train_sae
from recsae_pipeline.storage.atomic import write_json
from recsae_pipeline.storage.registry import ArtifactPaths

GROUP = "sae"


class SaeAssetConfig(dg.Config):
    """TopK SAE (Gao et al. 2024) knobs; defaults train in well under a minute per partition on a CPU."""

    expansion: int = Field(default=32, description="Latents = expansion x hidden size.")
    k: int = Field(default=32, description="Active latents per row.")
    batch_topk: bool = False
    lr: float | None = Field(
        default=None, description="Adam lr; unset: 2e-4 / sqrt(latents / 2^14) (sparsify)."
    )
    batch_size: int = 4096
    rows_seen: int = Field(
        default=500_000, description="Training rows (epochs over the partition as needed)."
    )
    seed: int = 0
    heldout_users_modulo: int = Field(
        default=10, description="Users with user_idx % m == 0 are held out."
    )
    max_fvu: float = Field(default=0.10, description="Check bound: held-out FVU at most this.")
    max_dead_fraction: float = Field(
        default=0.02, description="Check bound: latents never active on held-out rows."
    )
    min_recovered: float = Field(
        default=0.9, description="Check bound: fraction of NDCG@10 recovered when spliced."
    )
    launcher: Literal["in_process", "torchrun"] = Field(
        default="in_process",
        description="torchrun: train in an external DDP process launched through Dagster Pipes.",
    )
    nproc_per_node: int = Field(default=2, description="torchrun ranks (processes or GPUs).")


def sae_dir(paths: ArtifactPaths, model: str, layer: int) -> Path:
    return paths.partition_dir("sae", model, layer)


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"pytorch", "safetensors"},
    partitions_def=feature_partitions,
    deps=[activations],
    check_specs=[
        dg.AssetCheckSpec(
            "reconstruction_and_sparsity",
            asset="sae",
            blocking=True,
            description="Held-out FVU and dead fraction within the configured bounds.",
        ),
        dg.AssetCheckSpec(
            "spliced_quality_recovered",
            asset="sae",
            blocking=True,
            description="Splicing the reconstruction into the model recovers enough of NDCG@10 (vs zero-ablating the layer).",
        ),
    ],
    description="TopK SAE on one (model, layer) of activations: sae.safetensors + config.json + "
    "metrics.json + training curve under sae/model=<m>/layer=<l>/; loadable with TopKSae.load.",
)
@content_versioned(partition_output("sae"))
def sae(
    context: dg.AssetExecutionContext,
    config: SaeAssetConfig,
    storage: StorageRoot,
    device: TorchDevice,
) -> dg.MaterializeResult:
    model_name, layer = model_layer(context.partition_key)
    dev = device.torch_device
    shards = partition_dir(storage.paths.root, model_name, layer)
    model = load_recommender(storage.paths.model_dir(model_name), dev)
    sae_config = SaeConfig(
        d_in=model.config.hidden,
        expansion=config.expansion,
        k=config.k,
        batch_topk=config.batch_topk,
    )
    train_config = SaeTrainConfig(
        lr=config.lr, batch_size=config.batch_size, rows_seen=config.rows_seen, seed=config.seed
    )
    log = throttled_log(context)

    def progress(rows: int, total: int, point: dict) -> None:
        message = f"{context.partition_key}: {rows:,}/{total:,} rows, FVU {point['fvu']:.4f}, dead {point['dead_fraction']:.1%}"
        log(message, rows >= total)

    launched = {}  # metadata rank 0 reported through Pipes
    if config.launcher == "torchrun":
        extras = {
            "shards": str(shards),
            "out": str(sae_dir(storage.paths, model_name, layer)),
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
    trained = result.sae
    out = sae_dir(storage.paths, model_name, layer)
    trained.save(out)

    # Recommendation quality with the SAE reconstruction spliced in at its layer (RecSAE).
    sequences, num_items = read_sequences(storage.paths.sequences)
    original = evaluate(model, sequences, num_items, "test", dev, sampled=False)["ndcg@10"]
    with edit_hidden(model, layer, trained.reconstruct):
        spliced = evaluate(model, sequences, num_items, "test", dev, sampled=False)["ndcg@10"]
    with edit_hidden(model, layer, torch.zeros_like):
        ablated = evaluate(model, sequences, num_items, "test", dev, sampled=False)["ndcg@10"]
    gap = original - ablated
    # When zero-ablating the layer costs nothing, "recovered" is undefined: report NaN and
    # judge the splice by the original quality alone.
    recovered = (spliced - ablated) / gap if gap > 1e-9 else float("nan")
    heldout = result.heldout
    metrics = {
        "heldout": heldout,
        "ndcg@10_original": original,
        "ndcg@10_spliced": spliced,
        "ndcg@10_zero_ablated": ablated,
        "fraction_recovered": recovered,
        "rows_seen": result.rows_seen,
        "seconds": result.seconds,
        "rows_per_second": result.rows_per_second,
        "lr": result.lr,
        "curve": [p._asdict() for p in result.curve],
    }
    write_json(metrics, out / "metrics.json")
    curve = _curve_plot(
        result.curve,
        context.partition_key,
        storage.paths.reports_dir / f"sae_{model_name}_layer{layer}.png",
    )
    context.log.info(
        f"{context.partition_key}: FVU {heldout['fvu']:.4f}, L0 {heldout['l0']:.1f}, dead {heldout['dead_fraction']:.1%}; "
        f"NDCG@10 {original:.4f} -> spliced {spliced:.4f} (zero-ablated {ablated:.4f}, recovered {recovered:.1%})"
    )
    checks = [
        dg.AssetCheckResult(
            check_name="reconstruction_and_sparsity",
            passed=heldout["fvu"] <= config.max_fvu
            and heldout["dead_fraction"] <= config.max_dead_fraction,
            description=f"held-out FVU {heldout['fvu']:.4f} (<= {config.max_fvu}), dead {heldout['dead_fraction']:.2%} (<= {config.max_dead_fraction:.0%})",
            metadata={
                "fvu": heldout["fvu"],
                "dead_fraction": heldout["dead_fraction"],
                "l0": heldout["l0"],
            },
        ),
        dg.AssetCheckResult(
            check_name="spliced_quality_recovered",
            passed=recovered >= config.min_recovered
            if gap > 1e-9
            else spliced >= original - 0.01 * abs(original),
            description=f"{recovered:.1%} of NDCG@10 recovered (>= {config.min_recovered:.0%})"
            if gap > 1e-9
            else f"zero-ablating the layer does not lower NDCG@10 ({ablated:.4f} vs {original:.4f}); spliced {spliced:.4f}",
            metadata={
                "original": original,
                "spliced": spliced,
                "zero_ablated": ablated,
                "fraction_recovered": recovered,
            },
        ),
    ]
    return dg.MaterializeResult(
        check_results=checks,
        metadata={
            **launched,
            "path": dg.MetadataValue.path(str(out)),
            "latents": sae_config.n_latents,
            "k": sae_config.k,
            "heldout_fvu": dg.MetadataValue.float(round(heldout["fvu"], 4)),
            "heldout_l0": dg.MetadataValue.float(round(heldout["l0"], 2)),
            "dead_fraction": dg.MetadataValue.float(round(heldout["dead_fraction"], 4)),
            "ndcg@10_original": dg.MetadataValue.float(round(original, 4)),
            "ndcg@10_spliced": dg.MetadataValue.float(round(spliced, 4)),
            "ndcg@10_zero_ablated": dg.MetadataValue.float(round(ablated, 4)),
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
