"""What every config section shares: the error type and the strict base model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A recipe, override or search file that cannot be accepted."""


class Section(BaseModel):
    """Base of every config section: unknown keys are refused, assignment re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
