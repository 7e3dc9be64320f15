"""Photos' embedded ICC colour profiles, made sRGB through Little CMS (Pillow's ImageCms).

An iPhone's photos are Display P3, a camera's often Adobe RGB: OpenCV and Pillow hand back their
numbers as they are, and taken for sRGB (what the output video is tagged, BT.709 primaries) they
look dull: skin greyer, reds browner. A still's pixels are converted once read; a profile that
moves no colour by more than a code (an sRGB one, most photos) is left alone: converting would
cost a pass for nothing.
Without Pillow (a bare GPU node's check kit) colours are left as read.
"""

from __future__ import annotations

import functools
import io
import logging
from typing import Any

import numpy as np

from heygem_ray.media import heif

log = logging.getLogger(__name__)


def profile_of(path: str) -> bytes | None:
    """The ICC profile embedded in the image at `path`, from its headers (no pixels decoded)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        return None
    heif.register_opener()
    try:
        with heif.PILLOW_BOUND, Image.open(path) as image:
            profile = image.info.get("icc_profile")
    # not Pillow's to read (an unknown format, damaged: SyntaxError): the decoder that read it says so
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return bytes(profile) if profile else None


def to_srgb(bgr: np.ndarray, profile: bytes | None) -> np.ndarray:
    """`bgr` (uint8) from the RGB space `profile` describes into sRGB; as it is when there is no
    profile, it is sRGB's, or it is not an RGB profile Little CMS can use."""
    transform = _transform(profile) if profile else None
    if transform is None:
        return bgr
    from PIL import Image, ImageCms

    rgb = Image.fromarray(np.ascontiguousarray(bgr[..., ::-1]))
    return np.ascontiguousarray(np.asarray(ImageCms.applyTransform(rgb, transform))[..., ::-1])


@functools.lru_cache(maxsize=16)
def _transform(profile: bytes) -> Any:
    """Little CMS's transform from `profile` to sRGB; None where it moves no colour by more than
    a code (an sRGB profile of any maker: comparing its primaries alone would miss a linear or
    gamma-1.8 curve) or cannot be made."""
    try:
        from PIL import Image, ImageCms
    except ImportError:
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if source.profile.xcolor_space != "RGB ":
            return None
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        transform = ImageCms.buildTransform(source, srgb, "RGB", "RGB", flags=ImageCms.Flags.HIGHRESPRECALC)
        grid = _colour_grid()
        moved = np.asarray(ImageCms.applyTransform(Image.fromarray(grid), transform)).astype(np.int16) - grid
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        log.warning("an image's ICC profile cannot be used (%s): its colours are taken as sRGB", exc)
        return None
    return transform if np.abs(moved).max() > 1 else None


@functools.cache
def _colour_grid() -> np.ndarray:
    """17 levels of each channel, every combination (4913 colours), as one RGB image."""
    levels = np.linspace(0, 255, 17).round().astype(np.uint8)
    r, g, b = np.meshgrid(levels, levels, levels, indexing="ij")
    return np.stack([r, g, b], axis=-1).reshape(17, 289, 3)
