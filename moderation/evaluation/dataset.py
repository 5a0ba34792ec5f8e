"""Labelled evaluation samples: a JSON Lines file of image, caption, expected decision and categories.

Each line: ``{"id": "s01", "image": "images/s01.png" | "https://…", "caption": "…",
"expected": "allow" | "block" | "review", "categories": ["scam_fraud"], "language": "en"}``; ``id``,
``categories`` and ``language`` are optional. A relative image path is relative to the file's folder.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from moderation.config import Settings
from moderation.errors import InvalidInput
from moderation.net.safe_http import OutboundPolicy, fetch_bytes

DECISIONS = ("allow", "block", "review")


@dataclass(frozen=True)
class Sample:
    """One labelled example."""

    id: str
    image: str
    caption: str
    expected: str
    categories: tuple[str, ...] = ()
    language: str | None = None

    @property
    def is_url(self) -> bool:
        """Whether the image is fetched over HTTP(S)."""
        return self.image.startswith(("http://", "https://"))


def load_samples(path: Path) -> list[Sample]:
    """Read and check a samples file; InvalidInput names the first bad line."""
    samples: list[Sample] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            expected = str(row["expected"]).lower()
            if expected not in DECISIONS:
                raise ValueError(f"expected must be one of {', '.join(DECISIONS)}")
            image = str(row["image"])
            caption = str(row["caption"])
            categories = row.get("categories") or []
            if not isinstance(categories, list):
                raise ValueError("categories must be a list")
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidInput(f"{path}:{number}: {exc}", code="invalid_samples") from exc
        samples.append(
            Sample(
                id=str(row.get("id") or f"line-{number}"),
                image=image,
                caption=caption,
                expected=expected,
                categories=tuple(str(c) for c in categories),
                language=row.get("language"),
            )
        )
    if not samples:
        raise InvalidInput(f"{path} holds no samples", code="invalid_samples")
    return samples


def load_image(sample: Sample, base_dir: Path, settings: Settings) -> Image.Image:
    """The sample's decoded image, read from disk or fetched with the service's SSRF-safe client."""
    if sample.is_url:
        fetched = fetch_bytes(
            sample.image,
            OutboundPolicy.from_settings(settings),
            max_bytes=settings.max_image_bytes,
            timeout_seconds=settings.fetch_timeout_seconds,
            max_redirects=settings.fetch_max_redirects,
        )
        data = fetched.data
    else:
        path = Path(sample.image)
        data = (path if path.is_absolute() else base_dir / path).read_bytes()
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
