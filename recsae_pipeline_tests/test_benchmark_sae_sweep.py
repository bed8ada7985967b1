"""The SAE sweep benchmark: its grid, its Pareto front, and a small run on the tiny store that
writes every figure, resumes without retraining and refuses to mix rows_seen."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from recsae_pipeline.storage.registry import parse_partition_key

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sae_sweep.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def load_sweep():
    spec = importlib.util.spec_from_file_location("sae_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_grid_has_every_topk_cell_and_each_family_builds_its_sae():
    sweep = load_sweep()
    configs = sweep.grid()
    names = [c.name for c in configs]
    assert len(names) == len(set(names)) == 4 * 4 * 2 + 2 + 3
    topk = {(c.k, c.expansion, c.whitening_shrinkage) for c in configs if c.family == "topk"}
    assert topk == {(k, e, w) for k in (4, 8, 16, 32) for e in (4, 8, 16, 32) for w in (0.1, None)}
    for config in configs:
        sae_config = config.sae_config(d_in=64)
        assert sae_config.kind == config.family
        assert sae_config.n_latents == 64 * config.expansion
        assert sae_config.whitening_shrinkage == config.whitening_shrinkage
    assert len(sweep.grid(quick=True)) == 6


def test_the_pareto_front_keeps_exactly_the_unbeaten_points():
    front = load_sweep().pareto_front
    # (fvu, y): lower fvu and higher y are better
    points = [(0.1, 0.5), (0.2, 0.9), (0.2, 0.6), (0.05, 0.4), (0.3, 0.9), (math.nan, 1.0)]
    assert front(points) == [True, True, False, True, False, False]
    assert front([(0.1, 0.5), (0.1, 0.5)]) == [True, True]  # ties beat no one
    assert front([]) == []


def test_a_small_sweep_records_every_figure_and_resumes(tiny_store, tmp_path: Path, capsys):
    sweep = load_sweep()
    quick = sweep.grid(quick=True)
    only = [quick[0].name, quick[-1].name]  # a TopK and the L1 ReLU SAE
    key = "sasrec.layer2"
    model, layer = parse_partition_key(key)
    assert (tiny_store.root / "activations" / f"model={model}" / f"layer={layer}").is_dir()
    out = tmp_path / "sweep.json"
    argv = [
        "--data-dir", str(tiny_store.root), "--partitions", key, "--quick",
        "--rows-seen", "2048", "--batch-size", "512", "--out", str(out),
        *(arg for name in only for arg in ("--only", name)),
    ]  # fmt: skip
    report = sweep.main(argv)
    assert out.exists() and out.with_suffix(".png").stat().st_size > 0
    saved = json.loads(out.read_text())
    assert saved["rows_seen"] == 2048 and saved["machine"]["torch_threads"] == 1
    assert saved["commit"] and "--quick" in saved["command"]
    rows = saved["rows"]
    assert [r["config"] for r in rows] == only
    for row in rows:
        assert row["partition"] == key and row["rows_seen"] == 2048
        assert 0 < row["heldout_fvu"] < 2 and 0 <= row["dead_fraction"] <= 1
        ci = row["spliced_minus_original"]
        assert ci["unit"] == "users" and ci["ci95"][0] <= ci["difference"] <= ci["ci95"][1]
        ratio = row["ndcg@10_spliced"] / row["ndcg@10_original"]
        assert row["ndcg@10_ratio"] == pytest.approx(ratio)
        assert row["train_seconds"] > 0 and row["seconds"] >= row["train_seconds"]
    topk, l1 = rows
    assert topk["l0"] == pytest.approx(4) and topk["k"] == 4 and l1["k"] is None
    assert l1["family"] == "relu_l1" and l1["l1_coefficient"] == quick[-1].l1_coefficient
    assert any(r["pareto"] for r in rows) and saved["front"][key]
    if saved["interpretability"][sweep.SWEEP_MEASURES]:  # measured, or why not
        assert all((r["measures"] is None) != (r["measures_error"] is None) for r in rows)
    else:
        assert all(r["measures"] is None and r["measures_error"] is None for r in rows)

    capsys.readouterr()
    again = sweep.main([*argv, "--resume"])
    assert capsys.readouterr().out.count("skipped") == 2
    assert again["rows"] == report["rows"]  # nothing retrained
    with pytest.raises(SystemExit, match="rows_seen: 2048 there, 4096 now"):
        sweep.main([*argv, "--resume", "--rows-seen", "4096"])
    with pytest.raises(SystemExit):
        sweep.main([*argv, "--only", "topk k=5 x4 whitening=0.1"])
    assert "not in the grid" in capsys.readouterr().err
