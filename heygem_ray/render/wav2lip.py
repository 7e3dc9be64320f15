"""Wav2Lip as a heygem_ray Renderer: official preprocessing and inference, optional feathered paste.

Steps 6-10 of WAV2LIP_SPEC.md §4: crop each (already padded) face box, stretch it to 96x96, mask
the lower half, feed [masked, unmasked] BGR/255 with the frame's mel window to the generator, turn
the output into uint8 by truncation, resize it back and paste it. The official paste is a hard
rectangle, which leaves a visible box seam (issues #410, #415); the default here blends the
generated lower face in through a soft mask that is zero at the box edges and over the upper face,
so the seam disappears and the eyes keep their original sharpness.

Two image paths do the crop, resize and paste around the generator:

- "cpu": OpenCV on the host, exactly the official numerics (cv2.resize INTER_LINEAR on uint8).
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
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections import OrderedDict

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from heygem_ray.models.checkpoints import load_model
from heygem_ray.models.wav2lip import Wav2Lip
from heygem_ray.models.wav2lip_audio import mel_chunks
from heygem_ray.render.base import AudioWindow

log = logging.getLogger("heygem_ray.render.wav2lip")

FACE_SIZE = 96
PRECISIONS = ("fp32", "fp16", "bf16")
BLENDS = ("feather", "hard")
IMAGE_OPS = ("auto", "cpu", "device")
# Feather mask, as fractions of the box: fully generated below MASK_FULL_FROM, original above
# MASK_ZERO_ABOVE, and a ramp of EDGE_RAMP of the width/height at the left, right and bottom edges.
MASK_ZERO_ABOVE = 0.45
MASK_FULL_FROM = 0.60
EDGE_RAMP = 0.12
_DEVICE_MASKS = 64  # feather masks kept on the device, by box size


class Wav2LipRenderer:
    """Renders mouths with the official Wav2Lip generator.

    checkpoint: URI of wav2lip.pth / wav2lip_gan.pth (training dict, bare state_dict or
                TorchScript), on any fsspec storage; fetched once per node.
    batch_size: frames per render() call and per generator forward pass (official default 128).
    precision:  "fp32", "fp16" or "bf16". On CUDA fp16/bf16 run under autocast; on CPU fp16 falls
                back to fp32 (no fast CPU fp16 convolutions) and bf16 uses CPU autocast.
    blend:      "feather" (default, seamless lower-face blend) or "hard" (the official rectangle).
    device:     "auto" (CUDA when available, else CPU) or any torch device string.
    image_ops:  where crops, resizes and the paste run: "cpu" (OpenCV, the official numerics),
                "device" (torch on the model's device; within about a level of "cpu") or "auto"
                (device when the model is on CUDA, else cpu).
    compile:    torch.compile the generator (batches are padded to batch_size so it compiles
                once); if compiling fails, logs a warning and runs eager.

    Boxes passed to render() must already carry the official pads (0, 10, 0, 0): the face track
    applies them, so this class never pads.
    """

    def __init__(
        self,
        checkpoint: str,
        batch_size: int = 128,
        precision: str = "fp32",
        blend: str = "feather",
        device: str = "auto",
        image_ops: str = "auto",
        compile: bool = False,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        if image_ops not in IMAGE_OPS:
            raise ValueError(f"image_ops must be one of {IMAGE_OPS}, got {image_ops!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.blend = blend
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if image_ops == "auto":
            image_ops = "device" if self.device.type == "cuda" else "cpu"
        self.image_ops = image_ops
        self._amp_dtype = _autocast_dtype(precision, self.device)
        model = load_model(Wav2Lip(), checkpoint, "Wav2Lip generator")
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self._compiled: torch.nn.Module | None = None
        self._compiled_ran = False
        if compile:
            try:
                self._compiled = torch.compile(self.model, dynamic=False)
            except Exception as exc:  # noqa: BLE001 - any failure means: run eager
                log.warning("torch.compile of the Wav2Lip generator failed, running eager: %r", exc)
        self._pinned = self.device.type == "cuda"
        self._staging: dict[str, torch.Tensor] = {}
        self._masks: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()  # the staging buffers are shared between calls

    @property
    def compiled(self) -> bool:
        """Whether the generator runs through torch.compile (False after a fallback to eager)."""
        return self._compiled is not None

    def features(self, audio: AudioWindow, frames: np.ndarray, fps: float) -> np.ndarray:
        """(len(frames), 80, 16) float32 mel windows, as the official front end computes them."""
        return mel_chunks(audio, frames, fps)

    def render(self, frames: list[np.ndarray], boxes: np.ndarray, features: np.ndarray) -> list[np.ndarray]:
        """Re-render the mouth in each BGR frame (in place where writable); pixels outside each
        box are untouched, and a box with no area inside the frame leaves its frame unchanged."""
        boxes = np.asarray(boxes).reshape(-1, 4).astype(np.int64)
        if not len(frames) == len(boxes) == len(features):
            raise ValueError(f"got {len(frames)} frames, {len(boxes)} boxes and {len(features)} feature rows")
        out = [frame if frame.flags.writeable else frame.copy() for frame in frames]
        batch = self._render_batch_device if self.image_ops == "device" else self._render_batch
        for lo in range(0, len(out), self.batch_size):
            hi = lo + self.batch_size
            batch(out[lo:hi], boxes[lo:hi], np.asarray(features[lo:hi], dtype=np.float32))
        return out

    # -- cpu image path: OpenCV, the official numerics -------------------------------------------

    def _render_batch(self, frames: list[np.ndarray], boxes: np.ndarray, features: np.ndarray) -> None:
        clipped = [_clip(box, frame.shape) for frame, box in zip(frames, boxes)]
        keep = [i for i, box in enumerate(clipped) if box is not None]
        if not keep:
            return
        crops = []
        for i in keep:
            x1, y1, x2, y2 = clipped[i]
            crops.append(cv2.resize(frames[i][y1:y2, x1:x2], (FACE_SIZE, FACE_SIZE)))
        for i, face in zip(keep, self._generate(np.stack(crops), features[keep])):
            x1, y1, x2, y2 = clipped[i]
            pasted = cv2.resize(face, (x2 - x1, y2 - y1))
            region = frames[i][y1:y2, x1:x2]
            if self.blend == "hard":
                region[...] = pasted
            else:
                mask = _feather_mask(y2 - y1, x2 - x1)
                region[...] = np.rint(region * (1.0 - mask) + pasted * mask).astype(np.uint8)

    def _generate(self, crops: np.ndarray, mels: np.ndarray) -> np.ndarray:
        """(B,96,96,3) uint8 BGR crops + (B,80,16) mels -> (B,96,96,3) uint8 generated faces."""
        with torch.inference_mode():
            face = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            mel = torch.from_numpy(mels).to(self.device)
            out = self._forward(mel, face)
            # uint8 conversion truncates, like the official astype(np.uint8)
            return (out.float() * 255.0).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    # -- device image path: torch on the model's device ------------------------------------------

    def _render_batch_device(self, frames: list[np.ndarray], boxes: np.ndarray, features: np.ndarray) -> None:
        clipped = [_clip(box, frame.shape) for frame, box in zip(frames, boxes)]
        # same-sized boxes next to each other, so each size is resized in one call
        order = sorted((i for i, box in enumerate(clipped) if box is not None),
                       key=lambda i: (clipped[i][3] - clipped[i][1], clipped[i][2] - clipped[i][0]))
        if not order:
            return
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
            flat = host_in.to(self.device, non_blocking=True)
            mel = torch.from_numpy(features[order]).to(self.device, non_blocking=True)

            originals, crops = [], []
            for h, w, lo, hi in groups:
                regions = torch.stack([flat[offsets[k] : offsets[k + 1]].view(h, w, 3) for k in range(lo, hi)])
                original = regions.float()  # (n, h, w, 3)
                originals.append(original)
                # the official crop is uint8: round the float resize to whole levels as cv2 does
                crops.append(_resize(original.permute(0, 3, 1, 2), FACE_SIZE, FACE_SIZE).round_())
            out = self._forward(mel, torch.cat(crops) / 255.0)
            generated = (out.float() * 255.0).trunc_()  # the official astype(np.uint8) truncates

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
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            done = host_out.numpy()
            for k, i in enumerate(order):
                x1, y1, x2, y2 = clipped[i]
                frames[i][y1:y2, x1:x2] = done[offsets[k] : offsets[k + 1]].reshape(shapes[k] + (3,))

    def _host_buffer(self, name: str, size: int) -> torch.Tensor:
        """The first `size` bytes of a reusable host staging buffer (page-locked on CUDA, so the
        copies can run asynchronously)."""
        buf = self._staging.get(name)
        if buf is None or buf.numel() < size:
            buf = torch.empty(max(size, int(1.25 * (0 if buf is None else buf.numel()))), dtype=torch.uint8,
                              pin_memory=self._pinned)
            self._staging[name] = buf
        return buf[:size]

    def _device_mask(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, 1 - mask) as (height, width, 1) float32 tensors on the device, cached by size."""
        key = (height, width)
        if key in self._masks:
            self._masks.move_to_end(key)
            return self._masks[key]
        mask = _feather_mask(height, width)
        pair = (torch.tensor(mask, device=self.device), torch.tensor(1.0 - mask, device=self.device))
        self._masks[key] = pair
        if len(self._masks) > _DEVICE_MASKS:
            self._masks.popitem(last=False)
        return pair

    # -- the generator, shared by both paths -----------------------------------------------------

    def _forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        """(B,80,16) mels + (B,3,96,96) BGR faces in [0, 1] -> (B,3,96,96) generated faces in [0, 1]
        (autocast dtype under fp16/bf16). Builds the official [lower-half-masked, unmasked] input."""
        masked = face.clone()
        masked[:, :, FACE_SIZE // 2 :] = 0
        faces = torch.cat((masked, face), dim=1).contiguous(memory_format=torch.channels_last)
        mel = mel.unsqueeze(1)
        n = faces.shape[0]
        amp = (
            torch.autocast(self.device.type, dtype=self._amp_dtype)
            if self._amp_dtype is not None
            else contextlib.nullcontext()
        )
        with amp:
            if self._compiled is None:
                return self.model(mel, faces)
            if n < self.batch_size:  # one static shape: compile once, not once per tail batch
                faces = torch.cat((faces, faces.new_zeros((self.batch_size - n, *faces.shape[1:])))).contiguous(
                    memory_format=torch.channels_last)
                mel = torch.cat((mel, mel.new_zeros((self.batch_size - n, *mel.shape[1:]))))
            try:
                out = self._compiled(mel, faces)
            except Exception as exc:  # noqa: BLE001
                if self._compiled_ran:  # it compiled and ran before: a real error, not a compile failure
                    raise
                log.warning("torch.compile of the Wav2Lip generator failed, running eager: %r", exc)
                self._compiled = None
                out = self.model(mel, faces)
            else:
                self._compiled_ran = True
            return out[:n]


def _resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (n, c, h, w) float images: half-pixel centres and clamped edges like
    cv2.INTER_LINEAR, no antialiasing (cv2 has none either)."""
    if images.shape[-2:] == (height, width):
        return images.clone()
    return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16" and device.type == "cuda":
        return torch.float16
    return None


def _clip(box: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    height, width = shape[:2]
    x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
    x2, y2 = min(width, int(box[2])), min(height, int(box[3]))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


@functools.lru_cache(maxsize=64)
def _feather_mask(height: int, width: int) -> np.ndarray:
    """(height, width, 1) float32 weight of the generated face: 0 over the upper face and at the
    box edges, 1 over the mouth and jaw, smoothstep ramps in between."""
    v = (np.arange(height) + 0.5) / height
    u = (np.arange(width) + 0.5) / width
    rows = _ramp(v, MASK_ZERO_ABOVE, MASK_FULL_FROM) * _ramp(1.0 - v, 0.0, EDGE_RAMP)
    cols = _ramp(u, 0.0, EDGE_RAMP) * _ramp(1.0 - u, 0.0, EDGE_RAMP)
    mask = (rows[:, None] * cols[None, :]).astype(np.float32)[:, :, None]
    mask.flags.writeable = False
    return mask


def _ramp(x: np.ndarray, zero_at: float, one_at: float) -> np.ndarray:
    t = np.clip((x - zero_at) / (one_at - zero_at), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)
