"""What a dataset is, read once from its manifest, for the model's heads and the objectives.

Objectives and heads read no files: whoever builds them (the training loop,
the captioning task, a test) reads the dataset's :class:`DatasetInfo` once
and hands it over. It holds the manifest's vocabularies (object classes,
attributes, segmentation classes, the RoI feature width) and the optional
``image_text`` columns the dataset fills (``phrase_label_sim``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from vlptune.data.shards import read_manifest
from vlptune.data.similarity import MANIFEST_KEY as SIMILARITY_MANIFEST_KEY
from vlptune.data.similarity import SIMILARITY_COLUMN

# optional image_text column a manifest can say is filled -> (that manifest entry, what the column holds in words)
FILLED_COLUMNS = {SIMILARITY_COLUMN: (SIMILARITY_MANIFEST_KEY, "phrase-label similarities")}


def describe_columns(columns: Iterable[str]) -> str:
    """``phrase-label similarities (image_text column 'phrase_label_sim')`` for each column, for messages."""
    return " and ".join(f"{FILLED_COLUMNS[c][1] if c in FILLED_COLUMNS else c} (image_text column {c!r})" for c in sorted(columns))


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's vocabularies and optional columns (see the module docstring)."""

    root: Path
    vocabularies: dict[str, Any]
    columns: frozenset[str]

    @classmethod
    def from_manifest(cls, root: str | Path, manifest: dict[str, Any]) -> DatasetInfo:
        present = frozenset(column for column, (key, _) in FILLED_COLUMNS.items() if key in manifest)
        return cls(Path(root), dict(manifest["vocabularies"]), present)

    @classmethod
    def read(cls, root: str | Path) -> DatasetInfo:
        """The info of the dataset at ``root`` (DataError naming the manifest when it is missing or invalid)."""
        return cls.from_manifest(root, read_manifest(root))

    def vocabulary(self, name: str) -> list[Any]:
        if name not in self.vocabularies:
            raise KeyError(f"{self.root / 'manifest.json'}: vocabularies has no {name!r}; it has {sorted(self.vocabularies)}")
        return list(self.vocabularies[name])

    @property
    def num_classes(self) -> int:
        return len(self.vocabulary("classes"))

    @property
    def num_attributes(self) -> int:
        return len(self.vocabulary("attributes"))

    @property
    def num_segmentation_classes(self) -> int:
        return len(self.vocabulary("segmentation_classes"))

    @property
    def roi_feature_dim(self) -> int:
        return int(self.vocabularies["roi_feature_dim"])
