"""What is made ready and checked before any trial of an experiment starts: its data and its storage.

* :func:`prepare_recipes_data`: the synthetic world of each data root, generated
  once by the driver (the trials would all wait on its lock), and a world that
  lacks what a recipe needs refused before any trial starts;
* :func:`check_experiment_storage`: an experiment the nodes of the cluster
  cannot all reach (a local directory on several nodes) refused once the
  cluster is joined (:func:`vlptune.cluster.storage.check_storage`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vlptune.cluster import storage
from vlptune.cluster.storage import StorageError, check_storage
from vlptune.config import Recipe
from vlptune.config.objectives import required_columns
from vlptune.data.info import DatasetInfo, describe_columns
from vlptune.data.prepare import check_sources, ensure_data
from vlptune.data.schema import DataError
from vlptune.data.shards import MANIFEST_NAME
from vlptune.search.layout import SearchError
from vlptune.search.location import Location
from vlptune.search.space import SearchSpace

log = logging.getLogger(__name__)


def prepare_data(space: SearchSpace) -> None:
    """Generate the synthetic world once, before trials start (they would all wait on its lock)."""
    prepare_recipes_data([space.base_recipe])


def prepare_recipes_data(recipes: list[Recipe]) -> None:
    """Generate the synthetic world of each data root once, before trials start.

    Recipes sharing a root get one world, with phrase-label similarities when
    any of them needs them (guided OMVM, PRA). A world that already exists
    without them while a recipe needs them is refused here, before any trial
    starts, instead of failing in every trial that needs them; so is a
    mixture source (``data.sources``) that holds no dataset.
    """
    by_root: dict[Path, tuple[Recipe, frozenset[str]]] = {}
    for recipe in recipes:
        root = Path(recipe.data.root).resolve()
        columns = required_columns(recipe)
        first, wanted = by_root.get(root, (recipe, frozenset()))
        by_root[root] = (recipe if columns - wanted else first, wanted | columns)  # the recipe that generates: one needing the most
    for root, (recipe, columns) in by_root.items():
        if (root / MANIFEST_NAME).is_file():
            missing = sorted(columns - DatasetInfo.read(root).columns)
            if missing:
                raise SearchError(
                    f"{root}: this dataset has no {describe_columns(missing)} (its manifest does not record them), "
                    "but a trial's objectives need them; delete the directory so it is generated again "
                    "with them, or set data.root to another directory"
                )
            continue
        if not recipe.data.synthesize:
            continue
        log.info("preparing data in %s", root)
        ensure_data(recipe, columns)
    for recipe in recipes:  # after data.root's world is generated: it may be one of the sources
        try:
            check_sources(recipe)
        except DataError as exc:
            raise SearchError(str(exc)) from None


def cluster_nodes() -> list[dict[str, Any]] | int:
    """``ray.nodes()`` of the cluster joined (1 when Ray is not initialised)."""
    import ray  # heavy dependency kept lazy

    return ray.nodes() if ray.is_initialized() else 1


def check_experiment_storage(
    location: Location, shared: bool = False, nodes: list[dict[str, Any]] | int | None = None, mounts_file: str | Path | None = None
) -> None:
    """Refuse (:class:`SearchError`) an experiment the nodes of the cluster cannot all reach.

    ``nodes``: ``ray.nodes()``'s list or a count; default: asked of the Ray
    this process joined. ``shared``: the user says every node mounts the
    directory (``--shared-storage``). See :func:`vlptune.cluster.storage.check_storage`.
    """
    try:
        check_storage(
            location.uri or location.local, cluster_nodes() if nodes is None else nodes, assume_shared=shared, mounts_file=mounts_file or storage.MOUNTS_FILE
        )  # MOUNTS_FILE read when called
    except StorageError as exc:
        local_path = location.uri is None or location.uri.startswith("file://")
        hint = (
            ""
            if shared or not local_path
            else ("; if every node does mount this directory at the same path (a shared filesystem vlptune does not recognise), pass --shared-storage")
        )
        raise SearchError(f"{exc}{hint}") from None
