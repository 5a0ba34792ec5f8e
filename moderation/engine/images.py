"""Image preparation for the vision model, and caption language detection.

``prepare_image`` turns any decoded upload into what the Qwen3-VL vision tower expects: upright (EXIF
orientation applied), a single frame, 8-bit RGB, and sized so that both sides are multiples of the
patch-merge factor (16-px patches merged 2x2 = 32 px per visual token) within a pixel budget. With the
default budget of 512*512 pixels a square image becomes 512x512 = 16*16 = 256 visual tokens.
"""

from __future__ import annotations

import math
import re

from PIL import Image, ImageOps

#: Pixels covered by one visual token of Qwen3-VL (patch 16 x spatial merge 2).
VISUAL_TOKEN_FACTOR = 32

#: The Qwen2/3-VL image processor rejects aspect ratios above 200. Padding to 100 keeps the final ratio
#: below 200 even after the short side is floored to a multiple of the factor.
MAX_ASPECT_RATIO = 100.0

_WHITE = (255, 255, 255)

# CJK Unified Ideographs, extensions A and B, and compatibility ideographs.
_CJK_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df]")


def _first_frame(img: Image.Image) -> Image.Image:
    """The first frame of a (possibly animated) image."""
    if getattr(img, "is_animated", False) or getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; transparency is composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        img = img.convert("I")
    if img.mode == "I":
        # 16-bit greyscale: keep the top 8 bits rather than clipping everything above 255 to white.
        img = img.point(lambda v: v * (1 / 256), "L")
    elif img.mode == "F":
        img = img.convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def _pad_extreme_aspect(img: Image.Image) -> Image.Image:
    """Pad (with white) the short side of a very long or very tall image so its aspect ratio is bounded."""
    w, h = img.size
    if max(w, h) / min(w, h) <= MAX_ASPECT_RATIO:
        return img
    new_w = max(w, math.ceil(h / MAX_ASPECT_RATIO))
    new_h = max(h, math.ceil(w / MAX_ASPECT_RATIO))
    canvas = Image.new("RGB", (new_w, new_h), _WHITE)
    canvas.paste(img, ((new_w - w) // 2, (new_h - h) // 2))
    return canvas


def target_size(
    width: int, height: int, max_pixels: int, min_pixels: int, factor: int = VISUAL_TOKEN_FACTOR
) -> tuple[int, int]:
    """Size (w, h): multiples of ``factor``, w*h <= max_pixels, as close as possible to the aspect ratio."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image has an empty side: {width}x{height}")
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels={max_pixels} is below one visual token ({factor}x{factor})")
    w_bar = max(factor, round(width / factor) * factor)
    h_bar = max(factor, round(height / factor) * factor)
    if w_bar * h_bar > max_pixels:
        beta = math.sqrt((width * height) / max_pixels)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
    elif w_bar * h_bar < min_pixels:
        beta = math.sqrt(min_pixels / (width * height))
        w_bar = math.ceil(width * beta / factor) * factor
        h_bar = math.ceil(height * beta / factor) * factor
        if w_bar * h_bar > max_pixels:  # min_pixels close to max_pixels: the budget wins
            return target_size(width, height, max_pixels, 0, factor)
    # Clamping a side to one factor can push a very elongated image over budget: shrink the long side.
    if w_bar * h_bar > max_pixels:
        if w_bar >= h_bar:
            w_bar = max(factor, (max_pixels // h_bar) // factor * factor)
        else:
            h_bar = max(factor, (max_pixels // w_bar) // factor * factor)
    return w_bar, h_bar


def prepare_image(
    img: Image.Image, max_pixels: int, min_pixels: int, *, factor: int = VISUAL_TOKEN_FACTOR
) -> Image.Image:
    """Upright, first-frame RGB copy of ``img`` resized to multiples of ``factor`` within the pixel budget."""
    img = _first_frame(img)
    img = ImageOps.exif_transpose(img)
    img = _to_rgb(img)
    img = _pad_extreme_aspect(img)
    w, h = target_size(img.width, img.height, max_pixels, min_pixels, factor)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    return img


def detect_language(text: str) -> str:
    """``"zh"`` when the text contains CJK characters, else ``"en"``."""
    return "zh" if _CJK_RE.search(text or "") else "en"


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic colourful test image (no randomness source needed)."""
    img = Image.new("RGB", (width, height))
    pixels = [
        ((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, ((x + y) * 3 + seed * 11) % 256)
        for y in range(height)
        for x in range(width)
    ]
    img.putdata(pixels)
    return img
