"""One sequential recommender: item vectors -> `transformers` backbone -> scores over all items.

Sequences are right-padded with item 0. Under causal attention a real position only sees
earlier positions, so trailing padding can never change its output, and position ids count
from the first real item exactly as without padding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel, PreTrainedModel

Kind = Literal["sasrec", "teacher", "student"]
BackboneName = Literal["gpt2", "llama"]

_BACKBONES: dict[str, type[PreTrainedModel]] = {"gpt2": GPT2Model, "llama": LlamaModel}


@dataclass(frozen=True)
class RecommenderConfig:
    """Every knob of a recommender, SASRec+ defaults; `num_items` excludes padding, so tables
    have num_items + 1 rows."""

    num_items: int
    kind: Kind = "sasrec"
    max_len: int = 50
    """Inputs keep their last max_len items."""
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 1
    ffn_mult: int = 4
    """MLP width as a multiple of hidden_size."""
    dropout: float = 0.2
    d_item: int = 64
    backbone: BackboneName = "gpt2"
    pretrained_path: str | None = None
    """Local `transformers` checkpoint directory for the backbone; its own sizes win over
    num_heads/ffn_mult, `hidden_size` must match, and only its first `num_layers` layers are
    kept."""
    lora_r: int = 0
    """LoRA rank on the backbone through `peft` (0: every backbone weight trains). Only over a
    pretrained backbone: the base stays frozen, the adapter, item projection and head train."""
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    """SLMRec's targets: the Llama MLP projections (no attention)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.lora_r < 0:
            raise ValueError(f"lora_r={self.lora_r}; use 0 (no adapter) or a positive rank")
        if self.lora_r and self.pretrained_path is None:
            raise ValueError(
                f"lora_r={self.lora_r} without a pretrained backbone: a LoRA adapter over "
                f"random weights cannot learn; set lora_r=0, or give a base (pretrained_path)"
            )
        if self.num_items < 1:
            raise ValueError(f"num_items={self.num_items}; a catalogue needs at least one item")
        if self.num_layers < 1 or self.max_len < 1:
            raise ValueError(
                f"num_layers={self.num_layers}, max_len={self.max_len}; both must be >= 1"
            )
        if self.kind not in ("sasrec", "teacher", "student"):
            raise ValueError(f"kind={self.kind!r}; use 'sasrec', 'teacher' or 'student'")
        if self.backbone not in _BACKBONES:
            raise ValueError(f"backbone={self.backbone!r}; use one of {sorted(_BACKBONES)}")
        if self.kind == "sasrec" and self.d_item != self.hidden_size:
            raise ValueError(
                f"sasrec ties its item table to the backbone: d_item={self.d_item} must equal "
                f"hidden_size={self.hidden_size}"
            )
        if self.pretrained_path is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )

    @classmethod
    def sasrec(cls, num_items: int, **overrides) -> RecommenderConfig:
        """SASRec+: the class defaults (hidden 64, 2 GPT-2 blocks, 1 head, dropout 0.2), the
        item table tied to the backbone width."""
        overrides.setdefault("d_item", overrides.get("hidden_size", cls.hidden_size))
        return cls(num_items=num_items, **overrides)

    @classmethod
    def teacher(cls, num_items: int, d_item: int, **overrides) -> RecommenderConfig:
        """SLMRec-style teacher over frozen item vectors: `TEACHER_DEFAULTS`, then `overrides`."""
        return cls(num_items=num_items, d_item=d_item, **(TEACHER_DEFAULTS | overrides))


TEACHER_DEFAULTS: dict[str, Any] = {
    "kind": "teacher",
    "backbone": "llama",
    "hidden_size": 64,
    "num_layers": 8,
    "num_heads": 2,
    "ffn_mult": 2,
    "dropout": 0.1,
}
"""The teacher's architecture: 8 Llama layers of width 64, sized so the embedded data trains
in minutes on a CPU (configs/gpu-large.yaml widens it)."""


class RecommenderOutput(NamedTuple):
    user: Tensor
    """User vectors at every position, [B, T, d_item]; scores = user @ item table^T."""
    hidden_states: tuple[Tensor, ...] | None
    """num_layers + 1 states [B, T, hidden_size] when requested: 0 = backbone input (GPT-2: with
    positions), l = output of layer l, but the last entry is after the final norm."""


def build_backbone(config: RecommenderConfig) -> PreTrainedModel:
    """A fresh backbone from the config, or the first `num_layers` layers of a local checkpoint."""
    model_cls = _BACKBONES[config.backbone]
    if config.pretrained_path is not None:
        backbone = model_cls.from_pretrained(
            config.pretrained_path,
            local_files_only=True,
            use_safetensors=True,
            dtype=torch.float32,
            num_hidden_layers=config.num_layers,
        )
        if backbone.config.hidden_size != config.hidden_size:
            raise ValueError(
                f"checkpoint {config.pretrained_path} has hidden size "
                f"{backbone.config.hidden_size}, config.hidden_size={config.hidden_size}; set them equal"
            )
        if backbone.config.num_hidden_layers != config.num_layers:
            raise ValueError(
                f"checkpoint {config.pretrained_path} has {backbone.config.num_hidden_layers} "
                f"layers, fewer than config.num_layers={config.num_layers}"
            )
        # Items enter as inputs_embeds, so the token table is dead weight (32000 rows for Llama-2).
        # (zeros, so that two loads of one checkpoint give identical states).
        backbone.set_input_embeddings(nn.Embedding(1, config.hidden_size).requires_grad_(False))
        nn.init.zeros_(backbone.get_input_embeddings().weight)
        backbone.config.vocab_size = 1
        # Token ids of the old table; no tokens here.
        backbone.config.pad_token_id = backbone.config.bos_token_id = None
        backbone.config.eos_token_id = None
        return backbone
    common = dict(vocab_size=1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if config.backbone == "gpt2":
        backbone_config = GPT2Config(
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_inner=config.ffn_mult * config.hidden_size,
            n_positions=config.max_len,
            activation_function="gelu",
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            **common,
        )
    else:
        backbone_config = LlamaConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            intermediate_size=config.ffn_mult * config.hidden_size,
            max_position_embeddings=config.max_len,
            attention_dropout=config.dropout,
            **common,
        )
    return model_cls(backbone_config)


def backbone_from_config(config: RecommenderConfig, backbone_config: dict) -> PreTrainedModel:
    """A randomly initialised backbone of exactly the architecture `backbone_config` describes."""
    model_cls = _BACKBONES[config.backbone]
    return model_cls(model_cls.config_class.from_dict(backbone_config))


class Recommender(nn.Module):
    """sasrec learns its item table end to end; teacher/student read a frozen one (SLMRec)."""

    def __init__(
        self,
        config: RecommenderConfig,
        item_table: Tensor | None = None,
        backbone: PreTrainedModel | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else build_backbone(config)
        rows = config.num_items + 1
        if config.kind == "sasrec":
            if item_table is not None:
                raise ValueError("sasrec learns its own item table; pass item_table=None")
            self.item_emb = nn.Embedding(rows, config.d_item, padding_idx=0)
            nn.init.normal_(self.item_emb.weight, std=self.backbone.config.initializer_range)
            with torch.no_grad():
                self.item_emb.weight[0].zero_()
            self.item_in: nn.Module = nn.Identity()
            self.user_head: nn.Module = nn.Identity()
            # GPT-2 applies embedding dropout itself, after adding positions.
            self.drop = nn.Identity() if config.backbone == "gpt2" else nn.Dropout(config.dropout)
        else:
            if item_table is None or tuple(item_table.shape) != (rows, config.d_item):
                shape = None if item_table is None else tuple(item_table.shape)
                raise ValueError(
                    f"{config.kind} needs the frozen sasrec item table of shape "
                    f"({rows}, {config.d_item}), got {shape}"
                )
            self.register_buffer("item_table", item_table.detach().clone().float())
            self.item_in = nn.Linear(config.d_item, config.hidden_size)
            self.user_head = nn.Linear(config.hidden_size, config.d_item, bias=False)
            self.drop = nn.Dropout(config.dropout)

    @property
    def item_vectors(self) -> Tensor:
        """The item table [num_items + 1, d_item] used for both input and scoring."""
        return self.item_emb.weight if self.config.kind == "sasrec" else self.item_table

    @property
    def layers(self) -> nn.ModuleList:
        """The backbone's decoder layers by index, each returning a tensor. `transformers` records
        hidden_states with its own forward hooks, installed at the first forward: register a
        replacing hook with prepend=True so that hidden_states[l + 1] shows the replacement."""
        return self.backbone.h if self.config.backbone == "gpt2" else self.backbone.layers

    @property
    def final_norm(self) -> nn.Module:
        """The backbone's norm after its last block: last_hidden_state = final_norm(block L)."""
        return self.backbone.ln_f if self.config.backbone == "gpt2" else self.backbone.norm

    def scores_from_last_block(self, hidden: Tensor) -> Tensor:
        """Scores [..., num_items + 1] from the last block's output [..., hidden]: what
        `predict` computes after the blocks, so a state edited there can be scored without
        running the blocks again."""
        return self.scores(self.user_head(self.final_norm(hidden)))

    def forward(self, items: Tensor, output_hidden_states: bool = False) -> RecommenderOutput:
        """items [B, T] right-padded with 0 -> user vectors at every position."""
        if items.shape[1] > 1 and bool(((items[:, :-1] == 0) & (items[:, 1:] > 0)).any()):
            raise ValueError("items must be right-padded: a 0 is followed by a real item")
        x = self.drop(self.item_in(F.embedding(items, self.item_vectors, padding_idx=0)))
        out = self.backbone(
            inputs_embeds=x, output_hidden_states=output_hidden_states, use_cache=False
        )  # no KV cache: every call sees whole sequences
        return RecommenderOutput(self.user_head(out.last_hidden_state), out.hidden_states)

    def scores(self, user: Tensor) -> Tensor:
        """Scores over all items for user vectors [..., d_item]; padding (column 0) is -inf."""
        scores = user @ self.item_vectors.T
        scores[..., 0] = float("-inf")
        return scores

    def predict(self, items: Tensor) -> Tensor:
        """Scores [B, num_items + 1] for the next item after each right-padded sequence."""
        lengths = (items > 0).sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("every sequence needs at least one real item to predict from")
        user = self(items).user
        return self.scores(user[torch.arange(len(items), device=items.device), lengths - 1])


def add_lora(model: Recommender) -> Recommender:
    """Wrap the backbone in a fresh `peft` LoRA adapter (`config.lora_*`): the base weights
    freeze, the adapter, the item projection and the user head stay trainable."""
    from peft import LoraConfig, get_peft_model

    c = model.config
    if c.lora_r < 1:
        return model
    lora = LoraConfig(
        r=c.lora_r,
        lora_alpha=c.lora_alpha,
        lora_dropout=c.lora_dropout,
        target_modules=list(c.lora_targets),
        bias="none",
    )
    model.backbone = get_peft_model(model.backbone, lora)
    return model


def has_adapter(model: Recommender) -> bool:
    """Whether the backbone is wrapped in a `peft` adapter (not yet merged)."""
    from peft import PeftModel

    return isinstance(model.backbone, PeftModel)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def student_from_teacher(
    teacher: Recommender, num_layers: int = 2, **overrides: Any
) -> Recommender:
    """A student with the teacher's first `num_layers` layers; every shared weight is copied.
    `overrides` set further student config fields (a base's `pretrained_path`, `lora_*`)."""
    if teacher.config.kind != "teacher":
        raise ValueError(f"expected a teacher, got kind={teacher.config.kind!r}")
    if not 1 <= num_layers <= teacher.config.num_layers:
        raise ValueError(
            f"num_layers={num_layers}; pick 1..{teacher.config.num_layers} (the teacher's depth)"
        )
    config = replace(
        teacher.config, kind="student", num_layers=num_layers, pretrained_path=None, lora_r=0
    )
    config = replace(config, **overrides)
    backbone_config = copy.deepcopy(teacher.backbone.config)
    backbone_config.num_hidden_layers = num_layers
    backbone = type(teacher.backbone)(backbone_config)
    student = Recommender(config, item_table=teacher.item_vectors, backbone=backbone)
    teacher_state = teacher.state_dict()
    student.load_state_dict({k: teacher_state[k] for k in student.state_dict()}, strict=True)
    return student.to(teacher.item_vectors.device)
