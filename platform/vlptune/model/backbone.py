"""The CNN on raw pixels (a HF ``transformers`` ResNet) and its projection to a grid.

Two modules, so that optimiser groups follow module boundaries:

* :class:`ResNetBackbone` is *only* the CNN (stem + 4 stages). Every parameter
  in it belongs to the ``backbone`` optimiser group (SOHO: SGD).
* :class:`GridProjection` is the 1x1 convolution from the CNN's channels to the
  Transformer width followed by a ``pool`` x ``pool`` max-pool (stride ``pool``,
  ceil mode). It belongs to the ``transformer`` optimiser group (AdamW): it is
  trained with the Transformer and keeps learning while the CNN is frozen.

The output grid of an ``H x W`` image is ``grid_shape(H, W, grid_stride(pool))``
(see :mod:`vlptune.grid`): every strided layer of a ResNet rounds up
(``ceil``), and the max-pool runs in ceil mode.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import ResNetConfig, ResNetModel
from transformers.utils import logging as hf_logging

from vlptune.config import BackboneConfig
from vlptune.config.recipe import CACHED_BACKBONE
from vlptune.grid import grid_shape, grid_stride

# depth -> (blocks per stage, layer type); channel counts below are the
# standard torchvision / microsoft/resnet-* ones at width_mult = 1.
RESNET_SPECS: dict[int, tuple[tuple[int, int, int, int], str]] = {
    18: ((2, 2, 2, 2), "basic"),
    34: ((3, 4, 6, 3), "basic"),
    50: ((3, 4, 6, 3), "bottleneck"),
    101: ((3, 4, 23, 3), "bottleneck"),
    152: ((3, 8, 36, 3), "bottleneck"),
}
STEM_CHANNELS = 64
BASIC_CHANNELS = (64, 128, 256, 512)
BOTTLENECK_CHANNELS = (256, 512, 1024, 2048)
BOTTLENECK_REDUCTION = 4  # the inner 3x3 of a bottleneck has out_channels // 4 channels


def _scale(channels: int, width_mult: float, minimum: int) -> int:
    return max(minimum, int(round(channels * width_mult)))


def resnet_config(depth: int, width_mult: float = 1.0) -> ResNetConfig:
    """The HF ``ResNetConfig`` of a standard ResNet-``depth`` with every channel count scaled by ``width_mult``."""
    if depth not in RESNET_SPECS:
        raise ValueError(f"model.backbone.depth: {depth} is not a supported ResNet depth; allowed: {sorted(RESNET_SPECS)}")
    depths, layer_type = RESNET_SPECS[depth]
    base = BASIC_CHANNELS if layer_type == "basic" else BOTTLENECK_CHANNELS
    minimum = 1 if layer_type == "basic" else BOTTLENECK_REDUCTION
    hidden = [_scale(c, width_mult, minimum) for c in base]
    return ResNetConfig(
        num_channels=3,
        embedding_size=_scale(STEM_CHANNELS, width_mult, 1),
        hidden_sizes=hidden,
        depths=list(depths),
        layer_type=layer_type,
        hidden_act="relu",
        downsample_in_first_stage=False,
    )


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def from_pretrained_or_explain(model_cls: Any, init: str, field: str, what: str, builtin: str = "", **kwargs: Any) -> Any:
    """``model_cls.from_pretrained(init)`` for a local directory or a hub name; a clear ``ValueError`` otherwise.

    ``field`` is the dotted recipe field (for the message), ``what`` names the
    expected checkpoint kind ("HF ResNet", "HF BERT"), ``builtin`` the
    offline alternative the field also accepts ("'random'", "'minilm'").
    """
    kwargs.setdefault("dtype", torch.float32)
    with _no_loading_bar():
        return _from_pretrained(model_cls, init, field, what, builtin, **kwargs)


@contextlib.contextmanager
def _no_loading_bar():
    """No "Loading weights" progress bar on the console (one per worker and trial of a search)."""

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _from_pretrained(model_cls: Any, init: str, field: str, what: str, builtin: str, **kwargs: Any) -> Any:
    if os.path.isdir(init):
        try:
            return model_cls.from_pretrained(init, local_files_only=True, **kwargs)
        except Exception as exc:
            raise ValueError(
                f"{field}: {init!r} is a directory but does not hold a loadable {what} checkpoint "
                f"(config.json + model.safetensors or pytorch_model.bin): {type(exc).__name__}: {exc}"
            ) from exc
    try:
        return model_cls.from_pretrained(init, **kwargs)
    except Exception as exc:
        flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        offline = any(os.environ.get(f, "") not in ("", "0", "false", "False") for f in flags)
        why = "the hub is switched off here by HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE" if offline else "no hub reachable, or no such model on it"
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(
            f"{field}: {init!r} is not a local directory and could not be loaded as a hub name ({why}). "
            f"Give {builtin + ' or ' if builtin else ''}a local directory holding a {what} checkpoint instead (config.json + weights, e.g. written by "
            f"save_pretrained or a downloaded hub snapshot). Cause: {type(exc).__name__}: {first_line}"
        ) from exc


def _check_architecture(model: ResNetModel, expected: ResNetConfig, cfg: BackboneConfig) -> None:
    got = model.config
    problems = []
    if list(got.depths) != list(expected.depths) or got.layer_type != expected.layer_type:
        problems.append(
            f"depths {list(got.depths)} / {got.layer_type} (model.backbone.depth={cfg.depth} expects {list(expected.depths)} / {expected.layer_type})"
        )
    if list(got.hidden_sizes) != list(expected.hidden_sizes) or got.embedding_size != expected.embedding_size:
        problems.append(
            f"channels stem {got.embedding_size}, stages {list(got.hidden_sizes)} "
            f"(model.backbone.width_mult={cfg.width_mult} expects stem {expected.embedding_size}, stages {list(expected.hidden_sizes)})"
        )
    if problems:
        raise ValueError(f"model.backbone.init: checkpoint {cfg.init!r} does not match the configured ResNet: " + "; ".join(problems))


class ResNetBackbone(nn.Module):
    """A ResNet trunk (no classifier, no global pool) built with HF ``transformers``.

    ``forward(images [B,3,H,W]) -> [B, out_channels, ceil(H/32), ceil(W/32)]``.

    Freezing, three independent mechanisms:

    * ``frozen_bn``: every BatchNorm stays in eval mode (running statistics are
      used and never updated) and its affine parameters get ``requires_grad=False``.
    * ``frozen_stages = n``: the stem and stages 1..n get ``requires_grad=False``
      and their BatchNorms stay in eval mode, for the whole run.
    * :meth:`set_frozen` (the freeze schedule, SOHO's cure for VD cold start):
      while frozen, the whole CNN runs under ``torch.no_grad()`` (its parameters
      receive no gradient: ``.grad`` stays ``None``) and every BatchNorm is in
      eval mode. ``requires_grad`` is left untouched, so an optimiser or a DDP
      wrapper built before unfreezing still covers these parameters (DDP needs
      ``find_unused_parameters=True`` while the CNN is frozen).

    All three survive ``model.train()``: :meth:`train` re-applies them.
    """

    def __init__(self, cfg: BackboneConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = cfg or BackboneConfig()
        if overrides:  # validated like a recipe field
            cfg = BackboneConfig(**{**cfg.model_dump(), **overrides})
        self.cfg = cfg
        expected = resnet_config(cfg.depth, cfg.width_mult)
        if cfg.init == "random":
            self.resnet = ResNetModel(expected)
        elif cfg.init == CACHED_BACKBONE:
            raise ValueError(
                f"model.backbone.init: {CACHED_BACKBONE!r} names the backbone pretrained on the recipe's data and cached under data.root/backbones; "
                "the training loop resolves it to that directory (vlptune.train.backbone_pretrain.resolve_cached_backbone): call that first, "
                "or give the directory written by `vlptune backbone pretrain`"
            )
        else:
            self.resnet = from_pretrained_or_explain(ResNetModel, cfg.init, "model.backbone.init", "HF ResNet", builtin="'random'")
            _check_architecture(self.resnet, expected, cfg)
        self.resnet.pooler = nn.Identity()  # unused; no global pool in a grid backbone
        self.out_channels: int = int(self.resnet.config.hidden_sizes[-1])
        self.frozen_bn = cfg.frozen_bn
        self.frozen_stages = cfg.frozen_stages
        self._frozen = False
        for module in self._frozen_stage_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        if self.frozen_bn:
            for m in self.resnet.modules():
                if _is_batchnorm(m):
                    for p in m.parameters():
                        p.requires_grad_(False)
        self.channels_last = cfg.channels_last
        if self.channels_last:  # weights stored NHWC; .to(device) later keeps the layout
            self.resnet.to(memory_format=torch.channels_last)
        self.train(self.training)

    # ------------------------------------------------------------------ parts

    @property
    def stages(self) -> list[nn.Module]:
        """[stem, stage1, stage2, stage3, stage4]."""
        return [self.resnet.embedder, *self.resnet.encoder.stages]

    def _frozen_stage_modules(self) -> list[nn.Module]:
        # frozen_stages = n freezes the stem plus stages 1..n
        return self.stages[: self.frozen_stages + 1] if self.frozen_stages > 0 else []

    # --------------------------------------------------------------- freezing

    @property
    def frozen(self) -> bool:
        """Whether the whole CNN is frozen by the freeze schedule."""
        return self._frozen

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (``True``) or release (``False``) the whole CNN (freeze schedule)."""
        self._frozen = bool(frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> ResNetBackbone:
        super().train(mode)
        if not mode:
            return self
        if self._frozen:
            for m in self.resnet.modules():
                m.eval()
            return self
        for module in self._frozen_stage_modules():
            module.eval()
        if self.frozen_bn:
            for m in self.resnet.modules():
                if _is_batchnorm(m):
                    m.eval()
        return self

    # ---------------------------------------------------------------- forward

    def forward(self, images: Tensor) -> Tensor:
        if self._frozen:
            with torch.no_grad():
                return self._run(images)
        return self._run(images)

    def _run(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"backbone expects images [B,3,H,W], got {tuple(images.shape)}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        x = self.resnet.embedder(images)
        for stage in self.resnet.encoder.stages:
            x = stage(x)
        return x


class GridProjection(nn.Module):
    """1x1 conv from CNN channels to the Transformer width, then a ``pool`` x ``pool`` max-pool (stride ``pool``, ceil mode)."""

    def __init__(self, in_channels: int, out_channels: int, pool: int) -> None:
        super().__init__()
        if pool < 1:
            raise ValueError(f"model.backbone.pool: must be >= 1, got {pool}")
        self.pool = int(pool)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.pool > 1:
            x = F.max_pool2d(x, kernel_size=self.pool, stride=self.pool, ceil_mode=True)
        return x


def grid_mask_from_pixels(pixel_mask: Tensor, stride: int) -> Tensor:
    """bool [B,H,W] (True on real pixels) -> bool [B, ceil(H/stride), ceil(W/stride)].

    A cell is real when it covers at least one real pixel (the same rule the
    collate uses for ``grid_mask``).
    """
    if pixel_mask.dim() != 3:
        raise ValueError(f"pixel_mask must be [B,H,W], got {tuple(pixel_mask.shape)}")
    b, h, w = pixel_mask.shape
    gh, gw = grid_shape(h, w, stride)
    m = pixel_mask.bool()
    pad_h, pad_w = gh * stride - h, gw * stride - w
    if pad_h or pad_w:
        m = F.pad(m, (0, pad_w, 0, pad_h), value=False)
    return m.view(b, gh, stride, gw, stride).any(dim=4).any(dim=2)


def expected_grid(height: int, width: int, pool: int) -> tuple[int, int]:
    """Grid (gh, gw) that :class:`ResNetBackbone` + :class:`GridProjection` produce for an ``height x width`` input."""
    return grid_shape(height, width, grid_stride(pool))


__all__ = [
    "GridProjection",
    "RESNET_SPECS",
    "ResNetBackbone",
    "expected_grid",
    "from_pretrained_or_explain",
    "grid_mask_from_pixels",
    "resnet_config",
]
