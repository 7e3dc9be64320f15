"""The weights-free lip-sync score (heygem_ray.qa): measured on real rendered segments, it is high
and at offset 0 for an aligned output, finds an output shifted by 3 frames, and drops when a
segment is joined in the wrong place."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from helpers import compose_config, render_cli
from heygem_ray import demo, qa, storage
from heygem_ray.layout import CampaignLayout
from heygem_ray.manifest import Row
from heygem_ray.prepare import prepare_audio, prepare_avatar
from heygem_ray.rows import RowState
from heygem_ray.segment import RenderWorker
from heygem_ray.stitch import sync_score


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, media_dir):
    """One 8 s row cut into four equal segments (`render_row`)."""
    root = tmp_path_factory.mktemp("qa")
    job, audio = render_row(root, media_dir, seconds=8.0, seed=11)
    assert len(job.spans) == 4 and len({b - a for a, b in job.spans}) == 1
    return job, audio


def render_row(root, media_dir, seconds: float, seed: int, *overrides: str):
    """A row of `seconds` of speech over the still, cut into 2 s segments and rendered on a
    renderer in this process (classic, as the default campaign renders): (its stitch job, not yet
    stitched, and its audio)."""
    audio_path = str(root / "speech.wav")
    demo.write_wav(audio_path, demo.speech_like(seconds, seed=seed))
    cfg = compose_config(
        "manifest=m",
        f"output={root}/out",
        "render.segment_seconds=2",
        "cluster.actor.threads=1",
        "encoder.codec=libx264",
        *overrides,
    )
    audio = prepare_audio(audio_path, cfg.cache_uri)
    track = prepare_avatar(str(media_dir / "still.png"), None, cfg.detector, cfg.cache_uri, cfg.render.still_fps)
    state = RowState.prepared(Row("r", audio_path, track.uri, f"{root}/out/r.mp4"), audio, "fp")
    state.plan(track, cfg.render.segment_seconds)
    layout = CampaignLayout(cfg.output)
    worker = RenderWorker(cfg)
    assert worker.start_error is None, worker.start_error
    for i in range(len(state.spans)):
        worker.render_segment(state.segment_job(i, layout, "libx264"))
    return state.stitch_job(layout, "libx264", cfg.qa, None), audio


@pytest.fixture
def rendered_row(rendered):
    return rendered[0]


def test_an_aligned_output_scores_high_at_offset_0(rendered_row):
    sync = sync_score(rendered_row)
    assert sync.method == "motion-energy" and sync.frames == rendered_row.frames
    assert sync.score is not None and sync.score >= 0.6, sync
    assert sync.offset_frames == 0, sync


def test_an_output_shifted_by_3_frames_is_found(rendered_row):
    """The same video against audio that runs 3 frames ahead of it (each frame meets the speech of
    3 frames later): the mouth moves 3 frames after the speech, the best offset says +3, and at
    offset 0 the mouth no longer follows the speech as well."""
    aligned = sync_score(rendered_row)
    late = replace(rendered_row, spans=[(a + 3, b + 3) for a, b in rendered_row.spans])
    shifted = sync_score(late)
    assert shifted.offset_frames == 3, shifted
    assert qa.flags(shifted.score, shifted.offset_frames, 0.3) == ["mouth and speech offset by +3 frame(s)"]
    at_zero = qa.score(_motion(rendered_row), _loudness(late), max_lag=0)
    assert at_zero.score is not None and aligned.score is not None and at_zero.score < aligned.score - 0.2


def test_a_segment_joined_twice_lowers_the_score(rendered_row):
    """Segment 0 joined where segment 1 belongs (a doubled segment): its mouth meets other speech."""
    uris = list(rendered_row.segment_uris)
    doubled = replace(rendered_row, segment_uris=[uris[0], uris[0], *uris[2:]])
    swapped = replace(rendered_row, segment_uris=[uris[1], uris[0], *uris[2:]])
    aligned = sync_score(rendered_row).score
    assert aligned is not None
    for broken in (doubled, swapped):
        score = sync_score(broken).score
        assert score is not None and score < aligned - 0.15, (score, aligned)


def test_no_face_or_no_speech_is_not_scored():
    assert qa.score(np.full(50, np.nan), np.linspace(-40, -10, 50)).score is None
    assert qa.score(np.linspace(0, 5, 50), np.full(50, -60.0)).score is None
    assert qa.flags(None, None, 0.3) == ["not scored (no face, or no speech)"]


def _motion(job) -> np.ndarray:
    return np.concatenate(
        [qa.read_motion(qa.motion_uri(u), b - a) for u, (a, b) in zip(job.segment_uris, job.spans, strict=True)]
    )


def _loudness(job) -> np.ndarray:
    from heygem_ray.media.audio import SAMPLE_RATE, speech_loudness
    from heygem_ray.plan import frame_center_samples
    from heygem_ray.prepare import read_pcm

    a, b = job.spans[0][0], job.spans[-1][1]
    centers = frame_center_samples(np.arange(a, b), job.fps, SAMPLE_RATE)
    return qa.loudness_db(speech_loudness(read_pcm(job.pcm_uri, 0, job.audio_samples), centers))


def test_below_fail_below_the_row_fails_and_nothing_is_published(rendered, tmp_path):
    """qa.fail_below turns a low score into a failure before the output is published."""
    import os

    from heygem_ray.config import EncoderConfig, QAConfig
    from heygem_ray.prepare import prepare_audio_track
    from heygem_ray.stitch import QAError, stitch_row

    rendered_row, audio = rendered
    track = prepare_audio_track(audio, str(tmp_path / "cache"), EncoderConfig())
    strict = replace(rendered_row, output=str(tmp_path / "strict.mp4"), qa=QAConfig(fail_below=0.999))
    with pytest.raises(QAError, match=r"below qa.fail_below=0.999 .* not published"):
        stitch_row(strict, track)
    assert not os.path.exists(tmp_path / "strict.mp4") and not os.path.exists(rendered_row.marker_uri)


def test_a_row_published_before_fail_below_was_set_is_flagged_when_skipped():
    """A rerun that sets `qa.fail_below` skips the rows an earlier run published: a video already
    there is not failed (nor removed), but its flag says it scores below the new floor."""
    from heygem_ray.config import QAConfig
    from heygem_ray.rows import published_flag

    strict = QAConfig(fail_below=0.2, min_sync=0.05)
    assert "below qa.fail_below (0.2), published by an earlier run" in published_flag(0.1, 0, None, 0, strict)
    assert published_flag(0.25, 0, None, 0, strict) == ""
    assert "below qa.fail_below" in published_flag(None, None, None, 0, strict)  # unscored: failed by a stitch too
    assert published_flag(0.1, 0, None, 0, QAConfig(min_sync=0.05)) == ""  # no floor set


def test_the_marker_of_the_video_being_replaced_goes_before_the_new_video_is_published(rendered, tmp_path, monkeypatch):
    """Published, then stopped before its own marker: the new video must not stay under the marker
    of the one it replaced (a later run with those settings would skip the row with this video)."""
    import os

    from heygem_ray import storage
    from heygem_ray.config import EncoderConfig
    from heygem_ray.prepare import prepare_audio_track
    from heygem_ray.stitch import stitch_row

    rendered_row, audio = rendered
    track = prepare_audio_track(audio, str(tmp_path / "cache"), EncoderConfig())
    row = replace(rendered_row, output=str(tmp_path / "new.mp4"), marker_uri=str(tmp_path / "old-marker.json"))
    storage.write_bytes(row.marker_uri, b'{"fingerprint": "of the earlier video"}')

    def stopped(local: str, uri: str, move: bool = False) -> None:
        raise OSError("the run stopped here")

    monkeypatch.setattr(storage, "publish_file", stopped)
    with pytest.raises(OSError, match="stopped here"):
        stitch_row(row, track)
    assert not os.path.exists(row.marker_uri)


def test_a_stitch_stopped_after_publishing_leaves_its_marker_for_the_rerun(rendered, tmp_path, monkeypatch):
    """The thumbnail was made and written between the video and its marker: a stop there left a
    published video without a marker, stitched again by the next run. The marker follows the video."""
    import os

    from heygem_ray import stitch, storage
    from heygem_ray.config import EncoderConfig
    from heygem_ray.prepare import prepare_audio_track

    rendered_row, audio = rendered
    track = prepare_audio_track(audio, str(tmp_path / "cache"), EncoderConfig())
    row = replace(rendered_row, output=str(tmp_path / "new.mp4"), marker_uri=str(tmp_path / "marker.json"))

    def stopped(*args: object) -> None:
        raise KeyboardInterrupt  # the run stopped while the thumbnail was being made

    monkeypatch.setattr(stitch, "_thumbnail", stopped)
    with pytest.raises(KeyboardInterrupt):
        stitch.stitch_row(row, track)
    assert os.path.exists(row.output) and storage.exists(row.marker_uri)


# ------------------------------------------------------------------------- the lip-sync expert
@pytest.fixture(scope="module")
def syncnet_checkpoint(tmp_path_factory):
    """Recipe weights in the layout of the official `lipsync_expert.pth` (a training checkpoint)."""
    from pathlib import Path

    import torch

    from recipe_weights import read_keys, recipe_state_dict

    keys = read_keys(Path(__file__).parent / "data" / "syncnet_state_dict.tsv")
    path = tmp_path_factory.mktemp("syncnet") / "lipsync_expert.pth"
    torch.save({"state_dict": recipe_state_dict(keys, seed=3), "global_step": 0}, path)
    return str(path)


def test_the_expert_loads_strictly_and_embeds_to_unit_length(syncnet_checkpoint, tmp_path):
    import torch

    from heygem_ray.models.checkpoints import CheckpointError, load_model
    from heygem_ray.models.syncnet import SyncNet, embed, face_windows

    model = load_model(SyncNet, syncnet_checkpoint, "SyncNet")
    halves = [np.full((48, 96, 3), 10 * i, np.uint8) for i in range(7)] + [None] + [np.zeros((48, 96, 3), np.uint8)] * 5
    windows, starts = face_windows(halves)
    assert windows.shape == (3 + 1, 15, 48, 96) and list(starts) == [0, 1, 2, 8]  # none across the faceless frame
    faces = embed(model.embed_faces, windows, torch.device("cpu"))
    audio = embed(
        model.embed_audio,
        np.random.default_rng(0).standard_normal((4, 1, 80, 16)).astype(np.float32),
        torch.device("cpu"),
    )
    assert faces.shape == audio.shape == (4, 512)
    assert np.allclose(np.linalg.norm(faces, axis=1), 1, atol=1e-5) and np.allclose(
        np.linalg.norm(audio, axis=1), 1, atol=1e-5
    )

    broken = torch.load(syncnet_checkpoint, weights_only=True)
    broken["state_dict"].pop("audio_encoder.13.conv_block.0.weight")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="audio_encoder.13"):
        load_model(SyncNet, str(tmp_path / "broken.pth"), "SyncNet")


def test_the_expert_scores_a_rendered_row(tmp_path, media_dir, syncnet_checkpoint):
    """With qa.syncnet the actor embeds every five-frame window it renders (a sidecar beside each
    segment) and the stitch gives LSE-C as the score, LSE-D as the distance and the best offset.
    Segments an earlier run made without the expert are made again, not reused without them."""
    from heygem_ray.config import QAConfig

    render_row(tmp_path, media_dir, 4.0, 5)
    job, _ = render_row(tmp_path, media_dir, 4.0, 5, f"qa.syncnet={syncnet_checkpoint}")
    faces, starts = qa.read_face_embeddings(
        qa.syncnet_uri(job.segment_uris[0], storage.fingerprint(syncnet_checkpoint))
    )
    first = job.spans[0]
    assert faces.shape == (first[1] - first[0] - 4, 512) and starts[0] == 0
    sync = sync_score(job)
    assert sync.method == "syncnet" and sync.score is not None and sync.score > 0 and sync.distance is not None
    assert sync.offset_frames is not None and abs(sync.offset_frames) <= qa.SYNCNET_OFFSETS
    assert sync.frames == sum(b - a - 4 for a, b in job.spans)
    # without the expert the same row scores by motion-energy
    assert sync_score(replace(job, qa=QAConfig())).method == "motion-energy"


def test_the_experts_windows_span_a_fifth_of_a_second_at_any_frame_rate(tmp_path, media_dir, syncnet_checkpoint):
    """The expert was trained on five consecutive frames of 25 fps video (0.2 s, as its mel window):
    five consecutive frames of a 50 fps row spanned 0.1 s, which it scores as out of sync. Its
    windows take the frames nearest the expert's times, and its offsets span ±0.6 s at any rate."""
    from heygem_ray.models.syncnet import face_windows, window_offsets

    assert window_offsets(25) == (0, 1, 2, 3, 4) and window_offsets(50) == (0, 2, 4, 6, 8)
    assert window_offsets(30) == (0, 1, 2, 4, 5) and window_offsets(60) == (0, 2, 5, 7, 10)
    halves = [np.full((48, 96, 3), i, np.uint8) for i in range(12)]
    windows, starts = face_windows(halves, 50.0)
    assert list(starts) == [0, 1, 2, 3] and list(np.rint(windows[1, ::3, 0, 0] * 255)) == [1, 3, 5, 7, 9]
    assert qa.syncnet_offsets(25) == 15 and qa.syncnet_offsets(50) == 30 and qa.syncnet_offsets(24) == 14

    job, _ = render_row(tmp_path, media_dir, 2.0, 5, "render.still_fps=50", f"qa.syncnet={syncnet_checkpoint}")
    assert job.fps == 50 and len(job.spans) == 1
    faces, starts = qa.read_face_embeddings(
        qa.syncnet_uri(job.segment_uris[0], storage.fingerprint(syncnet_checkpoint))
    )
    assert len(faces) == job.frames - 8 and starts[-1] == job.frames - 9
    sync = sync_score(job)
    assert sync.frames == job.frames - 8 and sync.offset_frames is not None and abs(sync.offset_frames) <= 30


@pytest.mark.slow  # two campaigns with the expert (~25 s on 2 cores); qa is opt-in
def test_an_expert_replaced_at_its_uri_makes_embeddings_of_its_own(
    tmp_path, media_dir, syncnet_checkpoint, monkeypatch
):
    """The sidecars of face embeddings were named alike whatever weights made them: a rerun after
    the expert's file was replaced reused the old expert's embeddings (and its segments) and scored
    them against the new expert's audio embeddings."""
    import shutil
    from pathlib import Path

    import torch

    from recipe_weights import read_keys, recipe_state_dict

    expert = str(tmp_path / "expert.pth")
    shutil.copy(syncnet_checkpoint, expert)

    def embeddings() -> np.ndarray:
        job, _ = render_row(tmp_path, media_dir, 4.0, 5, f"qa.syncnet={expert}")
        return qa.read_face_embeddings(qa.syncnet_uri(job.segment_uris[0], storage.fingerprint(expert)))[0]

    before = embeddings()
    keys = read_keys(Path(__file__).parent / "data" / "syncnet_state_dict.tsv")
    torch.save({"state_dict": recipe_state_dict(keys, seed=4), "global_step": 1}, expert)
    after = embeddings()
    assert len(before) and after.shape == before.shape and not np.allclose(after, before)


@pytest.mark.integration
def test_a_campaign_stores_the_experts_figures(tmp_path, media_dir, syncnet_checkpoint):
    row = _render_one_row(
        tmp_path,
        str(media_dir / "speech3.wav"),
        str(media_dir / "still.png"),
        f"qa.syncnet={syncnet_checkpoint}",
        "qa.min_confidence=100",  # above any confidence: the row must be flagged on the expert's scale
    )
    assert row["sync_method"] == "syncnet" and row["sync_score"] is not None and row["sync_distance"] is not None
    assert "below qa.min_confidence=100 (syncnet)" in row["qa_flag"], row


@pytest.mark.integration
def test_a_face_lost_mid_clip_passes_through_and_is_counted(tmp_path, media_dir):
    """The presenter leaves the frame for a second: those frames come out as they went in, the
    row is ok, and its QA says how many frames had no face."""

    import av
    import cv2

    portrait = demo.Stage.of_height(480).frame()
    h, w = portrait.shape[:2]
    empty = np.full_like(portrait, 90)  # the same room, nobody in it
    cv2.rectangle(empty, (0, h * 2 // 3), (w, h), (60, 70, 80), -1)
    frames = [portrait] * 25 + [empty] * 25 + [portrait] * 25
    clip = str(tmp_path / "leaves.mp4")
    with av.open(clip, "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"crf": "12"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        container.mux(stream.encode())
    audio = str(tmp_path / "speech.wav")
    demo.write_wav(audio, demo.speech_like(3.0, seed=4))
    row = _render_one_row(tmp_path, audio, clip)
    assert row["status"] == "ok" and row["frames_without_face"] == 25, row
    assert "25 frame(s) without a face, passed through" in row["qa_flag"]
    with av.open(row["output"]) as container:
        rendered = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    with av.open(clip) as container:
        source = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    for i in range(27, 48):  # the frames with nobody in them are the input's, up to the encoder's loss
        mse = np.mean((rendered[i].astype(float) - source[i].astype(float)) ** 2)
        assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 38, i


def _render_one_row(tmp_path, audio: str, avatar: str, *overrides: str) -> dict:
    """`heygem-ray render` of a one-row manifest, in one process (cluster=inline); its result row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from heygem_ray.results import read_results

    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"audio": [audio], "avatar": [avatar]}), manifest)
    out = tmp_path / "out"
    run = render_cli(f"manifest={manifest}", f"output={out}", "render.progress=false", "cluster=inline", *overrides)
    assert run.returncode == 0, run.stderr[-2000:]
    (row,) = read_results(str(out / "_results.parquet"))
    return row


def test_a_stitch_run_again_after_it_published_returns_what_it_published(tmp_path, media_dir):
    """Ray runs a stitch task again when its worker is lost; one lost after the marker was written
    finds its segments removed: it answers with what was published instead of failing the row.
    Without the video there is nothing to answer with: it fails."""
    import os

    from heygem_ray import storage
    from heygem_ray.config import EncoderConfig
    from heygem_ray.prepare import prepare_audio_track
    from heygem_ray.stitch import stitch_row

    job, audio = render_row(tmp_path, media_dir, seconds=2.0, seed=5)
    track = prepare_audio_track(audio, str(tmp_path / "cache"), EncoderConfig())
    first = stitch_row(job, track)
    assert not storage.exists(job.segment_uris[0])
    again = stitch_row(job, track)
    assert again.marker == first.marker and again.thumbnail == first.thumbnail
    os.remove(job.output)
    with pytest.raises(FileNotFoundError):
        stitch_row(job, track)


def test_a_row_far_below_the_campaigns_median_is_flagged_in_the_report_and_feed(tmp_path):
    """The flag only the whole campaign gives (a score far below its median) was in the results
    table alone: the report's card, its list of rows to look at and the feed's count left it out."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from heygem_ray import campaign

    demo.write_avatar_image(str(tmp_path / "still.png"))
    demo.write_avatar_clip(str(tmp_path / "clip.mp4"), 3.0, seed=2)
    ids = [f"speech{i}" for i in range(5)] + ["noise"]
    for i in range(5):
        demo.write_wav(str(tmp_path / f"speech{i}.wav"), demo.speech_like(3.0, seed=i))
    noise = np.random.default_rng(0).standard_normal(48000).astype(np.float32) * 0.3
    demo.write_wav(str(tmp_path / "noise.wav"), noise)  # a hiss over a clip: its mouth follows no speech
    avatars = [str(tmp_path / "still.png")] * 5 + [str(tmp_path / "clip.mp4")]
    table = pa.table({"id": ids, "audio": [str(tmp_path / f"{i}.wav") for i in ids], "avatar": avatars})
    pq.write_table(table, tmp_path / "m.parquet")
    cfg = compose_config(
        f"manifest={tmp_path / 'm.parquet'}", f"output={tmp_path / 'out'}", "cluster=inline", "render.progress=false"
    )
    rows = {r.id: r for r in campaign.run(cfg).rows}
    assert "far below the campaign's median" in rows["noise"].qa_flag, rows["noise"]
    assert not any(rows[i].qa_flag for i in ids[:5])
    report = Path(cfg.layout.report).read_text(encoding="utf-8")
    card = report.split('<article class="card ok flagged" id="row-noise"', 1)[1].split("</article>", 1)[0]
    assert "far below the campaign" in card
    assert 'class="flagged-list">Flagged for a look: <a href="#row-noise">noise</a></p>' in report
    assert "1 flagged for a look" in report
    assert json.loads(Path(cfg.layout.progress).read_text(encoding="utf-8"))["qa"]["flagged"] == 1
