"""Perceptual hashes: stable under re-encoding and resizing, far apart for different images."""

from __future__ import annotations

import io

from PIL import Image

from moderation.policy.perceptual import hamming, image_hashes, to_signed, to_unsigned
from tests.conftest import make_jpeg


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_near_duplicates_are_close_and_different_images_far() -> None:
    original = _open(make_jpeg(640, 480, seed=1))
    base = image_hashes(original)
    for variant in (
        _encode(original, quality=30),
        _encode(original.resize((320, 240))),
        _encode(original, "PNG"),
        _encode(original.point(lambda v: min(255, v + 20))),
    ):
        other = image_hashes(_open(variant))
        assert hamming(base.phash, other.phash) <= 6 and hamming(base.dhash, other.dhash) <= 6
    for seed in range(2, 12):
        other = image_hashes(_open(make_jpeg(640, 480, seed=seed)))
        assert hamming(base.phash, other.phash) > 16


def test_signed_round_trip() -> None:
    for value in (0, 1, 2**63 - 1, 2**63, 2**64 - 1):
        signed = to_signed(value)
        assert -(2**63) <= signed < 2**63 and to_unsigned(signed) == value
