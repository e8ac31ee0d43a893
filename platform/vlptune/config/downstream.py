"""Downstream task configs: each finetuning task's own recipe section, registered by name (torch-free).

A recipe's ``downstream`` section maps a registered task name (``vqa``,
``nlvr2``, ``snli_ve``, ``retrieval``, ``captioning``) to its config;
``vlptune finetune CHECKPOINT --task NAME`` reads it from the pretraining
run's recipe (defaults, then ``-o downstream.NAME.field=value``). A search or
study trial whose recipe has this section, or whose metric is a
``downstream/<task>/<metric>`` one, finetunes its final pretraining checkpoint
on those tasks (:mod:`vlptune.search.trainable`, docs/finetuning.md).

Like objectives, a task has two halves under one name: its config here
(``class VQAConfig(TaskConfig, task="vqa")``) and its implementation in
:mod:`vlptune.downstream` (``@register("vqa")``). The optimiser defaults are
the papers' (SOHO's finetuning settings), written as epochs and decay epochs;
``max_steps`` > 0 replaces the epochs with a fixed budget (the decay epochs
then scale with it, as fractions of the run).

Every metric a task reports is named ``downstream/<task>/<metric>``
(:func:`metric_key`); its main one (``main_metric``) is what early stopping
and the best checkpoint read.

A named combination of several tasks' results (:data:`COMBINED_METRICS`) is
``downstream/combined/<name>``: a trial that finetunes reports every one
(:func:`combined_metrics`), so a search or study can rank by it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from vlptune.config.base import ConfigError, Section
from vlptune.errors import did_you_mean

DOWNSTREAM_PREFIX = "downstream/"
COMBINED_PREFIX = f"{DOWNSTREAM_PREFIX}combined/"
# The named combinations of the tasks a trial finetunes on, reported as downstream/combined/<name>.
COMBINED_METRICS = {
    "gain_over_chance": "mean over the trial's tasks of (main metric - its chance level) / chance level: "
    "each task's relative improvement over chance, averaged (NaN when a task failed or has no positive chance level)",
}
_TASKS: dict[str, type[TaskConfig]] = {}


def metric_key(task: str, metric: str) -> str:
    """The reported name of ``task``'s ``metric``: ``downstream/<task>/<metric>``."""
    return f"{DOWNSTREAM_PREFIX}{task}/{metric}"


class TaskConfig(Section):
    """Fields every downstream task has; a subclass names its task with ``task="name"``."""

    def __init_subclass__(cls, task: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if task is None:
            return
        existing = _TASKS.get(task)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"task {task!r}: two config classes ({existing.__qualname__} and {cls.__qualname__})")
        cls.task_name = task
        _TASKS[task] = cls

    task_name: ClassVar[str] = "task"
    table: ClassVar[str] = ""  # the data table it reads (vlptune.data.schema)
    main_metric: ClassVar[str] = ""  # early stopping, the best checkpoint, a search's downstream metric
    chance_metric: ClassVar[str] = ""  # the main metric's chance level (majority answer, random ranking)
    mode: ClassVar[Literal["max", "min"]] = "max"
    scores_pairs: ClassVar[bool] = False  # read by the loop's pair_scorer lookup: a task head never ranks retrieval
    generates_captions: ClassVar[bool] = False

    weight: float = Field(1.0, gt=0.0, le=100.0, description="multiplier of the task loss (1 = the paper's loss)")
    epochs: float = Field(10.0, gt=0.0, le=1000.0, description="finetuning epochs over the task's train split (used when max_steps = 0)")
    max_steps: int = Field(0, ge=0, le=100_000_000, description="finetuning budget in optimizer steps; 0 = epochs over the train split")
    batch_size: int = Field(32, ge=1, le=4096, description="task records per worker per step")
    lr: float = Field(1e-4, gt=0.0, le=10.0, description="peak learning rate of the Transformer side (fusion encoder and head)")
    backbone_lr: float = Field(0.0, ge=0.0, le=10.0, description="peak learning rate of the CNN; 0 = the pretraining recipe's")
    decay_epochs: list[float] = Field(
        default_factory=list, description="epochs at which the learning rate is multiplied by gamma (step schedule); empty = cosine"
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="learning-rate multiplier at each decay epoch")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine schedule (no decay_epochs): floor as a fraction of the peak")
    warmup_steps: int = Field(0, ge=0, le=10_000_000, description="linear warmup steps")
    eval_every: int = Field(0, ge=0, le=100_000_000, description="evaluate (early stopping, best checkpoint) every N steps; 0 = once per epoch")
    patience: int = Field(3, ge=0, le=10_000, description="stop after this many evaluations without a better main metric; 0 = never stop early")
    eval_records: int = Field(1000, ge=1, le=10_000_000, description="records of the evaluation split scored at each evaluation")
    train_split: str = Field("train", min_length=1, description="split the task finetunes on")
    eval_split: str = Field("val", min_length=1, description="split the task is evaluated on (early stopping and the reported metric)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the head's weights and the data order")

    @field_validator("decay_epochs")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(e <= 0 for e in v) or v != sorted(v):
            raise ValueError("must be increasing positive epochs")
        return v

    def decay_fractions(self) -> list[float]:
        """``decay_epochs`` as fractions of the run (the loop's step-schedule milestones); epochs past the end are dropped."""
        return [e / self.epochs for e in self.decay_epochs if e < self.epochs]


class PooledHeadMixin(Section):
    pooling: Literal["cls", "mean", "product"] = Field(
        "cls",
        description="what the head reads: 'cls' the fused [CLS] state (the papers); 'mean' the mean of the real text and image states; "
        "'product' the product of the mean text and mean image states (objectives.itm.pooling explains the choice)",
    )


class VQAConfig(TaskConfig, PooledHeadMixin, task="vqa"):
    """VQA: a two-layer MLP on the fused [CLS] over the answer vocabulary, BCE against soft scores (SOHO: 18 epochs, x0.1 at 12 and 16)."""

    table: ClassVar[str] = "vqa"
    main_metric: ClassVar[str] = "score"
    chance_metric: ClassVar[str] = "chance_score"

    epochs: float = Field(18.0, gt=0.0, le=1000.0, description="finetuning epochs over the train split (SOHO: 18)")
    decay_epochs: list[float] = Field(default_factory=lambda: [12.0, 16.0], description="epochs of the x gamma decays (SOHO: 12 and 16)")
    answers: int = Field(3129, ge=2, le=100_000, description="answer vocabulary: the most frequent answers of the train split (the VQA v2 convention: 3129)")
    hidden_mult: int = Field(2, ge=1, le=8, description="width of the MLP's hidden layer as a multiple of the encoder width")


class LabelTaskConfig(TaskConfig, PooledHeadMixin):
    """A classifier over one label per record, scored by accuracy against the train split's majority label."""

    main_metric: ClassVar[str] = "acc"
    chance_metric: ClassVar[str] = "chance_acc"


class NLVR2Config(LabelTaskConfig, task="nlvr2"):
    """NLVR2: the statement with each image through the encoder, the two pooled states concatenated, a binary classifier."""

    table: ClassVar[str] = "nlvr2"

    epochs: float = Field(10.0, gt=0.0, le=1000.0, description="finetuning epochs over the train split")
    decay_epochs: list[float] = Field(default_factory=lambda: [6.0, 8.0], description="epochs of the x gamma decays")


class SNLIVEConfig(LabelTaskConfig, task="snli_ve"):
    """SNLI-VE: a three-way classifier (entailment, neutral, contradiction) on the pooled state (SOHO: 6 epochs, 1e-4 -> 1e-5)."""

    table: ClassVar[str] = "ve"

    epochs: float = Field(6.0, gt=0.0, le=1000.0, description="finetuning epochs over the train split (SOHO: 6)")
    decay_epochs: list[float] = Field(default_factory=list, description="epochs of the x gamma decays; empty: cosine from lr to lr * min_lr_ratio")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine floor as a fraction of the peak (SOHO: 1e-4 -> 1e-5)")


class RetrievalConfig(TaskConfig, task="retrieval"):
    """Retrieval: ITM finetuned as binary classification against other captions of the batch, evaluated by ranking (SOHO: 1e-4, halved at 3/5/9/13)."""

    table: ClassVar[str] = "retrieval"
    main_metric: ClassVar[str] = "rsum"
    chance_metric: ClassVar[str] = "chance_rsum"

    epochs: float = Field(20.0, gt=0.0, le=1000.0, description="finetuning epochs over the train images")
    batch_size: int = Field(8, ge=1, le=4096, description="images per worker per step (each with data.itm_positives + itm_negatives captions)")
    decay_epochs: list[float] = Field(default_factory=lambda: [3.0, 5.0, 9.0, 13.0], description="epochs of the x gamma decays (SOHO: 3, 5, 9, 13)")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="learning-rate multiplier at each decay epoch (SOHO: halving)")
    negatives: Literal["random", "hard"] = Field(
        "random", description="'random': other images' captions of the batch (SOHO); 'hard': the most similar by VSC (MVPTR; needs objectives.vsc)"
    )
    eval_images: int = Field(1000, ge=2, le=1_000_000, description="test images ranked (COCO protocols: 1000 or 5000)")
    captions_per_image: int = Field(5, ge=1, le=32, description="captions per test image used as queries (COCO: 5)")
    candidates: int = Field(128, ge=0, le=100_000, description="re-rank only the top-N candidates of the cheap first pass; 0 = score every pair")
    eval_split: str = Field("test", min_length=1, description="split the ranking is evaluated on (a split with no records falls back to val)")


class CaptioningTaskConfig(TaskConfig, task="captioning"):
    """Captioning: the E2E-VLP decoder finetuned on the captions (teacher forcing), scored by BLEU-4 and CIDEr of greedy or beam captions."""

    table: ClassVar[str] = "image_text"
    main_metric: ClassVar[str] = "cider"
    chance_metric: ClassVar[str] = "chance_cider"
    generates_captions: ClassVar[bool] = True

    epochs: float = Field(10.0, gt=0.0, le=1000.0, description="finetuning epochs over the train images")
    batch_size: int = Field(8, ge=1, le=4096, description="images per worker per step (each with data.itm_positives captions)")
    decoder_layers: int = Field(
        0, ge=0, le=24, description="decoder layers when the pretraining recipe had no decoder; 0 = the pretrained one's, else 6 (E2E-VLP)"
    )
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0, description="label smoothing of the token cross-entropy")
    beam: int = Field(1, ge=1, le=32, description="beam size of the evaluation captions; 1 = greedy")
    eval_images: int = Field(200, ge=2, le=1_000_000, description="images of eval_split captioned at each evaluation (every caption of each a reference)")


def names() -> list[str]:
    """Every registered downstream task name, sorted."""
    return sorted(_TASKS)


def config_class(name: str) -> type[TaskConfig]:
    """The config class of task ``name``; ConfigError naming the known tasks otherwise."""
    if name not in _TASKS:
        raise ConfigError(f"downstream.{name}: unknown task {name!r}{did_you_mean(name, _TASKS)}; registered: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def validate_task(name: str, spec: Any) -> TaskConfig:
    """``spec`` (a mapping, None for the defaults, or a config) validated as task ``name``'s config."""
    cls = config_class(name)
    if isinstance(spec, cls):
        return spec
    return cls.model_validate(spec if spec is not None else {})


def main_metric_key(name: str) -> str:
    """``downstream/<task>/<main metric>`` of task ``name``."""
    return metric_key(name, config_class(name).main_metric)


def chance_metric_key(name: str) -> str:
    """``downstream/<task>/<chance metric>`` of task ``name``: its main metric's chance level."""
    return metric_key(name, config_class(name).chance_metric)


def downstream_columns(reported: Any, searched: str | None = None) -> list[str]:
    """The table columns of the downstream results among the keys ``reported``: each task's main metric
    (registered task order), the combinations, ``searched`` left out (it has its own column), then its chance level."""
    keys = set(reported)
    columns = [main_metric_key(t) for t in names() if main_metric_key(t) in keys and main_metric_key(t) != searched]
    columns += [key for key in combined_keys() if key in keys and key != searched]
    task = task_of_metric(searched) if searched and searched.startswith(DOWNSTREAM_PREFIX) else None
    if task and chance_metric_key(task) in keys:
        columns.append(chance_metric_key(task))
    return columns


def is_combined(metric: str | None) -> bool:
    """Is ``metric`` a named combination of several tasks' results (``downstream/combined/<name>``)?"""
    return bool(metric) and str(metric).startswith(COMBINED_PREFIX)


def check_combined(metric: str) -> str:
    """The name of the combination ``metric`` (``downstream/combined/<name>``); ConfigError naming the known ones otherwise."""
    name = metric[len(COMBINED_PREFIX) :]
    if name not in COMBINED_METRICS:
        raise ConfigError(
            f"unknown combined downstream metric {metric!r}{did_you_mean(name, COMBINED_METRICS)}; known: {', '.join(COMBINED_PREFIX + n for n in COMBINED_METRICS)}"
        )
    return name


def gain_over_chance(metrics: Mapping[str, Any], tasks: Iterable[str]) -> float:
    """:data:`COMBINED_METRICS` ``gain_over_chance`` of a trial's ``metrics`` over its ``tasks``."""
    gains = []
    for task in tasks:
        main, chance = metrics.get(main_metric_key(task)), metrics.get(chance_metric_key(task))
        if not isinstance(main, (int, float)) or not isinstance(chance, (int, float)) or not math.isfinite(main) or not math.isfinite(chance) or chance <= 0:
            return math.nan  # a failed task (NaN) or one without a chance level cannot be averaged away
        gains.append((main - chance) / chance)
    return sum(gains) / len(gains) if gains else math.nan


_COMBINERS = {"gain_over_chance": gain_over_chance}  # each name of COMBINED_METRICS -> how it is computed


def combined_keys() -> list[str]:
    """The reported names of the combinations: ``downstream/combined/<name>`` for each of :data:`COMBINED_METRICS`."""
    return [f"{COMBINED_PREFIX}{name}" for name in COMBINED_METRICS]


def combined_metrics(metrics: Mapping[str, Any], tasks: Iterable[str]) -> dict[str, float]:
    """Every named combination (:data:`COMBINED_METRICS`) of ``metrics`` (a trial's ``downstream/<task>/*`` results) over ``tasks``."""
    tasks = list(tasks)
    return {f"{COMBINED_PREFIX}{name}": _COMBINERS[name](metrics, tasks) for name in COMBINED_METRICS}


def task_of_metric(metric: str) -> str | None:
    """The task a ``downstream/<task>/...`` metric belongs to (ConfigError for an unknown task); None for other
    metrics and for a known combination of tasks (ConfigError for an unknown one)."""
    if not metric.startswith(DOWNSTREAM_PREFIX):
        return None
    if is_combined(metric):
        check_combined(metric)
        return None
    task = metric[len(DOWNSTREAM_PREFIX) :].split("/", 1)[0]
    config_class(task)
    return task
