"""The Wav2Lip generator, laid out so the official checkpoints load with strict=True.

Module names, order and shapes follow WAV2LIP_SPEC.md §7: the state_dict is exactly the official
one (352 keys), so `wav2lip.pth` / `wav2lip_gan.pth` and their TorchScript re-exports load as is.
The network takes a 16-column mel window (B, 1, 80, 16) and a 6-channel face (B, 6, 96, 96):
[lower-half-masked crop, unmasked crop], BGR in [0, 1], and returns the re-rendered BGR face
(B, 3, 96, 96) in [0, 1]. `forward` is `decode(audio, encode_face(faces))`: the face encoder half
can run on its own, so its output can be reused for a face crop seen before. The CPU inference
forms (fused fp32, int8) are in `models.wav2lip_cpu`.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvUnit(nn.Module):
    """Conv (or transposed conv) + BatchNorm + ReLU; a residual unit adds its input before the ReLU.

    The checkpoint keys live under `conv_block.0` (conv) and `conv_block.1` (BN), so the layers sit
    in a Sequential with that name.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int | tuple[int, int],
        padding: int,
        residual: bool = False,
        transpose: bool = False,
        output_padding: int = 0,
    ):
        super().__init__()
        if transpose:
            conv: nn.Module = nn.ConvTranspose2d(cin, cout, kernel, stride, padding, output_padding)
        else:
            conv = nn.Conv2d(cin, cout, kernel, stride, padding)
        self.conv_block = nn.Sequential(conv, nn.BatchNorm2d(cout))
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


def _res(ch: int, n: int) -> list[ConvUnit]:
    """`n` residual 3x3 units at `ch` channels (shape-preserving)."""
    return [ConvUnit(ch, ch, 3, 1, 1, residual=True) for _ in range(n)]


def audio_encoder(res_256: int) -> nn.Sequential:
    """The mel window (B, 1, 80, 16) to a (B, 512, 1, 1) embedding; the generator's has one residual
    unit at 256 channels, the lip-sync expert's two (so their checkpoint keys differ)."""
    return nn.Sequential(
        ConvUnit(1, 32, 3, 1, 1),
        *_res(32, 2),
        ConvUnit(32, 64, 3, (3, 1), 1),
        *_res(64, 2),
        ConvUnit(64, 128, 3, 3, 1),
        *_res(128, 2),
        ConvUnit(128, 256, 3, (3, 2), 1),
        *_res(256, res_256),
        ConvUnit(256, 512, 3, 1, 0),
        ConvUnit(512, 512, 1, 1, 0),
    )


def _up(cin: int, cout: int, n_res: int) -> nn.Sequential:
    """A decoder stage: stride-2 transposed conv doubling H and W, then `n_res` residual units."""
    return nn.Sequential(ConvUnit(cin, cout, 3, 2, 1, transpose=True, output_padding=1), *_res(cout, n_res))


class Wav2Lip(nn.Module):
    """The official generator: face U-Net encoder, audio encoder, decoder fed with skip features."""

    def __init__(self) -> None:
        super().__init__()
        self.face_encoder_blocks = nn.ModuleList(
            [
                nn.Sequential(ConvUnit(6, 16, 7, 1, 3)),  # 96
                nn.Sequential(ConvUnit(16, 32, 3, 2, 1), *_res(32, 2)),  # 48
                nn.Sequential(ConvUnit(32, 64, 3, 2, 1), *_res(64, 3)),  # 24
                nn.Sequential(ConvUnit(64, 128, 3, 2, 1), *_res(128, 2)),  # 12
                nn.Sequential(ConvUnit(128, 256, 3, 2, 1), *_res(256, 2)),  # 6
                nn.Sequential(ConvUnit(256, 512, 3, 2, 1), *_res(512, 1)),  # 3
                nn.Sequential(ConvUnit(512, 512, 3, 1, 0), ConvUnit(512, 512, 1, 1, 0)),  # 1
            ]
        )
        self.audio_encoder = audio_encoder(res_256=1)
        self.face_decoder_blocks = nn.ModuleList(
            [
                nn.Sequential(ConvUnit(512, 512, 1, 1, 0)),  # 1
                nn.Sequential(ConvUnit(1024, 512, 3, 1, 0, transpose=True), *_res(512, 1)),  # 3
                _up(1024, 512, 2),  # 6
                _up(768, 384, 2),  # 12
                _up(512, 256, 2),  # 24
                _up(320, 128, 2),  # 48
                _up(160, 64, 2),  # 96
            ]
        )
        self.output_block = nn.Sequential(ConvUnit(80, 32, 3, 1, 1), nn.Conv2d(32, 3, 1, 1, 0), nn.Sigmoid())

    def forward(self, audio: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """audio (B,1,80,16) + faces (B,6,96,96) -> (B,3,96,96); or the training-time 5-D form
        audio (B,T,1,80,16) + faces (B,6,T,96,96) -> (B,3,T,96,96), time folded into the batch
        time-major as the official model does."""
        if faces.dim() == 5:
            batch, steps = faces.shape[0], faces.shape[2]
            audio = torch.cat([audio[:, t] for t in range(steps)], dim=0)
            faces = torch.cat([faces[:, :, t] for t in range(steps)], dim=0)
            out = self._forward4(audio, faces)
            return torch.stack(torch.split(out, batch, dim=0), dim=2)
        return self._forward4(audio, faces)

    def _forward4(self, audio: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        return self.decode(audio, self.encode_face(faces))

    def encode_face(self, faces: torch.Tensor) -> list[torch.Tensor]:
        """faces (B,6,96,96) -> the face encoder's skip features, finest first: (B,16,96,96),
        (B,32,48,48), ..., (B,512,1,1). They depend on the face alone (the CPU's int8 form only when
        each face is encoded alone: it scales by the whole batch's maximum), so a renderer may keep
        them for a face crop it sees again (a still image, a looped clip) and skip this half. The
        faces are images in [0, 1]."""
        skips = []
        x = faces
        for block in self.face_encoder_blocks:
            x = block(x)
            skips.append(x)
        return skips

    def decode(self, audio: torch.Tensor, skips: list[torch.Tensor], rows_from: int = 0) -> torch.Tensor:
        """audio (B,1,80,16) + `encode_face` skips -> (B,3,96,96): the audio encoder, then the
        decoder fed with the skips coarsest first. `skips` is not modified.

        rows_from > 0: only output rows rows_from..95 are wanted (a paste that keeps the lower face
        only). The decoder then drops the top rows of its 24x24 stage and every stage after it, where
        most of its work is: from 24x24 on, each row of the output depends on a few rows above it
        (two transposed convs double the rows, five 3x3 convs reach one row each), so dropping
        stage row s keeps output rows 4s+9 on exactly what the full decoder computes. The rows
        above come back as zeros. Keeping rows 40..95 saves ~20 % of the decoder."""
        x = self.audio_encoder(audio)
        drop = max(0, (rows_from - 9) // 4)  # rows of the 24x24 stage whose outputs are not wanted
        for block, skip in zip(self.face_decoder_blocks, reversed(skips)):
            size = skip.shape[2]
            if drop and size > 24:
                skip = skip[:, :, drop * size // 24 :]
            x = torch.cat((block(x), skip), dim=1)
            if drop and size == 24:
                x = x[:, :, drop:].contiguous(memory_format=torch.channels_last)
        out = self.output_block(x)
        if drop:
            out = torch.cat((out.new_zeros((*out.shape[:2], 4 * drop, out.shape[3])), out), dim=2)
        return out
