"""HDR (PQ and HLG) video frames made SDR: what a phone's HDR recording of a presenter looks like on
the SDR outputs the renderer writes.

Without this, an HDR clip's code values were shown as if they were SDR ones: a PQ clip dark and
flat (its reference white is 58 % of the code range), an HLG one dull, both desaturated (BT.2020
primaries read as BT.709). FFmpeg's own tone mapping needs zimg, which PyAV's FFmpeg lacks.

The conversion is display-referred, as ITU-R BT.2408 describes: each channel's code value to
display light (the PQ EOTF; for HLG the inverse OETF and the OOTF of a 1000 cd/m² display, system
gamma 1.2, taken per channel), scaled so that HDR reference white (203 cd/m²) is 1.0; light above
`KNEE` (0.75 of reference white) rolls off into the SDR range, so reference white lands at 0.875
(code 241 of 255) and brighter highlights near 255 without clipping; then BT.2020 to BT.709
primaries in linear light (none for a source with BT.709 primaries), and BT.1886's gamma 2.4 to
8-bit. Both non-linear steps are tables (65,536 entries): a 1080p frame takes ~50 ms on one core
(swscale's 8-bit BGR alone ~5 ms), for HDR clips only. Taking the OOTF and the roll-off per
channel (not on luminance) shifts the saturation of bright saturated colours slightly; skin tones,
at most 0.75 of reference white, pass unchanged.
"""

from __future__ import annotations

import functools

import av
import cv2
import numpy as np

#: FFmpeg's numbers for the transfer characteristics handled here
PQ = 16  # SMPTE ST 2084
HLG = 18  # ARIB STD-B67
HDR_TRANSFERS = (PQ, HLG)

#: the colour tags of SDR frames made here, once through BGR (`SegmentWriter`): BT.601's matrix
#: (OpenCV's and swscale's from BGR), BT.709's primaries and transfer
SDR_TAGS = "6,1,1"

#: HDR reference white (diffuse white, a face's brightest skin well under it), in cd/m² (BT.2408)
REFERENCE_WHITE = 203.0
#: relative light, reference white = 1, above which light rolls off towards SDR white
KNEE = 0.75

#: FFmpeg's numbers for an unset tag, BT.709 primaries and BT.2020's matrix
_UNSPECIFIED, _BT709, _BT2020 = 2, 1, 9

# BT.2020 to BT.709 primaries in linear light (BT.2087); as 3x4 for cv2.transform: rows reordered to
# give B, G, R, scaled to the table's range, plus half a step that makes the uint16 cast round
_BT2020_TO_BT709 = np.array(
    [
        [1.6605, -0.5876, -0.0728],
        [-0.1246, 1.1329, -0.0083],
        [-0.0182, -0.1006, 1.1187],
    ],
    np.float32,
)

_LEVELS = 65536  # of the 16-bit R'G'B' swscale gives
#: matrices whose FFmpeg number swscale takes as the same one: others (BT.2020 constant luminance,
#: ICtCp, unset) are taken for BT.2020's non-constant-luminance matrix
_SWSCALE_MATRICES = {1, 4, 5, 6, 7, 9}


def _to_bgr709(primaries: int) -> np.ndarray:
    gamut = np.eye(3, dtype=np.float32) if primaries == _BT709 else _BT2020_TO_BT709
    return np.hstack([gamut[::-1] * (_LEVELS - 1), np.full((3, 1), 0.5, np.float32)])


def transfer_of(frame: av.VideoFrame, stream_transfer: int = 0) -> int:
    """The HDR transfer (PQ, HLG) a frame's code values are in, 0 for SDR: the frame's own tag, or
    where it has none the stream's (a container may say what the bitstream does not)."""
    transfer = int(frame.color_trc or 0)
    if transfer in (0, _UNSPECIFIED):
        transfer = stream_transfer
    return transfer if transfer in HDR_TRANSFERS else 0


def frame_bgr(frame: av.VideoFrame, stream_transfer: int = 0) -> np.ndarray:
    """A decoded frame as SDR BGR, 8-bit: swscale's conversion, or for HDR `sdr_bgr`'s. A frame
    with transparency (a cut-out presenter in ProRes 4444, PNG or QuickTime Animation frames) over
    white, as a still's: else it showed whatever colour lies under the transparent pixels (black)."""
    transfer = transfer_of(frame, stream_transfer)
    if transfer:
        return sdr_bgr(frame, transfer)
    # an untagged HD frame is read with BT.709's matrix, as players show it (swscale's default is
    # BT.601's: a 10-bit or 4:4:4 clip came out with shifted colours, its 8-bit 4:2:0 cut did not)
    untagged_hd = int(frame.colorspace or _UNSPECIFIED) == _UNSPECIFIED and (frame.width >= 1280 or frame.height >= 720)
    matrix = _BT709 if untagged_hd else None
    if any(component.is_alpha for component in frame.format.components):
        bgra = frame.reformat(format="bgra", src_colorspace=matrix).to_ndarray()
        return over_white(bgra[..., :3], bgra[..., 3:])
    image: np.ndarray = frame.reformat(format="bgr24", src_colorspace=matrix).to_ndarray()
    return image


def over_white(bgr: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`bgr` composited over white by `alpha` (8- or 16-bit, one channel)."""
    weight = alpha.astype(np.float32) / (65535.0 if alpha.dtype == np.uint16 else 255.0)
    return (bgr.astype(np.float32) * weight + 255.0 * (1.0 - weight) + 0.5).astype(np.uint8)


def sdr_bgr(frame: av.VideoFrame, transfer: int) -> np.ndarray:
    """A frame whose code values are in `transfer` (PQ, HLG) as SDR BGR, 8-bit, BT.709 primaries.
    Untagged matrix and primaries are taken for BT.2020's (what HDR video uses)."""
    matrix = int(frame.colorspace or _UNSPECIFIED)
    rgb = frame.reformat(
        format="rgb48le", src_colorspace=matrix if matrix in _SWSCALE_MATRICES else _BT2020
    ).to_ndarray()  # R'G'B'
    light = _relative_light(transfer)[rgb]  # float32, HDR reference white = 1
    bgr = cv2.transform(light, _to_bgr709(int(frame.color_primaries or _UNSPECIFIED)))
    np.clip(bgr, 0, _LEVELS - 1, out=bgr)
    # a table again: numpy's and OpenCV's powers slow down ~10x on values well under 1
    return _sdr_code()[bgr.astype(np.uint16)]


def pq_to_nits(code: np.ndarray) -> np.ndarray:
    """SMPTE ST 2084's EOTF: code values in [0, 1] to display light in cd/m²."""
    m1, m2 = 2610 / 16384, 2523 / 4096 * 128
    c1, c2, c3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
    p = np.power(np.clip(code, 0.0, 1.0), 1 / m2)
    return 10000.0 * np.power(np.maximum(p - c1, 0.0) / (c2 - c3 * p), 1 / m1)


def hlg_to_nits(code: np.ndarray, peak: float = 1000.0) -> np.ndarray:
    """BT.2100 HLG: code values in [0, 1] to the light of a `peak` cd/m² display (inverse OETF,
    then the OOTF with its system gamma 1.2, per channel)."""
    a, b, c = 0.17883277, 0.28466892, 0.55991073
    code = np.clip(code, 0.0, 1.0)
    scene = np.where(code <= 0.5, code**2 / 3, (np.exp((code - c) / a) + b) / 12)
    return peak * np.power(scene, 1.2)


def roll_off(light: np.ndarray) -> np.ndarray:
    """Relative light (reference white = 1) into [0, 1]: unchanged up to KNEE, then a curve with the
    same slope there that nears 1 as light grows (t / (1 + t))."""
    over = np.maximum(light - KNEE, 0.0) / (1 - KNEE)
    return np.where(light <= KNEE, light, KNEE + (1 - KNEE) * over / (1 + over))


@functools.cache
def _relative_light(transfer: int) -> np.ndarray:
    code = np.arange(_LEVELS, dtype=np.float64) / (_LEVELS - 1)
    nits = pq_to_nits(code) if transfer == PQ else hlg_to_nits(code)
    return roll_off(nits / REFERENCE_WHITE).astype(np.float32)


@functools.cache
def _sdr_code() -> np.ndarray:
    """Linear light in [0, 1] (in _LEVELS steps) to 8-bit code values: BT.1886's inverse, no black lift."""
    light = np.arange(_LEVELS, dtype=np.float64) / (_LEVELS - 1)
    return np.round(255.0 * np.power(light, 1 / 2.4)).astype(np.uint8)
