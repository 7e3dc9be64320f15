"""The Wav2Lip path end to end on local Ray with recipe weights on CPU: renderer=wav2lip and
detector=s3fd slot in by config alone."""

import av
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import compose_config
from heygem_ray import campaign
from heygem_ray.plan import avatar_frame_indices
from heygem_ray.prepare import prepare_avatar


def test_wav2lip_with_s3fd_renders_and_leaves_the_rest_of_the_frame(ray_local, recipe_checkpoints, tmp_path):
    from heygem_ray import demo
    from heygem_ray.media import video

    audio = str(tmp_path / "short.wav")
    demo.write_wav(audio, demo.speech_like(0.8, seed=3))
    avatar = str(tmp_path / "clip.mp4")  # as long as the narration: S3FD takes ~0.5 s a frame on one core
    demo.write_avatar_clip(avatar, 0.8, seed=1)
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"id": ["w2l"], "audio": [audio], "avatar": [avatar]}), manifest)
    cfg = compose_config(
        f"manifest={manifest}",
        f"output={tmp_path / 'out'}",
        "render.segment_seconds=0.4",
        "render.progress=false",
        "renderer=wav2lip",
        f"renderer.checkpoint={recipe_checkpoints['wav2lip']}",
        "renderer.batch_size=8",
        "detector=s3fd",
        f"detector.checkpoint={recipe_checkpoints['s3fd']}",
        "detector.max_side=160",
    )
    summary = campaign.run(cfg)
    result = summary.rows[0]
    assert result.status == "ok", result.error
    assert result.segments == 2 and result.frames == 20

    track = prepare_avatar(avatar, None, cfg.detector, cfg.cache_uri, cfg.render.still_fps)  # cached track
    sources = [f for _, f in video.iter_frames(avatar, track.info)]
    with av.open(result.output) as c:
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    mapping = avatar_frame_indices(np.arange(len(frames)), track.frames, False)
    changed_inside = 0.0
    for i, out in enumerate(frames):
        src = sources[mapping[i]]
        x1, y1, x2, y2 = track.boxes[mapping[i]]
        outside = np.ones(out.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        y = lambda f: cv2.cvtColor(f, cv2.COLOR_BGR2YUV)[..., 0].astype(float)
        mse = np.mean((y(out)[outside] - y(src)[outside]) ** 2) if outside.any() else 0.0
        assert mse == 0 or 10 * np.log10(255**2 / mse) >= 35.0, f"frame {i}"
        lower = (slice(y1 + (y2 - y1) * 2 // 3, y2), slice(x1, x2))
        changed_inside += np.abs(out[lower].astype(float) - src[lower].astype(float)).mean()
    assert changed_inside / len(frames) > 5.0  # the generator really repainted the lower face


def test_face_tracks_are_cached_by_content(media_dir, tmp_path):
    """A second campaign on the same avatar, even copied elsewhere, runs no detection: the cached
    track is returned (proven by planting a marker box in the cache)."""
    import shutil

    cfg = compose_config("manifest=m", f"output={tmp_path}")
    first = prepare_avatar(str(media_dir / "clip2.mp4"), None, cfg.detector, cfg.cache_uri, 25.0)
    root = tmp_path / "_cache" / "avatars"
    cached = sorted(p.name.split("-")[0] for p in root.rglob("*.npz"))
    assert cached == ["chunk", "frames", "track"]  # 50 frames: one chunk
    (track,) = root.rglob(f"track-{first.frames}.npz")
    with open(track, "wb") as fh:
        np.save(fh, np.tile(np.array([1, 2, 33, 44], np.int32), (first.frames, 1)))
    copy = tmp_path / "renamed.mp4"
    shutil.copy(media_dir / "clip2.mp4", copy)
    again = prepare_avatar(str(copy), None, cfg.detector, cfg.cache_uri, 25.0)
    assert again.boxes[0].tolist() == [1, 2, 33, 44]
    other = prepare_avatar(
        str(copy),
        None,
        compose_config("manifest=m", f"output={tmp_path}", "detector.smooth=false").detector,
        cfg.cache_uri,
        25.0,
    )
    assert other.boxes[0].tolist() != [1, 2, 33, 44]  # a different detector config tracks anew


def test_a_wrong_checkpoint_fails_rows_with_what_was_expected(ray_local, media_dir, recipe_checkpoints, tmp_path):
    """The S3FD file given as the generator: every row that needs rendering fails with the loader's
    message (no hang waiting for an actor that can never start)."""
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(
        pa.table(
            {
                "id": ["a", "b"],
                "audio": [str(media_dir / "speech3.wav")] * 2,
                "avatar": [str(media_dir / "clip2.mp4"), str(media_dir / "still.png")],
            }
        ),
        manifest,
    )
    cfg = compose_config(
        f"manifest={manifest}",
        f"output={tmp_path / 'out'}",
        "render.progress=false",
        "renderer=wav2lip",
        f"renderer.checkpoint={recipe_checkpoints['s3fd']}",
    )
    summary = campaign.run(cfg)
    assert [r.status for r in summary.rows] == ["failed", "failed"]
    for row in summary.rows:
        assert row.error.startswith("renderer could not start: CheckpointError:"), row.error
        assert "S3FD" in row.error and "s3fd.pth" in row.error


def test_a_model_file_that_is_not_there_stops_the_campaign_before_it_starts(media_dir, tmp_path, monkeypatch):
    """Every row failed, one by one, "renderer could not start: ... not found" (in a Ray job, a
    relative path names a file in Ray's copy of its working directory, which ships no weights)."""
    from heygem_ray.errors import CheckpointError

    manifest = str(tmp_path / "m.parquet")
    pq.write_table(
        pa.table({"audio": [str(media_dir / "speech3.wav")], "avatar": [str(media_dir / "still.png")]}), manifest
    )
    base = [f"manifest={manifest}", f"output={tmp_path / 'out'}", "cluster=inline", "renderer=wav2lip"]
    with pytest.raises(CheckpointError, match="renderer.checkpoint .*nowhere.pth does not exist$"):
        campaign.run(compose_config(*base, f"renderer.checkpoint={tmp_path / 'nowhere.pth'}"))
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(CheckpointError, match="ships without model files"):
        campaign.run(compose_config(*base, "renderer.checkpoint=models/wav2lip.pth"))


def test_a_checkpoint_replaced_during_a_run_is_not_mixed_into_it(media_dir, recipe_checkpoints, tmp_path, monkeypatch):
    """Rows prepared after the generator's file was replaced named the new weights while actors
    started before rendered with the old ones (and an actor started after, with the new): a rerun
    then skipped videos made with other weights than their results said. The run keeps to the
    version it started with: a row renders with it and names it, or fails saying the file was
    replaced; the next run renders with the new file."""
    import json
    import shutil
    from dataclasses import replace

    import torch

    from heygem_ray import prepare, storage

    checkpoint = tmp_path / "wav2lip.pth"
    shutil.copy(recipe_checkpoints["wav2lip"], checkpoint)
    started_with = storage.current_version(str(checkpoint))
    from heygem_ray import demo

    audio = str(tmp_path / "short.wav")
    demo.write_wav(audio, demo.speech_like(0.6, seed=3))
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"id": ["r"], "audio": [audio], "avatar": [str(media_dir / "still.png")]}), manifest)
    cfg = compose_config(
        f"manifest={manifest}",
        f"output={tmp_path / 'out'}",
        "render.progress=false",
        "cluster=inline",
        "cluster.actors=1",
        "renderer=wav2lip",
        f"renderer.checkpoint={checkpoint}",
        "detector=box",
        "detector.box=[40,40,200,220]",
    )
    monkeypatch.setattr(prepare, "CHECKPOINT_VERSION_SECONDS", 0.0)
    real_prepare_row = campaign.prepare_row

    def replaced_then_prepared(row, cfg, decode=True):  # new weights land as the run gets going
        state = torch.load(recipe_checkpoints["wav2lip"], weights_only=True)
        torch.save({**state, "global_step": 1}, checkpoint)
        return real_prepare_row(row, cfg, decode)

    monkeypatch.setattr(campaign, "prepare_row", replaced_then_prepared)
    (row,) = campaign.run(cfg).rows
    monkeypatch.setattr(campaign, "prepare_row", real_prepare_row)
    assert storage.pinned_version(str(checkpoint)) is None  # the run's pins went with it
    pinned = replace(cfg, model_versions={str(checkpoint): started_with})
    if row.status == "ok":  # its actor loaded before the file was replaced
        marker = json.loads((tmp_path / "out" / "_markers" / "r.json").read_text())
        assert (
            marker["fingerprint"]
            == prepare.prepare_row(campaign.read_manifest(manifest, cfg.output)[0], pinned).fingerprint
        )
    else:
        assert "replaced since this campaign started" in (row.error or ""), row.error
    (again,) = campaign.run(cfg).rows
    assert again.status == "ok", again.error  # rendered anew with the new file, not skipped
