"""SAE and SASRec training as an external `torchrun` process (DDP), driven through Dagster Pipes.

The asset (launcher: torchrun) calls `launch`, which runs

    python -m torch.distributed.run --standalone --nproc_per_node N \\
        -m recsae_pipeline.distributed.ranks {sae,sasrec} --device cpu

under `dg.PipesSubprocessClient`, with the input and output paths and the training configs
as Pipes extras. Every rank trains (gloo on CPU, nccl on CUDA); rank 0 alone opens the Pipes
session, hands the extras to the other ranks, logs progress, writes the trained artifact
atomically (the same one the in-process asset writes), and reports the training result (a
custom message) and the materialization. The asset then finishes as it does in process.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from recsae_pipeline.data.sequences import read_sequences
from recsae_pipeline.distributed import ddp
from recsae_pipeline.models.artifacts import save_recommender
from recsae_pipeline.models.recommender import Recommender, RecommenderConfig
from recsae_pipeline.models.training import EpochReport, TrainConfig, TrainResult, train_recommender
from recsae_pipeline.sae.model import SaeConfig, TopKSae
from recsae_pipeline.sae.training import CurvePoint, SaeTrainConfig, SaeTrainResult, train_sae

if TYPE_CHECKING:
    from dagster_pipes import PipesContext


Task = Literal["sae", "sasrec"]


TASKS: tuple[Task, ...] = ("sae", "sasrec")


def sae_result(message: dict[str, Any], device: torch.device) -> SaeTrainResult:
    """The `SaeTrainResult` rank 0 reported, with the SAE it saved loaded onto `device`."""
    fields = {k: v for k, v in message.items() if k != "path"}
    fields["curve"] = [CurvePoint(**p) for p in fields["curve"]]
    return SaeTrainResult(sae=TopKSae.load(message["path"], device).eval(), **fields)


def train_result(message: dict[str, Any]) -> TrainResult:
    """The `TrainResult` rank 0 reported (the model itself is in the saved directory)."""
    return TrainResult(
        **{k: v for k, v in message.items() if k != "history"},
        history=[EpochReport(**r) for r in message["history"]],
    )


def _train_sae(extras: dict[str, Any], device: torch.device, pipes: PipesContext | None) -> None:
    def progress(rows: int, total: int, point: dict[str, float]) -> None:
        pipes.log.info(
            f"{rows:,}/{total:,} rows, FVU {point['fvu']:.4f}, dead {point['dead_fraction']:.1%}"
        )

    result = train_sae(
        Path(extras["shards"]),
        SaeTrainConfig(**extras["train"]),
        SaeConfig(**extras["sae"]),
        device,
        heldout_users_modulo=extras["heldout_users_modulo"],
        on_progress=progress if pipes is not None else None,
    )
    if pipes is None:
        return
    out = result.sae.save(extras["out"])
    message = {k: v for k, v in result._asdict().items() if k != "sae"}
    message["curve"] = [p._asdict() for p in result.curve]
    pipes.report_custom_message({**message, "path": str(out)})
    pipes.report_asset_materialization(
        metadata={
            **_run_metadata(device),
            "rows_per_second": round(result.rows_per_second),
            "steps": result.steps,
        },
    )


def _train_sasrec(extras: dict[str, Any], device: torch.device, pipes: PipesContext | None) -> None:
    def log_epoch(report: EpochReport) -> None:
        pipes.log.info(
            f"epoch {report.epoch}: loss {report.train_loss:.4f} | valid NDCG@10 "
            f"{report.valid['ndcg@10']:.4f} (best epoch {report.best_epoch}) | {report.seconds:.1f}s"
        )

    sequences, num_items = read_sequences(extras["sequences"])
    config = TrainConfig(**extras["train"])
    torch.manual_seed(config.seed)  # the asset's init, on every rank (DDP keeps rank 0's)
    model = Recommender(RecommenderConfig(**extras["model"]))
    result = train_recommender(
        model,
        sequences,
        num_items,
        config,
        device,
        on_epoch=log_epoch if pipes is not None else None,
    )
    if pipes is None:
        return
    message = result._asdict() | {"history": [r._asdict() for r in result.history]}
    save_recommender(model, extras["out"], message)
    pipes.report_custom_message(message)
    pipes.report_asset_materialization(
        metadata={**_run_metadata(device), "epochs_run": result.epochs_run},
    )


def _run_metadata(device: torch.device) -> dict[str, Any]:
    return {
        "launcher": "torchrun",
        "world_size": ddp.world_size(),
        "backend": ddp.backend(),
        "rank0_device": str(device),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"torchrun -m {__name__}", description=__doc__)
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (rank r: cuda:r)")
    args = parser.parse_args(argv)

    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        parser.exit(
            2,
            "no Dagster Pipes session: materialize the `sae` or `sasrec` asset with "
            "config `launcher: torchrun`, which launches this module\n",
        )
    train = _train_sae if args.task == "sae" else _train_sasrec
    device = ddp.rank_device(args.device)
    with ddp.process_group(device):
        if not ddp.is_main():
            train(ddp.broadcast_object(None), device, None)
            return
        with open_dagster_pipes() as pipes:
            extras = ddp.broadcast_object(dict(pipes.extras))
            pipes.log.info(
                f"torchrun {args.task}: {ddp.world_size()} rank(s), "
                f"{ddp.backend()} backend, rank 0 on {device}"
            )
            train(extras, device, pipes)


if __name__ == "__main__":
    main()
