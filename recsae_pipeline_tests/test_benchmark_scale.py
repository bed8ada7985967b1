"""The scale benchmark (benchmarks/scale.py): what each scale generates, how the steps per
scale are read, and how its results render in the README and the plot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import yaml

from recsae_pipeline.data.synthetic import SyntheticConfig, generate_items
from recsae_pipeline.report.readme import render_scale

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scale.py"


def load_scale():
    spec = importlib.util.spec_from_file_location("scale_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_1x_is_the_default_config_and_100x_scales_users_by_100_and_items_by_10():
    scale = load_scale()
    default = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert scale.synthetic_options(1) == default["ops"]["raw_interactions"]["config"]["synthetic"]
    big = scale.synthetic_options(100)
    assert (big["n_users"], big["n_items"], big["n_franchises"]) == (300_000, 15_000, 600)
    assert big["mean_sequence_length"] == 33.0 and big["seed"] == 0
    items = generate_items(SyntheticConfig(**big))  # the title pool is large enough
    assert items.num_rows == 15_000
    assert len(set(items.column("title").to_pylist())) == 15_000


def test_sasrec_steps_are_read_per_scale_with_a_default():
    scale = load_scale()
    args = scale.argparse.Namespace(sasrec_steps=["default=200", "100=50"])
    assert scale._steps(args, 10) == 200
    assert scale._steps(args, 100) == 50


def _stage(seconds: float, rss: float, extrapolated: bool = False) -> dict:
    return {
        "seconds": seconds,
        "peak_rss_mb": rss,
        "extrapolated": extrapolated,
        "extrapolation": "from 50 steps" if extrapolated else None,
        "threads": 2,
        "loadavg_before": [3.0, 2.0, 1.0],
    }


def _results() -> dict:
    scales = {}
    for scale, n in ((1, 100_000), (10, 1_000_000)):
        stages = {
            "raw_interactions": _stage(7.0 * scale, 700.0 + scale),
            "sasrec": _stage(600.0 * scale**1.5, 900.0, extrapolated=scale > 1),
        }
        scales[str(scale)] = {
            "scale": scale,
            "users": 3000 * scale,
            "items": 1500,
            "interactions": n,
            "stages": stages,
            "seconds": sum(s["seconds"] for s in stages.values()),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
        }
    return {"command": "benchmarks/scale.py", "commit": "abc", "scales": scales}


def test_the_readme_table_marks_extrapolated_times_and_the_growth(tmp_path: Path):
    text = "\n".join(render_scale(_results(), "benchmarks/results/scale.png"))
    assert "| raw_interactions | 7.0 | 70 | x10.0 for x10.0 data | 701 | 710 |" in text
    assert "| sasrec | 600 | 18,974* |" in text
    assert "10x sasrec: extrapolated, from 50 steps." in text
    assert "under the 8 GiB target" in text
    assert "![Time and peak RSS against size](benchmarks/results/scale.png)" in text
    assert render_scale({"scales": {}}, None) == []


def test_the_plot_is_written(tmp_path: Path):
    out = tmp_path / "scale.png"
    load_scale().plot(_results(), out)
    assert out.stat().st_size > 1000
