"""SAE export: SAELens's own `SAE.load_from_disk` opens our TopK, BatchTopK (as jumprelu) and
L1 ReLU (as standard) SAEs, whitening folded in, and computes the same latents and
reconstructions as ours; a never-trained BatchTopK SAE (batch-dependent in eval mode) is
refused; the sparsify layout holds the same folded weights and sparsify's TopK forward on it
reconstructs our rows; `recsae export-sae` exports a saved SAE partition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sae_lens import SAE
from safetensors.torch import load_file

from recsae_pipeline.cli import main
from recsae_pipeline.sae.export import (
    RECSAE_CONFIG_KEY,
    export_saelens,
    export_sparsify,
    saelens_hook_name,
)
from recsae_pipeline.sae.model import SaeConfig, TopKSae
from recsae_pipeline.storage.registry import ArtifactPaths

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, EXPANSION, K = 8, 4, 4
KINDS = {
    "topk": {},
    "batch_topk": {"batch_topk": True},
    "relu_l1": {"l1_coefficient": 0.05},
}


def anisotropic(n: int, seed: int) -> torch.Tensor:
    """Correlated, unequally scaled, off-centre rows, so the fitted whitening M is far from
    the identity (and a fold that forgot it would fail)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(D_IN, D_IN, generator=g) * torch.logspace(-1, 1, D_IN)
    return torch.randn(n, D_IN, generator=g) @ mixing + 3.0


def trained(kind: str, steps: int = 8) -> TopKSae:
    """A tiny whitened SAE after a few Adam steps (b_enc nonzero, encoder no longer the
    decoder's transpose, BatchTopK's threshold set), in eval mode."""
    config = SaeConfig(d_in=D_IN, expansion=EXPANSION, k=K, whitening_shrinkage=0.1, **KINDS[kind])
    sae = TopKSae(config, sample=anisotropic(256, seed=0)).train()
    assert not torch.allclose(sae.whitening, torch.eye(D_IN), atol=0.1)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(steps):
        sae(anisotropic(64, seed=1 + step)).loss.backward()
        sae.remove_parallel_grads()
        optimizer.step()
        optimizer.zero_grad()
        sae.normalize_decoder()
    assert sae.encoder.bias.abs().max() > 0
    return sae.eval()


@pytest.mark.parametrize(
    ("kind", "architecture"),
    [("topk", "topk"), ("batch_topk", "jumprelu"), ("relu_l1", "standard")],
)
def test_saelens_loads_the_export_and_reconstructs_our_rows(
    tmp_path: Path, kind: str, architecture: str
) -> None:
    sae = trained(kind)
    hook = saelens_hook_name("sasrec", 1)
    out = export_saelens(sae, tmp_path / "saelens", hook, model="sasrec", layer=1)

    loaded = SAE.load_from_disk(out)
    assert loaded.cfg.architecture() == architecture
    assert (loaded.cfg.d_in, loaded.cfg.d_sae) == (D_IN, D_IN * EXPANSION)
    assert loaded.cfg.metadata.hook_name == "recsae.sasrec.layer1"
    assert (loaded.cfg.metadata.model, loaded.cfg.metadata.layer) == ("sasrec", 1)
    assert loaded.cfg.metadata[RECSAE_CONFIG_KEY]["batch_topk"] == (kind == "batch_topk")

    x = anisotropic(200, seed=99)
    with torch.no_grad():
        ours_latents, ours_x_hat = sae.dense_latents(x), sae.reconstruct(x)
        theirs_latents = loaded.encode(x)
        torch.testing.assert_close(theirs_latents, ours_latents)
        torch.testing.assert_close(loaded.decode(theirs_latents), ours_x_hat)
        torch.testing.assert_close(loaded(x), ours_x_hat)
    active = (ours_latents != 0).sum(-1).float()
    if kind == "topk":
        assert torch.all(active <= K) and active.mean() > K / 2
    else:  # a real sparse code, not all-zero or all-on rows
        assert 0 < active.mean() < D_IN * EXPANSION


def test_saelens_decoder_rows_are_our_hidden_space_directions(tmp_path: Path) -> None:
    sae = trained("topk")
    weights = load_file(export_saelens(sae, tmp_path / "e", "h") / "sae_weights.safetensors")
    for feature in (0, 7, 31):
        torch.testing.assert_close(weights["W_dec"][feature], sae.decoder_direction(feature))
    # whitened: unit rows in M's basis are not unit rows in the hidden basis
    assert not torch.allclose(weights["W_dec"].norm(dim=-1), torch.ones(D_IN * EXPANSION))


def test_untrained_batch_topk_is_refused_not_exported_wrong(tmp_path: Path) -> None:
    config = SaeConfig(
        d_in=D_IN, expansion=EXPANSION, k=K, batch_topk=True, whitening_shrinkage=0.1
    )
    sae = TopKSae(config, sample=anisotropic(256, seed=0)).eval()  # threshold still -1
    with pytest.raises(ValueError, match="never saw a training batch"):
        export_saelens(sae, tmp_path / "e", "h")
    assert not (tmp_path / "e").exists()


def test_reexport_replaces_the_folder_and_metadata_must_be_json(tmp_path: Path) -> None:
    out = tmp_path / "e"
    export_saelens(trained("batch_topk"), out, "h")
    (out / "stale.txt").write_text("left over")
    export_saelens(trained("topk"), out, "h")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert json.loads((out / "cfg.json").read_text())["architecture"] == "topk"
    with pytest.raises(TypeError, match="JSON-serialisable"):
        export_saelens(trained("topk"), out, "h", source=tmp_path)
    with pytest.raises(ValueError, match="set by export_saelens"):
        export_saelens(trained("topk"), out, "h", sae_lens_version="5.0.0")


@pytest.mark.parametrize("kind", ["topk", "relu_l1"])
def test_sparsify_layout_reconstructs_our_rows(tmp_path: Path, kind: str) -> None:
    sae = trained(kind)
    folder = export_sparsify(sae, tmp_path / "sparsify", "layers.1", model="sasrec", layer=1)
    assert folder == tmp_path / "sparsify" / "layers.1"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["num_latents"], cfg["activation"]) == (D_IN, 32, "topk")
    assert cfg["recsae"]["model"] == "sasrec"
    w = load_file(folder / "sae.safetensors")
    assert {n: tuple(t.shape) for n, t in w.items()} == {
        "encoder.weight": (32, D_IN),
        "encoder.bias": (32,),
        "W_dec": (32, D_IN),
        "b_dec": (D_IN,),
    }
    # sparsify's SparseCoder.encode / decode (fused_encoder's forward, eager_decode)
    x = anisotropic(200, seed=7)
    pre = F.relu(F.linear(x - w["b_dec"], w["encoder.weight"], w["encoder.bias"]))
    acts, indices = pre.topk(cfg["k"], dim=-1, sorted=False)
    x_hat = F.embedding_bag(indices, w["W_dec"], per_sample_weights=acts, mode="sum")
    with torch.no_grad():
        torch.testing.assert_close(x_hat + w["b_dec"], sae.reconstruct(x))


def test_sparsify_refuses_batch_topk(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_topk SAE to sparsify"):
        export_sparsify(trained("batch_topk"), tmp_path, "layers.1")


def test_cli_exports_a_saved_sae_partition(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    sae = trained("topk")
    sae.save(ArtifactPaths(data).partition("sasrec", 1).sae)
    out = tmp_path / "export"
    argv = ["--data-dir", str(data), "export-sae", "--sae", "sasrec.layer1", "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    loaded = SAE.load_from_disk(out)
    assert loaded.cfg.metadata.hook_name == "recsae.sasrec.layer1"
    x = anisotropic(50, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae.reconstruct(x))

    assert main([*argv[:4], "sasrec.layer2", "--out", str(out)]) == 2
    assert "write it with TopKSae.save" in capsys.readouterr().err
