"""DDP under torchrun (2 ranks, gloo, CPU): SAE training reaches a working SAE with identical
weights on every rank, and the `sasrec` and `sae` assets with `launcher: torchrun` train
through Dagster Pipes, write the usual artifacts and report what rank 0 measured.

The ranks of the first test run this module itself, so Dagster is imported only where the
Dagster tests need it (it would add seconds to every rank's start)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from recsae_pipeline.distributed import ddp
from recsae_pipeline.sae.model import SaeConfig
from recsae_pipeline.sae.training import SaeTrainConfig, train_sae
from recsae_pipeline_tests.test_sae import sparse_mixtures, write_partition

if TYPE_CHECKING:
    import dagster as dg

    from recsae_pipeline_tests.support import TinyStore

KEY = "sasrec.layer2"
SASREC = {
    "hidden_size": 16,
    "max_len": 20,
    "max_epochs": 6,
    "patience": 6,
    "batch_size": 64,
    "lr": 1e-2,
}
SAE = {"expansion": 4, "k": 4, "rows_seen": 20_000, "batch_size": 512}
BOUNDS = {"max_fvu": 1.0, "max_dead_fraction": 1.0, "min_recovered": -10.0}
TORCHRUN = {"launcher": "torchrun", "nproc_per_node": 2}


def _torchrun(*args: str, nproc: int = 2) -> None:
    # One thread per rank: two ranks on two cores (torchrun's own default, made explicit).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(nproc), "-m", __name__, *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def _sae_rank_main(partition: str, out: str) -> None:
    """One rank: train on the partition, save its own weights and (rank 0) the held-out metrics."""
    with ddp.process_group(torch.device("cpu")) as grouped:
        assert grouped and ddp.backend() == "gloo"
        result = train_sae(
            Path(partition),
            SaeTrainConfig(batch_size=256, rows_seen=256 * 300, log_every=100),
            SaeConfig(d_in=16, expansion=4, k=3, dead_after_rows=2000),
            "cpu",
        )
        state = {k: v.contiguous() for k, v in result.sae.state_dict().items()}
        save_file(state, Path(out) / f"rank{ddp.rank()}.safetensors")
        report = {**result.heldout, "world": ddp.world_size(), "steps": result.steps}
        (Path(out) / f"rank{ddp.rank()}.json").write_text(json.dumps(report))


def test_ddp_sae_training_gives_one_working_sae_on_every_rank(tmp_path: Path) -> None:
    x, _ = sparse_mixtures(6000, d=16, atoms=32, active=2)
    partition = write_partition(tmp_path / "acts", x)
    _torchrun("sae", str(partition), str(tmp_path))
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for name, weight in ranks[0].items():
        assert torch.equal(weight, ranks[1][name]), f"{name} differs between ranks"
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0] == reports[1]  # rank 0 evaluated and shared its metrics
    assert reports[0]["world"] == 2 and reports[0]["steps"] == 300  # global batches
    assert reports[0]["fvu"] < 0.15  # one process: ~0.06 (test_sae)


def test_shard_is_the_batch_itself_without_a_process_group() -> None:
    batch = torch.arange(5)
    assert ddp.shard(batch) is batch
    assert ddp.world_size() == 1 and ddp.is_main()
    assert ddp.broadcast_object({"a": 1}) == {"a": 1}


@pytest.fixture(scope="module")
def store(tiny_store: TinyStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny store (sequences, an in-process SASRec and its layer-2 activations)
    for the torchrun runs to overwrite."""
    return tiny_store.copy_to(tmp_path_factory.mktemp("ddp") / "store")


def _resources(root: Path) -> dict[str, Any]:
    from recsae_pipeline_tests.support import resources

    return resources(root)


def _metadata(result: dg.ExecuteInProcessResult) -> dict:
    (event,) = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_sae_asset_trains_under_torchrun_through_pipes(store: Path) -> None:
    import dagster as dg

    from recsae_pipeline.defs.assets import sae as sae_assets

    result = dg.materialize(
        [sae_assets.sae],
        resources=_resources(store),
        partition_key=KEY,
        run_config={"ops": {"sae": {"config": {**SAE, **BOUNDS, **TORCHRUN}}}},
    )
    assert result.success
    out = store / "sae" / "model=sasrec" / "layer=2"
    assert {"sae.safetensors", "config.json", "metrics.json"} <= {p.name for p in out.iterdir()}
    metadata = _metadata(result)
    # reported by rank 0 through Pipes, merged with what the asset measures itself
    assert metadata["launcher"] == "torchrun" and metadata["world_size"] == 2
    assert metadata["backend"] == "gloo" and metadata["steps"] == 40
    assert 0 <= metadata["heldout_fvu"] < 1 and "ndcg@10_spliced" in metadata
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows_seen"] == SAE["rows_seen"] and metrics["curve"]
    checks = {e.check_name for e in result.get_asset_check_evaluations()}
    assert checks == {"reconstruction_and_sparsity", "spliced_quality_recovered"}


def test_sasrec_asset_trains_under_torchrun_through_pipes(store: Path, tmp_path: Path) -> None:
    import dagster as dg

    from recsae_pipeline.defs.assets import models

    root = Path(shutil.copytree(store, tmp_path / "root"))
    shutil.rmtree(root / "models" / "sasrec")
    result = dg.materialize(
        [models.sasrec],
        resources=_resources(root),
        run_config={"ops": {"sasrec": {"config": {**SASREC, **TORCHRUN}}}},
    )
    assert result.success
    metadata = _metadata(result)
    assert metadata["launcher"] == "torchrun" and metadata["world_size"] == 2
    assert metadata["epochs_run"] == SASREC["max_epochs"]
    metrics = json.loads((root / "models" / "sasrec" / "metrics.json").read_text())
    assert (
        np.isfinite(metrics["test"]["ndcg@10"]) and len(metrics["history"]) == SASREC["max_epochs"]
    )


if __name__ == "__main__":  # a rank under torchrun, started by `_torchrun`
    if sys.argv[1] == "sae":
        _sae_rank_main(*sys.argv[2:])
