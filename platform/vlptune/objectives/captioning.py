"""E2E-VLP image captioning: left-to-right generation of the caption from the image.

Not a copy task: the decoder's memory is the encoder run on the image alone
(view ``"image_only"``: text reduced to ``[CLS] [SEP]``, see
:mod:`vlptune.model.decoder`), so the caption never reaches the decoder
through the encoder; the decoder sees only the caption's own prefix, through
a causal mask.

For every positive pair, the decoder input is the caption ``[CLS] w1 .. wn``
and the target is ``w1 .. wn [SEP]`` (teacher forcing; [CLS] is the start
token, [SEP] the end token). Token inputs are embedded with the fusion BERT's
own embeddings (word + position, shared with the encoder); the output head is
BERT's prediction transform and a decoder tied to the word embeddings (as in
MLM) plus a bias. Loss: cross-entropy with label smoothing
(``label_smoothing``), padding ignored.

The decoder itself is shared with detection (``model.decoder``).

Metrics: ``cap_loss``, ``cap_acc`` (next-token accuracy under teacher
forcing), ``cap_chance`` (share of the batch's most frequent target token:
what always answering that token would get).

:meth:`Captioning.generate` decodes captions for images (greedy or beam
search); ``vlptune caption`` uses it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlptune.config import Recipe
from vlptune.config.objectives import CaptioningConfig
from vlptune.data.info import DatasetInfo
from vlptune.model.decoder import (
    DecoderMemory,
    TransformerDecoder,
    beam_search,
    get_or_create_decoder,
    image_only_memory,
    special_ids,
)
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import Objective, ObjectiveOutput, PredictionTransform, StepContext, accuracy
from vlptune.objectives.registry import register

IGNORE_INDEX = -100


@register("captioning")
class Captioning(Objective):
    """Caption generation on positive pairs; metrics ``cap_loss``, ``cap_acc``, ``cap_chance``."""

    cfg: CaptioningConfig

    needs = ("images", "pixel_mask", "text_ids", "text_mask", "itm_labels", "pair_image")
    metric_names = ("cap_loss", "cap_acc", "cap_chance")

    def __init__(self, cfg: CaptioningConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cfg, model, recipe, info)
        self.ids = special_ids(recipe.data.tokenizer)
        self._model = (model,)  # not a sub-module: the model is registered once, by the Pretrainer
        get_or_create_decoder(model, cfg.decoder_layers, "captioning")
        embeddings = model.word_embeddings
        self.transform = PredictionTransform(model.hidden_size)
        self.bias = nn.Parameter(embeddings.weight.new_zeros(embeddings.num_embeddings))
        self.max_len = int(recipe.data.max_text_len)

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    @property
    def decoder(self) -> TransformerDecoder:
        return self.model.decoder

    def logits(self, states: Tensor) -> Tensor:
        """Vocabulary logits of decoder states ``[..., D]`` (decoder tied to the word embeddings)."""
        return F.linear(self.transform(states), self.model.word_embeddings.weight, self.bias)

    def decode(self, ids: Tensor, mask: Tensor | None, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """Decoder states [N,L,D] of token prefixes ``ids`` [N,L] over ``memory`` [N,S,D] (causal)."""
        tokens = self.model.fusion.embed_text(ids)
        return self.decoder(tokens, memory, memory_mask, mask, causal=True)

    def memory(self, batch: dict[str, Any], ctx: StepContext) -> DecoderMemory:
        images = ctx.images
        return ctx.view("image_only", lambda: image_only_memory(ctx.model, images.feats, images.grid_mask, self.ids))

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        rows = ctx.positive_rows
        memory = self.memory(batch, ctx)
        if rows.numel() == 0:
            return ObjectiveOutput(self.zero_loss(memory.states), {})
        image = batch["pair_image"][rows]
        mask = batch["text_mask"][rows]
        length = int(mask.sum(1).max())
        ids = batch["text_ids"][rows, :length]
        mask = mask[:, :length]
        inputs, input_mask = ids[:, :-1], mask[:, :-1]
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        states = self.decode(inputs, input_mask, memory.states[image], memory.mask[image])
        picked = targets != IGNORE_INDEX
        logits = self.logits(states[picked]).float()
        target = targets[picked]
        loss = F.cross_entropy(logits, target, label_smoothing=self.cfg.label_smoothing)
        chance = torch.bincount(target).max().float() / target.numel()
        return ObjectiveOutput(loss, {"cap_loss": loss.detach(), "cap_acc": accuracy(logits, target), "cap_chance": chance.detach()})

    # ------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        memory: DecoderMemory,
        beam: int = 1,
        max_len: int | None = None,
        length_penalty: float = 1.0,
        banned: tuple[int, ...] = (),
    ) -> list[list[int]]:
        """Captions (token ids without [CLS]/[SEP]) for every image of ``memory``; ``beam=1`` is greedy.

        ``max_len`` counts [CLS] and [SEP] (default ``data.max_text_len``).
        """
        max_len = max_len or self.max_len
        states, mask = memory.states, memory.mask

        def step(prefix: Tensor, source: Tensor) -> Tensor:
            out = self.decode(prefix, None, states[source], mask[source])
            return F.log_softmax(self.logits(out[:, -1]).float(), dim=-1)

        return beam_search(
            step,
            rows=states.shape[0],
            bos=self.ids.cls,
            eos=self.ids.sep,
            pad=self.ids.pad,
            max_len=max_len,
            beam=beam,
            length_penalty=length_penalty,
            banned=banned,
            device=states.device,
        )


__all__ = ["Captioning", "CaptioningConfig"]
