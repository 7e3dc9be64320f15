"""Typed configuration. The dataclasses are the schema; conf/*.yaml pick values and document them.

Hydra composes the YAML on the driver; `to_plain()` turns the result into these dataclasses
(resolved, no Hydra state) before anything crosses to a Ray worker. Hydra and OmegaConf are
imported only by the functions that use them: every Ray worker imports this module to unpickle its
config, and importing them took ~0.17 s of each worker's start.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from heygem_ray.layout import CampaignLayout

if TYPE_CHECKING:
    from omegaconf import DictConfig

#: a value the composed config must set: OmegaConf's marker (`omegaconf.MISSING`), spelled out so
#: that workers need not import OmegaConf (tests/test_config.py checks that they agree)
MISSING = "???"


@dataclass
class ClassicRendererConfig:
    """Weights-free renderer: reshapes the lower face from the audio's speech-band loudness."""

    name: str = "classic"
    #: frames per render call
    batch_size: int = 16
    #: jaw drop at full loudness, as a fraction of the face box height
    jaw_drop: float = 0.06
    #: mouth opening at full loudness, as a fraction of the face box height
    mouth_open: float = 0.07
    #: how dark the mouth gap gets at full opening (0 = unchanged, 1 = black)
    mouth_darkness: float = 0.75

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"renderer.batch_size must be 1 or more, got {self.batch_size}")
        for key in ("jaw_drop", "mouth_open", "mouth_darkness"):  # nan passes every comparison but this
            value = getattr(self, key)
            if not 0 <= value <= 1:
                raise ValueError(f"renderer.{key} must be within 0 and 1, got {value}")


#: the Wav2Lip renderer's choices (heygem_ray.render.wav2lip checks them too, for direct callers)
PRECISIONS = ("auto", "fp32", "int8", "fp16", "bf16")
BLENDS = ("feather", "hard")
IMAGE_OPS = ("auto", "cpu", "device")
#: detector strides: the divisors of detect.track.CHUNK_FRAMES up to 8 (a chunk samples the frames
#: the whole clip would; larger strides make the tracker look further ahead than its margin)
STRIDES = (1, 2, 3, 4, 5, 6, 8)
#: Face detectors, the one registry: name -> the detector class, as "module:Class", that builds
#: itself from a DetectorConfig (`from_config`, called by heygem_ray.detect.build_detector) and
#: follows `detect.base.FaceDetector` (`detect`, `reset`); `box` has none (the given box is the
#: track). A new detector is a class and an entry here.
DETECTORS: dict[str, str | None] = {
    "haar": "heygem_ray.detect.haar:HaarDetector",
    "box": None,
    "s3fd": "heygem_ray.detect.s3fd:S3FDDetector",
}
#: What runs a campaign's stages, the one registry: name -> a function (config, startup) -> a
#: context manager of the ready executor (heygem_ray.executors.open_executor calls it).
EXECUTORS: dict[str, str] = {
    "ray": "heygem_ray.executors.ray_cluster:open_ray",
    "inline": "heygem_ray.executors.inline:open_inline",
}
#: video encoders segments are written with (they must join without re-encoding: H.264 only)
VIDEO_CODECS = ("auto", "libx264", "h264_nvenc")
#: the encoders' pixel formats a player takes (yuv420p everywhere; 4:2:2 and 4:4:4 in few)
PIX_FMTS = ("yuv420p", "yuv422p", "yuv444p")
#: the narration's codec in the MP4: AAC, what every player takes
AUDIO_CODECS = ("aac",)
#: the sample rates FFmpeg's AAC encoder takes
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
#: x264's presets, fastest first
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
#: x264's own option syntax; which keys it knows, x264 says when an actor opens its encoder
#: (media.video.encoder_problem)
X264_PARAMS_PATTERN = re.compile(r"[a-z0-9_-]+=[^:=]+(:[a-z0-9_-]+=[^:=]+)*")
#: where a model runs: auto (CUDA only when Ray gave the process a GPU), cpu, cuda or cuda:N
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def registered(path: str) -> Any:
    """What a registry entry ("module:attribute") names, its module imported only now: only the
    chosen renderer, detector or executor is imported, and this module stays below them all."""
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


#: what `ray.init(address=...)` takes: auto, host:port (the GCS), or a Ray Client's ray://host:port
_RAY_ADDRESS = re.compile(r"auto|local|(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):\d{1,5}")


def check_choices(section: str, config: object, choices: dict[str, Collection[str]]) -> None:
    """Raise ValueError naming the key, the value and the choices for the first field of `config`
    whose value is not among its choices: checked when the config is composed on the driver, so a
    typo exits 2 at once instead of failing every row on the workers."""
    for key, allowed in choices.items():
        value = getattr(config, key)
        if value not in allowed:
            raise ValueError(f"{section}.{key}={value} is not one of {', '.join(allowed)}")


def check_device(section: str, value: str) -> None:
    if not DEVICE_PATTERN.fullmatch(value):
        raise ValueError(f"{section}.device={value} is not one of auto, cpu, cuda, cuda:N")


@dataclass
class Wav2LipRendererConfig:
    """The official Wav2Lip generator, loaded from any fsspec URI. The `auto` defaults pick what
    is fastest on the device each actor gets (figures in docs/ops.md, "Speed")."""

    name: str = "wav2lip"
    checkpoint: str = MISSING
    #: frames per generator call; 0 = auto (128 on CUDA; 8 on CPU, where larger batches spill the
    #: caches and run no faster)
    batch_size: int = 0
    #: auto | fp32 | int8 | fp16 | bf16. auto = bf16 on CUDA and on CPUs with AMX, int8 on other x86
    #: CPUs with AVX2 (decoder 2.7x fused fp32 with VNNI, 1.4-1.9x without; ~40 dB from fp32, ~3 dB
    #: less without VNNI), fp32 elsewhere (bf16 measured 0.7x fp32 with AVX512-BF16 but no AMX, ~13x
    #: slower without AVX-512). int8 runs on the CPU only
    precision: str = "auto"
    #: feather (soft lower-face mask, no seam) | hard (the official rectangle)
    blend: str = "feather"
    #: auto | cpu | cuda (auto: CUDA only when Ray gave the actor a GPU)
    device: str = "auto"
    #: where crops and the paste-back run: auto (on the model's device when that is CUDA, else cpu) |
    #: cpu (OpenCV, the official numerics) | device (torch on the model's device)
    image_ops: str = "auto"
    #: torch.compile the generator: auto | true | false (a failed compile falls back to eager with a
    #: warning). auto compiles where it was measured to pay, which is nowhere yet: on CPU the fused
    #: eager generator beats the compiled one (17.3 vs 16.1 frames/s on one core, after ~40 s of
    #: compile), and GPU actors are bound by x264 on the CPU, not by the generator
    compile: str = "auto"
    #: MiB of face-encoder outputs an actor keeps per source frame and box: a still avatar, and every
    #: frame of a looped clip, encodes its face once instead of once per output frame (0 = off)
    face_cache_mb: int = 256

    def __post_init__(self) -> None:
        self.compile = str(self.compile).lower()  # `renderer.compile=true` arrives as a YAML bool
        check_choices(
            "renderer",
            self,
            {"precision": PRECISIONS, "compile": ("auto", "true", "false"), "blend": BLENDS, "image_ops": IMAGE_OPS},
        )
        check_device("renderer", self.device)
        if self.batch_size < 0 or self.face_cache_mb < 0:
            raise ValueError("renderer.batch_size and renderer.face_cache_mb must be 0 (auto/off) or more")


@dataclass
class DetectorConfig:
    """Face detection and tracking, run once per avatar and cached."""

    #: haar | box | s3fd
    name: str = "haar"
    #: fixed box x1, y1, x2, y2 for name=box (a `box` manifest column overrides it per row)
    box: list[int] | None = None
    #: pixels added to the detected box: top, bottom, left, right (official default)
    pads: list[int] = field(default_factory=lambda: [0, 10, 0, 0])
    #: temporal smoothing of the track (official 5-frame window)
    smooth: bool = True
    #: detect on a copy downscaled so its longer side is at most this many pixels
    max_side: int = 720
    #: detect on every Nth frame and interpolate between (1 = every frame; conf/detector/haar.yaml
    #: sets 2 for the default detector): one of STRIDES
    stride: int = 1
    #: frames per detector call
    batch_size: int = 16
    #: model file for learned detectors (s3fd)
    checkpoint: str | None = None
    #: auto | cpu | cuda, for learned detectors (auto: CUDA only when Ray gave the task a GPU)
    device: str = "auto"
    #: GPU share of each detection task with a learned detector (s3fd) on a cluster with GPUs; a
    #: task given no GPU detects on the CPU
    num_gpus: float = 0.125

    def __post_init__(self) -> None:
        check_choices("detector", self, {"name": DETECTORS})
        if self.stride not in STRIDES:
            raise ValueError(f"detector.stride={self.stride} is not one of {', '.join(map(str, STRIDES))}")
        check_device("detector", self.device)
        if self.box is not None and not (
            len(self.box) == 4 and 0 <= self.box[0] < self.box[2] and 0 <= self.box[1] < self.box[3]
        ):
            raise ValueError(
                f"detector.box={list(self.box)} is not [x1, y1, x2, y2] with 0 <= x1 < x2 and 0 <= y1 < y2"
            )
        if self.box is not None and self.name != "box":  # the detector would find the face; the box was ignored
            raise ValueError(
                f"detector.box is for detector=box (detector={self.name} finds the face itself): add detector=box, "
                "or give boxes per row in the manifest's `box` column (which any detector takes)"
            )
        if len(self.pads) != 4:
            raise ValueError(f"detector.pads={list(self.pads)} is not [top, bottom, left, right]")
        if self.max_side < 16 or self.batch_size < 1:  # 0 shrank every frame to a pixel: "no face found"
            raise ValueError(
                f"detector.max_side must be 16 or more and detector.batch_size 1 or more, "
                f"got {self.max_side} and {self.batch_size}"
            )
        if self.name == "s3fd" and not self.checkpoint:  # before any cluster starts, not on every row
            raise ValueError("detector=s3fd needs detector.checkpoint=<URI of s3fd-619a316812.pth>")

    @property
    def gpu_share(self) -> float:
        """The GPU share a detection task asks for where the cluster has GPUs (0: CPU only)."""
        return self.num_gpus if self.name == "s3fd" and self.device != "cpu" and self.num_gpus > 0 else 0.0


@dataclass
class ActorConfig:
    """Resources of one renderer actor. Both are always set: an actor that names only GPUs
    holds one CPU for life, which hangs fractional-GPU actors on small nodes."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: torch threads per actor (0 = num_cpus rounded up)
    threads: int = 0
    #: give each actor whole cores of its own (Linux): num_cpus rounded up, claimed per node; an
    #: actor that finds too few free cores runs unpinned
    pin_cpus: bool = False

    def __post_init__(self) -> None:
        if not (self.num_cpus >= 0 and self.num_gpus >= 0 and self.threads >= 0):
            raise ValueError(
                f"cluster.actor's num_cpus, num_gpus and threads must be 0 or more, got {self.num_cpus}, "
                f"{self.num_gpus} and {self.threads}"
            )


@dataclass
class ClusterConfig:
    """Where and how wide the campaign runs."""

    #: what runs the stages: "ray" (a local Ray started for the run, or the cluster at `address`)
    #: or "inline" (this process, no Ray: one renderer on every core, for debugging and single videos)
    executor: str = "ray"
    #: null = start a local Ray; "auto" or ray://host:10001 or an IP:port joins an existing cluster
    address: str | None = None
    #: logical CPUs for a local Ray; null = this machine's cores plus `reserve_cpus`, so the actors
    #: get every core and the light prepare/stitch tasks share them instead of idling one (on 2
    #: cores: 2 actors, not 1). Ignored when joining a cluster
    num_cpus: int | None = None
    #: GPUs for a local Ray (null = what the machine has); ignored when joining a cluster
    num_gpus: int | None = None
    #: renderer actors (0 = as many as each node's resources fit, less `reserve_cpus` on every node)
    actors: int = 0
    #: CPUs left free for the prepare and stitch tasks when sizing the actor pool automatically
    reserve_cpus: float = 1.0
    actor: ActorConfig = field(default_factory=ActorConfig)
    #: CPUs per prepare/stitch task
    task_cpus: float = 1.0
    #: seconds a renderer actor may take to start, or to come back after its process died, before
    #: it gets no more work: no node has room for it (a GPU node that never joins, more actors than
    #: the cluster holds) or its model load never ends; once none is left, the rows waiting fail
    #: saying so (a campaign waited for ever). 0 waits for ever
    actor_start_timeout: float = 1800.0
    #: serve Ray's dashboard (http://127.0.0.1:8265 on a local Ray) while the run lasts; a local Ray
    #: lives only as long as the run, and the dashboard costs it ~0.9 s of start-up
    include_dashboard: bool = False

    def __post_init__(self) -> None:
        check_choices("cluster", self, {"executor": EXECUTORS})
        # actors=-1 started none, and the campaign waited for ever for a renderer
        for name in ("actors", "reserve_cpus", "num_cpus", "num_gpus", "actor_start_timeout"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"cluster.{name} must be 0 or more, got {value}")
        if self.task_cpus <= 0:
            raise ValueError(f"cluster.task_cpus must be more than 0, got {self.task_cpus}")
        if self.address and not _RAY_ADDRESS.fullmatch(self.address):
            # the job server's http://head:8265, as `ray job submit` takes it: Ray's traceback blamed RAY_ADDRESS
            raise ValueError(
                f"cluster.address={self.address} is not a Ray cluster's address: give auto, <head>:6379 (the "
                "GCS; http://<head>:8265 is the job server's, for `ray job submit`) or ray://<head>:10001"
            )
        # the pool fitted to the cluster by each actor's share: of nothing, thousands of processes
        if self.actors == 0 and self.actor.num_cpus == 0 and self.actor.num_gpus == 0:
            raise ValueError(
                "cluster.actors=0 fits the pool to the cluster by each actor's CPUs and GPUs, and "
                "cluster.actor asks for neither: give cluster.actor.num_cpus, or cluster.actors"
            )

    def local_cpus(self) -> int:
        """Logical CPUs of a Ray started on this machine (the run's own, or the studio's head):
        `num_cpus`, or the cores this process may use plus the CPUs kept for prepare/stitch tasks.
        Those tasks are short and light next to rendering, so they share the actors' cores: on a
        2-core machine two actors render instead of one actor beside an idle core."""
        if self.num_cpus is not None:
            return self.num_cpus
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return cores + math.ceil(self.reserve_cpus)


@dataclass
class StorageConfig:
    """fsspec options per protocol, e.g. {s3: {endpoint_url: ..., key: ..., secret: ...}}.
    Prefer the standard AWS environment for credentials; options here are passed to workers."""

    options: dict[str, Any] = field(default_factory=dict)
    #: let manifest rows write outputs outside the campaign's output root
    allow_outside_output: bool = False

    def __post_init__(self) -> None:
        if self.options:
            from heygem_ray.storage import option_problems

            problems = option_problems(self.options)
            if problems:
                raise ValueError("; ".join(problems))


@dataclass
class LimitsConfig:
    """Per-row caps that protect the cluster: a row over a cap fails with a clear error instead of
    running a node out of memory or time."""

    #: longest audio a row may have (seconds)
    max_audio_seconds: float = 4 * 3600.0
    #: largest avatar frame (width x height, after rotation); the default admits 4K (3840x2160)
    max_avatar_pixels: int = 4096 * 2304
    #: GiB of new videos this run may publish (0: no limit): once those it published reach it, rows
    #: it has not begun to render fail saying so (rows under way finish, rows already done are
    #: skipped as ever). The studio sets it to the user's storage quota left
    max_output_gb: float = 0.0
    #: GiB of narrations this run may decode into its cache (0: no limit; 16 kHz float samples, 0.23
    #: GB an hour): once those it decoded reach it, rows it has not prepared yet fail saying so (a
    #: narration compresses ~350x: a few MB of upload decoded to the whole disk). The studio sets it
    #: to `studio.user_cache_gb`
    max_cache_gb: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_output_gb", "max_cache_gb"):
            if getattr(self, name) < 0:
                raise ValueError(f"limits.{name} must be >= 0 (0: no limit), got {getattr(self, name)}")
        if self.max_audio_seconds <= 0 or self.max_avatar_pixels <= 0:  # 0 refused every row, one by one
            raise ValueError(
                "limits.max_audio_seconds and limits.max_avatar_pixels must be positive, "
                f"got {self.max_audio_seconds} and {self.max_avatar_pixels}"
            )


@dataclass
class EncoderConfig:
    """Output codecs. Every segment is encoded with the same settings so segments join without re-encoding."""

    #: libx264 | h264_nvenc | auto (NVENC when the actors' GPU has a video encoder, else libx264)
    codec: str = "auto"
    #: quality: x264 CRF, or NVENC constant quality (lower = better, bigger)
    crf: int = 18
    #: x264 preset (NVENC uses its own p4 with tune hq). superfast's search with veryfast's rate
    #: control (x264_params) costs about half of veryfast's CPU at the same quality; x264 is what
    #: bounds a GPU node (benchmarks/RESULTS.md, "Encoder default")
    preset: str = "superfast"
    #: x264 options over the preset, "key=value:key=value" ("" = the preset as x264 defines it).
    #: superfast turns mb-tree off; back on with veryfast's 10-frame lookahead it keeps files the size
    #: of veryfast's (without it they are 2-15x larger)
    x264_params: str = "mbtree=1:rc-lookahead=10"
    #: yuv420p plays everywhere; frame sizes are made even for it
    pix_fmt: str = "yuv420p"
    #: the narration's codec, bit rate and rate in the output (encoded once per narration)
    audio_codec: str = "aac"
    audio_bitrate: int = 128_000
    audio_sample_rate: int = 48_000

    def __post_init__(self) -> None:
        check_choices(
            "encoder",
            self,
            {"codec": VIDEO_CODECS, "preset": X264_PRESETS, "pix_fmt": PIX_FMTS, "audio_codec": AUDIO_CODECS},
        )
        if not 0 <= self.crf <= 51:
            raise ValueError(f"encoder.crf={self.crf} is not within 0 (lossless) .. 51 (worst)")
        if self.x264_params and not X264_PARAMS_PATTERN.fullmatch(self.x264_params):
            raise ValueError(f"encoder.x264_params={self.x264_params} is not key=value[:key=value ...]")
        if self.audio_sample_rate not in AAC_RATES:  # else every row failed in its audio task
            raise ValueError(
                f"encoder.audio_sample_rate={self.audio_sample_rate} is not one of AAC's "
                f"{', '.join(map(str, AAC_RATES))}"
            )
        if not 8_000 <= self.audio_bitrate <= 512_000:
            raise ValueError(f"encoder.audio_bitrate={self.audio_bitrate} is not within 8000 .. 512000 bits/s")


@dataclass
class DecoderConfig:
    """How renderer actors decode avatar videos."""

    #: auto: NVDEC in an actor Ray gave a GPU (software where the GPU's decoder cannot take the
    #: avatar's codec), software elsewhere; cpu: software always; cuda | cuda:N: NVDEC, and an actor
    #: without a usable one does not start. NVDEC leaves the CPU cores to x264, which bounds a GPU node
    device: str = "auto"

    def __post_init__(self) -> None:
        check_device("decoder", self.device)


@dataclass
class RenderConfig:
    """Campaign scheduling."""

    #: seconds of output per segment (one actor call)
    segment_seconds: float = 10.0
    #: campaign-wide cap on segments submitted to actors and not yet finished (0 = no cap beyond
    #: segments_per_actor x actors)
    max_inflight_segments: int = 0
    #: segments one actor holds at once (the one it renders and the next, ready to start); the rest
    #: wait on the driver for the first actor that frees up
    segments_per_actor: int = 2
    #: rows being prepared ahead of rendering (their audio decoded, their avatar's face tracked);
    #: 0 = twice the actors, at least 8: a campaign of many presenters spends most of a row's
    #: preparing on tracking its avatar, and a fixed 8 fed no more than 8 trackings to a cluster
    max_prepared_rows: int = 0
    #: tries per segment when an actor or node dies or its renderer fails (bad input is never retried,
    #: nor a storage error, which the storage layer retried already)
    max_attempts: int = 3
    #: seconds an actor may work on one segment before it is taken for hung (a GPU or decoder that
    #: never returns, a network read that never ends): it is restarted and its segments go to the
    #: others, the one it was on charged a try; 0 = 60 x segment_seconds, at least 1800 s (a CPU at
    #: a sixtieth of real time still finishes, and a node's first segment of an avatar downloads it
    #: first: 10 GB at 10 MB/s); a negative value waits for ever
    segment_timeout: float = 0.0
    #: seconds a stage task (a row's preparation, an avatar's face tracking, a narration's encode, a
    #: stitch) may be out, placed or waiting for room, before it is stopped and the rows it serves
    #: fail (a rerun tries them again): a read or decoder that never ends held the campaign for ever;
    #: 0 = 60 x the seconds of video it handles, at least 2 hours (counted from its submit: a task
    #: may wait for room behind other rows' long face tracking); a negative value waits for ever
    stage_timeout: float = 0.0
    #: frames per second for still-image avatars
    still_fps: float = 25.0
    #: the highest output frame rate: a clip above it shows every 2nd, 3rd... frame, the fewest that
    #: bring it to or under this (a 120/240 fps slow-motion clip renders at 60, not 2-4x the frames
    #: of a 60 fps one; a rate up to 2 % over it counts as at it); 0 keeps every frame
    max_fps: float = 60.0
    #: the longest side of the output video: a larger avatar (a 4K clip, a phone's 4032x3024 photo)
    #: is shrunk to it, keeping its shape, as 4K takes ~4x the decoding, rendering and encoding of
    #: 1080p for a mouth the model draws at 96x96 and few viewers watch larger; 0 keeps the avatar's
    #: size (a photo up to limits.max_avatar_pixels, shrunk to that)
    max_side: int = 1920
    #: a progress bar on stderr
    progress: bool = True

    def __post_init__(self) -> None:
        # a zero here would leave segments waiting for a slot that never opens
        for name in ("segments_per_actor", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"render.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_prepared_rows < 0:
            raise ValueError(f"render.max_prepared_rows must be 0 (auto) or more, got {self.max_prepared_rows}")
        if self.max_inflight_segments < 0:
            raise ValueError(
                f"render.max_inflight_segments must be 0 (no cap) or more, got {self.max_inflight_segments}"
            )
        if not self.segment_seconds > 0 or not self.still_fps > 0:
            raise ValueError("render.segment_seconds and render.still_fps must be positive")
        if self.max_side < 0 or 0 < self.max_side < 16:
            raise ValueError(f"render.max_side must be 0 (the avatar's size) or 16 or more, got {self.max_side}")
        if not self.max_fps >= 0:
            raise ValueError(f"render.max_fps must be 0 (no cap) or positive, got {self.max_fps}")

    def segment_deadline(self) -> float:
        """`segment_timeout` in seconds (infinite when negative)."""
        if self.segment_timeout < 0:
            return float("inf")
        return self.segment_timeout or max(1800.0, 60.0 * self.segment_seconds)

    def stage_deadline(self, media_seconds: float = 0.0) -> float:
        """`stage_timeout` in seconds for a stage task handling `media_seconds` of video (infinite
        when negative)."""
        if self.stage_timeout < 0:
            return float("inf")
        return self.stage_timeout or max(7200.0, 60.0 * media_seconds)


@dataclass
class QAConfig:
    """Lip-sync scoring of every output (heygem_ray/qa.py): `sync_score`, `sync_offset_frames`,
    `sync_method` and `qa_flag` in the results and the report."""

    #: the official lip-sync expert (Wav2Lip's `lipsync_expert.pth`, any fsspec URI); null = the
    #: weights-free motion-energy score
    syncnet: str | None = None
    #: rows scoring below this are flagged: a correlation (-1..1) for motion-energy
    min_sync: float = 0.3
    #: ... and the expert's confidence (LSE-C) with `syncnet`
    min_confidence: float = 3.0
    #: a row scoring below this fails and nothing is published (null = never: flags only)
    fail_below: float | None = None
    #: largest offset between mouth and speech searched for, frames
    max_lag: int = 3

    def __post_init__(self) -> None:
        if self.max_lag < 0:  # searched no offset at all: every row scored None, silently
            raise ValueError(f"qa.max_lag must be 0 or more, got {self.max_lag}")
        # without the expert, scores are correlations: a floor past 1 flagged (or failed, after
        # rendering) every row
        if self.syncnet is None:
            for key in ("min_sync", "fail_below"):
                value = getattr(self, key)
                if value is not None and not -1 <= value <= 1:
                    raise ValueError(
                        f"qa.{key} must be within -1 and 1 (the motion-energy score is a correlation), got {value} "
                        "(the lip-sync expert's confidence, qa.syncnet, scores higher)"
                    )


def in_ray_job() -> bool:
    """Whether this process is a `ray job submit` entrypoint (which runs in Ray's copy of the job's
    working directory, as its workers do)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


@dataclass
class Config:
    #: Parquet manifest URI (columns audio, avatar; optional id, output, box)
    manifest: str = MISSING
    #: campaign output root URI; videos default to {output}/{id}.mp4
    output: str = MISSING
    #: what rows share and reruns reuse: content fingerprints, decoded narrations, encoded audio
    #: tracks, avatar probes and face tracks (null = {output}/_cache)
    cache: str | None = None
    #: re-render rows whose done-marker matches (a forced rerun stopped before its end is resumed by
    #: the next: the rows it published stay done)
    force: bool = False
    renderer: Any = MISSING
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    #: set by the campaign as it starts (a value given here is replaced): model file URI -> its
    #: version then (`prepare.model_versions`), which every task and actor of the run uses
    model_versions: dict[str, str] = field(default_factory=dict)
    #: set by the campaign as it starts (a value given here is replaced): with `force`, the runs of
    #: the forced rerun this one goes on with (`{output}/_force.json`), whose markers count as done
    forced_by: list[str] = field(default_factory=list)
    #: set by `anchored`: a model file's URI made absolute -> the URI as written, which rows'
    #: fingerprints hold (a campaign rendered with a relative path renders no finished row again)
    written_paths: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # `output=$OUT` with OUT unset: an empty root is the file system's, "/_lock.json" and all
        for name in ("manifest", "output", "cache"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise ValueError(f"{name} is empty (an unset variable?): give its URI")

    def anchored(self) -> Config:
        """This config with its relative local paths (manifest, output, cache, model files) made
        absolute against this process's folder, as the user meant them: the workers of a cluster
        the campaign joins (`cluster.address`) run in the folder its head was started in. Not in a
        Ray job, whose workers share its working directory (where such paths are refused or, for
        model files shipped with the job, right)."""
        from dataclasses import replace

        from heygem_ray.storage import anchored

        if in_ray_job():
            return self
        written = dict(self.written_paths)

        def anchor(uri: str | None) -> str | None:
            if not uri:
                return uri
            absolute = anchored(uri)
            if absolute != uri:
                written[absolute] = uri
            return absolute

        renderer = self.renderer
        if getattr(renderer, "checkpoint", None):
            renderer = replace(renderer, checkpoint=anchor(renderer.checkpoint))
        return replace(
            self,
            manifest=anchored(self.manifest),
            output=anchored(self.output),
            cache=anchored(self.cache) if self.cache else self.cache,
            renderer=renderer,
            detector=replace(self.detector, checkpoint=anchor(self.detector.checkpoint)),
            qa=replace(self.qa, syncnet=anchor(self.qa.syncnet)),
            written_paths=written,
        )

    @property
    def layout(self) -> CampaignLayout:
        """Where the campaign's results, report, markers, work and cache go."""
        return CampaignLayout(self.output, self.cache)

    @property
    def cache_uri(self) -> str:
        return self.layout.cache


@dataclass
class StudioConfig:
    """`heygem-ray studio`: the web front end (heygem_ray/studio). Campaigns run as Ray jobs, so
    they outlive the page and the studio itself."""

    #: where the studio listens; without `auth` it refuses anything but 127.0.0.1
    host: str = "127.0.0.1"
    port: int = 7860
    #: every user's uploads and campaigns: a local folder or any fsspec URI (s3://bucket/studio)
    store: str = "~/.heygem_ray/studio"
    #: the Ray cluster's job server (http://HEAD:8265); null = a local Ray head on this machine,
    #: started if none is running, which keeps running when the studio stops (`ray stop` ends it)
    ray_address: str | None = None
    #: the dashboard / job server port of that local head
    dashboard_port: int = 8265
    #: the users file (TOML of names and salted password hashes: `heygem-ray studio adduser NAME`);
    #: null = one local user, and the studio listens on 127.0.0.1 only
    auth: str | None = None
    #: what signs login cookies (created, readable by its owner only, when missing): sessions
    #: survive a restart of the studio
    session_key: str = "~/.heygem_ray/studio-session.key"
    #: renderers users may pick: name -> the campaign's overrides, e.g.
    #: {wav2lip: ['renderer=wav2lip', 'renderer.checkpoint=s3://models/wav2lip_gan.pth']}; the
    #: weights-free classic renderer is always offered
    models: dict[str, list[str]] = field(default_factory=dict)
    #: largest file a user may upload, MiB (checked by the web server and again by the studio)
    max_upload_mb: float = 2048
    #: what one user's campaigns may take in the store (uploads and videos; not the cache of decoded
    #: narrations and face tracks, which operators may clear), GiB: checked when a campaign is made,
    #: against what is stored then and its uploads (its videos count once rendered): a campaign that
    #: would pass it is refused until the user deletes old ones; 0 = no limit
    user_quota_gb: float = 100
    #: what one user's cache (`{store}/{user}/_cache`: decoded narrations, face tracks, outside the
    #: quota) may grow to, GiB: past it, the studio removes it (checked hourly) while none of the
    #: user's campaigns is queued or running; it is made again as campaigns need it. Each job may
    #: decode this much into it (`limits.max_cache_gb`). 0 = no limit
    user_cache_gb: float = 20
    #: campaigns one user may have queued or running at once (each is a Ray job, its driver a
    #: process on the head node); 0 = no limit
    max_active_campaigns: int = 4
    #: one line per upload, submit, finish, failure, cancel, delete and download, with user and campaign
    log_file: str = "~/.heygem_ray/studio.log"
    #: overrides added to every campaign the studio submits (e.g. ['cluster=gpu'])
    render_overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # a negative limit reads as none passed: every user's cache would go at each trim
        for name in ("user_quota_gb", "user_cache_gb", "max_active_campaigns"):
            if getattr(self, name) < 0:
                raise ValueError(f"studio.{name} must be 0 (no limit) or more, got {getattr(self, name)}")
        for name in ("port", "dashboard_port"):  # else a traceback once the studio had printed its address
            if not 1 <= getattr(self, name) <= 65535:
                raise ValueError(f"studio.{name} must be within 1 .. 65535, got {getattr(self, name)}")


@dataclass
class StudioAppConfig:
    """The `studio` command's config: conf/studio.yaml composes it (`studio.port=8080` ...)."""

    studio: StudioConfig = field(default_factory=StudioConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(name="studio_schema", node=StudioAppConfig)
    for name, (renderer_config, _) in RENDERERS.items():  # `renderer=<name>`: no YAML file needed
        cs.store(group="renderer", name=name, node=renderer_config)
    cs.store(group="detector", name="detector_schema", node=DetectorConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)
    cs.store(group="storage", name="storage_schema", node=StorageConfig)


#: The renderers, the one registry: name -> its config dataclass and the renderer class that builds
#: itself from that config (`from_config`), named as "module:Class" so only the chosen one is
#: imported (and this module stays below the renderers). A new renderer is a config dataclass, a
#: renderer class and an entry here; `renderer=<name>` then composes and renders.
RENDERERS: dict[str, tuple[type, str]] = {
    "classic": (ClassicRendererConfig, "heygem_ray.render.classic:ClassicRenderer"),
    "wav2lip": (Wav2LipRendererConfig, "heygem_ray.render.wav2lip:Wav2LipRenderer"),
}


def to_plain(cfg: DictConfig) -> Config:
    """Resolve every interpolation and return plain dataclasses, safe to send to Ray workers."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    renderer = container.pop("renderer")
    name = renderer.get("name", "classic")
    if name not in RENDERERS:
        raise ValueError(f"unknown renderer {name!r}; choose one of {sorted(RENDERERS)}")
    merged = OmegaConf.merge(OmegaConf.structured(Config), {**container, "renderer": {}})
    plain = OmegaConf.to_object(merged)
    assert isinstance(plain, Config)
    plain.renderer = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RENDERERS[name][0]), renderer))
    return plain
