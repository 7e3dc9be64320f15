"""The actor renders I420 frames by their face regions alone: the same picture as rendering whole BGR
frames, every pixel away from the face exactly as decoded, for the classic renderer and Wav2Lip."""

from __future__ import annotations

import itertools
import os

import av
import cv2
import numpy as np
import pytest

from helpers import compose_config
from heygem_ray.media.audio import AudioWindow
from heygem_ray.media.yuv import bgr_to_i420, i420_planes
from heygem_ray.segment import RenderWorker, pipeline_chunks

# boxes as the face track gives them (inside the 256x300 picture): odd edges widen the region to even
BOXES = np.array([[61, 75, 195, 231], [60, 74, 196, 230], [151, 141, 256, 300]], np.int32)


@pytest.fixture(scope="module")
def decoded(media_dir) -> list[np.ndarray]:
    with av.open(str(media_dir / "clip2.mp4")) as container:
        return [f.to_ndarray(format="yuv420p") for _, f in zip(range(len(BOXES)), container.decode(video=0))]


def worker(*overrides: str) -> RenderWorker:
    return RenderWorker(compose_config("manifest=m", "output=o", "cluster.actor.threads=1", *overrides))


def loud_features(renderer, frames: int) -> np.ndarray:
    t = np.arange(16_000) / 16_000
    wav = (0.5 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    return renderer.features(AudioWindow(wav, 0, len(wav), 0.1), np.arange(frames) + 5, 25.0)


@pytest.mark.parametrize("renderer", ["classic", "wav2lip"])
def test_face_regions_render_like_whole_frames(renderer, decoded, recipe_checkpoints):
    extra = (
        []
        if renderer == "classic"
        else ["renderer=wav2lip", f"renderer.checkpoint={recipe_checkpoints['wav2lip']}", "renderer.device=cpu"]
    )
    w = worker(*extra)
    features = loud_features(w.renderer, len(BOXES))
    whole = w.renderer.render([cv2.cvtColor(f, cv2.COLOR_YUV2BGR_I420) for f in decoded], BOXES, features)
    regions = w._render_regions([f.copy() for f in decoded], BOXES, features)

    height, width = whole[0].shape[:2]
    for i, (frame, ours, source) in enumerate(zip(whole, regions, decoded)):
        x1, y1 = BOXES[i][0] & ~1, BOXES[i][1] & ~1
        x2, y2 = min(width, BOXES[i][2] + 1) & ~1, min(height, BOXES[i][3] + 1) & ~1
        inside = np.zeros((height, width), bool)
        inside[y1:y2, x1:x2] = True
        drawn = np.abs(frame.astype(int) - cv2.cvtColor(source, cv2.COLOR_YUV2BGR_I420)).max(axis=2) > 8
        assert drawn.sum() > 200, "the renderer drew nothing: the comparison below would prove nothing"
        assert inside[drawn].all()
        # what the whole-frame path would hand the encoder, pixel for pixel inside the region (a box
        # moved into its crop wrongly would shift the drawing), and the decoder's own pixels outside it
        reference = bgr_to_i420(frame)
        for got, want, src, mask in zip(
            i420_planes(ours), i420_planes(reference), i420_planes(source), (inside, inside[::2, ::2], inside[::2, ::2])
        ):
            np.testing.assert_array_equal(got[mask], want[mask])
            np.testing.assert_array_equal(got[~mask], src[~mask])


def test_a_frame_without_a_face_region_passes_through(decoded):
    w = worker()
    features = loud_features(w.renderer, 2)
    frames = [f.copy() for f in decoded[:2]]
    out = w._render_regions(frames, np.array([[300, 10, 400, 90], [61, 75, 195, 231]], np.int32), features)
    np.testing.assert_array_equal(out[0], decoded[0])  # box right of the picture: nothing to render
    assert not np.array_equal(out[1], decoded[1])
    assert (
        w._render_regions([decoded[0].copy()], np.array([[0, 0, 0, 0]], np.int32), features[:1])[0].tobytes()
        == decoded[0].tobytes()
    )


@pytest.mark.parametrize(
    "frames, batch, step", [(250, 16, 16), (250, 128, 63), (125, 128, 32), (3, 128, 1), (1, 16, 1)]
)
def test_pipeline_chunks_overlap_even_with_gpu_sized_batches(frames, batch, step):
    """Chunks never exceed the renderer's batch, and a segment has at least four of them (when it has
    that many frames), so decode, render and encode overlap even when a GPU batch covers the segment."""
    chunks = pipeline_chunks(frames, batch)
    assert chunks[0] == (0, step) and chunks[-1][1] == frames
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))  # consecutive, every frame once
    assert max(hi - lo for lo, hi in chunks) <= batch and len(chunks) >= min(4, frames)


def test_encoder_settings_x264_cannot_open_stop_the_actor_at_start():
    """x264 parses `level=99` but will not open with it: every segment would fail, so the actor
    refuses to start and says why."""
    assert worker().start_error is None
    refused = worker("encoder.codec=libx264", "encoder.x264_params='level=99'")
    assert refused.start_error is not None and "does not open with the encoder settings" in refused.start_error


def test_a_renderer_says_which_code_it_runs():
    """The driver refuses actors whose code is not its own (`ActorPool.answered`): each says its own."""
    from heygem_ray.release import code_version

    assert worker().ready().code == code_version()


def test_an_actor_started_after_its_checkpoint_was_replaced_refuses_to_render(tmp_path, recipe_checkpoints):
    """A renderer actor that Ray restarted mid-campaign loaded whatever file was at the checkpoint's
    URI then: rows named the weights the campaign started with, and one row's segments could mix
    two models. It loads the version the campaign pinned (`Config.model_versions`), or says why not."""
    import dataclasses
    import os
    import shutil
    import time

    from heygem_ray import storage

    path = tmp_path / "wav2lip.pth"
    shutil.copy(recipe_checkpoints["wav2lip"], path)
    uri = str(path)
    cfg = compose_config(
        "manifest=m", "output=o", "cluster.actor.threads=1", "renderer=wav2lip", f"renderer.checkpoint={uri}"
    )
    cfg = dataclasses.replace(cfg, model_versions={uri: storage.current_version(uri)})
    try:
        assert RenderWorker(cfg).start_error is None
        shutil.copy(recipe_checkpoints["s3fd"], path)  # another file entirely: still "replaced", not "wrong model"
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        refused = RenderWorker(cfg)
    finally:
        storage.configure(None, {})
    assert refused.start_error is not None and "replaced since this campaign started" in refused.start_error


def test_an_avatar_that_stops_decoding_is_the_rows_input_not_a_renderer_fault():
    """Failed at once naming the avatar (an InputError is never retried), not re-sent to every actor."""
    import av

    from heygem_ray.errors import InputError
    from heygem_ray.media.video import AvatarDecodeError
    from heygem_ray.segment import _avatar_decoding

    damaged = r"avatar s3://b/v.ts: cannot be decoded this far .*cut short or damaged"
    with pytest.raises(InputError, match=damaged), _avatar_decoding("s3://b/v.ts"):
        raise AvatarDecodeError("video ended before frame 203")
    for encoders in (EOFError("end of file"), av.error.InvalidDataError(1094995529, "bad data")):
        with pytest.raises(type(encoders)), _avatar_decoding("s3://b/v.ts"):  # not the avatar's
            raise encoders


def test_an_input_replaced_after_its_row_was_prepared_fails_the_row_not_mixed_in(tmp_path, media_dir):
    """A presenter (or narration) another pipeline rewrites under the same name while a campaign
    runs: the segments decoded the new clip under the face track of the old one (the mouth pasted
    where no face is), and the stitch muxed the new narration under lips that speak the old, each
    reported ok. Both are refused, naming the input."""
    import shutil

    from heygem_ray.config import EncoderConfig
    from heygem_ray.errors import InputError
    from heygem_ray.layout import CampaignLayout
    from heygem_ray.manifest import Row
    from heygem_ray.prepare import prepare_audio, prepare_audio_track, prepare_avatar
    from heygem_ray.rows import RowState

    cfg = compose_config("manifest=m", f"output={tmp_path}/out", "cluster.actor.threads=1", "encoder.codec=libx264")
    avatar, narration = tmp_path / "presenter.png", tmp_path / "narration.wav"
    shutil.copy(media_dir / "still.png", avatar)
    shutil.copy(media_dir / "speech3.wav", narration)
    audio = prepare_audio(str(narration), cfg.cache_uri)
    track = prepare_avatar(str(avatar), None, cfg.detector, cfg.cache_uri, cfg.render.still_fps)
    state = RowState.prepared(Row("r", audio.uri, track.uri, f"{tmp_path}/out/r.mp4"), audio, "fp")
    state.plan(track, 1.0)
    layout, renderer = CampaignLayout(cfg.output), RenderWorker(cfg)
    renderer.render_segment(state.segment_job(0, layout, "libx264"))  # the bytes it was prepared from
    image = cv2.imread(str(avatar))
    cv2.imwrite(str(avatar), cv2.flip(image, 1))  # replaced: another picture, same name
    with pytest.raises(InputError, match=r"presenter.png: was replaced while the campaign ran"):
        renderer.render_segment(state.segment_job(1, layout, "libx264"))
    with open(narration, "r+b") as wav:
        wav.seek(-2000, os.SEEK_END)
        wav.write(b"\x11" * 2000)  # its last samples changed
    with pytest.raises(InputError, match=r"narration.wav: was replaced while the campaign ran"):
        prepare_audio_track(audio, cfg.cache_uri, EncoderConfig())


def test_frames_of_a_presenter_replaced_between_rows_are_not_the_same_frames_to_the_renderer(tmp_path, media_dir):
    """A renderer reuses work on frames of equal source ids (Wav2Lip's face encoder on a still):
    the ids were the avatar's URI, so a row prepared after the presenter was replaced at the same
    name, on an actor that rendered the old one, got the old face's encoding under the new frame.
    The ids are now the avatar's content."""
    import shutil

    from heygem_ray.layout import CampaignLayout
    from heygem_ray.manifest import Row
    from heygem_ray.prepare import prepare_audio, prepare_avatar
    from heygem_ray.rows import RowState

    cfg = compose_config("manifest=m", f"output={tmp_path}/out", "cluster.actor.threads=1", "encoder.codec=libx264")
    avatar = tmp_path / "presenter.png"
    shutil.copy(media_dir / "still.png", avatar)
    audio = prepare_audio(str(media_dir / "speech3.wav"), cfg.cache_uri)
    layout, worker = CampaignLayout(cfg.output), RenderWorker(cfg)
    seen: list[set] = []
    render = worker.renderer.render

    def recording(frames, boxes, features, sources=None):
        seen[-1].update(source[:2] for source in sources or [])
        return render(frames, boxes, features, sources)

    worker.renderer.render = recording
    for row in ("before", "after"):
        if row == "after":
            cv2.imwrite(str(avatar), cv2.flip(cv2.imread(str(avatar)), 1))  # another picture, same name
        track = prepare_avatar(str(avatar), None, cfg.detector, cfg.cache_uri, cfg.render.still_fps)
        state = RowState.prepared(Row(row, audio.uri, track.uri, f"{tmp_path}/out/{row}.mp4"), audio, "fp")
        state.plan(track, 1.0)
        seen.append(set())
        worker.render_segment(state.segment_job(0, layout, "libx264"))
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_the_ticks_a_held_picture_shows_on_are_one_source_to_the_renderer(tmp_path):
    """An animated image plays each picture for its delay (`prepare._held`: a 2 s pose is 50 ticks
    at 25 fps): its ticks were 50 source ids, so Wav2Lip's face encoder ran on the one picture 50
    times. Ticks of one picture share an id; other pictures keep theirs."""
    from PIL import Image

    from heygem_ray import demo
    from heygem_ray.layout import CampaignLayout
    from heygem_ray.manifest import Row
    from heygem_ray.prepare import prepare_audio, prepare_avatar
    from heygem_ray.rows import RowState

    avatar, narration = tmp_path / "blink.gif", str(tmp_path / "n.wav")
    poses = [Image.fromarray(np.full((96, 128, 3), v, np.uint8)) for v in (40, 200, 90)]
    poses[0].save(avatar, save_all=True, append_images=poses[1:], duration=[600, 150, 250], loop=0)
    demo.write_wav(narration, demo.speech_like(1.0, seed=2))
    cfg = compose_config(
        "manifest=m", f"output={tmp_path}/out", "cluster.actor.threads=1", "encoder.codec=libx264",
        "detector=box", "detector.box=[0,0,8,8]",
    )  # fmt: skip
    audio = prepare_audio(narration, cfg.cache_uri)
    track = prepare_avatar(str(avatar), None, cfg.detector, cfg.cache_uri, cfg.render.still_fps)
    assert track.info.held
    state = RowState.prepared(Row("r", audio.uri, track.uri, f"{tmp_path}/out/r.mp4"), audio, "fp")
    state.plan(track, 10.0)
    worker = RenderWorker(cfg)
    seen: list = []
    render = worker.renderer.render

    def recording(frames, boxes, features, sources=None):
        seen.extend(source[:2] for source in sources or [])
        return render(frames, boxes, features, sources)

    worker.renderer.render = recording
    job = state.segment_job(0, CampaignLayout(cfg.output), "libx264")
    worker.render_segment(job)
    assert len(seen) == job.frames == 25  # one second, every frame rendered
    # 0.6 s, 0.15 s, 0.25 s: 15 ticks, then 4 (or 3), then the rest
    assert seen[:15] == [seen[0]] * 15 and seen[15] != seen[0] and len(set(seen)) == 3, seen


def test_a_presenter_replaced_while_it_is_tracked_caches_nothing_under_the_old_bytes(tmp_path, media_dir, monkeypatch):
    """The presenter is rewritten after its tracking task took its fingerprint and before it read
    the file: the new clip's frames and face boxes were cached under the old bytes' name, for every
    later campaign with the old bytes to reuse. The task fails instead, naming the input."""
    import shutil

    from heygem_ray import prepare
    from heygem_ray.errors import InputError

    cfg = compose_config("manifest=m", f"output={tmp_path}/out")
    avatar = tmp_path / "presenter.mp4"
    shutil.copy(media_dir / "clip2.mp4", avatar)
    old = prepare.content_fingerprint(str(avatar), cfg.cache_uri, "avatar")
    shutil.copy(media_dir / "clip6.mp4", avatar)  # another clip, same name
    real, calls = prepare.content_fingerprint, []

    def taken_before_the_replacement(uri, cache, what="input", info=None):
        calls.append(uri)
        return old if len(calls) == 1 else real(uri, cache, what, info)

    monkeypatch.setattr(prepare, "content_fingerprint", taken_before_the_replacement)
    with pytest.raises(InputError, match=r"presenter.mp4: was replaced while the campaign ran"):
        prepare.prepare_avatar(str(avatar), None, cfg.detector, cfg.cache_uri, cfg.render.still_fps)
    assert not os.path.exists(os.path.join(cfg.cache_uri, "avatars", old))


def test_a_segment_an_earlier_run_left_is_reused_unless_forced(tmp_path, media_dir):
    """A rerun keeps the segments an earlier, stopped run rendered; `force=true` renders them again
    (a row whose segments cannot be joined is mended that way, as the ops guide says)."""
    from heygem_ray.layout import CampaignLayout
    from heygem_ray.manifest import Row
    from heygem_ray.prepare import prepare_audio, prepare_avatar
    from heygem_ray.rows import RowState

    cfg = compose_config("manifest=m", f"output={tmp_path}/out", "cluster.actor.threads=1", "encoder.codec=libx264")
    audio = prepare_audio(str(media_dir / "speech3.wav"), cfg.cache_uri)
    track = prepare_avatar(str(media_dir / "still.png"), None, cfg.detector, cfg.cache_uri, cfg.render.still_fps)
    state = RowState.prepared(Row("r", audio.uri, track.uri, f"{tmp_path}/out/r.mp4"), audio, "fp")
    state.plan(track, 1.0)
    layout, renderer = CampaignLayout(cfg.output), RenderWorker(cfg)
    first = renderer.render_segment(state.segment_job(0, layout, "libx264"))
    again = renderer.render_segment(state.segment_job(0, layout, "libx264"))
    forced = renderer.render_segment(state.segment_job(0, layout, "libx264", reuse=False))
    assert (first.reused, again.reused, forced.reused) == (False, True, False)
