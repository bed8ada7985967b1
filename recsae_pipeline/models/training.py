"""SASRec+ training (full-softmax cross-entropy at every position) and batched evaluation.

Leave-one-out: training reads items[:-2], validation predicts items[-2] from items[:-2],
test predicts items[-1] from items[:-1]; every input keeps its last max_len items.
Under torchrun (DDP) every rank draws the same batches and trains on its shard of each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from recsae_pipeline.data.batching import Split, pad_right, split_examples
from recsae_pipeline.distributed import ddp
from recsae_pipeline.models.metrics import (
    filter_seen,
    full_ranking_metrics,
    sample_negatives,
    sampled_metrics,
    sampled_ranks,
    target_ranks,
)
from recsae_pipeline.models.recommender import Recommender, RecommenderConfig


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and early stopping; one epoch = one pass over every user's training part."""

    max_epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    patience: int = 10
    negatives: int = 0
    """The default loss's sampled softmax: negatives per step, drawn by training frequency
    with the logQ correction (0: full softmax over every item; `NextItemLoss`)."""
    eval_batch_size: int = 512
    seed: int = 0
    progress_bar: bool = True
    """tqdm bar over batches on stderr (only when it is a terminal)."""
    length_groups: int = 3
    """Each batch runs as up to this many sub-batches of windows of similar length, each
    padded only to its own longest window, their losses weighted by their share of the
    batch's positions and their gradients summed before the one optimizer step: the same
    batches and the same loss as one padded pass, with less compute on padding (1: one pass;
    under DDP always 1)."""

    def __post_init__(self) -> None:
        if min(self.max_epochs, self.batch_size, self.patience, self.length_groups) < 1:
            raise ValueError(
                f"max_epochs, batch_size, patience and length_groups must be >= 1, got {self}"
            )


SASREC_TRAINING = TrainConfig(batch_size=64, patience=6)
"""SASRec's schedule, chosen by `benchmarks/train_schedule.py` on the default data (result
benchmarks/results/train_schedule_sasrec.json): batch 64 leaves the popularity plateau of the
first epochs sooner and peaks at about epoch 18 (batch 128: about 30; a higher lr was
slower), and patience 6 outlasts that plateau (4-5 epochs) while stopping 6 epochs after the
peak instead of 10."""

LLAMA_TRAINING = TrainConfig(lr=2e-3, max_epochs=12, patience=2)
"""The Llama-backbone models' schedule (teacher and students): fewer epochs at a higher lr.
Patience 2: on the default data the teacher keeps the same best epoch as with patience 3 or
4, one epoch sooner (benchmarks/results/train_schedule_teacher.json); the students' curves of
the default run at 8c70407 replayed the same way kept theirs too."""


class EpochReport(NamedTuple):
    epoch: int
    """1-based."""
    train_loss: float
    """Mean total loss over the epoch's batches."""
    loss_terms: dict[str, float]
    """Mean of every term the loss returned (ce, cosine, ...)."""
    valid: dict[str, float]
    """Validation full-ranking metrics after this epoch."""
    seconds: float
    """Wall time of this epoch, evaluation included."""
    eta_seconds: float
    """Upper bound on the time left: mean epoch time x epochs left before max_epochs."""
    best_epoch: int


class TrainResult(NamedTuple):
    best_epoch: int
    best_valid: dict[str, float]
    """Validation metrics of the kept (best) state."""
    train_seconds: float
    epochs_run: int
    history: list[EpochReport]


class NextItemScorer(Protocol):
    """Anything that scores every item as the next one after right-padded sequences."""

    def predict(self, items: Tensor) -> Tensor: ...


class CETerms(NamedTuple):
    total: Tensor
    """What is minimised: here the cross-entropy itself."""
    ce: Tensor
    """Next-item cross-entropy (full softmax, or sampled: `NextItemLoss`), mean over real
    positions."""


class NextItemLoss(nn.Module):
    """SASRec+: full-softmax cross-entropy over all items at every non-padding position, or
    with `negatives` > 0 a sampled softmax (Jean et al. 2015): each position's target against
    `negatives` items drawn once per call and shared by the batch's positions, every score
    corrected by -log Q(item) (Q = negatives x the item's draw probability, the "logQ"
    correction that keeps the estimate consistent), a drawn negative equal to the position's
    target masked out. Items are drawn by `item_counts` (training frequency + 1: the popular
    items a full ranking must get right are the ones drawn), uniformly without them; on the
    default data uniform draws left SASRec on the popularity plateau for 15+ epochs
    (benchmarks/train_schedule.py --negatives). A step then costs `negatives` scores per
    position instead of the catalogue's: for catalogues where the full softmax dominates.
    It is a different estimator; its quality is measured against the full softmax."""

    def __init__(
        self, negatives: int = 0, seed: int = 0, item_counts: Tensor | None = None
    ) -> None:
        super().__init__()
        if negatives < 0:
            raise ValueError(f"negatives={negatives}; 0 (full softmax) or a count of items")
        self.negatives = negatives
        self.generator = torch.Generator().manual_seed(seed) if negatives else None
        self.proposal: Tensor | None = None
        if item_counts is not None:
            weights = item_counts.double() + 1.0
            weights[0] = 0.0  # padding is never an item
            self.proposal = weights / weights.sum()
        self._log_q: Tensor | None = None  # log(negatives x q), once per catalogue

    def forward(
        self, model: Recommender, items: Tensor, targets: Tensor, rows: Tensor | None = None
    ) -> CETerms:
        real = targets > 0
        user, target = model(items).user[real], targets[real]
        if not self.negatives:
            ce = F.cross_entropy(model.scores(user), target)
            return CETerms(ce, ce)
        table = model.item_vectors
        if self.proposal is None:  # uniform over the items
            self.proposal = torch.full((len(table),), 1.0 / (len(table) - 1), dtype=torch.float64)
            self.proposal[0] = 0.0
        if self._log_q is None or self._log_q.device != table.device:
            self._log_q = torch.log(self.proposal * self.negatives).float().to(table.device)
        q, log_q = self.proposal, self._log_q
        drawn = torch.multinomial(q, self.negatives, replacement=True, generator=self.generator)
        drawn = drawn.to(table.device)
        positive = (user * table[target]).sum(-1, keepdim=True) - log_q[target, None]  # [P, 1]
        negative = user @ table[drawn].T - log_q[drawn][None, :]  # [P, negatives]
        negative = negative.masked_fill(drawn[None, :] == target[:, None], float("-inf"))
        logits = torch.cat([positive, negative], dim=1)
        ce = F.cross_entropy(logits, torch.zeros_like(target))
        return CETerms(ce, ce)


class _ModelAndLoss(nn.Module):
    """The model and the loss as one module, so DDP averages the gradients of both (the loss
    may hold weights of its own: SLMRec's intermediate heads)."""

    def __init__(self, model: Recommender, loss_fn: nn.Module) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, items: Tensor, targets: Tensor, rows: Tensor) -> NamedTuple:
        return self.loss_fn(self.model, items, targets, rows)


def training_windows(sequence: np.ndarray, max_len: int) -> list[np.ndarray]:
    """Windows of at most max_len + 1 items cut from the end of the training part (items[:-2]),
    overlapping by one item, so every training item after the first is a target exactly once
    (long histories are used whole instead of only their last max_len items)."""
    part, windows = sequence[:-2], []
    end = len(part)
    while end >= 2:
        start = max(0, end - max_len - 1)
        windows.append(part[start:end])
        end = start + 1
    return windows


def item_frequencies(sequences: list[np.ndarray], num_items: int) -> Tensor:
    """How often each item (index 0 = padding, 0) occurs in the training parts (items[:-2])."""
    counts = np.zeros(num_items + 1, dtype=np.int64)
    for start in range(0, len(sequences), 65_536):  # one bounded concatenation at a time
        chunk = [s[:-2] for s in sequences[start : start + 65_536]]
        if chunk:
            counts += np.bincount(np.concatenate(chunk), minlength=num_items + 1)
    return torch.from_numpy(counts)


def train_examples(sequences: list[np.ndarray], max_len: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-item targets [windows, max_len] from `training_windows` of every user;
    users with a single training item (length 3) have no pair and are left out."""
    windows = [w for s in sequences for w in training_windows(s, max_len)]
    return pad_right([w[:-1] for w in windows], max_len), pad_right(
        [w[1:] for w in windows], max_len
    )


def length_groups(lengths: Tensor, groups: int) -> list[Tensor]:
    """Positions into `lengths` (one batch's window lengths) in up to `groups` sub-batches of
    as many windows each, longest windows first: each pads only to its own longest. One
    group keeps the batch's own order."""
    if groups <= 1:
        return [torch.arange(len(lengths))]
    order = torch.sort(lengths, descending=True, stable=True).indices
    return [g for g in order.tensor_split(min(groups, len(order))) if len(g)]


def input_length(scorer: NextItemScorer) -> int:
    """How many last items a scorer reads: a recommender's max_len, else the default one."""
    return scorer.config.max_len if isinstance(scorer, Recommender) else RecommenderConfig.max_len


@torch.no_grad()
def user_ranks(
    scorer: NextItemScorer,
    sequences: list[np.ndarray],
    split: Split,
    device: torch.device,
    max_len: int | None = None,
    batch_size: int = 512,
    filter_seen_items: bool = True,
    negatives: np.ndarray | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Each user's 0-based full-ranking rank of their `split` target (seen items filtered
    unless `filter_seen_items` is False), in `sequences` order; with `negatives`, also the
    sampled-protocol ranks. Users are batched by input length (shortest first), so a batch
    pads to little more than its own inputs; the ranks come back in `sequences` order."""
    max_len = input_length(scorer) if max_len is None else max_len
    inputs, targets, histories = split_examples(sequences, split, max_len)
    was_training = isinstance(scorer, nn.Module) and scorer.training
    if isinstance(scorer, nn.Module):
        scorer.eval()
    order = np.argsort(np.fromiter(map(len, inputs), np.int64, len(inputs)), kind="stable")
    full = torch.empty(len(sequences), dtype=torch.int64)
    sampled = torch.empty(len(sequences), dtype=torch.int64) if negatives is not None else None
    for start in range(0, len(sequences), batch_size):
        batch = order[start : start + batch_size]
        rows = torch.from_numpy(batch)
        scores = scorer.predict(pad_right([inputs[i] for i in batch]).to(device)).float()
        target = torch.from_numpy(targets[batch]).to(device)
        if filter_seen_items:
            seen = pad_right([histories[i] for i in batch]).to(device)
            full[rows] = target_ranks(filter_seen(scores, seen, target), target).cpu()
        else:  # RecBole's protocol for sequential models: only padding is excluded
            full[rows] = target_ranks(scores, target).cpu()
        if sampled is not None:
            negative = torch.from_numpy(negatives[batch]).to(device)
            sampled[rows] = sampled_ranks(scores, target, negative).cpu()
    if was_training:
        scorer.train()
    return full, sampled


def evaluate(
    scorer: NextItemScorer,
    sequences: list[np.ndarray],
    num_items: int,
    split: Split,
    device: torch.device,
    max_len: int | None = None,
    batch_size: int = 512,
    sampled: bool = True,
    seed: int = 0,
    filter_seen_items: bool = True,
) -> dict[str, float]:
    """Full-ranking HR/NDCG/MRR@10/20 with seen items filtered, plus SLMRec's sampled metrics
    (prefixed `sampled_`, negatives seeded by `seed`) unless sampled=False."""
    return evaluate_with_ranks(
        scorer, sequences, num_items, split, device, max_len, batch_size, sampled, seed,
        filter_seen_items,
    )[0]  # fmt: skip


def evaluate_with_ranks(
    scorer: NextItemScorer,
    sequences: list[np.ndarray],
    num_items: int,
    split: Split,
    device: torch.device,
    max_len: int | None = None,
    batch_size: int = 512,
    sampled: bool = True,
    seed: int = 0,
    filter_seen_items: bool = True,
) -> tuple[dict[str, float], Tensor]:
    """`evaluate`'s metrics and the full-ranking ranks they come from (`user_ranks`)."""
    negatives = sample_negatives(sequences, num_items, seed=seed) if sampled else None
    full, sampled_rank = user_ranks(
        scorer, sequences, split, device, max_len, batch_size, filter_seen_items, negatives
    )
    metrics = full_ranking_metrics(full)
    if sampled_rank is not None:
        metrics |= {f"sampled_{k}": v for k, v in sampled_metrics(sampled_rank).items()}
    return metrics, full


def _optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    # nanoGPT's split: matrices and embeddings decay, biases and norm gains do not.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


def train_recommender(
    model: Recommender,
    sequences: list[np.ndarray],
    num_items: int,
    config: TrainConfig,
    device: torch.device,
    on_epoch: Callable[[EpochReport], None] | None = None,
    loss_fn: nn.Module | None = None,
) -> TrainResult:
    """Train until validation NDCG@10 stops improving for `patience` epochs; the model ends in
    its best state. `loss_fn(model, items, targets, rows)` returns a NamedTuple with a `total`;
    `rows` are the batch's indices into `train_examples(sequences, max_len)`.
    Under a process group (torchrun) `batch_size` is the global batch, each rank trains on its
    shard, and rank 0 evaluates and shares the validation metrics."""
    if loss_fn is not None and config.negatives:
        raise ValueError(
            f"negatives={config.negatives} samples the default next-item loss, but this model "
            "trains with its own loss; set negatives: 0"
        )
    if loss_fn is None:
        counts = item_frequencies(sequences, num_items) if config.negatives else None
        loss_fn = NextItemLoss(config.negatives, config.seed, counts)
    model.to(device)
    loss_fn.to(device)
    inputs, targets = train_examples(sequences, model.config.max_len)
    if len(inputs) == 0:
        raise ValueError(
            "no user has 2+ training items (sequences of length >= 4); nothing to train"
        )
    lengths = (inputs > 0).sum(1)
    inputs, targets = inputs.to(device), targets.to(device)
    params = [p for p in chain(model.parameters(), loss_fn.parameters()) if p.requires_grad]
    step_loss = ddp.wrap(_ModelAndLoss(model, loss_fn), device, static_graph=True)
    optimizer = _optimizer(params, config)
    warmup = max(config.warmup_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )
    shuffle = torch.Generator().manual_seed(config.seed)
    # Sub-batches would all-reduce gradients once each under DDP: one pass there.
    groups = 1 if ddp.world_size() > 1 else config.length_groups

    best_metric, best_epoch, best_valid, best_state = -math.inf, 0, {}, None
    history: list[EpochReport] = []
    start_time = time.perf_counter()
    with torch.random.fork_rng(devices=[] if device.type != "cuda" else None):
        torch.manual_seed(config.seed + ddp.rank())  # own dropout masks per rank
        for epoch in range(1, config.max_epochs + 1):
            epoch_start = time.perf_counter()
            model.train()
            loss_fn.train()
            sums: dict[str, Tensor] = {}
            batches = torch.randperm(len(inputs), generator=shuffle).split(config.batch_size)
            bar = tqdm(
                batches,
                desc=f"epoch {epoch}",
                leave=False,
                disable=None if config.progress_bar and ddp.is_main() else True,
            )  # None: only on a terminal
            for step, index in enumerate(bar):
                index = ddp.shard(index)
                optimizer.zero_grad(set_to_none=True)
                batch_lengths = lengths[index]
                positions = batch_lengths.sum()
                step_terms: dict[str, Tensor] = {}
                for group in length_groups(batch_lengths, groups):
                    rows = index[group]
                    width = int(batch_lengths[group].max())
                    weight = batch_lengths[group].sum() / positions
                    rows_on_device = rows.to(device)
                    terms = step_loss(
                        inputs[rows_on_device, :width],
                        targets[rows_on_device, :width],
                        rows_on_device,
                    )
                    (terms.total * weight).backward()
                    for name, value in terms._asdict().items():
                        weighted = value.detach() * weight
                        step_terms[name] = step_terms.get(name, 0.0) + weighted
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                schedule.step()
                for name, value in step_terms.items():
                    sums[name] = sums.get(name, 0.0) + value
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{step_terms['total'].item():.4f}")
            loss_terms = {
                name: (ddp.all_reduce_mean(value) / len(batches)).item()
                for name, value in sums.items()
            }
            if not math.isfinite(loss_terms["total"]):
                raise FloatingPointError(
                    f"training loss is {loss_terms['total']} at epoch {epoch}; lower lr={config.lr}"
                )
            valid = ddp.broadcast_object(
                evaluate(
                    model,
                    sequences,
                    num_items,
                    "valid",
                    device,
                    batch_size=config.eval_batch_size,
                    sampled=False,
                )
                if ddp.is_main()
                else None
            )
            if valid["ndcg@10"] > best_metric:
                best_metric, best_epoch, best_valid = valid["ndcg@10"], epoch, valid
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            now = time.perf_counter()
            report = EpochReport(
                epoch=epoch,
                train_loss=loss_terms.pop("total"),
                loss_terms=loss_terms,
                valid=valid,
                seconds=now - epoch_start,
                eta_seconds=(now - start_time) / epoch * (config.max_epochs - epoch),
                best_epoch=best_epoch,
            )
            history.append(report)
            if on_epoch is not None:
                on_epoch(report)
            if epoch - best_epoch >= config.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        best_epoch=best_epoch,
        best_valid=best_valid,
        train_seconds=time.perf_counter() - start_time,
        epochs_run=len(history),
        history=history,
    )
