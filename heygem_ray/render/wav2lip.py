"""Wav2Lip as a heygem_ray Renderer: official preprocessing and inference, optional feathered paste.

Steps 6-10 of WAV2LIP_SPEC.md §4: crop each (already padded) face box, stretch it to 96x96, mask
the lower half, feed [masked, unmasked] BGR/255 with the frame's mel window to the generator, turn
the output into uint8 by truncation, resize it back and paste it. The official paste is a hard
rectangle, which leaves a visible box seam (issues #410, #415); the default here blends the
generated lower face in through a soft mask that is zero at the box edges and over the upper face,
so the seam disappears and the eyes keep their original sharpness.
"""

from __future__ import annotations

import contextlib
import functools

import cv2
import numpy as np
import torch

from heygem_ray.models.checkpoints import load_model
from heygem_ray.models.wav2lip import Wav2Lip
from heygem_ray.models.wav2lip_audio import mel_chunks
from heygem_ray.render.base import AudioWindow

FACE_SIZE = 96
PRECISIONS = ("fp32", "fp16", "bf16")
BLENDS = ("feather", "hard")
# Feather mask, as fractions of the box: fully generated below MASK_FULL_FROM, original above
# MASK_ZERO_ABOVE, and a ramp of EDGE_RAMP of the width/height at the left, right and bottom edges.
MASK_ZERO_ABOVE = 0.45
MASK_FULL_FROM = 0.60
EDGE_RAMP = 0.12


class Wav2LipRenderer:
    """Renders mouths with the official Wav2Lip generator.

    checkpoint: URI of wav2lip.pth / wav2lip_gan.pth (training dict, bare state_dict or
                TorchScript), on any fsspec storage; fetched once per node.
    batch_size: frames per render() call and per generator forward pass (official default 128).
    precision:  "fp32", "fp16" or "bf16". On CUDA fp16/bf16 run under autocast; on CPU fp16 falls
                back to fp32 (no fast CPU fp16 convolutions) and bf16 uses CPU autocast.
    blend:      "feather" (default, seamless lower-face blend) or "hard" (the official rectangle).
    device:     "auto" (CUDA when available, else CPU) or any torch device string.

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
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.blend = blend
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self._amp_dtype = _autocast_dtype(precision, self.device)
        model = load_model(Wav2Lip(), checkpoint, "Wav2Lip generator")
        self.model = model.to(self.device, memory_format=torch.channels_last)

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
        for lo in range(0, len(out), self.batch_size):
            hi = lo + self.batch_size
            self._render_batch(out[lo:hi], boxes[lo:hi], np.asarray(features[lo:hi], dtype=np.float32))
        return out

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
        amp = (
            torch.autocast(self.device.type, dtype=self._amp_dtype)
            if self._amp_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), amp:
            face = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            masked = face.clone()
            masked[:, :, FACE_SIZE // 2 :] = 0
            faces = torch.cat((masked, face), dim=1).contiguous(memory_format=torch.channels_last)
            mel = torch.from_numpy(mels).to(self.device).unsqueeze(1)
            out = self.model(mel, faces)
            # uint8 conversion truncates, like the official astype(np.uint8)
            return (out.float() * 255.0).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


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
