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
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from recsae_pipeline.storage.atomic import atomic_path
from recsae_pipeline.storage.registry import SAE_CONFIG_FILE, SAE_WEIGHTS_FILE

THRESHOLD_MOMENTUM = 0.99
CHUNK_ROWS = 64
"""Rows per chunk of a training forward's encoder product + top-k (CPU): 64 x 2048 latents =
512 KiB of pre-activations, selected while they are still in cache."""

# The sparse passes build CSR tensors every step; torch flags the layout as beta once.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


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


class _Encoded(NamedTuple):
    latents: SparseLatents
    dead_pre: Tensor | None
    """Pre-activations of the dead latents [B, n_dead] (AuxK), or None."""
    whitened: Tensor | None
    """Sparse passes only: the centred, whitened input (what W_enc multiplies)."""
    pattern: KeptLatents | None
    """Sparse passes only: the kept latents' sparse pattern (then no tensor here carries
    the dense pre-activations' grad: the sparse passes supply it)."""


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


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside (None: unchanged), restored after."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def top_k(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, ids) of the k largest entries of each row of `pre` [B, n], in no order: the
    set torch.topk picks (up to ties; NaN counts as largest in both).

    On CPU (float32, contiguous) the columns form n / s groups of s strided columns; the k
    groups with the largest maxima hold the top k (an entry outside them is below k group
    maxima, so below k entries), and the top k of those k·s candidates is the answer. Both
    selections are numpy's partition (SIMD): ~2x faster than torch.topk over every column
    at 2048 latents, k 32 (s = 8)."""
    rows, n = pre.shape
    if pre.device.type != "cpu" or pre.dtype != torch.float32 or not pre.is_contiguous():
        return pre.topk(k, dim=-1, sorted=False)
    size = _group_size(n, k)
    if size == 1:
        ids = _argpartition_top(pre, k)
        return pre.gather(-1, ids), ids
    groups = n // size
    best = _argpartition_top(pre.view(rows, size, groups).amax(1), k)  # [rows, k] group ids
    starts = torch.arange(0, rows * n, n).view(rows, 1, 1)
    flat = (best.unsqueeze(-1) + (starts + torch.arange(0, n, groups))).view(rows, k * size)
    candidates = pre.view(-1).index_select(0, flat.view(-1)).view(rows, k * size)
    chosen = _argpartition_top(candidates, k)
    return candidates.gather(-1, chosen), flat.gather(-1, chosen) - starts.view(rows, 1)


def _group_size(n: int, k: int) -> int:
    """Columns per group for `top_k`: the power of two nearest below sqrt(n / k) that divides
    n (the two selections then see about as many entries each); 1 (no groups) below 4."""
    size = 1
    while (2 * size) ** 2 * k <= n and n % (2 * size) == 0:
        size *= 2
    return size if size >= 4 else 1


def _argpartition_top(a: Tensor, k: int) -> Tensor:
    """Ids [rows, k] of each row's k largest entries of a CPU float tensor, unordered."""
    width = a.shape[1]
    if k >= width:
        return torch.arange(width).expand(a.shape[0], width)
    return torch.from_numpy(np.argpartition(a.numpy(), width - k, axis=1)[:, width - k :])


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _one_thread_pool(threads: int) -> ThreadPoolExecutor:
    """`threads` workers, each running torch on one intra-op thread (shared per count)."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(
            threads, thread_name_prefix="recsae-sae", initializer=torch.set_num_threads,
            initargs=(1,),
        )  # fmt: skip
    return _POOLS[threads]


class KeptLatents:
    """The kept latents of a batch as a sparse [B, n_latents] matrix with `indices` [B, w] as
    its pattern, in the two CSR layouts the sparse passes need: by row (decoding, the
    encoder's input gradient) and by latent (both weight gradients: Wᵀ-side products). The
    by-latent order is sorted once per batch, on first use, and shared by every backward that
    reads it (the encoder's and the decoder's)."""

    def __init__(self, indices: Tensor, n_latents: int) -> None:
        self.indices = indices
        self.columns = indices.reshape(-1)
        batch, width = indices.shape
        self.shape = (batch, n_latents)
        self.row_pointers = torch.arange(
            0, batch * width + 1, width, dtype=torch.long, device=indices.device
        )
        self._by_latent: tuple[Tensor, Tensor, Tensor] | None = None

    def matrix(self, values: Tensor) -> Tensor:
        """CSR [B, n_latents] with `values` [B, w] at the pattern."""
        return torch.sparse_csr_tensor(
            self.row_pointers, self.columns, values.reshape(-1), self.shape,
            check_invariants=False,
        )  # fmt: skip

    def transposed(self, values: Tensor) -> Tensor:
        """CSR [n_latents, B] of matrix(values)ᵀ."""
        pointers, rows, order = self.by_latent()
        return torch.sparse_csr_tensor(
            pointers, rows, values.reshape(-1)[order], self.shape[::-1], check_invariants=False
        )

    def by_latent(self) -> tuple[Tensor, Tensor, Tensor]:
        """(row pointers [n_latents + 1], row of each entry, its position in `indices`
        flattened), entries ordered by latent, then by position."""
        if self._by_latent is None:
            n_latents, nnz = self.shape[1], self.columns.numel()
            if self.columns.device.type == "cpu":
                # One key per entry, latent * nnz + position: numpy's (SIMD) sort of plain
                # keys is ~10x faster than torch's argsort on CPU and needs no permutation.
                dtype = np.int32 if n_latents * nnz < 2**31 else np.int64
                keys = self.columns.numpy().astype(dtype) * dtype(nnz) + np.arange(nnz, dtype=dtype)
                order = torch.from_numpy(np.sort(keys) % dtype(nnz)).long()
            else:
                order = torch.sort(self.columns, stable=True).indices
            counts = torch.bincount(self.columns, minlength=n_latents)
            pointers = torch.zeros(n_latents + 1, dtype=torch.long, device=order.device)
            torch.cumsum(counts, 0, out=pointers[1:])
            self._by_latent = (pointers, order // self.indices.shape[1], order)
        return self._by_latent


class _KeptPreActivations(torch.autograd.Function):
    """x Wᵀ + b at the kept latents only, [B, w]. Forward returns `kept`, those entries of the
    dense pre-activations computed for the selection (no recompute); backward is sparse: B·w
    rows of W and x instead of two dense [B, n_latents] products."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, kept: Tensor, latents: KeptLatents):
        ctx.save_for_backward(x, weight)
        ctx.latents = latents
        return kept.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        latents: KeptLatents = ctx.latents
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = latents.matrix(grad) @ weight
        if ctx.needs_input_grad[1]:
            grad_weight = latents.transposed(grad) @ x
        if ctx.needs_input_grad[2]:
            grad_bias = grad.new_zeros(latents.shape[1]).index_add_(
                0, latents.columns, grad.reshape(-1)
            )
        return grad_x, grad_weight, grad_bias, None, None


class _SparseDecode(torch.autograd.Function):
    """values [B, w] at the kept latents times `weight` [n_latents, d] -> [B, d], as a CSR
    product; backward: the value gradients are dot products at the pattern only (sampled
    matmul), the weight gradient a CSR product by latent (no dense [B, n_latents])."""

    @staticmethod
    def forward(ctx, values: Tensor, weight: Tensor, latents: KeptLatents) -> Tensor:
        ctx.save_for_backward(values, weight)
        ctx.latents = latents
        return latents.matrix(values) @ weight

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, weight = ctx.saved_tensors
        latents: KeptLatents = ctx.latents
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            pattern = latents.matrix(values.new_zeros(values.shape))
            sampled = torch.sparse.sampled_addmm(pattern, grad.contiguous(), weight.T, beta=0.0)
            grad_values = sampled.values().view_as(values)
        if ctx.needs_input_grad[1]:
            grad_weight = latents.transposed(values) @ grad
        return grad_values, grad_weight, None


class TopKSae(nn.Module):
    """TopK (or BatchTopK, or L1-penalised ReLU: `SaeConfig.kind`) sparse autoencoder.

    `encoder` is an nn.Linear (weight [n_latents, d_in]) on whitened inputs; `W_dec`
    [n_latents, d_in] holds one unit-norm direction per latent in the whitened basis; buffers
    `whitening` (M) and `unwhitening` (M⁻¹) [d_in, d_in] map the hidden basis there and back,
    so inputs, outputs and b_dec are in hidden units.

    `sparse_backward` (None = on CPU) picks how training differentiates the kept latents:
    the sparse passes (`_KeptPreActivations`, `_SparseDecode`: B·k rows of the weights) or
    autograd through a gather from the dense pre-activations and `F.embedding_bag` (dense
    [B, n_latents] products in backward; kept for CUDA, where it is not yet measured).
    `dense_threads` (None = as set) are the intra-op threads of the two dense steps of a
    training forward, the encoder product and the top-k over every latent; `train_sae` runs
    everything else on one thread (see there)."""

    sparse_backward: bool | None = None
    dense_threads: int | None = None

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
        self._workspace: Tensor | None = None
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
        return self.encoder(self._whiten(x - self.b_dec))

    def _whiten(self, x: Tensor) -> Tensor:
        # M is the identity without whitening: skip the product (and its backward)
        return x if self.config.whitening_shrinkage is None else x @ self.whitening

    def _unwhiten(self, x: Tensor) -> Tensor:
        return x if self.config.whitening_shrinkage is None else x @ self.unwhitening

    def _sparse_passes(self, x: Tensor) -> bool:
        """Whether this forward differentiates the kept latents with the sparse passes."""
        use = self.sparse_backward if self.sparse_backward is not None else x.device.type == "cpu"
        return use and torch.is_grad_enabled()

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Ids of the kept latents [B, width] and which of them are real (BatchTopK and L1
        pad every row to the widest)."""
        k = self.config.k
        if self.config.kind == "topk":
            indices = top_k(pre, k)[1]
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

    def _encode(self, x: Tensor, dead: Tensor | None = None) -> _Encoded:
        """The kept latents of x, and the pre-activations of the `dead` latent ids (AuxK)."""
        dead_pre = None
        if self._sparse_passes(x):
            whitened = self._whiten(x - self.b_dec)
            with torch.no_grad():
                # b_enc as a last input column: one product, no pass to add the bias
                inputs = torch.cat([whitened, whitened.new_ones(len(x), 1)], 1)
                weight = torch.cat([self.encoder.weight, self.encoder.bias[:, None]], 1)
                pre = self._pre_workspace(len(x), x)
                if self.config.kind == "topk" and x.device.type == "cpu":
                    kept, indices, dead_pre = self._encode_top_k(inputs, weight, pre, dead)
                    real = None
                else:
                    with intra_op_threads(self.dense_threads):
                        torch.mm(inputs, weight.T, out=pre)
                        indices, real = self._select(pre)
                    kept = pre.gather(-1, indices)
                    dead_pre = None if dead is None else pre.index_select(1, dead)
            pattern = KeptLatents(indices, self.config.n_latents)
            values = F.relu(self._kept_pre_activations(whitened, kept, pattern))
        else:
            whitened, pattern = None, None
            pre = self.pre_activations(x)
            # Pick without grad, then gather: backward skips the dense ReLU and TopK (~25%
            # faster on CPU at 2048 latents than both that and recomputing only the kept rows)
            with torch.no_grad():
                indices, real = self._select(pre)
            values = F.relu(pre.gather(-1, indices))
            dead_pre = None if dead is None else pre.index_select(1, dead)
        if self.config.kind != "topk":
            values = torch.where(real, values, 0.0)
        return _Encoded(SparseLatents(values, indices), dead_pre, whitened, pattern)

    def _pre_workspace(self, batch: int, like: Tensor) -> Tensor:
        """[batch, n_latents], reused from step to step: the pre-activations are the one large
        tensor of a step (32 MiB at 4096 x 2048), and a fresh one per step costs ~as much
        again as the matmul that fills it in page faults (CPU)."""
        workspace = self._workspace
        if workspace is None or workspace.shape[0] < batch or workspace.device != like.device:
            workspace = self._workspace = like.new_empty(batch, self.config.n_latents)
        return workspace[:batch]

    @torch.no_grad()
    def _encode_top_k(
        self, inputs: Tensor, weight: Tensor, pre: Tensor, dead: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """pre = inputs @ weightᵀ (into `pre`), its `top_k` per row (values, ids) and its
        `dead` columns, CHUNK_ROWS rows at a time so each chunk is read while in cache; the
        rows are split between `dense_threads` one-thread workers (None: this thread, on as
        many threads as set)."""
        rows, k = len(inputs), self.config.k
        kept = inputs.new_empty(rows, k)
        indices = torch.empty(rows, k, dtype=torch.long)
        dead_pre = None if dead is None else inputs.new_empty(rows, len(dead))

        def encode(start: int, stop: int) -> None:
            with torch.no_grad():  # grad mode is per thread
                for first in range(start, stop, CHUNK_ROWS):
                    last = min(first + CHUNK_ROWS, stop)
                    chunk = torch.mm(inputs[first:last], weight.T, out=pre[first:last])
                    kept[first:last], indices[first:last] = top_k(chunk, k)
                    if dead_pre is not None:
                        torch.index_select(chunk, 1, dead, out=dead_pre[first:last])

        threads = min(self.dense_threads or 1, max(1, rows // CHUNK_ROWS))
        if threads == 1:
            encode(0, rows)
        else:
            # Contiguous shares of whole chunks, one per worker: one join per forward
            chunks = -(-rows // CHUNK_ROWS)
            bounds = [min(rows, CHUNK_ROWS * (chunks * i // threads)) for i in range(threads + 1)]
            list(_one_thread_pool(threads).map(encode, bounds[:-1], bounds[1:]))
        return kept, indices, dead_pre

    def _kept_pre_activations(self, whitened: Tensor, kept: Tensor, latents: KeptLatents) -> Tensor:
        """The pre-activations `kept` [B, w] at `latents` (computed without grad), made
        differentiable in W_enc, b_enc and `whitened` (sparsely)."""
        return _KeptPreActivations.apply(
            whitened, self.encoder.weight, self.encoder.bias, kept, latents
        )

    def encode(self, x: Tensor) -> SparseLatents:
        """The kept latents of x [B, d_in]: top k per row (BatchTopK: above its threshold;
        L1: every positive one), as values + ids, zero-padded to the widest row."""
        self._check_input(x)
        return self._encode(x).latents

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """sum of values * decoder_direction(indices) + b_dec, [B, d_in], in hidden units."""
        return self._decode_directions(values, indices) + self.b_dec

    def _decode_directions(
        self, values: Tensor, indices: Tensor, latents: KeptLatents | None = None
    ) -> Tensor:
        # A gather instead of a dense [B, n_latents] @ W_dec: k rows per input, not all
        if latents is not None:
            whitened = _SparseDecode.apply(values, self.W_dec, latents)
        else:
            whitened = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
        return self._unwhiten(whitened)

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
        dead = None
        if dead_mask is not None and bool(dead_mask.any()):
            dead = dead_mask.nonzero().squeeze(1)
        if self.config.kind == "relu_l1":
            pre = self.pre_activations(x)
            values = F.relu(pre)
            indices = torch.arange(values.shape[1], device=x.device).expand_as(values)
            reconstruction = self._unwhiten(values @ self.W_dec) + self.b_dec
            encoded = _Encoded(
                SparseLatents(values, indices),
                None if dead is None else pre.index_select(1, dead),
                None,
                None,
            )
        else:
            encoded = self._encode(x, dead)
            values, indices = encoded.latents
            reconstruction = self._decode_directions(values, indices, encoded.pattern)
            reconstruction = reconstruction + self.b_dec
        residual = x - reconstruction
        fvu = residual.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        auxk_loss = self._auxk_loss(encoded, dead, residual.detach())
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

    def _auxk_loss(self, encoded: _Encoded, dead: Tensor | None, residual: Tensor) -> Tensor:
        """AuxK over the `dead` latent ids (None: none dead, 0), from their pre-activations
        `encoded.dead_pre` (with the sparse passes: without grad, which they then supply)."""
        if dead is None or encoded.dead_pre is None:
            return residual.new_zeros(())
        n_dead, dead_pre = len(dead), encoded.dead_pre
        # Gao et al. 2024 sec. 2.4 / appendix B.1: the top k_aux dead latents model the
        # residual, so dead latents get gradient; scaled down when few are dead (sparsify).
        k_aux = min(self.config.k_aux, n_dead)
        scale = min(n_dead / self.config.k_aux, 1.0)
        # The top k_aux among the dead columns (all of them when that is every one): the
        # same latents as a top-k over every column with the living ones at -inf
        if k_aux == n_dead:
            local = torch.arange(n_dead, device=dead.device).expand(len(dead_pre), n_dead)
            kept = dead_pre
        else:
            with torch.no_grad():
                local = top_k(dead_pre.detach(), k_aux)[1]
            kept = dead_pre.gather(-1, local)
        indices = dead[local]
        if encoded.pattern is not None:
            latents = KeptLatents(indices, self.config.n_latents)
            values = F.relu(self._kept_pre_activations(encoded.whitened, kept, latents))
            residual_hat = self._decode_directions(values, indices, latents)
        else:
            residual_hat = self._decode_directions(F.relu(kept), indices)
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
