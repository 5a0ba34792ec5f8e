"""Intake validation of images, captions, identifiers and metadata."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from moderation.config import Settings
from moderation.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from moderation.submissions.validation import (
    decode_caption,
    parse_metadata,
    sniff_format,
    validate_identifier,
    validate_image,
)
from tests.conftest import make_jpeg, make_png

SETTINGS = Settings(max_image_bytes=2 * 1024 * 1024, max_image_pixels=4_000_000)


def test_accepts_jpeg_png_gif_webp() -> None:
    assert validate_image(make_jpeg(320, 200), SETTINGS).format == "JPEG"
    assert validate_image(make_png(), SETTINGS).format == "PNG"
    for fmt in ("GIF", "WEBP", "BMP"):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), "red").save(buf, fmt)
        info = validate_image(buf.getvalue(), SETTINGS)
        assert (info.format, info.width, info.height) == (fmt, 40, 30)


def test_too_large_is_413() -> None:
    with pytest.raises(PayloadTooLarge) as err:
        validate_image(b"\xff\xd8\xff" + b"0" * (2 * 1024 * 1024), SETTINGS)
    assert err.value.status_code == 413 and err.value.code == "image_too_large"


@pytest.mark.parametrize(
    "data", [b"%PDF-1.7 hello", b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"hello world"]
)
def test_not_an_image_is_415(data: bytes) -> None:
    with pytest.raises(UnsupportedMediaType) as err:
        validate_image(data, SETTINGS)
    assert err.value.status_code == 415 and err.value.code == "unsupported_image_format"


def test_format_not_in_allowed_list_is_415() -> None:
    settings = Settings(allowed_image_formats=["JPEG"])
    with pytest.raises(UnsupportedMediaType):
        validate_image(make_png(), settings)


def test_truncated_jpeg_is_422() -> None:
    data = make_jpeg(800, 600)
    with pytest.raises(InvalidInput) as err:
        validate_image(data[: len(data) // 2], SETTINGS)
    assert err.value.code == "image_undecodable"


def test_truncated_png_is_422() -> None:
    buf = io.BytesIO()
    Image.effect_noise((300, 300), 50).convert("RGB").save(buf, "PNG")
    data = buf.getvalue()
    with pytest.raises(InvalidInput) as err:
        validate_image(data[: len(data) - 200], SETTINGS)
    assert err.value.code == "image_undecodable"


def test_garbage_after_magic_is_422() -> None:
    with pytest.raises(InvalidInput) as err:
        validate_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, SETTINGS)
    assert err.value.code == "image_undecodable"


def test_decompression_bomb_is_422_without_decoding() -> None:
    # A 10000x10000 PNG compresses to a few hundred KB; we must refuse it from the header alone.
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, "PNG")
    with pytest.raises(InvalidInput) as err:
        validate_image(buf.getvalue(), SETTINGS)
    assert err.value.code == "image_too_many_pixels"


def test_sniff_format() -> None:
    assert sniff_format(make_jpeg(16, 16)) == "JPEG"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff_format(b"nothing") is None


def test_caption_rules() -> None:
    assert decode_caption("一只猫坐在沙发上", SETTINGS) == "一只猫坐在沙发上"
    assert decode_caption(b"A cat on a sofa", SETTINGS) == "A cat on a sofa"
    for raw, code in [
        ("", "caption_empty"),
        ("   \n\t", "caption_empty"),
        ("x" * 4001, "caption_too_long"),
        (b"\xff\xfe bad", "caption_not_utf8"),
        ("nul\x00byte", "caption_invalid"),
        ("\ud800 lone surrogate", "caption_not_utf8"),
    ]:
        with pytest.raises(InvalidInput) as err:
            decode_caption(raw, SETTINGS)
        assert err.value.code == code and err.value.status_code == 422
    assert len(decode_caption("字" * 4000, SETTINGS)) == 4000


def test_identifiers_and_metadata() -> None:
    assert validate_identifier(None, "external_id") is None
    assert validate_identifier("post-123", "external_id") == "post-123"
    with pytest.raises(InvalidInput):
        validate_identifier("x" * 257, "external_id")
    with pytest.raises(InvalidInput):
        validate_identifier("bad\x00id", "external_id")
    assert parse_metadata('{"a": 1}') == {"a": 1}
    assert parse_metadata({"lang": "zh"}) == {"lang": "zh"}
    assert parse_metadata(None) == {}
    for bad in ("[1, 2]", "{not json", '{"a": "\\u0000"}', {"big": "x" * 20000}):
        with pytest.raises(InvalidInput) as err:
            parse_metadata(bad)
        assert err.value.code == "invalid_metadata"
