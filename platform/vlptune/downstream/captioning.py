"""Captioning: the E2E-VLP decoder finetuned on the captions, scored by BLEU-4 and CIDEr (pycocoevalcap's scorers).

Finetuning trains the captioning objective alone (:class:`vlptune.objectives.captioning.Captioning`:
teacher forcing on the positive captions of the pretraining batches, label
smoothing) with its head and the shared decoder carried over from the
pretrained checkpoint when it had them (their depth is then the pretrained
one); otherwise a fresh decoder of ``decoder_layers`` (default 6, E2E-VLP).

Evaluation captions the first ``eval_images`` images of ``eval_split``
(greedy, or beam search with ``beam``) and scores them against every caption
of the image with pycocoevalcap's BLEU and CIDEr-D implementations (the
standard ones; neither needs Java: captions are lower-cased and split into
words here instead of by the PTB tokenizer). Metrics (BLEU in percent, CIDEr
x 100 as the papers print it): ``bleu4``, ``cider``, ``bleu1``, and their
chance levels ``chance_bleu4`` / ``chance_cider``: another image's first
caption scored against this image's references (the caption a model that
ignores the image would write at best).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from torch.utils.data import DataLoader

from vlptune.config.downstream import CaptioningTaskConfig
from vlptune.config.objectives import DECODER_FIELD, CaptioningConfig
from vlptune.data.collate import pad_images
from vlptune.data.dataset import ShardDataset, build_loader
from vlptune.data.info import DatasetInfo
from vlptune.data.text import load_tokenizer
from vlptune.downstream.base import PERCENT, DownstreamTask
from vlptune.downstream.registry import register
from vlptune.grid import grid_stride
from vlptune.model.decoder import image_only_memory
from vlptune.model.vlp import VLPModel
from vlptune.objectives import registry as objectives
from vlptune.objectives.base import Objective, Pretrainer

CAPTIONING = "captioning"
E2E_VLP_DECODER_LAYERS = 6
BLEU_ORDER = 4
WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> str:
    """Lower-cased words separated by one space (what pycocoevalcap's scorers expect, without the Java tokenizer)."""
    return " ".join(WORD.findall(text.lower()))


def caption_scores(captions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-1, BLEU-4 (percent) and CIDEr-D (x 100) of ``captions[i]`` against ``references[i]``."""
    gts = {str(i): [words(r) for r in refs] for i, refs in enumerate(references)}
    res = {str(i): [words(c) or "."] for i, c in enumerate(captions)}  # an empty caption still scores (zero)
    bleu, _ = Bleu(BLEU_ORDER).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu1": PERCENT * float(bleu[0]), "bleu4": PERCENT * float(bleu[BLEU_ORDER - 1]), "cider": PERCENT * float(cider)}


@register(CAPTIONING)
class CaptioningTask(DownstreamTask):
    cfg: CaptioningTaskConfig

    def objective_config(self) -> CaptioningConfig:
        """The pretraining recipe's captioning settings (its decoder depth) with this task's loss; E2E-VLP's otherwise."""
        pretrained = [cfg for cfg in self.recipe.active_objectives().values() if hasattr(cfg, DECODER_FIELD)]
        layers = getattr(pretrained[0], DECODER_FIELD) if pretrained else self.cfg.decoder_layers or E2E_VLP_DECODER_LAYERS
        return CaptioningConfig(weight=self.cfg.weight, label_smoothing=self.cfg.label_smoothing, decoder_layers=layers)

    def heads(self, model: VLPModel, info: DatasetInfo) -> dict[str, Objective]:
        return {CAPTIONING: objectives.get(CAPTIONING).impl(self.objective_config(), model, self.recipe, info)}

    def loader(self, rank: int, world_size: int) -> DataLoader:
        return build_loader(self.recipe, split=self.cfg.train_split, rank=rank, world_size=world_size, train=True)

    @torch.no_grad()
    def evaluate(self, pretrainer: Pretrainer, device: torch.device) -> dict[str, float]:
        """Caption the first ``eval_images`` images of ``eval_split`` and score them (module docstring); on one rank."""
        cfg, recipe = self.cfg, self.recipe
        captioner: Any = pretrainer.objectives[CAPTIONING]
        dataset = ShardDataset(recipe, cfg.eval_split, train=False)
        samples = [s for s in (dataset[i] for i in range(min(cfg.eval_images, len(dataset)))) if not s.get("corrupt")]
        tokenizer = load_tokenizer(recipe.data.tokenizer)
        banned = tuple(sorted(set(tokenizer.all_special_ids) - {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}))
        stride = grid_stride(recipe.model.backbone.pool)
        was_training = pretrainer.training
        pretrainer.eval()
        captions: list[str] = []
        try:
            for s in range(0, len(samples), cfg.batch_size):
                chunk = samples[s : s + cfg.batch_size]
                images, pixel_mask, _ = pad_images([x["image"] for x in chunk], stride)
                feats = pretrainer.model.encode_images(images.to(device), pixel_mask.to(device))
                memory = image_only_memory(pretrainer.model, feats.feats, feats.grid_mask, captioner.ids)
                tokens = captioner.generate(memory, beam=cfg.beam, banned=banned)
                captions.extend(tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens)
        finally:
            pretrainer.train(was_training)
        references = [list(x["captions"]) for x in samples]
        metrics = caption_scores(captions, references)
        shuffled = [refs[0] for refs in references[1:] + references[:1]]
        chance = caption_scores(shuffled, references)
        metrics.update({"chance_bleu4": chance["bleu4"], "chance_cider": chance["cider"], "images": float(len(samples))})
        metrics["mean_words"] = sum(len(c.split()) for c in captions) / max(1, len(captions))
        return metrics

    def extra_state(self) -> dict[str, Any]:
        return {"decoder_layers": self.objective_config().decoder_layers}
