"""Plots for asset metadata: saved under `data/reports/` and embedded in the Dagster UI."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from recsae_pipeline.storage.atomic import write_bytes  # noqa: E402


def new_figure(width: float = 6.0, height: float = 3.5, ncols: int = 1) -> tuple[Figure, Any]:
    """A figure not registered with pyplot's global state (safe in long-running processes);
    returns one Axes, or an array of `ncols` Axes."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots(1, ncols)


def save_figure(fig: Figure, path: Path) -> str:
    """Write the figure as PNG to `path` and return Markdown embedding it for the UI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    write_bytes(data, path)
    return f"![{path.stem}](data:image/png;base64,{base64.b64encode(data).decode()})"
