"""E2E-VLP object detection: DETR-style set prediction from the shared decoder.

The decoder (:mod:`vlptune.model.decoder`, shared with captioning) reads the
image-only encoder output (view ``"image_only"``: the image encoded with the
text reduced to ``[CLS] [SEP]``) with ``num_queries`` learned object queries.
Each query's output goes to three heads:

* class: a linear layer over ``num_classes + 1`` (the last is "no object");
* box: a 3-layer MLP and a sigmoid -> ``(cx, cy, w, h)`` normalised by the
  image's real size (the batch's ``obj_boxes`` convention);
* attributes: a linear layer over ``num_attributes``, multi-hot (BCE).

Per image, queries are matched one-to-one to the real objects with
:func:`vlptune.objectives.matching.hungarian_match` on DETR's cost
``cost_class * (-p(class)) + cost_bbox * L1 + cost_giou * (-GIoU)``. Losses
(DETR): class cross-entropy over every query (unmatched queries target "no
object", whose weight is ``eos_coef``), L1 and ``1 - GIoU`` over matched
boxes divided by the number of objects, plus the attributes' BCE over matched
queries; the total is ``class_weight * CE + bbox_weight * L1 + giou_weight *
GIoU + attr_weight * BCE``, summed over every decoder layer with
``aux_loss`` (DETR's auxiliary decoding losses; the heads are shared).

``num_classes`` / ``num_attributes`` = 0 read the sizes from the manifest of
``data.root`` (the training loop generates the data before the model).

Metrics (last decoder layer): ``det_loss`` (all layers), ``det_class_loss``,
``det_box_loss``, ``det_giou_loss``, ``det_attr_loss``, ``det_class_acc``
(matched queries whose arg-max class is the object's class), ``det_iou``
(mean IoU of matched boxes), and their chance levels ``det_class_chance`` and
``det_iou_chance``: the same numbers when each image's objects are matched
(with the same matcher) to the predictions made for ANOTHER image of the
batch (the next one). Matching picks the queries that fit best, so matched
accuracy and IoU are above zero even for a model that ignores the image; the
shuffled numbers are exactly what such a model gets, so the gap measures what
the detector reads from the image. A batch without any object yields only the
class loss (every query "no object") and leaves the matched metrics out; a
one-image batch leaves the chance levels out.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlptune.config import Recipe
from vlptune.config.objectives import DetectionConfig
from vlptune.data.info import DatasetInfo
from vlptune.model.decoder import (
    TransformerDecoder,
    get_or_create_decoder,
    image_only_memory,
    special_ids,
)
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import HEAD_INIT_STD, Objective, ObjectiveOutput, StepContext, init_head_weights, predicted
from vlptune.objectives.matching import batched_hungarian_match
from vlptune.objectives.registry import register

BOX_EPS = 1e-7  # guards divisions by box areas


# --------------------------------------------------------------------------- boxes


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)


def pairwise_iou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union of xyxy boxes ``a`` [..., N, 4] and ``b`` [..., M, 4] -> ([..., N, M], [..., N, M])."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter / union.clamp_min(BOX_EPS), union


def generalized_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise generalised IoU of xyxy boxes ``a`` [..., N, 4] and ``b`` [..., M, 4] -> [..., N, M] in [-1, 1]."""
    iou, union = pairwise_iou(a, b)
    lt = torch.minimum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull.clamp_min(BOX_EPS)


# --------------------------------------------------------------------------- sizes


class BoxMLP(nn.Sequential):
    """DETR's box head: 3 linear layers with ReLU, then 4 outputs (sigmoid applied by the caller)."""

    def __init__(self, hidden: int):
        super().__init__(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 4))


@register("detection")
class Detection(Objective):
    """DETR-style detection on the shared decoder; metrics listed in the module docstring."""

    cfg: DetectionConfig

    needs = ("images", "pixel_mask", "obj_labels", "obj_boxes", "obj_attrs")
    metric_names = (
        "det_loss",
        "det_class_loss",
        "det_box_loss",
        "det_giou_loss",
        "det_attr_loss",
        "det_class_acc",
        "det_class_chance",
        "det_iou",
        "det_iou_chance",
    )

    def __init__(self, cfg: DetectionConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cfg, model, recipe, info)
        self.num_classes, self.num_attributes = cfg.num_classes, cfg.num_attributes
        if cfg.num_classes == 0 or cfg.num_attributes == 0:  # 0: sized from the dataset's vocabularies
            info = self.require_info(info, ("objectives.detection.num_classes", "objectives.detection.num_attributes"))
            self.num_classes = cfg.num_classes or info.num_classes
            self.num_attributes = cfg.num_attributes or info.num_attributes
        self.ids = special_ids(recipe.data.tokenizer)
        self._model = (model,)  # not a sub-module: the model is registered once, by the Pretrainer
        get_or_create_decoder(model, cfg.decoder_layers, "detection")
        hidden = model.hidden_size
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, hidden) * HEAD_INIT_STD)
        self.class_head = nn.Linear(hidden, self.num_classes + 1)
        self.box_head = BoxMLP(hidden)
        self.attr_head = nn.Linear(hidden, self.num_attributes)
        init_head_weights(self)
        class_weight = torch.ones(self.num_classes + 1)
        class_weight[-1] = cfg.eos_coef
        self.register_buffer("class_loss_weight", class_weight, persistent=False)

    @property
    def decoder(self) -> TransformerDecoder:
        return self._model[0].decoder

    # ------------------------------------------------------------ prediction

    def predict(self, memory: Any) -> list[dict[str, Tensor]]:
        """Per decoder layer (last one last): ``logits`` [B,Q,C+1], ``boxes`` [B,Q,4] (cx,cy,w,h in 0..1), ``attrs`` [B,Q,A] logits."""
        b = memory.states.shape[0]
        queries = self.queries.to(memory.states.dtype)[None].expand(b, -1, -1)
        layers = self.decoder(queries, memory.states, memory.mask, return_intermediate=True)
        if not self.cfg.aux_loss:
            layers = layers[-1:]
        return [{"logits": self.class_head(h), "boxes": self.box_head(h).sigmoid(), "attrs": self.attr_head(h)} for h in layers]

    @torch.no_grad()
    def match(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor, counts: Tensor) -> list[tuple[Tensor, Tensor]]:
        """DETR's Hungarian matching per image. ``labels`` [B,O] / ``target_boxes`` [B,O,4] with the ``counts[b]`` real objects first."""
        prob = logits.float().softmax(-1)  # [B,Q,C+1]
        safe = labels.clamp_min(0)
        cost_class = -torch.gather(prob, 2, safe[:, None, :].expand(-1, prob.shape[1], -1))  # [B,Q,O]
        cost_bbox = torch.cdist(boxes.float(), target_boxes.float(), p=1)
        cost_giou = -generalized_iou(box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(target_boxes.float()))
        cfg = self.cfg
        cost = cfg.cost_class * cost_class + cfg.cost_bbox * cost_bbox + cfg.cost_giou * cost_giou
        return batched_hungarian_match(cost, counts)

    def layer_losses(
        self, pred: dict[str, Tensor], labels: Tensor, boxes: Tensor, attrs: Tensor, counts: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        logits, pboxes, pattrs = pred["logits"].float(), pred["boxes"].float(), pred["attrs"].float()
        b, q, _ = logits.shape
        device = logits.device
        matches = self.match(logits, pboxes, labels, boxes, counts)
        batch_idx = torch.cat([torch.full_like(r, i) for i, (r, _) in enumerate(matches)]).to(device)
        query_idx = torch.cat([r for r, _ in matches]).to(device)
        target_idx = torch.cat([c for _, c in matches]).to(device)
        target_classes = torch.full((b, q), self.num_classes, dtype=torch.int64, device=device)
        matched_labels = labels[batch_idx, target_idx]
        target_classes[batch_idx, query_idx] = matched_labels
        class_loss = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=self.class_loss_weight.to(device))
        parts = {"class": class_loss}
        extra: dict[str, Tensor] = {}
        n = query_idx.numel()
        if n == 0:
            zero = logits.new_zeros(())
            parts.update({"box": zero, "giou": zero, "attr": zero})
            return parts, extra
        num_boxes = float(n)
        src = pboxes[batch_idx, query_idx]
        tgt = boxes[batch_idx, target_idx].float()
        parts["box"] = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        src_xyxy, tgt_xyxy = box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)
        giou = torch.diagonal(generalized_iou(src_xyxy, tgt_xyxy))
        parts["giou"] = (1.0 - giou).sum() / num_boxes
        parts["attr"] = F.binary_cross_entropy_with_logits(pattrs[batch_idx, query_idx], attrs[batch_idx, target_idx].float())
        with torch.no_grad():
            extra["class_acc"] = (predicted(logits[batch_idx, query_idx]) == matched_labels).float().mean()
            extra["iou"] = torch.diagonal(pairwise_iou(src_xyxy, tgt_xyxy)[0]).mean()
        return parts, extra

    @torch.no_grad()
    def chance_levels(self, pred: dict[str, Tensor], labels: Tensor, boxes: Tensor, counts: Tensor) -> dict[str, Tensor]:
        """Matched class accuracy and IoU of each image's objects against the next image's predictions."""
        b = labels.shape[0]
        if b < 2 or int(counts.sum()) == 0:
            return {}
        shift = torch.roll(torch.arange(b, device=labels.device), -1)  # image i is scored on image i+1's predictions
        logits, pboxes = pred["logits"].float()[shift], pred["boxes"].float()[shift]
        matches = self.match(logits, pboxes, labels, boxes, counts)
        batch_idx = torch.cat([torch.full_like(r, i) for i, (r, _) in enumerate(matches)]).to(labels.device)
        query_idx = torch.cat([r for r, _ in matches]).to(labels.device)
        target_idx = torch.cat([c for _, c in matches]).to(labels.device)
        hit = predicted(logits[batch_idx, query_idx]) == labels[batch_idx, target_idx]
        iou = pairwise_iou(box_cxcywh_to_xyxy(pboxes[batch_idx, query_idx]), box_cxcywh_to_xyxy(boxes[batch_idx, target_idx].float()))[0]
        return {"class_chance": hit.float().mean(), "iou_chance": torch.diagonal(iou).mean()}

    # ------------------------------------------------------------ forward

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        labels = batch["obj_labels"]
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise ValueError(f"objective 'detection': obj_labels holds class {int(labels.max())} but objectives.detection.num_classes={self.num_classes}")
        if batch["obj_attrs"].shape[-1] != self.num_attributes:
            raise ValueError(
                f"objective 'detection': obj_attrs has {batch['obj_attrs'].shape[-1]} attributes but objectives.detection.num_attributes={self.num_attributes}"
            )
        valid = labels >= 0
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # real objects first, in their order
        labels = labels.gather(1, order)
        boxes = batch["obj_boxes"].gather(1, order[..., None].expand(-1, -1, 4))
        attrs = batch["obj_attrs"].gather(1, order[..., None].expand(-1, -1, batch["obj_attrs"].shape[-1]))
        counts = valid.sum(1)

        images = ctx.images
        memory = ctx.view("image_only", lambda: image_only_memory(ctx.model, images.feats, images.grid_mask, self.ids))
        cfg = self.cfg
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        extra: dict[str, Tensor] = {}
        preds = self.predict(memory)
        for pred in preds:
            parts, extra = self.layer_losses(pred, labels, boxes, attrs, counts)
            layer = cfg.class_weight * parts["class"] + cfg.bbox_weight * parts["box"] + cfg.giou_weight * parts["giou"] + cfg.attr_weight * parts["attr"]
            total = layer if total is None else total + layer
        assert total is not None
        metrics: dict[str, Tensor | float] = {
            "det_loss": total.detach(),
            "det_class_loss": parts["class"].detach(),
        }
        if extra:  # the batch had objects: matched metrics of the last layer
            metrics.update(
                {
                    "det_box_loss": parts["box"].detach(),
                    "det_giou_loss": parts["giou"].detach(),
                    "det_attr_loss": parts["attr"].detach(),
                    "det_class_acc": extra["class_acc"],
                    "det_iou": extra["iou"],
                }
            )
            metrics.update({f"det_{k}": v for k, v in self.chance_levels(preds[-1], labels, boxes, counts).items()})
        return ObjectiveOutput(total, metrics)


__all__ = ["Detection", "DetectionConfig", "box_cxcywh_to_xyxy", "generalized_iou", "pairwise_iou"]
