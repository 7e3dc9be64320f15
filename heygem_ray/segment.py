"""The render stage: one call renders one segment of one row on a warm renderer.

`RenderWorker` is created once per Ray actor (model loaded there) and reused for every segment of
every row. A call decodes only the avatar frames its segment shows (seek, then decode forward in
renderer-sized batches), reads only its audio window from the PCM cache, renders, encodes H.264
and publishes the segment file. The file's key holds the row's fingerprint, so a segment finished
by an earlier attempt or run is reused, not rendered again.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from heygem_ray import metrics, qa, release, scratch, storage
from heygem_ray.config import Config
from heygem_ray.devices import cuda_index, cuda_usable, prefer_blocking_sync, set_torch_threads, torch_device
from heygem_ray.errors import InputError, RendererStartError, reading
from heygem_ray.media.audio import AUDIO_CONTEXT_SECONDS, SAMPLE_RATE, AudioWindow
from heygem_ray.media.video import (
    AvatarDecodeError,
    FrameReader,
    SegmentWriter,
    VideoInfo,
    auto_codec,
    encoder_problem,
    encoder_works,
    ffmpeg_has_cuda,
    nvdec_problem,
)
from heygem_ray.media.yuv import even_region, i420_size, paste_bgr, region_to_bgr
from heygem_ray.pinning import pin_to_free_cores
from heygem_ray.plan import audio_span
from heygem_ray.prepare import input_copy, read_pcm
from heygem_ray.render import build_renderer

log = logging.getLogger("heygem_ray")


@dataclass(frozen=True)
class SegmentJob:
    row_id: str
    index: int
    out_uri: str
    avatar_uri: str
    info: VideoInfo
    start: int  # first output frame number
    avatar_frames: np.ndarray  # int64 avatar frame index per output frame
    pts: np.ndarray  # int64 pts of avatar frames pts_offset.. (the span this segment touches)
    pts_offset: int
    boxes: np.ndarray  # int32 (frames, 4) box per output frame
    pcm_uri: str
    audio_samples: int
    audio_level: float
    codec: str  # the campaign's video encoder (never "auto": the driver decided)
    reuse: bool = True  # a segment an earlier run left at out_uri is kept (not under `force`)
    #: the avatar's content fingerprint: the bytes its track was made of (`storage.local_copy`)
    avatar_fingerprint: str = ""

    @property
    def frames(self) -> int:
        return len(self.avatar_frames)


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    #: the cores the actor is pinned to (`cluster.actor.pin_cpus`), or None
    cores: list[int] | None
    #: the video encoder this actor can use: `encoder.codec`, or what `auto` means on its node
    codec: str
    #: wall-clock times (time.time()) of the actor's start: the constructor began, and the model was
    #: loaded (for the campaign's start-up breakdown)
    init_started: float = 0.0
    model_loaded: float = 0.0
    #: how it decodes avatar videos: "nvdec:N" (CUDA device N) or "software"
    decoder: str = "software"
    #: the heygem_ray code it runs (`release.code_version`), as its process found it at start
    code: str = ""


@dataclass
class SegmentResult:
    row_id: str
    index: int
    frames: int
    bytes: int
    reused: bool
    node: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    #: time.time() when the call began and when its first batch of frames was rendered
    started_at: float = 0.0
    first_batch_at: float = 0.0


def nvdec_device(setting: str) -> int | None:
    """The CUDA device whose NVDEC decodes avatar videos for `decoder.device=setting` in this
    process, or None for software. `auto` takes it only where this process may use CUDA (inside Ray:
    a GPU Ray gave it) and NVDEC decodes there; a named CUDA device must decode, or this raises.

    Call it before torch uses CUDA in this process. FFmpeg shares the device's primary context with
    torch only if that context is not yet active or already has exactly the blocking-sync flag
    (CU_CTX_SCHED_BLOCKING_SYNC: a wait for the GPU sleeps instead of spinning a core): so that
    flag is set first, then torch makes the context, once, and FFmpeg is asked to decode in it as
    every segment's reader will. Where FFmpeg has no CUDA support at all, no context is made."""
    if setting == "cpu" or (setting == "auto" and not cuda_usable()):
        return None
    index = cuda_index() if setting == "auto" else torch_device(setting).index or 0
    problem: str | None = "this FFmpeg has no CUDA support"
    if ffmpeg_has_cuda():
        import torch

        prefer_blocking_sync(index)
        # the context, kept for the process's life (torch never lets it go). Made before FFmpeg's
        # probe, not by it: the probe's context would end with the probe (its reference was the
        # only one), and torch would then make a second, a start-up cost paid twice per GPU actor.
        try:
            torch.zeros(1, device=f"cuda:{index}")
        except (RuntimeError, AssertionError) as exc:  # no GPU or driver, a torch without CUDA
            problem = f"no CUDA context: {exc}".splitlines()[0]
        else:
            problem = nvdec_problem(index)
    if problem is None:
        return index
    if setting == "auto":
        log.warning("decoder.device=auto: NVDEC unusable on cuda:%d (%s), decoding in software", index, problem)
        return None
    raise RuntimeError(f"decoder.device={setting}: NVDEC cannot decode here ({problem})")


#: model loads an actor makes when the last failed for a reason a later try may not meet (the
#: store down past its own retries, the GPU's memory held by another process), and the seconds
#: before the first retry (doubling): one blip must not retire every actor of a campaign
MODEL_LOAD_TRIES = 3
MODEL_LOAD_BACKOFF_SECONDS = 10.0


class RenderWorker:
    """The body of a renderer actor."""

    def __init__(self, cfg: Config):
        """Never raises: a renderer that cannot start says why from `ready()` (a typed
        `RendererStartError` the driver reads, instead of a dead actor's traceback text)."""
        self.init_started = time.time()
        self.code = release.code_version()  # what this process imported, before the files can change
        self.cfg = cfg
        self.cores: list[int] | None = None
        self.start_error: str | None = None
        self._may_retry = False  # the start failed for a reason a later try may not meet
        try:
            self._setup(cfg)
        except Exception as exc:  # noqa: BLE001 - reported by ready(), to the driver
            self.start_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return
        try:
            self._load(cfg)
        except Exception as exc:  # noqa: BLE001 - reported by ready(), to the driver
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """A failed `_load`: why, and whether `ready` tries again."""
        self.start_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        self._may_retry = storage.is_transient(exc) or type(exc).__name__ == "OutOfMemoryError"

    def _setup(self, cfg: Config) -> None:
        """What the process needs once: storage options, cores, thread counts, the video decoder."""
        storage.configure(cfg.storage.options, cfg.model_versions)
        scratch.sweep()  # what killed processes on this node left (a restarted actor's own among them)
        cpus = max(1, int(np.ceil(cfg.cluster.actor.num_cpus)))
        # before any thread pool starts, so torch's and the helpers' threads inherit the cores
        self.cores = pin_to_free_cores(cpus) if cfg.cluster.actor.pin_cpus else None
        # Stay within the CPUs Ray gave this actor: torch, OpenCV, the decoder and x264 would each
        # otherwise start one thread per core of the node, and actors sharing a node would fight.
        self.threads = cfg.cluster.actor.threads or cpus
        import cv2

        cv2.setNumThreads(self.threads)
        set_torch_threads(self.threads)

        # a renderer without a device (classic) needs no torch, unless the lip-sync expert runs here
        device = getattr(cfg.renderer, "device", None) or ("auto" if cfg.qa.syncnet else None)
        renderer_device = torch_device(device) if device is not None else None
        if renderer_device is not None and renderer_device.type == "cuda" and cuda_usable():
            prefer_blocking_sync(renderer_device.index or 0)  # before its context exists: waits sleep
        self.nvdec = nvdec_device(cfg.decoder.device)  # before anything else makes the GPU's context: see there

    def _load(self, cfg: Config) -> None:
        """The models and the encoder check: tried again by `ready` after a transient failure."""
        self.renderer = build_renderer(cfg.renderer, threads=self.threads)
        set_torch_threads(self.threads)  # torch is loaded now if the renderer uses it
        self.expert: tuple[Any, Any] | None = None  # the lip-sync expert and its device (heygem_ray.qa)
        self.expert_key = ""  # of the weights loaded: names the sidecars of its embeddings
        if cfg.qa.syncnet:
            from heygem_ray.models.syncnet import load_expert

            model, device, self.expert_key = load_expert(cfg.qa.syncnet)
            self.expert = (model, device)
        self.model_loaded = time.time()
        # the pixel format too: NVENC takes no 4:2:2, and opened with 4:2:0 only, it failed every segment
        pix_fmt = cfg.encoder.pix_fmt
        self.codec = auto_codec(pix_fmt) if cfg.encoder.codec == "auto" else cfg.encoder.codec
        if not encoder_works(self.codec, pix_fmt=pix_fmt):
            raise RuntimeError(
                f"encoder.codec={self.codec} cannot encode {pix_fmt} on this node (h264_nvenc needs a GPU "
                "with a video encoder: L4, A10G, not H100, and takes no yuv422p): give encoder.codec=libx264, or "
                "auto, which the campaign's first renderer decides for all"
            )
        problem = encoder_problem(self.codec, cfg.encoder)
        if problem:
            raise RuntimeError(problem)

    def ready(self) -> WorkerInfo:
        """Answers once the model is loaded: its encoder, and what helps operators find the actor.
        A load that failed for a transient reason is tried again first (MODEL_LOAD_TRIES)."""
        for attempt in range(1, MODEL_LOAD_TRIES):
            if self.start_error is None or not self._may_retry:
                break
            delay = MODEL_LOAD_BACKOFF_SECONDS * 2 ** (attempt - 1)
            log.warning("renderer could not start (%s): trying again in %.0f s", self.start_error, delay)
            time.sleep(delay)
            self.start_error = None
            try:
                self._load(self.cfg)
            except Exception as exc:  # noqa: BLE001 - reported below, to the driver
                self._failed(exc)
        if self.start_error is not None:
            raise RendererStartError(self.start_error)
        return WorkerInfo(
            os.getpid(),
            self.cores,
            self.codec,
            init_started=self.init_started,
            model_loaded=self.model_loaded,
            decoder="software" if self.nvdec is None else f"nvdec:{self.nvdec}",
            code=self.code,
        )

    def render_segment(self, job: SegmentJob) -> SegmentResult:
        if self.start_error is not None:
            raise RendererStartError(self.start_error)
        started = time.time()
        # a segment made before qa.syncnet was set, or with other weights, lacks this expert's
        # embeddings: made again
        if (
            job.reuse
            and storage.exists(job.out_uri)
            and (self.expert is None or storage.exists(qa.syncnet_uri(job.out_uri, self.expert_key)))
        ):
            return SegmentResult(
                job.row_id, job.index, job.frames, storage.size(job.out_uri), reused=True, started_at=started
            )
        clock = metrics.StageClock()
        info = job.info
        frame_numbers = np.arange(job.start, job.start + job.frames)
        with clock("audio"):
            features = self.renderer.features(self._audio_window(job, frame_numbers), frame_numbers, info.fps)
        with reading("avatar", job.avatar_uri):  # gone, or changed since it was tracked: the row's fault
            local_avatar = input_copy(job.avatar_uri, self.cfg.cache_uri, job.avatar_fingerprint, "avatar")
        enc = self.cfg.encoder
        with scratch.folder("seg") as tmp:
            path = os.path.join(tmp, "segment.mp4")
            motion = np.full(job.frames, np.nan, np.float32)  # the mouth's change per frame (heygem_ray.qa)
            halves: list[np.ndarray | None] | None = [None] * job.frames if self.expert else None
            with (
                _avatar_decoding(job.avatar_uri),
                SegmentWriter(
                    path, info.width, info.height, info.fps_fraction, job.codec, enc, self.threads, info.sar, info.color
                ) as writer,
                FrameReader(
                    local_avatar,
                    info,
                    None if info.still else job.pts,
                    job.pts_offset,
                    threads=self.threads,
                    pixel_format="yuv420p" if writer.takes_i420 else "bgr24",
                    nvdec=self.nvdec,
                ) as reader,
            ):
                written, first_batch_at = self._render_frames(job, features, reader, writer, clock, motion, halves)
            if written != job.frames:
                raise RuntimeError(f"segment {job.index} of {job.row_id}: encoded {written} of {job.frames} frames")
            size = os.path.getsize(path)
            with clock("upload"):
                qa.write_motion(qa.motion_uri(job.out_uri), motion)  # first: a segment that exists has one
                if self.expert is not None and halves is not None:
                    from heygem_ray.models.syncnet import embed, face_windows

                    with clock("qa"):
                        windows, starts = face_windows(halves, info.fps)
                        faces = embed(self.expert[0].embed_faces, windows, self.expert[1])
                    qa.write_face_embeddings(qa.syncnet_uri(job.out_uri, self.expert_key), faces, starts)
                storage.publish_file(path, job.out_uri, move=True)
        metrics.frames_rendered(job.frames)
        metrics.stage_seconds(clock.seconds)
        _release_free_memory()
        return SegmentResult(
            job.row_id,
            job.index,
            job.frames,
            size,
            reused=False,
            node=_node_id(),
            seconds=clock.seconds,
            started_at=started,
            first_batch_at=first_batch_at,
        )

    def _render_frames(
        self,
        job: SegmentJob,
        features: np.ndarray,
        reader: FrameReader,
        writer: SegmentWriter,
        clock: metrics.StageClock,
        motion: np.ndarray,
        halves: list[np.ndarray | None] | None = None,
    ) -> tuple[int, float]:
        """Decode, render and encode in chunks, overlapped: while chunk k renders (on the GPU, or
        the main thread), chunk k+1 decodes and chunk k-1 encodes on two helper threads (PyAV and
        x264 release the GIL). At most three chunks are alive at once, so memory stays flat in the
        segment's length; chunks are encoded strictly in order. Returns (frames encoded, time.time()
        when the first chunk was rendered).

        With a yuv420p encoder (the default) frames stay I420 from decoder to encoder and only the
        face regions are converted to BGR for the renderer (`_render_regions`). Each frame's mouth
        change (`qa.mouth_change`) goes into `motion`."""
        i420 = writer.takes_i420

        def render(frames: list[np.ndarray], boxes: np.ndarray, feats: np.ndarray, srcs: list, lo: int) -> list:
            hi = lo + len(frames)
            if i420:
                return self._render_regions(frames, boxes, feats, srcs, motion[lo:hi], halves, lo)
            patches = qa.mouth_patches(frames, boxes)
            rendered = self.renderer.render(frames, boxes, feats, srcs)
            motion[lo:hi] = qa.mouth_change(patches, rendered, boxes)
            if halves is not None:
                halves[lo:hi] = qa.face_halves(rendered, boxes)
            return rendered

        write = writer.write_i420 if i420 else writer.write
        spans = pipeline_chunks(job.frames, self.renderer.batch_size)

        # which avatar frame each output frame shows: equal ids mean equal pixels, so a renderer may
        # reuse work done on a frame it has seen (a still, a clip that loops, a picture held for
        # several ticks); by content, not name: a presenter replaced at its URI between two rows is
        # another picture. A held avatar's ticks (`prepare._held`) are named by the timestamp of the
        # picture they show, so the ticks of one picture are one source
        avatar = job.avatar_fingerprint or job.avatar_uri
        if job.info.held:
            sources = [(avatar, int(job.pts[int(i) - job.pts_offset])) for i in job.avatar_frames]
        else:
            sources = [(avatar, int(i)) for i in job.avatar_frames]

        def decode(lo: int, hi: int) -> list[np.ndarray]:
            with clock("decode"):
                indices = [int(i) for i in job.avatar_frames[lo:hi]]
                decoded = reader.read(np.asarray(indices))
                # Renderers draw in place: a frame shown twice in the batch (a looping avatar turning
                # round) or a still image (one array for every frame) needs a copy per use; a video
                # frame shown once is handed over as decoded (a 1080p copy costs ~1 ms).
                frames, used = [], set()
                for i in indices:
                    frame = decoded[i]
                    frames.append(frame.copy() if job.info.still or i in used else frame)
                    used.add(i)
                return frames

        def encode(frames: list[np.ndarray]) -> None:
            with clock("encode"):
                for frame in frames:
                    write(frame)

        with (
            ThreadPoolExecutor(1, thread_name_prefix="decode") as decoder,
            ThreadPoolExecutor(1, thread_name_prefix="encode") as encoder,
        ):
            next_batch: Future = decoder.submit(decode, *spans[0])
            encoding: Future | None = None
            first_batch_at = 0.0
            for k, (lo, hi) in enumerate(spans):
                frames = next_batch.result()
                if k + 1 < len(spans):
                    next_batch = decoder.submit(decode, *spans[k + 1])
                with clock("render"):
                    rendered = render(frames, job.boxes[lo:hi], features[lo:hi], sources[lo:hi], lo)
                first_batch_at = first_batch_at or time.time()
                if encoding is not None:
                    encoding.result()  # keeps order and at most one batch waiting to encode
                encoding = encoder.submit(encode, rendered)
            if encoding is not None:
                encoding.result()
        with clock("encode"):
            return writer.close(), first_batch_at

    def _render_regions(
        self,
        frames: list[np.ndarray],
        boxes: np.ndarray,
        features: np.ndarray,
        sources: list[tuple[str, int]] | None = None,
        motion: np.ndarray | None = None,
        halves: list[np.ndarray | None] | None = None,
        first: int = 0,
    ) -> list[np.ndarray]:
        """Render I420 frames: each face region goes to the renderer as a BGR crop with its box
        moved into the crop, and comes back into the planes. Renderers change nothing outside the
        box, so the rest of the frame needs no conversion; a frame whose box is outside the picture
        is passed through. `motion`: where each frame's mouth change goes (NaN without a face);
        `halves`: where the lower half of each rendered face goes, from index `first` (for the
        lip-sync expert)."""
        width, height = i420_size(frames[0])
        found = {i: even_region(box, width, height) for i, box in enumerate(boxes)}
        regions = {i: region for i, region in found.items() if region is not None}
        keep = list(regions)
        if not keep:
            return frames
        crops = [region_to_bgr(frames[i], regions[i]) for i in keep]
        origins = np.array([regions[i][:2] * 2 for i in keep])  # (x1, y1, x1, y1) of each region
        moved = np.clip(boxes[keep], 0, [width, height, width, height]) - origins  # clipped as the regions were
        # a crop's pixels depend on its region too: rows sharing an avatar may bring other boxes
        kept_sources = None if sources is None else [(*sources[i], *regions[i]) for i in keep]
        patches = qa.mouth_patches(crops, moved) if motion is not None else []
        rendered = self.renderer.render(crops, moved, features[keep], kept_sources)
        if motion is not None:
            motion[keep] = qa.mouth_change(patches, rendered, moved)
        if halves is not None:
            for i, half in zip(keep, qa.face_halves(rendered, moved), strict=True):
                halves[first + i] = half
        for i, crop in zip(keep, rendered):
            paste_bgr(frames[i], regions[i], crop)
        return frames

    def _audio_window(self, job: SegmentJob, frames: np.ndarray) -> AudioWindow:
        context = int(AUDIO_CONTEXT_SECONDS * SAMPLE_RATE)
        start, stop = audio_span(int(frames[0]), int(frames[-1]), job.info.fps, SAMPLE_RATE, context, job.audio_samples)
        return AudioWindow(read_pcm(job.pcm_uri, start, stop), start, job.audio_samples, job.audio_level)


@contextlib.contextmanager
def _avatar_decoding(uri: str) -> Iterator[None]:
    """An avatar that stops decoding partway (cut short, damaged past its probe) is the row's input:
    failed at once, naming it, not tried again on every actor as a renderer's fault."""
    try:
        yield
    except AvatarDecodeError as exc:  # the reader's own: an encoder's failure is not the avatar's
        raise InputError("avatar", uri, f"cannot be decoded this far ({exc}): is it cut short or damaged?") from None


def pipeline_chunks(frames: int, batch_size: int) -> list[tuple[int, int]]:
    """(lo, hi) spans of a segment's frames for the decode/render/encode pipeline: at most the
    renderer's batch, and small enough that a segment has at least four chunks. With chunks as
    large as a GPU batch (128) a 5 s segment (125 frames) would be one chunk, and its decode,
    render and encode would run one after another instead of overlapping."""
    step = max(1, min(batch_size, math.ceil(frames / PIPELINE_DEPTH)))
    return [(lo, min(lo + step, frames)) for lo in range(0, frames, step)]


#: chunks a segment is cut into at least, so decode, render and encode overlap
PIPELINE_DEPTH = 4


def _release_free_memory() -> None:
    """Hand freed heap back to the OS after each segment. A long-lived actor allocates and frees
    hundreds of MB of frames per segment from several threads; glibc keeps the freed pages in
    per-thread arenas, so resident memory would creep up with the number of segments."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to do
        return None


_LIBC = _load_libc()


def _node_id() -> str:
    ray = sys.modules.get("ray")  # not imported here: segments also render without Ray (the GPU check kit)
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""
