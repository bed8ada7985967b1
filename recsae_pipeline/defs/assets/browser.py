"""The feature browser per (model, layer) partition: a static HTML site over the feature
statistics, explanations, scores and steering, opened from disk without a server."""

import dagster as dg

from recsae_pipeline.defs.assets.explanations import explanation_scores
from recsae_pipeline.defs.assets.features import steering_eval
from recsae_pipeline.defs.config import knob
from recsae_pipeline.defs.partitions import partition_asset, partition_of
from recsae_pipeline.defs.resources import StorageRoot
from recsae_pipeline.report.feature_browser import write_browser

GROUP = "browser"


class FeatureBrowserConfig(dg.Config):
    max_features: int = knob(
        write_browser,
        "max_features",
        "Pages: every explained feature, then the most frequent, up to this many.",
    )
    top_windows: int = knob(write_browser, "top_windows", "Top windows (one per user) per page.")


@partition_asset(
    "browser",
    group=GROUP,
    kinds={"html"},
    deps=[explanation_scores, steering_eval],
    description="A static HTML site: an index of features sortable by frequency, "
    "monosemanticity and explanation scores, and one page per feature with its explanations "
    "(SAGE hypotheses and verdicts), top windows, activation histogram, attribute enrichment "
    "and steering effect. browser/model=<m>/layer=<l>/index.html; open it from disk.",
)
def feature_browser(
    context: dg.AssetExecutionContext, config: FeatureBrowserConfig, storage: StorageRoot
) -> dg.MaterializeResult:
    part = partition_of(context, storage.paths)
    try:
        report = write_browser(
            storage.paths,
            part.model,
            part.layer,
            part.browser,
            config.max_features,
            config.top_windows,
        )
    except FileNotFoundError as error:
        raise dg.Failure(str(error)) from error
    context.log.info(
        f"{context.partition_key}: {report.pages} feature pages in {report.seconds:.1f}s, "
        f"open {report.index}"
    )
    return dg.MaterializeResult(
        metadata={
            "index": dg.MetadataValue.path(str(report.index)),
            "pages": report.pages,
            "seconds": dg.MetadataValue.float(round(report.seconds, 2)),
        }
    )
