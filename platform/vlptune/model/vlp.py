"""The end-to-end VLP model: CNN -> 1x1 projection + max-pool -> visual dictionary -> fusion BERT.

This module implements the "Model" section of docs/contracts.md.

Optimiser groups (:meth:`VLPModel.param_groups`):

* ``backbone``: the CNN's trainable parameters (``model.backbone``), SOHO: SGD;
* ``transformer``: everything else that trains: the 1x1 projection
  (``model.proj``), the VD gate (if on), the fusion BERT and its grid
  embeddings, and any head registered later on the model (SOHO: AdamW). The
  projection sits here because it maps into the Transformer's space, and it
  must keep learning while the CNN is frozen by the freeze schedule.

The VD codes are buffers (moving average), never in an optimiser group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vlptune.config import ModelConfig, Recipe
from vlptune.grid import grid_stride
from vlptune.model.backbone import GridProjection, ResNetBackbone, grid_mask_from_pixels
from vlptune.model.fusion import FusionOutput, FusionTransformer, UnimodalOutput
from vlptune.model.visual_dictionary import VisualDictionary


@dataclass
class ImageFeatures:
    """Output of :meth:`VLPModel.encode_images`."""

    feats: Tensor  # [B,D,gh,gw] after projection, pooling and VD straight-through (== raw when the VD is off)
    raw: Tensor  # [B,D,gh,gw] before the VD
    grid_mask: Tensor  # bool [B,gh,gw], True on cells covering real pixels
    codes: Tensor | None  # int64 [B,gh,gw] nearest VD code (-1 on padded cells); None when the VD is off
    vd_stats: dict[str, float] = field(default_factory=dict)  # perplexity, codes_used, dead_codes, reseeded[, gate]


class VLPModel(nn.Module):
    """SOHO-style model built from ``recipe.model`` (a :class:`Recipe` or a bare :class:`ModelConfig`)."""

    def __init__(self, recipe: Recipe | ModelConfig) -> None:
        super().__init__()
        cfg = recipe.model if isinstance(recipe, Recipe) else recipe
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"VLPModel expects a Recipe or a ModelConfig, got {type(recipe).__name__}")
        self.cfg = cfg
        seed = recipe.train.seed if isinstance(recipe, Recipe) else 0
        self.fusion = FusionTransformer(cfg.fusion)
        self.hidden_size: int = self.fusion.hidden_size
        self.vocab_size: int = self.fusion.vocab_size
        self.backbone = ResNetBackbone(cfg.backbone)
        self.proj = GridProjection(self.backbone.out_channels, self.hidden_size, cfg.backbone.pool)
        self.grid_stride: int = grid_stride(cfg.backbone.pool)
        self.vd: VisualDictionary | None = VisualDictionary.from_config(cfg.vd, self.hidden_size, seed=seed)

    # ------------------------------------------------------------ contract

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The fusion BERT's word embeddings (tie MLM decoders to ``word_embeddings.weight``)."""
        return self.fusion.word_embeddings

    def encode_images(self, images: Tensor, pixel_mask: Tensor | None = None) -> ImageFeatures:
        """images float [B,3,H,W], pixel_mask bool [B,H,W] (None: every pixel real) -> :class:`ImageFeatures`."""
        cnn = self.backbone(images)
        raw = self.proj(cnn)
        b, _, h, w = images.shape
        if pixel_mask is None:
            pixel_mask = torch.ones(b, h, w, dtype=torch.bool, device=images.device)
        grid_mask = grid_mask_from_pixels(pixel_mask, self.grid_stride)
        if grid_mask.shape[-2:] != raw.shape[-2:]:  # pragma: no cover - geometry guaranteed by grid.py
            raise RuntimeError(f"grid mask {tuple(grid_mask.shape)} does not match features {tuple(raw.shape)}")
        if self.vd is None:
            return ImageFeatures(feats=raw, raw=raw, grid_mask=grid_mask, codes=None, vd_stats={})
        out = self.vd(raw, grid_mask)
        return ImageFeatures(feats=out.feats, raw=raw, grid_mask=grid_mask, codes=out.codes, vd_stats=out.stats)

    def fuse(self, text_ids: Tensor, text_mask: Tensor, grid: Tensor, grid_mask: Tensor | None = None) -> FusionOutput:
        """text_ids/text_mask [Np,T], grid [Np,D,gh,gw] (gathered per pair), grid_mask bool [Np,gh,gw] -> :class:`FusionOutput`."""
        return self.fusion(text_ids, text_mask, grid, grid_mask)

    def encode_unimodal(self, text_ids: Tensor | None, text_mask: Tensor | None, grid: Tensor | None, grid_mask: Tensor | None = None) -> UnimodalOutput:
        """MVPTR's uni-modal stage only (``model.fusion.unimodal_layers`` > 0): text [Nt,T] and grid [Ni,D,gh,gw]
        encoded apart (Nt and Ni independent) -> :class:`UnimodalOutput` with ``text_cls`` [Nt,D] and the pooled
        ``image_emb`` [Ni,D]."""
        return self.fusion.encode_unimodal(text_ids, text_mask, grid, grid_mask)

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Freeze schedule: True = the whole CNN gets no gradients and its BatchNorms run in eval mode."""
        self.backbone.set_frozen(frozen)

    @property
    def backbone_frozen(self) -> bool:
        return self.backbone.frozen

    # ----------------------------------------------------------- optimiser

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{'backbone': CNN parameters, 'transformer': every other parameter}; only parameters with requires_grad.

        Parameters frozen for the whole run (``frozen_stages``, ``frozen_bn``) are
        left out; parameters frozen by the schedule (:meth:`set_backbone_frozen`)
        stay in (they just receive no gradient while frozen). Heads that
        objectives register as sub-modules of this model land in ``transformer``.
        """
        cnn = {id(p) for p in self.backbone.parameters()}
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        transformer = [p for p in self.parameters() if p.requires_grad and id(p) not in cnn]
        return {"backbone": backbone, "transformer": transformer}


__all__ = ["ImageFeatures", "VLPModel"]
