"""HDR (PQ, HLG) avatars read as the SDR colours they show: real HEVC/H.264 files tagged as phones
tag them, made here from known colours, decoded through the renderer's readers."""

from __future__ import annotations

import av
import numpy as np
import pytest

from heygem_ray.config import EncoderConfig
from heygem_ray.media import hdr, video

# BT.709 linear light (reference white = 1) of four bands: a grey, a skin tone, a saturated green
# and a highlight 1.2 times as bright as reference white
BANDS = np.array([[0.4, 0.4, 0.4], [0.45, 0.25, 0.17], [0.05, 0.5, 0.05], [1.2, 1.2, 1.2]])
BAND_WIDTH = 32
# BT.709 to BT.2020 primaries in linear light (BT.2087), written out: not the module's own inverse
BT709_TO_BT2020 = np.array([[0.6274, 0.3293, 0.0433], [0.0691, 0.9195, 0.0114], [0.0164, 0.0880, 0.8956]])
# what each band shows in SDR: as it is below the knee (0.75), the highlight rolled off to
# 0.75 + 0.25 * t / (1 + t), t = (1.2 - 0.75) / 0.25 (code 245, where a clip would give 255)
EXPECTED_LIGHT = np.minimum(BANDS, 0.75 + 0.25 * 1.8 / 2.8)
EXPECTED_BGR = np.round(255 * np.power(EXPECTED_LIGHT, 1 / 2.4))[:, ::-1]


def _pq_code(nits: np.ndarray) -> np.ndarray:
    m1, m2 = 2610 / 16384, 2523 / 4096 * 128
    c1, c2, c3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
    y = np.power(nits / 10000.0, m1)
    return np.power((c1 + c2 * y) / (1 + c3 * y), m2)


def _hlg_code(nits: np.ndarray) -> np.ndarray:
    a, b, c = 0.17883277, 0.28466892, 0.55991073
    scene = np.power(nits / 1000.0, 1 / 1.2)
    return np.where(scene <= 1 / 12, np.sqrt(3 * scene), a * np.log(np.maximum(12 * scene - b, 1e-9)) + c)


def _hdr_clip(
    path: str,
    transfer: int,
    codec: str = "libx265",
    pix_fmt: str = "yuv420p10le",
    matrix: int = 9,
    container_tags_only: bool = False,
) -> None:
    """Five frames of BANDS, as a camera would store them: BT.2020 primaries, `transfer`'s code
    values, BT.2020's non-constant-luminance matrix (tagged `matrix`: 2 leaves it unset), video
    range. `container_tags_only`: the bitstream says nothing of its colours, the container does."""
    nits = BANDS @ BT709_TO_BT2020.T * hdr.REFERENCE_WHITE
    rgb = _pq_code(nits) if transfer == hdr.PQ else _hlg_code(nits)
    r, g, b = rgb.T
    y = 0.2627 * r + 0.6780 * g + 0.0593 * b
    cb, cr = (b - y) / 1.8814, (r - y) / 1.4746
    depth = 10 if pix_fmt.endswith("10le") else 8
    scale = 2 ** (depth - 8)
    levels = [np.round(scale * (16 + 219 * y)), np.round(scale * (128 + 224 * cb)), np.round(scale * (128 + 224 * cr))]
    width, height = BAND_WIDTH * len(BANDS), 32
    dtype = np.uint16 if depth > 8 else np.uint8
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx265":
            stream.options = {"x265-params": "log-level=error:lossless=1"}
        else:
            stream.options = {"qp": "0"}
        context = stream.codec_context
        tags = (9, transfer, matrix)
        if not container_tags_only:
            context.color_primaries, context.color_trc, context.colorspace = tags
        packets = []
        for i in range(5):
            frame = av.VideoFrame(width, height, pix_fmt)
            for k, plane in enumerate(frame.planes):
                sub = 1 if k == 0 else 2
                row = np.repeat(levels[k], BAND_WIDTH // sub).astype(dtype)
                buf = np.frombuffer(memoryview(plane), dtype).reshape(plane.height, -1)
                buf[:, : row.size] = row
            frame.pts = i
            packets += stream.encode(frame)
        packets += stream.encode(None)
        if container_tags_only:  # the encoder has started untagged: these reach the container alone
            context.color_primaries, context.color_trc, context.colorspace = tags
        container.mux(packets)


def _band_means(bgr: np.ndarray) -> np.ndarray:
    """Each band's mean BGR, away from its edges (4:2:0 chroma blends the columns at a border)."""
    return np.array(
        [bgr[8:-8, i * BAND_WIDTH + 8 : (i + 1) * BAND_WIDTH - 8].reshape(-1, 3).mean(0) for i in range(len(BANDS))]
    )


def test_transfer_functions_meet_at_reference_white():
    assert hdr.pq_to_nits(np.array(0.5806)) == pytest.approx(203, abs=1)  # BT.2408's PQ reference white
    assert hdr.pq_to_nits(np.array(1.0)) == pytest.approx(10000)
    assert hdr.hlg_to_nits(np.array(0.75)) == pytest.approx(203, abs=2)  # HLG's 75 %
    assert hdr.hlg_to_nits(np.array(1.0)) == pytest.approx(1000)
    light = np.linspace(0, 50, 5001)
    rolled = hdr.roll_off(light)
    below = light <= hdr.KNEE
    np.testing.assert_array_equal(rolled[below], light[below])  # mid-tones and skin untouched
    assert np.all(np.diff(rolled) > 0) and rolled[-1] < 1  # brighter stays brighter, all within SDR
    h = 1e-6
    slope = (hdr.roll_off(np.array(hdr.KNEE + h)) - hdr.roll_off(np.array(hdr.KNEE))) / h
    assert slope == pytest.approx(1, abs=1e-3)  # no kink at the knee


@pytest.mark.parametrize(
    "transfer, name, matrix, container_tags_only",
    [
        (hdr.PQ, "hdr.mp4", 9, False),
        (hdr.HLG, "hdr.mp4", 9, False),
        (hdr.PQ, "untagged_matrix.mp4", 2, False),  # taken for BT.2020's, not swscale's BT.601 default
        (hdr.HLG, "container_tags.mkv", 9, True),  # frames decode untagged: the stream's tags count
    ],
)
def test_an_hdr_clip_reads_as_the_sdr_colours_it_shows(tmp_path, transfer, name, matrix, container_tags_only):
    """A grey, a skin tone, a saturated green and a highlight, stored as an HDR camera stores them,
    come out of the reader as BT.709 SDR (the highlight rolled off, not clipped); swscale alone
    (what was done before) is far off."""
    source = str(tmp_path / name)
    _hdr_clip(source, transfer, matrix=matrix, container_tags_only=container_tags_only)
    info = video.probe(source, 25)
    assert info.color == hdr.SDR_TAGS and info.hdr == transfer
    pts = np.array([p for p, _ in video.iter_frames(source, info)])
    with video.FrameReader(source, info, pts) as reader:
        got = _band_means(reader.read(np.array([2]))[2])
    np.testing.assert_allclose(got, EXPECTED_BGR, atol=3)
    with av.open(source) as container:
        plain = _band_means(next(container.decode(video=0)).to_ndarray(format="bgr24"))
    assert np.abs(plain - EXPECTED_BGR).max() > 25


def test_an_8bit_hlg_clip_is_not_passed_through_and_is_tagged_sdr(tmp_path):
    """8-bit 4:2:0 planes usually go to the encoder as decoded, keeping their tags: HLG ones would
    stay HLG there, so they go through the conversion, and the output says BT.709 SDR."""
    source = str(tmp_path / "hlg8.mp4")
    _hdr_clip(source, hdr.HLG, codec="libx264", pix_fmt="yuv420p")
    info = video.probe(source, 25)
    assert info.color == hdr.SDR_TAGS
    out = str(tmp_path / "out.mp4")
    pts = np.array([p for p, _ in video.iter_frames(source, info)])
    width = BAND_WIDTH * len(BANDS)
    with (
        video.SegmentWriter(out, width, 32, "25", "libx264", EncoderConfig(crf=0), color=info.color) as writer,
        video.FrameReader(source, info, pts, pixel_format="yuv420p") as reader,
    ):
        frames = reader.read(np.arange(5))
        for i in range(5):
            writer.write_i420(frames[i])
        writer.close()
    with av.open(out) as container:
        context = container.streams.video[0].codec_context
        assert (context.colorspace, context.color_primaries, context.color_trc) == (6, 1, 1)
        got = _band_means(next(container.decode(video=0)).to_ndarray(format="bgr24"))
    np.testing.assert_allclose(got, EXPECTED_BGR, atol=6)  # 8-bit HLG in, 8-bit out


@pytest.mark.parametrize("pix_fmt", ["yuv444p", "yuv422p10le", "yuva444p"])
def test_an_untagged_hd_frame_reads_with_bt709s_matrix_as_players_show_it(pix_fmt):
    """Untagged frames went through swscale's default, BT.601's matrix: an untagged HD clip that
    is not 8-bit 4:2:0 (those pass through as they are) came out with shifted colours."""
    import av

    def bgr(width: int, height: int, colorspace: int) -> list[int]:
        frame = av.VideoFrame(width, height, pix_fmt)
        deep = pix_fmt.endswith("10le")  # 10-bit: the same levels, four times over
        for plane, level in zip(frame.planes, (120, 90, 170, 255), strict=False):
            values = np.full(
                plane.buffer_size // (2 if deep else 1), level * (4 if deep else 1), np.uint16 if deep else np.uint8
            )
            plane.update(values.tobytes())
        frame.colorspace = colorspace
        return [int(v) for v in hdr.frame_bgr(frame)[0, 0]]

    def near(got: list[int], want: list[float]) -> bool:  # swscale rounds each format its own way
        return max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 2

    bt709, bt601 = [40.8, 106.8, 196.4], [44.4, 101.8, 188.1]  # B, G, R of Y'CbCr (120, 90, 170), studio range
    assert near(bgr(1280, 720, 2), bt709)  # untagged HD
    assert near(bgr(640, 480, 2), bt601)  # untagged SD: BT.601, as players show it
    assert near(bgr(1280, 720, 6), bt601)  # tagged: as tagged
    assert near(bgr(1280, 720, 1), bt709)
