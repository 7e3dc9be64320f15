"""S3FD face detection with the official Wav2Lip pre- and post-processing (WAV2LIP_SPEC.md §6).

Boxes must match what the official `face_detection` package finds with the same weights, so the
quirks are kept on purpose: the BGR frame is flipped to RGB and then the *BGR* VGG means
(104, 117, 123) are subtracted in that order; NMS uses the "+1 pixel" area convention.

One deliberate difference in *how*, not *what*: the official code decodes every cell above 0.05,
runs NMS, then drops scores ≤ 0.5. Greedy NMS only lets a box be suppressed by a box that comes
before it in descending-score order, so the boxes above 0.5 come out of NMS the same whether or
not the lower ones were there. We therefore drop everything ≤ max(0.05, score_threshold) before
NMS, which gives identical detections and keeps NMS small.

The returned boxes are the raw decoded floats (not clipped, not truncated to int): choosing the
top box, clipping negatives to 0 and `int()` truncation are the tracker's job (§6 step 5).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import cv2
import numpy as np
import torch

from heygem_ray.config import DetectorConfig
from heygem_ray.devices import exact_fp32, torch_device
from heygem_ray.models.s3fd import S3FD, s3fd_expected_keys

log = logging.getLogger("heygem_ray")

__all__ = [
    "CANDIDATE_THRESHOLD",
    "MEAN_RGB",
    "NMS_THRESHOLD",
    "SCORE_THRESHOLD",
    "VARIANCES",
    "S3FDDetector",
    "decode_outputs",
    "detections_from_outputs",
    "nms",
    "preprocess",
    "s3fd_expected_keys",
]

#: subtracted from the RGB channels in this order (the VGG BGR means, applied to RGB: official)
MEAN_RGB = (104.0, 117.0, 123.0)
#: SSD box-regression variances (centre, size)
VARIANCES = (0.1, 0.2)
#: the official decode threshold on the face probability
CANDIDATE_THRESHOLD = 0.05
#: the official NMS IoU threshold (a box is suppressed when its IoU is strictly above it)
NMS_THRESHOLD = 0.3
#: the official final confidence filter (kept when strictly above it)
SCORE_THRESHOLD = 0.5

_EMPTY = np.zeros((0, 5), dtype=np.float32)


def preprocess(frames: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, H, W, 3) BGR uint8 → (N, 3, H, W) float32 on `device`: RGB minus MEAN_RGB, no scaling.

    The uint8 batch is uploaded as is and converted on the device, which moves 4× fewer bytes
    than the official float64 host-side subtraction and gives the same float32 values (uint8
    minus an integer is exact in float32).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (N, H, W, 3) uint8 BGR frames, got {frames.shape} {frames.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    x = x.flip(-1).permute(0, 3, 1, 2).float().contiguous()
    mean = torch.tensor(MEAN_RGB, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x - mean


def decode_outputs(outputs: list[torch.Tensor], threshold: float) -> list[np.ndarray]:
    """Candidate boxes per image from the twelve raw head outputs: (k, 5) float32 x1, y1, x2, y2,
    face probability, for every cell whose probability is strictly above `threshold`.

    Level i has stride s = 2**(i+2) and one square anchor per cell, centred at
    (s/2 + col·s, s/2 + row·s) with side 4s; regression is decoded with VARIANCES. Rows come in
    level order, then row-major cell order, like the official code. The work stays on the
    outputs' device; only the selected candidates are copied to the host.
    """
    batch = outputs[0].shape[0]
    rows: list[torch.Tensor] = []
    for level in range(len(outputs) // 2):
        cls, reg = outputs[2 * level], outputs[2 * level + 1]
        prob = torch.softmax(cls.float(), dim=1)[:, 1]
        n, r, c = torch.nonzero(prob > threshold, as_tuple=True)
        stride = 2 ** (level + 2)
        side = 4.0 * stride
        loc = reg.float()[n, :, r, c]
        cx = stride / 2 + c.float() * stride + loc[:, 0] * VARIANCES[0] * side
        cy = stride / 2 + r.float() * stride + loc[:, 1] * VARIANCES[0] * side
        w = side * torch.exp(loc[:, 2] * VARIANCES[1])
        h = side * torch.exp(loc[:, 3] * VARIANCES[1])
        x1, y1 = cx - w / 2, cy - h / 2
        rows.append(torch.stack([n.float(), x1, y1, x1 + w, y1 + h, prob[n, r, c]], dim=1))
    table = torch.cat(rows).cpu().numpy()
    image = table[:, 0].astype(np.int64)
    return [np.ascontiguousarray(table[image == i, 1:], dtype=np.float32) for i in range(batch)]


def nms(dets: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: indices of the boxes kept, highest score first.

    Areas and intersections use the official "+1 pixel" convention ((x2 − x1 + 1)·(y2 − y1 + 1)),
    and a box is suppressed when its IoU with a kept box is strictly above `iou_threshold`. Equal
    scores keep their input order (a stable sort), so results are reproducible. The official code
    sorts with numpy's unstable default over more candidates (it filters at 0.5 after NMS), so on
    exactly equal scores (a saturated softmax: 1.0 in float32) its first box may be another of the
    tied ones, a few pixels away.
    """
    if len(dets) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2, scores = (dets[:, j] for j in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def detections_from_outputs(
    outputs: list[torch.Tensor],
    score_threshold: float = SCORE_THRESHOLD,
    nms_threshold: float = NMS_THRESHOLD,
) -> list[np.ndarray]:
    """The official post-processing: per image, the (k, 5) float32 boxes above `score_threshold`
    that survive NMS, highest score first (so row 0 is the box the official code returns).

    Equivalent to decoding above CANDIDATE_THRESHOLD, NMS, then the score filter (see the module
    docstring for why filtering first changes nothing).
    """
    threshold = max(CANDIDATE_THRESHOLD, score_threshold)
    return [
        dets[nms(dets, nms_threshold)] if len(dets) else _EMPTY.copy() for dets in decode_outputs(outputs, threshold)
    ]


def _resolve_device(device: str | torch.device) -> torch.device:
    # "auto" follows the GPUs Ray assigned to this process, not every GPU torch can see: a
    # GPU-free detect task on a GPU node must stay on the CPU
    return device if isinstance(device, torch.device) else torch_device(device)


class S3FDDetector:
    """`FaceDetector` backed by S3FD with the official processing.

    model: an `S3FD` (used as given, moved to `device`) or a state_dict loaded strictly into a
    new one (strip any `module.` prefix before; the checkpoint loader does that).
    device: "auto" (CUDA when this process may use a GPU: one Ray assigned it inside Ray, any
    torch sees outside; see heygem_ray.devices) or a torch device.
    max_side: frames whose longer side exceeds it are detected on an area-downscaled copy and the
    boxes are scaled back to full resolution — full-HD S3FD costs ~1.3 TFLOP per frame (§6) and
    runs out of memory in the official batches; None detects at full resolution like the official
    code.
    """

    @classmethod
    def from_config(cls, cfg: DetectorConfig) -> S3FDDetector:
        if not cfg.checkpoint:
            raise ValueError("detector=s3fd needs detector.checkpoint=<URI of s3fd-619a316812.pth>")
        return load_s3fd_detector(cfg.checkpoint, device=cfg.device, max_side=cfg.max_side, batch_size=cfg.batch_size)

    def __init__(
        self,
        model: S3FD | Mapping[str, torch.Tensor],
        device: str | torch.device = "auto",
        max_side: int | None = 720,
        batch_size: int = 16,
        score_threshold: float = SCORE_THRESHOLD,
        nms_threshold: float = NMS_THRESHOLD,
    ):
        if max_side is not None and max_side < 1:
            raise ValueError(f"max_side must be positive or None, got {max_side}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = _resolve_device(device)
        exact_fp32(self.device)  # the official boxes
        if not isinstance(model, S3FD):
            net = S3FD()
            net.load_state_dict(dict(model), strict=True)
            model = net
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.max_side = max_side
        self.batch_size = batch_size
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold

    def reset(self) -> None:
        """Nothing to forget: each frame is detected on its own."""

    def detect(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """For each BGR uint8 frame, (k, 5) float32 x1, y1, x2, y2, score in the frame's own pixel
        coordinates, highest score first (k may be 0).

        Frames are run in chunks of at most `batch_size` consecutive frames of equal size, since
        one forward pass needs one input size.
        """
        results: list[np.ndarray] = []
        start = 0
        while start < len(frames):
            end = start + 1
            limit = min(len(frames), start + self.batch_size)
            while end < limit and frames[end].shape == frames[start].shape:
                end += 1
            results.extend(self._detect_same_size(frames[start:end]))
            start = end
        return results

    def _detect_same_size(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        height, width = frames[0].shape[:2]
        if self.max_side is not None and max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            frames = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]
            back = np.array([width / size[0], height / size[1]] * 2 + [1.0], dtype=np.float32)
        else:
            back = None
        dets = self._forward(frames)
        return dets if back is None else [d * back for d in dets]

    def _forward(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Detections for frames of one size. Out of GPU memory (a 720p batch of 16 takes ~11 GB,
        and tasks share the GPU), the batch is halved, for this call and the next, as the official
        code does; one frame that does not fit fails as it is."""
        try:
            with torch.inference_mode():
                outputs = self.model(preprocess(np.stack(frames), self.device))
                return detections_from_outputs(outputs, self.score_threshold, self.nms_threshold)
        except torch.cuda.OutOfMemoryError:
            if len(frames) == 1:
                raise
        if self.device.type == "cuda":  # the failed batch's blocks, back to the GPU (its tensors are gone)
            torch.cuda.empty_cache()
        self.batch_size = max(1, min(self.batch_size, len(frames) // 2))
        log.warning("S3FD out of GPU memory at %d frames a batch: %d from now", len(frames), self.batch_size)
        dets: list[np.ndarray] = []
        while len(dets) < len(frames):  # the batch size read each time: a smaller one may fail too
            dets += self._forward(frames[len(dets) : len(dets) + self.batch_size])
        return dets


def load_s3fd_detector(
    checkpoint: str, device: str = "auto", max_side: int | None = 720, batch_size: int = 16
) -> S3FDDetector:
    """The detector with the official weights (`s3fd-619a316812.pth`, a bare state_dict) from any
    fsspec URI, fetched once per node and loaded strictly with weights_only=True."""
    from heygem_ray.models.checkpoints import load_model

    return S3FDDetector(load_model(S3FD, checkpoint, "S3FD"), device=device, max_side=max_side, batch_size=batch_size)
