"""The S3FD face-detection network (WAV2LIP_SPEC.md §6), laid out so the official
`s3fd-619a316812.pth` bare state_dict loads with `strict=True`: every attribute name below is a
state_dict key prefix of that file, so renaming one breaks checkpoint compatibility.

The network only returns the raw head outputs; anchors, decoding and NMS live in
`heygem_ray.detect.s3fd` so they can be tested without a network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: (name, in_channels, out_channels) of the VGG16 trunk, in forward order; a 2×2 max-pool follows
#: the last convolution of each stage (…_2 for stages 1–2, …_3 for stages 3–5).
_TRUNK = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64),
    ("conv2_1", 64, 128), ("conv2_2", 128, 128),
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
    ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512),
    ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512),
)  # fmt: skip
_POOL_AFTER = {"conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"}

#: the six detection sources, in the official output order, with their channel counts
_SOURCES = (
    ("conv3_3_norm", 256),
    ("conv4_3_norm", 512),
    ("conv5_3_norm", 512),
    ("fc7", 1024),
    ("conv6_2", 512),
    ("conv7_2", 256),
)


class L2Norm(nn.Module):
    """Per-position channel L2 normalisation with a learned per-channel scale.

    The shallow VGG features have a much larger magnitude than the deep ones; normalising them
    before their heads is what the official weights were trained with.
    """

    def __init__(self, channels: int, scale: float, eps: float = 1e-10):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # eps is added to the norm (not inside the sqrt), as in the official layer
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return x / norm * self.weight.view(1, -1, 1, 1)


class S3FD(nn.Module):
    """S3FD: VGG16 trunk + extra layers + six (cls, reg) heads at strides 4…128.

    `forward` returns twelve tensors: for each level, the 2-channel class logits
    (background, face) and the 4-channel box regression, in the official order. The conv3_3
    class head has 4 channels whose first three are max-pooled into one background logit
    ("max-out background") inside `forward`, so every returned class map has 2 channels.
    """

    def __init__(self) -> None:
        super().__init__()
        for name, cin, cout in _TRUNK:
            setattr(self, name, nn.Conv2d(cin, cout, 3, padding=1))
        # fc6 uses padding 3 without dilation (the map grows by 4 px): official, keep it.
        self.fc6 = nn.Conv2d(512, 1024, 3, padding=3)
        self.fc7 = nn.Conv2d(1024, 1024, 1)
        self.conv6_1 = nn.Conv2d(1024, 256, 1)
        self.conv6_2 = nn.Conv2d(256, 512, 3, stride=2, padding=1)
        self.conv7_1 = nn.Conv2d(512, 128, 1)
        self.conv7_2 = nn.Conv2d(128, 256, 3, stride=2, padding=1)

        self.conv3_3_norm = L2Norm(256, 10.0)
        self.conv4_3_norm = L2Norm(512, 8.0)
        self.conv5_3_norm = L2Norm(512, 5.0)

        for name, channels in _SOURCES:
            cls_channels = 4 if name == "conv3_3_norm" else 2
            setattr(self, f"{name}_mbox_conf", nn.Conv2d(channels, cls_channels, 3, padding=1))
            setattr(self, f"{name}_mbox_loc", nn.Conv2d(channels, 4, 3, padding=1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (N, 3, H, W) float32, RGB minus (104, 117, 123) — see `heygem_ray.detect.s3fd`."""
        feats: dict[str, torch.Tensor] = {}
        h = x
        for name, _, _ in _TRUNK:
            h = F.relu(getattr(self, name)(h))
            if name in _POOL_AFTER:
                feats[name] = h
                h = F.max_pool2d(h, 2, 2)
        h = F.relu(self.fc6(h))
        h = F.relu(self.fc7(h))
        feats["fc7"] = h
        h = F.relu(self.conv6_1(h))
        h = F.relu(self.conv6_2(h))
        feats["conv6_2"] = h
        h = F.relu(self.conv7_1(h))
        h = F.relu(self.conv7_2(h))
        feats["conv7_2"] = h

        sources = {
            "conv3_3_norm": self.conv3_3_norm(feats["conv3_3"]),
            "conv4_3_norm": self.conv4_3_norm(feats["conv4_3"]),
            "conv5_3_norm": self.conv5_3_norm(feats["conv5_3"]),
            "fc7": feats["fc7"],
            "conv6_2": feats["conv6_2"],
            "conv7_2": feats["conv7_2"],
        }
        outputs: list[torch.Tensor] = []
        for name, _ in _SOURCES:
            cls = getattr(self, f"{name}_mbox_conf")(sources[name])
            if name == "conv3_3_norm":
                background = cls[:, 0:3].amax(dim=1, keepdim=True)
                cls = torch.cat([background, cls[:, 3:4]], dim=1)
            outputs.append(cls)
            outputs.append(getattr(self, f"{name}_mbox_loc")(sources[name]))
        return outputs


def s3fd_expected_keys() -> dict[str, tuple[int, ...]]:
    """Name → shape of every state_dict entry a loadable S3FD checkpoint must hold.

    Taken from an instantiated model (on the meta device, so nothing is allocated) rather than a
    hand-written table, so the checkpoint loader and the network cannot disagree.
    """
    with torch.device("meta"):
        model = S3FD()
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
