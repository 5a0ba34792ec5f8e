"""The small interface every moderation engine implements, and the data it exchanges."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from PIL import Image


@dataclass(frozen=True)
class CategorySpec:
    """A policy category the engine scores: a short name and a one-line definition."""

    name: str
    definition: str


@dataclass(frozen=True)
class EngineRequest:
    """One submission to judge: the decoded image and its caption."""

    image: Image.Image
    caption: str
    categories: tuple[CategorySpec, ...]
    language: str = "en"


@dataclass
class EngineResult:
    """What the engine concluded about one submission; scores lie in [0, 1]."""

    description: str
    visible_text: str
    explanation: str
    conflict_score: float
    confidence: float
    category_scores: dict[str, float] = field(default_factory=dict)
    generated_tokens: int = 0


class BatchPartlyFailed(Exception):
    """Some requests of a batch could not be judged; ``results`` keeps the others' (None where one failed)."""

    def __init__(self, results: list[EngineResult | None], reason: str) -> None:
        super().__init__(reason)
        self.results = results
        self.reason = reason


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the loaded model, written into every verdict."""

    name: str
    revision: str
    prompt_version: str
    is_fixture: bool = False
    #: The engine settings that change its answers (quantization, image size, token budget): part of the
    #: verdict cache's key, so that a verdict is reused only from an identically configured engine.
    settings: str = ""


@dataclass(frozen=True)
class EngineHealth:
    """Result of an engine health check."""

    ok: bool
    detail: str
    device: str


class ModerationEngine(abc.ABC):
    """A loaded moderation model that judges batches of submissions."""

    @property
    @abc.abstractmethod
    def info(self) -> ModelInfo:
        """Name, revision and prompt version of the loaded model."""

    @abc.abstractmethod
    def moderate(self, requests: list[EngineRequest]) -> list[EngineResult]:
        """Judge a batch; the result list matches the request list one to one."""

    @abc.abstractmethod
    def health(self) -> EngineHealth:
        """Run a tiny inference and report whether the engine works."""

    def warmup(self) -> None:
        """Run one representative batch so the first real request pays no start-up cost."""
        self.health()
