"""Phones' photos as avatars: HEIC (an iPhone's default) and AVIF stills, written here with
pillow-heif and Pillow, read as stills at `render.still_fps`, not as one-frame videos."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import compose_config
from heygem_ray import campaign, demo
from heygem_ray.errors import InputError
from heygem_ray.media import heif, icc, video


def _save(path: str, bgr: np.ndarray, **options) -> None:
    heif.register_opener()
    Image.fromarray(np.ascontiguousarray(bgr[..., ::-1])).save(path, quality=95, **options)


@pytest.mark.parametrize("name", ["portrait.heic", "portrait.avif", "heic_named.mp4"])
def test_a_heif_or_avif_photo_is_a_still_with_its_pixels(tmp_path, name):
    """FFmpeg would take it for a one-frame video at 1 fps (of a tiled HEIC, one tile); it is a
    still at the still rate, whatever its name, with the photo's pixels."""
    portrait = demo.portrait(256)
    path = str(tmp_path / name)
    if name.endswith(".mp4"):
        _save(str(tmp_path / "x.heic"), portrait)
        shutil.move(str(tmp_path / "x.heic"), path)
    else:
        _save(path, portrait)
    info = video.probe(path, 25)
    assert info.still and info.fps == 25 and (info.width, info.height) == (portrait.shape[1], portrait.shape[0])
    image = video.read_image(path)
    assert image.shape == portrait.shape and np.abs(image.astype(int) - portrait).mean() < 3


def test_a_turned_photo_is_upright_and_a_transparent_one_over_white(tmp_path):
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :40] = 255  # white left half: turned a quarter clockwise, the top half is white
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show it rotated 90 degrees clockwise
    for suffix in (".heic", ".avif"):
        path = str(tmp_path / f"turned{suffix}")
        _save(path, wide, exif=exif.tobytes())
        image = video.read_image(path)
        assert image.shape[:2] == (80, 40), suffix
        assert image[:30].mean() > 240 and image[50:].mean() < 15, suffix
    rgba = np.zeros((32, 32, 4), np.uint8)  # transparent but for a red square
    rgba[8:24, 8:24] = (255, 0, 0, 255)
    path = str(tmp_path / "cutout.avif")
    Image.fromarray(rgba).save(path, quality=100)
    image = video.read_image(path)
    assert image[:4, :4].min() > 240  # over white, not black
    assert image[12:20, 12:20, 2].mean() > 200 and image[12:20, 12:20, :2].mean() < 60


@pytest.mark.parametrize("suffix", [".heic", ".jpg"])
def test_a_photo_over_the_pixel_limit_is_shrunk_to_fit_and_its_box_with_it(tmp_path, suffix):
    """A 12 MP phone photo is over the default limit (4096x2304): its frames would be the video's,
    so it is shrunk to fit rather than refused; a face box given in its own pixels follows."""
    from heygem_ray import prepare
    from heygem_ray.config import DetectorConfig

    path = str(tmp_path / f"big{suffix}")
    photo = np.full((300, 400, 3), 90, np.uint8)
    photo[100:200, 150:250] = 200  # a bright square, the "face"
    _save(path, photo) if suffix == ".heic" else Image.fromarray(photo).save(path, quality=95)
    info = video.probe(path, 25, max_pixels=30_000)  # 120,000 pixels: halved each way
    assert info.still and (info.width, info.height) == (200, 150) and info.scale == pytest.approx(0.5)
    shrunk = video.read_still(path, info)
    assert shrunk.shape == (150, 200, 3) and shrunk[60:90, 85:115].min() > 180
    assert video.probe(path, 25, max_pixels=120_000).scale == 1
    box = DetectorConfig(name="box")
    track = prepare.prepare_avatar(path, (150, 100, 250, 200), box, str(tmp_path / "cache"), 25.0, max_pixels=30_000)
    assert track.info.width == 200 and track.boxes[0].tolist() == [75, 50, 125, 100]


def test_a_photo_longer_than_max_side_is_shrunk_to_it_and_the_campaign_renders_that_size(tmp_path):
    """A phone's 4032x3024 photo would make a video ~6x the pixels of 1080p: its longest side is
    brought to render.max_side, keeping its shape; a smaller photo keeps its size."""
    photo = np.full((300, 400, 3), 90, np.uint8)
    path = str(tmp_path / "wide.jpg")
    Image.fromarray(photo).save(path, quality=95)
    info = video.probe(path, 25, max_side=200)
    assert (info.width, info.height) == (200, 150) and info.scale == pytest.approx(0.5)
    both = video.probe(path, 25, max_pixels=10_000, max_side=200)  # the tighter bound wins
    assert both.width * both.height <= 10_000 and both.width / both.height == pytest.approx(4 / 3, abs=0.05)
    assert video.probe(path, 25, max_side=400).scale == 1
    tall = str(tmp_path / "tall.heic")
    _save(tall, np.full((256, 192, 3), 90, np.uint8))
    portrait = video.probe(tall, 25, max_side=128)
    assert (portrait.width, portrait.height) == (96, 128)
    odd = str(tmp_path / "odd.png")  # 1920/2148*2148 is 1919.99.. in floating point
    Image.fromarray(np.full((1208, 2148, 3), 90, np.uint8)).save(odd)
    assert (video.probe(odd, 25, max_side=1920).width, video.probe(odd, 25, max_side=1920).height) == (
        1920,
        1078,
    )
    strip = str(tmp_path / "strip.png")  # 2000x8: 960x2 at 960, 0 high at 480
    Image.fromarray(np.full((8, 2000, 3), 90, np.uint8)).save(strip)
    assert video.probe(strip, 25, max_side=960).height == 2
    with pytest.raises(InputError, match=r"image is 2000x8: shrunk to fit the limits it would be 480x0"):
        video.probe(strip, 25, max_side=480)


def test_render_max_side_is_validated():
    from heygem_ray.config import RenderConfig

    with pytest.raises(ValueError, match="max_side"):
        RenderConfig(max_side=8)
    assert RenderConfig(max_side=0).max_side == 0


def test_a_photo_over_the_decoding_bound_is_refused_from_its_header(tmp_path, monkeypatch):
    path = str(tmp_path / "huge.heic")
    _save(path, np.full((64, 96, 3), 128, np.uint8))
    monkeypatch.setattr(video, "STILL_MAX_PIXELS", 6000)
    with pytest.raises(InputError, match=r"image is 96x64 = 6144 pixels, over the 6000 a still may have"):
        video.probe(path, 25, max_pixels=5000)


@pytest.mark.parametrize("codec, pix_fmt", [("png", "rgb24"), ("mjpeg", "yuvj420p")])
def test_a_photo_in_a_video_container_is_held_to_the_still_limit_not_refused(tmp_path, codec, pix_fmt):
    """A photo exported as a one-frame MOV (a PNG or JPEG frame, no image magic at the file's start)
    is a still: over `limits.max_avatar_pixels` it is shrunk to them, as a photo file is, not
    refused as a video of oversized frames."""
    import av

    path = str(tmp_path / "photo.mov")
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=1)
        stream.width, stream.height, stream.pix_fmt = 2400, 1600, pix_fmt
        frame = av.VideoFrame.from_ndarray(np.full((1600, 2400, 3), 120, np.uint8), format="rgb24")
        container.mux(stream.encode(frame.reformat(format=pix_fmt)))
        container.mux(stream.encode())
    assert not video.file_is_image(path)
    info = video.probe(path, 25, max_pixels=1920 * 1080)
    assert info.still and info.width * info.height <= 1920 * 1080 and info.width > 1700


@pytest.mark.parametrize("name", ["scan.tif", "scan_named.mp4"])
def test_a_bigtiff_photo_is_a_still_whatever_its_name(tmp_path, name):
    """A BigTIFF (what scanners and imaging tools write past 4 GiB, or when asked) is a photo:
    FFmpeg cannot read one, OpenCV can."""
    path = str(tmp_path / name)
    Image.fromarray(np.full((64, 96, 3), 120, np.uint8)).save(path, format="TIFF", big_tiff=True)
    info = video.probe(path, 25)
    assert info.still and (info.width, info.height) == (96, 64)
    assert int(video.read_image(path)[32, 48, 0]) == 120


def test_a_premultiplied_transparent_heic_goes_over_white_and_a_damaged_avif_is_bad_input(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = (255, 0, 0, 255)
    path = str(tmp_path / "cutout.heic")
    heif.register_opener()
    Image.fromarray(rgba).convert("RGBa").save(path, quality=100)  # Pillow opens it as mode RGBa
    image = video.read_image(path)
    assert image[:4, :4].min() > 240 and image[12:20, 12:20, 2].mean() > 200
    whole = str(tmp_path / "whole.avif")
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(whole)
    cut = str(tmp_path / "cut.avif")
    with open(whole, "rb") as src, open(cut, "wb") as dst:
        data = src.read()
        dst.write(data[: int(len(data) * 0.9)])
    with pytest.raises(InputError, match="not a readable HEIF/AVIF image"):
        video.read_image(cut)
    # named as the row names it, not as this node's cached copy
    with pytest.raises(InputError, match=r"^avatar s3://bucket/anna\.avif: not a readable HEIF/AVIF image"):
        video.probe(cut, 25.0, display_uri="s3://bucket/anna.avif")


@pytest.mark.parametrize("name", ["anna.jxl", "anna.mp4"])
def test_a_photo_ffmpeg_finds_but_cannot_decode_is_bad_input(tmp_path, name):
    """A JPEG XL (this FFmpeg demuxes it, and has no decoder for it) failed with AttributeError: not
    the avatar's fault, so every row of it probed it again, and its error said nothing."""
    path = tmp_path / name
    path.write_bytes(b"\xff\x0aO\x06" + bytes(64))
    with pytest.raises(InputError, match=r"^avatar s3://b/a: its video \(jpegxl_pipe\) cannot be decoded here"):
        video.probe(str(path), 25.0, display_uri="s3://b/a", max_pixels=10**8)


def test_a_campaign_over_a_heic_photo_renders_at_the_still_rate_and_max_side(media_dir, tmp_path):
    avatar = str(tmp_path / "presenter.heic")
    _save(avatar, demo.portrait(512))  # 512x600: its longest side brought to 300
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"id": ["a"], "audio": [str(media_dir / "speech3.wav")], "avatar": [avatar]}), manifest)
    out = tmp_path / "out"
    cfg = compose_config(
        f"manifest={manifest}", f"output={out}", "render.progress=false", "cluster=inline", "render.max_side=300"
    )
    (row,) = campaign.run(cfg).rows
    assert row.status == "ok", row.error
    import av

    with av.open(os.path.join(out, "a.mp4")) as c:
        stream = c.streams.video[0]
        assert stream.average_rate == 25 and stream.frames == 75  # 3 s of narration
        assert (stream.width, stream.height) == (256, 300)


def _rgb_to_xyz(primaries: list[tuple[float, float]], white: tuple[float, float]) -> np.ndarray:
    """The RGB-to-XYZ matrix of a space with these xy primaries and white point."""
    xyz = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in primaries]).T
    w = np.array([white[0] / white[1], 1.0, (1 - white[0] - white[1]) / white[1]])
    return xyz * np.linalg.solve(xyz, w)


SRGB_TO_XYZ = _rgb_to_xyz([(0.64, 0.33), (0.30, 0.60), (0.15, 0.06)], (0.3127, 0.3290))
P3_TO_XYZ = _rgb_to_xyz([(0.680, 0.320), (0.265, 0.690), (0.150, 0.060)], (0.3127, 0.3290))


def _srgb_profile_altered(primaries_to_xyz: np.ndarray | None = None, linear: bool = False) -> bytes:
    """Pillow's own sRGB profile with its colorant tags for other primaries (adapted to D50 as that
    one's are) and, `linear`, a straight line for its tone curve: Display P3 is sRGB's curve and
    white with P3's primaries."""
    from PIL import ImageCms

    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    tags = {}
    for i in range(int.from_bytes(data[128:132], "big")):
        entry = data[132 + 12 * i : 144 + 12 * i]
        tags[bytes(entry[:4])] = int.from_bytes(entry[4:8], "big")
    if primaries_to_xyz is not None:
        srgb_d50 = np.array(
            [[_s15(data, tags[t] + 8 + 4 * k) for k in range(3)] for t in (b"rXYZ", b"gXYZ", b"bXYZ")]
        ).T
        new_d50 = srgb_d50 @ np.linalg.inv(SRGB_TO_XYZ) @ primaries_to_xyz  # the same adaptation to D50
        for column, tag in enumerate((b"rXYZ", b"gXYZ", b"bXYZ")):
            for k in range(3):
                at = tags[tag] + 8 + 4 * k
                data[at : at + 4] = int(round(new_d50[k, column] * 65536)).to_bytes(4, "big", signed=True)
    if linear:
        for tag in (b"rTRC", b"gTRC", b"bTRC"):  # parametric curve of type 0, y = x ** 1.0
            at = tags[tag]
            assert data[at : at + 4] == b"para"
            data[at + 8 : at + 16] = bytes(4) + (65536).to_bytes(4, "big")
    data[84:100] = bytes(16)  # no profile ID: it would no longer match
    return bytes(data)


def _s15(data: bytearray, at: int) -> float:
    return int.from_bytes(data[at : at + 4], "big", signed=True) / 65536


def _srgb_decode(v: np.ndarray) -> np.ndarray:
    v = v / 255.0
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def _srgb_encode(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0, 1)
    return 255.0 * np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".heic"])
def test_a_display_p3_photo_is_made_srgb_and_an_srgb_one_left_as_it_is(tmp_path, suffix):
    """An iPhone's photos are Display P3: their numbers taken for sRGB look dull (skin greyer). The
    still the renderer reads is converted (Little CMS) to what P3-to-sRGB's matrix says; a photo
    tagged sRGB, or not tagged, keeps its pixels."""
    from PIL import ImageCms

    rgb = np.zeros((64, 96, 3), np.uint8)
    rgb[:, :32] = (200, 120, 100)  # a skin tone
    rgb[:, 32:64] = (60, 160, 90)
    rgb[:, 64:] = (128, 128, 128)  # grey stays grey: the same white
    p3 = str(tmp_path / f"p3{suffix}")
    srgb = str(tmp_path / f"srgb{suffix}")
    plain = str(tmp_path / f"plain{suffix}")
    options = {"quality": 100} if suffix != ".png" else {}
    heif.register_opener()
    Image.fromarray(rgb).save(p3, icc_profile=_srgb_profile_altered(P3_TO_XYZ), **options)
    Image.fromarray(rgb).save(
        srgb, icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(), **options
    )
    Image.fromarray(rgb).save(plain, **options)

    as_read = {name: video.read_image(path)[..., ::-1].astype(float) for name, path in [("p3", p3), ("plain", plain)]}
    expected = _srgb_encode(_srgb_decode(as_read["p3"]) @ (np.linalg.inv(SRGB_TO_XYZ) @ P3_TO_XYZ).T)
    for name, path in [("p3", p3), ("srgb", srgb), ("plain", plain)]:
        info = video.probe(path, 25)
        got = video.read_still(path, info)[..., ::-1].astype(float)
        want = expected if name == "p3" else as_read["plain"]
        assert np.abs(got - want).max() <= 2.5, (name, got[0, ::32], want[0, ::32])
    skin = video.read_still(p3, video.probe(p3, 25))[0, 0, ::-1].astype(int)
    assert skin[0] > as_read["p3"][0, 0, 0] + 10 and skin[2] < as_read["p3"][0, 0, 2]  # redder, not greyer
    assert icc._transform(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()) is None  # no pass


def test_a_photo_with_srgb_primaries_but_a_linear_curve_is_converted(tmp_path):
    """Its primaries alone would call it sRGB: mid-grey 128 in linear light is 188 in sRGB."""
    path = str(tmp_path / "linear.png")
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path, icc_profile=_srgb_profile_altered(linear=True))
    still = video.read_still(path, video.probe(path, 25))
    assert np.abs(still.astype(int) - round(float(_srgb_encode(np.array(128 / 255))))).max() <= 1


def test_a_photos_pixel_cap_is_in_a_rows_fingerprint_where_it_shapes_the_video(media_dir):
    """A photo over `limits.max_avatar_pixels` is shrunk to it: a rerun with another cap rendered a
    video of another size, yet kept the old one (the cap was not in the row's fingerprint). Where
    `render.max_side` bounds a photo tighter (the defaults), or for a clip (refused over the cap,
    never shrunk), the cap changes nothing, nor the key."""
    from helpers import compose_config
    from heygem_ray.prepare import photo_pixel_cap, row_fingerprint

    def key(avatar: str, *overrides: str) -> str:
        cfg = compose_config("manifest=m", "output=o", *overrides)
        return row_fingerprint("audio", "avatar", None, "o/r.mp4", cfg, photo_pixel_cap(str(media_dir / avatar), cfg))

    photo, clip = "still.png", "clip2.mp4"
    assert key(photo) == key(photo, "limits.max_avatar_pixels=4000000")  # 1920² = 3.7 MP: max_side binds first
    assert key(photo, "limits.max_avatar_pixels=2000000") != key(photo)
    assert key(photo, "render.max_side=0") != key(photo, "render.max_side=0", "limits.max_avatar_pixels=4000000")
    assert key(clip, "render.max_side=0") == key(clip, "render.max_side=0", "limits.max_avatar_pixels=4000000")
