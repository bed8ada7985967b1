"""Train RecBole 1.2.1's SASRec on a time-ordered leave-one-out split; write timings and metrics.

Run with benchmarks/recbole/.venv/bin/python (made by setup_env.sh), not the project's venv.
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest.mock import patch

# RecBole pickles its whole config into checkpoints, and torch >= 2.6 refuses to load those.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import pandas as pd  # noqa: E402
import recbole  # noqa: E402
import torch  # noqa: E402
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.model.sequential_recommender import SASRec  # noqa: E402
from recbole.trainer import Trainer  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

# RecBole 1.2.1 predates pandas 2.2 and torch.amp; its deprecation noise is not ours to fix.
warnings.filterwarnings("ignore", category=FutureWarning, module="recbole")
warnings.filterwarnings("ignore", message="Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")

# RecBole reads `<data_path>/<dataset>/<dataset>.inter` and swaps in its bundled copy when the
# dataset is named "ml-100k"; staging the file under a fixed name avoids both.
STAGED_NAME = "bench"
INTER_COLUMNS = ["user_id:token", "item_id:token", "timestamp:float"]


@dataclass
class EpochRecord:
    epoch: int
    seconds: float
    """Training plus validation (plus RecBole's checkpoint write on improvement)."""
    train_seconds: float
    valid_seconds: float
    elapsed_seconds: float
    """From the start of training to the end of this epoch."""
    cpu_seconds: float
    """This process's CPU time over the same span (time.process_time), steadier than wall
    time on a loaded machine."""
    train_loss: float
    """Mean over batches of the batch-mean cross-entropy."""
    valid_ndcg_at_10: float
    valid_hit_at_10: float
    load_average: tuple[float, float, float]
    """os.getloadavg() at the end of the epoch: the machine is shared."""


@dataclass
class BenchmarkResult:
    implementation: str
    command: str
    generated_at: str
    model: str
    dataset: str
    data_file: str
    data_sha256: str
    mode: str
    budget_seconds: float | None
    max_epochs: int
    seed: int
    torch_threads: int
    versions: dict[str, str]
    config: dict[str, object]
    n_users: int
    n_items: int
    n_interactions: int
    n_train_examples: int
    n_valid_users: int
    n_test_users: int
    data_prep_seconds: float
    load_average: list[dict[str, object]] = field(default_factory=list)
    """os.getloadavg() at the start, after training and after testing."""
    status: str = "running"
    """"running" while epochs are appended (the file is rewritten after each), then "done"."""
    epochs: list[EpochRecord] = field(default_factory=list)
    epochs_run: int = 0
    stop_reason: str = ""
    """One of "budget", "early_stopping" (stopping_step epochs without gain), "max_epochs"."""
    budget_exhausted: bool = False
    best_epoch: int = -1
    best_valid_ndcg_at_10: float = float("nan")
    test_ndcg_at_10: float = float("nan")
    test_hit_at_10: float = float("nan")
    seconds_to_best_epoch: float = float("nan")
    cpu_seconds_to_best_epoch: float = float("nan")
    mean_epoch_seconds: float = float("nan")
    train_wall_seconds: float = float("nan")
    test_seconds: float = float("nan")
    total_wall_seconds: float = float("nan")
    """From process start (after imports) to the test metrics, data loading included."""
    test_users: list[int] = field(default_factory=list)
    """Each test user's token in the .inter file (our export: 1-based position in sequences)."""
    test_ranks: list[int] = field(default_factory=list)
    """0-based rank of each test user's target among all items (history not masked, ties
    counted against the target), by the best epoch's weights; aligned with test_users."""
    test_ndcg_at_10_from_ranks: float = float("nan")
    """Mean over test_ranks of 1/log2(rank + 2) below rank 10: RecBole's figure, up to ties."""


class BudgetSpent(Exception):
    """Raised from the epoch callback to leave RecBole's fit loop once the budget is spent."""


class BudgetTrainer(Trainer):
    """RecBole's Trainer, unchanged, plus per-epoch timing and a wall-clock budget.

    The budget is checked after each epoch's validation, so the last epoch may overrun it.
    """

    def __init__(
        self,
        config: Config,
        model: SASRec,
        budget_seconds: float | None,
        on_epoch: Callable[[list[EpochRecord]], None] | None = None,
    ):
        super().__init__(config, model)
        self.budget_seconds = budget_seconds
        self.on_epoch = on_epoch
        self.records: list[EpochRecord] = []
        self.best_epoch = -1
        self.budget_exhausted = False
        self._n_batches = 1
        self.training_start = 0.0
        self.training_cpu_start = 0.0
        self._epoch_start = 0.0
        self._train_seconds = 0.0
        self._valid_seconds = 0.0
        self._train_loss = float("nan")
        self._valid_result: dict[str, float] = {}

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self._epoch_start = time.perf_counter()
        loss_sum = super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
        self._train_seconds = time.perf_counter() - self._epoch_start
        self._train_loss = loss_sum / self._n_batches
        return loss_sum

    def _valid_epoch(self, valid_data, show_progress=False):
        start = time.perf_counter()
        valid_score, valid_result = super()._valid_epoch(valid_data, show_progress)
        self._valid_seconds = time.perf_counter() - start
        self._valid_result = valid_result
        return valid_score, valid_result

    def _after_epoch(self, epoch_idx: int, valid_score: float) -> None:
        now = time.perf_counter()
        # early_stopping() has just run: cur_step is 0 exactly when this epoch improved.
        if self.cur_step == 0:
            self.best_epoch = epoch_idx
        record = EpochRecord(
            epoch=epoch_idx,
            seconds=now - self._epoch_start,
            train_seconds=self._train_seconds,
            valid_seconds=self._valid_seconds,
            elapsed_seconds=now - self.training_start,
            cpu_seconds=time.process_time() - self.training_cpu_start,
            train_loss=self._train_loss,
            valid_ndcg_at_10=self._valid_result["ndcg@10"],
            valid_hit_at_10=self._valid_result["hit@10"],
            load_average=os.getloadavg(),
        )
        self.records.append(record)
        if self.on_epoch is not None:
            self.on_epoch(self.records)
        print(
            f"epoch {epoch_idx:3d}  {record.seconds:6.2f}s  loss {record.train_loss:.4f}  "
            f"valid NDCG@10 {record.valid_ndcg_at_10:.4f}  HR@10 {record.valid_hit_at_10:.4f}",
            flush=True,
        )
        early_stop_due = self.cur_step > self.stopping_step
        if (
            self.budget_seconds is not None
            and record.elapsed_seconds >= self.budget_seconds
            and not early_stop_due
        ):
            self.budget_exhausted = True
            raise BudgetSpent

    def fit_within_budget(self, train_data, valid_data) -> str:
        """Run RecBole's own fit loop; return why it stopped."""
        self._n_batches = max(len(train_data), 1)
        self.training_start = time.perf_counter()
        self.training_cpu_start = time.process_time()
        try:
            super().fit(
                train_data, valid_data, verbose=False, saved=True, callback_fn=self._after_epoch
            )
        except BudgetSpent:
            return "budget"
        if self.records and self.cur_step > self.stopping_step:
            return "early_stopping"
        return "max_epochs"


def sasrec_config(args: argparse.Namespace, data_path: Path, checkpoint_dir: Path) -> dict:
    return {
        "data_path": str(data_path),
        "checkpoint_dir": str(checkpoint_dir),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
        "eval_args": {
            "split": {"LS": "valid_and_test"},
            "order": "TO",
            "group_by": "user",
            "mode": "full",
        },
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "MAX_ITEM_LIST_LENGTH": 50,
        "hidden_size": 64,
        "inner_size": 256,
        "n_layers": 2,
        "n_heads": 2,
        "hidden_dropout_prob": 0.5,
        "attn_dropout_prob": 0.5,
        "train_batch_size": 256,
        "learning_rate": 1e-3,
        "epochs": args.epochs,
        "seed": args.seed,
        "metrics": ["NDCG", "Hit"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        # RecBole rounds metrics to 4 places by default, before early stopping compares them.
        "metric_decimal_place": 8,
        "stopping_step": 10,
        "use_gpu": False,
        "gpu_id": "",
        "worker": 0,
        "show_progress": False,
        "log_wandb": False,
    }


RECORDED_CONFIG_KEYS = [
    "eval_args",
    "loss_type",
    "MAX_ITEM_LIST_LENGTH",
    "hidden_size",
    "inner_size",
    "n_layers",
    "n_heads",
    "hidden_dropout_prob",
    "attn_dropout_prob",
    "hidden_act",
    "layer_norm_eps",
    "initializer_range",
    "train_batch_size",
    "eval_batch_size",
    "learner",
    "learning_rate",
    "weight_decay",
    "stopping_step",
    "valid_metric",
    "metric_decimal_place",
]


@torch.no_grad()
def test_ranks(trainer: BudgetTrainer, test_data, dataset) -> tuple[list[int], list[int]]:
    """Each test user's token and the 0-based rank of their target among RecBole's full-sort
    scores (padding at -inf, nothing else masked), by the model trainer.evaluate left loaded.
    Ties count against the target, as in recsae's `target_ranks`."""
    trainer.model.eval()
    users, ranks = [], []
    for batch in test_data:
        interaction, scores, positive_u, positive_i = trainer._full_sort_batch_eval(batch)
        target = scores[positive_u, positive_i]
        ranks += ((~(scores < target[:, None])).sum(1) - 1).tolist()
        uid = interaction[trainer.config["USER_ID_FIELD"]].cpu().numpy()
        users += [int(t) for t in dataset.id2token(trainer.config["USER_ID_FIELD"], uid)]
    return users, ranks


def ndcg_at_10(ranks: list[int]) -> float:
    return sum(1 / math.log2(r + 2) for r in ranks if r < 10) / len(ranks)


def check_inter_file(path: Path) -> int:
    """Fail early on input that would make RecBole's split differ from ours; return the row count."""
    if not path.is_file():
        raise SystemExit(f"{path} not found; export the atomic file as <data-dir>/<dataset>.inter")
    inter = pd.read_csv(path, sep="\t")
    missing = [c for c in INTER_COLUMNS if c not in inter.columns]
    if missing:
        raise SystemExit(f"{path} lacks columns {missing}; header must be {INTER_COLUMNS}")
    user, ts = INTER_COLUMNS[0], INTER_COLUMNS[2]
    ordered = inter.sort_values([user, ts], kind="stable")
    steps = ordered.groupby(user, sort=False)[ts].diff()
    if (steps <= 0).any():
        bad = ordered.loc[steps <= 0, user].iloc[0]
        raise SystemExit(
            f"user {bad!r} in {path} has tied timestamps; export strictly increasing timestamps "
            "per user so RecBole's time order matches ours"
        )
    lengths = inter.groupby(user).size()
    if lengths.min() < 3:
        raise SystemExit(
            f"{(lengths < 3).sum()} users in {path} have fewer than 3 interactions; "
            "leave-one-out needs one to train on, one to validate, one to test"
        )
    return len(inter)


def write_json_atomically(payload: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=out.parent, prefix=f".{out.name}.", suffix=".tmp", delete=False
    ) as tmp:
        json.dump(payload, tmp, indent=2)
        tmp.write("\n")
    os.replace(tmp.name, out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True, help="holds <dataset>.inter")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--budget-seconds", type=float, help="wall-clock cap on training")
    parser.add_argument(
        "--converge", action="store_true", help="no budget: train until early stopping"
    )
    parser.add_argument("--epochs", type=int, default=300, help="upper bound on epochs")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    args = parser.parse_args(argv)
    if args.converge == (args.budget_seconds is not None):
        parser.error("pass exactly one of --budget-seconds S and --converge")
    if args.budget_seconds is not None and args.budget_seconds <= 0:
        parser.error(f"--budget-seconds must be positive, got {args.budget_seconds}")
    return args


def run(args: argparse.Namespace) -> BenchmarkResult:
    """Train and test; `args.out` is rewritten after every epoch (status "running"), so a run
    cut off midway still leaves its curve."""
    process_start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    inter_file = (args.data_dir / f"{args.dataset}.inter").resolve()
    n_interactions = check_inter_file(inter_file)

    with tempfile.TemporaryDirectory(prefix="recbole-sasrec-") as work_dir:
        work = Path(work_dir)
        (work / "data" / STAGED_NAME).mkdir(parents=True)
        (work / "data" / STAGED_NAME / f"{STAGED_NAME}.inter").symlink_to(inter_file)
        # RecBole writes its tensorboard log under the working directory.
        # Config also reads `--key=value` overrides from sys.argv, which are ours, not its.
        with contextlib.chdir(work), patch.object(sys, "argv", sys.argv[:1]):
            config = Config(
                model="SASRec",
                dataset=STAGED_NAME,
                config_dict=sasrec_config(args, work / "data", work / "saved"),
            )
            init_seed(config["seed"], config["reproducibility"])
            dataset = create_dataset(config)
            train_data, valid_data, test_data = data_preparation(config, dataset)
            init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
            model = SASRec(config, train_data._dataset).to(config["device"])
            result = BenchmarkResult(
                implementation=f"recbole-{recbole.__version__}",
                command=" ".join([sys.executable, *sys.argv]),
                generated_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                model="SASRec",
                dataset=args.dataset,
                data_file=str(inter_file),
                data_sha256=hashlib.sha256(inter_file.read_bytes()).hexdigest(),
                mode="converge" if args.converge else "budget",
                budget_seconds=args.budget_seconds,
                max_epochs=args.epochs,
                seed=args.seed,
                torch_threads=torch.get_num_threads(),
                versions={"recbole": recbole.__version__, "torch": torch.__version__},
                config={k: config[k] for k in RECORDED_CONFIG_KEYS},
                n_users=dataset.user_num - 1,  # RecBole reserves id 0 for padding
                n_items=dataset.item_num - 1,
                n_interactions=n_interactions,
                n_train_examples=len(train_data._dataset),
                n_valid_users=len(valid_data._dataset),
                n_test_users=len(test_data._dataset),
                data_prep_seconds=time.perf_counter() - process_start,
                load_average=[{"after": "start", "1/5/15 min": os.getloadavg()}],
            )

            def progress(records: list[EpochRecord]) -> None:
                result.epochs = records
                result.epochs_run = len(records)
                write_json_atomically(asdict(result), args.out)

            trainer = BudgetTrainer(config, model, args.budget_seconds, on_epoch=progress)
            result.stop_reason = trainer.fit_within_budget(train_data, valid_data)
            result.train_wall_seconds = time.perf_counter() - trainer.training_start
            result.load_average.append({"after": "training", "1/5/15 min": os.getloadavg()})
            test_start = time.perf_counter()
            test_result = trainer.evaluate(test_data, load_best_model=True)
            result.test_seconds = time.perf_counter() - test_start
            result.test_users, result.test_ranks = test_ranks(trainer, test_data, dataset)
            result.load_average.append({"after": "test", "1/5/15 min": os.getloadavg()})

    records = trainer.records
    best = next(r for r in records if r.epoch == trainer.best_epoch)
    result.epochs = records
    result.epochs_run = len(records)
    result.budget_exhausted = trainer.budget_exhausted
    result.best_epoch = best.epoch
    result.best_valid_ndcg_at_10 = best.valid_ndcg_at_10
    result.test_ndcg_at_10 = float(test_result["ndcg@10"])
    result.test_hit_at_10 = float(test_result["hit@10"])
    result.test_ndcg_at_10_from_ranks = ndcg_at_10(result.test_ranks)
    result.seconds_to_best_epoch = best.elapsed_seconds
    result.cpu_seconds_to_best_epoch = best.cpu_seconds
    result.mean_epoch_seconds = sum(r.seconds for r in records) / len(records)
    result.total_wall_seconds = time.perf_counter() - process_start
    result.status = "done"
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    write_json_atomically(asdict(result), args.out)
    budget = "none" if result.budget_seconds is None else f"{result.budget_seconds:g}s"
    print(
        f"RecBole {recbole.__version__} SASRec on {result.dataset}: {result.n_users} users, "
        f"{result.n_items} items, {result.n_train_examples} training examples\n"
        f"{result.epochs_run} epochs, {result.mean_epoch_seconds:.2f}s each on "
        f"{result.torch_threads} thread(s); stopped by {result.stop_reason} (budget {budget})\n"
        f"best valid NDCG@10 {result.best_valid_ndcg_at_10:.4f} at epoch {result.best_epoch} "
        f"({result.seconds_to_best_epoch:.1f}s into training)\n"
        f"test NDCG@10 {result.test_ndcg_at_10:.4f} (from per-user ranks "
        f"{result.test_ndcg_at_10_from_ranks:.4f})  HR@10 {result.test_hit_at_10:.4f}  "
        f"-> {args.out}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
