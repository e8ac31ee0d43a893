"""E2E-VLP's Transformer decoder over the fused encoder output, shared by detection and captioning.

Architecture: ``layers`` post-norm Transformer decoder layers (self-attention,
cross-attention to the encoder output, GELU feed-forward), the width, heads,
feed-forward size and dropout of the fusion BERT, randomly initialised
(normal, std 0.02, BERT's ``initializer_range``). E2E-VLP uses 6 layers.
The encoder states already carry the 2-D sine positions of the grid cells (added
to the cell embeddings before the encoder), so the decoder adds no
positional encoding of its own to the memory.

Memory (what the decoder attends to): the encoder run on the **image alone**,
i.e. the text side reduced to ``[CLS] [SEP]`` (:func:`image_only_memory`). The
captioning decoder therefore never sees the caption through the encoder (no
copy task), and detection reads visual evidence only. Both objectives compute
it through the step context's view ``"image_only"``, so it runs once per step
when both are active.

Sharing: the decoder is a sub-module of the ``VLPModel`` under the name
``decoder``, created by the first objective that asks for it
(:func:`get_or_create_decoder`) while the objectives are constructed, i.e.
before the optimisers are built, so it is in the ``transformer`` parameter
group, in checkpoints (``model.decoder.*``) and in DDP like every other
parameter. A second objective asking with the same layer count gets the same
module; a different count is refused (``vlptune.config.objectives.check_decoder_agreement`` refuses
it earlier, from the recipe, naming both fields).

:func:`beam_search` is the generic left-to-right search (greedy when the beam
is 1) used by captioning and ``vlptune caption``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlptune.config import ConfigError
from vlptune.config.objectives import DECODER_FIELD
from vlptune.data.text import load_tokenizer

DECODER_ATTR = "decoder"  # name of the shared decoder on the VLPModel
INIT_STD = 0.02  # BERT's initializer_range
# The config field by which an objective asks for the shared decoder, and its depth.


@dataclass(frozen=True)
class DecoderSpec:
    """Everything that fixes the decoder's shape (two requests with equal specs share one module)."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    dropout: float


class TransformerDecoder(nn.Module):
    """``layers`` post-norm decoder layers (batch first).

    ``forward(tgt [N,L,D], memory [N,S,D], memory_mask bool [N,S] True = real,
    tgt_mask bool [N,L] True = real or None, causal)`` -> ``[N,L,D]``, or the
    list of every layer's output with ``return_intermediate`` (DETR's auxiliary
    losses). ``causal`` lets position i attend to positions <= i only.
    """

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                d_model=spec.hidden,
                nhead=spec.heads,
                dim_feedforward=spec.ffn,
                dropout=spec.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=False,
            )
            for _ in range(spec.layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, param in self.named_parameters():
            if "norm" in name:
                nn.init.ones_(param) if name.endswith("weight") else nn.init.zeros_(param)
            elif param.dim() > 1:
                nn.init.normal_(param, std=INIT_STD)
            else:
                nn.init.zeros_(param)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        causal: bool = False,
        return_intermediate: bool = False,
    ) -> Tensor | list[Tensor]:
        if tgt.dim() != 3 or memory.dim() != 3 or tgt.shape[0] != memory.shape[0]:
            raise ValueError(f"decoder: tgt must be [N,L,D] and memory [N,S,D] with the same N; got {tuple(tgt.shape)} and {tuple(memory.shape)}")
        length = tgt.shape[1]
        # torch's convention: True = may NOT attend
        memory_padding = None if memory_mask is None else ~memory_mask.bool()
        tgt_padding = None if tgt_mask is None else ~tgt_mask.bool()
        attn_mask = causal_mask(length, tgt.device) if causal else None
        memory = memory.to(tgt.dtype)
        out = tgt
        outputs: list[Tensor] = []
        for layer in self.layers:
            out = layer(
                out,
                memory,
                tgt_mask=attn_mask,
                tgt_key_padding_mask=tgt_padding,
                memory_key_padding_mask=memory_padding,
                tgt_is_causal=causal,
            )
            outputs.append(out)
        return outputs if return_intermediate else out


def causal_mask(length: int, device: torch.device | None = None) -> Tensor:
    """bool [L,L], True above the diagonal: position i may not attend to j > i (torch's convention)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


def decoder_spec(model: nn.Module, layers: int) -> DecoderSpec:
    """The decoder of ``layers`` layers that fits ``model``'s fusion BERT (width, heads, feed-forward, dropout)."""
    config = model.fusion.config
    return DecoderSpec(
        layers=int(layers),
        hidden=int(config.hidden_size),
        heads=int(config.num_attention_heads),
        ffn=int(config.intermediate_size),
        dropout=float(config.hidden_dropout_prob),
    )


def get_or_create_decoder(model: nn.Module, layers: int, owner: str) -> TransformerDecoder:
    """The model's shared decoder, created (and registered as ``model.decoder``) on first request.

    ``owner`` is the objective asking (for the error message). Call it from an
    objective's constructor, before the optimisers are built.
    """
    spec = decoder_spec(model, layers)
    existing = getattr(model, DECODER_ATTR, None)
    if existing is None:
        decoder = TransformerDecoder(spec)
        ref = next(model.parameters(), None)
        if ref is not None:
            decoder.to(ref.device)
        model.add_module(DECODER_ATTR, decoder)
        model._decoder_owners = [owner]
        return decoder
    if not isinstance(existing, TransformerDecoder):
        raise TypeError(f"model.{DECODER_ATTR} is a {type(existing).__name__}, not the shared TransformerDecoder")
    if existing.spec != spec:
        owners = getattr(model, "_decoder_owners", [])
        raise ConfigError(
            f"objectives.{owner}.{DECODER_FIELD}={layers}: the decoder is shared and was already built with "
            f"{existing.spec.layers} layers by {', '.join(owners) or 'another objective'}; give every decoder objective the same {DECODER_FIELD}"
        )
    getattr(model, "_decoder_owners", []).append(owner)
    return existing


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    pad: int


@functools.lru_cache(maxsize=8)
def special_ids(tokenizer_spec: str) -> SpecialIds:
    """[CLS], [SEP] and [PAD] ids of ``data.tokenizer`` ([CLS] starts and [SEP] ends every caption)."""
    tok = load_tokenizer(tokenizer_spec)
    return SpecialIds(cls=int(tok.cls_token_id), sep=int(tok.sep_token_id), pad=int(tok.pad_token_id))


@dataclass
class DecoderMemory:
    """What the decoder attends to: one row per image."""

    states: Tensor  # [B,S,D]: encoder states of [CLS] [SEP] and every grid cell
    mask: Tensor  # bool [B,S]: True on real positions
    text_len: int  # positions of the text side at the front of ``states`` (2: [CLS] [SEP])


def image_only_memory(model: nn.Module, feats: Tensor, grid_mask: Tensor, ids: SpecialIds) -> DecoderMemory:
    """Encode each image with the text reduced to ``[CLS] [SEP]``: ``feats`` [B,D,gh,gw], ``grid_mask`` [B,gh,gw]."""
    b = feats.shape[0]
    text_ids = torch.tensor([ids.cls, ids.sep], dtype=torch.int64, device=feats.device).expand(b, 2)
    text_mask = torch.ones(b, 2, dtype=torch.int64, device=feats.device)
    out = model.fuse(text_ids, text_mask, feats, grid_mask)
    states = torch.cat([out.text_states, out.image_states], dim=1)
    mask = torch.cat([text_mask.bool(), out.image_mask], dim=1)
    return DecoderMemory(states=states, mask=mask, text_len=2)


# --------------------------------------------------------------------------- search


def beam_search(
    step: Callable[[Tensor, Tensor], Tensor],
    rows: int,
    bos: int,
    eos: int,
    pad: int,
    max_len: int,
    beam: int = 1,
    length_penalty: float = 1.0,
    banned: Sequence[int] = (),
    device: torch.device | None = None,
) -> list[list[int]]:
    """Left-to-right search; ``beam=1`` is greedy decoding.

    ``step(prefix [R,t], source [R]) -> log-probabilities [R,V]`` of the next
    token, where ``source[r]`` is the input row (0..rows-1) prefix r belongs to.
    Sequences start with ``bos`` and end at ``eos`` or after ``max_len`` tokens
    (bos and eos included). A live hypothesis never emits ``pad``, ``bos`` or
    a ``banned`` id (e.g. [MASK], [UNK]). Finished hypotheses are ranked by total
    log-probability divided by ``generated_length ** length_penalty`` (0: raw
    sum, 1: mean per token). Returns, per input row, the generated token ids
    without bos, eos and padding.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (bos and one token), got {max_len}")
    if rows == 0:
        return []
    k = beam
    seqs = torch.full((rows * k, 1), bos, dtype=torch.int64, device=device)
    source = torch.arange(rows, device=device).repeat_interleave(k)
    scores = torch.zeros(rows, k, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one alive
    finished = torch.zeros(rows * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(rows * k, device=device)
    never = torch.tensor(sorted({pad, bos, *banned}), dtype=torch.int64, device=device)
    for _ in range(max_len - 1):
        logp = step(seqs, source).float().clone()
        vocab = logp.shape[-1]
        logp[:, never] = float("-inf")
        logp = logp.masked_fill(finished[:, None], float("-inf"))
        logp[finished, pad] = 0.0  # a finished hypothesis only pads, at no cost
        cand = (scores.reshape(-1, 1) + logp).reshape(rows, k * vocab)
        scores, index = cand.topk(k, dim=1)
        origin = (torch.arange(rows, device=device)[:, None] * k + index // vocab).reshape(-1)
        token = (index % vocab).reshape(-1)
        was_finished = finished[origin]
        seqs = torch.cat([seqs[origin], token[:, None]], dim=1)
        lengths = lengths[origin] + (~was_finished).float()
        finished = was_finished | (token == eos)
        if bool(finished.all()):
            break
    norm = scores.reshape(-1) / lengths.clamp_min(1.0).pow(length_penalty)
    best = norm.reshape(rows, k).argmax(dim=1)
    chosen = seqs[torch.arange(rows, device=device) * k + best]
    out: list[list[int]] = []
    for row in chosen.tolist():
        tokens = []
        for tok in row[1:]:
            if tok in (eos, pad):
                break
            tokens.append(tok)
        out.append(tokens)
    return out


__all__ = [
    "DecoderMemory",
    "DecoderSpec",
    "SpecialIds",
    "TransformerDecoder",
    "beam_search",
    "causal_mask",
    "decoder_spec",
    "get_or_create_decoder",
    "image_only_memory",
    "special_ids",
]
