"""Write a trained TopKSae in the on-disk layouts of SAELens and EleutherAI's sparsify.

Other SAE tooling (SAELens's analysis and Neuronpedia-style dashboards, sparsify's hooks)
can then open our SAEs without knowing this project. Neither library is imported here: the
files are plain JSON + safetensors, and `recsae_pipeline_tests/test_sae_export.py` loads the
SAELens export with SAELens itself (`SAE.load_from_disk`) to prove the round trip.

Our SAE encodes in a basis whitened by M (identity without whitening):
    pre = ((x - b_dec) @ M) @ W_encᵀ + b_enc,    x̂ = z @ W_dec @ M⁻¹ + b_dec,
with W_enc = `encoder.weight` [n, d_in], W_dec [n, d_in] and M⁻¹ = the `unwhitening` buffer.
Both libraries encode (x - b_dec) with one matrix and decode z with another, so M is folded
into the weights (as SAELens's own `fold_activation_whitening` does):
    SAELens:  W_enc = M @ W_encᵀ [d_in, n],  W_dec = W_dec @ M⁻¹ [n, d_in];
    sparsify: encoder.weight = W_enc @ Mᵀ [n, d_in],  W_dec = W_dec @ M⁻¹ [n, d_in];
b_enc and b_dec carry over unchanged (b_dec is already in hidden units). The products are
taken in float64 and stored as float32. With whitening the exported decoder rows are the
hidden-space directions `decoder_direction(f)`, so they are NOT unit norm (ours are unit norm
in the whitened basis). Nothing in either format needs them to be: SAELens's optional
`fold_W_dec_norm` (rows to unit norm, norms into the encoder) is exact for the "standard"
and "jumprelu" exports, and SAELens itself refuses it for "topk" ones (it would change the
choice of latents), as for any TopK SAE trained without `rescale_acts_by_decoder_norm`.

Which SAELens architecture (by `SaeConfig.kind`):
- "topk" -> "topk" with the same k: top k pre-activations per row, then ReLU, as ours.
- "relu_l1" (the L1-penalised ReLU SAE) keeps every positive pre-activation -> "standard"
  (ReLU), exactly.
- BatchTopK in eval mode keeps the activations above the learned global `threshold`
  (relu(pre) > t, t >= 0, i.e. pre > t), which is SAELens's "jumprelu" with every latent's
  threshold = t: relu(pre) * (pre > t). This is also how SAELens itself saves its BatchTopK
  SAEs for inference. A BatchTopK SAE that never saw a training batch (threshold -1) keeps
  the top k * B activations of each whole batch in eval mode too, which depends on the other
  rows of the batch; no SAELens inference architecture does that, so export refuses it.
  BatchTopK's training-mode selection (per batch) is not exported either: exports are for
  inference.

sparsify only has per-row TopK (`activation="topk"`) and GroupMax: a BatchTopK SAE is refused
there; the ReLU SAE is written as TopK with k = n_latents, which keeps every positive
pre-activation (exact, but sparsify then decodes densely). sparsify takes the top k of
ReLU(pre) rather than the ReLU of the top k of pre; the two differ only in which zero-valued
latents fill a row with fewer than k positive pre-activations, so reconstructions are
identical. Checked by hand with eai-sparsify 1.3.3 (`SparseCoder.load_from_disk`, which
prints that it drops our "recsae" key); the tests recompute its forward pass instead, as
sparsify is not a dependency.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from recsae_pipeline.sae.model import TopKSae
from recsae_pipeline.storage.atomic import atomic_path
from recsae_pipeline.storage.registry import partition_key

SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.54.12"
"""The SAELens release whose format is written (cfg.json's `metadata.sae_lens_version`; a
missing or pre-6.0 version makes SAELens rewrite the config as a legacy one)."""

SPARSIFY_CONFIG_FILE = "cfg.json"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"

RECSAE_CONFIG_KEY = "recsae_config"
"""The metadata key holding the source SaeConfig (asdict) in both exports."""


def saelens_hook_name(model: str, layer: int) -> str:
    """The hook name an export of the SAE on (`model`, `layer`) carries:
    `recsae.<model>.layer<layer>` (not a TransformerLens hook: our recommenders are not
    HookedTransformers, so SAELens can load and run the SAE but not splice it by name)."""
    return f"recsae.{partition_key(model, layer)}"


def _folded(sae: TopKSae) -> dict[str, Tensor]:
    """Our weights with M folded in, in SAELens's layout (W_enc [d_in, n], W_dec [n, d_in])."""
    whitening = sae.whitening.detach().double().cpu()
    unwhitening = sae.unwhitening.detach().double().cpu()
    encoder = sae.encoder.weight.detach().double().cpu()
    decoder = sae.W_dec.detach().double().cpu()
    tensors = {
        "W_enc": whitening @ encoder.T,
        "b_enc": sae.encoder.bias.detach().double().cpu(),
        "W_dec": decoder @ unwhitening,
        "b_dec": sae.b_dec.detach().double().cpu(),
    }
    return {name: t.float().contiguous() for name, t in tensors.items()}


def _batch_threshold(sae: TopKSae, target: str) -> float:
    threshold = float(sae.threshold)
    if threshold < 0:
        raise ValueError(
            f"cannot export this BatchTopK SAE to {target}: its threshold is {threshold} (it "
            "never saw a training batch), so in eval mode it keeps the top k * B activations "
            "of each whole batch, which no inference architecture there reproduces; train it "
            "(one batch sets the threshold) and export again"
        )
    return threshold


def _json_ready(metadata: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(metadata))
    except TypeError as error:
        raise TypeError(
            f"metadata for {where} must be JSON-serialisable (str, numbers, lists, dicts): "
            f"{error}; pass e.g. str(path) or dataclasses.asdict(config)"
        ) from None


def export_saelens(sae: TopKSae, out_dir: Path, hook_name: str, **metadata: Any) -> Path:
    """Write directory `out_dir` that `sae_lens.SAE.load_from_disk(out_dir)` loads as an SAE
    computing the same latents and reconstructions as `sae` in eval mode: cfg.json +
    sae_weights.safetensors, written atomically (a reader sees the old export or the new one).

    TopK -> architecture "topk"; BatchTopK -> "jumprelu" with its global threshold (ValueError
    if it was never trained); the L1 ReLU SAE -> "standard" (see the module docstring).
    `hook_name` goes to `metadata.hook_name` (see `saelens_hook_name`); `metadata`
    (JSON-serialisable, e.g. model="sasrec", layer=1) is stored under cfg.json's `metadata`,
    next to the source SaeConfig under "recsae_config". Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    config = sae.config
    tensors = _folded(sae)
    cfg: dict[str, Any] = {
        "d_in": config.d_in,
        "d_sae": config.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if config.kind == "batch_topk":
        threshold = _batch_threshold(sae, "SAELens")
        tensors["threshold"] = torch.full((config.n_latents,), threshold, dtype=torch.float32)
        cfg["architecture"] = "jumprelu"
    elif config.kind == "relu_l1":
        cfg["architecture"] = "standard"
    elif config.kind == "topk":
        cfg |= {"k": config.k, "rescale_acts_by_decoder_norm": False, "architecture": "topk"}
    else:
        raise ValueError(f"SaeConfig.kind={config.kind!r} has no SAELens mapping here")
    if reserved := sorted({RECSAE_CONFIG_KEY, "sae_lens_version"} & set(metadata)):
        raise ValueError(f"metadata keys {reserved} are set by export_saelens; leave them out")
    cfg["metadata"] = _json_ready(
        {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,  # trained here, not by SAELens
            "hook_name": hook_name,
            **metadata,
            RECSAE_CONFIG_KEY: asdict(config),
        },
        out_dir / SAELENS_CONFIG_FILE,
    )
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(tensors, tmp / SAELENS_WEIGHTS_FILE)
        (tmp / SAELENS_CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return out_dir


def export_sparsify(sae: TopKSae, out_dir: Path, hookpoint: str, **metadata: Any) -> Path:
    """Write `out_dir`/`hookpoint`/ in sparsify's layout (a folder per hookpoint; load with
    `sparsify.SparseCoder.load_from_disk(out_dir / hookpoint)`): cfg.json (SparseCoderConfig
    fields + d_in) and sae.safetensors with encoder.weight [n, d_in], encoder.bias [n], W_dec
    [n, d_in] and b_dec [d_in], M folded in. sparsify has no whitening, so with whitening the
    decoder rows are not unit norm: cfg.json says normalize_decoder=false (sparsify only uses
    it to initialise and train). TopK, and the ReLU SAE as TopK with k = n_latents;
    ValueError for BatchTopK. `metadata` and the source SaeConfig go into cfg.json under
    "recsae" (sparsify drops unknown keys). Written atomically; returns the hookpoint folder.
    """
    config = sae.config
    if config.kind not in {"topk", "relu_l1"}:
        raise ValueError(
            f"cannot export a {config.kind} SAE to sparsify: sparsify keeps the top k per "
            "row and has no threshold activation; use export_saelens (jumprelu) instead"
        )
    if not hookpoint or "/" in hookpoint or hookpoint in {".", ".."}:
        raise ValueError(f"hookpoint={hookpoint!r}; pass one folder name, e.g. 'layers.1'")
    folded = _folded(sae)
    tensors = {
        "encoder.weight": folded["W_enc"].T.contiguous(),
        "encoder.bias": folded["b_enc"],
        "W_dec": folded["W_dec"],
        "b_dec": folded["b_dec"],
    }
    path = Path(out_dir) / hookpoint
    cfg = {
        "activation": "topk",
        "expansion_factor": config.expansion,
        "normalize_decoder": False,
        "num_latents": config.n_latents,
        "k": config.n_latents if config.kind == "relu_l1" else config.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": config.d_in,
        "recsae": _json_ready(
            {**metadata, RECSAE_CONFIG_KEY: asdict(config)}, path / SPARSIFY_CONFIG_FILE
        ),
    }
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file(tensors, tmp / SPARSIFY_WEIGHTS_FILE)
        (tmp / SPARSIFY_CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return path
