"""HEIF/HEIC and AVIF still images (a phone's photos) through Pillow, with pillow-heif for HEIF.

OpenCV reads neither. FFmpeg opens both, but as a one-frame video at 1 fps, and of a tiled image
(an iPhone's photos are grids of 512x512 tiles) only its first tile: as an avatar that rendered a
video at one frame a second of a corner of the photo. They are told by the brand in their `ftyp`
box, not by their name. Pillow is optional here (a bare GPU node's check kit has no pillow-heif):
without it such a photo is refused, saying what is missing.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

#: held while Pillow's own pixel bound (a module global) is lifted to size a large image, and by
#: every Pillow read here, so that none runs unbounded meanwhile
PILLOW_BOUND = threading.Lock()

#: major brands of still images in an ISO-BMFF file (image sequences, `msf1`, `avis`, are videos)
STILL_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"mif1", b"avif"}


def is_still(head: bytes) -> bool:
    """Whether a file starting with `head` (its first 12 bytes or more) is a HEIF/AVIF still."""
    return head[4:8] == b"ftyp" and head[8:12] in STILL_BRANDS


def file_is_still(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return is_still(fh.read(12))
    except OSError:
        return False


@functools.cache
def register_opener() -> bool:
    """Let Pillow open HEIF (pillow-heif); False where it is not installed. AVIF is Pillow's own."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def read_rgba(path: str) -> np.ndarray | None:
    """The photo as RGB or RGBA uint8 (a 4th channel where it has transparency), its orientation
    applied; None where Pillow cannot read it (not installed, damaged, too large)."""
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError:
        return None
    register_opener()
    try:
        with PILLOW_BOUND, Image.open(path) as opened:
            # pillow-heif applies HEIF's own rotation and resets the EXIF tag; AVIF keeps the tag
            image = ImageOps.exif_transpose(opened)
            # premultiplied alpha (mode RGBa) included: RGBA un-premultiplies
            return np.asarray(image.convert("RGBA" if image.has_transparency_data else "RGB"))
    # SyntaxError: what Pillow raises for a damaged file (a cut AVIF)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
