"""What every pretext task shares: the base class, the per-step context, the set of objectives.

An objective (``vlptune.objectives.mlm``, ``itm``, ``mvm``, ...) is an
``nn.Module`` that owns its head, computes its loss and its metrics from the
batch, and declares the batch keys it reads (``needs``). It never calls the
backbone itself: the :class:`StepContext` runs the CNN once per image per step
(``ctx.images``) and caches fusion passes by name (``ctx.view``), so two
objectives that need the same input (say, ITM and a future phrase-region
alignment on clean text and clean image) share one pass.

MLM's pass over the positives (:func:`masked_view`, masked text) can also
carry another objective's masked grid cells (MVM with
``objectives.mvm.fusion_pass: shared``, the SOHO release): the objective that
joins it (``joins_masked_pass``) masks the grid in
:meth:`Objective.mask_positive_grid`, and the :class:`Pretrainer` hands it to
the step's context as ``grid_masker`` when an objective that reads the pass
(``reads_masked_pass``: MLM) is active too.

:class:`Pretrainer` bundles the model with the recipe's active objectives into
the single module the loop optimises and, under DDP, wraps: its ``forward``
computes every objective and the weighted total loss.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vlptune.config import ConfigError, ObjectiveConfig, Recipe
from vlptune.config.objectives import check_objectives, required_columns
from vlptune.data.info import DatasetInfo, describe_columns
from vlptune.data.prepare import ensure_data
from vlptune.model.fusion import FusionOutput
from vlptune.model.vlp import ImageFeatures, VLPModel
from vlptune.objectives import registry

BERT_LAYER_NORM_EPS = 1e-12  # BERT's LayerNorm epsilon, so the heads normalise like the encoder
HEAD_INIT_STD = 0.02  # BERT's initializer_range, used for every head weight and learned vector


@dataclass
class ObjectiveOutput:
    """A loss (scalar tensor, already averaged) and metrics (detached scalars or floats)."""

    loss: Tensor
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


class StepContext:
    """The step's shared state: image features computed once, fusion passes cached by name.

    ``generator`` drives the objectives' own randomness (MVM's choice of pairs
    and codes); it is a CPU generator owned by the loop and saved in
    checkpoints, so a resumed run draws the same choices.
    """

    def __init__(self, model: VLPModel, batch: dict[str, Any], generator: torch.Generator | None = None, grid_masker: Objective | None = None):
        self.model = model
        self.batch = batch
        self.generator = generator
        self.grid_masker = grid_masker  # the objective whose masked cells join the masked pass (masked_view), if any
        self._images: ImageFeatures | None = None
        self._views: dict[str, Any] = {}
        self._positive_rows: Tensor | None = None

    @property
    def images(self) -> ImageFeatures:
        """The batch's ``ImageFeatures`` (backbone, projection, pooling, VD), computed on first use."""
        if self._images is None:
            self._images = self.model.encode_images(self.batch["images"], self.batch["pixel_mask"])
        return self._images

    @property
    def positive_rows(self) -> Tensor:
        """Indices of the pairs with ``itm_labels == 1`` (MLM and MVM train on these only)."""
        if self._positive_rows is None:
            self._positive_rows = torch.nonzero(self.batch["itm_labels"] == 1, as_tuple=True)[0]
        return self._positive_rows

    def pair_grid(self, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Image features and grid mask gathered per pair: ``[R,D,gh,gw]``, ``[R,gh,gw]``.

        ``rows`` selects pairs (all pairs when None); each pair gets its image's grid.
        """
        image_of_pair = self.batch["pair_image"]
        if rows is not None:
            image_of_pair = image_of_pair[rows]
        feats = self.images
        return feats.feats[image_of_pair], feats.grid_mask[image_of_pair]

    def view(self, name: str, build: Callable[[], Any]) -> Any:
        """The fusion output cached under ``name``; ``build()`` runs it the first time."""
        if name not in self._views:
            self._views[name] = build()
        return self._views[name]

    def fuse(self, text_ids: Tensor, text_mask: Tensor, grid: Tensor, grid_mask: Tensor) -> FusionOutput:
        return self.model.fuse(text_ids, text_mask, grid, grid_mask)


MASKED_VIEW = "masked"  # the view name of masked_view


def masked_view(batch: dict[str, Any], ctx: StepContext) -> FusionOutput:
    """The fusion pass over the positive pairs (rows ``ctx.positive_rows``) with the MLM-masked text (``mlm_ids``).

    The image is clean, unless ``ctx.grid_masker`` is set: then its
    :meth:`Objective.mask_positive_grid` masks the grid of the same pass (MLM
    and MVM in one pass, ``objectives.mvm.fusion_pass: shared``).
    """

    def build() -> FusionOutput:
        rows = ctx.positive_rows
        grid, grid_mask = ctx.pair_grid(rows)
        if ctx.grid_masker is not None:
            grid = ctx.grid_masker.mask_positive_grid(batch, ctx, grid)
        return ctx.fuse(batch["mlm_ids"][rows], batch["text_mask"][rows], grid, grid_mask)

    return ctx.view(MASKED_VIEW, build)


class Objective(nn.Module, abc.ABC):
    """Base of every pretext task. Subclasses are registered with ``@register(name)``; the config class of that name lives in :mod:`vlptune.config.objectives`.

    ``Objective(cfg, model, recipe)``: ``cfg`` is the objective's own config
    (with ``weight``), ``model`` the ``VLPModel`` (heads may tie to its
    weights), ``recipe`` the whole recipe.
    """

    name: ClassVar[str] = "objective"  # set by @register
    needs: ClassVar[tuple[str, ...]] = ()
    # Every metric the objective may return. A step may leave some out (nothing
    # to learn from); averages then count only the steps that have them.
    metric_names: ClassVar[tuple[str, ...]] = ()
    # Whether the objective reads masked_view (MLM). An objective that sets
    # joins_masked_pass puts its masked grid cells into that pass
    # (mask_positive_grid) when such a reader is active.
    reads_masked_pass: ClassVar[bool] = False

    def __init__(self, cfg: ObjectiveConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__()
        self.cfg = cfg
        self.weight = float(cfg.weight)
        self.joins_masked_pass = False

    def mask_positive_grid(self, batch: dict[str, Any], ctx: StepContext, grid: Tensor) -> Tensor:
        """The positives' grid ``[R,D,gh,gw]`` with this objective's masked cells replaced (see :func:`masked_view`)."""
        raise NotImplementedError(f"objective {self.name!r} does not mask the grid of the masked pass (joins_masked_pass is only for objectives that do)")

    def require_info(self, info: DatasetInfo | None, fields: tuple[str, ...] = ()) -> DatasetInfo:
        """``info``, or a clear error for an objective that sizes its heads from the dataset's vocabularies.

        ``fields``: the config fields that would size the heads instead (named in the error, a ConfigError then).
        """
        if info is not None:
            return info
        how = "build it with build_pretrainer(recipe, prepare_dataset(recipe)) (the training loop does)"
        if fields:
            raise ConfigError(
                f"{' and '.join(fields)} = 0 read the vocabulary sizes from the dataset, but no dataset info was given: {how}, or set the sizes explicitly"
            )
        raise ValueError(f"objective {self.name!r} sizes its head from the dataset's vocabularies: {how}")

    def check_batch(self, batch: dict[str, Any]) -> None:
        missing = [key for key in self.needs if key not in batch]
        if missing:
            raise KeyError(f"objective {self.name!r} needs batch keys {missing}; the batch has {sorted(batch)}")

    @abc.abstractmethod
    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        """The objective's loss and metrics for one batch."""

    def zero_loss(self, ref: Tensor) -> Tensor:
        """A zero loss on ``ref``'s device for a step where this objective has nothing to learn from."""
        return ref.new_zeros(())


def init_head_weights(module: nn.Module) -> None:
    """BERT's initialisation for a head's Linear and LayerNorm layers."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=HEAD_INIT_STD)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class PredictionTransform(nn.Sequential):
    """BERT's prediction-head transform: dense, GELU, LayerNorm (before a decoder)."""

    def __init__(self, hidden: int):
        super().__init__(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=BERT_LAYER_NORM_EPS))
        init_head_weights(self)


NO_PREDICTION = -1  # the class "predicted" by a row of logits holding a non-finite value: never a label


def predicted(logits: Tensor, dim: int = -1) -> Tensor:
    """The argmax along ``dim``, and :data:`NO_PREDICTION` where that row holds a NaN or an infinity.

    The one "non-finite is never right" rule of every accuracy: torch's argmax
    takes NaN for the largest value, so a diverged head would score the
    share of labels equal to the first NaN's index (often class 0) instead
    of nothing.
    """
    return logits.argmax(dim).masked_fill(~torch.isfinite(logits).all(dim), NO_PREDICTION)


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Share of rows whose prediction (:func:`predicted`) is the label; a non-finite row is wrong."""
    return (predicted(logits) == labels).float().mean().detach()


def majority_share(labels: Tensor) -> Tensor:
    """Chance level of a classification metric: the accuracy of always answering the most frequent label of ``labels``."""
    return (torch.bincount(labels.flatten(), minlength=1).max().float() / labels.numel()).detach()


class Pretrainer(nn.Module):
    """The model plus its objectives: the one module the loop optimises (and DDP wraps).

    ``forward(batch, generator)`` returns ``(total_loss, metrics)`` where the
    total is ``sum(weight * loss)`` over the active objectives and metrics hold
    every objective's metrics, ``loss`` (the total) and the VD statistics.
    """

    def __init__(self, model: VLPModel, objectives: dict[str, Objective]):
        super().__init__()
        if not objectives:
            raise ValueError("no active objective: give at least one objective a weight > 0")
        self.model = model
        self.objectives = nn.ModuleDict(objectives)
        readers = any(objective.reads_masked_pass for objective in objectives.values())
        joiners = [objective for objective in objectives.values() if objective.joins_masked_pass]
        if len(joiners) > 1:
            raise ValueError(f"objectives {[o.name for o in joiners]} all join the masked pass; at most one may")
        # A tuple, so the objective is not registered a second time as a sub-module.
        self._grid_masker: tuple[Objective, ...] = tuple(joiners) if readers else ()
        self.last_losses: dict[str, Tensor] = {}  # each objective's loss of the last forward (train/balance.py measures them)

    @property
    def grid_masker(self) -> Objective | None:
        """The objective whose masked grid cells share MLM's pass (:func:`masked_view`), None when every pass is separate."""
        return self._grid_masker[0] if self._grid_masker else None

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Every metric ``forward`` may return (``loss`` and the objectives' own), VD statistics aside."""
        names = ["loss"]
        for objective in self.objectives.values():
            names.extend(objective.metric_names)
        return tuple(names)

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        ctx = StepContext(self.model, batch, generator, self.grid_masker)
        total: Tensor | None = None
        metrics: dict[str, Tensor | float] = {}
        balance = self._modules.get("balance")  # optim.balance's per-objective scales (train/balance.py), if any
        for name, objective in self.objectives.items():
            objective.check_batch(batch)
            out = objective(batch, ctx)
            self.last_losses[name] = out.loss
            weighted = objective.weight * out.loss if balance is None else balance.scale(name) * (objective.weight * out.loss)
            total = weighted if total is None else total + weighted
            metrics.update(out.metrics)
        assert total is not None  # the constructor refuses an empty set
        metrics["loss"] = total.detach()
        for key, value in (ctx.images.vd_stats or {}).items():
            metrics[f"vd_{key}"] = value
        return total, metrics


class MetricMeter:
    """Sums and counts per metric over steps or batches; ``means()`` averages each over the steps that had it.

    ``names`` fixes the keys (so ranks can all-reduce the same vector); other
    keys passed to :meth:`add` are kept as "last value" (VD statistics).
    """

    def __init__(self, names: tuple[str, ...]):
        self.names = tuple(names)
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)
        self.counts = torch.zeros(len(self.names), dtype=torch.float64)
        self.last: dict[str, float] = {}
        self._index = {name: i for i, name in enumerate(self.names)}

    def add(self, metrics: dict[str, Tensor | float]) -> None:
        tensors = {k: v for k, v in metrics.items() if isinstance(v, Tensor)}
        values = {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)}
        if tensors:  # one device sync for all of them
            stacked = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).tolist()
            values.update(zip(tensors, stacked))
        for key, value in values.items():
            i = self._index.get(key)
            if i is None:
                self.last[key] = value
            else:
                self.sums[i] += value
                self.counts[i] += 1

    def all_reduce(self) -> None:
        """Sum the sums and counts over torch.distributed ranks (no-op when not distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() == 1:
            return
        both = torch.cat([self.sums, self.counts])
        if torch.distributed.get_backend() == "nccl":
            both = both.cuda()
        torch.distributed.all_reduce(both)
        both = both.cpu()
        self.sums, self.counts = both[: len(self.names)], both[len(self.names) :]

    def means(self) -> dict[str, float]:
        out = {n: float(s / c) for n, s, c in zip(self.names, self.sums, self.counts) if c > 0}
        out.update(self.last)
        return out


def build_objectives(recipe: Recipe, model: VLPModel, info: DatasetInfo | None = None) -> dict[str, Objective]:
    """The recipe's active objectives (weight > 0), constructed in recipe order."""
    check_objectives(recipe)
    built: dict[str, Objective] = {}
    for name, cfg in recipe.active_objectives().items():
        impl = registry.get(name).impl
        built[name] = impl(cfg, model, recipe, info)
    return built


def prepare_dataset(recipe: Recipe) -> DatasetInfo:
    """The recipe's data, generated when it is the missing synthetic world, with the columns its objectives read; its info.

    ConfigError naming the objectives when an existing dataset lacks a column they need.
    """
    columns = required_columns(recipe)
    info = DatasetInfo.read(ensure_data(recipe, columns))
    missing = sorted(columns - info.columns)
    if missing:
        readers = [name for name, cfg in recipe.active_objectives().items() if set(cfg.required_columns()) & set(missing)]
        raise ConfigError(
            f"{', '.join(f'objectives.{name}' for name in readers)}: needs {describe_columns(missing)}, but the dataset at data.root={recipe.data.root!r} "
            f"was prepared without them (its manifest {info.root / 'manifest.json'} does not record them); regenerate it with "
            "make_world(..., phrase_similarity=True) (or delete it: a recipe with this objective synthesizes the world with them), "
            "or add them to real data with vlptune.data.similarity.PhraseLabelSimilarity and record them in the manifest"
        )
    return info


def pair_scorer(pretrainer: Pretrainer) -> Objective | None:
    """The active objective that scores image-text pairs (its config says ``scores_pairs``), if any."""
    return next((objective for objective in pretrainer.objectives.values() if objective.cfg.scores_pairs), None)


def build_pretrainer(recipe: Recipe, info: DatasetInfo | None = None) -> Pretrainer:
    """Build ``VLPModel(recipe)`` and the recipe's objectives; refuses inconsistent recipes first.

    ``info`` (from :func:`prepare_dataset`) sizes the heads of objectives that
    predict the dataset's vocabularies; objectives without such heads need none.
    """
    check_objectives(recipe)
    model = VLPModel(recipe)
    return Pretrainer(model, build_objectives(recipe, model, info))
