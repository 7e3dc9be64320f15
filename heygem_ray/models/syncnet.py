"""The official lip-sync expert (`lipsync_expert.pth`, Wav2Lip's SyncNet_color), laid out so its
checkpoint loads with strict=True (keys: WAV2LIP_SPEC.md §7, `syncnet_state_dict.tsv`).

Face input: (B, 15, 48, 96), five frames' lower halves of the 96x96 face crops, BGR in [0, 1],
stacked on the channel axis: five consecutive frames of 25 fps video (0.2 s), as the expert was
trained on; at other rates the frames nearest those times (`window_offsets`). Audio input:
(B, 1, 80, 16), the 16-column mel window (0.2 s) that starts at the first of those frames. Both come out as L2-normalised 512-d embeddings; in sync,
they are close (the official training scores them by cosine similarity).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from heygem_ray.models.wav2lip import ConvUnit, _res, audio_encoder

#: frames per face window, and the lower half of a 96x96 crop it sees
WINDOW_FRAMES = 5
#: the frame rate the expert was trained at: its five frames span 0.2 s, as its mel window does
EXPERT_FPS = 25.0
FACE_ROWS = (48, 96)


class SyncNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.face_encoder = nn.Sequential(
            ConvUnit(15, 32, 7, 1, 3),
            ConvUnit(32, 64, 5, (1, 2), 1),
            *_res(64, 2),
            ConvUnit(64, 128, 3, 2, 1),
            *_res(128, 3),
            ConvUnit(128, 256, 3, 2, 1),
            *_res(256, 2),
            ConvUnit(256, 512, 3, 2, 1),
            *_res(512, 2),
            ConvUnit(512, 512, 3, 2, 1),
            ConvUnit(512, 512, 3, 1, 0),
            ConvUnit(512, 512, 1, 1, 0),
        )
        self.audio_encoder = audio_encoder(res_256=2)

    def forward(self, audio: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(audio embedding, face embedding), each (B, 512) and of unit length."""
        return self.embed_audio(audio), self.embed_faces(faces)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.audio_encoder(audio).flatten(1), p=2, dim=1)

    def embed_faces(self, faces: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.face_encoder(faces).flatten(1), p=2, dim=1)


def window_offsets(fps: float) -> tuple[int, ...]:
    """The frames of a face window, counted from its first: the frames nearest the expert's five
    at 25 fps. Consecutive at 25 fps; at 50 fps every other one, so the window spans the 0.2 s
    of speech its audio window holds (five consecutive frames at 50 fps would span 0.1 s)."""
    return tuple(int(k * fps / EXPERT_FPS + 0.5) for k in range(WINDOW_FRAMES))


def face_windows(halves: list[np.ndarray | None], fps: float = EXPERT_FPS) -> tuple[np.ndarray, np.ndarray]:
    """The expert's face inputs for every window (`window_offsets`) whose frames all have a face:
    (windows, 15, 48, 96) float32 BGR in [0, 1], and the first frame of each."""
    offsets = window_offsets(fps)
    starts = [t for t in range(len(halves) - offsets[-1]) if all(halves[t + k] is not None for k in offsets)]
    if not starts:
        return np.zeros((0, 3 * WINDOW_FRAMES, 48, 96), np.float32), np.zeros(0, np.int64)
    stacked = np.stack([np.concatenate([halves[t + k] for k in offsets], axis=2) for t in starts])
    return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2), np.float32) / 255.0, np.asarray(starts, np.int64)


@torch.inference_mode()
def embed(
    fn: Callable[[torch.Tensor], torch.Tensor], inputs: np.ndarray, device: torch.device, batch: int = 64
) -> np.ndarray:
    """`fn` (an embedding half of the expert) over `inputs` in batches: (n, 512) float32."""
    out = [
        fn(torch.from_numpy(inputs[i : i + batch]).to(device)).float().cpu().numpy()
        for i in range(0, len(inputs), batch)
    ]
    return np.concatenate(out) if out else np.zeros((0, 512), np.float32)


def load_expert(uri: str) -> tuple[SyncNet, torch.device, str]:
    """The lip-sync expert at `uri` on this process's device, and the fingerprint of its file's
    content, which names the embeddings it makes (`qa.syncnet_uri`): alike on every node whatever
    the file's times there, other for other weights at the same URI."""
    from heygem_ray import storage
    from heygem_ray.devices import exact_fp32, torch_device
    from heygem_ray.models.checkpoints import load_model

    # the copy of the pinned version (`storage.pinned_version`), whose content names the embeddings
    path = storage.local_copy(uri, content=storage.pinned_version(uri))
    # a local file's hash is memoised by its times; a node cache copy's times change with each use
    key = storage.local_fingerprint(path) if storage.is_local(uri) else storage.fingerprint(path)
    device = torch_device("auto")
    exact_fp32(device)  # the official expert's scores
    return load_model(SyncNet, uri, "SyncNet lip-sync expert").to(device), device, key
