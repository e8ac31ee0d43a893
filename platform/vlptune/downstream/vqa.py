"""VQA: a two-layer MLP on the pooled fused state over the answer vocabulary, BCE against soft scores.

The answer vocabulary is the ``answers`` most frequent answer strings of the
train split (every listed answer counts, whatever its score; the VQA v2
convention keeps 3129), in order of frequency. The target of a question is
the soft score of each of its answers in the vocabulary (the record's
``answers[].score``: 1 for the main answer, less for synonyms); the loss is
binary cross-entropy summed over the vocabulary and averaged over questions
(UNITER's and SOHO's ``bce * num_answers``).

Metrics (percent): ``score``, the VQA score (the soft score of the predicted
answer: 1 for the main answer, a synonym's score for a synonym, 0 otherwise);
``acc`` (the predicted answer is the main answer); the score per answer type
(``score_yes_no``, ``score_number``, ``score_other``, typed by the main
answer as the VQA API does); and ``chance_score``, the score of always
answering the train split's most frequent main answer (the majority answer).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlptune.config import Recipe
from vlptune.config.downstream import VQAConfig
from vlptune.data.info import DatasetInfo
from vlptune.downstream.base import PERCENT, RecordTask, TaskHead, mlp_head
from vlptune.downstream.registry import register
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import Objective, StepContext

YES_NO = ("yes", "no")
ANSWER_TYPES = ("yes_no", "number", "other")


def main_answer(record: dict[str, Any]) -> str:
    """The record's highest-scored answer (the first among ties)."""
    return str(max(record["answers"], key=lambda a: a["score"])["answer"])


def answer_type(answer: str) -> str:
    """yes/no, number or other, read from the main answer (as the VQA API types questions)."""
    if answer in YES_NO:
        return "yes_no"
    return "number" if answer.isdigit() else "other"


def answer_vocabulary(rows: list[dict[str, Any]], size: int) -> list[str]:
    """The ``size`` most frequent answers of ``rows`` (ties in order of first appearance)."""
    counts = Counter(str(a["answer"]) for r in rows for a in r["answers"])
    return [a for a, _ in counts.most_common(size)]


class VQAHead(TaskHead):
    metric_names = ("vqa_loss", "vqa_score")

    def __init__(self, cfg: VQAConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None, answers: int = 0):
        super().__init__(cfg, model, recipe, info)
        width = model.hidden_size
        self.head = mlp_head(width, width * cfg.hidden_mult, answers)

    def logits(self, batch: dict[str, Any], ctx: StepContext) -> Tensor:
        return self.head(self.pair_states(batch, ctx)[:, 0])

    def loss(self, logits: Tensor, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        target = batch["vqa_target"].float()
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="mean") * target.shape[1]
        picked = target.gather(1, logits.argmax(-1, keepdim=True)).mean() * PERCENT
        return loss, {"vqa_loss": loss.detach(), "vqa_score": picked.detach()}


@register("vqa")
class VQATask(RecordTask):
    head_cls = VQAHead
    cfg: VQAConfig

    def __init__(self, cfg: VQAConfig, recipe: Recipe, root: Path):
        super().__init__(cfg, recipe, root)
        self.answers = answer_vocabulary(self.train_rows, cfg.answers)
        self.index = {a: i for i, a in enumerate(self.answers)}
        self.majority = Counter(main_answer(r) for r in self.train_rows).most_common(1)[0][0]

    def heads(self, model: VLPModel, info: DatasetInfo) -> dict[str, Objective]:
        return {self.name: VQAHead(self.cfg, model, self.recipe, info, answers=len(self.answers))}

    def targets(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        target = torch.zeros(len(rows), len(self.answers))
        for i, r in enumerate(rows):
            for a in r["answers"]:
                j = self.index.get(str(a["answer"]))
                if j is not None:
                    target[i, j] = max(float(target[i, j]), float(a["score"]))
        return {"vqa_target": target}

    def score(self, rows: list[dict[str, Any]], predictions: list[int]) -> dict[str, float]:
        def soft(r: dict[str, Any], answer: str) -> float:
            return max((float(a["score"]) for a in r["answers"] if a["answer"] == answer), default=0.0)

        scores = [soft(r, self.answers[p]) for r, p in zip(rows, predictions)]
        out = {
            "score": PERCENT * sum(scores) / len(rows),
            "acc": PERCENT * sum(self.answers[p] == main_answer(r) for r, p in zip(rows, predictions)) / len(rows),
            "chance_score": PERCENT * sum(soft(r, self.majority) for r in rows) / len(rows),
            "records": float(len(rows)),
        }
        for kind in ANSWER_TYPES:
            picked = [s for r, s in zip(rows, scores) if answer_type(main_answer(r)) == kind]
            if picked:
                out[f"score_{kind}"] = PERCENT * sum(picked) / len(picked)
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"answers": self.answers, "majority_answer": self.majority}
