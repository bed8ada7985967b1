"""TopK SAE: decoder rows stay unit norm, the encoder starts as the decoder's transpose, TopK
and BatchTopK keep the promised number of latents, the L1 ReLU SAE keeps every positive one
and trades reconstruction for sparsity with its coefficient, training recovers a known sparse
dictionary, AuxK only acts on dead latents, whitening keeps latents alive on anisotropic
states while decoding in hidden units, saves round-trip exactly (and old ones still load),
held-out users never reach the optimizer, and a seed fixes the result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from recsae_pipeline.activations.shards import activation_schema
from recsae_pipeline.sae.model import SaeConfig, TopKSae
from recsae_pipeline.sae.training import SaeTrainConfig, evaluate_sae, train_sae
from recsae_pipeline_tests.torch_support import CPU

pytestmark = pytest.mark.usefixtures("one_thread")


def write_partition(directory: Path, activations: np.ndarray, rows_per_user: int = 10) -> Path:
    """Rows in the shard schema: consecutive runs of `rows_per_user` rows per user (1-based)."""
    n, dim = activations.shape
    position = np.arange(n, dtype=np.int32) % rows_per_user
    from_end = rows_per_user - 1 - position
    split = np.select(
        [from_end == 0, from_end == 1, from_end == 2], ["none", "test", "valid"], "train"
    )
    table = pa.table(
        {
            "user_idx": (np.arange(n) // rows_per_user + 1).astype(np.int32),
            "position": position,
            "item_idx": np.ones(n, np.int32),
            "target_idx": np.ones(n, np.int32),
            "split": split,
            "activation": pa.FixedSizeListArray.from_arrays(
                pa.array(activations.astype(np.float32).reshape(-1)), dim
            ),
        },
        schema=activation_schema(dim),
    )
    directory.mkdir(parents=True)
    pq.write_table(table, directory / "part-00000.parquet", row_group_size=256)
    return directory


def sparse_mixtures(n: int, d: int, atoms: int, active: int, seed: int = 0):
    """x = sum of `active` of `atoms` random unit directions, weights in [0.5, 1.5]; returns
    (x [n, d], the directions [atoms, d])."""
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(atoms, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    chosen = np.stack([rng.choice(atoms, active, replace=False) for _ in range(n)])
    weights = rng.uniform(0.5, 1.5, size=(n, active))
    return np.einsum("na,nad->nd", weights, dictionary[chosen]), dictionary


def gaussian_partition(tmp_path: Path, n: int = 2000, d: int = 8) -> Path:
    x = np.random.default_rng(1).normal(size=(n, d)) + 3.0
    return write_partition(tmp_path / "acts", x)


def anisotropic(n: int, d: int, strong: int = 3, weak: float = 0.05, seed: int = 0):
    """Mean 10 in every dim, `strong` rotated directions of std 1, the rest std `weak`."""
    rng = np.random.default_rng(seed)
    rotation = np.linalg.qr(rng.normal(size=(d, d)))[0]
    scales = np.full(d, weak)
    scales[:strong] = 1.0
    return 10.0 + (rng.normal(size=(n, d)) * scales) @ rotation


def test_encoder_starts_as_decoder_transpose_with_unit_rows():
    sae = TopKSae(SaeConfig(d_in=8, expansion=4, k=4), CPU)
    assert torch.equal(sae.encoder.weight, sae.W_dec)  # encoder map = decoder map transposed
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)
    assert torch.equal(sae.encoder.bias, torch.zeros(32))
    assert torch.equal(sae.b_dec, torch.zeros(8))


def test_a_sample_sets_b_dec_to_its_mean_and_sizes_the_first_reconstruction():
    config = SaeConfig(d_in=64, expansion=32, k=32)
    sample = torch.randn(512, 64, generator=torch.Generator().manual_seed(0)) + 5.0
    unscaled = TopKSae(config, CPU)
    with torch.no_grad():
        unscaled.b_dec.copy_(sample.mean(0))
    sae = TopKSae(config, CPU, sample=sample)
    assert torch.allclose(sae.b_dec, sample.mean(0))
    scale = sae.encoder.weight / sae.W_dec
    assert torch.allclose(scale, scale[0, 0].expand_as(scale)) and 0 < scale[0, 0] < 1
    assert unscaled(sample).fvu > 2  # unit encoder rows overshoot on isotropic inputs
    assert sae(sample).fvu < 1  # least-squares scale: never worse than predicting the mean


def test_topk_keeps_exactly_the_k_largest_per_row():
    sae = TopKSae(SaeConfig(d_in=16, expansion=8, k=5), CPU)
    x = torch.randn(64, 16)
    out = sae(x)
    assert out.latent_values.shape == out.latent_indices.shape == (64, 5)
    assert out.l0.item() == 5
    dense = sae.dense_latents(x)
    assert ((dense != 0).sum(1) == 5).all()
    dropped = sae.pre_activations(x).masked_fill(dense != 0, -torch.inf).amax(1)
    assert (out.latent_values.min(1).values >= dropped - 1e-6).all()
    assert torch.allclose(out.reconstruction, dense @ sae.W_dec + sae.b_dec, atol=1e-5)


def test_batch_topk_keeps_k_times_batch_in_total_and_a_threshold_at_eval():
    sae = TopKSae(SaeConfig(d_in=16, expansion=8, k=5, batch_topk=True), CPU).train()
    x = torch.randn(64, 16) * torch.linspace(0.1, 3.0, 64).unsqueeze(1)
    out = sae(x)
    per_row = (out.latent_values != 0).sum(1)
    assert per_row.sum().item() == 5 * 64
    assert per_row.min() < 5 < per_row.max()  # rows with larger norm take more latents
    threshold = sae.threshold.item()
    assert threshold > 0
    sae.eval()
    dense = sae.dense_latents(x)
    assert sae.threshold.item() == threshold  # eval does not move it
    assert torch.equal(dense != 0, sae.pre_activations(x) > threshold)


def test_l1_sae_keeps_every_positive_latent_and_adds_a_scale_free_penalty():
    config = SaeConfig(d_in=16, expansion=8, l1_coefficient=0.05, whitening_shrinkage=None)
    sae = TopKSae(config, CPU)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    out = sae(x)
    pre = sae.pre_activations(x)
    dense = sae.dense_latents(x)
    assert torch.equal(dense != 0, pre > 0)  # no top-k: every positive pre-activation
    assert torch.allclose(dense, pre.clamp_min(0))
    per_row = (pre > 0).sum(1)
    values, indices = sae.encode(x)  # packed, zero-padded to the widest row
    assert values.shape == indices.shape == (64, per_row.max()) and per_row.min() < per_row.max()
    assert torch.equal((values != 0).sum(1), per_row)
    assert torch.allclose(sae.decode(values, indices), out.reconstruction, atol=1e-5)
    assert torch.equal(out.latent_values, dense)  # forward: dense, every latent
    assert out.l0.item() == pytest.approx(per_row.float().mean().item())
    rms = (x - x.mean(0)).pow(2).mean().sqrt()
    assert out.l1_loss.item() == pytest.approx((dense.sum(1).mean() / rms).item(), rel=1e-5)
    assert torch.allclose(out.loss, out.fvu + 0.05 * out.l1_loss)  # no dead mask: AuxK 0
    assert torch.allclose(out.reconstruction, dense @ sae.W_dec, atol=1e-5)
    # b_enc = b_dec = 0: 10x the input is 10x every latent, and the penalty stays put
    assert sae(10 * x).l1_loss.item() == pytest.approx(out.l1_loss.item(), rel=1e-4)
    out.loss.backward()
    assert sae.encoder.weight.grad.abs().sum() > 0
    topk = TopKSae(SaeConfig(d_in=16, expansion=8, k=4), CPU)(x)
    assert topk.l1_loss.item() == 0.0 and torch.equal(topk.loss, topk.fvu + topk.auxk_loss / 32)


def test_l1_config_is_validated_and_ignores_k():
    with pytest.raises(ValueError, match="batch_topk=True and l1_coefficient=0.1: pick one"):
        SaeConfig(d_in=8, batch_topk=True, l1_coefficient=0.1)
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="l1_coefficient=.*finite value >= 0"):
            SaeConfig(d_in=8, l1_coefficient=bad)
    with pytest.raises(ValueError, match="k=1000"):
        SaeConfig(d_in=8, expansion=4, k=1000)
    assert SaeConfig(d_in=8, expansion=4, k=1000, l1_coefficient=0.1).kind == "relu_l1"
    assert SaeConfig(d_in=8).kind == "topk"
    assert SaeConfig(d_in=8, batch_topk=True).kind == "batch_topk"


def test_l1_sae_trains_and_its_coefficient_trades_fvu_for_sparsity(tmp_path: Path):
    # 2 of 32 directions in 16-d, 200 steps: coefficient 0.01 reaches FVU ~0.02 at L0 ~27,
    # 0.1 FVU ~0.2 at L0 ~11; untrained (b_dec = 0, ~half of 64 latents on) FVU ~3
    x, _ = sparse_mixtures(6000, d=16, atoms=32, active=2)
    partition = write_partition(tmp_path / "acts", x)
    config = SaeTrainConfig(batch_size=256, rows_seen=256 * 200, log_every=50)

    def train(l1: float):
        sae_config = SaeConfig(d_in=16, expansion=4, l1_coefficient=l1, dead_after_rows=2000)
        untrained = evaluate_sae(TopKSae(sae_config, CPU), partition, CPU)
        return untrained, train_sae(partition, config, sae_config, CPU)

    (untrained, weak), (_, strong) = train(0.01), train(0.1)
    assert untrained["fvu"] > 1
    assert weak.heldout["fvu"] < 0.1 < strong.heldout["fvu"] < 0.5
    assert strong.heldout["l0"] < 0.6 * weak.heldout["l0"]
    assert weak.curve[-1].l1_loss > strong.curve[-1].l1_loss > 0
    assert weak.curve[-1].l0 < weak.curve[0].l0  # the penalty switches latents off
    assert max(weak.heldout["dead_fraction"], strong.heldout["dead_fraction"]) <= 0.05


def test_reconstruct_takes_any_leading_shape():
    sae = TopKSae(SaeConfig(d_in=8, expansion=4, k=3), CPU)
    hidden = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    # Batched and single-row matmuls may differ in the last float bits.
    assert torch.allclose(
        sae.reconstruct(hidden)[1, 3], sae(hidden[1, 3:4]).reconstruction[0], atol=1e-6
    )
    assert torch.equal(sae.decoder_direction(7), sae.W_dec[7].detach())
    with pytest.raises(IndexError, match="feature=32"):
        sae.decoder_direction(32)


def test_auxk_is_zero_without_dead_latents_and_trains_only_dead_ones():
    sae = TopKSae(SaeConfig(d_in=16, expansion=4, k=4), CPU)
    x = torch.randn(32, 16)
    alive = sae(x, dead_mask=torch.zeros(64, dtype=torch.bool))
    assert alive.auxk_loss.item() == 0.0
    assert alive.loss.item() == alive.fvu.item()

    dead = torch.zeros(64, dtype=torch.bool)
    dead[::2] = True
    out = sae(x, dead_mask=dead)
    assert out.auxk_loss.item() > 0
    assert torch.allclose(out.loss, out.fvu + out.auxk_loss / 32)
    out.auxk_loss.backward()
    for grad in (sae.encoder.weight.grad, sae.W_dec.grad):
        assert grad[dead].abs().sum(1).gt(0).any()
        assert grad[~dead].abs().sum() == 0


def test_remove_parallel_grads_leaves_only_the_orthogonal_part():
    sae = TopKSae(SaeConfig(d_in=8, expansion=4, k=3), CPU)
    sae(torch.randn(16, 8)).loss.backward()
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_grads()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6
    assert not torch.equal(before, sae.W_dec.grad)


def test_training_keeps_decoder_rows_unit_norm_and_counts_rows(tmp_path: Path):
    partition = gaussian_partition(tmp_path)  # 200 users, 180 train users = 1800 rows
    calls = []
    config = SaeTrainConfig(batch_size=128, rows_seen=4000, log_every=10, lr=1e-2)
    result = train_sae(
        partition,
        config,
        SaeConfig(d_in=8, expansion=4, k=4, dead_after_rows=500),
        CPU,
        on_progress=lambda rows, total, metrics: calls.append((rows, total, metrics)),
    )
    norms = result.sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert result.rows_seen == 4000
    assert result.steps == math.ceil(4000 / 128)
    assert result.epochs == 3  # 1800 training rows per pass
    assert [c[0] for c in calls] == [p.rows_seen for p in result.curve]
    assert calls[-1][:2] == (4000, 4000) and set(calls[-1][2]) >= {"fvu", "dead_fraction"}
    assert result.heldout["rows"] == 200
    assert result.heldout["l0"] == pytest.approx(4)


def test_training_recovers_a_known_sparse_dictionary(tmp_path: Path):
    # 2 of 32 directions in 16-d; 400 steps reach held-out FVU ~0.06 and match ~30 atoms
    x, dictionary = sparse_mixtures(6000, d=16, atoms=32, active=2)
    partition = write_partition(tmp_path / "acts", x)
    sae_config = SaeConfig(d_in=16, expansion=4, k=3, dead_after_rows=2000)
    untrained = evaluate_sae(TopKSae(sae_config, CPU), partition, CPU)
    config = SaeTrainConfig(batch_size=256, rows_seen=256 * 400, log_every=100)
    result = train_sae(partition, config, sae_config, CPU)
    assert untrained["fvu"] > 0.5
    assert result.heldout["fvu"] < 0.1
    assert result.curve[-1].fvu < result.curve[0].fvu
    directions = torch.stack([result.sae.decoder_direction(f) for f in range(64)])
    directions /= directions.norm(dim=1, keepdim=True)
    best_cosine = (torch.tensor(dictionary).float() @ directions.T).amax(1)
    assert (best_cosine > 0.9).sum() >= 24


def test_whitening_maps_the_sample_to_unit_covariance_and_decodes_in_hidden_units():
    sample = torch.tensor(anisotropic(4000, 8), dtype=torch.float32)
    sae = TopKSae(SaeConfig(d_in=8, expansion=4, k=3, whitening_shrinkage=0.0), CPU, sample)
    whitened = (sample - sample.mean(0)) @ sae.whitening
    assert torch.allclose(torch.cov(whitened.T, correction=0), torch.eye(8), atol=1e-3)
    assert torch.allclose(sae.whitening @ sae.unwhitening, torch.eye(8), atol=1e-4)
    x = sample[:5]
    directions = torch.stack([sae.decoder_direction(f) for f in range(32)])
    by_direction = sae.dense_latents(x) @ directions + sae.b_dec
    assert torch.allclose(sae.reconstruct(x), by_direction, atol=1e-4)
    shrunk = TopKSae(SaeConfig(d_in=8, expansion=4, k=3, whitening_shrinkage=0.1), CPU, sample)
    assert ((sample - sample.mean(0)) @ shrunk.whitening).pow(2).sum(1).mean() == pytest.approx(8)
    plain = TopKSae(SaeConfig(d_in=8, expansion=4, k=3), CPU, sample)  # the default: none
    assert torch.equal(plain.whitening, torch.eye(8))
    with pytest.raises(ValueError, match="whitening_shrinkage=-1"):
        SaeConfig(d_in=8, whitening_shrinkage=-1)


def test_whitening_keeps_latents_alive_on_anisotropic_states(tmp_path: Path):
    # 3 strong of 16 directions and a large mean: in the hidden basis, latents whose random
    # unit rows lie in the weak directions never reach the top k (~45% stay dead)
    partition = write_partition(tmp_path / "acts", anisotropic(6000, 16))
    config = SaeTrainConfig(batch_size=256, rows_seen=256 * 100, log_every=50)

    def heldout(shrinkage: float | None) -> dict[str, float]:
        sae_config = SaeConfig(d_in=16, expansion=4, k=4, whitening_shrinkage=shrinkage)
        return train_sae(partition, config, sae_config, CPU).heldout

    plain, whitened = heldout(None), heldout(0.1)
    assert plain["fvu"] < 0.1 and whitened["fvu"] < 0.1
    assert plain["dead_fraction"] > 0.25
    assert whitened["dead_fraction"] <= 0.05


def test_heldout_rows_never_reach_the_optimizer(tmp_path: Path):
    x = np.random.default_rng(2).normal(size=(1000, 8))
    users = np.arange(1000) // 10 + 1
    x[users % 10 == 0] = np.nan  # poison: one held-out row in training makes the SAE NaN
    partition = write_partition(tmp_path / "acts", x)
    config = SaeTrainConfig(batch_size=64, rows_seen=2000, log_every=5)
    result = train_sae(partition, config, SaeConfig(d_in=8, expansion=2, k=2), CPU)
    assert all(torch.isfinite(t).all() for t in result.sae.state_dict().values())
    assert result.heldout["rows"] == 100
    assert math.isnan(result.heldout["fvu"])  # evaluation read exactly the poisoned rows


def test_a_fixed_seed_gives_identical_results(tmp_path: Path):
    partition = gaussian_partition(tmp_path)
    sae_config = SaeConfig(d_in=8, expansion=4, k=4, dead_after_rows=300)

    def run(seed: int):
        config = SaeTrainConfig(batch_size=100, rows_seen=2500, log_every=5, seed=seed)
        return train_sae(partition, config, sae_config, CPU)

    first, again, other = run(0), run(0), run(1)
    assert first.curve == again.curve and first.heldout == again.heldout
    for name, tensor in first.sae.state_dict().items():
        assert torch.equal(tensor, again.sae.state_dict()[name])
    assert not torch.equal(first.sae.W_dec, other.sae.W_dec)


@pytest.mark.parametrize("kind", ["topk", "batch_topk", "relu_l1"])
def test_save_load_round_trip_is_exact(tmp_path: Path, kind: str):
    rule = {"topk": {}, "batch_topk": {"batch_topk": True}, "relu_l1": {"l1_coefficient": 0.2}}
    config = SaeConfig(d_in=8, expansion=4, k=3, aux_k=5, whitening_shrinkage=0.1, **rule[kind])
    sample = torch.tensor(anisotropic(500, 8), dtype=torch.float32)
    sae = TopKSae(config, CPU, sample=sample, seed=3).train()
    assert not torch.equal(sae.whitening, torch.eye(8))
    x = sample[:20]
    sae(x)  # BatchTopK: sets the eval threshold, which must be saved too
    with torch.no_grad():
        sae.b_dec.add_(0.5)
    sae.eval()
    path = sae.save(tmp_path / "sae")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "sae.safetensors"]
    saved = json.loads((path / "config.json").read_text())
    assert saved["aux_k"] == 5 and saved["l1_coefficient"] == config.l1_coefficient

    loaded = TopKSae.load(path, CPU).eval()
    assert loaded.config == config and loaded.config.kind == kind
    dead = torch.arange(32) % 3 == 0
    for a, b in zip(sae(x, dead), loaded(x, dead), strict=True):
        assert torch.equal(a, b)
    sae.save(path)  # overwrites in place
    with pytest.raises(FileNotFoundError, match="TopKSae.save"):
        TopKSae.load(tmp_path / "missing", CPU)


def test_an_sae_saved_before_whitening_loads_in_the_hidden_basis(tmp_path: Path):
    config = SaeConfig(d_in=8, expansion=4, k=3, whitening_shrinkage=None)
    sae = TopKSae(config, CPU, seed=3).eval()
    path = sae.save(tmp_path / "sae")
    state = load_file(path / "sae.safetensors")
    save_file({k: v for k, v in state.items() if "whitening" not in k}, path / "sae.safetensors")
    raw = json.loads((path / "config.json").read_text())
    del raw["whitening_shrinkage"], raw["l1_coefficient"]
    (path / "config.json").write_text(json.dumps(raw))

    loaded = TopKSae.load(path, CPU).eval()
    assert loaded.config == config and loaded.config.kind == "topk"
    assert torch.equal(loaded.unwhitening, torch.eye(8))
    x = torch.randn(20, 8)
    assert torch.equal(loaded.reconstruct(x), sae.reconstruct(x))


def test_the_reconstruction_check_never_shows_a_failing_value_as_within_its_bound() -> None:
    from recsae_pipeline.sae.evaluation import SaeBounds, reconstruction_check

    outcome = reconstruction_check(
        {"fvu": 0.05, "dead_fraction": 41 / 2048, "l0": 8.0}, SaeBounds()
    )
    assert not outcome.passed
    assert "dead 2.002% (> 2%)" in outcome.description and "revive latents" in outcome.description
    ok = reconstruction_check({"fvu": 0.05, "dead_fraction": 0.01, "l0": 8.0}, SaeBounds())
    assert ok.passed and "(<= 0.1), dead 1.000% (<= 2%)" in ok.description


def test_the_splice_check_reads_the_bound_against_the_ci_over_users() -> None:
    """A point estimate a hair under the bound within the users' noise passes; a CI wholly
    below it fails; the CI covers the point estimate."""
    from recsae_pipeline.sae.evaluation import SaeBounds, SpliceQuality, recovered_ci, splice_check

    rng = np.random.default_rng(0)
    original = rng.binomial(1, 0.3, 2000).astype(float)
    ablated = original * rng.binomial(1, 0.4, 2000)
    noisy = np.where(rng.random(2000) < 0.88, original, ablated)  # about 88% recovered
    quality = SpliceQuality({"original": original, "spliced": noisy, "zero_ablated": ablated})
    lo, hi = recovered_ci(quality)
    assert lo < quality.fraction_recovered < hi
    assert splice_check(quality, SaeBounds(min_recovered=0.9)).passed == (hi >= 0.9)
    assert not splice_check(quality, SaeBounds(min_recovered=hi + 0.01)).passed
    assert splice_check(quality, SaeBounds(min_recovered=lo)).passed
