"""TensorBoard logging of one run, into the run directory itself.

Scalars (tags):

* ``train/<metric>``: every objective's loss and accuracy, the total ``loss``,
  averaged over the ``train.log_every`` steps since the last log;
* ``lr/<side>``: learning rate of the backbone and transformer optimisers;
* ``train/grad_norm``: global gradient norm before clipping;
* ``vd/<stat>``: the visual dictionary's statistics (perplexity, codes used, dead codes...);
* ``throughput/images_per_s``, ``throughput/pairs_per_s``: over the log window, all ranks;
* ``val/<metric>``, ``retrieval/<metric>``: the evaluation (see train/evaluate.py).

HParams (the hparams plugin's summaries, written into this same event file, so
the dashboard lists the run once; ``SummaryWriter.add_hparams`` would open a
sub-directory and show every run twice):

* hyperparameters: the *searched* ones first (:class:`HParamsPlan`: a
  search's dotted recipe paths in the space's order; a study's ``variant``,
  ``train.seed`` and the paths its variants set; ``vlptune train``'s ``-o``
  paths), then :data:`FIXED_HPARAMS`, a short list of what sizes a run, not
  the whole recipe;
* metrics: the search metric, its chance level where the run reports one
  (:func:`chance_keys`), then the rest of :data:`HPARAM_METRICS`.

The session-start summary (the hparams' values) is written when the run
starts, so a trial stopped before its first evaluation is listed too; the
experiment summary (which hparams and metrics are the dashboard's columns) at
the first evaluation, when the run's metric keys (its chance levels) are known.
Every trial of an experiment writes the same experiment summary.

How TensorBoard (2.21) shows it: with several runs in a logdir it does not
merge their experiment summaries, it takes the first run's it finds (all
alike here). It keeps the metrics in the written order, but sorts the
hparams by (``differs`` first, then name), and the page shows only the
first five hparams and the first five metrics until more are ticked. The
searched hparams are written with ``differs`` set, so the table opens on the
searched knobs (by name among themselves: the written space order does not
survive the sort), then the fixed ones, and on the search metric with its
chance level next to it.

Images: ``vd/codes`` at each evaluation, the SOHO Fig. 3 picture: one row per
visual-dictionary code, showing image patches quantised to that code.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from google.protobuf import struct_pb2
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

# The fixed hyperparameters every run logs after the searched ones: what sets a run's
# size and cost, so runs of different experiments or recipes compare at a glance
# (the other ~80 recipe fields are in the run's recipe.yaml).
FIXED_HPARAMS = (
    "model.backbone.depth",  # the CNN: ResNet-18 ... 152
    "model.backbone.width_mult",  # its width: the CPU recipes run the CNN at 1/8 or 1/16 width
    "model.fusion.layers",  # depth of the multi-modal Transformer
    "model.vd.size",  # visual-dictionary codes; 0 = no VD (and no MVM)
    "data.image_size",  # input resolution: compute per image and grid size
    "data.batch_images",  # images per worker per step
    "train.max_steps",  # the fidelity: runs of different lengths do not compare
    "train.seed",  # tells repeated runs of one recipe apart
)
# The metrics the HParams dashboard shows as columns (logged at every evaluation),
# after the search metric and its chance level.
HPARAM_METRICS = (
    "retrieval/rsum",
    "retrieval/tr_r1",
    "retrieval/ir_r1",
    "val/loss",
    "val/itm_acc",
    "val/mlm_acc",
    "val/mvm_acc",
)
VD_PICTURE_PATCHES = 8  # patches shown per code: enough to see what a code means, small enough to read
VD_PICTURE_GAP = 2  # pixels of background between patches


@dataclass(frozen=True)
class HParamsPlan:
    """What a run's HParams list first: ``searched`` (name -> value, in the order of the
    space or study), the search ``metric`` (the first metric column) and ``later_metrics``,
    columns the run reports after its first evaluation (a trial's downstream tasks)."""

    searched: Mapping[str, Any] = field(default_factory=dict)
    metric: str | None = None
    later_metrics: tuple[str, ...] = ()


_ABSENT = object()  # lookup()'s answer for a path the tree does not hold


def lookup(tree: Mapping[str, Any], path: str) -> Any:
    """The value at dotted ``path`` of a nested mapping, or ``_ABSENT``."""
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def plugin_value(value: Any) -> bool | int | float | str:
    """A value the hparams plugin holds: None as ``"none"``, lists and tuples as their string form."""
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(list(value)) if isinstance(value, (list, tuple)) else str(value)


def flatten_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Dotted keys -> plugin-compatible values."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_hparams(value, f"{name}."))
        else:
            out[name] = plugin_value(value)
    return out


def hparam_values(names: Iterable[str], recipe_tree: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, bool | int | float | str]:
    """``names`` -> values, in order: a dotted recipe path takes the recipe's value (a
    section: its leaves), any other name ``extra``'s (e.g. a study's ``variant``); a
    name in neither is left out (e.g. an objective this variant does not have)."""
    out: dict[str, bool | int | float | str] = {}
    for name in names:
        value = lookup(recipe_tree, name)
        if value is _ABSENT:
            value = (extra or {}).get(name, _ABSENT)
        if isinstance(value, Mapping):
            out.update(flatten_hparams(value, f"{name}."))
        elif value is not _ABSENT:
            out[name] = plugin_value(value)
    return out


@dataclass(frozen=True)
class HParamsSelection:
    """A run's hparams, in the order written: the searched ones, then :data:`FIXED_HPARAMS`."""

    values: dict[str, bool | int | float | str]
    searched: frozenset[str]
    metric: str | None = None
    later_metrics: tuple[str, ...] = ()


def select_hparams(recipe_tree: Mapping[str, Any], plan: HParamsPlan | None = None) -> HParamsSelection:
    """The searched hparams of ``plan`` (none by default), then the fixed ones they do not include."""
    plan = plan or HParamsPlan()
    values = {name: plugin_value(value) for name, value in plan.searched.items()}
    fixed = hparam_values([name for name in FIXED_HPARAMS if name not in values], recipe_tree)
    return HParamsSelection({**values, **fixed}, frozenset(values), plan.metric, tuple(plan.later_metrics))


def chance_keys(metric: str) -> list[str]:
    """Where a run reports the chance level of ``metric``: ``retrieval/rsum`` -> ``retrieval/chance_rsum``,
    ``val/mlm_acc`` -> ``val/mlm_chance`` (objectives name theirs ``<objective>_chance``)."""
    if "/" not in metric:
        return []
    group, name = metric.rsplit("/", 1)
    keys = [f"{group}/chance_{name}"]
    if "_" in name:
        keys.append(f"{group}/{name.rsplit('_', 1)[0]}_chance")
    return keys


def hparam_metrics(metric: str | None, reported: Collection[str], later: Collection[str] = ()) -> list[str]:
    """The metric columns: ``metric``, its chance level (the first of :func:`chance_keys`
    in ``reported``, the run's metric keys, or in ``later``, those it reports later), then
    the rest of ``later`` (a trial's downstream tasks), then the rest of :data:`HPARAM_METRICS`."""
    first = [metric] if metric else []
    if metric:
        first += [key for key in chance_keys(metric) if key in reported or key in later][:1]
    first += [name for name in later if name not in first]
    return [*first, *(name for name in HPARAM_METRICS if name not in first)]


# ------------------------------------------------------------------ the hparams plugin's summaries


def _plugin_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    data.version = metadata.PLUGIN_DATA_VERSION
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString())
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


def _hparam_info(name: str, value: bool | int | float | str, differs: bool) -> api_pb2.HParamInfo:
    """Type from the value (booleans with their two-value domain: the dashboard's checkbox filter)."""
    info = api_pb2.HParamInfo(name=name, differs=differs)
    if isinstance(value, bool):
        info.type = api_pb2.DATA_TYPE_BOOL
        info.domain_discrete.values.extend([struct_pb2.Value(bool_value=False), struct_pb2.Value(bool_value=True)])
    elif isinstance(value, (int, float)):
        info.type = api_pb2.DATA_TYPE_FLOAT64
    else:
        info.type = api_pb2.DATA_TYPE_STRING
    return info


def _struct_value(value: bool | int | float | str) -> struct_pb2.Value:
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, (int, float)):
        return struct_pb2.Value(number_value=float(value))
    return struct_pb2.Value(string_value=str(value))


def experiment_summary(selection: HParamsSelection, metrics: Iterable[str]) -> Summary:
    """The experiment: its hparams in the selection's order (the searched ones flagged ``differs``) and ``metrics``."""
    infos = [_hparam_info(name, value, name in selection.searched) for name, value in selection.values.items()]
    metric_infos = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metrics]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos)
    return _plugin_summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))


def session_start_summary(selection: HParamsSelection) -> Summary:
    """The run's hparam values."""
    start = plugin_data_pb2.SessionStartInfo()
    for name, value in selection.values.items():
        start.hparams[name].CopyFrom(_struct_value(value))
    return _plugin_summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start))


def session_end_summary() -> Summary:
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
    return _plugin_summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))


def _scalar(value: Any) -> float | None:
    if isinstance(value, Tensor):
        value = value.detach().float().item()
    if isinstance(value, bool):
        value = float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


class RunWriter:
    """The run's TensorBoard writer (rank 0 only), writing into ``run_dir`` itself.

    ``purge_step``: on resume, events at or after this step written by the
    interrupted run are discarded, so the curves do not double back.
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)
        self._hparams: HParamsSelection | None = None
        self._experiment_written = False

    def scalars(self, values: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """Every numeric value of ``values`` as ``prefix + key``."""
        for key, value in values.items():
            number = _scalar(value)
            if number is not None:
                self.writer.add_scalar(f"{prefix}{key}", number, step)

    def hparams_start(self, recipe_tree: Mapping[str, Any], plan: HParamsPlan | None = None, new_session: bool = True) -> None:
        """Select the run's hparams (:func:`select_hparams`) and, for a ``new_session`` (not
        on resume: the interrupted run wrote it), write their values, the session-start summary."""
        self._hparams = select_hparams(recipe_tree, plan)
        if new_session:
            self.writer.file_writer.add_summary(session_start_summary(self._hparams))
            self.writer.flush()

    def hparams_experiment(self, reported: Collection[str]) -> None:
        """Write the experiment summary once, at the first evaluation (``reported``: its metric keys)."""
        if self._hparams is None or self._experiment_written:
            return
        metrics = hparam_metrics(self._hparams.metric, reported, self._hparams.later_metrics)
        self.writer.file_writer.add_summary(experiment_summary(self._hparams, metrics))
        self.writer.flush()
        self._experiment_written = True

    def hparams_end(self) -> None:
        """Write the session-end summary (status: success) of the hparams plugin."""
        self.writer.file_writer.add_summary(session_end_summary())
        self.writer.flush()

    def image(self, tag: str, picture: Tensor, step: int) -> None:
        self.writer.add_image(tag, picture, step, dataformats="CHW")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def vd_picture(
    images: list[Tensor],
    codes: list[Tensor],
    stride: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    num_codes: int,
    per_code: int = VD_PICTURE_PATCHES,
) -> Tensor | None:
    """SOHO Fig. 3: for the ``num_codes`` most used codes, ``per_code`` image patches quantised to each.

    ``images``: normalised pixels, one float [3,h,w] per image; ``codes``: one
    int64 [gh,gw] per image (the VD index of each cell, -1 on padding); cell
    (i, j) covers pixels ``[i*stride, (i+1)*stride) x [j*stride, (j+1)*stride)``.
    Returns a float CHW picture in [0, 1], one row per code, or None when no
    cell has a code.
    """
    flat = torch.cat([c.flatten() for c in codes]) if codes else torch.zeros(0, dtype=torch.int64)
    flat = flat[flat >= 0]
    if flat.numel() == 0 or num_codes <= 0:
        return None
    counts = torch.bincount(flat)
    top = [int(c) for c in torch.argsort(counts, descending=True)[: min(num_codes, int((counts > 0).sum()))]]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    cell = stride + VD_PICTURE_GAP
    picture = torch.ones(3, len(top) * cell, per_code * cell)
    filled = [0] * len(top)
    row_of = {code: row for row, code in enumerate(top)}
    for image, grid in zip(images, codes):
        if min(filled) >= per_code:
            break
        _, h, w = image.shape
        for i, j in torch.nonzero(grid >= 0).tolist():
            row = row_of.get(int(grid[i, j]))
            if row is None or filled[row] >= per_code:
                continue
            y0, x0 = i * stride, j * stride
            crop = (image[:, y0 : min(h, y0 + stride), x0 : min(w, x0 + stride)].float().cpu() * std_t + mean_t).clamp(0.0, 1.0)
            top_px, left_px = row * cell, filled[row] * cell
            picture[:, top_px : top_px + stride, left_px : left_px + stride] = 0.0  # padding beyond the image: black
            picture[:, top_px : top_px + crop.shape[1], left_px : left_px + crop.shape[2]] = crop
            filled[row] += 1
    return picture


def throughput(images: int, pairs: int, seconds: float) -> dict[str, float]:
    seconds = max(seconds, math.ulp(1.0))
    return {"images_per_s": images / seconds, "pairs_per_s": pairs / seconds}
