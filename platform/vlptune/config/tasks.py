"""Options of the tasks run on a trained checkpoint (torch-free, so the CLI's help reads them cheaply)."""

from __future__ import annotations

from pydantic import Field

from vlptune.config.base import Section


class CaptionConfig(Section):
    """``vlptune caption``: captions from a checkpoint trained with a caption-generating objective."""

    beam: int = Field(1, ge=1, le=64, description="beam size; 1 = greedy")
    limit: int = Field(100, ge=1, le=1_000_000, description="images to caption")
    length_penalty: float = Field(1.0, ge=0.0, le=10.0, description="beam ranking: total log-probability / length**penalty (1: mean per token)")
    show: int = Field(5, ge=0, le=10_000, description="example captions printed")
