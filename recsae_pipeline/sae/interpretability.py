"""Chance-corrected interpretability measures, computed the same way for three kinds of unit:
SAE features, the hidden state's own dimensions (neurons, read in both signs) and the
dimensions of a seeded random rotation of the centred hidden space (both signs), a second
control that has the neurons' count but no privileged basis.

Each measure scores a unit against *targets*, bool labels per activation row:
- `attribute` targets: the catalog attribute (`family:value`: genre, decade, popularity band,
  franchise) of the item at that row's position. Item-level targets such as one franchise
  are measurable here, unlike under a top-items purity, which caps a five-item franchise at
  5 of 50 top items;
- `history` targets: the attribute carries at least `history_share` of the last
  `history_window` items read (the current one included);
- `concept` targets (synthetic data): the planted mechanism behind the item at that position,
  e.g. `franchise_next` (the item continues a franchise) or `genre_binge:<genre>`.

The measures, each with its chance level from a null:
- per unit, its best AUC over the attribute targets (and over the history targets); the null
  shuffles the label rows (each row gets the attributes of a random other row), so the share
  of units above the null's 95th percentile says how many units track an attribute at all;
- per target, the best unit's AUC for each kind and the null's best (the max over as many null
  units: a kind with more units wins more by chance, and this is what that win is worth);
- k-sparse probing (SAEBench's protocol, re-implemented on our tensors): pick the k units with
  the largest |mean difference| between positive and negative rows of the training users, fit
  a logistic probe on them, report its AUC on held-out users (every third sampled user), for k
  in `probe_ks`. Selection and fit never see the held-out users, so having more units to pick
  from is no advantage unless the picked units generalise.

Everything runs on one deterministic sample of whole users (`features.sample_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from recsae_pipeline.data.catalog import Catalog
from recsae_pipeline.models.metrics import (
    column_sums,
    dense_auc_from,
    dense_ranks,
    sparse_auc_from,
    sparse_ranks,
)
from recsae_pipeline.sae.model import TopKSae
from recsae_pipeline.storage.registry import ArtifactPaths

KINDS = ("sae", "neurons", "rotation")
"""The unit kinds every measure is computed for, in report order."""
KIND_LABELS = {"sae": "SAE features", "neurons": "neurons", "rotation": "random rotation"}
TARGET_FAMILIES = ("attribute", "history", "concept")


@dataclass(frozen=True)
class MeasureConfig:
    """Knobs of the interpretability measures."""

    probe_ks: tuple[int, ...] = (1, 2, 5)
    """Units per sparse probe (SAEBench uses 1, 2, 5, ...)."""
    history_window: int = 10
    """Items read (the current one included) behind a `history` target."""
    history_share: float = 0.5
    """Share of that window carrying the attribute for the row to count as positive."""
    min_positives: int = 20
    """Targets with fewer positive rows (or fewer negatives) in the sample are dropped; each
    probe split needs at least 5 positives and 5 negatives as well."""
    max_probe_train_rows: int = 20_000
    """Training rows per probe at most (every j-th training row, deterministic); SAEBench
    trains its probes on 4,000."""
    purity_null_draws: int = 200
    """Random top-item sets per support size behind the purity's chance level."""
    seed: int = 0
    """Seeds the rotation, the label shuffle and the purity null."""

    def __post_init__(self) -> None:
        if not self.probe_ks or min(self.probe_ks) < 1:
            raise ValueError(f"probe_ks={self.probe_ks}; pass unit counts >= 1, e.g. (1, 2, 5)")
        if self.history_window < 1 or not 0 < self.history_share <= 1:
            raise ValueError(
                f"history_window={self.history_window}, history_share={self.history_share}; "
                "need a window >= 1 and a share in (0, 1]"
            )
        for name in ("min_positives", "max_probe_train_rows", "purity_null_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= 1")


# ----------------------------------------------------------------------------- targets


@dataclass
class Targets:
    """Bool labels [R, T] over the sampled rows, one column per target."""

    names: list[str]
    families: list[str]
    """`attribute`, `history` or `concept` per column."""
    labels: Tensor

    def select(self, family: str) -> Tensor:
        """Column indices of one family."""
        return torch.tensor(
            [i for i, f in enumerate(self.families) if f == family], dtype=torch.long
        )

    @staticmethod
    def concat(parts: Sequence[Targets]) -> Targets:
        parts = [p for p in parts if p.names]
        if not parts:
            raise ValueError("no targets: every attribute and concept has too few positive rows")
        return Targets(
            [n for p in parts for n in p.names],
            [f for p in parts for f in p.families],
            torch.cat([p.labels for p in parts], dim=1),
        )


def item_attribute_matrix(catalog: Catalog) -> tuple[list[str], Tensor]:
    """Every `family:value` attribute of the catalog (sorted) and a bool [max item_idx + 1, A]
    matrix of which item carries which."""
    table = catalog.attribute_table().to_pydict()
    names = sorted({f"{f}:{v}" for f, v in zip(table["family"], table["value"], strict=True)})
    column = {name: j for j, name in enumerate(names)}
    size = max(catalog.items, default=-1) + 1
    matrix = torch.zeros(size, len(names), dtype=torch.bool)
    for item, family, value in zip(table["item_idx"], table["family"], table["value"], strict=True):
        matrix[item, column[f"{family}:{value}"]] = True
    return names, matrix


def _enough(labels: Tensor, min_positives: int) -> Tensor:
    positives = column_sums(labels)
    return (positives >= min_positives) & (len(labels) - positives >= min_positives)


HISTORY_CHUNK = 64
"""Attributes per step of `attribute_targets`' running history counts."""


def attribute_targets(
    item_idx: Tensor,
    user_idx: Tensor,
    position: Tensor,
    catalog: Catalog,
    config: MeasureConfig,
) -> Targets:
    """The `attribute` and `history` targets of the sampled rows (module docstring); targets
    with fewer than `min_positives` positive or negative rows are dropped."""
    names, matrix = item_attribute_matrix(catalog)
    items = item_idx.long()
    if len(items) and int(items.max()) >= len(matrix):
        raise ValueError(
            f"a sampled row has item_idx {int(items.max())} but the catalog's largest is "
            f"{len(matrix) - 1}; rebuild the activations from the current sequences"
        )
    at_position = matrix[items]  # [R, A]
    # An attribute seen at fewer than min_positives / history_window sampled rows cannot make
    # min_positives positives in either family (each row is in at most history_window
    # windows): drop it before the history copies (creators alone are thousands at 100x)
    useful = column_sums(at_position) * config.history_window >= config.min_positives
    names = [n for n, u in zip(names, useful.tolist(), strict=True) if u]
    at_position = at_position[:, useful]
    # history share: the window ends at each row, within the row's user, in position order
    order = torch.from_numpy(np.lexsort((position.numpy(), user_idx.numpy())))
    users = user_idx[order]
    first = torch.ones(len(users), dtype=torch.bool)
    first[1:] = users[1:] != users[:-1]
    group_start = torch.cummax(torch.where(first, torch.arange(len(users)), 0), 0).values
    ends = torch.arange(1, len(users) + 1)
    starts = torch.maximum(group_start, ends - config.history_window)
    window = (ends - starts).unsqueeze(1)
    in_order = at_position[order]
    history_sorted = torch.empty_like(in_order)
    # A chunk of attributes at a time: the running counts are 4 bytes per row and attribute
    # in several copies (10 GB at once for 500k rows x 600 attributes)
    for start in range(0, in_order.shape[1], HISTORY_CHUNK):
        cols = slice(start, start + HISTORY_CHUNK)
        counts = torch.cumsum(in_order[:, cols].to(torch.int32), 0)
        counts = torch.cat([torch.zeros(1, counts.shape[1], dtype=torch.int32), counts])
        share = (counts[ends] - counts[starts]).float() / window
        history_sorted[:, cols] = share >= config.history_share
    history = torch.empty_like(history_sorted)
    history[order] = history_sorted
    parts = []
    for family, labels in (("attribute", at_position), ("history", history)):
        keep = _enough(labels, config.min_positives)
        parts.append(
            Targets(
                [f"{n}" for n, k in zip(names, keep.tolist(), strict=True) if k],
                [family] * int(keep.sum()),
                labels[:, keep],
            )
        )
    return Targets.concat(parts)


def concept_targets(names: list[str], labels: Tensor, config: MeasureConfig) -> Targets:
    """Planted concepts (`features.concept_labels`) as `concept` targets."""
    keep = _enough(labels, config.min_positives) if len(names) else torch.zeros(0, dtype=torch.bool)
    return Targets(
        [n for n, k in zip(names, keep.tolist(), strict=True) if k],
        ["concept"] * int(keep.sum()),
        labels[:, keep] if len(names) else labels,
    )


# ----------------------------------------------------------------------------- units


class Units:
    """One kind of unit over the sampled rows: AUCs against labels, mean differences for
    probe selection, and dense columns for a probe."""

    kind: str
    signed: bool
    """Dense kinds read each column in both signs: unit u < d is '+', u >= d is '-' of u - d."""
    width: int
    """Columns (features or dimensions)."""

    def aucs(self, labels: Tensor) -> Tensor:
        """AUC of every unit at every label column, [units, T] (signed kinds: [2 * width, T])."""
        raise NotImplementedError

    def aucs_of(self, *labels: Tensor) -> list[Tensor]:
        """`aucs` of each label matrix, the units' ranks computed once for all of them."""
        return [self.aucs(y) for y in labels]

    def mean_differences(self, rows: Tensor, labels: Tensor) -> Tensor:
        """Mean over positive minus mean over negative rows, per column: [width, T]."""
        raise NotImplementedError

    def columns(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Dense activations of columns `cols` on `rows`, [len(rows), len(cols)]."""
        raise NotImplementedError

    def active(self) -> Tensor:
        """Bool [units]: the unit varies over the sample (an SAE feature that never fires
        does not)."""
        raise NotImplementedError

    def unit_id(self, u: int) -> tuple[int, str]:
        return (u, "+") if not self.signed or u < self.width else (u - self.width, "-")


class DenseUnits(Units):
    """Neurons, or a rotation of them: the columns of a dense [R, d] matrix, both signs."""

    signed = True

    def __init__(self, kind: str, x: Tensor) -> None:
        self.kind, self.x, self.width = kind, x.float(), x.shape[1]

    def aucs(self, labels: Tensor) -> Tensor:
        return self.aucs_of(labels)[0]

    def aucs_of(self, *labels: Tensor) -> list[Tensor]:
        ranks = dense_ranks(self.x)  # one sort per column for every label matrix
        return [torch.cat([auc, 1 - auc]) for auc in (dense_auc_from(ranks, y) for y in labels)]

    def mean_differences(self, rows: Tensor, labels: Tensor) -> Tensor:
        x, y = self.x[rows].double(), labels[rows].double()
        pos = y.sum(0).clamp_min(1)
        neg = (len(y) - y.sum(0)).clamp_min(1)
        total = x.sum(0, keepdim=True).T  # [d, 1]
        pos_sum = x.T @ y  # [d, T]
        return (pos_sum / pos - (total - pos_sum) / neg).float()

    def columns(self, rows: Tensor, cols: Tensor) -> Tensor:
        return self.x[rows][:, cols]

    def active(self) -> Tensor:
        return (self.x.std(0) > 0).repeat(2)


class SparseUnits(Units):
    """SAE features: the top-k code (values, indices) of each row; one sign (activations >= 0)."""

    kind = "sae"
    signed = False

    def __init__(self, values: Tensor, indices: Tensor, n_latents: int) -> None:
        self.values, self.indices, self.width = values.float(), indices.long(), n_latents
        self.n_rows = len(values)
        keep = self.values > 0
        rows = torch.arange(self.n_rows).unsqueeze(1).expand_as(self.indices)[keep]
        feature = self.indices[keep]
        order = torch.argsort(feature, stable=True)
        self._rows, self._values = rows[order], self.values[keep][order]
        counts = torch.bincount(feature, minlength=n_latents)
        self._starts, self._counts = torch.cumsum(counts, 0) - counts, counts

    def aucs(self, labels: Tensor) -> Tensor:
        return self.aucs_of(labels)[0]

    def aucs_of(self, *labels: Tensor) -> list[Tensor]:
        ranks = sparse_ranks(self.values, self.indices, self.width)  # once for every matrix
        return [sparse_auc_from(ranks, y) for y in labels]

    def _matrix(self, rows: Tensor) -> Tensor:
        """Sparse [len(rows), width] of the code on `rows` (rows renumbered 0..)."""
        where = torch.full((self.n_rows,), -1, dtype=torch.long)
        where[rows] = torch.arange(len(rows))
        new_rows = where[self._rows]
        keep = new_rows >= 0
        feature = torch.repeat_interleave(torch.arange(self.width), self._counts)
        return torch.sparse_coo_tensor(
            torch.stack([new_rows[keep], feature[keep]]),
            self._values[keep].double(),
            (len(rows), self.width),
            check_invariants=False,
        )

    def mean_differences(self, rows: Tensor, labels: Tensor) -> Tensor:
        z = self._matrix(rows)
        y = labels[rows].double()
        pos = y.sum(0).clamp_min(1)
        neg = (len(y) - y.sum(0)).clamp_min(1)
        pos_sum = torch.sparse.mm(z.t(), y)  # [width, T]
        total = torch.sparse.sum(z, 0).to_dense().unsqueeze(1)
        return (pos_sum / pos - (total - pos_sum) / neg).float()

    def columns(self, rows: Tensor, cols: Tensor) -> Tensor:
        # Only `rows` are densified (all rows x every picked feature was 4 GB at 500k x 2048)
        where = torch.full((self.n_rows,), -1, dtype=torch.long)
        where[rows] = torch.arange(len(rows))
        if int((where >= 0).sum()) != len(rows):  # a row asked for twice
            distinct, inverse = torch.unique(rows, return_inverse=True)
            return self.columns(distinct, cols)[inverse]
        dense = torch.zeros(len(rows), len(cols))
        for j, f in enumerate(cols.tolist()):
            start, count = int(self._starts[f]), int(self._counts[f])
            at = where[self._rows[start : start + count]]
            keep = at >= 0
            dense[at[keep], j] = self._values[start : start + count][keep]
        return dense

    def active(self) -> Tensor:
        return self._counts > 0


def random_rotation(d: int, seed: int) -> Tensor:
    """A Haar-random orthogonal [d, d] matrix (QR of a seeded Gaussian, signs fixed)."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def rotated(x: Tensor, rotation: Tensor, mean: Tensor | None = None) -> Tensor:
    """(x - mean) @ rotation: the rotation's coordinates of the centred hidden state."""
    centre = x.float().mean(0) if mean is None else mean
    return (x.float() - centre) @ rotation


# ----------------------------------------------------------------------------- probing


def tied_auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC of `scores` [N] at detecting bool `labels` [N], ties counting half (average
    ranks); NaN without both classes."""
    return float(tied_aucs(scores[None], labels[None])[0])


def tied_aucs(scores: Tensor, labels: Tensor) -> Tensor:
    """`tied_auc` of each row: scores [T, N] at detecting bool labels [T, N], float64 [T]
    (NaN for a row without both classes). Per row one sort and a binary search of the
    positives only: a value's average rank is the mean of its first and last 1-based
    positions in the sorted row (numpy: about 3x `torch.unique`'s average ranks)."""
    # Sorted in their own precision (float32 sorts in half float64's time): widening would
    # change no order and no tie.
    values = scores.detach().cpu()
    values = (values if values.dtype == torch.float64 else values.float()).numpy()
    positive = labels.cpu().numpy()
    out = np.full(len(values), math.nan)
    for row, (v, y) in enumerate(zip(values, positive, strict=True)):
        n_pos = int(y.sum())
        n_neg = len(y) - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ordered, hits = np.sort(v), v[y]
        first = np.searchsorted(ordered, hits, side="left")
        last = np.searchsorted(ordered, hits, side="right")
        rank_sum = float(((first + last + 1) / 2).sum())
        out[row] = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return torch.from_numpy(out)


WARM_START_EVERY = 8
"""`fit_probes` first fits every this-many-th row (from zero), then all rows from there."""
WARM_START_ITERATIONS = 20


def fit_probes(
    x: Tensor, y: Tensor, l2: float = 1e-3, iterations: int = 50
) -> tuple[Tensor, Tensor]:
    """Logistic regressions fitted all at once: one per leading index of x [T, N, k] with
    labels y [T, N] (bool), on standardised columns with an L2 penalty `l2` on the weights,
    by damped Newton steps (each step at most norm 4 in the standardised basis); each probe
    stops once its step is below 1e-4, all of them after `iterations` (float32 products,
    float64 solves). Only the probes still moving take part in a step, so a few slow ones
    (near-separable targets, which take every iteration) no longer carry the rest along.

    With N >= 250 x `WARM_START_EVERY` rows, Newton first runs from zero on every
    `WARM_START_EVERY`-th row (at most `WARM_START_ITERATIONS` steps), and then on all rows
    from there: the same optimum (the penalised loss is strictly convex) in about 4 full passes
    instead of 9. Newton without a line search can cycle from a start that is not zero, so a
    probe whose last full step is still above 1e-2 is fitted again from zero on all rows.
    Returns (w [T, k], b [T]) for the raw columns (standardisation folded in)."""
    mean = x.mean(1, keepdim=True)
    std = x.std(1, keepdim=True).clamp_min(1e-6)
    z = torch.cat([(x - mean) / std, torch.ones_like(x[..., :1])], dim=-1).float()  # [T, N, k+1]
    target = y.float()
    width = z.shape[2]
    penalty = torch.full((width,), 2 * l2, dtype=torch.float32)
    penalty[-1] = 0.0  # the intercept is not penalised
    start = torch.zeros(z.shape[0], width, dtype=torch.float32)
    if z.shape[1] >= 250 * WARM_START_EVERY:
        every = slice(None, None, WARM_START_EVERY)
        warm, _ = _newton(z[:, every], target[:, every], start.clone(), penalty,
                          min(iterations, WARM_START_ITERATIONS))  # fmt: skip
        theta, last_step = _newton(z, target, warm, penalty, iterations)
        cycling = torch.nonzero(last_step > 1e-2).squeeze(1)
        if len(cycling):
            theta[cycling], _ = _newton(z[cycling], target[cycling], start[cycling], penalty,
                                        iterations)  # fmt: skip
    else:
        theta, _ = _newton(z, target, start, penalty, iterations)
    w = theta[:, :-1] / std.squeeze(1).double()
    b = theta[:, -1] - (w * mean.squeeze(1).double()).sum(1)
    return w.float(), b.float()


def _newton(
    z: Tensor, target: Tensor, theta: Tensor, penalty: Tensor, iterations: int
) -> tuple[Tensor, Tensor]:
    """`fit_probes`' damped Newton steps from `theta` [T, k+1] (updated in place) on z
    [T, N, k+1]; (theta, each probe's last step norm [T])."""
    n = z.shape[1]
    last_step = torch.zeros(z.shape[0])
    moving = torch.arange(z.shape[0])  # the probes still iterating, and their rows of z
    z_moving, target_moving = z, target
    for _ in range(iterations):
        zt = z_moving.transpose(1, 2)  # [M, k+1, N]
        current = theta[moving]
        p = torch.sigmoid(torch.bmm(z_moving, current.unsqueeze(-1)).squeeze(-1))  # [M, N]
        gradient = torch.bmm(zt, (p - target_moving).unsqueeze(-1)).squeeze(-1) / n
        gradient = gradient + penalty * current
        weights = (p * (1 - p)).clamp_min(1e-9)
        hessian = torch.bmm(zt * weights.unsqueeze(1), z_moving) / n + torch.diag(penalty + 1e-9)
        # the k+1 by k+1 solves in float64 (cheap); the N-long products stay float32
        step = torch.linalg.solve(hessian.double(), gradient.double().unsqueeze(-1))
        step = step.squeeze(-1).float()
        norm = torch.linalg.vector_norm(step, dim=1, keepdim=True)
        theta[moving] = current - step * torch.clamp(4.0 / norm.clamp_min(1e-12), max=1.0)
        last_step[moving] = norm.squeeze(1)
        still = norm.squeeze(1) >= 1e-4  # converged (Newton: quadratically, near the optimum)
        if not bool(still.any()):
            break
        if not bool(still.all()):
            moving, z_moving, target_moving = moving[still], z_moving[still], target_moving[still]
    return theta, last_step


def probe_split(user_idx: Tensor) -> Tensor:
    """Bool [R]: rows of held-out users, every third distinct sampled user (by user_idx)."""
    users = torch.unique(user_idx)
    held = users[torch.arange(len(users)) % 3 == 0]
    return torch.isin(user_idx, held)


@torch.no_grad()
def sparse_probe_aucs(
    units: Units, targets: Targets, heldout: Tensor, config: MeasureConfig
) -> tuple[Tensor, Tensor]:
    """Held-out AUC [len(probe_ks), T] of the k-sparse probe per target, and the units chosen
    for the largest k [T, max k] (columns, or -1 where a target is skipped: fewer than 5
    positives or negatives in either split)."""
    train = torch.nonzero(~heldout).squeeze(1)
    test = torch.nonzero(heldout).squeeze(1)
    step = max(1, math.ceil(len(train) / config.max_probe_train_rows))
    train = train[::step]
    y_train, y_test = targets.labels[train], targets.labels[test]  # [N, T]
    train_pos, test_pos = column_sums(y_train), column_sums(y_test)
    counts = torch.stack([train_pos, len(y_train) - train_pos, test_pos, len(y_test) - test_pos])
    fit = counts.min(0).values >= 5
    out = torch.full((len(config.probe_ks), len(targets.names)), math.nan)
    picked = torch.full((len(targets.names), 0), -1, dtype=torch.long)
    if not bool(fit.any()) or not len(train):
        return out, picked
    signed = units.mean_differences(train, targets.labels)  # [width, T]
    k_max = min(max(config.probe_ks), units.width)
    chosen = signed.abs().topk(k_max, dim=0).indices.T  # [T, k_max]
    columns, position = torch.unique(chosen[fit], return_inverse=True)
    x_train = units.columns(train, columns)  # [N, U]
    x_test = units.columns(test, columns)
    rows = torch.nonzero(fit).squeeze(1)
    for i, k in enumerate(config.probe_ks):
        cols = position[:, : min(k, k_max)]  # [T', k]
        if cols.shape[1] == 1:
            # One unit: the fitted probe is monotone in it, increasing iff the unit's mean
            # difference is positive (the 1-d logistic score equation), so no fit is needed.
            sign = torch.sign(signed[chosen[rows, 0], rows]).unsqueeze(1)
            scores = (x_test[:, cols[:, 0]].T * sign).contiguous()
        else:
            w, b = fit_probes(x_train[:, cols].permute(1, 0, 2), y_train[:, rows].T)
            scores = torch.einsum("ntk,tk->tn", x_test[:, cols], w) + b.unsqueeze(1)
        out[i, rows] = tied_aucs(scores, y_test[:, rows].T).float()
    picked = torch.full((len(targets.names), k_max), -1, dtype=torch.long)
    picked[fit] = chosen[fit]
    return out, picked


# ----------------------------------------------------------------------------- measures


@dataclass
class KindMeasures:
    """Every measure of one kind of unit."""

    kind: str
    aucs: Tensor
    """[units, T] AUC of each unit at each target."""
    null_aucs: Tensor
    """[units, T] the same with the label rows shuffled."""
    active: Tensor
    """[units] bool."""
    probe: Tensor
    """[len(probe_ks), T] held-out AUC of the k-sparse probes."""
    probe_units: Tensor
    """[T, max k] the columns the largest probe picked (-1: skipped)."""


@dataclass
class Measures:
    config: MeasureConfig
    targets: Targets
    kinds: dict[str, KindMeasures] = field(default_factory=dict)
    units_of: dict[str, Units] = field(default_factory=dict)

    # --------------------------------------------------------------- per unit

    def unit_table(self) -> pa.Table:
        """Per (kind, unit, sign): the best target of each family and its AUC, the same under
        the shuffled null, and whether the unit is active in the sample."""
        columns: dict[str, list] = {"kind": [], "unit": [], "sign": [], "active": []}
        for family in TARGET_FAMILIES:
            for suffix in ("", "_auc", "_null_auc"):
                columns[f"best_{family}{suffix}"] = []
        for kind, m in self.kinds.items():
            units = self.units_of[kind]
            n = m.aucs.shape[0]
            for u in range(n):
                unit, sign = units.unit_id(u)
                columns["kind"].append(kind)
                columns["unit"].append(unit)
                columns["sign"].append(sign)
                columns["active"].append(bool(m.active[u]))
            for family in TARGET_FAMILIES:
                cols = self.targets.select(family)
                if len(cols) == 0:
                    columns[f"best_{family}"].extend([None] * n)
                    columns[f"best_{family}_auc"].extend([None] * n)
                    columns[f"best_{family}_null_auc"].extend([None] * n)
                    continue
                best = m.aucs[:, cols].max(1)
                null = m.null_aucs[:, cols].max(1).values
                names = [self.targets.names[int(cols[i])] for i in best.indices.tolist()]
                active = m.active.tolist()
                columns[f"best_{family}"].extend(
                    [name if a else None for name, a in zip(names, active, strict=True)]
                )
                columns[f"best_{family}_auc"].extend(
                    [v if a else None for v, a in zip(best.values.tolist(), active, strict=True)]
                )
                columns[f"best_{family}_null_auc"].extend(
                    [v if a else None for v, a in zip(null.tolist(), active, strict=True)]
                )
        types = {"unit": pa.int32(), "active": pa.bool_()}
        return pa.table(
            {
                name: pa.array(
                    values, types.get(name, pa.float32() if "auc" in name else pa.string())
                )
                for name, values in columns.items()
            }
        )

    def chance_levels(self) -> dict[str, dict[str, float]]:
        """kind -> family -> the 95th percentile over active units of the null's best AUC."""
        out: dict[str, dict[str, float]] = {}
        for kind, m in self.kinds.items():
            out[kind] = {}
            for family in TARGET_FAMILIES:
                cols = self.targets.select(family)
                if len(cols) == 0 or not bool(m.active.any()):
                    continue
                null = m.null_aucs[m.active][:, cols].max(1).values
                out[kind][family] = float(torch.quantile(null.double(), 0.95))
        return out

    def share_above_chance(self, kind: str, family: str) -> float:
        """Share of the kind's active units whose best AUC over `family` beats the chance
        level (`chance_levels`)."""
        m = self.kinds[kind]
        cols = self.targets.select(family)
        level = self.chance_levels()[kind].get(family)
        if level is None:
            return math.nan
        best = m.aucs[m.active][:, cols].max(1).values
        return float((best > level).float().mean())

    # --------------------------------------------------------------- per target

    def target_table(self) -> pa.Table:
        """Per (target, kind): positives, the best unit and its AUC, the null's best AUC, the
        excess over it, and the held-out AUC of each k-sparse probe."""
        rows: dict[str, list] = {
            "target": [], "family": [], "positives": [], "kind": [], "best_unit": [],
            "best_sign": [], "best_auc": [], "null_best_auc": [], "excess_auc": [],
        }  # fmt: skip
        for k in self.config.probe_ks:
            rows[f"probe_auc_k{k}"] = []
        rows["probe_units"] = []
        positives = column_sums(self.targets.labels).tolist()
        for kind, m in self.kinds.items():
            units = self.units_of[kind]
            best = m.aucs.max(0)
            null_best = m.null_aucs.max(0).values
            for t, name in enumerate(self.targets.names):
                unit, sign = units.unit_id(int(best.indices[t]))
                rows["target"].append(name)
                rows["family"].append(self.targets.families[t])
                rows["positives"].append(int(positives[t]))
                rows["kind"].append(kind)
                rows["best_unit"].append(unit)
                rows["best_sign"].append(sign)
                rows["best_auc"].append(float(best.values[t]))
                rows["null_best_auc"].append(float(null_best[t]))
                rows["excess_auc"].append(float(best.values[t] - null_best[t]))
                for i, k in enumerate(self.config.probe_ks):
                    rows[f"probe_auc_k{k}"].append(float(m.probe[i, t]))
                rows["probe_units"].append([int(u) for u in m.probe_units[t].tolist() if u >= 0])
        types = {
            "positives": pa.int64(), "best_unit": pa.int32(), "probe_units": pa.list_(pa.int32()),
        }  # fmt: skip
        return pa.table(
            {
                name: pa.array(
                    values,
                    types.get(
                        name,
                        pa.string()
                        if name in ("target", "family", "kind", "best_sign")
                        else pa.float32(),
                    ),
                )
                for name, values in rows.items()
            }
        )

    def per_target(self, kind: str, measure: str, family: str | Sequence[str]) -> np.ndarray:
        """One measure over the targets of `family` (or several), float64 [T'] in target order:
        `best_auc`, `excess_auc` or `probe_auc_k<k>`."""
        families = (family,) if isinstance(family, str) else tuple(family)
        cols = torch.tensor(
            [i for i, f in enumerate(self.targets.families) if f in families], dtype=torch.long
        )
        m = self.kinds[kind]
        if measure == "best_auc":
            values = m.aucs.max(0).values
        elif measure == "excess_auc":
            values = m.aucs.max(0).values - m.null_aucs.max(0).values
        elif measure.startswith("probe_auc_k"):
            values = m.probe[self.config.probe_ks.index(int(measure.removeprefix("probe_auc_k")))]
        else:
            raise ValueError(f"measure={measure!r}; pick best_auc, excess_auc or probe_auc_k<k>")
        return values[cols].double().numpy()

    def summary(self) -> dict[str, float]:
        """Flat figures per kind (`<kind>_<measure>_<family>`): the median over targets of the
        best-unit AUC, its excess over the null and each probe's AUC, the share of units above
        chance; plus `sae_beats_neurons_*` and `sae_beats_rotation_*` counts of targets."""
        out: dict[str, float] = {}
        measures = ["best_auc", "excess_auc"] + [f"probe_auc_k{k}" for k in self.config.probe_ks]
        families = [f for f in TARGET_FAMILIES if f in self.targets.families]
        for kind in self.kinds:
            for family in families:
                for measure in measures:
                    values = self.per_target(kind, measure, family)
                    out[f"{kind}_{measure}_{family}"] = float(np.nanmedian(values))
                out[f"{kind}_above_chance_{family}"] = self.share_above_chance(kind, family)
        for other in ("neurons", "rotation"):
            if "sae" not in self.kinds or other not in self.kinds:
                continue
            for family in families:
                for measure in (
                    "excess_auc",
                    f"probe_auc_k{max(self.config.probe_ks)}",
                    "probe_auc_k1",
                ):
                    a = self.per_target("sae", measure, family)
                    b = self.per_target(other, measure, family)
                    ok = np.isfinite(a) & np.isfinite(b)
                    out[f"sae_beats_{other}_{measure}_{family}"] = float((a[ok] > b[ok]).sum())
                out[f"targets_{family}"] = float(len(self.per_target("sae", "best_auc", family)))
        return out


def measure_units(
    units: Sequence[Units],
    targets: Targets,
    user_idx: Tensor,
    config: MeasureConfig,
) -> Measures:
    """Every measure (module docstring) of each kind in `units` against `targets`."""
    generator = torch.Generator().manual_seed(config.seed)
    shuffled = targets.labels[torch.randperm(len(targets.labels), generator=generator)]
    heldout = probe_split(user_idx)
    out = Measures(config, targets)
    for u in units:
        probe, picked = sparse_probe_aucs(u, targets, heldout, config)
        real, null = u.aucs_of(targets.labels, shuffled)
        out.kinds[u.kind] = KindMeasures(u.kind, real, null, u.active(), probe, picked)
        out.units_of[u.kind] = u
    return out


# ----------------------------------------------------------------------------- purity null


def purity_chance(
    item_rows: dict[int, int],
    attribute_matrix: Tensor,
    sizes: Sequence[int],
    draws: int,
    seed: int,
) -> dict[int, tuple[float, float]]:
    """The monosemanticity score's chance level: for each top-item count n in `sizes`, the
    median and 95th percentile over `draws` sets of n distinct items drawn by row frequency
    (without replacement) of the best attribute's purity (share - base) / (1 - base), with
    base rates over the items in `item_rows` (item_idx -> rows), as `features.enrichment`.

    Each draw orders all items by Gumbel keys log(w) + G (the first n of that order are a
    weighted draw of n without replacement, Efraimidis-Spirakis), so one sort per draw
    serves every n."""
    items = np.array(sorted(item_rows), dtype=np.int64)
    weights = np.array([item_rows[i] for i in items], dtype=np.float64)
    carried = attribute_matrix[torch.from_numpy(items)].numpy()  # [I, A]
    base = carried.mean(0)
    present = base > 0
    base, carried = base[present], carried[:, present].astype(np.float64)
    rng = np.random.default_rng(seed)
    keys = np.log(weights)[None, :] + rng.gumbel(size=(draws, len(items)))
    order = np.argsort(-keys, axis=1)
    wanted = sorted({min(int(s), len(items)) for s in sizes})
    best = np.empty((len(wanted), draws))
    scale = np.where(base < 1, 1 - base, 1.0)
    for d in range(draws):
        hits = np.cumsum(carried[order[d, : wanted[-1]]], axis=0)  # [n_max, A]
        for i, n in enumerate(wanted):
            share = hits[n - 1] / n
            purity = np.where(base < 1, (share - base) / scale, 0.0)
            best[i, d] = purity[share > 0].max() if (share > 0).any() else 0.0
    out = {
        n: (float(np.median(b)), float(np.quantile(b, 0.95)))
        for n, b in zip(wanted, best, strict=True)
    }
    return {int(s): out[min(int(s), len(items))] for s in sizes}


_BASELINES: dict[tuple[str, str, int, int], Measures] = {}
"""sweep_measures' controls per (root, model, layer, sample size)."""


def sweep_measures(
    sae: TopKSae,
    paths: ArtifactPaths,
    model: str,
    layer: int,
    device: torch.device | str,
    max_sample_rows: int = 100_000,
) -> dict[str, float]:
    """`Measures.summary()` of one SAE on partition (model, layer) beside the neurons and the
    random rotation, for a sweep over SAE settings: the two controls are measured once per
    partition (and sample size) and reused. See `features.partition_measures`."""
    from recsae_pipeline.sae.features import partition_measures

    key = (str(paths.root), model, layer, max_sample_rows)
    if key not in _BASELINES:
        _BASELINES[key] = partition_measures(
            sae,
            paths,
            model,
            layer,
            device,
            ("neurons", "rotation"),
            max_sample_rows,
        )
    measures = partition_measures(
        sae,
        paths,
        model,
        layer,
        device,
        ("sae",),
        max_sample_rows,
        baseline=_BASELINES[key],
    )
    return measures.summary()
