"""Intake validation of images, captions, identifiers and metadata."""

from __future__ import annotations

import io
import struct
import types
import zlib

import pytest
from PIL import Image

from moderation.config import Settings
from moderation.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from moderation.submissions import validation
from moderation.submissions.structure import (
    MAX_JPEG_MARKERS,
    ImageStructureError,
    check_gif,
    check_jpeg,
    check_png,
    check_tiff,
    check_webp,
)
from moderation.submissions.validation import (
    CHEAP_PNG_CHUNKS,
    ImageInfo,
    cheap_to_check,
    decode_caption,
    parse_metadata,
    sniff_format,
    validate_identifier,
    validate_image,
)
from tests.conftest import jpeg_header, make_jpeg, make_png

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
    assert parse_metadata('{"id": 123456789012345678901234567890}') == {"id": 123456789012345678901234567890}
    not_finite = ('{"a": NaN}', '{"a": -Infinity}', {"a": float("inf")})
    for bad in ("[1, 2]", "{not json", '{"a": "\\u0000"}', {"big": "x" * 20000}, *not_finite):
        with pytest.raises(InvalidInput) as err:
            parse_metadata(bad)
        assert err.value.code == "invalid_metadata"


def test_metadata_nested_too_deep_is_refused_not_stored() -> None:
    deep_ok = '{"a": ' * 31 + "1" + "}" * 31
    assert parse_metadata(deep_ok) is not None
    too_deep = '{"a": ' * 33 + "1" + "}" * 33
    in_arrays = '{"a": ' + "[" * 40 + "]" * 40 + "}"
    bomb = '{"a": ' + "[" * 100_000  # Python's parser gives up on it with a RecursionError
    nested: object = 1
    for _ in range(40):
        nested = [nested]
    for bad in (too_deep, in_arrays, bomb, {"a": nested}):
        with pytest.raises(InvalidInput) as err:
            parse_metadata(bad)
        assert err.value.code == "invalid_metadata" and "nested" in err.value.message


def _encode(fmt: str, size: tuple[int, int] = (120, 90), **options: object) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 40).convert("RGB").save(buf, fmt, **options)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with_bad_pixel_data() -> bytes:
    """A well-formed PNG (valid chunks and CRCs) whose IDAT is not a zlib stream: only decoding finds out."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0))
    return (
        b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", b"not a zlib stream") + _png_chunk(b"IEND", b"")
    )


STRUCTURAL_SAMPLES = {
    "jpeg": lambda: _encode("JPEG"),
    "jpeg-progressive": lambda: _encode("JPEG", progressive=True),
    "png": lambda: _encode("PNG"),
    "gif": lambda: _encode("GIF"),
    "webp": lambda: _encode("WEBP"),
    "webp-lossless": lambda: _encode("WEBP", lossless=True),
    "bmp": lambda: _encode("BMP"),
    "tiff": lambda: _encode("TIFF"),
    "tiff-lzw": lambda: _encode("TIFF", compression="tiff_lzw"),
}


@pytest.mark.parametrize("name", sorted(STRUCTURAL_SAMPLES))
def test_structural_check_accepts_whole_files(name: str) -> None:
    data = STRUCTURAL_SAMPLES[name]()
    info = validate_image(data, SETTINGS)
    assert (info.width, info.height) == (120, 90)
    assert SETTINGS.intake_image_check == "structural"


@pytest.mark.parametrize("name", sorted(STRUCTURAL_SAMPLES))
def test_structural_check_rejects_truncated_files(name: str) -> None:
    data = STRUCTURAL_SAMPLES[name]()
    cuts = {len(data) - 1, len(data) - 7, len(data) * 9 // 10, len(data) // 2, 60, 20}
    if name == "gif":
        cuts.discard(len(data) - 1)  # only the trailer gone: a complete image (see the test below)
    for cut in sorted(cuts):
        with pytest.raises(InvalidInput) as err:
            validate_image(data[:cut], SETTINGS)
        assert err.value.code == "image_undecodable", (name, cut)


def test_structural_check_accepts_animations_and_trailing_bytes() -> None:
    frames = [Image.new("RGB", (50, 40), color) for color in ("red", "blue", "green")]
    for fmt in ("GIF", "WEBP", "PNG"):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
        assert validate_image(buf.getvalue(), SETTINGS).format == fmt
    # Cameras and phones append data after the end of the image; decoders ignore it.
    assert validate_image(make_jpeg(64, 48) + b"trailer" * 100, SETTINGS).format == "JPEG"
    assert validate_image(make_png() + b"\x00" * 64, SETTINGS).format == "PNG"


@pytest.mark.parametrize(
    "make",
    [
        # A valid JPEG header followed by noise with no end-of-image marker.
        lambda: jpeg_header(make_jpeg(64, 48)) + bytes(range(0, 255)) * 40,
        # A JPEG whose scan header comes before its frame header.
        lambda: b"\xff\xd8\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x00" * 64 + b"\xff\xd9",
        # A PNG whose IHDR is valid, then garbage where the next chunk should be.
        lambda: make_png()[:33] + b"\x12\x34\x56\x78garbage!" * 20,
        # A PNG with one flipped byte in its pixel data (bad CRC).
        lambda: (lambda d: d[:60] + bytes([d[60] ^ 0x55]) + d[61:])(_encode("PNG")),
        # A PNG with no IDAT chunk.
        lambda: make_png()[:33] + _png_chunk(b"IEND", b""),
        # A GIF header with an unknown block where the image should be.
        lambda: (lambda d: d[: 13 + 3 * (2 << (d[10] & 7))] + b"\x99" + b"\x00" * 100)(_encode("GIF")),
        # A WebP whose RIFF header claims more bytes than were sent.
        lambda: (lambda d: d[:4] + (len(d) + 100).to_bytes(4, "little") + d[8:])(_encode("WEBP")),
        # A WebP whose chunk runs past the end of its RIFF container.
        lambda: (lambda d: d[:16] + (len(d)).to_bytes(4, "little") + d[20:])(_encode("WEBP")),
    ],
)
def test_structural_check_rejects_malformed_files(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInput) as err:
        validate_image(make(), SETTINGS)
    assert err.value.code == "image_undecodable" and err.value.status_code == 422


def test_decode_setting_decodes_what_the_structural_check_cannot_see() -> None:
    bad_pixels = _png_with_bad_pixel_data()
    assert validate_image(bad_pixels, SETTINGS).format == "PNG"
    decode = SETTINGS.model_copy(update={"intake_image_check": "decode"})
    with pytest.raises(InvalidInput) as err:
        validate_image(bad_pixels, decode)
    assert err.value.code == "image_undecodable"
    assert validate_image(make_jpeg(320, 200), decode).format == "JPEG"
    jpeg = make_jpeg(800, 600)
    with pytest.raises(InvalidInput):
        validate_image(jpeg[: len(jpeg) // 2], decode)


def test_structural_checks_themselves_reject_malformed_files() -> None:
    """The same kinds of damage, given to the checks directly (Pillow's header parser is not involved)."""
    gif, webp, png = _encode("GIF"), _encode("WEBP"), _encode("PNG")
    cases = [
        (check_jpeg, jpeg_header(make_jpeg(64, 48)) + bytes(range(0, 255)) * 40),
        (check_jpeg, b"\xff\xd8\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x00" * 64 + b"\xff\xd9"),
        (check_png, png[:33] + b"\x12\x34\x56\x78garbage!" * 20),
        (check_png, png[:60] + bytes([png[60] ^ 0x55]) + png[61:]),
        (check_gif, gif[: 13 + 3 * (2 << (gif[10] & 7))] + b"\x99" + b"\x00" * 100),
        (check_gif, gif[: len(gif) // 2]),
        (check_webp, webp[:4] + (len(webp) + 100).to_bytes(4, "little") + webp[8:]),
        (check_webp, webp[:16] + len(webp).to_bytes(4, "little") + webp[20:]),
        (check_webp, webp[:12]),
    ]
    for check, data in cases:
        with pytest.raises(ImageStructureError):
            check(data)


def test_structural_check_accepts_what_decoders_accept() -> None:
    gif = _encode("GIF")
    assert gif.endswith(b"\x3b")
    check_gif(gif[:-1])  # no trailer after a complete image
    check_gif(gif[:-1] + b"\x00junk")  # stray bytes after a complete image
    jpeg = make_jpeg(64, 48)
    app0_end = 4 + int.from_bytes(jpeg[4:6], "big")
    check_jpeg(jpeg[:app0_end] + b"\x00\x00junk" + jpeg[app0_end:])  # libjpeg: extraneous bytes
    assert validate_image(jpeg[:app0_end] + b"\x00\x00junk" + jpeg[app0_end:], SETTINGS).format == "JPEG"


def test_phone_multi_picture_jpegs_are_jpegs() -> None:
    buf = io.BytesIO()
    first, second = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (64, 48), "blue")
    first.save(buf, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    assert validate_image(buf.getvalue(), SETTINGS).format == "JPEG"


def test_intake_takes_a_jpeg_that_ends_with_its_end_marker_as_complete() -> None:
    jpeg = make_jpeg(64, 48)
    # Cut short anywhere, the file no longer ends with the marker: its scans are walked, the cut is found.
    for cut in (jpeg[:-1], jpeg[:-2], jpeg[: len(jpeg) // 2], jpeg[: len(jpeg_header(jpeg)) + 10]):
        with pytest.raises(InvalidInput) as err:
            validate_image(cut, SETTINGS)
        assert err.value.code == "image_undecodable"
    # A cut picture with a whole one behind it ends with the marker: intake leaves the marker out of place
    # inside its data to the GPU worker's full walk (tests/processing), which the default walk is.
    spliced = jpeg_header(jpeg) + b"\x12\x34" * 100 + jpeg
    with pytest.raises(ImageStructureError, match="second start-of-image"):
        check_jpeg(spliced)
    assert check_jpeg(spliced, walk_scans=False) == (64, 48)
    assert validate_image(spliced, SETTINGS).format == "JPEG"


def test_a_flood_of_markers_is_refused() -> None:
    data = jpeg_header(make_jpeg(64, 48)) + b"\xff\x01" * (MAX_JPEG_MARKERS + 10) + b"\xff\xd9"
    with pytest.raises(ImageStructureError, match="more markers"):
        check_jpeg(data)


def test_tiff_strip_tables_must_be_integers() -> None:
    image = types.SimpleNamespace(tag_v2={273: "ASCII instead of offsets", 279: (10,)})
    with pytest.raises(ImageStructureError, match="not integers"):
        check_tiff(b"\x00" * 100, image)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_any_parser_failure_is_a_422_not_a_crash(monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    # JPEGs are walked by check_jpeg alone; other formats are opened by Pillow, then checked.
    monkeypatch.setattr(validation, "check_jpeg" if fmt == "JPEG" else "check_structure", broken)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buf, fmt)
    with pytest.raises(InvalidInput) as err:
        validate_image(buf.getvalue(), SETTINGS)
    assert err.value.code == "image_undecodable" and "TypeError" in str(err.value)


def test_a_jpeg_is_sized_from_its_frame_header_and_the_pixel_limit_comes_first() -> None:
    jpeg = make_jpeg(64, 48)
    assert validate_image(jpeg, SETTINGS) == ImageInfo("JPEG", 64, 48)
    small = SETTINGS.model_copy(update={"max_image_pixels": 64 * 48 - 1})
    for data in (jpeg, jpeg[: len(jpeg) // 2]):  # whole, and cut short: the size is known from the header
        with pytest.raises(InvalidInput) as err:
            validate_image(data, small)
        assert err.value.code == "image_too_many_pixels"
    with pytest.raises(InvalidInput) as err:
        validate_image(jpeg[: len(jpeg) // 2], SETTINGS)
    assert err.value.code == "image_undecodable"


def test_images_slow_to_walk_are_told_apart_so_they_are_checked_off_the_event_loop() -> None:
    png = make_png()
    ihdr_end = 8 + 25
    many_chunks = png[:ihdr_end] + _png_chunk(b"abCd", b"") * (CHEAP_PNG_CHUNKS + 1) + png[ihdr_end:]
    assert cheap_to_check(make_jpeg()) and cheap_to_check(png) and cheap_to_check(b"not an image")
    assert not cheap_to_check(many_chunks)
    assert validate_image(many_chunks, SETTINGS).format == "PNG"  # still a valid image: checked, not refused
    small_gif, large_gif = _encode("GIF", (32, 32)), _encode("GIF", (600, 600))
    assert cheap_to_check(small_gif) and len(large_gif) > 64 * 1024 and not cheap_to_check(large_gif)
