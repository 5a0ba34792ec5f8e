"""Cheap structural checks of image files: the container is walked and must be complete, nothing is decoded.

They catch truncated uploads and garbage behind a valid header at intake for a few microseconds per
image. An image whose compressed pixel data is corrupt inside a well-formed container still passes; the GPU
worker decodes every image anyway and fails such a submission with ``image_undecodable``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable

from PIL import Image


class ImageStructureError(ValueError):
    """The image file is truncated or not well formed."""


# A marker inside JPEG entropy-coded data: 0xFF followed by neither a stuffed 0x00, a restart marker
# (RST0-7) nor another fill byte. A regular expression scans the ~1% of 0xFF bytes in C.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_SOS = 0xDA
_JPEG_EOI = 0xD9
_JPEG_TEM = 0x01
_JPEG_FILL = re.compile(rb"\xff*")
#: More markers than any real JPEG has (progressive files have tens; an ICC profile split into APP2 segments
#: or extended XMP adds dozens): a crafted flood of them is refused within half a millisecond of walking,
#: where 10,000 took the event loop over 5 ms.
MAX_JPEG_MARKERS = 1_000


def _u16be(data: bytes, pos: int) -> int:
    return (data[pos] << 8) | data[pos + 1]


def _u16le(data: bytes, pos: int) -> int:
    return data[pos] | (data[pos + 1] << 8)


def _segment_end(data: bytes, pos: int) -> int:
    """End of the JPEG segment whose length field starts at ``pos``."""
    if pos + 2 > len(data):
        raise ImageStructureError("JPEG is truncated inside a segment header")
    length = _u16be(data, pos)
    if length < 2:
        raise ImageStructureError(f"JPEG segment at byte {pos} has an invalid length")
    end = pos + length
    if end > len(data):
        raise ImageStructureError("JPEG is truncated inside a segment")
    return end


def check_jpeg(
    data: bytes, on_frame: Callable[[int, int], None] | None = None, *, walk_scans: bool = True
) -> tuple[int, int]:
    """Walk the JPEG segments up to the first scan, then to the EOI marker; the first frame's width and height.

    ``on_frame(width, height)`` is called as soon as the first frame header is read, before the rest is
    walked, so a check of the image's size can fail first. With ``walk_scans`` false, a file whose last
    bytes are the end-of-image marker is complete without its scans being walked.
    """
    n = len(data)
    pos = 2
    size: tuple[int, int] | None = None
    markers = 0
    while True:
        markers += 1
        if markers > MAX_JPEG_MARKERS:
            raise ImageStructureError("JPEG has more markers than any real image")
        if pos < n and data[pos] != 0xFF:
            # Decoders skip stray bytes between segments (libjpeg: "extraneous bytes before marker").
            pos = data.find(b"\xff", pos)
            if pos < 0:
                raise ImageStructureError("JPEG is truncated before its first scan")
        pos = _JPEG_FILL.match(data, pos).end()  # type: ignore[union-attr]
        if pos >= n:
            raise ImageStructureError("JPEG is truncated before its first scan")
        marker = data[pos]
        pos += 1
        if marker == _JPEG_TEM:
            continue
        if marker == _JPEG_EOI or 0xD0 <= marker <= 0xD8 or marker == 0x00:
            raise ImageStructureError(f"JPEG has marker 0x{marker:02X} before its first scan")
        end = _segment_end(data, pos)
        if marker in _JPEG_SOF:
            components = data[pos + 7] if pos + 7 < end else 0
            if components == 0 or end - pos != 8 + 3 * components:
                raise ImageStructureError("JPEG frame header is malformed")
            height, width = _u16be(data, pos + 3), _u16be(data, pos + 5)
            if height == 0 or width == 0:
                raise ImageStructureError("JPEG frame has an empty side")
            if size is None:
                size = (width, height)
                if on_frame is not None:
                    on_frame(width, height)
        elif marker == _JPEG_SOS:
            if size is None:
                raise ImageStructureError("JPEG scan comes before any frame header")
            if end - pos < 3 or end - pos != 6 + 2 * data[pos + 2]:
                raise ImageStructureError("JPEG scan header is malformed")
            pos = end
            break
        pos = end
    assert size is not None  # a scan is only walked into after a frame header
    if not walk_scans and data.endswith(b"\xff\xd9"):
        # Entropy-coded data never holds 0xFF 0xD9 (a 0xFF there is followed by a stuffed 0x00 or a marker),
        # so a file that ends with it was not cut short. Walking the scans (~0.4 ns per byte) would also
        # find markers out of place between them, which the GPU worker's own walk finds instead.
        return size
    # Entropy-coded data, and the tables and scans between progressive scans, until the end-of-image marker.
    while (found := _JPEG_MARKER.search(data, pos)) is not None:
        markers += 1
        if markers > MAX_JPEG_MARKERS:
            raise ImageStructureError("JPEG has more markers than any real image")
        pos = found.end()
        marker = data[pos - 1]
        if marker == _JPEG_EOI:
            return size
        if marker == 0xD8:
            raise ImageStructureError("JPEG has a second start-of-image marker inside its data")
        if marker != _JPEG_TEM:
            pos = _segment_end(data, pos)  # a table or scan header between progressive scans
    raise ImageStructureError("JPEG is truncated: no end-of-image marker")


def check_png(data: bytes) -> None:
    """Walk the PNG chunks, checking every CRC, from IHDR through IDAT to IEND."""
    view = memoryview(data)
    n = len(data)
    pos = 8
    seen_idat = False
    while True:
        if pos + 12 > n:
            raise ImageStructureError("PNG is truncated: no IEND chunk")
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if length > 0x7FFFFFFF or not kind.isalpha():
            raise ImageStructureError(f"PNG chunk at byte {pos} is malformed")
        if end > n:
            raise ImageStructureError(f"PNG is truncated inside its {kind.decode('ascii')} chunk")
        if pos == 8 and (kind != b"IHDR" or length != 13):
            raise ImageStructureError("PNG does not start with an IHDR chunk")
        if zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            raise ImageStructureError(f"PNG {kind.decode('ascii')} chunk has a bad CRC")
        if kind == b"IDAT":
            seen_idat = True
        elif kind == b"IEND":
            if not seen_idat:
                raise ImageStructureError("PNG has no image data (IDAT)")
            return
        pos = end


def _skip_gif_sub_blocks(data: bytes, pos: int) -> int:
    n = len(data)
    while pos < n:
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos
    raise ImageStructureError("GIF is truncated inside a data block")


def check_gif(data: bytes) -> None:
    """Walk the GIF blocks (extensions and image descriptors with their data) up to the trailer."""
    n = len(data)
    if n < 13:
        raise ImageStructureError("GIF is truncated inside its header")
    flags = data[10]
    pos = 13 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
    frames = 0
    while pos < n:
        block = data[pos]
        pos += 1
        if block == 0x3B:
            if frames == 0:
                raise ImageStructureError("GIF has no image")
            return
        if block == 0x21:
            pos = _skip_gif_sub_blocks(data, pos + 1)
        elif block == 0x2C:
            if pos + 10 > n:
                raise ImageStructureError("GIF is truncated inside an image descriptor")
            flags = data[pos + 8]
            pos += 9 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
            if pos >= n or not 1 <= data[pos] <= 12:
                raise ImageStructureError("GIF image data is malformed")
            pos = _skip_gif_sub_blocks(data, pos + 1)
            frames += 1
        elif frames:
            return  # stray bytes after a complete frame: decoders stop there, as at a trailer
        else:
            raise ImageStructureError(f"GIF has an unknown block 0x{block:02X} at byte {pos - 1}")
    if frames == 0:
        raise ImageStructureError("GIF is truncated: no complete image")
    # No trailer after complete frames: decoders and browsers show those frames.


def check_webp(data: bytes) -> None:
    """Check that the RIFF container holds all the bytes it declares and its chunks fill it exactly."""
    riff_end = 8 + int.from_bytes(data[4:8], "little")
    if riff_end > len(data):
        raise ImageStructureError("WebP is truncated: shorter than its RIFF header says")
    pos = 12
    seen_image = False
    while pos < riff_end:
        if pos + 8 > riff_end:
            raise ImageStructureError("WebP chunk header is cut short")
        kind = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += 8 + size + (size & 1)
        if pos - (size & 1) > riff_end:
            raise ImageStructureError(f"WebP {kind!r} chunk runs past the end of the file")
        seen_image = seen_image or kind in (b"VP8 ", b"VP8L", b"ANMF")
    if not seen_image:
        raise ImageStructureError("WebP has no image data")


def check_bmp(data: bytes) -> None:
    """Check that an uncompressed BMP holds every pixel row (or a compressed one its data offset)."""
    if len(data) < 26:
        raise ImageStructureError("BMP is truncated inside its header")
    offset = int.from_bytes(data[10:14], "little")
    header = int.from_bytes(data[14:18], "little")
    if header == 12:
        width, height = _u16le(data, 18), _u16le(data, 20)
        bits, compression = _u16le(data, 24), 0
    elif header >= 40 and len(data) >= 34:
        width = int.from_bytes(data[18:22], "little", signed=True)
        height = int.from_bytes(data[22:26], "little", signed=True)
        bits, compression = _u16le(data, 28), int.from_bytes(data[30:34], "little")
    else:
        raise ImageStructureError("BMP header is malformed")
    # BI_RGB, BI_BITFIELDS and BI_ALPHABITFIELDS store raw rows padded to 4 bytes.
    raw = compression in (0, 3, 6)
    needed = offset + ((abs(width) * bits + 31) // 32 * 4 * abs(height) if raw else 1)
    if needed > len(data):
        raise ImageStructureError("BMP is truncated: its pixel data is incomplete")


def check_tiff(data: bytes, image: Image.Image) -> None:
    """Check that every strip or tile of the first TIFF image lies inside the file."""
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        raise ImageStructureError("TIFF has no image file directory")
    offsets = tags.get(273) or tags.get(324)
    counts = tags.get(279) or tags.get(325)
    if not offsets or not counts:
        raise ImageStructureError("TIFF has no strips or tiles")
    offsets = offsets if isinstance(offsets, tuple) else (offsets,)
    counts = counts if isinstance(counts, tuple) else (counts,)
    if len(offsets) != len(counts):
        raise ImageStructureError("TIFF strip offsets and byte counts disagree")
    if not all(type(v) is int for v in (*offsets, *counts)):
        raise ImageStructureError("TIFF strip offsets or byte counts are not integers")
    if any(o + c > len(data) for o, c in zip(offsets, counts, strict=True)):
        raise ImageStructureError("TIFF is truncated: image data lies past the end of the file")


_CHECKS: dict[str, Callable[[bytes], object]] = {
    "JPEG": check_jpeg,
    "PNG": check_png,
    "GIF": check_gif,
    "WEBP": check_webp,
    "BMP": check_bmp,
}


def check_structure(data: bytes, fmt: str, image: Image.Image) -> None:
    """Raise ImageStructureError unless the file of format ``fmt`` (sniffed from its magic) is complete."""
    if fmt == "TIFF":
        check_tiff(data, image)
        return
    check = _CHECKS.get(fmt)
    if check is None:
        raise ImageStructureError(f"no structural check for {fmt}")
    check(data)
