"""Perceptual hashes of images (pHash and dHash) for recognising near-duplicates of known images."""

from __future__ import annotations

from dataclasses import dataclass

import imagehash
from PIL import Image, ImageOps

_BITS = 64
_SIGN = 1 << (_BITS - 1)
_MASK = (1 << _BITS) - 1


@dataclass(frozen=True)
class ImageHashes:
    """The 64-bit pHash and dHash of an image, as unsigned integers."""

    phash: int
    dhash: int

    @property
    def phash_hex(self) -> str:
        """The pHash as 16 hex digits."""
        return f"{self.phash:016x}"


def _as_int(value: imagehash.ImageHash) -> int:
    bits = value.hash.flatten()
    number = 0
    for bit in bits:
        number = (number << 1) | int(bool(bit))
    return number


def image_hashes(image: Image.Image) -> ImageHashes:
    """pHash and dHash of the upright first frame, so EXIF rotation and animation do not change them."""
    if getattr(image, "is_animated", False):
        image.seek(0)
    upright = ImageOps.exif_transpose(image)
    grey = upright.convert("L")
    return ImageHashes(phash=_as_int(imagehash.phash(grey)), dhash=_as_int(imagehash.dhash(grey)))


def to_signed(value: int) -> int:
    """An unsigned 64-bit hash as the signed integer Postgres ``bigint`` stores."""
    value &= _MASK
    return value - (1 << _BITS) if value & _SIGN else value


def to_unsigned(value: int) -> int:
    """A hash read back from a ``bigint`` column as an unsigned 64-bit integer."""
    return value & _MASK


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return ((a ^ b) & _MASK).bit_count()
