"""Top-k recommendations for one user, plain and steered by SAE features (`recsae recommend`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import duckdb
import numpy as np
import torch

from recsae_pipeline.activations.hooks import edit_hidden
from recsae_pipeline.data.catalog import Catalog
from recsae_pipeline.models.artifacts import load_recommender
from recsae_pipeline.sae.model import TopKSae
from recsae_pipeline.sae.steering import add_direction, clamp_to_zero
from recsae_pipeline.storage.registry import ArtifactPaths, parse_partition_key
from recsae_pipeline.storage.sql import read_parquet


@dataclass(frozen=True)
class Recommended:
    rank: int
    item_idx: int
    title: str
    year: int | None
    genres: list[str]
    score: float


@dataclass(frozen=True)
class FeatureInfo:
    feature: int
    max_activation: float | None
    best_attribute: str | None
    top_titles: list[str]


@dataclass(frozen=True)
class SteeredRecommendations:
    user_id: str
    user_idx: int
    history: list[Recommended]
    """The user's last items (rank = position from the end, score 0)."""
    before: list[Recommended]
    after: list[Recommended]
    features: list[FeatureInfo]


def _user(paths: ArtifactPaths, user_id: str) -> tuple[int, np.ndarray]:
    for path in (paths.user_map, paths.sequences):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing; materialize the pipeline first (see README)"
            )
    row = duckdb.execute(
        f"""SELECT s.user_idx, s.items FROM {read_parquet(paths.user_map)} u
            JOIN {read_parquet(paths.sequences)} s USING (user_idx) WHERE u.user_id = ?""",
        [user_id],
    ).fetchone()
    if row is None:
        examples = [
            r[0]
            for r in duckdb.execute(
                f"SELECT user_id FROM {read_parquet(paths.user_map)} ORDER BY user_idx LIMIT 3"
            ).fetchall()
        ]
        raise KeyError(
            f"user {user_id!r} is not in {paths.user_map} (raw user ids, e.g. {', '.join(examples)}); "
            "users dropped by the k-core filter have no sequence"
        )
    return int(row[0]), np.asarray(row[1], dtype=np.int64)


def _feature_info(paths: ArtifactPaths, model: str, layer: int, feature: int) -> FeatureInfo:
    stats = paths.partition(model, layer).feature_stats
    if not stats.exists():
        return FeatureInfo(feature, None, None, [])
    row = duckdb.execute(
        f"SELECT max_activation, best_attribute, top_titles FROM {read_parquet(stats)} WHERE feature = ?",
        [feature],
    ).fetchone()
    if row is None:
        return FeatureInfo(feature, None, None, [])
    return FeatureInfo(feature, row[0], row[1], list(row[2] or []))


@dataclass(frozen=True)
class Steer:
    """One steered feature: add `alpha` x its decoder direction. With `relative`, `alpha` is a
    multiple of the feature's max activation (`feature_stats`), the unit `steering_eval` sweeps."""

    feature: int
    alpha: float
    relative: bool = False


def absolute_alphas(
    paths: ArtifactPaths, sae_key: str, steer: list[Steer]
) -> list[tuple[int, float, FeatureInfo]]:
    """(feature, alpha in hidden-state units, its stats) per steer; relative alphas are
    multiplied by the feature's max activation, as `steering_eval` does."""
    model_name, layer = parse_partition_key(sae_key)
    out = []
    for s in steer:
        info = _feature_info(paths, model_name, layer, s.feature)
        if not s.relative:
            out.append((s.feature, s.alpha, info))
        elif info.max_activation:
            out.append((s.feature, s.alpha * info.max_activation, info))
        else:
            raise ValueError(
                f"feature {s.feature} has no max activation in the feature_stats of {sae_key} "
                f"({paths.partition_dir('feature_stats', model_name, layer)}); materialize "
                f"`feature_stats` for that partition, or give an absolute alpha ({s.feature}={s.alpha:g})"
            )
    return out


@torch.no_grad()
def recommend(
    paths: ArtifactPaths,
    user_id: str,
    sae_key: str = "sasrec.layer2",
    steer: list[tuple[int, float]] | None = None,
    clamp: list[int] | None = None,
    k: int = 10,
    device: torch.device | str = "cpu",
) -> SteeredRecommendations:
    """The user's next-item top k after their whole history (seen items excluded), before
    and after adding alpha x each steered feature's decoder direction and clamping each
    clamped feature to 0, at the layer of SAE `sae_key`."""
    model_name, layer = parse_partition_key(sae_key)
    steer, clamp = steer or [], clamp or []
    user_idx, items = _user(paths, user_id)
    model = load_recommender(paths.model_dir(model_name), device).eval()
    partition = paths.partition(model_name, layer)
    sae_path = partition.sae
    if (steer or clamp) and not partition.sae_weights.exists():
        raise FileNotFoundError(
            f"{sae_path} holds no SAE; materialize the `sae` asset for partition {sae_key} first"
        )
    sae = TopKSae.load(sae_path, device) if (steer or clamp) else None
    n_latents = sae.config.n_latents if sae is not None else 0
    for feature in [f for f, _ in steer] + clamp:
        if not 0 <= feature < n_latents:
            raise ValueError(
                f"feature {feature} is out of range: the SAE {sae_key} has {n_latents} latents"
            )
    inputs = torch.from_numpy(items[-model.config.max_len :]).unsqueeze(0).to(device)
    seen = torch.from_numpy(items).to(device)

    def top() -> list[tuple[int, float]]:
        scores = model.predict(inputs)[0].float()
        scores[seen] = float("-inf")
        values, indices = scores.topk(k)
        return list(zip(indices.tolist(), values.tolist(), strict=True))

    before = top()
    with contextlib.ExitStack() as stack:
        for feature, alpha in steer:
            stack.enter_context(edit_hidden(model, layer, add_direction(sae, feature, alpha)))
        for feature in clamp:
            stack.enter_context(edit_hidden(model, layer, clamp_to_zero(sae, feature)))
        after = top()
    last = items[-5:][::-1].tolist()
    catalog = Catalog.load(paths)

    def rows(pairs: list[tuple[int, float]]) -> list[Recommended]:
        out = []
        for rank, (idx, score) in enumerate(pairs, start=1):
            item = catalog.items.get(idx)
            if item is None:
                out.append(Recommended(rank, idx, f"item {idx}", None, [], score))
            else:
                out.append(Recommended(rank, idx, item.title, item.year, list(item.genres), score))
        return out

    features = [
        _feature_info(paths, model_name, layer, f)
        for f in dict.fromkeys([f for f, _ in steer] + clamp)
    ]
    return SteeredRecommendations(
        user_id=user_id,
        user_idx=user_idx,
        history=rows([(i, 0.0) for i in last]),
        before=rows(before),
        after=rows(after),
        features=features,
    )


def format_recommendations(result: SteeredRecommendations, steered: bool) -> str:
    """Human-readable before/after listing (new entries marked with +)."""

    def label(r: Recommended) -> str:
        year = f" ({r.year})" if r.year is not None else ""
        genres = f" [{'|'.join(r.genres)}]" if r.genres else ""
        return f"{r.title}{year}{genres}"

    lines = [f"user {result.user_id} (user_idx {result.user_idx}); last watched, newest first:"]
    lines += [f"    {label(r)}" for r in result.history]
    for info in result.features:
        hint = f"feature {info.feature}"
        if info.max_activation is not None:
            hint += f": max activation {info.max_activation:.3g}"
        if info.best_attribute:
            hint += f", most enriched for {info.best_attribute}"
        if info.top_titles:
            hint += f"; top items: {', '.join(info.top_titles[:3])}"
        lines.append(hint)
    before_items = {r.item_idx for r in result.before}
    if steered:
        lines.append("")
        lines.append(f"{'rank':>4}  {'before':<52} {'after steering'}")
        for b, a in zip(result.before, result.after, strict=True):
            mark = "+" if a.item_idx not in before_items else " "
            lines.append(f"{b.rank:>4}  {label(b)[:52]:<52} {mark}{label(a)}")
    else:
        lines.append("")
        lines += [f"{r.rank:>4}  {label(r)}  (score {r.score:.3f})" for r in result.before]
    return "\n".join(lines)
