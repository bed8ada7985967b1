"""The feature browser on a copy of the tiny store: the static site it writes (index, pages,
histogram, windows, enrichment, escaping, and the pages of a store whose explanations and
steering were never materialized)."""

from __future__ import annotations

import re
import shutil
from html import escape
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recsae_pipeline.data.catalog import Catalog, Item
from recsae_pipeline.defs.versioning import FORCE_TAG
from recsae_pipeline.interp.windows import Window
from recsae_pipeline.report.feature_browser import (
    FeaturePage,
    render_feature_page,
    render_index,
    write_browser,
)
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline_tests.support import KEY, TinyStore, materialize
from recsae_pipeline_tests.torch_support import one_thread

HOSTILE = "<script>alert('x')</script> & Sons"
PARTITION = Path("browser") / "model=sasrec" / "layer=2"


@pytest.fixture(scope="module")
def site(
    tiny_store: TinyStore, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dg.ExecuteInProcessResult]:
    """The tiny store's browser, rebuilt on a copy whose top item of an explained feature has
    a title that is also HTML."""
    root = tiny_store.copy_to(tmp_path_factory.mktemp("browser") / "store")
    _rename_top_item_of_an_explained_feature(ArtifactPaths(root))
    with one_thread():
        result = materialize(
            root,
            ["feature_browser"],
            {"ops": {"feature_browser": {"config": {"max_features": 12}}}},
            partition_key=KEY,
            tags={FORCE_TAG: "true"},  # the catalog changed behind the recorded versions
        )
    assert result.success
    return root, result


def _explained(root: Path) -> list[dict]:
    path = root / "explanations" / "model=sasrec" / "layer=2" / "explanations.parquet"
    return pq.read_table(path).to_pylist()


def _stats(root: Path) -> dict[int, dict]:
    path = root / "feature_stats" / "model=sasrec" / "layer=2" / "features.parquet"
    return {r["feature"]: r for r in pq.read_table(path).to_pylist()}


def _rename_top_item_of_an_explained_feature(paths: ArtifactPaths) -> None:
    """Give the top item of the first explained feature a title that is also HTML."""
    feature = _explained(paths.root)[0]["feature"]
    item_idx = _stats(paths.root)[feature]["top_items"][0]
    item_map = pq.read_table(paths.item_map).to_pylist()
    item_id = next(r["item_id"] for r in item_map if r["item_idx"] == item_idx)
    items = pq.read_table(paths.items)
    titles = pc.if_else(pc.equal(items["item_id"], item_id), HOSTILE, items["title"])
    items = items.set_column(items.schema.get_field_index("title"), "title", titles)
    pq.write_table(items, paths.items)


def _pages(root: Path) -> dict[int, str]:
    pages = (root / PARTITION / "features").glob("*.html")
    return {int(p.stem): p.read_text(encoding="utf-8") for p in pages}


def test_index_links_every_page_and_sorts_in_place(site) -> None:
    root, result = site
    index = (root / PARTITION / "index.html").read_text(encoding="utf-8")
    pages = _pages(root)
    linked = {int(f) for f in re.findall(r'href="features/(\d+)\.html"', index)}
    assert linked == set(pages) and len(pages) == 12
    assert {r["feature"] for r in _explained(root)} <= linked
    assert 'class="sortable"' in index and "<script>" in index and ".sort(" in index
    assert "http" not in index.split("<script>")[1]  # no CDN: works from file://
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["pages"].value == 12
    assert meta["index"].value == str(root / PARTITION / "index.html")


def test_feature_page_shows_explanations_windows_histogram_and_enrichment(site) -> None:
    root, _ = site
    pages, stats = _pages(root), _stats(root)
    sage = next(r for r in _explained(root) if r["method"] == "sage")
    page = pages[sage["feature"]]
    s = stats[sage["feature"]]
    assert f"sage: {sage['label']}" in page and "baseline: " in page
    assert "generative accuracy" in page and 'class="verdict-' in page
    # Every active row lands in exactly one histogram bar.
    counts = [int(n) for n in re.findall(r"<title>[^<]*: (\d+) rows</title>", page)]
    assert '<svg class="histogram"' in page and sum(counts) == s["n_active"]
    # The strongest window peaks at the feature's max activation.
    windows = page.split('class="windows"')[1].split("</table>")[0]
    peaks = [float(v) for v in re.findall(r'<td class="num" data-v="([^"]+)"', windows)]
    assert peaks and peaks == sorted(peaks, reverse=True) and len(peaks) <= 10
    assert peaks[0] == pytest.approx(s["max_activation"], rel=1e-5)
    assert windows.count("cell peak") == len(peaks)
    if s["best_attribute"]:
        enrichment = page.split('class="enrichment"')[1]
        assert enrichment.split("<tbody><tr><td>")[1].startswith(s["best_attribute"])


def test_titles_are_escaped(site) -> None:
    root, _ = site
    feature = _explained(root)[0]["feature"]
    page = _pages(root)[feature]
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; Sons" in page
    assert "<script>" not in page


def test_missing_explanations_and_steering_say_not_materialized(site, tmp_path: Path) -> None:
    root, _ = site
    copy = tmp_path / "store"
    shutil.copytree(
        root, copy, ignore=shutil.ignore_patterns("explanation*", "steering", "browser")
    )
    report = write_browser(ArtifactPaths(copy), "sasrec", 2, tmp_path / "site", max_features=3)
    assert report.pages == 3 and report.index.exists()
    stats = _stats(root)
    frequent = sorted(
        (f for f in stats if stats[f]["n_active"]), key=lambda f: -stats[f]["frequency"]
    )
    pages = {int(p.stem): p.read_text() for p in (tmp_path / "site" / "features").glob("*.html")}
    assert set(pages) == set(frequent[:3])
    for page in pages.values():
        assert page.count("not materialized") == 2  # explanations and steering
    with pytest.raises(FileNotFoundError, match="feature_stats"):
        write_browser(ArtifactPaths(tmp_path / "empty"), "sasrec", 2, tmp_path / "none")


def test_page_renders_hostile_text_inert() -> None:
    catalog = Catalog({1: Item(1, "i1", HOSTILE, 1999, ("Drama",), "head", 1)})
    page = FeaturePage(
        stats={"feature": 7, "n_active": 3, "frequency": 0.1, "mean_activation": 0.5,
               "max_activation": 1.0, "top_items": [1], "best_attribute": "genre:<b>"},
        windows=[Window(4, 1, 0, (1, 1), (0.5, 1.0))],
        histogram=[(0.5, 0.75, 2), (0.75, 1.0, 1)],
        enrichment=[],
        explanations=[{"method": "sage", "label": "<img src=x>", "description": "a & b",
                       "hypotheses": '[{"id": 1, "text": "<i>", "kind": "positive", "status": "confirmed"}]'}],
        scores=None,
        steering=[],
        steering_summary=[],
    )  # fmt: skip
    html = render_feature_page(page, catalog, "sasrec.layer2")
    assert "<script>" not in html and "<img" not in html and "<i>" not in html
    assert "&lt;img src=x&gt;" in html and "genre:&lt;b&gt;" in html
    assert "not a steering target" in html and "scores not materialized" in html
    assert html.count("cell peak") == 1 and "0.500" in html
    index = render_index([page], "sasrec.layer2", ["explanation_scores"])
    assert "&lt;img src=x&gt;" in index and "explanation_scores" in index


def test_steering_targets_show_their_sweep(site) -> None:
    root, _ = site
    points = pq.read_table(root / "steering" / "model=sasrec" / "layer=2" / "points.parquet")
    genres: dict[int, set[str]] = {}
    for p in points.to_pylist():
        genres.setdefault(p["feature"], set()).add(p["genre"])
    pages = _pages(root)
    assert set(pages) & set(genres), "no steering target among the pages: the test pins nothing"
    index = (root / PARTITION / "index.html").read_text(encoding="utf-8")
    for feature, page in pages.items():
        if feature in genres:
            assert "genre share of top 10" in page and "clamped to 0" in page
            assert all(f"<td>{escape(g)}</td><td>add</td>" in page for g in genres[feature])
            row = index.split(f'href="features/{feature}.html"')[1].split("</tr>")[0]
            assert escape(sorted(genres[feature])[0]) in row
        else:
            assert "not a steering target" in page


def test_index_shows_both_sides_of_every_comparison(site) -> None:
    root, _ = site
    index = (root / PARTITION / "index.html").read_text(encoding="utf-8")
    assert "<h2>Both sides</h2>" in index
    both = index.split("<h2>Both sides</h2>")[1].split("</table>")[0]
    for side in ("SAE features", "neurons", "centroid", "random", "SAGE", "baseline"):
        assert f"<td>{side}</td>" in both, f"{side} missing from the index's comparisons"
    assert "95% CI" in both and "verdict" in both
