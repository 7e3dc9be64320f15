"""Avatar decoding and segment encoding with PyAV.

Frames are BGR uint8, display-oriented (rotation metadata applied) and cropped to even sizes so
yuv420p can carry them. Memory is bounded by the frames a caller asks for at once, never by the
video's length: the reader seeks to the keyframe before a request and decodes forward.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fractions import Fraction

import av
import av.filter
import av.logging
import cv2
import numpy as np
from av.codec.hwaccel import HWAccel

from heygem_ray.config import EncoderConfig
from heygem_ray.errors import InputError
from heygem_ray.media import hdr, heif, icc
from heygem_ray.media.yuv import assemble_i420, bgr_to_i420

#: the largest still image decoded (a 48 MP phone photo fits): one over `limits.max_avatar_pixels`
#: is shrunk to fit it, as a photo's frames become the video's, rather than refused
STILL_MAX_PIXELS = 64_000_000
#: how far ahead of the decoder a request may be before seeking beats decoding forward
_SEEK_DISTANCE = 48
#: seeks, each twice as far back, to land before a frame in an open GOP, before decoding from the start
_SEEK_TRIES = 8
#: containers read from their start, never seeked into: after a seek into an MPEG program stream
#: (.mpg, .vob) FFmpeg stamps frames up to a few frames off the times a read from the start gives
#: them, so frames were not found, or the one before was taken for the one asked for
_NO_SEEK_FORMATS = frozenset({"mpeg"})

#: frames a reader keeps, decoded on its way to a backward read's first frame, for the reads just
#: before it (a looped clip's backward half): without them each chunk of a backward pass seeks and
#: decodes from its keyframe again (16x the decoding for 8-frame chunks in 250-frame GOPs)
SPARE_BYTES = 128 * 2**20


@dataclass(frozen=True)
class VideoInfo:
    """What the pipeline needs to know about an avatar (sizes are after rotation, even-cropping and
    `fitted`: the size its frames are read and rendered at)."""

    still: bool
    fps: float
    fps_fraction: str  # exact rate, e.g. "30000/1001"
    width: int
    height: int
    rotation: int  # clockwise degrees applied to decoded frames
    frame_count: int  # from the container header; the timestamps prepare_avatar records give the true count
    #: pixel aspect ratio (after rotation), "1/1" but for anamorphic video: the output keeps it
    sar: str = "1/1"
    #: the colour tags its frames pass on to the output (`SegmentWriter`): "colorspace,primaries,trc"
    #: (FFmpeg's numbers) of a video whose 8-bit 4:2:0 planes are encoded as they are; of one whose
    #: frames go through BGR, `FROM_BGR`'s matrix with its own primaries and transfer; "" for a still
    #: (then `FROM_BGR`); `hdr.SDR_TAGS` for HDR ones, made SDR (`hdr.sdr_bgr`); None: not known (a
    #: probe before this was recorded)
    color: str | None = None
    #: the HDR transfer its frames are made SDR from (`hdr.PQ`, `hdr.HLG`), 0 for SDR; None: not
    #: known (a probe before HDR video was made SDR)
    hdr: int | None = None
    #: mirrored left to right after the rotation: a display matrix that flips (a recorder that
    #: mirrors a front camera's picture in the matrix rather than in the pixels)
    mirror: bool = False
    #: an avatar shrunk (`fitted`: a still to the pixel limit, any avatar to `render.max_side`): its
    #: own size times this is width x height, which its frames are read at; a face box given in its
    #: own pixels is scaled alike
    scale: float = 1.0
    #: what decoding does to its frames beyond converting them, `decoding_of` its first: "" none,
    #: else "deinterlaced", "over-white" (its transparency), joined by "+"; None: not known (a probe
    #: before these were done). Segments of other decoding are not joined with these.
    decoding: str | None = None
    #: its frames are held on a steady timeline (`prepare._held`: a slow clip, an animated image):
    #: frame i of the avatar is a tick, several of which may show one frame of the file
    held: bool = False


def decoded(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.VideoFrame]:
    """The stream's frames from where the container stands. A VP8/VP9 stream that carries
    transparency (WebM's `alpha_mode`: a cut-out presenter exported for the web) is decoded by
    libvpx: FFmpeg's own VP8/VP9 decoders drop the alpha plane, and the presenter showed on the
    colour under it (black) where a PNG's shows on white."""
    name = {"vp8": "libvpx", "vp9": "libvpx-vp9"}.get(stream.codec_context.name)
    if name is None or stream.metadata.get("alpha_mode") != "1" or name not in av.codecs_available:
        yield from container.decode(stream)
        return
    context = av.CodecContext.create(name, "r")
    assert isinstance(context, av.VideoCodecContext)
    context.thread_type = "AUTO"
    context.thread_count = stream.codec_context.thread_count  # the reader's share of the cores
    if stream.codec_context.extradata:
        context.extradata = stream.codec_context.extradata
    for packet in container.demux(stream):  # its last, empty packet flushes the decoder
        for frame in context.decode(packet):
            assert isinstance(frame, av.VideoFrame)
            yield frame


def decoding_of(frame: av.VideoFrame) -> str:
    """`VideoInfo.decoding` for a stream whose first frame is `frame` (`FrameReader` deinterlaces
    an interlaced stream, `hdr.frame_bgr` puts transparent pixels over white)."""
    alpha = any(component.is_alpha for component in frame.format.components)
    return "+".join(name for name, done in (("deinterlaced", frame.interlaced_frame), ("over-white", alpha)) if done)


def _even(x: int) -> int:
    return x - (x % 2)


def _clockwise_from_display_matrix(ccw_degrees: float | None) -> int:
    # FFmpeg's display matrix states the counter-clockwise rotation needed to show the frame.
    return int(round(-(ccw_degrees or 0))) % 360


def display_transform(frame: av.VideoFrame) -> tuple[int, bool]:
    """How a frame is shown: (clockwise degrees, then mirrored left to right), from its display
    matrix as FFmpeg's own autorotation reads it (fftools: a transpose where the matrix flips as it
    turns, a horizontal or vertical flip where it flips alone); a vertical flip is a half turn
    mirrored, a transpose a quarter turn mirrored."""
    clockwise = _clockwise_from_display_matrix(frame.rotation)
    data = frame.side_data.get("DISPLAYMATRIX")
    if data is None:
        return clockwise, False
    m = np.frombuffer(memoryview(data), "<i4")  # type: ignore[arg-type]  # SideData is a buffer; its stub says object
    if clockwise in (90, 270):  # FFmpeg: transpose cclock_flip / clock_flip where m[3] says so
        return clockwise, bool(m[3] > 0) if clockwise == 90 else bool(m[3] < 0)
    if clockwise == 180:
        h, v = bool(m[0] < 0), bool(m[4] < 0)
        return (180, False) if h and v else (0, True) if h else (180, True) if v else (0, False)
    return (180, True) if clockwise == 0 and m[4] < 0 else (clockwise, False)


def orient(frame: np.ndarray, clockwise: int, width: int, height: int, mirror: bool = False) -> np.ndarray:
    """Turn a decoded frame for display (`clockwise`, then `mirror`ed) and crop it to the even size."""
    if clockwise:
        frame = np.rot90(frame, k=-(clockwise // 90))
    if mirror:
        frame = frame[:, ::-1]
    return np.ascontiguousarray(frame[:height, :width])


#: how the still image files a probe takes as photos start, whatever their names: PNG, JPEG, BMP, TIFF,
#: JPEG 2000 (file and codestream); WebP and HEIF/AVIF by their own tests
_IMAGE_MAGIC = (
    b"\x89PNG",
    b"\xff\xd8\xff",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",  # BigTIFF
    b"MM\x00+",
    b"\x00\x00\x00\x0cjP  ",
    b"\xffO\xffQ",
)
#: the codecs of a one-frame stream FFmpeg reads from a still image (a photo in a container)
IMAGE_CODECS = frozenset({"mjpeg", "png", "bmp", "webp", "tiff", "jpeg2000"})


def is_image_data(head: bytes) -> bool:
    """Whether a file starting with `head` (its first 16 bytes or more) is a still image: a photo."""
    webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    return head.startswith(_IMAGE_MAGIC) or webp or heif.is_still(head)


def file_is_image(path: str) -> bool:
    """Whether the file at a local path holds a still image (`is_image_data`), whatever its name
    says: a clip saved as .png plays, a photo saved as .mp4 is a photo."""
    try:
        with open(path, "rb") as fh:
            return is_image_data(fh.read(32))
    except OSError:
        return False


def read_image(path: str, what: str = "avatar", display_uri: str | None = None) -> np.ndarray:
    """A still avatar as BGR uint8 (EXIF orientation applied), cropped to even size: a photo, or
    the one frame of a video file (`probe` takes those as stills)."""
    uri = display_uri or path
    data = np.fromfile(path, dtype=np.uint8)
    image: np.ndarray | None
    if heif.is_still(data[:12].tobytes()):
        image = _read_heif(path, what, uri)
    else:
        image = _read_with_opencv(data)
        image = _read_one_frame(path) if image is None else image
    if image is None:
        raise InputError(what, uri, "not a readable image (or larger than this machine decodes)")
    h, w = _even(image.shape[0]), _even(image.shape[1])
    if h < 2 or w < 2:
        raise InputError(what, uri, f"image is too small ({image.shape[1]}x{image.shape[0]})")
    return np.ascontiguousarray(image[:h, :w])


def _read_with_opencv(data: np.ndarray) -> np.ndarray | None:
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except cv2.error:  # e.g. past OPENCV_IO_MAX_IMAGE_PIXELS (the studio sets it)
        image = None
    return None if image is None else _on_white(image, data)


def _read_one_frame(path: str) -> np.ndarray | None:
    """The first frame of a file's video stream, upright, over white where transparent: the one
    frame of a video `probe` took as a still (a PNG in a QuickTime file, a GIF of one frame)."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return None
            frame = next(decoded(container, container.streams.video[0]), None)
            if frame is None:
                return None
            clockwise, mirror = display_transform(frame)
            image = hdr.frame_bgr(frame)
    except av.error.FFmpegError:
        return None
    w, h = (image.shape[0], image.shape[1]) if clockwise in (90, 270) else (image.shape[1], image.shape[0])
    return orient(image, clockwise, _even(w), _even(h), mirror)


def _read_heif(path: str, what: str, uri: str) -> np.ndarray:
    rgba = heif.read_rgba(path)
    if rgba is None:
        needs = "" if heif.register_opener() else "; reading HEIC photos needs pillow-heif installed"
        raise InputError(what, uri, f"not a readable HEIF/AVIF image (or larger than this machine decodes){needs}")
    bgr = np.ascontiguousarray(rgba[..., 2::-1])
    return hdr.over_white(bgr, rgba[..., 3:]) if rgba.shape[2] == 4 else bgr


def _on_white(image: np.ndarray, data: np.ndarray) -> np.ndarray:
    """A PNG, WebP or one-frame GIF still with transparency, over white: a cut-out portrait's
    background would otherwise be whatever colour lies under the transparent pixels (often black).
    The alpha is read without the EXIF orientation `image` had applied: one the orientation turned
    is left as read.
    (Not a TIFF's: OpenCV gives some TIFFs' colours premultiplied by their alpha, others' not.)"""
    head = data[:16].tobytes()
    if not (head.startswith((b"\x89PNG", b"GIF8")) or head[8:12] == b"WEBP"):
        return image
    full = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)  # alpha included, EXIF orientation not applied
    if full is None or full.ndim != 3 or full.shape[2] != 4:
        return image
    plain = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if plain is None or not np.array_equal(plain, image):
        return image
    return hdr.over_white(image, full[..., 3:])


def probe(
    path: str,
    still_fps: float,
    display_uri: str | None = None,
    max_pixels: int | None = None,
    max_side: int = 0,
) -> VideoInfo:
    """Container facts for a video or still image at a local path; with `max_pixels`, a video whose
    frames are larger is refused before any of them is decoded, a still image shrunk to fit it
    (and to `max_side` on its longest side, 0: no such bound). A video's facts are of its own
    size: `fitted` brings them to `max_side` (a probe is cached, the bound may change)."""
    uri = display_uri or path
    if max_pixels:
        _check_frame_size(path, uri, max_pixels)
    if heif.file_is_still(path) or (file_is_image(path) and not _animated(path, uri)):
        return _still_info(read_image(path, display_uri=uri), uri, still_fps, max_pixels, max_side)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
                raise InputError("avatar", uri, f"has no video stream (found {kinds})")
            stream = container.streams.video[0]
            if stream.disposition & av.stream.Disposition.attached_pic:
                raise InputError("avatar", uri, "has no video stream, only cover art (is it an audio file?)")
            if stream.codec_context is None:  # found, but this FFmpeg has no decoder for it (a JPEG XL)
                raise InputError("avatar", uri, f"its video ({container.format.name}) cannot be decoded here")
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            # the container's word, before decoding replaces it with the bitstream's (maybe none)
            stream_transfer = int(stream.codec_context.color_trc or 0)
            # two frames decoded, not the container's count: a fragmented MP4's header counts the
            # frames of its first fragment only (one, in an all-intra clip)
            head = list(itertools.islice(decoded(container, stream), 2))
            if not head:
                raise InputError("avatar", uri, "has no decodable video frames")
            # one frame (a photo in a container, a GIF of one frame): a still, at `still_fps`, not a
            # video at whatever rate its one frame's duration implies (1 fps, or 50)
            if len(head) == 1:
                return _still_info(read_image(path, display_uri=uri), uri, still_fps, max_pixels, max_side)
            if not rate or rate <= 0:
                raise InputError("avatar", uri, "has no usable frame rate")
            first = head[0]
            clockwise, mirror = display_transform(first)
            context = stream.codec_context
            transfer = hdr.transfer_of(first, stream_transfer)
            if _plain_420(first, transfer):
                color = (
                    f"{int(first.colorspace or 2)},{int(context.color_primaries or 2)},{int(context.color_trc or 2)}"
                )
            else:
                color = hdr.SDR_TAGS if transfer else _through_bgr_tags(context)
            w, h = (first.height, first.width) if clockwise in (90, 270) else (first.width, first.height)
            sar = stream.sample_aspect_ratio or Fraction(1)
            if clockwise in (90, 270):
                sar = 1 / sar
    except av.error.FFmpegError as exc:
        raise InputError("avatar", uri, f"is not a readable video ({exc.strerror or exc})") from None
    if _even(w) < 2 or _even(h) < 2:
        raise InputError("avatar", uri, f"frame size {w}x{h} is too small")
    return VideoInfo(
        still=False,
        fps=float(rate),
        fps_fraction=f"{rate.numerator}/{rate.denominator}",
        width=_even(w),
        height=_even(h),
        rotation=clockwise,
        mirror=mirror,
        frame_count=int(stream.frames or 0),
        sar=f"{sar.numerator}/{sar.denominator}",
        color=color,
        hdr=transfer,
        decoding=decoding_of(first),
    )


def _through_bgr_tags(context: av.VideoCodecContext) -> str:
    """The colour tags of an SDR video whose frames are made BGR to be rendered (10-bit, 4:2:2,
    4:4:4, full range): BGR is encoded with `FROM_BGR`'s matrix, and keeps the source's primaries
    and transfer (a BT.2020 or Display P3 clip tagged BT.709 would play desaturated); untagged
    ones get `FROM_BGR`'s."""
    matrix, primaries, trc = FROM_BGR.split(",")
    own_primaries, own_trc = int(context.color_primaries or 0), int(context.color_trc or 0)
    return ",".join(
        (
            matrix,
            str(own_primaries) if own_primaries not in (0, 2) else primaries,
            str(own_trc) if own_trc not in (0, 2) else trc,
        )
    )


def _check_frame_size(path: str, uri: str, max_pixels: int) -> None:
    """Refuse an avatar whose frames are over `max_pixels`, from its headers: FFmpeg's own limit on
    its decoders keeps the probe of a stream without a size in its headers (a PNG, whatever it is
    named) from decoding a frame of gigabytes; what FFmpeg then cannot size, an image's own header
    may. What is sized by neither, or cannot be opened, is left to `probe`. A HEIF/AVIF photo is
    sized by its header alone (FFmpeg sizes one tile of a tiled one). A still image is held to
    STILL_MAX_PIXELS instead (`probe` shrinks it to `max_pixels`)."""
    if heif.file_is_still(path):
        _refuse_over(uri, _image_header_size(path) or (0, 0), max_pixels, still=True)
        return
    limit = {"max_pixels": str(max(max_pixels, STILL_MAX_PIXELS))}
    try:
        try:
            # PyAV's stubs say a list of str; it takes (and documents) a dict of options per stream
            container = av.open(path, stream_options=[limit] * 16)  # type: ignore[list-item]
        except ValueError:  # formats that list no stream before probing (MPEG-PS, FLV) take none
            container = av.open(path)
        with container:
            if not container.streams.video:
                return
            context = container.streams.video[0].codec_context
            if context is None:  # no decoder for it here: `probe` says so
                return
            width, height = context.width, context.height
            still = (file_is_image(path) or context.name in IMAGE_CODECS) and context.name != "apng"
    except av.error.FFmpegError:
        return
    if not width or not height:
        width, height = _image_header_size(path) or (0, 0)
    _refuse_over(uri, (width, height), max_pixels, still)


def _refuse_over(uri: str, size: tuple[int, int], max_pixels: int, still: bool = False) -> None:
    """InputError for frames over `max_pixels`, or (`still`) an image over STILL_MAX_PIXELS."""
    width, height = size
    pixels = width * height
    if still and pixels > STILL_MAX_PIXELS:
        raise InputError(
            "avatar", uri, f"image is {width}x{height} = {pixels} pixels, over the {STILL_MAX_PIXELS} a still may have"
        )
    if not still and pixels > max_pixels:
        raise InputError(
            "avatar", uri, f"frames are {width}x{height} = {pixels} pixels, over limits.max_avatar_pixels={max_pixels}"
        )


def _animated(path: str, uri: str) -> bool:
    """Whether an image file holds an animation, which FFmpeg reads as a video (an APNG; a GIF is
    no image suffix's): read as a still, it showed its first frame only. An animated WebP, which
    FFmpeg cannot decode, is refused rather than frozen. False where Pillow is not installed (a
    bare GPU node's check kit) or does not know the file."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        return False
    try:
        with Image.open(path) as image:
            animated, kind = bool(getattr(image, "is_animated", False)), image.format
    except (UnidentifiedImageError, OSError, ValueError):
        return False
    if animated and kind == "WEBP":
        raise InputError("avatar", uri, "is an animated WebP, which cannot be read as a video: give it as MP4 or GIF")
    return animated


def _image_header_size(path: str) -> tuple[int, int] | None:
    """An image file's size from its header, not decoded (Pillow reads no pixels to open one); None
    where Pillow is not installed (a bare GPU node's check kit) or does not know the file."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        return None

    heif.register_opener()
    with heif.PILLOW_BOUND:  # its own bound, a module global, would hide the size of a large one
        bound, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(path) as image:
                return image.size
        except (UnidentifiedImageError, OSError, ValueError):
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = bound


def _still_info(
    image: np.ndarray, uri: str, still_fps: float, max_pixels: int | None = None, max_side: int = 0
) -> VideoInfo:
    """A still's facts, `fitted` to `max_pixels` and `max_side`. A rate given in decimals for an
    NTSC one (29.97, 23.976, 59.94) is that rate (30000/1001), not 2997/100: what editors and
    platforms take for a standard rate."""
    rate = Fraction(still_fps).limit_denominator(1001)
    ntsc = Fraction(round(rate * Fraction(1001, 1000)) * 1000, 1001)
    if ntsc and abs(rate / ntsc - 1) < 1e-4:
        rate = ntsc
    width, height = image.shape[1], image.shape[0]
    rational = f"{rate.numerator}/{rate.denominator}"
    info = VideoInfo(True, float(rate), rational, width, height, 0, 1, color="", hdr=0, decoding="")
    return fitted(info, uri, max_side, max_pixels)


def fitted(info: VideoInfo, uri: str, max_side: int, max_pixels: int | None = None) -> VideoInfo:
    """`info` shrunk, when over `max_side` on its longest side or over `max_pixels` (0 or None: no
    such bound), to the largest even size within both, keeping its shape (`VideoInfo.scale`). A
    strip that would shrink to under 2 pixels across is bad input."""
    width, height = info.width, info.height
    scale = min(
        math.sqrt(max_pixels / (width * height)) if max_pixels else 1.0,
        max_side / max(width, height) if max_side else 1.0,
        1.0,
    )
    if scale == 1:
        return info
    # 1920/W*W may come out 1919.99..: the epsilon keeps a side the bound names at it
    shrunk = _even(int(width * scale + 1e-6)), _even(int(height * scale + 1e-6))
    if min(shrunk) < 2:
        what = "image is" if info.still else "frames are"
        raise InputError(
            "avatar", uri, f"{what} {width}x{height}: shrunk to fit the limits it would be {shrunk[0]}x{shrunk[1]}"
        )
    return replace(info, width=shrunk[0], height=shrunk[1], scale=info.scale * scale)


def read_still(path: str, info: VideoInfo) -> np.ndarray:
    """A still avatar's frame at its probed size (`VideoInfo.scale`), in sRGB (`icc`: made so after
    shrinking, a fraction of the pixels to convert)."""
    image = read_image(path)
    if (image.shape[1], image.shape[0]) != (info.width, info.height):
        image = cv2.resize(image, (info.width, info.height), interpolation=cv2.INTER_AREA)
    return icc.to_srgb(image, icc.profile_of(path))


class AvatarDecodeError(EOFError):
    """The avatar stopped giving the frames its timestamps promise: cut short or damaged."""


def _damaged(exc: av.error.FFmpegError) -> AvatarDecodeError:
    return AvatarDecodeError(f"FFmpeg: {exc.strerror or exc}")


def _damage_named(frames: Iterator[av.VideoFrame]) -> Iterator[av.VideoFrame]:
    """`frames`, FFmpeg's errors raised as `AvatarDecodeError` (how one shows depends on the decoder's
    threads: an unthreaded decoder ends early, a threaded one raises InvalidDataError)."""
    try:
        yield from frames
    except av.error.FFmpegError as exc:
        raise _damaged(exc) from None


#: what FrameReader.read returns: BGR (h, w, 3), or planar I420 (h * 3 // 2, w) for the encoder
PIXEL_FORMATS = ("bgr24", "yuv420p")


class FrameReader:
    """Random access to an avatar's frames by index, using the per-frame timestamps prepare_avatar
    records (a demux pass), so variable frame rates and B-frames index correctly."""

    def __init__(
        self,
        path: str,
        info: VideoInfo,
        pts: np.ndarray | None,
        first_index: int = 0,
        threads: int = 0,
        pixel_format: str = "bgr24",
        nvdec: int | None = None,
    ):
        """`pts[i]` is the timestamp of frame `first_index + i`; only those frames can be read.
        With `pixel_format="yuv420p"` frames come as I420 arrays: a yuv420p source's planes as
        decoded (no colour conversion), anything else converted once. `nvdec`: decode on that CUDA
        device's video decoder (`nvdec_accel`) where it takes the stream (`nvdec_takes`), else in
        software."""
        if pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"pixel_format must be one of {PIXEL_FORMATS}, got {pixel_format!r}")
        self.info = info
        self._i420 = pixel_format == "yuv420p"
        self._still = read_still(path, info) if info.still else None
        if self._still is not None and self._i420:
            self._still = bgr_to_i420(self._still)
        self._container: av.container.InputContainer | None = None
        if not info.still:
            assert pts is not None
            self._pts = pts
            self._first = first_index
            # frame indices by timestamp, searched: a dict of every frame of a long clip took 116
            # bytes a frame (31 MB for 3 hours); these take 16
            self._order = np.argsort(pts, kind="stable")
            self._sorted = np.asarray(pts, np.int64)[self._order]
            self._container = av.open(path)
            self._stream = self._container.streams.video[0]
            # NVDEC for what it decodes itself (`nvdec_takes`; FFmpeg decoded the rest in software
            # after all, on the one thread NVDEC's parsing gets), and not a stream decoded with more
            # than FFmpeg's decoder (deinterlaced, put over white), as the face track saw it
            self._nvdec = nvdec is not None and info.decoding == "" and nvdec_takes(self._stream.codec_context)
            if nvdec is not None and self._nvdec:
                self._container.close()
                self._container = av.open(path, hwaccel=nvdec_accel(nvdec))
                self._stream = self._container.streams.video[0]
                self._stream.codec_context.thread_count = 1  # the GPU decodes, one thread parses
            else:
                self._stream.thread_type = "AUTO"
                if threads:
                    self._stream.codec_context.thread_count = threads
            self._seeks = self._container.format.name not in _NO_SEEK_FORMATS
            self._decoder: Iterator[av.VideoFrame] | None = None
            self._interlaced: bool | None = None  # known once a frame is decoded
            self._next = 0  # index of the frame the running decoder yields next
            self._last_lo = -1  # the first frame the last read wanted
            frame_bytes = info.width * info.height * 3 // (2 if self._i420 else 1) or 1
            self._spare_frames = SPARE_BYTES // frame_bytes
            self._spare: dict[int, np.ndarray] = {}  # frames decoded before a backward read's first
            #: the ticks of the last frame decoded that are held past the read that decoded it, and it
            self._held: tuple[range, np.ndarray] = (range(0), np.empty(0, np.uint8))

    @property
    def on_nvdec(self) -> bool:
        """Whether NVDEC decodes this reader's stream (asked for, and `nvdec_takes` it)."""
        return self._container is not None and self._nvdec

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, indices: np.ndarray) -> dict[int, np.ndarray]:
        """Frames for the given indices (any order, repeats allowed); each array is the caller's
        own. Holds at most max(indices) - min(indices) + 1 frames while decoding, and up to
        SPARE_BYTES of frames decoded on the way to a backward read, which the reads just before
        it take instead of seeking again."""
        wanted = sorted({int(i) for i in indices})
        if self._still is not None:
            return {i: self._still for i in wanted}
        lo, hi = wanted[0], wanted[-1]
        if not self._first <= lo <= hi < self._first + len(self._pts):
            raise IndexError(f"frames {lo}..{hi} outside {self._first}..{self._first + len(self._pts) - 1}")
        out = {i: self._spare.pop(i) for i in wanted if i in self._spare}
        # the ticks of the last frame decoded that ran on past the read before (`VideoInfo.held`):
        # the decoder is past that frame, and the next read would seek back to its keyframe
        held, frame_held = self._held
        out.update({i: frame_held.copy() for i in wanted if i in held and i not in out})
        want = set(wanted) - out.keys()
        if not want:
            return out
        backward = lo < self._last_lo
        self._last_lo, lo = lo, min(want)
        decoder = self._decoder
        if decoder is None or lo < self._next or (self._seeks and lo - self._next > _SEEK_DISTANCE):
            decoder = self._seek(lo)
            if backward:  # the frames just before `lo` are likely the next read's: keep them
                self._spare = {}
        keep_from = lo - self._spare_frames if backward else lo
        while self._next <= hi:
            frame = next(decoder, None)
            if frame is None:
                raise AvatarDecodeError(f"video ended before frame {hi}")
            group = self._indices_of(frame.pts) if frame.pts is not None else range(self._next, self._next + 1)
            if not group:
                continue
            self._next = group[-1] + 1
            converted: np.ndarray | None = None
            for index in group:  # one frame of the file, for each tick it is held (`VideoInfo.held`)
                if index in want or keep_from <= index < lo:
                    converted = self._convert(frame) if converted is None else converted.copy()
                    (out if index in want else self._spare)[index] = converted
            if group[-1] > hi:  # held on past this read: its next ticks are the next read's
                self._held = (group, self._convert(frame) if converted is None else converted.copy())
        missing = want - out.keys()
        if missing:
            raise AvatarDecodeError(f"frames {sorted(missing)[:5]} not found in the stream")
        return out

    def frames_between(self, start: int, stop: int, every: int = 1) -> Iterator[tuple[int, np.ndarray | None]]:
        """Frames `start` .. `stop` - 1 in order as (index, frame), streamed: one held at a time.
        Frame `start` and every `every`-th after it come as arrays, the others as None (decoded,
        each needs its predecessors, but not converted); a frame the stream lacks is left out. The
        ticks of a held frame (`VideoInfo.held`) come as one array, the same object each time: a
        caller may see that it has handled that picture already, and must not write into it."""
        if self._still is not None:
            if start == 0 < stop:
                yield 0, self._still
            return
        decoder = self._seek(start)
        try:
            for frame in decoder:
                converted: np.ndarray | None = None
                for index in self._indices_of(frame.pts) if frame.pts is not None else ():
                    if index >= stop:
                        return
                    if index >= start and (index - start) % every == 0:
                        converted = self._convert(frame) if converted is None else converted
                        yield index, converted
                    elif index >= start:
                        yield index, None
        finally:
            self._decoder = None  # the next read seeks again

    def _indices_of(self, pts: int) -> range:
        """The indices of the frames with timestamp `pts`: one, several where a frame is held for
        several ticks (`VideoInfo.held`, whose repeats are neighbours), none for a frame not among
        those this reader was given."""
        k = int(np.searchsorted(self._sorted, pts, side="left"))
        count = int(np.searchsorted(self._sorted, pts, side="right")) - k
        first = self._first + int(self._order[k]) if count else 0
        return range(first, first + count)

    def _convert(self, frame: av.VideoFrame) -> np.ndarray:
        info = self.info
        if self._i420 and _plain_420(frame, self.info.hdr or 0):
            # a clip over render.max_side, or a frame of another size: swscale's area filter (4K to
            # 1080p in ~2 ms)
            if info.scale != 1 or _resized(frame, info):
                frame = frame.reformat(*_stored_size(info), format="yuv420p", interpolation="AREA")
            nv12 = frame.format.name == "nv12"  # NVDEC's output: one chroma plane of U, V pairs
            # memoryview: below Python 3.12 numpy's stubs name the buffer types they take, and a plane is none
            planes = [np.frombuffer(memoryview(p), np.uint8).reshape(p.height, p.line_size) for p in frame.planes]
            widths = [p.width * (2 if nv12 and k == 1 else 1) for k, p in enumerate(frame.planes)]  # in bytes
            planes = [plane[:, :width] for plane, width in zip(planes, widths)]
            if nv12:
                y, uv = planes
                u, v = uv[:, 0::2], uv[:, 1::2]
            else:
                y, u, v = planes
            if info.rotation:
                y, u, v = (np.rot90(p, k=-(info.rotation // 90)) for p in (y, u, v))
            if info.mirror:
                y, u, v = (p[:, ::-1] for p in (y, u, v))
            return assemble_i420(y, u, v, info.width, info.height)
        image = _oriented_bgr(frame, info)
        return bgr_to_i420(image) if self._i420 else image

    def _one_second(self) -> int:
        """One second in the stream's time base."""
        base = self._stream.time_base
        return max(1, int(1 / base)) if base else 1

    def _seek(self, index: int) -> Iterator[av.VideoFrame]:
        """Restart decoding at a keyframe at or before frame `index`; returns the new decoder.

        In an open GOP (x265's default, x264's open-gop) the frames shown just before a keyframe
        are decoded after it, from the GOP before. The demuxer's seek can land on that keyframe, and
        the decoder then drops those leading frames: so the first frame decoded is checked, and the
        seek goes further back until it lands at or before `index`. In an interlaced stream, at or
        before the frame before it: the deinterlacer makes each frame with its neighbours. A
        container that is never seeked into (`_NO_SEEK_FORMATS`) decodes from the start."""
        container = self._container
        if container is None:
            raise ValueError("FrameReader is closed")
        before = 1 if self._interlaced and index > self._first else 0
        want = int(self._pts[index - before - self._first])
        target, back = want, 0
        for _ in range(_SEEK_TRIES if self._seeks else 0):
            try:
                container.seek(target, stream=self._stream, backward=True)
            except av.error.FFmpegError:  # before the stream's first keyframe
                break
            decoder = self._decoded()
            first = next(decoder, None)
            if first is not None and self._interlaced is None:
                self._interlaced = bool(first.interlaced_frame)
                if self._interlaced and index > self._first:  # now known: a frame earlier
                    return self._seek(index)
            if first is not None and (first.pts is None or first.pts <= want):
                self._decoder = self._progressive(itertools.chain([first], decoder))
                self._next = self._first  # a lower bound until the first frame's pts tells
                return self._decoder
            # landed past it (stream time: this far), or on no keyframe at all (MPEG-TS has no index:
            # the decoder skips to the next keyframe, and in the last GOP there is none)
            past = first.pts - want if first is not None and first.pts is not None else self._one_second()
            back = max(2 * back, past)
            target = want - back
        try:  # no keyframe found before it: decode from the start
            container.seek(0)
        except av.error.FFmpegError as exc:
            raise _damaged(exc) from None
        self._decoder = self._progressive(self._decoded())
        self._next = self._first  # a lower bound until the first frame's pts tells
        return self._decoder

    def _decoded(self) -> Iterator[av.VideoFrame]:
        """The stream's frames from where the container stands; FFmpeg's refusal of the data (a
        file cut short or damaged past what its probe decoded) raised as `AvatarDecodeError`, the
        file's fault: not tried again elsewhere. NVDEC's errors are left as they are (the device's,
        maybe)."""
        assert self._container is not None
        frames = decoded(self._container, self._stream)
        return frames if self._nvdec else _damage_named(frames)

    def _progressive(self, frames: Iterator[av.VideoFrame]) -> Iterator[av.VideoFrame]:
        """`frames`, deinterlaced where the stream is interlaced (`deinterlaced`)."""
        return deinterlaced(frames, self._stream.time_base)


#: FFmpeg's deinterlacer for interlaced avatars (a broadcast camera's 1080i): bwdif, one frame out
#: per frame in, the frames flagged interlaced only (a progressive one passes through unchanged);
#: ~4.6 ms a 1080p frame. Encoded as they are, their two fields combed on every movement, and the
#: face tracker and the renderer saw the combs.
DEINTERLACER = ("bwdif", "mode=send_frame:parity=auto:deint=interlaced")


def deinterlaced(frames: Iterator[av.VideoFrame], time_base: Fraction | None) -> Iterator[av.VideoFrame]:
    """`frames` as progressive frames, in order, each with its own timestamp in `time_base`: the
    frames of a stream whose first frame is interlaced go through DEINTERLACER (a new filter each
    seek: each frame is then made from itself and its neighbours, one frame later than decoded);
    other streams' pass as they are. Where the size or format changes midway (a 1080i recording
    joined to a 720i one), the frames of each shape go through a filter of their own: frames of the
    new shape held back for a filter of the first grew with the rest of the clip."""
    first = next(frames, None)
    if first is None:
        return
    if not first.interlaced_frame or time_base is None:
        yield first
        yield from frames
        return
    graph, shape = _deinterlacer(first, time_base), (first.width, first.height, first.format.name)
    for frame in itertools.chain([first], frames):
        if (frame.width, frame.height, frame.format.name) != shape:  # the last frames of the shape before
            graph.push(None)
            yield from _pulled(graph, time_base)
            graph, shape = _deinterlacer(frame, time_base), (frame.width, frame.height, frame.format.name)
        graph.push(frame)
        yield from _pulled(graph, time_base)
    graph.push(None)
    yield from _pulled(graph, time_base)


def _deinterlacer(frame: av.VideoFrame, time_base: Fraction) -> av.filter.Graph:
    """A DEINTERLACER filter for frames of `frame`'s size and format."""
    graph = av.filter.Graph()
    source = graph.add_buffer(width=frame.width, height=frame.height, format=frame.format, time_base=time_base)
    name, args = DEINTERLACER
    deinterlacer, sink = graph.add(name, args), graph.add("buffersink")
    source.link_to(deinterlacer)
    deinterlacer.link_to(sink)
    graph.configure()
    return graph


def _pulled(graph: av.filter.Graph, time_base: Fraction) -> Iterator[av.VideoFrame]:
    """The frames the filter has ready, their timestamps back in the stream's `time_base` (the
    deinterlacer halves it: a field's)."""
    while True:
        try:
            frame = graph.pull()
        except (av.error.BlockingIOError, av.error.EOFError):
            return
        assert isinstance(frame, av.VideoFrame)
        if frame.pts is not None and frame.time_base:
            frame.pts = round(frame.pts * frame.time_base / time_base)
        frame.time_base = time_base
        yield frame


def _stored_size(info: VideoInfo) -> tuple[int, int]:
    """(width, height) of `info`'s frames as stored, before they are turned upright."""
    return (info.height, info.width) if info.rotation in (90, 270) else (info.width, info.height)


def _resized(frame: av.VideoFrame, info: VideoInfo) -> bool:
    """Whether a video frame is not of the size its stream was probed at (`info`, before a
    `fitted` scale): a stream whose resolution changes partway (a saved HLS or WebRTC recording
    that adapted its quality, two files joined). Its frames are scaled to the probed size: the
    face track, the renderer and the encoder all work at that one size."""
    width, height = _stored_size(info)
    if info.scale != 1:
        return False  # scaled to that size anyway
    # the probed size is the first frame's, cut to even numbers
    return not (width <= frame.width <= width + 1 and height <= frame.height <= height + 1)


def _oriented_bgr(frame: av.VideoFrame, info: VideoInfo) -> np.ndarray:
    """A decoded frame as the avatar's BGR frame: made SDR, turned upright, at `info`'s size (a
    clip `fitted` to a smaller one is shrunk, a frame of another size than the stream's first
    scaled to it), the caller's own array."""
    image = hdr.frame_bgr(frame, info.hdr or 0)
    if (info.scale != 1 and not info.still) or (not info.still and _resized(frame, info)):
        image = cv2.resize(image, _stored_size(info), interpolation=cv2.INTER_AREA)
    elif frame.format.name == "bgr24":  # a view of the decoder's own frame, which later frames build on
        image = image.copy()
    return orient(image, info.rotation, info.width, info.height, info.mirror)


def _plain_420(frame: av.VideoFrame, stream_transfer: int = 0) -> bool:
    """Planes the encoder can take as they are (NV12's chroma once split): 8-bit 4:2:0, video range,
    SDR (`hdr.transfer_of`), even size (odd sizes are cropped, which would split chroma samples
    once rotated)."""
    return (
        frame.format.name in ("yuv420p", "nv12")
        and not hdr.transfer_of(frame, stream_transfer)
        and frame.color_range != av.video.reformatter.ColorRange.JPEG
        and frame.width % 2 == 0
        and frame.height % 2 == 0
    )


def nvdec_accel(device: int) -> HWAccel:
    """Decoding on CUDA device `device`'s NVDEC, frames brought back to host memory (NV12). FFmpeg
    shares the device's primary context with torch instead of making a context per reader, and
    decodes in software what that decoder cannot take (codec, profile, size)."""
    return HWAccel("cuda", device=str(device), allow_software_fallback=True, options={"primary_ctx": "1"})


#: what NVDEC is given (`nvdec_takes`): H.264 and HEVC in 8-bit 4:2:0, what cameras and phones
#: record and every NVDEC decodes (`nvdec_problem` checks H.264 on the device); FFmpeg would decode
#: anything else in software after all, on the one thread a reader gives NVDEC
NVDEC_CODECS = frozenset({"h264", "hevc"})
NVDEC_PIXEL_FORMATS = frozenset({"yuv420p", "yuvj420p"})


def nvdec_takes(context: av.CodecContext) -> bool:
    """Whether a stream whose decoder is `context` goes to NVDEC (`NVDEC_CODECS`)."""
    return context.name in NVDEC_CODECS and getattr(context, "pix_fmt", None) in NVDEC_PIXEL_FORMATS


def ffmpeg_has_cuda() -> bool:
    """Whether this FFmpeg (PyAV's) was built with CUDA devices, which NVDEC needs."""
    return "cuda" in av.codec.hwaccel.hwdevices_available()


def nvdec_problem(device: int) -> str | None:
    """Why NVDEC cannot decode H.264 on CUDA device `device` here (None: it decodes, bit for bit as
    software does). Opens a device context and decodes a few frames made now."""
    buffer = io.BytesIO()
    try:
        with av.open(buffer, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast", "crf": "20"})
            stream.width, stream.height, stream.pix_fmt = 256, 144, "yuv420p"
            ramp = np.add.outer(np.arange(144), np.arange(256)).astype(np.uint8)
            for i in range(3):
                frame = av.VideoFrame.from_ndarray(np.dstack([ramp + 40 * i] * 3), format="bgr24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        decoded, formats = {}, set()
        for accel in (None, nvdec_accel(device)):
            buffer.seek(0)
            with av.open(buffer, "r", hwaccel=accel) as container:
                ctx = container.streams.video[0].codec_context
                if accel is not None and not ctx.is_hwaccel:
                    return "FFmpeg's H.264 decoder has no CUDA configuration"
                frames = list(container.decode(video=0))
                decoded[accel is None] = [f.to_ndarray(format="yuv420p") for f in frames]
                if accel is not None:
                    formats = {f.format.name for f in frames}
    except (av.error.FFmpegError, OSError, ValueError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if formats != {"nv12"}:  # software's yuv420p: FFmpeg fell back, the GPU decoded nothing
        return f"the GPU's decoder did not take the stream (frames came as {sorted(formats)})"
    if len(decoded[False]) != 3 or any((a != b).any() for a, b in zip(decoded[False], decoded[True])):
        return "NVDEC's frames differ from software decoding"
    return None


#: why an avatar whose frames' timestamps do not follow the order they are shown in is refused:
#: frames are found by timestamp, so it would play out of order, each with another frame's face box
OUT_OF_ORDER = (
    "its frame timestamps are not in display order (an AVI with B-frames?): re-encode it, or remux it "
    "to MP4 with `ffmpeg -fflags +genpts -i in.avi -c copy out.mp4`"
)


def iter_frames(
    path: str, info: VideoInfo, display_uri: str | None = None, limit: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Every frame in presentation order as (pts, BGR frame), or the first `limit`; a still image
    yields one frame. Frames whose timestamps go back raise InputError (`OUT_OF_ORDER`)."""
    for pts, frame in iter_sampled_frames(path, info, 1, display_uri, limit):
        assert frame is not None  # every frame is kept
        yield pts, frame


def iter_sampled_frames(
    path: str, info: VideoInfo, every: int, display_uri: str | None = None, limit: int | None = None
) -> Iterator[tuple[int, np.ndarray | None]]:
    """As `iter_frames`, but only every `every`-th frame (the first, then each `every` on) comes as
    a BGR array, the others as None: every frame is decoded (each needs its predecessors) but only
    those are converted (~3 ms a 720p frame, ~7 at 1080p)."""
    if info.still:
        yield 0, read_still(path, info)
        return
    uri = display_uri or path
    last: int | None = None
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            timed = ((f.pts, f) for f in decoded(container, stream) if f.pts is not None)
            for index, (pts, frame) in enumerate(itertools.islice(timed, limit)):
                if last is not None and pts <= last:
                    raise InputError("avatar", uri, OUT_OF_ORDER)
                last = pts
                if index % every:
                    yield pts, None
                    continue
                yield pts, _oriented_bgr(frame, info)
    except av.error.FFmpegError as exc:
        raise InputError("avatar", uri, f"decoding failed ({exc.strerror or exc})") from None


def encoder_works(codec: str, options: dict[str, str] | None = None, pix_fmt: str = "yuv420p") -> bool:
    """Whether this machine can open `codec` for a small H.264 encode of `pix_fmt` frames (NVENC
    needs a GPU with a video encoder: L4 and A10G have one, H100 does not; and takes no 4:2:2)."""
    try:
        with av.open(os.devnull, "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=25, options=options)
            if not isinstance(stream, av.VideoStream):  # an audio or subtitle encoder
                return False
            stream.width, stream.height, stream.pix_fmt = 256, 256, pix_fmt
            frame = av.VideoFrame.from_ndarray(np.zeros((256, 256, 3), np.uint8), format="bgr24")
            container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        return True
    except (av.error.FFmpegError, ValueError, OSError):
        return False


def encoder_problem(codec: str, enc: EncoderConfig) -> str | None:
    """Why `codec` will not encode with `enc`'s settings here (None: it does). Some settings stop
    the encoder opening (an x264 level it cannot keep); x264 skips options it cannot parse with a
    log line as the only sign, so a typo in encoder.x264_params would silently change nothing."""
    options = encoder_options(codec, enc)
    level, skip = av.logging.get_level(), av.logging.get_skip_repeated()
    av.logging.set_level(av.logging.WARNING)  # where libx264 says it
    av.logging.set_skip_repeated(False)  # a complaint the same as the last one logged must count too
    try:
        with av.logging.Capture() as logs:
            opens = encoder_works(codec, options, enc.pix_fmt)
    finally:
        av.logging.set_level(level)
        av.logging.set_skip_repeated(skip)
    complaints = [message.strip() for _, _, message in logs if "parsing option" in message]
    if complaints:
        return f"encoder.x264_params={enc.x264_params}: x264 says {'; '.join(complaints)}"
    return None if opens else f"{codec} does not open with the encoder settings {options}"


def auto_codec(pix_fmt: str = "yuv420p") -> str:
    """What `encoder.codec=auto` means for this process: NVENC when it may use a GPU (inside Ray:
    one Ray gave it) and that GPU has a video encoder (L4, A10G; not H100) that takes `pix_fmt`,
    else libx264. A CPU actor on a GPU node sees the GPU too, but must not take its encoder
    unaccounted."""
    from heygem_ray.devices import cuda_usable

    return "h264_nvenc" if cuda_usable() and encoder_works("h264_nvenc", pix_fmt=pix_fmt) else "libx264"


def encoder_options(codec: str, enc: EncoderConfig) -> dict[str, str]:
    """Quality settings per encoder: x264's CRF, preset and options, NVENC's constant-quality VBR."""
    if codec == "libx264":
        return {"crf": str(enc.crf), "preset": enc.preset} | (
            {"x264-params": enc.x264_params} if enc.x264_params else {}
        )
    if codec == "h264_nvenc":
        from heygem_ray.devices import cuda_index

        # the GPU Ray gave this process, as its renderer and NVDEC use it (NVENC takes the first)
        return {"rc": "vbr", "cq": str(enc.crf), "preset": "p4", "tune": "hq", "gpu": str(cuda_index())}
    return {}


#: the colour tags of frames this module makes from BGR of unknown colours: BT.601's matrix (OpenCV's
#: and swscale's from BGR) on BT.709's primaries and transfer, the colours of HD video and of an
#: sRGB photo (photos' ICC profiles are made sRGB); BT.601's primaries would shift them in players
#: that manage colour (Safari, QuickTime)
FROM_BGR = hdr.SDR_TAGS


def output_tags(color: str, i420: bool) -> str:
    """The colour tags of an avatar's frames as encoded (`VideoInfo.color` "colorspace,primaries,
    trc"): as decoded where its planes reach the encoder (`i420`), else made from BGR with BT.601's
    matrix, its primaries and transfer kept where known."""
    if not color:
        return FROM_BGR
    if i420:
        return color
    _, primaries, trc = color.split(",")
    return f"6,{primaries},{trc}"


class SegmentWriter:
    """Encodes exactly the frames it is given into an mp4 file: first frame IDR, closed GOPs, and the
    same encoder settings for every segment of a row, so segments join without re-encoding."""

    def __init__(
        self,
        path: str,
        width: int,
        height: int,
        fps_fraction: str,
        codec: str,
        enc: EncoderConfig,
        threads: int = 0,
        sar: str = "1/1",
        color: str | None = None,
    ):
        """`codec`: the campaign's (`encoder.codec` once `auto` is decided); the rest of `enc`
        as configured; `sar`: the avatar's pixel aspect ratio, written into the stream; `color`:
        the avatar's `VideoInfo.color`, the colour tags written (None: none)."""
        rate = Fraction(fps_fraction)
        self._container = av.open(path, "w", format="mp4")
        stream = self._container.add_stream(codec, rate=rate, options=encoder_options(codec, enc))
        if not isinstance(stream, av.VideoStream):
            self._container.close()
            raise ValueError(f"encoder {codec!r} is not a video encoder")  # noqa: TRY004 - a bad name, not a bad type
        self._stream = stream
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, enc.pix_fmt
        self._stream.time_base = 1 / rate
        if Fraction(sar) != 1:
            self._stream.codec_context.sample_aspect_ratio = Fraction(sar)
        if threads:
            self._stream.codec_context.thread_count = threads
        self._i420 = enc.pix_fmt == "yuv420p"
        if color is not None:  # players take untagged HD for BT.709: frames made from BGR here are BT.601
            tags = output_tags(color, self._i420)
            context = self._stream.codec_context
            context.colorspace, context.color_primaries, context.color_trc = (int(t) for t in tags.split(","))
            context.color_range = 1  # video range (MPEG): what both ways make
        self._count = 0
        self._closed = False

    @property
    def takes_i420(self) -> bool:
        """Whether `write_i420` can be used: the encoder's pixel format is yuv420p."""
        return self._i420

    def write(self, frame_bgr: np.ndarray) -> None:
        if self._i420:
            frame = av.VideoFrame.from_ndarray(bgr_to_i420(frame_bgr), format="yuv420p")
        else:  # other pixel formats: the encoder's own conversion
            frame = av.VideoFrame.from_ndarray(frame_bgr, format="bgr24")
        self._mux(frame)

    def write_i420(self, frame_i420: np.ndarray) -> None:
        """An I420 frame (h * 3 // 2, w); the encoder's pixel format must be yuv420p."""
        if not self._i420:
            raise ValueError("write_i420 needs an encoder with pix_fmt yuv420p")
        self._mux(av.VideoFrame.from_ndarray(frame_i420, format="yuv420p"))

    def _mux(self, frame: av.VideoFrame) -> None:
        frame.pts = self._count
        self._count += 1
        self._container.mux(self._stream.encode(frame))

    def close(self) -> int:
        """Finish the file (the encoder's last frames, the index); returns the frames written."""
        if not self._closed:
            self._closed = True
            try:
                self._container.mux(self._stream.encode(None))
            finally:
                self._container.close()
        return self._count

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        """Not closed by then (a failure): the file, the encoder and its threads are let go now,
        not when a long-lived actor's garbage collector gets to them."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(av.error.FFmpegError, OSError):
                self._container.close()
