"""A TopK sparse autoencoder over a recommender's hidden states (Gao et al. 2024).

x ≈ x̂ = TopK(ReLU(W_enc M(x - b_dec) + b_enc)) @ W_dec M⁻¹ + b_dec, with one unit-norm
decoder row per latent in the basis whitened by M (fitted to the training sample; identity
without one), so `decoder_direction(f)` = W_dec[f] M⁻¹ is what a unit of latent f adds to the
hidden state. Two other sparsity rules share everything else: BatchTopK (k·B activations
over the batch, Bussmann et al. 2024) and a ReLU SAE whose sparsity comes from an L1 penalty
instead of a top-k (Anthropic's "Towards Monosemanticity" and its April 2024 update).
Saved as `sae.safetensors` + `config.json` in one directory: any tool can open it, nothing
is pickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from recsae_pipeline.storage.atomic import atomic_path
from recsae_pipeline.storage.registry import SAE_CONFIG_FILE, SAE_WEIGHTS_FILE

THRESHOLD_MOMENTUM = 0.99


@dataclass(frozen=True)
class SaeConfig:
    """Every knob of the sparse coder.

    The defaults (k 32, expansion 4, no whitening) are chosen by `benchmarks/sae_sweep.py`
    (k in {4, 8, 16, 32} x expansion in {4, 8, 16, 32} x whitening on/off, BatchTopK and L1
    ReLU rows, on a SASRec and a student partition of the default run): among the TopK
    settings that keep spliced NDCG@10 at >= 95% of the original with at most 2% dead latents
    on both partitions, this one has the highest median 1-sparse probe AUC over the catalog
    attributes and planted concepts (`report.readme.choose_default`; a test keeps these
    defaults equal to its pick). Sparser codes (lower k) and wider dictionaries both lowered
    that AUC on both partitions, and the partial whitening lowered it at every size; RecSAE's
    k 32 x 32 with whitening was the previous default. The figures are in the README."""

    d_in: int
    expansion: int = 4
    k: int = 32
    """Active latents per row (BatchTopK: on average); ignored by the L1 SAE."""
    batch_topk: bool = False
    """Keep the top k * B activations over the whole batch (Bussmann et al. 2024) instead of
    k per row; in eval mode rows keep activations above a threshold learned in training."""
    aux_k: int | None = None
    """Dead latents that reconstruct the residual in AuxK; None = d_in // 2."""
    aux_coefficient: float = 1 / 32
    dead_after_rows: int = 100_000
    """Training rows without firing after which a latent counts as dead (feeds AuxK)."""
    whitening_shrinkage: float | None = None
    """Encode, and keep decoder rows unit norm, in the basis M = (Σ + λ·mean eigenvalue·I)^-½
    of the init sample's covariance Σ, λ = this (0: full whitening; None: the hidden basis,
    the default). On anisotropic states unit rows in weak directions may never reach the top
    k (a 32x student SAE had 24% dead latents); at the default 4x none were dead in the sweep,
    and λ = 0.1 lowered the probe AUCs."""
    l1_coefficient: float | None = None
    """None: TopK (or BatchTopK). A number: a ReLU SAE that keeps every positive
    pre-activation (no top-k; `k` is ignored) and adds l1_coefficient * `l1_loss` to the
    loss, the latents' L1 norm per row in units of the batch's RMS (Anthropic 2024: with
    unit decoder rows, Σ z_i‖W_dec[i]‖ = Σ z_i). Larger = sparser, worse reconstruction."""

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.expansion < 1:
            raise ValueError(f"d_in={self.d_in}, expansion={self.expansion}; both must be >= 1")
        if self.l1_coefficient is not None:
            if self.batch_topk:
                raise ValueError(
                    f"batch_topk=True and l1_coefficient={self.l1_coefficient}: pick one "
                    "sparsity rule, batch_topk for BatchTopK or l1_coefficient for the ReLU "
                    "SAE with an L1 penalty (None keeps TopK/BatchTopK)"
                )
            if not (math.isfinite(self.l1_coefficient) and self.l1_coefficient >= 0):
                raise ValueError(
                    f"l1_coefficient={self.l1_coefficient}; pass a finite value >= 0 "
                    "(e.g. 0.01-0.1) or None for TopK/BatchTopK"
                )
        elif not 1 <= self.k <= self.n_latents:
            raise ValueError(f"k={self.k}; pick 1..{self.n_latents} (d_in * expansion)")
        if self.aux_k is not None and not 1 <= self.aux_k <= self.n_latents:
            raise ValueError(f"aux_k={self.aux_k}; pick 1..{self.n_latents} or None")
        if self.aux_coefficient < 0 or self.dead_after_rows < 1:
            raise ValueError(
                f"aux_coefficient={self.aux_coefficient}, dead_after_rows="
                f"{self.dead_after_rows}; need aux_coefficient >= 0 and dead_after_rows >= 1"
            )
        if self.whitening_shrinkage is not None and not self.whitening_shrinkage >= 0:
            raise ValueError(
                f"whitening_shrinkage={self.whitening_shrinkage}; pass λ >= 0 (0.1 default) "
                "or None to encode in the hidden basis"
            )

    @property
    def n_latents(self) -> int:
        return self.d_in * self.expansion

    @property
    def kind(self) -> str:
        """The sparsity rule: "topk", "batch_topk" or "relu_l1"."""
        if self.l1_coefficient is not None:
            return "relu_l1"
        return "batch_topk" if self.batch_topk else "topk"

    @property
    def k_aux(self) -> int:
        # Gao et al. 2024, appendix B.1 (as in sparsify): half the input width
        return self.aux_k if self.aux_k is not None else max(1, self.d_in // 2)


class SparseLatents(NamedTuple):
    values: Tensor
    """Activations of the kept latents [B, k] (BatchTopK and L1: [B, widest row],
    zero-padded)."""
    indices: Tensor
    """Latent ids of those activations [B, k], int64."""


class SaeOutput(NamedTuple):
    reconstruction: Tensor
    """x̂ = decode(encode(x)), [B, d_in]."""
    latent_values: Tensor
    """Activations of the kept latents [B, k] (BatchTopK: zero-padded to the widest row; L1:
    every latent, [B, n_latents], zeros where off)."""
    latent_indices: Tensor
    """Latent ids of those activations [B, k] (L1: 0..n_latents-1 in every row)."""
    fvu: Tensor
    """Fraction of variance unexplained: sum (x - x̂)² / sum (x - mean over the batch)²."""
    auxk_loss: Tensor
    """AuxK: how badly the top dead latents reconstruct the residual x - x̂; 0 if none dead."""
    loss: Tensor
    """What training minimises: fvu + aux_coefficient * auxk_loss (+ l1_coefficient *
    l1_loss for the L1 SAE)."""
    l0: Tensor
    """Mean number of nonzero latents per row."""
    l1_loss: Tensor
    """L1 SAE: mean over rows of Σ_i z_i (unit decoder rows) / the batch's whitened RMS
    per coordinate (gradient-free), so the coefficient does not depend on the states'
    scale; 0 for TopK and BatchTopK."""


class TopKSae(nn.Module):
    """TopK (or BatchTopK, or L1-penalised ReLU: `SaeConfig.kind`) sparse autoencoder.

    `encoder` is an nn.Linear (weight [n_latents, d_in]) on whitened inputs; `W_dec`
    [n_latents, d_in] holds one unit-norm direction per latent in the whitened basis; buffers
    `whitening` (M) and `unwhitening` (M⁻¹) [d_in, d_in] map the hidden basis there and back,
    so inputs, outputs and b_dec are in hidden units."""

    def __init__(
        self,
        config: SaeConfig,
        device: torch.device | str = "cpu",
        sample: Tensor | None = None,
        seed: int = 0,
    ) -> None:
        """Random unit decoder rows (seeded, same on every device), encoder = their transpose,
        b_enc = 0, M = identity. Given a `sample` [N, d_in] of activations, b_dec = its mean,
        M whitens it (`_fit_whitening`) and the encoder is rescaled to fit it
        (`_scale_encoder_to`); else b_dec = 0."""
        super().__init__()
        self.config = config
        n, d = config.n_latents, config.d_in
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(n, d, generator=generator)
        directions /= torch.linalg.vector_norm(directions, dim=1, keepdim=True)
        self.encoder = nn.Linear(d, n, device=device)
        with torch.no_grad():
            self.encoder.weight.copy_(directions)
            self.encoder.bias.zero_()
        self.W_dec = nn.Parameter(directions.clone().to(device))
        b_dec = torch.zeros(d) if sample is None else self._sample_mean(sample, d)
        self.b_dec = nn.Parameter(b_dec.to(device))
        self.register_buffer("whitening", torch.eye(d, device=device))
        self.register_buffer("unwhitening", torch.eye(d, device=device))
        if sample is not None and config.whitening_shrinkage is not None:
            self._fit_whitening(sample, config.whitening_shrinkage)
        if config.batch_topk:
            # Bussmann et al. 2024: eval keeps activations above the mean of the smallest
            # activation kept per training batch; -1 until the first training batch.
            self.register_buffer("threshold", torch.tensor(-1.0, device=device))
        if sample is not None:
            self._scale_encoder_to(sample.to(device))

    @torch.no_grad()
    def _fit_whitening(self, sample: Tensor, shrinkage: float) -> None:
        """M = g·(Σ + λ·mean eigenvalue·I)^-½ of the sample's covariance Σ (λ >= 1e-6, so M⁻¹
        exists), with g so that E‖M(x - mean)‖² = d_in; unwhitening = M⁻¹. A constant sample
        keeps the identity."""
        centred = sample.detach().double().cpu()
        centred = centred - centred.mean(0)
        eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / len(centred))
        eigenvalues = eigenvalues.clamp_min(0)
        floor = eigenvalues.mean() * max(shrinkage, 1e-6)
        if not floor > 0:
            return
        regularised = eigenvalues + floor
        gain = (len(eigenvalues) / (eigenvalues / regularised).sum()).sqrt()
        scale = gain / regularised.sqrt()
        self.whitening.copy_((vectors * scale) @ vectors.T)
        self.unwhitening.copy_((vectors / scale) @ vectors.T)

    @torch.no_grad()
    def _scale_encoder_to(self, sample: Tensor) -> None:
        """Scale W_enc so the first reconstruction of `sample` has the least-squares size.

        Unit rows overshoot: on isotropic 64-d inputs with k = 32 of 2048 latents the first
        x̂ is ~2x too long (FVU ~5), which costs hundreds of steps. TopK's choice does not
        depend on the scale (b_enc = 0), so one scalar fixes it; W_enc stays ∝ W_decᵀ. The
        L1 SAE's choice (every positive pre-activation) does not either; it decodes all."""
        centred = sample.float() - self.b_dec
        pre = self.pre_activations(sample.float())
        if self.config.l1_coefficient is not None:
            decoded = F.relu(pre) @ self.W_dec @ self.unwhitening
        else:
            values, indices = F.relu(pre).topk(self.config.k, dim=-1, sorted=False)
            decoded = self._decode_directions(values, indices)
        scale = (decoded * centred).sum() / decoded.pow(2).sum()
        if torch.isfinite(scale) and scale > 0:
            self.encoder.weight.mul_(scale)

    @staticmethod
    def _sample_mean(sample: Tensor, d_in: int) -> Tensor:
        if sample.ndim != 2 or sample.shape[1] != d_in or len(sample) == 0:
            raise ValueError(
                f"sample has shape {tuple(sample.shape)}; pass activations [N >= 1, {d_in}]"
            )
        return sample.detach().float().mean(0).cpu()

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.config.d_in:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; the SAE takes [B, {self.config.d_in}] "
                "(use reconstruct() for [..., d_in])"
            )

    def pre_activations(self, x: Tensor) -> Tensor:
        """W_enc M(x - b_dec) + b_enc for every latent, before the ReLU, [B, n_latents]."""
        return self.encoder((x - self.b_dec) @ self.whitening)

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Ids of the kept latents [B, width] and which of them are real (BatchTopK and L1
        pad every row to the widest)."""
        k = self.config.k
        if self.config.kind == "topk":
            indices = pre.topk(k, dim=-1, sorted=False).indices
            return indices, torch.ones_like(indices, dtype=torch.bool)
        acts = F.relu(pre)
        if self.config.kind == "relu_l1":
            keep = acts > 0
        elif self.training or self.threshold < 0:
            flat = acts.flatten()
            kept = flat.topk(min(k * len(acts), flat.numel()), sorted=False)
            keep = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, kept.indices, True)
            keep = keep.view_as(acts) & (acts > 0)
            if self.training and bool(keep.any()):
                smallest = kept.values[kept.values > 0].min()
                if self.threshold < 0:
                    self.threshold.copy_(smallest)
                else:
                    self.threshold.lerp_(smallest, 1 - THRESHOLD_MOMENTUM)
        else:
            keep = acts > self.threshold
        width = max(1, int(keep.sum(-1).max()))
        indices = torch.where(keep, acts, -1.0).topk(width, dim=-1, sorted=False).indices
        return indices, keep.gather(-1, indices)

    def _encode(self, x: Tensor) -> tuple[SparseLatents, Tensor]:
        pre = self.pre_activations(x)
        # Pick without grad, then gather: backward skips the dense ReLU and TopK (~25% faster
        # on CPU at 2048 latents than both that and recomputing only the kept rows)
        with torch.no_grad():
            indices, real = self._select(pre)
        values = F.relu(pre.gather(-1, indices))
        if self.config.kind != "topk":
            values = torch.where(real, values, 0.0)
        return SparseLatents(values, indices), pre

    def encode(self, x: Tensor) -> SparseLatents:
        """The kept latents of x [B, d_in]: top k per row (BatchTopK: above its threshold;
        L1: every positive one), as values + ids, zero-padded to the widest row."""
        self._check_input(x)
        return self._encode(x)[0]

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """sum of values * decoder_direction(indices) + b_dec, [B, d_in], in hidden units."""
        return self._decode_directions(values, indices) + self.b_dec

    def _decode_directions(self, values: Tensor, indices: Tensor) -> Tensor:
        # A gather instead of a dense [B, n_latents] @ W_dec: k rows per input, not all
        whitened = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
        return whitened @ self.unwhitening

    def dense_latents(self, x: Tensor) -> Tensor:
        """The latent code of x [..., d_in] as a dense [..., n_latents] tensor (mostly zeros)."""
        flat = x.reshape(-1, self.config.d_in)
        values, indices = self.encode(flat)
        dense = flat.new_zeros(len(flat), self.config.n_latents).scatter(-1, indices, values)
        return dense.view(*x.shape[:-1], self.config.n_latents)

    def reconstruct(self, x: Tensor) -> Tensor:
        """x̂ for x of any shape [..., d_in], e.g. a [B, T, hidden] state inside edit_hidden."""
        flat = x.reshape(-1, self.config.d_in)
        return self.decode(*self.encode(flat)).view_as(x)

    def decoder_direction(self, feature: int) -> Tensor:
        """What one unit of latent `feature` adds to the hidden state, W_dec[f] M⁻¹ [d_in] (a
        detached copy); unit norm only without whitening (M = identity)."""
        if not 0 <= feature < self.config.n_latents:
            raise IndexError(f"feature={feature}; pick 0..{self.config.n_latents - 1}")
        return (self.W_dec[feature] @ self.unwhitening).detach().clone()

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SaeOutput:
        """Reconstruct x [B, d_in]; a bool `dead_mask` [n_latents] switches AuxK on. The L1
        SAE returns its latents dense (every latent, zeros where off): early in training
        about half fire, and a matmul beats packing and gathering them (~5x per step)."""
        self._check_input(x)
        if self.config.kind == "relu_l1":
            pre = self.pre_activations(x)
            values = F.relu(pre)
            indices = torch.arange(values.shape[1], device=x.device).expand_as(values)
            reconstruction = values @ self.W_dec @ self.unwhitening + self.b_dec
        else:
            (values, indices), pre = self._encode(x)
            reconstruction = self.decode(values, indices)
        residual = x - reconstruction
        fvu = residual.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        auxk_loss = self._auxk_loss(pre, residual.detach(), dead_mask)
        loss = fvu + self.config.aux_coefficient * auxk_loss
        l1_loss = fvu.new_zeros(())
        if self.config.l1_coefficient is not None:
            l1_loss = self._l1_loss(x, values)
            loss = loss + self.config.l1_coefficient * l1_loss
        return SaeOutput(
            reconstruction=reconstruction,
            latent_values=values,
            latent_indices=indices,
            fvu=fvu,
            auxk_loss=auxk_loss,
            loss=loss,
            l0=(values != 0).sum(-1).float().mean(),
            l1_loss=l1_loss,
        )

    def _l1_loss(self, x: Tensor, values: Tensor) -> Tensor:
        # Σ_i z_i ‖W_dec[i]‖ with unit rows, per row, over the RMS per coordinate of the
        # whitened batch (≈ 1 with whitening, whose gain sets E‖M(x - mean)‖² = d_in; in the
        # hidden basis it makes the coefficient scale-free, as FVU's denominator does).
        with torch.no_grad():
            centred = (x - x.mean(0)) @ self.whitening
            rms = centred.pow(2).mean().sqrt().clamp_min(1e-12)
        return values.sum(-1).mean() / rms

    def _auxk_loss(self, pre: Tensor, residual: Tensor, dead_mask: Tensor | None) -> Tensor:
        n_dead = 0 if dead_mask is None else int(dead_mask.sum())
        if n_dead == 0:
            return residual.new_zeros(())
        # Gao et al. 2024 sec. 2.4 / appendix B.1: the top k_aux dead latents model the
        # residual, so dead latents get gradient; scaled down when few are dead (sparsify).
        k_aux = min(self.config.k_aux, n_dead)
        scale = min(n_dead / self.config.k_aux, 1.0)
        indices = torch.where(dead_mask, pre, -torch.inf).topk(k_aux, sorted=False).indices
        residual_hat = self._decode_directions(F.relu(pre.gather(-1, indices)), indices)
        variance = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        return scale * (residual_hat - residual).pow(2).sum() / variance

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm in the whitened basis (call after each
        optimizer step)."""
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec /= torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True) + eps

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the part of each decoder row's gradient along the row (call before the step):
        with rows renormalised after the step, that part only changes their norm."""
        if self.W_dec.grad is None:
            raise RuntimeError("W_dec has no gradient; call loss.backward() first")
        parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec

    def save(self, path: str | Path) -> Path:
        """Write directory `path` with sae.safetensors + config.json, atomically."""
        path = Path(path)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_file(tensors, tmp / SAE_WEIGHTS_FILE)
            (tmp / SAE_CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> TopKSae:
        """Read a directory written by `save` (plain safetensors + JSON)."""
        path = Path(path)
        if not (path / SAE_WEIGHTS_FILE).is_file() or not (path / SAE_CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{path} lacks {SAE_WEIGHTS_FILE} or {SAE_CONFIG_FILE}; write it with TopKSae.save"
            )
        raw = json.loads((path / SAE_CONFIG_FILE).read_text())
        raw.setdefault("whitening_shrinkage", None)  # saved before whitening: hidden basis
        raw.setdefault("l1_coefficient", None)  # saved before the L1 SAE: TopK/BatchTopK
        known = {f.name for f in fields(SaeConfig)}
        if unknown := sorted(set(raw) - known):
            raise ValueError(f"{path / SAE_CONFIG_FILE} has unknown keys {unknown}; known: {known}")
        sae = cls(SaeConfig(**raw), device=device)
        state = load_file(path / SAE_WEIGHTS_FILE, device=str(device))
        for name in ("whitening", "unwhitening"):  # absent before whitening: the identity
            state.setdefault(name, getattr(sae, name))
        sae.load_state_dict(state)
        return sae
