"""The per-worker training loop: THE one training loop of vlptune.

``train_worker(recipe, reporter, out_dir)`` runs on one worker (rank). It is
called in-process by ``vlptune train`` and by ``bench/``, and on every Ray
Train worker by the Ray code; when torch.distributed is already initialised
(Ray does that) the model is wrapped in DDP (gloo on CPU, NCCL on GPU) and
rank and world size come from torch.distributed. Nothing here imports Ray.

One optimiser step (train/step.py, without host syncs)::

    for each of `accum` micro-batches (DDP syncs gradients on the last only):
        total = sum(weight * loss) over the objectives   (objectives/base.py)
        (total / accum).backward()
    if the loss or the gradient norm is not finite on any rank: skip the step
    clip the global gradient norm, step both optimisers and schedules

Around it: the freeze schedule (the CNN frozen for the first
``model.backbone.freeze_for`` steps or epochs), training scalars every
``train.log_every`` steps, evaluation every ``train.eval_every`` steps and at
the end (validation losses, zero-shot retrieval, a VD picture), a checkpoint
at each evaluation (or every ``train.checkpoint_every`` steps), a report to
the reporter at each evaluation, and a stop with a reason after
``train.nan_patience`` consecutive non-finite steps.

Resume: with ``resume`` on and a checkpoint in ``out_dir/checkpoints`` (or a
checkpoint directory given as ``resume``), the model, optimisers, schedules,
VD, RNG states and data position are restored, and the run continues exactly
where an uninterrupted one would have gone.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from vlptune.config import Recipe, dump_recipe, recipe_to_dict, validate_recipe
from vlptune.data.dataset import build_loader, skipped_over_ranks
from vlptune.data.info import DatasetInfo
from vlptune.data.shard_checks import SKIPPED_KEY, skip_share_exceeded
from vlptune.io import atomic_write_text
from vlptune.objectives.base import MetricMeter, Pretrainer, build_pretrainer, pair_scorer, prepare_dataset
from vlptune.train import checkpoint as ckpt
from vlptune.train.backbone_pretrain import resolve_cached_backbone
from vlptune.train.balance import measures_at
from vlptune.train.checkpoint import drop_persisted_copy
from vlptune.train.compiling import CompileWatch
from vlptune.train.evaluate import RetrievalInputs, diverged_as_worst, evaluate_losses, evaluate_retrieval
from vlptune.train.optim import (
    Optimizers,
    accumulation_steps,
    build_optimizers,
    resolve_precision,
)
from vlptune.train.reporting import LOOP_LOGGER, PROGRESS_ATTR, Reporter, format_duration
from vlptune.train.step import StepResult, set_report_stats, settle_steps, train_step
from vlptune.train.tensorboard import HParamsPlan, RunWriter, throughput, vd_picture

if TYPE_CHECKING:  # the finetune mode's hook (train/finetune.py imports this module)
    from vlptune.train.finetune import FinetunePlan

log = logging.getLogger(LOOP_LOGGER)

OBJECTIVE_STREAM = 1  # salt of the objectives' random stream (MVM choices), per rank
DROPOUT_STREAM = 2  # salt of the torch global stream (dropout), per rank
STOP_MAX_STEPS = "max_steps"


# --------------------------------------------------------------------------- workers & devices


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def detect(cls) -> Dist:
        """Rank and world size from torch.distributed when initialised (Ray Train), else a single worker."""
        if dist.is_available() and dist.is_initialized():
            local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(1, torch.cuda.device_count() or 1)))
            return cls(dist.get_rank(), dist.get_world_size(), local)
        return cls()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def resolve_device(choice: str, workers: Dist) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible to this worker")
        device = torch.device("cuda", workers.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def set_threads(recipe: Recipe) -> None:
    res = recipe.resources
    threads = res.torch_threads or math.ceil(res.cpus_per_worker)
    torch.set_num_threads(max(1, threads))


def stream_seed(seed: int, rank: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, rank, stream)."""
    return (seed * 1_000_003 + rank * 7919 + stream) % (2**63 - 1)


def module_generators(module: nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` held as an attribute by a sub-module (e.g. the VD's private one), by path."""
    out: dict[str, torch.Generator] = {}
    for path, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Generator):
                out[f"{path or 'root'}.{attr}"] = value
    return out


def as_recipe(recipe: Recipe | dict) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else validate_recipe(dict(recipe), "train_worker recipe")


# --------------------------------------------------------------------------- data


def prepare_data(recipe: Recipe, workers: Dist) -> DatasetInfo:
    """The dataset's info; rank 0 generates the synthetic world if needed, the other ranks wait for it."""
    info = prepare_dataset(recipe) if workers.is_main else None
    workers.barrier()
    return info if info is not None else prepare_dataset(recipe)


class BatchStream:
    """Training micro-batches, epoch after epoch; ``(epoch, position)`` is the data position.

    ``position`` counts the batches of ``epoch`` already handed out. A stream
    opened at a position starts at that batch without reading the earlier
    ones (the epoch's order and every sample's randomness depend only on the
    seed, the epoch and the record, see data/dataset.py).
    """

    def __init__(self, loader: DataLoader, epoch: int = 0, position: int = 0, skipped: int = 0):
        self.loader = loader
        self.epoch = epoch
        self.position = position
        self.skipped = skipped
        self._iter: Iterator[dict] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def _open(self) -> Iterator[dict]:
        self.loader.dataset.set_epoch(self.epoch)
        batch_size = self.loader.batch_size
        n = len(self.loader.dataset)
        start = self.position * batch_size
        view = DataLoader(
            self.loader.dataset,
            batch_size=batch_size,
            sampler=range(start, n),
            # its own generator: opening an epoch must not draw from the global
            # stream (dropout), or a resumed run would drift from an uninterrupted one
            generator=torch.Generator().manual_seed(self.epoch),
            drop_last=self.loader.drop_last,
            num_workers=self.loader.num_workers,
            collate_fn=self.loader.collate_fn,
            worker_init_fn=self.loader.worker_init_fn,
            pin_memory=self.loader.pin_memory,  # data.pin_memory and data.prefetch_factor (data/dataset.py loader_options)
            prefetch_factor=self.loader.prefetch_factor,
        )
        return iter(view)

    def next(self) -> dict[str, Any]:
        for _ in range(2):  # at most one epoch boundary per call
            if self._iter is None:
                self._iter = self._open()
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                self.epoch += 1
                self.position = 0
                continue
            self.position += 1
            self.skipped += int(batch.get("skipped", 0))
            batch["skipped"] = self.skipped
            return batch
        raise RuntimeError(f"the training split yields no batch in epoch {self.epoch} (data.batch_images={self.loader.batch_size})")

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "skipped": self.skipped}


# --------------------------------------------------------------------------- one step


def backbone_frozen_at(step: int, recipe: Recipe, steps_per_epoch: float) -> bool:
    """The freeze schedule: is the CNN frozen at optimiser step ``step``?"""
    cfg = recipe.model.backbone
    if cfg.freeze_for == 0:
        return False
    limit = cfg.freeze_for if cfg.freeze_unit == "steps" else cfg.freeze_for * steps_per_epoch
    return step < limit


# --------------------------------------------------------------------------- evaluation


class Evaluation:
    """Validation losses (all ranks) and zero-shot retrieval (rank 0), data prepared once."""

    def __init__(self, recipe: Recipe, workers: Dist, device: torch.device, precision: str):
        self.recipe = recipe
        self.workers = workers
        self.device = device
        self.precision = precision
        self.val_loader = build_loader(recipe, train=False, rank=workers.rank, world_size=workers.world_size) if recipe.eval.loss_batches > 0 else None
        self._retrieval: Any = None

    def __call__(self, pretrainer: Pretrainer) -> tuple[dict[str, float], Tensor | None]:
        # The evaluation draws nothing from the training's random streams: it
        # runs inside a fork of the global RNG, so the training trajectory does
        # not depend on how often (or whether) it evaluates.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._evaluate(pretrainer)

    def _evaluate(self, pretrainer: Pretrainer) -> tuple[dict[str, float], Tensor | None]:
        metrics: dict[str, float] = {}
        if self.val_loader is not None:
            val = evaluate_losses(pretrainer, self.val_loader, self.recipe.eval.loss_batches, self.device, self.precision)
            metrics.update({f"val/{k}": v for k, v in val.items()})
        picture = None
        if self.workers.is_main and pair_scorer(pretrainer) is not None:
            if self._retrieval is None:
                self._retrieval = RetrievalInputs.load(self.recipe)
            retrieval, encoded = evaluate_retrieval(pretrainer, self.recipe, self._retrieval, self.device, self.precision)
            metrics.update({f"retrieval/{k}": v for k, v in retrieval.items()})
            if encoded.codes and self.recipe.eval.vd_picture_codes > 0:
                data = self.recipe.data
                picture = vd_picture(self._retrieval.images, encoded.codes, self._retrieval.stride, data.mean, data.std, self.recipe.eval.vd_picture_codes)
        if self.workers.active:  # every rank reports the same numbers
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return diverged_as_worst(metrics), picture


# --------------------------------------------------------------------------- the loop


STARTUP_PREFIX = "startup/"  # the first report's keys of the loop's start-up phases


class PhaseTimer:
    """Seconds of the loop's start-up phases (data preparation, model, data loader, first step),
    handed once to the first report as ``startup/<phase>_s`` (then ``vlptune results`` and
    docs/search.md's breakdown read them)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.reported = False

    def mark(self, phase: str, once: bool = False) -> None:
        now = time.perf_counter()
        if not (once and phase in self.seconds):
            self.seconds[phase] = round(now - self.last, 3)
        self.last = now

    def pop_report(self) -> dict[str, float]:
        if self.reported:
            return {}
        self.reported = True
        return {f"{STARTUP_PREFIX}{phase}_s": value for phase, value in self.seconds.items()}


def train_worker(
    recipe: Recipe | dict,
    reporter: Reporter,
    out_dir: str | os.PathLike,
    resume: bool | str = True,
    hparams: HParamsPlan | None = None,
    finetune: FinetunePlan | None = None,
) -> dict[str, Any]:
    """Train ``recipe`` on this worker; returns the final metrics. ``finetune``: the finetune mode (train/finetune.py).

    ``reporter.report(metrics, checkpoint_dir)`` is called at every
    evaluation on every rank. ``out_dir`` is the run directory: TensorBoard
    events, ``recipe.yaml`` and ``checkpoints/`` go there (rank 0 writes).
    Checkpoints kept: the ``train.keep_checkpoints`` newest while the run goes
    on, ``train.keep_when_done`` once it reached ``max_steps``; one the reporter
    has ``persisted`` elsewhere (:func:`vlptune.train.checkpoint.drop_persisted_copy`) is removed here.
    ``resume``: True continues from ``out_dir``'s latest checkpoint if there is
    one; a path resumes from that checkpoint directory; False starts afresh.
    ``hparams``: what the run's HParams list first (the searched hyperparameters
    and the search metric, see train/tensorboard.py); None: only the fixed short list.

    The result holds the last evaluation's metrics plus ``step``, ``epoch``,
    ``stop_reason`` (``"max_steps"``, or why the run stopped early),
    ``checkpoint`` (the last checkpoint directory still on disk, or None), ``run_dir``,
    ``train_seconds``, ``images_seen`` (over all ranks) and
    ``skipped_records`` (corrupt training records skipped over all ranks; each report's ``data/skipped_records``).
    """
    recipe = as_recipe(recipe)
    run_dir = Path(out_dir)
    workers = Dist.detect()
    device = resolve_device(recipe.train.device, workers)
    precision = resolve_precision(recipe.optim.precision, device)
    set_threads(recipe)
    seed = recipe.train.seed

    # ---- data, model, optimisers (each phase timed: the first report carries startup/<phase>_s)
    phases = PhaseTimer()
    accum = accumulation_steps(recipe.optim.global_batch, recipe.data.batch_images, workers.world_size)
    info = prepare_data(recipe, workers)
    recipe = resolve_cached_backbone(recipe, train_worker, workers.is_main, workers.barrier)  # model.backbone.init: pretrained
    # Seeded after the data and the cached backbone are made (pretraining it draws from torch's generator): the same
    # initial weights on every rank, and whether this run made the backbone or found it.
    torch.manual_seed(seed)

    phases.mark("prepare_data")
    pretrainer = (finetune.build(recipe, info) if finetune else build_pretrainer(recipe, info)).to(device)
    pretrainer.train()
    compiled = CompileWatch(pretrainer.model, recipe.train.compile)
    optimizers = build_optimizers(pretrainer, pretrainer.model.backbone, recipe.optim, recipe.train.max_steps)
    module: nn.Module = pretrainer
    if workers.active:
        # find_unused_parameters: the frozen CNN, a skipped MVM step or a batch
        # without MLM tokens leave parameters without gradient on some steps.
        ids = [device.index] if device.type == "cuda" else None
        module = DistributedDataParallel(pretrainer, device_ids=ids, find_unused_parameters=True)
    objective_gen = torch.Generator().manual_seed(stream_seed(seed, workers.rank, OBJECTIVE_STREAM))
    generators = {"objectives": objective_gen, **module_generators(pretrainer)}
    torch.manual_seed(stream_seed(seed, workers.rank, DROPOUT_STREAM))  # dropout differs across ranks
    phases.mark("build_model")
    loader = finetune.loader(workers) if finetune else build_loader(recipe, train=True, rank=workers.rank, world_size=workers.world_size, device=device)
    stream = BatchStream(loader)
    phases.mark("open_data")

    # ---- resume
    step, nonfinite, images_seen, last_ckpt, resumed_rng = 0, 0, 0, None, None
    source = Path(resume) if isinstance(resume, (str, os.PathLike)) else (ckpt.latest_checkpoint(run_dir) if resume else None)
    if source is not None:
        state = ckpt.load_checkpoint(source, pretrainer, optimizers, generators, restore_rng_state=False)
        step = int(state["step"])
        extra = state["extra"]
        stream = BatchStream(loader, extra["epoch"], extra["position"], extra["skipped"])
        nonfinite = int(extra.get("nonfinite", 0))
        images_seen = int(extra.get("images_seen", 0))
        resumed_rng = state["rng"]
        last_ckpt = str(source)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", source, step, stream.epoch, stream.position)

    writer = None
    if workers.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        writer = RunWriter(run_dir, purge_step=step + 1 if source is not None else None)
        writer.hparams_start(recipe_to_dict(recipe), hparams, new_session=source is None)
    evaluation = finetune.evaluation(recipe, workers, device, precision) if finetune else Evaluation(recipe, workers, device, precision)
    steps_per_epoch = max(1.0, len(stream) / accum)
    if resumed_rng is not None:  # after every construction that draws random numbers
        ckpt.restore_rng(resumed_rng, generators)

    # ---- train
    max_steps = recipe.train.max_steps
    meter = MetricMeter(pretrainer.metric_names)
    window = {"images": 0, "pairs": 0, "grad_norm": 0.0, "steps": 0, "start": time.perf_counter()}
    frozen: bool | None = None
    pending: list[tuple[int, StepResult]] = []  # steps whose scalars are still on the device
    stop_reason = STOP_MAX_STEPS
    result: dict[str, Any] = {}
    train_start = time.perf_counter()
    first_step = step  # a resumed run starts past 0: its ETA counts only this run's steps
    while step < max_steps:
        want_frozen = backbone_frozen_at(step, recipe, steps_per_epoch)
        if want_frozen != frozen:
            pretrainer.model.set_backbone_frozen(want_frozen)
            frozen = want_frozen
        measure = measures_at(step + 1, recipe)  # per-objective gradient norms (train/balance.py)
        logs = (step + 1) % recipe.train.log_every == 0 or step + 1 == max_steps
        set_report_stats(pretrainer, logs)  # VD statistics (a device read) only on logged steps
        out = train_step(
            module, pretrainer, optimizers, [stream.next() for _ in range(accum)], device, precision, recipe.optim.grad_clip, objective_gen, measure
        )
        set_report_stats(pretrainer, True)  # evaluations always see them
        phases.mark("first_step", once=True)
        compiled.step_done()
        step += 1
        pending.append((step, out))
        images_seen += out.images * workers.world_size
        window["images"] += out.images * workers.world_size
        window["pairs"] += out.pairs * workers.world_size
        is_eval = step % recipe.train.eval_every == 0 or step == max_steps
        every = recipe.train.checkpoint_every
        is_ckpt = (every > 0 and step % every == 0) or (every == 0 and is_eval) or step == max_steps
        if not (logs or is_eval or is_ckpt):
            continue  # the step's scalars stay on the device until the next logged, evaluated or checkpointed step

        # ---- settle the steps since the last one: one read of their flags, losses and norms
        nonfinite, why = settle_steps(pending, meter, window, nonfinite, recipe.train.nan_patience)
        pending = []
        if why is not None:
            stop_reason = why
            log.error("stopping: %s", stop_reason)
            break
        if logs:
            eta = (time.perf_counter() - train_start) / max(1, step - first_step) * (max_steps - step)  # evaluations included
            log_window(writer, meter, window, optimizers, step, stream.epoch, f"{step}/{max_steps}, ETA {format_duration(eta)}")
            if writer is not None:
                writer.scalars(compiled.counts(), step, "compile/")
            meter = MetricMeter(pretrainer.metric_names)
            window = {"images": 0, "pairs": 0, "grad_norm": 0.0, "steps": 0, "start": time.perf_counter()}

        if is_eval:
            result = run_evaluation(evaluation, pretrainer, writer, step, stream.epoch, {SKIPPED_KEY: skipped_over_ranks(stream.skipped, device)})
        written = None
        if is_ckpt:
            extra = {
                **stream.state(),
                "nonfinite": nonfinite,
                "images_seen": images_seen,
                "recipe_name": recipe.name,
                ckpt.METRICS_KEY: scores(result) if is_eval else {},
            }
            if workers.is_main:
                written = str(ckpt.save_checkpoint(run_dir, step, pretrainer, optimizers, generators, extra, keep=recipe.train.keep_checkpoints))
                last_ckpt = written
            workers.barrier()
        if is_eval:
            reporter.report({**result, **phases.pop_report(), "step": step, "epoch": stream.epoch}, written)
            drop_persisted_copy(reporter, written, run_dir)
            stop_reason = skip_share_exceeded(int(result[SKIPPED_KEY]), images_seen, recipe.data.max_skip_fraction, recipe.data.root) or stop_reason
            if finetune is not None and stop_reason == STOP_MAX_STEPS and (early := finetune.stop({**result, "step": step})) is not None:
                stop_reason = early
            if stop_reason != STOP_MAX_STEPS:  # data.max_skip_fraction, or the finetune's early stopping
                break

    # ---- finish
    if not result and stop_reason == STOP_MAX_STEPS:  # resumed a finished run: evaluate it once more
        result = run_evaluation(evaluation, pretrainer, writer, step, stream.epoch, {SKIPPED_KEY: skipped_over_ranks(stream.skipped, device)})
        reporter.report({**result, "step": step, "epoch": stream.epoch}, last_ckpt if workers.is_main else None)
        drop_persisted_copy(reporter, last_ckpt if workers.is_main else None, run_dir)
    if workers.is_main and stop_reason == STOP_MAX_STEPS:
        # train.keep_when_done, over this directory (without a metric: "best" is the last); a search
        # trial's copies in Ray's storage are the driver's (vlptune.search.retention)
        kept = ckpt.finish_checkpoints(run_dir, recipe.train.keep_when_done, *(finetune.ranking if finetune else ()))
        last_ckpt = str(kept) if kept is not None else None
    if last_ckpt is not None and not Path(last_ckpt).is_dir():
        last_ckpt = None  # its only copy is the reporter's (a search trial's, in Ray's storage)
    final = {
        **result,
        "step": step,
        "epoch": stream.epoch,
        "stop_reason": stop_reason,
        "checkpoint": last_ckpt,
        "run_dir": str(run_dir),
        "train_seconds": time.perf_counter() - train_start,
        "skipped_records": skipped_over_ranks(stream.skipped, device),
        "images_seen": images_seen,
        **compiled.summary(),
    }
    if stop_reason != STOP_MAX_STEPS:
        reporter.report(final, None)
    if writer is not None:
        if stop_reason == STOP_MAX_STEPS:
            writer.hparams_end()
        writer.close()
    return final


def scores(metrics: dict[str, Any]) -> dict[str, float]:
    """An evaluation's numbers as JSON floats (saved with the checkpoint of its step, to rank it)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}


def log_window(writer: RunWriter | None, meter: MetricMeter, window: dict[str, Any], optimizers: Optimizers, step: int, epoch: int, progress: str = "") -> None:
    """Average the window's metrics over ranks and write them (rank 0); ``progress`` (e.g. ``100/500, ETA 3m20s``) ends the log line."""
    meter.all_reduce()
    means = meter.means()
    seconds = time.perf_counter() - window["start"]
    speed = throughput(window["images"], window["pairs"], seconds)
    grad = window["grad_norm"] / max(1, window["steps"])
    if writer is None:
        return
    train = {k: v for k, v in means.items() if not k.startswith("vd_")}
    writer.scalars(train, step, "train/")
    writer.scalars({"grad_norm": grad, "epoch": epoch}, step, "train/")
    writer.scalars(optimizers.lrs(), step)
    writer.scalars({k[3:]: v for k, v in means.items() if k.startswith("vd_")}, step, "vd/")
    writer.scalars(speed, step, "throughput/")
    writer.flush()
    shown = " ".join(f"{k}={v:.4g}" for k, v in train.items() if k.endswith(("loss", "acc")))
    suffix = f" [{progress}]" if progress else ""
    log.info("step %d epoch %d %s grad_norm=%.3g %.1f img/s%s", step, epoch, shown, grad, speed["images_per_s"], suffix, extra={PROGRESS_ATTR: progress})


def run_evaluation(evaluation: Evaluation, pretrainer: Pretrainer, writer: RunWriter | None, step: int, epoch: int, extra: dict | None = None) -> dict:
    metrics, picture = evaluation(pretrainer)
    metrics.update(extra or {})  # the loop's own figures of this step (data/skipped_records)
    if writer is not None:
        writer.scalars(metrics, step)
        writer.hparams_experiment(metrics)
        if picture is not None:
            writer.image("vd/codes", picture, step)
        writer.flush()
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "chance" not in k)
    log.info("eval step %d epoch %d %s", step, epoch, shown)
    return metrics
