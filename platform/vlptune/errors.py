"""User-facing errors: which exceptions the `vlptune` command reports as one message, and "did you mean".

A command raises one of the project's error classes for bad input (a recipe
field, a missing dataset, a directory that is not an experiment...); the
top-level :func:`vlptune.cli.main` prints its message as ``vlptune: <message>``
on stderr and exits with :data:`EXIT_USER_ERROR`, never with a traceback. Any
other exception is a bug and keeps its traceback.

The classes are named by module and class name (:data:`USER_ERRORS`) and
looked up in :data:`sys.modules` only when an exception arrives: a module that
was never imported cannot have raised its error, and the command line stays
as quick to start as before (no module is imported for this).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable

EXIT_USER_ERROR = 2  # like argparse's usage errors

# (module, class) of every error that means "bad input", with its message written for the user.
# Subclasses count too: PromotionError and FidelityMapError are ConfigErrors.
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("vlptune.config", "ConfigError"),  # recipes, -o overrides, search-space, study and fidelity-map files
    ("vlptune.data.schema", "DataError"),  # datasets: manifests, shards, records
    ("vlptune.data.text", "TokenizerError"),  # data.tokenizer that cannot be loaded
    ("vlptune.search.layout", "SearchError"),  # experiments that cannot start, resume or be read
    ("vlptune.study.ablation", "StudyError"),  # ablation studies
    ("vlptune.study.importance", "ImportanceError"),  # importance of a search's parameters
    ("vlptune.train.checkpoint", "CheckpointError"),  # checkpoints that cannot be read back
    ("vlptune.cluster.storage", "StorageError"),  # search storage paths
    ("vlptune.cluster.submit", "ClusterError"),  # Ray clusters and jobs
    ("vlptune.cluster.session", "SessionError"),  # Ray clusters that cannot be joined
)

SUGGESTION_CUTOFF = 0.6  # difflib's similarity ratio (its default) a name needs to be suggested
MAX_SUGGESTIONS = 3


def user_error_types() -> tuple[type[BaseException], ...]:
    """The classes of :data:`USER_ERRORS` whose modules are imported (the others cannot have been raised)."""
    found = []
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, user_error_types())


def did_you_mean(word: str, choices: Iterable[str], aside: bool = True) -> str:
    """``" (did you mean 'x'?)"`` naming the choices closest to ``word`` (case ignored); "" when none is close.

    ``aside=False``: the bare ``"did you mean 'x'?"``. The one helper for unknown keys: recipe
    fields, ``-o`` overrides, search-space and study paths, objective names.
    """
    by_lower: dict[str, str] = {}
    for choice in choices:
        by_lower.setdefault(str(choice).lower(), str(choice))
    matches = difflib.get_close_matches(str(word).lower(), list(by_lower), n=MAX_SUGGESTIONS, cutoff=SUGGESTION_CUTOFF)
    if not matches:
        return ""
    phrase = f"did you mean {' or '.join(repr(by_lower[m]) for m in matches)}?"
    return f" ({phrase})" if aside else phrase
