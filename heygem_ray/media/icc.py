"""Photos' embedded ICC colour profiles, made sRGB through Little CMS (Pillow's ImageCms).

An iPhone's photos are Display P3, a camera's often Adobe RGB: OpenCV and Pillow hand back their
numbers as they are, and taken for sRGB (what the output video is tagged, BT.709 primaries) they
look dull: skin greyer, reds browner. A still's pixels are converted once read; a profile with
sRGB's own colorants is left alone (most photos: converting them would cost a pass for nothing).
Without Pillow (a bare GPU node's check kit) colours are left as read.
"""

from __future__ import annotations

import functools
import io
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: how far (in XYZ) a profile's colorants may be from sRGB's and count as sRGB: rounding in
#: s15Fixed16 and in the adaptation different makers used is ~1e-4
SRGB_TOLERANCE = 2e-3


def profile_of(path: str) -> bytes | None:
    """The ICC profile embedded in the image at `path`, from its headers (no pixels decoded)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        return None
    from heygem_ray.media import heif

    heif.register_opener()
    try:
        with Image.open(path) as image:
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
    try:
        from PIL import ImageCms
    except ImportError:
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if source.profile.xcolor_space != "RGB " or _is_srgb(source.profile):
            return None
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        return ImageCms.buildTransform(source, srgb, "RGB", "RGB", flags=ImageCms.Flags.HIGHRESPRECALC)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        log.warning("an image's ICC profile cannot be used (%s): its colours are taken as sRGB", exc)
        return None


def _is_srgb(profile: Any) -> bool:
    colorants, srgb = _colorants(profile), _srgb_colorants()
    if colorants is None or srgb is None:  # not a matrix-shaper profile: Little CMS decides
        return False
    return bool(np.allclose(colorants, srgb, atol=SRGB_TOLERANCE))


def _colorants(profile: Any) -> list[tuple[float, float, float]] | None:
    """A matrix-shaper profile's red, green and blue colorants (XYZ, adapted to D50)."""
    colorants = [profile.red_colorant, profile.green_colorant, profile.blue_colorant]
    return None if any(c is None for c in colorants) else [c[0] for c in colorants]


@functools.cache
def _srgb_colorants() -> list[tuple[float, float, float]] | None:
    from PIL import ImageCms

    return _colorants(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).profile)
