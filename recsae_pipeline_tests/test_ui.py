"""The pipeline as a user sees it: `recsae materialize -c <preset>` into a fresh DAGSTER_HOME
and storage root (the preset is the tests' tiny one: CI materializes configs/small.yaml through
scripts/ci_checks.py), the real `dagster dev` on loopback over them, then its GraphQL
API (every asset materialized, every check passed), its UI in headless Chromium (asset
graph, an asset page's metadata) and the static feature browser from disk.

Screenshots go to `$RECSAE_TEST_ARTIFACTS`, else `test-artifacts/ui/`. Without
/usr/bin/chromium and chromedriver the browser tests skip (fail under RECSAE_REQUIRE_BROWSER=1).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest

from recsae_pipeline.defs.definitions import defs
from recsae_pipeline.defs.partitions import feature_partitions
from recsae_pipeline.report.feature_browser import HISTOGRAM_BINS
from recsae_pipeline.storage.registry import parse_partition_key
from recsae_pipeline_tests.ui_support import (
    BACKGROUND,
    ROOT,
    BackgroundDeployment,
    DagsterDev,
    Deployment,
    chromium,
    missing_browser,
    poll,
    screenshot,
    wait_for,
    wait_for_text,
)

pytestmark = pytest.mark.ui


def _target_checks() -> set[tuple[str, str]]:
    """ci_checks.TARGET_CHECKS: (asset, check) pairs measuring research targets, not invariants."""
    spec = importlib.util.spec_from_file_location("ci_checks", ROOT / "scripts" / "ci_checks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return set(module.TARGET_CHECKS)


TARGET_CHECKS = _target_checks()


@pytest.fixture(scope="module")
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """`dagster dev` over the instance and root that `recsae materialize` filled; started in
    the background when the session began (see conftest), so that it is ready by now."""
    background = request.config.stash.get(BACKGROUND, None)
    if background is None:  # e.g. the UI tests selected by keyword after collection
        background = BackgroundDeployment(Path(tempfile.mkdtemp(prefix="recsae-ui-")))
        background.start()
        request.addfinalizer(background.stop)
    yield background.wait()


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    reason = missing_browser()
    if reason:
        if os.environ.get("RECSAE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"RECSAE_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
        pytest.skip(f"browser tests skipped: {reason}")
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as browser:
        yield browser


# ----------------------------------------------------------------------------- GraphQL

ASSETS_QUERY = """
query {
  assetNodes {
    assetKey { path }
    isPartitioned
    partitionStats { numMaterialized numPartitions numFailed }
    assetMaterializations(limit: 1) { runId }
    assetChecksOrError {
      __typename
      ... on AssetChecks { checks { name executionForLatestMaterialization { status } } }
    }
  }
}
"""

CHECK_HISTORY_QUERY = """
query ($asset: AssetKeyInput!, $check: String!, $limit: Int!) {
  assetCheckExecutions(assetKey: $asset, checkName: $check, limit: $limit) {
    status
    run { tags { key value } }
  }
}
"""


def test_graphql_lists_every_asset_materialized_and_every_check_passed(
    deployment: Deployment,
) -> None:
    server = deployment.server
    nodes = {"/".join(n["assetKey"]["path"]): n for n in server.graphql(ASSETS_QUERY)["assetNodes"]}
    graph = defs.resolve_asset_graph()
    expected = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert expected <= nodes.keys(), f"not served: {sorted(expected - nodes.keys())}"
    checks = {}
    for name in expected:
        listed = nodes[name]["assetChecksOrError"]
        assert listed["__typename"] == "AssetChecks", f"{name}: {listed}"
        checks.update({(name, c["name"]): c for c in listed["checks"]})
    defined = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert checks.keys() == defined

    def partitions(name: str) -> list[str]:
        """The asset's own partitions: each model's activations have only that model's."""
        return sorted(graph.get(dg.AssetKey(name)).partitions_def.get_partition_keys())

    problems = []
    for name in sorted(expected):
        node = nodes[name]
        stats = node["partitionStats"]
        if node["isPartitioned"] and (
            stats["numMaterialized"] != len(partitions(name)) or stats["numFailed"]
        ):
            problems.append(
                f"{name}: partitions {stats}, want all {len(partitions(name))} materialized"
            )
        if not node["assetMaterializations"]:
            problems.append(f"{name}: never materialized")
    for (name, check), served in sorted(checks.items()):
        # A research target may miss; it must still have been evaluated.
        allowed = {"SUCCEEDED", "FAILED"} if (name, check) in TARGET_CHECKS else {"SUCCEEDED"}
        if nodes[name]["isPartitioned"]:
            latest = _latest_per_partition(server, name, check, partitions(name))
        else:
            latest = {"": (served["executionForLatestMaterialization"] or {}).get("status")}
        for partition, status in latest.items():
            if status not in allowed:
                where = f" [{partition}]" if partition else ""
                problems.append(f"{name}.{check}{where}: latest execution {status}")
    assert not problems, "\n".join(problems)


def _latest_per_partition(
    server: DagsterDev, asset: str, check: str, partitions: list[str]
) -> dict[str, str | None]:
    """The status of each partition's latest execution of a check on a partitioned asset.
    Such checks are not partitioned themselves: each `features` run evaluates them once, for
    the partition in its run's tags."""
    executions = server.graphql(
        CHECK_HISTORY_QUERY,
        {"asset": {"path": [asset]}, "check": check, "limit": 4 * len(partitions)},
    )["assetCheckExecutions"]
    latest: dict[str, str] = {}
    for execution in executions:  # newest first
        tags = {t["key"]: t["value"] for t in execution["run"]["tags"]}
        latest.setdefault(tags.get("dagster/partition", ""), execution["status"])
    return {p: latest.get(p) for p in partitions}


# ----------------------------------------------------------------------------- Dagster UI


NODE_BACKGROUNDS = """
return [...document.querySelectorAll('[style*="--minimal-bg"]')]
  .map(e => e.style.getPropertyValue("--minimal-bg").trim());
"""


def test_asset_graph_shows_every_asset_materialized(driver: Any, deployment: Deployment) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    graph = defs.resolve_asset_graph()
    groups = sorted({graph.get(k).group_name for k in graph.get_all_asset_keys()})
    names = sorted(k.to_user_string() for k in graph.get_all_asset_keys())
    driver.get(f"{deployment.server.url}/asset-groups")
    # Collapsed, the graph draws one box per group, so each group's name is twice on the page:
    # in the sidebar and in the graph. Alt+E (the UI's "Expand all groups") then draws assets.
    wait_for(
        driver,
        f"collapsed groups {groups}",
        lambda lines: "Global asset lineage" in lines and all(lines.count(g) >= 2 for g in groups),
    )
    ActionChains(driver).key_down(Keys.ALT).send_keys("e").key_up(Keys.ALT).perform()
    wait_for(
        driver,
        f"assets {names}",
        lambda lines: all(any(_shows(line, n) for line in lines) for n in names),
    )
    # Statuses load after the names. Zoomed out this far, each asset is a minimal node whose
    # background is green once all of it (every partition) is materialized.
    green = ["var(--color-background-green)"] * len(names)

    def all_green() -> bool | None:
        return True if driver.execute_script(NODE_BACKGROUNDS) == green else None

    try:
        poll("every asset node green", all_green, timeout=60)
    except TimeoutError as error:
        raise AssertionError(f"{error}: {driver.execute_script(NODE_BACKGROUNDS)}") from None
    screenshot(driver, "dagster-asset-graph")


def _shows(line: str, name: str) -> bool:
    """Whether a graph node's label is `name`, which the graph may shorten in the middle
    (`featu…_activations`)."""
    head, ellipsis, tail = line.partition("…")
    if not ellipsis:
        return line == name
    return len(name) >= len(head) + len(tail) and name.startswith(head) and name.endswith(tail)


def test_asset_page_shows_materialization_metadata(driver: Any, deployment: Deployment) -> None:
    users = pq.read_metadata(deployment.paths.sequences).num_rows
    driver.get(f"{deployment.server.url}/assets/sequences")
    text = wait_for_text(
        driver,
        ["Latest materialization", "Metadata", "interactions_removed", "core_iterations"],
    )
    assert str(deployment.paths.sequences) in text, "the `path` metadata entry is not shown"
    # A metadata row reads: key, timestamp, value.
    lines = text.splitlines()
    assert lines[lines.index("users") + 2] == str(users), lines[lines.index("users") :][:3]
    heading = driver.find_element("xpath", "//*[normalize-space(text())='Metadata']")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", heading)
    screenshot(driver, "dagster-asset-sequences")


# ----------------------------------------------------------------------------- feature browser

COLUMN_VALUES = """
const table = document.querySelector("table.sortable");
const col = [...table.tHead.rows[0].cells].findIndex(th => th.textContent.trim() === arguments[0]);
if (col < 0) return null;
return [...table.tBodies[0].rows].map(r => r.cells[col].dataset.v ?? r.cells[col].textContent.trim());
"""


@pytest.fixture(scope="module")
def site(deployment: Deployment) -> Path:
    """The `feature_browser` site of the first feature partition."""
    model, layer = parse_partition_key(feature_partitions.get_partition_keys()[0])
    index = deployment.paths.partition_dir("browser", model, layer) / "index.html"
    assert index.is_file(), f"{index} missing: `feature_browser` was not materialized"
    return index


def test_feature_browser_index_lists_and_sorts_features(driver: Any, site: Path) -> None:
    pages = sorted(p.stem for p in (site.parent / "features").glob("*.html"))
    driver.get(site.as_uri())
    wait_for_text(driver, ["SAE features", "Click a column header to sort."])
    features = driver.execute_script(COLUMN_VALUES, "feature")
    assert features and sorted(features) == pages, "index rows differ from the feature pages"

    header = driver.find_element("xpath", "//table[@class='sortable']//th[text()='frequency']")
    orders = {}
    for direction in ("desc", "asc"):  # the first click sorts descending, the second ascending
        header.click()
        assert header.get_attribute("data-dir") == direction
        values = [float(v) for v in driver.execute_script(COLUMN_VALUES, "frequency")]
        assert values == sorted(values, reverse=direction == "desc"), direction
        orders[direction] = driver.execute_script(COLUMN_VALUES, "feature")
    assert orders["desc"] != orders["asc"], "sorting did not reorder the rows"
    screenshot(driver, "feature-browser-index", full_page=True)


def test_feature_page_shows_windows_histogram_and_explanation(
    driver: Any, deployment: Deployment, site: Path
) -> None:
    driver.get(site.as_uri())
    wait_for_text(driver, ["SAE features"])
    labels = driver.execute_script(COLUMN_VALUES, "SAGE label")
    features = driver.execute_script(COLUMN_VALUES, "feature")
    explained = [(f, label) for f, label in zip(features, labels, strict=True) if label]
    assert explained, "no feature of the index has a SAGE label"
    feature, label = explained[0]
    driver.find_element("link text", feature).click()

    text = wait_for_text(driver, [f"Feature {feature}", "Explanations", "Top windows"])
    assert f"sage: {label}" in text
    description = driver.find_element("xpath", "//h3[starts-with(., 'sage:')]/following::p[1]")
    assert description.text.strip(), "the SAGE explanation has no description"
    titles = set(pq.read_table(deployment.paths.items, columns=["title"])["title"].to_pylist())
    windows = driver.find_elements("css selector", "table.windows tbody tr")
    assert windows, "no top windows"
    # A cell reads `Title (Year) [Genre|...]` over its activation.
    cells = [c.text.splitlines()[0] for c in windows[0].find_elements("css selector", ".cell")]
    assert cells and all(_titled(c, titles) for c in cells), cells
    bars = driver.find_elements("css selector", "svg.histogram rect")
    assert len(bars) in (1, HISTOGRAM_BINS), f"{len(bars)} histogram bars"
    screenshot(driver, "feature-browser-feature", full_page=True)


def _titled(cell: str, titles: set[str]) -> bool:
    return any(cell == t or cell.startswith((f"{t} (", f"{t} [")) for t in titles)
