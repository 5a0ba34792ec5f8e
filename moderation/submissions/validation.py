"""Validation of everything a submission carries: image bytes, caption, ids and metadata."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from moderation.config import Settings
from moderation.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from moderation.submissions.structure import ImageStructureError, check_jpeg, check_structure

# Magic numbers of the formats we know how to sniff; anything else is 415.
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
)

MAX_METADATA_BYTES = 16 * 1024
MAX_METADATA_DEPTH = 32
MAX_ID_CHARS = 256


@dataclass(frozen=True)
class ImageInfo:
    """What intake learned about an image: its format and size."""

    format: str
    width: int
    height: int


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading bytes, or None."""
    for magic, offset, fmt in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


#: Chunks of a PNG beyond which checking it is no longer cheap (real files have a few dozen to a few hundred;
#: a crafted one packs ~87,000 empty chunks into 1 MB, and parsing those takes Pillow a third of a second).
CHEAP_PNG_CHUNKS = 1000
#: Other formats than JPEG and PNG (rare at intake) are cheap to check only when small.
CHEAP_OTHER_BYTES = 64 * 1024


def cheap_to_check(data: bytes) -> bool:
    """Whether ``validate_image`` takes well under a millisecond on ``data`` (else: run it on a thread)."""
    fmt = sniff_format(data)
    if fmt == "JPEG":
        return True  # the walk is a C-speed scan, its marker count capped
    if fmt == "PNG":
        pos, chunks = 8, 0
        while pos + 8 <= len(data):
            chunks += 1
            if chunks > CHEAP_PNG_CHUNKS:
                return False
            pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
        return True
    return fmt is None or len(data) <= CHEAP_OTHER_BYTES


def validate_image(data: bytes, settings: Settings) -> ImageInfo:
    """Check size, format, pixel count and structure (or full decodability) of an image; raise clear errors."""
    if len(data) > settings.max_image_bytes:
        raise PayloadTooLarge(
            f"image is {len(data)} bytes; the limit is {settings.max_image_bytes}", code="image_too_large"
        )
    if not data:
        raise InvalidInput("image is empty", code="image_empty")
    allowed = {f.upper() for f in settings.allowed_image_formats}
    sniffed = sniff_format(data)
    if sniffed is None or sniffed not in allowed:
        raise UnsupportedMediaType(
            f"not an accepted image format; accepted: {', '.join(sorted(allowed))}",
            code="unsupported_image_format",
        )

    def check_pixels(width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise InvalidInput("image has no pixels", code="image_undecodable")
        if width * height > settings.max_image_pixels:
            raise InvalidInput(
                f"image has {width * height} pixels; the limit is {settings.max_image_pixels}",
                code="image_too_many_pixels",
            )

    try:
        if sniffed == "JPEG" and settings.intake_image_check == "structural":
            # The structural walk reads the frame header itself, at a fraction of the cost of Pillow's parser.
            width, height = check_jpeg(data, on_frame=check_pixels, walk_scans=False)
            return _accepted(ImageInfo(format="JPEG", width=width, height=height), allowed)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            check_pixels(width, height)
            fmt = (img.format or sniffed).upper()
            if fmt == "MPO":  # phone cameras' multi-picture JPEG: a plain JPEG followed by more pictures
                fmt = "JPEG"
            if settings.intake_image_check == "structural":
                check_structure(data, sniffed, img)
            else:
                if fmt == "JPEG":
                    # Decoding at 1/8 scale still reads every entropy-coded byte, so truncation is caught.
                    img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                img.load()
    except ImageStructureError as exc:
        raise InvalidInput(f"image is not well formed: {exc}", code="image_undecodable") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"image has too many pixels: {exc}", code="image_too_many_pixels") from exc
    except InvalidInput:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"image could not be decoded: {exc}", code="image_undecodable") from exc
    except Exception as exc:  # malformed files make Pillow's parsers fail in other ways too (TypeError, ...)
        raise InvalidInput(
            f"image could not be decoded: {type(exc).__name__}: {exc}", code="image_undecodable"
        ) from exc
    return _accepted(ImageInfo(format=fmt, width=width, height=height), allowed)


def _accepted(info: ImageInfo, allowed: set[str]) -> ImageInfo:
    if info.format not in allowed:
        raise UnsupportedMediaType(
            f"image format {info.format} is not accepted", code="unsupported_image_format"
        )
    return info


def decode_caption(raw: bytes | str, settings: Settings) -> str:
    """Decode and validate a caption: UTF-8, non-empty, within the length limit, no NUL characters."""
    if isinstance(raw, bytes):
        try:
            caption = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput("caption is not valid UTF-8", code="caption_not_utf8") from exc
    else:
        caption = raw
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from JSON escapes
        raise InvalidInput("caption is not valid UTF-8", code="caption_not_utf8") from exc
    if "\x00" in caption:
        raise InvalidInput("caption contains a NUL character", code="caption_invalid")
    if not caption.strip():
        raise InvalidInput("caption is empty", code="caption_empty")
    if len(caption) > settings.max_caption_chars:
        raise InvalidInput(
            f"caption has {len(caption)} characters; the limit is {settings.max_caption_chars}",
            code="caption_too_long",
        )
    return caption


def validate_identifier(value: str | None, field: str) -> str | None:
    """Validate an optional client identifier (external id or idempotency key)."""
    if value is None:
        return None
    if not value or len(value) > MAX_ID_CHARS or "\x00" in value or not value.isprintable():
        raise InvalidInput(
            f"{field} must be 1 to {MAX_ID_CHARS} printable characters", code=f"invalid_{field}"
        )
    return value


def _depth(value: object) -> int:
    """How deeply objects and arrays nest in a parsed JSON value (without recursion)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in node)
    return deepest


def parse_metadata(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    """Parse and validate client metadata: a JSON object of at most 16 KiB."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except RecursionError as exc:
            raise InvalidInput(
                f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep", code="invalid_metadata"
            ) from exc
        except ValueError as exc:
            raise InvalidInput("metadata is not valid JSON", code="invalid_metadata") from exc
    else:
        value = raw
    if not isinstance(value, dict):
        raise InvalidInput("metadata must be a JSON object", code="invalid_metadata")
    if _depth(value) > MAX_METADATA_DEPTH:
        # Stored deeper, it could not be serialised back (GET, listings, webhooks would fail on it).
        raise InvalidInput(
            f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep", code="invalid_metadata"
        )
    try:
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:  # NaN and Infinity parse in Python but are not JSON, and Postgres refuses them
        raise InvalidInput(f"metadata cannot be stored as JSON: {exc}", code="invalid_metadata") from exc
    if len(encoded.encode("utf-8", "surrogatepass")) > MAX_METADATA_BYTES:
        raise InvalidInput(f"metadata is larger than {MAX_METADATA_BYTES} bytes", code="invalid_metadata")
    if "\\u0000" in encoded or "\x00" in encoded:
        raise InvalidInput("metadata contains a NUL character", code="invalid_metadata")
    try:
        encoded.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput("metadata is not valid UTF-8", code="invalid_metadata") from exc
    return value
