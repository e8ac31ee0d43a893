"""Typed trial recipes.

A recipe is a YAML file validated into :class:`Recipe`. Every field has a
type, a default, a range and a one-line description (``Field(description=...)``),
so ``vlptune config schema`` can print a JSON schema for editors.

Recipes compose:

* ``base: other.yaml`` inherits another recipe (path relative to the file),
  deep-merged, to any depth; cycles are refused.
* dotted overrides ``-o model.vd.size=4096`` are applied after the files.

Objectives are plug-ins: ``objectives`` maps a registered objective name to its
own config model (see :mod:`vlptune.config.objectives`), so adding an
objective never touches this file.

Every error is a :class:`ConfigError` whose message names the file, the dotted
field path, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from vlptune.config import downstream as task_configs
from vlptune.config import objectives as objective_configs
from vlptune.config.base import ConfigError, Section
from vlptune.config.fields import describe_allowed, unknown_field_hint

RECIPE_SUFFIXES = (".yaml", ".yml")


# --------------------------------------------------------------------------- data


class SynthConfig(Section):
    """How the synthetic world is generated when ``data.root`` does not exist yet."""

    train: int = Field(2000, ge=1, le=10_000_000, description="images in the train split")
    val: int = Field(200, ge=1, le=1_000_000, description="images in the val split (retrieval evaluation)")
    test: int = Field(0, ge=0, le=1_000_000, description="images in the test split")
    image_size: int = Field(96, ge=16, le=2048, description="shorter side of the generated images, pixels")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the world; same seed, same bytes")
    shard_size: int = Field(1000, ge=1, le=1_000_000, description="records per Parquet shard")
    caption_style: Literal["varied", "descriptive"] = Field(
        "varied",
        description="'varied': objects, lists, counts, positions and relations, colours often left out; "
        "'descriptive': every mentioned object named with its colour, so another image's caption almost never fits (tiny CPU demos)",
    )


class SourceConfig(Section):
    """One converted dataset of a pretraining mixture (``data.sources``)."""

    root: str = Field(..., min_length=1, description="directory of a converted dataset (manifest.json + shards), e.g. data/coco")
    weight: float = Field(1.0, gt=0.0, le=1000.0, description="sampling weight: this source's share of an epoch is weight / sum of the weights")


class DataConfig(Section):
    root: str = Field("data/synth", description="directory of Parquet shards with a manifest.json (relative paths: to the working directory)")
    synthesize: bool = Field(True, description="generate the synthetic world into root when it has no manifest")
    synth: SynthConfig = Field(default_factory=SynthConfig, description="synthetic world settings, used when synthesize is on")
    sources: list[SourceConfig] = Field(
        default_factory=list,
        max_length=64,
        description="pretraining mixture: roots sampled by weight for training (empty: data.root alone); "
        "data.root still gives the vocabularies (object classes) the heads use",
    )
    train_split: str = Field("train", min_length=1, description="split used for training")
    val_split: str = Field("val", min_length=1, description="split used for evaluation")
    image_size: int = Field(600, ge=16, le=2048, description="resize the shorter side to this many pixels (square mode: both sides)")
    max_long_side: int = Field(1000, ge=16, le=4096, description="cap on the longer side after resizing (paper style 600x1000)")
    resize_mode: Literal["shorter_side", "square"] = Field("shorter_side", description="paper-style aspect-preserving resize, or a square resize")
    random_resized_crop: bool = Field(False, description="random resized crop before resizing (train only)")
    crop_scale_min: float = Field(0.5, gt=0.0, le=1.0, description="smallest crop area fraction for random resized crop")
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip, never applied when a caption says left or right (train only)")
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="per-channel normalisation mean (RGB, 0..1)")
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="per-channel normalisation std (RGB, 0..1)")
    tokenizer: str = Field("minilm", min_length=1, description="'minilm' (the packaged MiniLM WordPiece vocab) or a local HF tokenizer directory")
    max_text_len: int = Field(40, ge=8, le=512, description="WordPiece tokens per caption including [CLS] and [SEP]")
    mlm_prob: float = Field(0.15, ge=0.0, le=1.0, description="fraction of caption tokens selected for MLM (then 80% [MASK], 10% random, 10% kept)")
    itm_positives: int = Field(2, ge=1, le=16, description="positive captions per image in a batch (SOHO: 2)")
    itm_negatives: int = Field(2, ge=0, le=16, description="negative captions per image in a batch (SOHO: 2)")
    batch_images: int = Field(8, ge=1, le=4096, description="images per worker per step (each with positives+negatives captions)")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes per training worker")
    shape_buckets: int = Field(
        0,
        ge=0,
        le=64,
        description="0: pad each batch to its largest image (any shape); n: pad each side up to the next of n lengths evenly spaced from image_size "
        "to max_long_side (multiples of the grid stride), so the model sees at most n x n shapes (for train.compile)",
    )
    jpeg_draft: bool = Field(
        True,
        description="decode a JPEG that the resize shrinks at a reduced size (PIL draft mode: 1/2, 1/4 or 1/8 scale, never below the resize target); off = full-size decode then resize",
    )
    decode: Literal["cpu", "gpu"] = Field(
        "cpu",
        description="where images are decoded and transformed: cpu (PIL, in the DataLoader workers) or gpu (torchvision.io.decode_jpeg on CUDA in the training process, "
        "the transform on the GPU; needs the 'gpu' extra, CUDA and num_workers 0; non-JPEG images are decoded by PIL)",
    )
    pin_memory: Literal["auto", "always", "never"] = Field(
        "auto", description="page-locked batches so host-to-GPU copies run asynchronously: auto = when training on CUDA with data.decode cpu"
    )
    prefetch_factor: int = Field(2, ge=1, le=64, description="batches each DataLoader worker prepares ahead (num_workers > 0)")
    max_objects: int = Field(8, ge=1, le=256, description="objects kept per image (boxes, labels, grid masks)")
    verify_shards: bool = Field(
        True,
        description="check each shard's sha256 against the manifest when a run first opens it (once per process; a mismatch stops the run naming the shard)",
    )
    max_skip_fraction: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="a run whose share of corrupt (skipped) training records exceeds this stops with that reason (checked at each evaluation once 100 records were read; 1 = never)",
    )


# -------------------------------------------------------------------------- model


CACHED_BACKBONE = "pretrained"  # model.backbone.init: the backbone pretrained on the recipe's data (train/backbone_pretrain.py)


class BackboneConfig(Section):
    depth: Literal[18, 34, 50, 101, 152] = Field(18, description="ResNet depth")
    width_mult: float = Field(1.0, ge=0.03125, le=4.0, description="channel width multiplier (below 1 for tiny CPU variants)")
    init: str = Field(
        "random",
        min_length=1,
        description="'random'; 'pretrained' (this ResNet pretrained on the recipe's data by `vlptune backbone pretrain`, cached under data.root/backbones, made on first use); a local directory holding a HF ResNet checkpoint; or a hub name",
    )
    frozen_bn: bool = Field(False, description="freeze BatchNorm statistics and affine parameters")
    frozen_stages: int = Field(0, ge=0, le=4, description="number of early stages (stem counts as part of stage 1) kept frozen for the whole run")
    freeze_for: int = Field(0, ge=0, le=10_000_000, description="freeze the whole CNN during the first N units (SOHO's cure for VD cold start)")
    freeze_unit: Literal["steps", "epochs"] = Field("steps", description="unit of freeze_for")
    pool: int = Field(2, ge=1, le=8, description="max-pool kernel and stride after the 1x1 projection (SOHO: 2; 1 keeps a usable grid on small images)")
    channels_last: bool = Field(
        False,
        description="run the CNN in the channels_last memory format (faster convolutions on GPU tensor cores, slower on CPU); the same maths, float rounding may differ",
    )
    pretrain_steps: int = Field(
        1000, ge=1, le=10_000_000, description="init 'pretrained' and `vlptune backbone pretrain`: optimiser steps of the supervised pretraining"
    )
    pretrain_batch_images: int = Field(16, ge=1, le=4096, description="init 'pretrained' and `vlptune backbone pretrain`: images per step")
    pretrain_lr: float = Field(
        2e-3,
        gt=0.0,
        le=10.0,
        description="init 'pretrained' and `vlptune backbone pretrain`: learning rate of the CNN and its classification head (the recipe's optim.backbone optimiser)",
    )


class VDConfig(Section):
    size: int = Field(2048, ge=0, le=65536, description="number of visual dictionary codes; 0 switches the VD off")
    momentum: float = Field(0.99, ge=0.0, lt=1.0, description="moving-average momentum g in d = g*d + (1-g)*mean(v)")
    laplace_eps: float = Field(0.0, ge=0.0, le=1.0, description="Laplace smoothing of code counts (release code: on); 0 = off")
    reseed_dead: bool = Field(False, description="re-seed codes unused for reseed_after updates from current features")
    reseed_after: int = Field(100, ge=1, le=1_000_000, description="updates without assignment after which a code counts as dead")
    gate: bool = Field(False, description="release code: learned gate mixing quantized and raw features (paper: off)")
    gate_form: Literal["channel", "cell_softmax"] = Field(
        "channel",
        description="with gate on: channel = a per-channel constant sigmoid(w); cell_softmax = the release's per-cell softmax over [pos_line(quantised), raw] from a 1x1 conv",
    )
    update_all: bool = Field(
        False,
        description="release code (needs laplace_eps > 0): every code is rewritten as smoothed sum / count each step, so unused codes drift and never-used ones become 0",
    )
    quantise_padding: bool = Field(
        False, description="release code: padded grid cells are quantised too and take part in the update (paper reading: real cells only)"
    )
    init: Literal["first_batch", "normal"] = Field(
        "first_batch", description="codes start as features of the first training batch, or N(0, 1) noise as in the release code"
    )
    variant: Literal["paper", "release"] = Field(
        "paper",
        description="preset: release sets every release-code behaviour above (momentum 0.4, laplace_eps 1e-5, update_all, quantise_padding, init normal, "
        "gate cell_softmax) unless the field is given; paper changes nothing",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_variant(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("variant") == "release":
            return {**RELEASE_VD, **data}
        return data

    @model_validator(mode="after")
    def _check_update_all(self) -> VDConfig:
        if self.update_all and self.laplace_eps == 0:
            raise ValueError("model.vd.update_all rewrites every code as smoothed sum / count: it needs model.vd.laplace_eps > 0 (the release code: 1e-5)")
        return self


RELEASE_VD: dict[str, Any] = {  # model.vd.variant: release (the SOHO release's SOHO_Pre_VD and SimpleVDforPreGate)
    "momentum": 0.4,
    "laplace_eps": 1e-5,
    "update_all": True,
    "quantise_padding": True,
    "init": "normal",
    "gate": True,
    "gate_form": "cell_softmax",
}


class FusionConfig(Section):
    init: str = Field("minilm", min_length=1, description="'minilm' (packaged 6-layer BERT), a local BERT directory or a hub name like bert-base-uncased")
    layers: int = Field(3, ge=1, le=48, description="keep the first N encoder layers of the checkpoint")
    max_grid: int = Field(64, ge=1, le=1024, description="largest grid side supported by the 2-D sine position embedding")
    grad_checkpointing: bool = Field(False, description="recompute encoder activations in backward to save memory")
    grid_norm_init: Literal["unit", "text"] = Field(
        "unit",
        description="start of the grid tokens' LayerNorm: 'unit' (weight 1, bias 0) or 'text' (a copy of the checkpoint's text-embedding LayerNorm, so grid tokens start at the scale the encoder was trained on)",
    )
    unimodal_layers: int = Field(
        0,
        ge=0,
        le=48,
        description="MVPTR two-stage split: the first N layers run text and image separately (uni-modal), the rest cross-modally; 0 = all cross-modal (SOHO); must stay below layers",
    )


class ModelConfig(Section):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig, description="the CNN on raw pixels")
    vd: VDConfig = Field(default_factory=VDConfig, description="the visual dictionary")
    fusion: FusionConfig = Field(default_factory=FusionConfig, description="the multi-modal BERT encoder")


# ------------------------------------------------------------------ optimisation


class GroupOptimConfig(Section):
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="optimizer of this parameter group")
    lr: float = Field(1e-4, gt=0.0, le=10.0, description="peak learning rate")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="decoupled (AdamW) or L2 (SGD) weight decay")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (ignored by AdamW)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (ignored by SGD)")


def _sgd_backbone() -> GroupOptimConfig:
    return GroupOptimConfig(optimizer="sgd", lr=1e-2, weight_decay=1e-4)


class OptimConfig(Section):
    backbone: GroupOptimConfig = Field(default_factory=_sgd_backbone, description="CNN parameters (SOHO: SGD, lr 1e-2)")
    transformer: GroupOptimConfig = Field(default_factory=GroupOptimConfig, description="everything else (SOHO: AdamW, lr 1e-4)")
    schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="decay after warmup")
    warmup_steps: int = Field(0, ge=0, le=10_000_000, description="linear warmup steps from 0 to the peak lr")
    step_milestones: list[float] = Field(
        default_factory=lambda: [0.7, 0.9], description="step schedule: fractions of training at which lr is multiplied by step_gamma"
    )
    step_gamma: float = Field(0.1, gt=0.0, le=1.0, description="step schedule multiplier")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine floor as a fraction of the peak lr")
    grad_clip: float = Field(1.0, ge=0.0, le=1e6, description="clip the global gradient norm to this; 0 = off")
    global_batch: int = Field(0, ge=0, le=1_000_000, description="images per optimizer step over all workers; 0 = batch_images x workers (no accumulation)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU")
    fused: Literal["auto", "always", "never"] = Field(
        "auto",
        description="fused optimiser kernels (torch's fused AdamW / SGD): auto = where torch has them for the parameters' device (CPU and CUDA); "
        "they also skip a non-finite step on the device, without a host sync; never = the foreach kernels (one host sync per step); always = fused or an error",
    )
    objective_grad_norms: bool = Field(
        True, description="log each objective's gradient norm on the shared parameters every train.log_every steps (one extra backward pass per logged step)"
    )
    balance: Literal["none", "gradnorm"] = Field(
        "none",
        description="per-objective loss balancing: none (the fixed objective weights) or gradnorm (GradNorm, Chen et al. 2018; train/balance.py)",
    )
    balance_alpha: float = Field(
        1.5, ge=0.0, le=10.0, description="GradNorm's alpha: how much an objective that trains slower gets a larger gradient norm (0: equal norms)"
    )
    balance_lr: float = Field(
        0.5, gt=0.0, le=1.0, description="GradNorm: fraction of the way each log scale moves toward its target per update (1: jump to it)"
    )
    balance_every: int = Field(
        10, ge=1, le=1_000_000, description="GradNorm: optimiser steps between measurements of the per-objective gradient norms and updates of the scales"
    )
    balance_max: float = Field(100.0, ge=1.0, le=1e4, description="GradNorm: each scale stays within [1/balance_max, balance_max]")

    @field_validator("step_milestones")
    @classmethod
    def _milestones_sorted(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < m < 1.0 for m in v) or v != sorted(v):
            raise ValueError("must be increasing fractions strictly between 0 and 1")
        return v


# ----------------------------------------------------------- training & eval


class TrainConfig(Section):
    max_steps: int = Field(1000, ge=1, le=100_000_000, description="optimizer steps (the fidelity of a trial)")
    eval_every: int = Field(200, ge=1, le=100_000_000, description="evaluate and report every N steps (and at the end)")
    log_every: int = Field(10, ge=1, le=1_000_000, description="log training scalars every N steps")
    checkpoint_every: int = Field(0, ge=0, le=100_000_000, description="checkpoint every N steps (0 = at each evaluation)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of weights, data order and masking")
    compile: bool = Field(
        False,
        description="torch.compile the backbone, projection and fusion encoder (the run reports compile/frames and compile/recompiles; see data.shape_buckets)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    nan_patience: int = Field(3, ge=1, le=1000, description="consecutive non-finite losses after which the run stops with a reason")
    keep_checkpoints: int = Field(
        1, ge=1, le=1000, description="checkpoints kept while a run goes on: the N best by the search's metric (the N latest without one) and always the latest"
    )
    keep_when_done: Literal["best", "last", "none"] = Field(
        "best", description="checkpoints kept once the run reached max_steps: the best by the search's metric (the last without one), the last, or none"
    )
    keep_when_stopped: Literal["best", "last", "none"] = Field(
        "none",
        description="checkpoints kept by a search trial that ended before max_steps (stopped by the scheduler or on non-finite losses, or failed): it never resumes",
    )


class EvalConfig(Section):
    max_images: int = Field(100, ge=2, le=1_000_000, description="images of the val split used for zero-shot retrieval")
    captions_per_image: int = Field(1, ge=1, le=32, description="captions per image used as retrieval queries")
    candidates: int = Field(0, ge=0, le=100_000, description="re-rank only the top-N candidates of a cheap first pass; 0 = score every pair")
    pair_batch: int = Field(256, ge=1, le=65536, description="image-text pairs scored per forward pass")
    loss_batches: int = Field(4, ge=0, le=100_000, description="val batches for validation losses and accuracies")
    vd_picture_codes: int = Field(8, ge=0, le=64, description="codes shown in the TensorBoard VD picture (0 = off)")


class ResourcesConfig(Section):
    workers: int = Field(1, ge=1, le=1024, description="Ray Train workers (data-parallel ranks)")
    cpus_per_worker: float = Field(1.0, gt=0.0, le=256.0, description="CPUs reserved per worker")
    gpus_per_worker: float = Field(0.0, ge=0.0, le=16.0, description="GPUs reserved per worker")
    torch_threads: int = Field(0, ge=0, le=256, description="torch intra-op threads per worker; 0 = cpus_per_worker rounded up")


def default_objectives() -> dict[str, Any]:
    """The objectives a recipe trains when it lists none (SOHO's three), as plain settings."""
    return {"mlm": {"weight": 1.0}, "itm": {"weight": 1.0}, "mvm": {"weight": 1.0}}


class Recipe(Section):
    """A full trial recipe."""

    name: str = Field("recipe", min_length=1, description="a short name for logs and reports")
    data: DataConfig = Field(default_factory=DataConfig, description="data, augmentation, tokenization and batching")
    model: ModelConfig = Field(default_factory=ModelConfig, description="backbone, visual dictionary, fusion Transformer")
    objectives: dict[str, Any] = Field(
        default_factory=default_objectives,
        validate_default=True,
        description="pretext tasks by registered name, each with its weight and own fields",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizers, schedule, clipping, accumulation, precision")
    train: TrainConfig = Field(default_factory=TrainConfig, description="steps, logging, checkpoints, seed")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="zero-shot retrieval and validation losses")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="workers and devices")
    downstream: dict[str, Any] = Field(
        default_factory=dict,
        description="downstream tasks by registered name (vqa, nlvr2, snli_ve, retrieval, captioning), each with its finetuning budget and settings; "
        "read by vlptune finetune (docs/finetuning.md)",
    )

    @field_validator("downstream", mode="before")
    @classmethod
    def _validate_downstream(cls, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValueError("must be a mapping of downstream task name to its settings")
        return {name: task_configs.validate_task(name, spec) for name, spec in value.items()}

    @field_validator("objectives", mode="before")
    @classmethod
    def _validate_objectives(cls, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValueError("must be a mapping of objective name to its settings")
        return {name: objective_configs.validate_objective(name, spec) for name, spec in value.items()}  # raises with the known names

    def active_objectives(self) -> dict[str, Any]:
        """Objectives with a positive weight, in recipe order."""
        return {name: cfg for name, cfg in self.objectives.items() if cfg.weight > 0}


# ------------------------------------------------------------------- loading


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: {}); ConfigError naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else in ``over`` replaces ``base``."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _leaf_paths(data: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_leaf_paths(value, path + "."))
        else:
            out.append(path)
    return out


def load_raw_with_sources(path: str | Path, _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """Resolve a YAML file's ``base:`` chain into one dict, and which file set each leaf."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"{path}: base: cycle: {cycle}")
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    sources = {leaf: str(path) for leaf in _leaf_paths(data)}
    if base is None:
        return data, sources
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a path string, found {base!r}")
    base_path = (path.parent / base).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: file not found: {base_path}")
    base_data, base_sources = load_raw_with_sources(base_path, (*_chain, path))
    return deep_merge(base_data, data), {**base_sources, **sources}


def load_raw(path: str | Path) -> dict[str, Any]:
    """Read a YAML file and resolve its ``base:`` chain into one plain dict."""
    return load_raw_with_sources(path)[0]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` -> (["a","b","c"], yaml-parsed VALUE)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty component in the dotted path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return parts, value


def set_dotted(data: dict[str, Any], parts: list[str], value: Any, source: str) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"{source}: {where} is a value ({nxt!r}), it has no field {parts[i + 1]!r}")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides or []:
        parts, value = parse_override(text)
        set_dotted(out, parts, value, f"override {text!r}")
    return out


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel] | None = None, prefix: str = "") -> str:
    lines = [f"{source}: invalid configuration:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        if prefix:
            dotted = f"{prefix}.{dotted}" if dotted else prefix
        if err["type"] == "extra_forbidden":
            lines.append(f"  {dotted}: unknown field (value {err.get('input')!r}); {unknown_field_hint(model, loc)}")
            continue
        allowed = describe_allowed(model, loc)
        line = f"  {dotted}: {err['msg']}; got {err.get('input')!r}"
        if allowed:
            line += f" ({allowed})"
        lines.append(line)
    return "\n".join(lines)


PLUGIN_SECTIONS = {"objectives": objective_configs.config_class, "downstream": task_configs.config_class}  # name -> its config class


def _validate_objectives(data: dict[str, Any], source: str) -> list[str]:
    """Validate each objective and downstream task entry with its registered config; error lines with dotted paths."""
    problems: list[str] = []
    for section, lookup in PLUGIN_SECTIONS.items():
        entries = data.get(section)
        if not isinstance(entries, dict):
            continue
        for name, spec in entries.items():
            try:
                config_cls: type[BaseModel] = lookup(name)
            except ConfigError as exc:
                problems.append(f"  {exc}")
                continue
            try:
                config_cls.model_validate(spec if spec is not None else {})
            except ValidationError as exc:
                text = format_validation_error(exc, source, config_cls, prefix=f"{section}.{name}")
                problems.extend(text.splitlines()[1:])
    return problems


def _annotate(problems: list[str], sources: dict[str, str]) -> list[str]:
    """Append ``(set in FILE)`` to an error line whose dotted path a file set."""
    out = []
    for line in problems:
        dotted = line.strip().split(":", 1)[0]
        origin = next((src for path, src in sources.items() if path == dotted or path.startswith(dotted + ".")), None)
        out.append(f"{line} [set in {origin}]" if origin else line)
    return out


def validate_recipe(data: dict[str, Any], source: str, sources: dict[str, str] | None = None) -> Recipe:
    """Validate a resolved recipe dict; every problem at once, each with its dotted path."""
    problems = _validate_objectives(data, source)
    without_objectives = {k: v for k, v in data.items() if k not in PLUGIN_SECTIONS or not isinstance(v, dict)}
    try:
        Recipe.model_validate(without_objectives)
    except ValidationError as exc:
        problems = format_validation_error(exc, source, Recipe).splitlines()[1:] + problems
    if problems:
        problems = _annotate(problems, sources or {})
        raise ConfigError("\n".join([f"{source}: invalid configuration:", *problems]))
    return Recipe.model_validate(data)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file, resolve ``base:``, apply dotted overrides, validate."""
    raw, sources = load_raw_with_sources(path)
    for text in overrides or []:
        sources[".".join(parse_override(text)[0])] = f"override {text!r}"
    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return validate_recipe(apply_overrides(raw, overrides), source, sources)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain JSON types (tuples as lists), as it is written to files."""
    plain: dict[str, Any] = json.loads(recipe.model_dump_json())
    return plain


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def json_schema() -> dict[str, Any]:
    """JSON schema of a recipe, objectives and downstream tasks expanded from their registries."""
    schema = Recipe.model_json_schema()
    defs = schema.setdefault("$defs", {})
    registries = {"objectives": objective_configs.names(), "downstream": task_configs.names()}
    for section, lookup in PLUGIN_SECTIONS.items():
        props: dict[str, Any] = {}
        for name in registries[section]:
            sub = lookup(name).model_json_schema()
            for key, value in sub.pop("$defs", {}).items():
                defs[key] = value
            props[name] = sub
        schema["properties"][section] = {
            "type": "object",
            "description": Recipe.model_fields[section].description,
            "properties": props,
            "additionalProperties": False,
        }
    schema["properties"]["base"] = {"type": "string", "description": "path of a recipe this one extends (relative to this file)"}
    return schema
