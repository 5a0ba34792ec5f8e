"""Image preparation: orientation, frames, colour modes and the visual-token budget."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from moderation.engine.images import (
    MAX_ASPECT_RATIO,
    detect_language,
    prepare_image,
    target_size,
)

BUDGET = 512 * 512
MIN_PIXELS = 32 * 32


def _reopen(img: Image.Image, fmt: str, **save_kwargs: object) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    buf.seek(0)
    return Image.open(buf)


def _rgb(img: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    r, g, b = img.convert("RGB").getpixel(xy)  # type: ignore[misc]
    return int(r), int(g), int(b)


def test_512_square_is_kept() -> None:
    out = prepare_image(Image.new("RGB", (512, 512), "red"), BUDGET, MIN_PIXELS)
    assert out.size == (512, 512)
    assert (out.width // 32) * (out.height // 32) == 256


def test_1024_square_is_halved() -> None:
    out = prepare_image(Image.new("RGB", (1024, 1024), "red"), BUDGET, MIN_PIXELS)
    assert out.size == (512, 512)


@pytest.mark.parametrize(
    ("size", "budget"),
    [
        ((1024, 768), BUDGET),
        ((1024, 768), 1024 * 768),
        ((333, 777), BUDGET),
        ((4000, 3000), BUDGET),
        ((3000, 4000), 448 * 448),
        ((100, 20), BUDGET),
        ((7, 5), BUDGET),
        ((2000, 21), BUDGET),
    ],
)
def test_sides_are_multiples_of_32_within_budget(size: tuple[int, int], budget: int) -> None:
    out = prepare_image(Image.new("RGB", size, "blue"), budget, MIN_PIXELS)
    w, h = out.size
    assert w % 32 == 0 and h % 32 == 0
    assert w >= 32 and h >= 32
    assert w * h <= budget
    assert w * h >= min(MIN_PIXELS, budget)
    if max(size) / min(size) <= 4 and min(size) >= 64:
        assert abs((w / h) / (size[0] / size[1]) - 1) < 0.2


def test_1024x768_at_its_own_budget_is_unchanged() -> None:
    assert target_size(1024, 768, 1024 * 768, MIN_PIXELS) == (1024, 768)


def test_tiny_image_is_upscaled_to_min_pixels() -> None:
    out = prepare_image(Image.new("RGB", (5, 5), "blue"), BUDGET, 64 * 64)
    assert out.size == (64, 64)


def test_extreme_aspect_ratio_is_padded_and_bounded() -> None:
    out = prepare_image(Image.new("RGB", (8000, 10), "black"), BUDGET, MIN_PIXELS)
    w, h = out.size
    assert w % 32 == 0 and h % 32 == 0 and w * h <= BUDGET
    # The Qwen image processor rejects ratios of 200 and more.
    assert max(w, h) / min(w, h) < 2 * MAX_ASPECT_RATIO <= 200


def test_grayscale_png_with_alpha_is_composited_on_white() -> None:
    img = Image.new("LA", (64, 64), (0, 0))  # black, fully transparent
    img.paste((0, 255), (0, 0, 32, 64))  # left half: black, opaque
    out = prepare_image(_reopen(img, "PNG"), BUDGET, MIN_PIXELS)
    assert out.mode == "RGB"
    assert out.size == (64, 64)
    assert _rgb(out, (8, 32)) == (0, 0, 0)
    assert _rgb(out, (56, 32)) == (255, 255, 255)


def test_palette_png_with_transparency_is_composited_on_white() -> None:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    img.paste(1, (32, 0, 64, 64))
    img.info["transparency"] = 1
    out = prepare_image(_reopen(img, "PNG", transparency=1), BUDGET, MIN_PIXELS)
    assert out.mode == "RGB"
    assert _rgb(out, (8, 8)) == (255, 0, 0)
    assert _rgb(out, (56, 8)) == (255, 255, 255)


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    gif = _reopen(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(gif, "n_frames", 1) == 3
    gif.seek(2)  # prepare_image must not depend on the frame the decoder was left at
    out = prepare_image(gif, BUDGET, MIN_PIXELS)
    assert out.mode == "RGB"
    assert not getattr(out, "is_animated", False)
    r, g, b = _rgb(out, (32, 32))
    assert r > 200 and g < 50 and b < 50


def test_exif_rotated_jpeg_is_made_upright() -> None:
    # Stored 128x64 landscape, left half red, right half blue; EXIF orientation 6 = rotate 90 degrees CW.
    img = Image.new("RGB", (128, 64), (255, 0, 0))
    img.paste((0, 0, 255), (64, 0, 128, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = _reopen(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = prepare_image(jpeg, BUDGET, MIN_PIXELS)
    assert out.size == (64, 128)
    top = _rgb(out, (32, 16))
    bottom = _rgb(out, (32, 112))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_16bit_grayscale_keeps_contrast() -> None:
    img = Image.new("I;16", (64, 64), 0)
    img.paste(65535, (32, 0, 64, 64))
    out = prepare_image(img, BUDGET, MIN_PIXELS)
    assert out.mode == "RGB"
    assert _rgb(out, (8, 8)) == (0, 0, 0)
    assert _rgb(out, (56, 8))[0] >= 250


def test_cmyk_is_converted() -> None:
    out = prepare_image(Image.new("CMYK", (40, 40), (0, 0, 0, 0)), BUDGET, MIN_PIXELS)
    assert out.mode == "RGB" and out.size == (32, 32)


def test_input_image_is_not_modified() -> None:
    img = Image.new("RGBA", (100, 50), (10, 20, 30, 0))
    prepare_image(img, BUDGET, MIN_PIXELS)
    assert img.mode == "RGBA" and img.size == (100, 50)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A cat on a sofa", "en"),
        ("一只猫坐在沙发上", "zh"),
        ("Sale 今天 only", "zh"),
        ("", "en"),
        ("Ünïcödé ñ and emoji 🐱", "en"),
    ],
)
def test_detect_language(text: str, expected: str) -> None:
    assert detect_language(text) == expected
