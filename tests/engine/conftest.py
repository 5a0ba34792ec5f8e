"""Shared fixtures of the engine tests: one tiny Qwen3-VL fixture model and one engine per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moderation.config import Settings

# The fixture model is a local folder: nothing may be fetched from the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TEST_MAX_NEW_TOKENS = 24


def engine_settings(model_dir: Path | str, **overrides: Any) -> Settings:
    """Settings pinned for CPU tests, whatever MODERATION_* variables the environment holds."""
    values: dict[str, Any] = {
        "MODERATION_MODEL": str(model_dir),
        "model_revision": None,
        "device": "cpu",
        "dtype": "auto",
        "quantization": "none",
        "attn_implementation": "sdpa",
        "max_new_tokens": TEST_MAX_NEW_TOKENS,
        "image_max_pixels": 512 * 512,
        "image_min_pixels": 32 * 32,
        "batch_max_size": 4,
        "warmup": False,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def fixture_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-VL saved once per test session."""
    from moderation.engine.fixture import build_fixture_model

    return build_fixture_model(tmp_path_factory.mktemp("models") / "qwen3vl-tiny", seed=0)


@pytest.fixture(scope="session")
def engine(fixture_model_dir: Path) -> Iterator[Any]:
    """The real TransformersEngine loaded from the fixture folder through from_pretrained."""
    import torch

    from moderation.engine.transformers_engine import TransformersEngine

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield TransformersEngine.load(engine_settings(fixture_model_dir))
