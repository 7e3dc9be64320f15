"""Wav2Lip as a heygem_ray Renderer: official preprocessing and inference, optional feathered paste.

Steps 6-10 of WAV2LIP_SPEC.md §4: crop each (already padded) face box, stretch it to 96x96, mask
the lower half, feed [masked, unmasked] BGR/255 with the frame's mel window to the generator, turn
the output into uint8 by truncation, resize it back and paste it. The official paste is a hard
rectangle, which leaves a visible box seam (issues #410, #415); the default here blends the
generated lower face in through a soft mask that is zero at the box edges and over the upper face,
so the seam disappears and the eyes keep their original sharpness.

Two image paths do the crop, resize and paste around the generator:

- "cpu": OpenCV on the host, the official numerics (cv2.resize INTER_LINEAR on uint8).
  The reference, and the default off CUDA.
- "device": torch ops on the model's device, the default on CUDA. Only the box regions travel:
  they are packed into one (pinned) uint8 buffer, uploaded in a single non-blocking copy, resized
  to 96x96 with bilinear interpolation (align_corners=False, the same half-pixel sampling and
  edge clamping as cv2 INTER_LINEAR), fed to the generator, resized back per box, blended with the
  same feather mask (or pasted hard), and the finished regions come back in one download. Pixels
  outside the boxes are never read or written. Same-sized boxes are resized in one call.
  cv2 resizes uint8 with 11-bit fixed-point weights while torch interpolates in float32 (both
  results are rounded to whole levels here, as the official uint8 crop is), so individual pixels
  can differ by a level, the generator sees slightly different inputs, and the pasted face differs
  from the cpu path by about a level on average (tests/test_wav2lip_renderer.py states the bound).

On CUDA the renderer queues its work on a stream of its own. FFmpeg's NVDEC (the segment's decode
thread, same process, same context) copies each decoded frame to the host on the legacy default
stream and waits for it, and work on that stream also waits for all work on blocking streams:
with the renderer on the default stream too, every frame the decode thread brings back would
wait behind the batch being rendered, and decode and render, meant to overlap, would take turns.

Rows the paste never shows: the feather mask is zero over the upper face, so with blend="feather"
the decoder computes the generated face from row FEATHER_FIRST_ROW down only (`Wav2Lip.decode`'s
rows_from: ~20 % of the decoder's work saved); those rows are what a full decode gives, and the
rows above, which the mask hides, are zeros.

Face-encoder reuse: the generator's face encoder depends on the face crop alone, and a still image
(every frame) or a looped clip (every loop) sends the same crop through it again and again. When
render() is told where each frame's pixels come from (`sources`), the encoder's skip features are
kept per (source, clipped box) in an LRU bounded by bytes, and only crops not in it are encoded.
The output is bitwise the same as without reuse: the encoder runs on the same number of rows either
way (the batch's rows, or batch_size when compiled), the missing crops padded with zeros, so the
convolutions pick the same algorithms, and the decoder gets the skips in the same layout. At int8
each face is encoded alone either way, since an int8 unit scales by its whole call's maximum.

Precision "auto" (the default) runs bf16 autocast on CUDA (fp16 on GPUs without bf16) and on CPUs
where bf16 is faster than fp32 (AMX), int8 on other x86 CPUs with AVX2, fp32 elsewhere; fp32 on CUDA
turns TF32 off, so fp32 means the official numerics. fp32 on the CPU runs the generator with its
conv units fused (BatchNorm folded into the weights, ReLU and residual add as oneDNN post-ops: ~1.25x
on one core), which moves outputs by float rounding only (~1e-7; a truncated uint8 level differs at
~2 pixels in a million); `fuse=False` runs the plain modules. int8 runs the face and audio
encoders and the decoder on 8-bit integers (`models.wav2lip_cpu`: the decoder 1.4-2.7x the fused
fp32 rate, the most with VNNI) and stays ~43 dB from fp32 in the mouth region (the official test
vectors: max 0.078 of 1.0; bf16 on a GPU is off by up to ~0.18), ~3 dB less on CPUs without VNNI, whose
narrower integer ranges keep oneDNN's 16-bit pair sums from saturating; each renderer checks it
against fp32 on a probe at start and runs fp32 if it strays. The generator output is cleaned of
NaN/inf and clamped to [0, 1] before it becomes uint8.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from heygem_ray.config import BLENDS, IMAGE_OPS, PRECISIONS, Wav2LipRendererConfig
from heygem_ray.devices import cpu_bf16_is_faster, cpu_int8_is_faster, exact_fp32, torch_device
from heygem_ray.media.audio import AudioWindow
from heygem_ray.models.checkpoints import load_model
from heygem_ray.models.wav2lip import Wav2Lip
from heygem_ray.models.wav2lip_audio import mel_chunks
from heygem_ray.models.wav2lip_cpu import NARROW_RANGE, fuse_for_cpu, int8_range, quantize_for_cpu

log = logging.getLogger("heygem_ray.render.wav2lip")

FACE_SIZE = 96
# Feather mask, as fractions of the box: fully generated below MASK_FULL_FROM, original above
# MASK_ZERO_ABOVE, and a ramp of EDGE_RAMP of the width/height at the left, right and bottom edges.
MASK_ZERO_ABOVE = 0.45
MASK_FULL_FROM = 0.60
EDGE_RAMP = 0.12
#: the first row of the 96x96 generated face a feather paste can show: its mask is zero above
#: MASK_ZERO_ABOVE of the box, and the bilinear resize back to the box reads the source row at or
#: above (0.45 * 96 - 0.5 = 42.7, so rows 42 and 43 first); two rows of margin on top
FEATHER_FIRST_ROW = int(MASK_ZERO_ABOVE * FACE_SIZE) - 3
_DEVICE_MASKS = 64  # feather masks kept on the device, by box size
# batch_size=0 (auto). On CUDA large batches fill the GPU. On the CPU the generator gets *slower*
# per frame as the batch grows (activations fall out of the caches). Frames/s with one thread
# (2-core Xeon with AVX512-VNNI/BF16, no AMX; torch 2.13):
#   batch                4     8    16    32    64   128
#   fp32 generator    15.4  15.5  14.4  14.4     -  10.6
#   int8 decoder        65    60    58     -     -     -
# End to end on one core (the segment path: decode, int8 generator, paste, x264 on the same core)
# 8 is the best: a 12 s 720p row's whole command takes 9.7 s at 8, 9.9 at 6, 10.1 at 4 (the
# pipeline's chunks are the batch: smaller ones cost its helper threads more than the decoder
# gains), and 29.9 ms a frame at 16 against 27.7 at 8 before the decoder's phase split.
CPU_BATCH = 8
CUDA_BATCH = 128
_AMP_DTYPES = {"fp32": None, "int8": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class Wav2LipRenderer:
    """Renders mouths with the official Wav2Lip generator.

    checkpoint: URI of wav2lip.pth / wav2lip_gan.pth (training dict, bare state_dict or
                TorchScript), on any fsspec storage; fetched once per node.
    batch_size: frames per render() call and per generator forward pass; 0 (default) = auto:
                CPU_BATCH (8) on the CPU, CUDA_BATCH (the official 128) on CUDA.
    precision:  "auto" (default), "fp32", "int8", "fp16" or "bf16", resolved once into
                `self.precision`. auto: bf16 on CUDA (fp16 on GPUs without bf16) and on CPUs where
                bf16 is faster (AMX), int8 on other x86 CPUs (AVX2), else fp32. fp16/bf16 run under
                autocast; on CPU fp16 becomes fp32 (no fast CPU fp16 convolutions). int8 is CPU
                only (elsewhere it is what auto picks) and becomes fp32 if it fails its probe.
                fp32 on CUDA turns TF32 off for the process (official numerics).
    blend:      "feather" (default, seamless lower-face blend) or "hard" (the official rectangle).
    device:     "auto" (CUDA when this process may use a GPU, see heygem_ray.devices) or any torch
                device string.
    image_ops:  where crops, resizes and the paste run: "cpu" (OpenCV, the official numerics),
                "device" (torch on the model's device; within about a level of "cpu") or "auto"
                (device when the model is on CUDA, else cpu).
    compile:    torch.compile the generator's two halves (face encoder, audio encoder + decoder),
                batches padded to batch_size so each compiles once; if compiling fails, logs a
                warning and runs eager. `compile_now()` does the same later.
    face_cache_mb: MiB of face-encoder features kept for reuse across render() calls that
                pass `sources`; 0 disables reuse. A crop's features take ~1.1 MiB in fp32, half
                in bf16/fp16, on the model's device.
    threads:    caps inductor's compile worker pool (several actors compiling at once would each
                start one per core); 0 (default) leaves torch's setting.
    fuse:       on the CPU at fp32, run the generator with fused conv units (default True; see
                above); checked once against the plain generator, which is kept if they disagree.

    Boxes passed to render() must already carry the official pads (0, 10, 0, 0): the face track
    applies them, so this class never pads.
    """

    @classmethod
    def from_config(cls, cfg: Wav2LipRendererConfig, threads: int = 0) -> Wav2LipRenderer:
        # compile=auto compiles where it was measured to pay: nowhere yet (Wav2LipRendererConfig)
        return cls(
            cfg.checkpoint,
            batch_size=cfg.batch_size,
            precision=cfg.precision,
            blend=cfg.blend,
            device=cfg.device,
            image_ops=cfg.image_ops,
            compile=cfg.compile == "true",
            face_cache_mb=cfg.face_cache_mb,
            threads=threads,
        )

    def __init__(
        self,
        checkpoint: str,
        batch_size: int = 0,
        precision: str = "auto",
        blend: str = "feather",
        device: str = "auto",
        image_ops: str = "auto",
        compile: bool = False,
        face_cache_mb: float = 256,
        threads: int = 0,
        fuse: bool = True,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        if image_ops not in IMAGE_OPS:
            raise ValueError(f"image_ops must be one of {IMAGE_OPS}, got {image_ops!r}")
        if batch_size < 0:
            raise ValueError(f"batch_size must be positive (or 0 for auto), got {batch_size}")
        if face_cache_mb < 0:
            raise ValueError(f"face_cache_mb must be >= 0, got {face_cache_mb}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.device = torch_device(device)
        self.batch_size = batch_size or (CUDA_BATCH if self.device.type == "cuda" else CPU_BATCH)
        self.blend = blend
        if image_ops == "auto":
            image_ops = "device" if self.device.type == "cuda" else "cpu"
        self.image_ops = image_ops
        self.precision = resolve_precision(precision, self.device)
        log.info(
            "Wav2Lip generator on %s: precision %s (asked %s), batch %d",
            self.device,
            self.precision,
            precision,
            self.batch_size,
        )
        if self.precision == "fp32":  # the official numerics (autocast's convolutions are bf16/fp16)
            exact_fp32(self.device)
        self._amp_dtype = _AMP_DTYPES[self.precision]
        self._checkpoint = checkpoint
        self.model = plain = self._load_generator()
        self.fused = False
        if self.precision == "int8":
            self.model, self.precision = _int8_or_fp32(self.model)
            self.fused = self.precision == "fp32" and self.model is not plain
        elif fuse and self.device.type == "cpu" and self.precision == "fp32":
            self.model, self.fused = _fused_or_plain(self.model)
        self.threads = threads
        # the compiled halves; both None when running eager
        self._encode: Callable[..., list[torch.Tensor]] | None = None
        self._decode: Callable[..., torch.Tensor] | None = None
        self._compile_failed = False
        self._compiled_ran = False
        # the eager generator and whether it is fused, kept until compiled code has run
        self._eager_fallback: tuple[Wav2Lip, bool] | None = None
        self._face_cache: OrderedDict[Hashable, tuple[torch.Tensor, ...]] = OrderedDict()
        self._face_cache_bytes = 0
        self._face_cache_limit = int(face_cache_mb * 2**20)
        self._cache_lock = threading.Lock()
        self._pinned = self.device.type == "cuda"
        self._staging: dict[str, torch.Tensor] = {}
        self._masks: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()  # the staging buffers are shared between calls
        # a non-blocking stream: it does not wait for the default stream's work (see the module docstring)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if compile:
            self.compile_now()

    def _load_generator(self) -> Wav2Lip:
        model = load_model(Wav2Lip, self._checkpoint, "Wav2Lip generator")
        # Module.to takes memory_format (channels-last convolutions); its type stubs leave it out
        return model.to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]

    @property
    def compiled(self) -> bool:
        """Whether the generator runs through torch.compile (False after a fallback to eager)."""
        return self._encode is not None

    def compile_now(self) -> bool:
        """Turn on torch.compile for this renderer (`compile=True` calls it at construction);
        returns whether the generator is compiled. Idempotent: a
        compiled renderer stays as it is, and after a failed compile (here, in the constructor or
        on the first compiled call) it stays eager without trying again."""
        if self._encode is not None or self._compile_failed:
            return self.compiled
        if self.precision == "int8":
            log.warning("torch.compile does not apply to the int8 generator: running it eager")
            self._compile_failed = True
            return False
        if self.threads:
            _cap_compile_threads(self.threads)
        # inductor fuses on its own, from the plain modules; the fused ones stay the eager fallback
        plain = self._load_generator() if self.fused else self.model
        try:
            # two graphs, so the decoder can run on skips from the face cache; dynamic=False with
            # batches padded to batch_size: each compiles once
            encode = torch.compile(plain.encode_face, dynamic=False)
            decode = torch.compile(plain.decode, dynamic=False)
        except Exception as exc:  # noqa: BLE001 - any failure means: run eager
            log.warning("torch.compile of the Wav2Lip generator failed, running eager: %r", exc)
            self._compile_failed = True
            return False
        self._encode, self._decode = encode, decode
        self._eager_fallback = (self.model, self.fused)
        self.model, self.fused = plain, False
        self._clear_face_cache()  # features of the fused encoder: not bitwise the compiled one's
        return True

    def features(self, audio: AudioWindow, frames: np.ndarray, fps: float) -> np.ndarray:
        """(len(frames), 80, 16) float32 mel windows, as the official front end computes them."""
        return mel_chunks(audio, frames, fps)

    def render(
        self,
        frames: list[np.ndarray],
        boxes: np.ndarray,
        features: np.ndarray,
        sources: Sequence[Hashable] | None = None,
    ) -> list[np.ndarray]:
        """Re-render the mouth in each BGR frame (in place where writable); pixels outside each
        box are untouched, and a box with no area inside the frame leaves its frame unchanged.

        sources: optional id of each frame's pixels (equal ids = identical pixels); face-encoder
        features are then reused for a (source, box) seen before (see the module docstring)."""
        boxes = np.asarray(boxes).reshape(-1, 4).astype(np.int64)
        if not len(frames) == len(boxes) == len(features):
            raise ValueError(f"got {len(frames)} frames, {len(boxes)} boxes and {len(features)} feature rows")
        if sources is not None and len(sources) != len(frames):
            raise ValueError(f"got {len(frames)} frames and {len(sources)} sources")
        if not self._face_cache_limit:
            sources = None
        out = [frame if frame.flags.writeable else frame.copy() for frame in frames]
        batch = self._render_batch_device if self.image_ops == "device" else self._render_batch
        with self._own_stream():
            for lo in range(0, len(out), self.batch_size):
                hi = lo + self.batch_size
                batch(
                    out[lo:hi],
                    boxes[lo:hi],
                    np.asarray(features[lo:hi], dtype=np.float32),
                    None if sources is None else sources[lo:hi],
                )
        return out

    @contextlib.contextmanager
    def _own_stream(self) -> Iterator[None]:
        """On CUDA, this renderer's stream as the current one (per thread) for the block. It first
        waits for the default stream's queued work: the weights went to the GPU there, and a copy
        from pageable memory may still be in flight when `.to()` returns."""
        if self._stream is None:
            yield
            return
        self._stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.stream(self._stream):
            yield

    # -- cpu image path: OpenCV, the official numerics -------------------------------------------

    def _render_batch(
        self, frames: list[np.ndarray], boxes: np.ndarray, features: np.ndarray, sources: Sequence[Hashable] | None
    ) -> None:
        clipped = _clipped_boxes(frames, boxes)
        keep = list(clipped)
        if not keep:
            return
        crops = []
        for i in keep:
            x1, y1, x2, y2 = clipped[i]
            crops.append(cv2.resize(frames[i][y1:y2, x1:x2], (FACE_SIZE, FACE_SIZE)))
        keys: list[Hashable] | None = None if sources is None else [(sources[i], clipped[i]) for i in keep]
        for i, face in zip(keep, self._generate_cpu(np.stack(crops), features[keep], keys)):
            x1, y1, x2, y2 = clipped[i]
            pasted = cv2.resize(face, (x2 - x1, y2 - y1))
            region = frames[i][y1:y2, x1:x2]
            if self.blend == "hard":
                region[...] = pasted
            else:
                keep_weight, mask = _feather_weights(y2 - y1, x2 - x1)
                # one pass, rounded to nearest (numpy's float expression took 4x as long: ~1.9 ms
                # of a 720p frame's ~28); its weights sum to 1 + 1e-5, which moves a level rarely
                region[...] = cv2.blendLinear(region, pasted, keep_weight, mask)

    def _generate_cpu(self, crops: np.ndarray, mels: np.ndarray, keys: list[Hashable] | None) -> np.ndarray:
        """(B,96,96,3) uint8 BGR crops + (B,80,16) mels -> (B,96,96,3) uint8 generated faces."""
        with torch.inference_mode():
            face = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            mel = torch.from_numpy(mels).to(self.device)
            out = self._forward(mel, face, keys)
            # uint8 conversion truncates, like the official astype(np.uint8)
            return (out * 255.0).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    # -- device image path: torch on the model's device ------------------------------------------

    def _render_batch_device(
        self, frames: list[np.ndarray], boxes: np.ndarray, features: np.ndarray, sources: Sequence[Hashable] | None
    ) -> None:
        clipped = _clipped_boxes(frames, boxes)
        # same-sized boxes next to each other, so each size is resized in one call
        order = sorted(clipped, key=lambda i: (clipped[i][3] - clipped[i][1], clipped[i][2] - clipped[i][0]))
        if not order:
            return
        keys: list[Hashable] | None = None if sources is None else [(sources[i], clipped[i]) for i in order]
        shapes = [(clipped[i][3] - clipped[i][1], clipped[i][2] - clipped[i][0]) for i in order]
        offsets = np.cumsum([0] + [h * w * 3 for h, w in shapes]).tolist()
        groups: list[tuple[int, int, int, int]] = []  # (h, w, lo, hi) runs in `order`
        for k, (h, w) in enumerate(shapes):
            if groups and groups[-1][:2] == (h, w):
                groups[-1] = (h, w, groups[-1][2], k + 1)
            else:
                groups.append((h, w, k, k + 1))

        with self._lock, torch.inference_mode():
            host_in = self._host_buffer("in", offsets[-1])
            packed = host_in.numpy()
            for k, i in enumerate(order):
                x1, y1, x2, y2 = clipped[i]
                packed[offsets[k] : offsets[k + 1]].reshape(shapes[k] + (3,))[...] = frames[i][y1:y2, x1:x2]
            try:
                flat = host_in.to(self.device, non_blocking=True)
                mel = torch.from_numpy(features[order]).to(self.device, non_blocking=True)

                originals, crops = [], []
                for h, w, lo, hi in groups:
                    regions = torch.stack([flat[offsets[k] : offsets[k + 1]].view(h, w, 3) for k in range(lo, hi)])
                    original = regions.float()  # (n, h, w, 3)
                    originals.append(original)
                    # the official crop is uint8: round the float resize to whole levels as cv2 does
                    crops.append(_resize(original.permute(0, 3, 1, 2), FACE_SIZE, FACE_SIZE).round_())
                out = self._forward(mel, torch.cat(crops) / 255.0, keys)
                generated = (out * 255.0).trunc_()  # the official astype(np.uint8) truncates

                pieces = []
                for (h, w, lo, hi), original in zip(groups, originals):
                    pasted = _resize(generated[lo:hi], h, w).round_().permute(0, 2, 3, 1)  # (n, h, w, 3)
                    if self.blend == "feather":
                        mask, keep = self._device_mask(h, w)
                        pasted = (original * keep + pasted * mask).round_()
                    pieces.append(pasted.to(torch.uint8).reshape(-1))
                result = torch.cat(pieces)
                host_out = self._host_buffer("out", offsets[-1])
                host_out.copy_(result, non_blocking=True)
            finally:
                # also after an exception: a non-blocking upload may still be reading host_in,
                # which the next call would rewrite under it
                self._synchronize()
            done = host_out.numpy()
            for k, i in enumerate(order):
                x1, y1, x2, y2 = clipped[i]
                frames[i][y1:y2, x1:x2] = done[offsets[k] : offsets[k + 1]].reshape(shapes[k] + (3,))

    def _synchronize(self) -> None:
        """Wait for the current stream's queued work (the renderer's, inside `render`: the async
        copies from and to pinned buffers)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _host_buffer(self, name: str, size: int) -> torch.Tensor:
        """The first `size` bytes of a reusable host staging buffer (page-locked on CUDA, so the
        copies can run asynchronously)."""
        buf = self._staging.get(name)
        if buf is None or buf.numel() < size:
            buf = torch.empty(
                max(size, int(1.25 * (0 if buf is None else buf.numel()))), dtype=torch.uint8, pin_memory=self._pinned
            )
            self._staging[name] = buf
        return buf[:size]

    def _device_mask(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, 1 - mask) as (height, width, 1) float32 tensors on the device, cached by size."""
        key = (height, width)
        if key in self._masks:
            self._masks.move_to_end(key)
            return self._masks[key]
        # built on the device: a smoothed track changes box size nearly every frame, and a host-built
        # mask would cost a blocking upload each time
        mask = _feather_mask_torch(height, width, self.device)
        pair = (mask, 1.0 - mask)
        self._masks[key] = pair
        if len(self._masks) > _DEVICE_MASKS:
            self._masks.popitem(last=False)
        return pair

    # -- the generator, shared by both paths -----------------------------------------------------

    def _forward(self, mel: torch.Tensor, face: torch.Tensor, keys: list[Hashable] | None = None) -> torch.Tensor:
        """(B,80,16) mels + (B,3,96,96) BGR faces in [0, 1] -> (B,3,96,96) float32 generated faces,
        finite and in [0, 1]. `keys` (one per row, or None) names each face for the face cache."""
        amp = (
            torch.autocast(self.device.type, dtype=self._amp_dtype)
            if self._amp_dtype is not None
            else contextlib.nullcontext()
        )
        with amp:
            if not self.compiled:
                out = self._generate(mel, face, keys)
            else:
                try:
                    out = self._generate(mel, face, keys)
                except Exception as exc:  # a compile failure shows on the first call
                    if self._compiled_ran:  # it compiled and ran before: a real error, not a compile failure
                        raise
                    log.warning("torch.compile of the Wav2Lip generator failed, running eager: %r", exc)
                    self._encode = self._decode = None
                    self._compile_failed = True
                    if self._eager_fallback is not None:  # back to the (maybe fused) eager generator
                        self.model, self.fused = self._eager_fallback
                    self._eager_fallback = None
                    self._clear_face_cache()  # may hold features from the compiled encoder
                    out = self._generate(mel, face, keys)
                else:
                    self._compiled_ran = True
                    self._eager_fallback = None
        # fp16 can overflow to inf and a bad checkpoint can hold NaN; casting either to uint8 is
        # undefined, so the output is made finite and clamped first (NaN -> 0)
        return out.float().nan_to_num_(0.0, 1.0, 0.0).clamp_(0.0, 1.0)

    def _generate(self, mel: torch.Tensor, face: torch.Tensor, keys: list[Hashable] | None) -> torch.Tensor:
        n = face.shape[0]
        # one static shape when compiled: compile once, not once per tail batch
        rows = self.batch_size if self.compiled else n
        if keys is None:
            skips = self._encode_faces(face, rows)
        else:
            skips = self._cached_skips(face, keys, rows)
        decode = self._decode or self.model.decode
        # a feather paste never shows the generated rows above the mask: the decoder skips them
        rows_from = FEATHER_FIRST_ROW if self.blend == "feather" else 0
        return decode(_pad(mel.unsqueeze(1), rows), [_channels_last(_pad(s, rows)) for s in skips], rows_from)[:n]

    def _encode_faces(self, face: torch.Tensor, rows: int) -> list[torch.Tensor]:
        """Face-encoder skips of (m,3,96,96) faces, run on `rows` >= m rows (zero padding), so the
        encoder sees the same batch shape whether or not some faces came from the cache. At int8
        each face is encoded alone instead: an int8 unit scales its input by the whole call's
        maximum, so a face encoded beside others would get other skips than alone, and the cache's
        reuse would no longer be exact (one at a time: 2.9 ms a face on one core, against fp32's 5.7
        in batches of 8)."""
        masked = face.clone()
        masked[:, :, FACE_SIZE // 2 :] = 0  # the official input: [lower-half-masked, unmasked]
        faces = torch.cat((masked, face), dim=1)
        if self.precision == "int8":
            alone = [
                self.model.encode_face(faces[i : i + 1].contiguous(memory_format=torch.channels_last))
                for i in range(len(faces))
            ]
            return [torch.cat(level) for level in zip(*alone, strict=True)]
        faces = _pad(faces, rows).contiguous(memory_format=torch.channels_last)
        return (self._encode or self.model.encode_face)(faces)

    def _cached_skips(self, face: torch.Tensor, keys: list[Hashable], rows: int) -> list[torch.Tensor]:
        """The face encoder's skips for each row, from the cache where the key is there; the other
        faces (each distinct key once) are encoded and cached."""
        found: dict[Hashable, tuple[torch.Tensor, ...]] = {}
        with self._cache_lock:
            for key in keys:
                if key not in found and key in self._face_cache:
                    self._face_cache.move_to_end(key)
                    found[key] = self._face_cache[key]
        first_row: dict[Hashable, int] = {}
        for row, key in enumerate(keys):
            if key not in found:
                first_row.setdefault(key, row)
        if first_row:
            # copied without waiting for the GPU: a tensor made on it waits for the work before
            index = torch.tensor(list(first_row.values())).to(face.device, non_blocking=True)
            encoded = self._encode_faces(face[index], rows)
            fresh = {key: tuple(s[j].clone() for s in encoded) for j, key in enumerate(first_row)}
            found.update(fresh)
            self._cache_put(fresh)
        return [_stack_channels_last([found[key][level] for key in keys]) for level in range(len(found[keys[0]]))]

    def _cache_put(self, entries: dict[Hashable, tuple[torch.Tensor, ...]]) -> None:
        with self._cache_lock:
            for key, skips in entries.items():
                size = sum(s.numel() * s.element_size() for s in skips)
                if key in self._face_cache or size > self._face_cache_limit:
                    continue
                self._face_cache[key] = skips
                self._face_cache_bytes += size
            while self._face_cache_bytes > self._face_cache_limit:
                _, old = self._face_cache.popitem(last=False)
                self._face_cache_bytes -= sum(s.numel() * s.element_size() for s in old)

    def _clear_face_cache(self) -> None:
        with self._cache_lock:
            self._face_cache.clear()
            self._face_cache_bytes = 0


def _fused_or_plain(model: Wav2Lip) -> tuple[Wav2Lip, bool]:
    """The generator with its conv units fused for the CPU (`models.wav2lip_cpu.fuse_for_cpu`), when
    this torch build has oneDNN's fused ops and they agree with the plain model on a probe; else
    the plain model, with a warning. Returns (model, fused)."""
    mel, face = _probe_input()
    try:
        fused = fuse_for_cpu(model)
        with torch.inference_mode():
            diff = float((fused(mel, face) - model(mel, face)).abs().max())
    except Exception as exc:  # noqa: BLE001 - a build without the ops: run unfused
        log.warning("fused CPU convolutions are not available (%r): running the generator unfused", exc)
        return model, False
    if not diff <= FUSED_TOLERANCE:
        log.warning("fused CPU convolutions differ from the plain generator by %g: running unfused", diff)
        return model, False
    return fused, True


#: largest output difference (of 1.0) the fused CPU generator may show against the plain one on the
#: probe; float rounding gives ~1e-7, so anything near a level (1/255) means the fused ops are wrong
FUSED_TOLERANCE = 1e-4


def _int8_or_fp32(model: Wav2Lip) -> tuple[Wav2Lip, str]:
    """The generator with its encoders and decoder on int8 (`models.wav2lip_cpu`), when this
    torch build has oneDNN's int8 ops and the int8 generator stays within INT8_MIN_PROBE_PSNR_DB of
    the plain fp32 one on a probe, over the rows a feather paste shows; else the fp32 generator
    (`_fused_or_plain`), with a warning. Returns (model, precision)."""
    mel, face = _probe_input()
    try:
        int8 = quantize_for_cpu(model)
        with torch.inference_mode():
            want = model(mel, face)[:, :, FEATHER_FIRST_ROW:]
            got = int8(mel, face)[:, :, FEATHER_FIRST_ROW:]
    except Exception as exc:  # noqa: BLE001 - a build or CPU without the int8 ops: fp32
        log.warning("int8 CPU convolutions are not available (%r): running the generator at fp32", exc)
        return _fused_or_plain(model)[0], "fp32"
    mse = float(((got - want) ** 2).mean())
    psnr = 10 * np.log10(1.0 / mse) if mse > 0 else float("inf")
    if not psnr >= INT8_MIN_PROBE_PSNR_DB:
        log.warning(
            "the int8 generator is %.1f dB from fp32 on the probe (at least %g wanted): running fp32",
            psnr,
            INT8_MIN_PROBE_PSNR_DB,
        )
        return _fused_or_plain(model)[0], "fp32"
    if int8_range() == NARROW_RANGE:
        log.info(
            "this CPU's int8 kernels sum byte products in pairs into saturating 16-bit integers (no VNNI), "
            "so activations go to 0..%d and weights to +-%d (%.1f dB from fp32 on the probe)",
            NARROW_RANGE.activations,
            NARROW_RANGE.weights,
            psnr,
        )
    return int8, "int8"


#: the least PSNR (dB, outputs in [0, 1]) the int8 generator must keep against fp32 on the probe;
#: the recipe weights give ~40 dB (the official test vectors, too; ~38 dB at the narrowed ranges of
#: CPUs without VNNI), a wrong int8 op gives < 20
INT8_MIN_PROBE_PSNR_DB = 30.0


def _probe_input() -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed (mel, face) pair for the start-up checks of the CPU generator forms."""
    generator = torch.Generator().manual_seed(0)
    face = torch.rand(1, 6, FACE_SIZE, FACE_SIZE, generator=generator).contiguous(memory_format=torch.channels_last)
    return torch.randn(1, 1, 80, 16, generator=generator), face


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision the generator runs at on `device`: "auto" is bf16 on CUDA GPUs with bf16
    (compute capability 8.0+), fp16 on older ones, bf16 on CPUs where it is faster (AMX:
    `devices.cpu_bf16_is_faster`), int8 on other x86 CPUs (`devices.cpu_int8_is_faster`) and
    fp32 on the rest; fp16 on a CPU is fp32 (no fast CPU fp16 convolutions); int8 off the CPU is
    what auto picks there; anything else as asked."""
    if precision == "auto" or (precision == "int8" and device.type != "cpu"):
        if device.type == "cuda":
            return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
        if device.type != "cpu":
            return "fp32"
        if cpu_bf16_is_faster():
            return "bf16"
        return "int8" if cpu_int8_is_faster() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        return "fp32"
    return precision


def _cap_compile_threads(threads: int) -> None:
    """At most `threads` inductor compile workers (it defaults to one per core: several actors
    compiling at once would start that many each)."""
    from torch._inductor import config

    config.compile_threads = max(1, min(config.compile_threads or threads, threads))


def _pad(batch: torch.Tensor, rows: int) -> torch.Tensor:
    """`batch` with zero rows appended up to `rows`."""
    if batch.shape[0] >= rows:
        return batch
    return torch.cat((batch, batch.new_zeros((rows - batch.shape[0], *batch.shape[1:]))))


def _stack_channels_last(rows: list[torch.Tensor]) -> torch.Tensor:
    """(C, H, W) channels-last rows (a face cache's skips) stacked into one channels-last batch, in
    one plain copy. torch.stack's result is contiguous NCHW, which the decoder then copied again
    into channels-last with a transposing copy: ~0.5 ms a frame on one core."""
    return torch.stack([row.permute(1, 2, 0) for row in rows]).permute(0, 3, 1, 2)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x` with exactly torch's channels_last strides, copied only when they differ. The decoder
    gets skips straight from the encoder or stacked from the cache; a stride difference (even in
    the 1x1 level, where layouts are ambiguous) could change the convolution kernels and with them
    the last bits, and would make a compiled decoder recompile."""
    _, c, h, w = x.shape
    if x.stride() == (h * w * c, 1, w * c, c):
        return x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return out.copy_(x)


def _resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (n, c, h, w) float images: half-pixel centres and clamped edges like
    cv2.INTER_LINEAR, no antialiasing (cv2 has none either)."""
    if images.shape[-2:] == (height, width):
        return images.clone()
    return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)


def _clipped_boxes(frames: list[np.ndarray], boxes: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """Each frame's box clipped to the frame, by frame index, for the boxes with area left."""
    clipped = {i: _clip(box, frame.shape) for i, (frame, box) in enumerate(zip(frames, boxes))}
    return {i: box for i, box in clipped.items() if box is not None}


def _clip(box: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    height, width = shape[:2]
    x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
    x2, y2 = min(width, int(box[2])), min(height, int(box[3]))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def _feather_mask(height: int, width: int) -> np.ndarray:
    """(height, width) float32 weight of the generated face: 0 over the upper face and at the
    box edges, 1 over the mouth and jaw, smoothstep ramps in between."""
    v = (np.arange(height) + 0.5) / height
    u = (np.arange(width) + 0.5) / width
    rows = _ramp(v, MASK_ZERO_ABOVE, MASK_FULL_FROM) * _ramp(1.0 - v, 0.0, EDGE_RAMP)
    cols = _ramp(u, 0.0, EDGE_RAMP) * _ramp(1.0 - u, 0.0, EDGE_RAMP)
    return (rows[:, None] * cols[None, :]).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _feather_weights(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(1 - mask, mask) of `_feather_mask`, read-only: the weights of the original and the
    generated pixels in `cv2.blendLinear`."""
    mask = _feather_mask(height, width)
    weights = (1.0 - mask, mask)
    for w in weights:
        w.flags.writeable = False
    return weights


def _ramp(x: np.ndarray, zero_at: float, one_at: float) -> np.ndarray:
    t = np.clip((x - zero_at) / (one_at - zero_at), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _feather_mask_torch(height: int, width: int, device: torch.device) -> torch.Tensor:
    """`_feather_mask` computed with torch ops on `device`, as (height, width, 1) to broadcast over
    a region's channels (float32 rather than numpy's float64: equal to about 1e-7)."""
    v = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    u = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    rows = _ramp_torch(v, MASK_ZERO_ABOVE, MASK_FULL_FROM) * _ramp_torch(1.0 - v, 0.0, EDGE_RAMP)
    cols = _ramp_torch(u, 0.0, EDGE_RAMP) * _ramp_torch(1.0 - u, 0.0, EDGE_RAMP)
    return (rows[:, None] * cols[None, :])[:, :, None]


def _ramp_torch(x: torch.Tensor, zero_at: float, one_at: float) -> torch.Tensor:
    t = ((x - zero_at) / (one_at - zero_at)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)
