"""Draw the asset graph of `recsae_pipeline.defs.definitions` as docs/asset_graph.png (for the README).

    .venv/bin/python scripts/asset_graph.py [--out docs/asset_graph.png]

Rows are dependency depth; colours are asset groups; partitioned assets (one run per
`<model>.layer<l>`) are drawn with a double border.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recsae_pipeline.defs.definitions import defs
from recsae_pipeline.report.plots import new_figure

COLOURS = {
    "data": "#dbe9f6",
    "models": "#fde2c8",
    "activations": "#e2f0d9",
    "sae": "#d9ead3",
    "features": "#fff2cc",
    "explanations": "#ead1dc",
    "browser": "#e6e6e6",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "asset_graph.png")
    )
    args = parser.parse_args(argv)
    graph = defs.resolve_asset_graph()
    keys = sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    parents = {k: list(graph.get(k).parent_keys) for k in keys}
    depth: dict = {}

    def level(key) -> int:  # noqa: ANN001
        if key not in depth:
            depth[key] = 1 + max((level(p) for p in parents[key]), default=-1)
        return depth[key]

    columns: dict[int, list] = {}
    for key in keys:
        columns.setdefault(level(key), []).append(key)
    rows = max(columns) + 1  # depth runs top to bottom
    span = max(len(v) for v in columns.values())
    fig, ax = new_figure(2.0 * span + 1, 0.62 * rows + 0.6)
    position = {}
    for depth_, members in columns.items():
        for i, key in enumerate(members):
            position[key] = ((span - len(members)) / 2 + i, depth_)
    for key in keys:
        x, y = position[key]
        for parent in parents[key]:
            px, py = position[parent]
            ax.annotate("", xy=(x, -y + 0.22), xytext=(px, -py - 0.22),
                        arrowprops={"arrowstyle": "->", "color": "#777777", "lw": 0.8})  # fmt: skip
    for key in keys:
        x, y = position[key]
        node = graph.get(key)
        partitioned = node.partitions_def is not None
        ax.text(
            x, -y, key.to_user_string(), ha="center", va="center", fontsize=8,
            bbox={"boxstyle": "round,pad=0.35", "fc": COLOURS.get(node.group_name, "white"),
                  "ec": "#333333", "lw": 2.2 if partitioned else 0.8},
        )  # fmt: skip
    ax.set_xlim(-0.7, span - 0.3)
    ax.set_ylim(-rows + 0.5, 0.5)
    ax.axis("off")
    ax.set_title("RecSAE asset graph (thick border: partitioned per <model>.layer<l>)", fontsize=9)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
