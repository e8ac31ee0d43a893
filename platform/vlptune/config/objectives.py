"""Objective configs: each pretext task's own recipe section, registered by name.

A recipe's ``objectives`` maps a registered name to its config. A config class
registers itself when it is defined, ``class MLMConfig(ObjectiveConfig,
objective="mlm")``, so recipes validate without importing torch or building a
model. The implementation (an ``nn.Module`` in :mod:`vlptune.objectives`)
registers under the same name with ``@register("mlm")`` and finds its config
class here; these are the only two places an objective's name is written.

The config class is also the objective's torch-free contract with the rest of
the platform: which recipes it refuses (:meth:`ObjectiveConfig.check_recipe`),
which optional data columns it reads (:meth:`ObjectiveConfig.required_columns`)
and what it can do for others (``scores_pairs``: the loop's zero-shot
retrieval ranks with it; ``generates_captions``: ``vlptune caption`` decodes
with it). Searches, studies and the data preparation ask these questions
without importing an ``nn.Module``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from vlptune.config.base import ConfigError, Section
from vlptune.errors import did_you_mean
from vlptune.grid import grid_stride

if TYPE_CHECKING:  # recipe.py imports this module: the annotation only
    from vlptune.config.recipe import Recipe

SIMILARITY_COLUMN = "phrase_label_sim"  # image_text column of phrase-label similarities (KD-VLP), filled by vlptune.data.similarity
RELEASE_MVM_PROB = 0.015  # the release's mask_prob, per row
DECODER_FIELD = "decoder_layers"  # an objective with this field asks for the one shared Transformer decoder, of that depth

_CONFIGS: dict[str, type[ObjectiveConfig]] = {}


class ObjectiveConfig(Section):
    """Fields every objective has; a subclass names its objective with ``objective="name"``."""

    def __init_subclass__(cls, objective: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if objective is None:
            return
        existing = _CONFIGS.get(objective)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"objective {objective!r}: two config classes ({existing.__qualname__} and {cls.__qualname__})")
        _CONFIGS[objective] = cls

    scores_pairs: ClassVar[bool] = False  # its module's match_score(fused, text_mask) scores image-text pairs
    generates_captions: ClassVar[bool] = False  # its module's generate(memory, ...) decodes captions

    weight: float = Field(1.0, ge=0.0, le=100.0, description="weight of this loss in the total; 0 switches the objective off")

    def required_columns(self) -> tuple[str, ...]:
        """The optional ``image_text`` columns this objective reads (``phrase_label_sim``); the data is prepared with them."""
        return ()

    def check_recipe(self, recipe: Recipe) -> None:
        """Refuse (ConfigError naming the fields) a recipe this objective cannot train with; runs before anything is built."""
        return None


def names() -> list[str]:
    """Every registered objective name, sorted."""
    return sorted(_CONFIGS)


def unknown_objective(name: str) -> ConfigError:
    return ConfigError(f"objectives.{name}: unknown objective {name!r}{did_you_mean(name, _CONFIGS)}; registered: {', '.join(sorted(_CONFIGS))}")


def config_class(name: str) -> type[ObjectiveConfig]:
    """The config class registered under ``name``; ConfigError naming the known ones otherwise."""
    if name not in _CONFIGS:
        raise unknown_objective(name)
    return _CONFIGS[name]


def check_objectives(recipe: Recipe) -> None:
    """Let every active objective refuse the recipe (ConfigError naming the fields); refuse a recipe that trains nothing."""
    active = recipe.active_objectives()
    if not active:
        raise ConfigError("objectives: no objective has a weight > 0; nothing to train")
    for cfg in active.values():
        cfg.check_recipe(recipe)


def required_columns(recipe: Recipe) -> frozenset[str]:
    """The optional ``image_text`` columns the recipe's active objectives read."""
    return frozenset(column for cfg in recipe.active_objectives().values() for column in cfg.required_columns())


def pair_scorer_names() -> list[str]:
    """The objectives whose module scores image-text pairs (retrieval needs one)."""
    return [name for name in names() if _CONFIGS[name].scores_pairs]


def caption_generator_names() -> list[str]:
    """The objectives whose module decodes captions."""
    return [name for name in names() if _CONFIGS[name].generates_captions]


def check_decoder_agreement(recipe: Recipe) -> None:
    """Refuse a recipe whose active decoder objectives (those with a ``decoder_layers`` field) ask for different depths: they share one decoder."""
    depths = {name: int(getattr(cfg, DECODER_FIELD)) for name, cfg in recipe.active_objectives().items() if DECODER_FIELD in type(cfg).model_fields}
    if len(set(depths.values())) > 1:
        detail = ", ".join(f"objectives.{name}.{DECODER_FIELD}={value}" for name, value in depths.items())
        raise ConfigError(f"{detail}: {' and '.join(depths)} share one decoder; set the same {DECODER_FIELD} for all of them")


def patch_geometry(patch: int, stride: int) -> tuple[int, int]:
    """(patches per cell side, cells per patch side) of SSUL's pixel patches on a grid of ``stride``: one of them is 1."""
    if stride % patch == 0:
        return stride // patch, 1
    if patch % stride == 0:
        return 1, patch // stride
    raise ConfigError(
        f"objectives.ssul.patch_size={patch} and the grid stride {stride} (32 * model.backbone.pool) do not nest: "
        f"choose a patch_size that divides {stride} or is a multiple of it"
    )


def validate_objective(name: str, spec: Any) -> ObjectiveConfig:
    """``spec`` (a mapping, None for the defaults, or an already validated config) as ``name``'s config."""
    config_cls = config_class(name)
    if isinstance(spec, config_cls):
        return spec
    return config_cls.model_validate(spec if spec is not None else {})


# ---------------------------------------------------------------------- mlm


class MLMConfig(ObjectiveConfig, objective="mlm"):
    """Masked language modelling; masking probability lives in data.mlm_prob."""


# ---------------------------------------------------------------------- itm


class ITMConfig(ObjectiveConfig, objective="itm"):
    """Image-text matching; positives/negatives per image live in data.itm_positives/itm_negatives."""

    pooling: Literal["cls", "mean", "product"] = Field(
        "cls",
        description="what the head reads: 'cls' the fused [CLS] state (SOHO); 'mean' the mean of all real text and image states; "
        "'product' the element-wise product of the mean text state and the mean image state (a bilinear match feature, fastest start)",
    )
    negatives: Literal["random", "hard", "sampled"] = Field(
        "random", description="negative captions: 'random' from the collate (SOHO), 'hard' / 'sampled' by MVPTR's VSC similarities (needs objectives.vsc)"
    )

    scores_pairs = True  # ITM.match_score ranks the loop's zero-shot retrieval

    def check_recipe(self, recipe: Recipe) -> None:
        if self.negatives != "random" and "vsc" not in recipe.active_objectives():
            raise ConfigError(
                f"objectives.itm.negatives={self.negatives!r} chooses negatives by VSC similarities: give objectives.vsc a weight > 0 "
                "(it needs model.fusion.unimodal_layers > 0) or set objectives.itm.negatives=random"
            )


# ---------------------------------------------------------------------- mvm


class MVMConfig(ObjectiveConfig, objective="mvm"):
    prob: float = Field(1.0, ge=0.0, le=1.0, description="probability that a positive pair gets MVM (released SOHO code: 0.015)")
    masking: Literal["pair", "release"] = Field(
        "pair",
        description="pair: each selected pair masks an index drawn uniformly among its image's indices; release: one grid position for the whole batch, "
        "each selected pair masks the index found there (chosen in proportion to its area; a position on padding masks nothing)",
    )
    head: Literal["linear", "cosine"] = Field(
        "linear",
        description="linear: BERT transform + linear over the codes; cosine: the release's cosine between the fused state and each code, no temperature",
    )
    variant: Literal["paper", "release"] = Field(
        "paper", description="preset: release sets prob 0.015, masking release and head cosine unless the field is given; paper changes nothing"
    )
    fusion_pass: Literal["separate", "shared"] = Field(
        "shared",
        description="shared: one pass over the positives with MLM's masked text and MVM's masked cells at once (the SOHO release), one Transformer pass "
        "fewer per step; separate: MVM's own fusion pass over its pairs with clean text (MLM has another, with the clean image); with MLM off: separate",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_variant(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("variant") == "release":
            return {"prob": RELEASE_MVM_PROB, "masking": "release", "head": "cosine", **data}
        return data

    def check_recipe(self, recipe: Recipe) -> None:
        if self.weight > 0 and recipe.model.vd.size == 0:
            raise ConfigError(
                f"objectives.mvm.weight={self.weight} needs the visual dictionary, but model.vd.size=0 switches it off: "
                "set model.vd.size > 0 or objectives.mvm.weight=0"
            )


# ---------------------------------------------------------------- backbone_cls


class BackboneClsConfig(ObjectiveConfig, objective="backbone_cls"):
    """Supervised pretraining of the CNN alone (``vlptune backbone pretrain``): multi-label classification of the objects in each image."""

    labels: Literal["classes", "classes_and_attributes"] = Field(
        "classes_and_attributes",
        description="what is predicted per image: the object classes present (synthetic world: shapes), or those and the attributes (colours, sizes)",
    )


# ---------------------------------------------------------------------- omvm


class OMVMConfig(ObjectiveConfig, objective="omvm"):
    """KD-VLP object-guided masked vision modelling (MRC + MRFR on one masked object per positive pair)."""

    mrc_weight: float = Field(
        1.0, ge=0.0, le=100.0, description="weight of masked region classification (cross-entropy over object classes) inside OMVM (KD-VLP: 1)"
    )
    mrfr_weight: float = Field(1.0, ge=0.0, le=100.0, description="weight of masked region feature regression (L2 to the RoI feature) inside OMVM (KD-VLP: 1)")
    sampling: Literal["guided", "random"] = Field(
        "guided",
        description="guided: knowledge-guided choice of the masked object by phrase-label similarity (KD-VLP); random: uniform (the paper's RandomMVM row)",
    )
    guide_temperature: float = Field(0.1, gt=0.0, le=10.0, description="guided sampling: P(object) = softmax(max over phrases of alpha / guide_temperature)")
    prob: float = Field(1.0, ge=0.0, le=1.0, description="probability that a positive pair gets an object masked (KD-VLP: every pair)")

    def required_columns(self) -> tuple[str, ...]:
        return (SIMILARITY_COLUMN,) if self.sampling == "guided" else ()

    def check_recipe(self, recipe: Recipe) -> None:
        if self.weight > 0 and self.mrc_weight == 0 and self.mrfr_weight == 0:
            raise ConfigError(
                f"objectives.omvm.weight={self.weight} but mrc_weight and mrfr_weight are both 0: nothing to train; set one > 0 or objectives.omvm.weight=0"
            )


# ---------------------------------------------------------------------- pra


class PRAConfig(ObjectiveConfig, objective="pra"):
    """KD-VLP phrase-region alignment: KL between cross-modal and phrase-label similarity distributions."""

    sim_temperature: float = Field(
        0.1, gt=0.0, le=10.0, description="temperature of the softmax over cross-modal cosine similarities (phrase state vs object state)"
    )
    label_temperature: float = Field(0.1, gt=0.0, le=10.0, description="temperature of the softmax over phrase-label similarities alpha (the target)")

    def required_columns(self) -> tuple[str, ...]:
        return (SIMILARITY_COLUMN,)


# ---------------------------------------------------------------------- ssul


class SSULConfig(ObjectiveConfig, objective="ssul"):
    """Masked-patch mean-colour regression (semantic visual loss paper)."""

    mask_ratio: float = Field(0.15, gt=0.0, le=1.0, description="fraction of each image's patches that are masked (paper: 0.15)")
    patch_size: int = Field(
        32, ge=1, le=1024, description="side of the masked pixel patches (paper: 32); must divide or be a multiple of the grid stride 32 * model.backbone.pool"
    )
    source: Literal["fusion", "grid"] = Field(
        "fusion", description="visual outputs the head reads: final image states of the fusion pass on positive pairs, or the grid features before fusion"
    )

    def check_recipe(self, recipe: Recipe) -> None:
        patch_geometry(self.patch_size, grid_stride(recipe.model.backbone.pool))


# ---------------------------------------------------------------------- segl


class SEGLConfig(ObjectiveConfig, objective="segl"):
    """Per-cell segmentation cross-entropy (semantic visual loss paper)."""

    source: Literal["fusion", "grid"] = Field(
        "fusion", description="visual outputs the 1x1 conv reads: final image states of the fusion pass on positive pairs, or the grid features before fusion"
    )


# ---------------------------------------------------------------------- spl


class SPLConfig(ObjectiveConfig, objective="spl"):
    """Set prediction of the image's object labels with Hungarian matching (semantic visual loss paper)."""

    queries: int = Field(36, ge=1, le=1000, description="learned object queries of the decoder (paper: 36 or 100)")
    layers: int = Field(2, ge=1, le=12, description="Transformer decoder layers")
    heads: int = Field(0, ge=0, le=64, description="attention heads of the decoder; 0 = hidden size / 64")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout inside the decoder layers")
    no_object_weight: float = Field(0.1, ge=0.0, le=1.0, description="cross-entropy weight of the 'no object' class for unmatched queries (DETR: 0.1)")
    source: Literal["fusion", "grid"] = Field(
        "fusion",
        description="visual outputs the decoder attends to: final image states of the fusion pass on positive pairs, or the grid features before fusion",
    )


# ---------------------------------------------------------------------- detection


class DetectionConfig(ObjectiveConfig, objective="detection"):
    """E2E-VLP / DETR set prediction; defaults are DETR's (E2E-VLP follows it)."""

    decoder_layers: int = Field(6, ge=1, le=24, description="layers of the decoder shared with captioning (E2E-VLP: 6)")
    num_queries: int = Field(100, ge=1, le=1000, description="learned object queries per image (DETR / E2E-VLP: 100)")
    num_classes: int = Field(0, ge=0, le=100_000, description="object classes; 0 = the 'classes' vocabulary of the manifest in data.root")
    num_attributes: int = Field(0, ge=0, le=100_000, description="attribute vocabulary size; 0 = the 'attributes' vocabulary of the manifest in data.root")
    eos_coef: float = Field(0.1, ge=0.0, le=1.0, description="weight of the no-object class in the class loss (DETR: 0.1)")
    cost_class: float = Field(1.0, ge=0.0, le=100.0, description="matcher: weight of -p(target class) (DETR: 1)")
    cost_bbox: float = Field(5.0, ge=0.0, le=100.0, description="matcher: weight of the L1 box distance (DETR: 5)")
    cost_giou: float = Field(2.0, ge=0.0, le=100.0, description="matcher: weight of -GIoU (DETR: 2)")
    class_weight: float = Field(1.0, ge=0.0, le=100.0, description="loss: weight of the class cross-entropy (DETR: 1)")
    bbox_weight: float = Field(5.0, ge=0.0, le=100.0, description="loss: weight of the L1 box loss (DETR: 5)")
    giou_weight: float = Field(2.0, ge=0.0, le=100.0, description="loss: weight of the GIoU loss (DETR: 2)")
    attr_weight: float = Field(1.0, ge=0.0, le=100.0, description="loss: weight of the attribute BCE on matched queries")
    aux_loss: bool = Field(True, description="add the same losses on every intermediate decoder layer (DETR's auxiliary decoding losses)")

    def check_recipe(self, recipe: Recipe) -> None:
        check_decoder_agreement(recipe)
        if self.cost_class == 0 and self.cost_bbox == 0 and self.cost_giou == 0:
            raise ConfigError("objectives.detection.cost_class, cost_bbox and cost_giou are all 0: the matcher needs at least one positive cost")


# ---------------------------------------------------------------------- captioning


class CaptioningConfig(ObjectiveConfig, objective="captioning"):
    """E2E-VLP's image-to-text generation on positive pairs."""

    decoder_layers: int = Field(6, ge=1, le=24, description="layers of the decoder shared with detection (E2E-VLP: 6)")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0, description="label smoothing of the token cross-entropy")

    generates_captions = True  # Captioning.generate decodes captions for `vlptune caption`

    def check_recipe(self, recipe: Recipe) -> None:
        check_decoder_agreement(recipe)


# ---------------------------------------------------------------------- vsc


class VSCConfig(ObjectiveConfig, objective="vsc"):
    """MVPTR's in-batch contrastive loss between the uni-modal text [CLS] and image embeddings."""

    embed_dim: int = Field(256, ge=8, le=4096, description="width of the projected, L2-normalised embeddings (ALBEF/MVPTR: 256)")
    temperature: float = Field(0.07, gt=0.0, le=1.0, description="initial value of the learnable softmax temperature (MVPTR: 0.07)")
    min_temperature: float = Field(0.001, gt=0.0, le=1.0, description="lower clamp of the learnable temperature (ALBEF: 0.001)")
    max_temperature: float = Field(0.5, gt=0.0, le=1.0, description="upper clamp of the learnable temperature (ALBEF: 0.5)")
    text_pooling: Literal["cls", "mean"] = Field(
        "cls",
        description="uni-modal text embedding: the [CLS] state (MVPTR) or the mean token state (what the packaged MiniLM was trained for; its early-layer [CLS] is nearly constant)",
    )

    @model_validator(mode="after")
    def _temperature_in_range(self) -> VSCConfig:
        if not self.min_temperature <= self.temperature <= self.max_temperature:
            raise ValueError(f"temperature={self.temperature} must lie in [min_temperature={self.min_temperature}, max_temperature={self.max_temperature}]")
        return self

    def check_recipe(self, recipe: Recipe) -> None:
        fusion = recipe.model.fusion
        if fusion.unimodal_layers == 0:
            raise ConfigError(
                f"objectives.vsc.weight={self.weight} needs MVPTR's uni-modal stage, but model.fusion.unimodal_layers=0: "
                f"set model.fusion.unimodal_layers between 1 and model.fusion.layers-1={fusion.layers - 1}"
            )


# ---------------------------------------------------------------------- wpg


class WPGConfig(ObjectiveConfig, objective="wpg"):
    """MVPTR's phrase-region grounding hinge."""

    margin: float = Field(0.2, ge=0.0, le=2.0, description="hinge margin between the positive and the negative image's grounding score (MVPTR: 0.2)")
