"""Retrieval: ITM finetuned as binary classification, scored by ranking the test images and captions.

Finetuning is SOHO's: the pretraining batches (:func:`vlptune.data.dataset.build_loader`,
``batch_size`` images each with ``data.itm_positives`` matching captions and
``data.itm_negatives`` captions of other images of the batch) and the ITM
objective alone, its head and pooling carried over from the pretrained
checkpoint when it had one. ``negatives: hard`` picks each image's negatives
among the batch's captions by MVPTR's VSC similarities (the pretraining recipe
must have trained ``vsc``).

Evaluation ranks the first ``eval_images`` images of ``eval_split`` (COCO's
1k and 5k protocols) with ``captions_per_image`` captions each through the
loop's retrieval evaluation (:func:`vlptune.train.evaluate.evaluate_retrieval`,
with the re-ranking of the top ``candidates``): TR/IR R@1/5/10 and RSUM in
percent, with their chance levels.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from vlptune.config import ConfigError, Recipe
from vlptune.config.downstream import RetrievalConfig
from vlptune.config.objectives import ITMConfig
from vlptune.data.dataset import build_loader
from vlptune.data.info import DatasetInfo
from vlptune.data.schema import TABLE_IMAGE_TEXT
from vlptune.data.shards import list_shards
from vlptune.downstream.base import DownstreamTask
from vlptune.downstream.registry import register
from vlptune.model.vlp import VLPModel
from vlptune.objectives import registry as objectives
from vlptune.objectives.base import Objective

ITM = "itm"


@register("retrieval")
class RetrievalTask(DownstreamTask):
    cfg: RetrievalConfig

    def itm_config(self) -> ITMConfig:
        """The pretraining recipe's ITM settings (pooling) with this task's negatives; SOHO's when it had no ITM."""
        pretrained = self.recipe.objectives.get(ITM)
        fields: dict[str, Any] = {"pooling": pretrained.pooling} if isinstance(pretrained, ITMConfig) else {}
        return ITMConfig(weight=self.cfg.weight, negatives=self.cfg.negatives, **fields)

    def heads(self, model: VLPModel, info: DatasetInfo) -> dict[str, Objective]:
        heads: dict[str, Objective] = {ITM: objectives.get(ITM).impl(self.itm_config(), model, self.recipe, info)}
        if self.cfg.negatives == "hard":
            vsc = self.recipe.objectives.get("vsc")
            if vsc is None or vsc.weight <= 0:
                raise ConfigError("downstream.retrieval.negatives=hard picks negatives by VSC similarities: the pretraining recipe must train objectives.vsc")
            heads["vsc"] = objectives.get("vsc").impl(vsc, model, self.recipe, info)
        return heads

    def loader(self, rank: int, world_size: int) -> DataLoader:
        return build_loader(self.recipe, split=self.cfg.train_split, rank=rank, world_size=world_size, train=True)

    def ranking_recipe(self) -> Recipe:
        """The recipe the loop's retrieval evaluation reads: this task's split, images, captions and candidates."""
        cfg = self.cfg
        split = cfg.eval_split if list_shards(self.root, TABLE_IMAGE_TEXT, cfg.eval_split) else self.recipe.data.val_split
        data = self.recipe.data.model_copy(update={"val_split": split})
        ev = self.recipe.eval.model_copy(update={"max_images": cfg.eval_images, "captions_per_image": cfg.captions_per_image, "candidates": cfg.candidates})
        return self.recipe.model_copy(update={"data": data, "eval": ev})
