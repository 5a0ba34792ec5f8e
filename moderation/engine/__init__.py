"""Moderation engines: the interface, and a factory that loads the configured backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moderation.engine.base import (
    BatchPartlyFailed,
    CategorySpec,
    EngineHealth,
    EngineRequest,
    EngineResult,
    ModelInfo,
    ModerationEngine,
)

if TYPE_CHECKING:
    from moderation.config import Settings


def load_engine(settings: Settings) -> ModerationEngine:
    """Load the engine named by ``settings.engine_backend`` (torch/transformers are imported only here)."""
    if settings.engine_backend == "transformers":
        from moderation.engine.transformers_engine import TransformersEngine

        return TransformersEngine.load(settings)
    if settings.engine_backend == "openai":
        from moderation.engine.openai_engine import OpenAIEngine

        return OpenAIEngine.load(settings)
    raise ValueError(f"unknown engine backend {settings.engine_backend!r}")


__all__ = [
    "BatchPartlyFailed",
    "CategorySpec",
    "EngineHealth",
    "EngineRequest",
    "EngineResult",
    "ModelInfo",
    "ModerationEngine",
    "load_engine",
]
