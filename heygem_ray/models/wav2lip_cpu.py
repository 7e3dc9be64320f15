"""CPU inference forms of the Wav2Lip generator: conv units fused for fp32, and an int8 form.

Both are copies of a loaded `Wav2Lip` whose conv units are swapped; the network, its skips and
`decode(rows_from=...)` are unchanged. Their ops are oneDNN's, as torch.compile and the x86
quantization flow emit them on CPU, so a torch build may lack them: callers check a copy against
the original once before using it.

fp32, fused (`fuse_for_cpu`): BatchNorm folded into the conv weights, the ReLU (after a residual
unit's add) applied inside the same oneDNN convolution, so each big activation is written once
instead of four times (conv, BN, add, ReLU): ~1.25x on one core, outputs moved by float rounding.

int8 (`quantize_for_cpu`): the face encoder, the audio encoder and the decoder run their
convolutions on 8-bit integers (VNNI's vpdpbusd does 4x the multiply-adds of fp32 FMA per
instruction). Weights are quantized per output channel (symmetric int8); each activation per
tensor and per call (uint8: every quantized unit's input is a ReLU output, a concatenation of
them, or the face images in [0, 1], so it is >= 0), from
the batch's own maximum: no calibration data, nothing to go stale when the checkpoint changes.
Where the CPU has no VNNI, oneDNN multiplies bytes with vpmaddubsw, which adds each pair of
products into a saturating 16-bit integer: the full ranges would clip, so there both ranges are
narrowed so that no pair can; whether to narrow is found by running the worst case once per
process (`int8_range`).
Each stride-2 transposed convolution becomes four ordinary convolutions, one per output pixel
phase (1x1, 1x2, 2x1 and 2x2: only the kernel taps that reach that phase), whose outputs are
interleaved into the image, so they run int8 too. Kept fp32: the first audio unit (the mel is
signed), the 1x1 -> 3x3 transposed unit and the final 1x1 conv. The face encoder's input is two
images in [0, 1], so it quantizes from its first unit (one face at a time, as the renderer runs
it: 2.9 ms a face against fused fp32's 5.7 in batches of 8, one core; 0.3 dB further from the
official vectors, each face encoded alone).
Since each activation's scale comes from the whole batch, a frame's output moves (within the
quantization error) with the other frames in its batch: the same segment rendered twice gives
the same bytes, a segment cut differently may not. (The renderer encodes faces one at a time, so
the face encoder's skips, which its face cache keeps, depend on the face alone.)
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
from torch import nn

from heygem_ray.models.wav2lip import ConvUnit, Wav2Lip

# quint8 tensors are deprecated, but torch's per-tensor quantizer is still the fast way to uint8
# here (`_quantized_input`); should a release drop it, the int8 start-up check fails and the
# generator runs fp32 (render.wav2lip._int8_or_fp32)
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)

ModelT = TypeVar("ModelT", bound=nn.Module)


def _folded(unit: ConvUnit) -> tuple[nn.Conv2d | nn.ConvTranspose2d, torch.Tensor, torch.Tensor]:
    """(conv, weight, bias) of `unit` with its BatchNorm folded into the conv."""
    conv, bn = unit.conv_block[0], unit.conv_block[1]
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d))
    assert bn.running_mean is not None and bn.running_var is not None  # tracked: the checkpoint holds them
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        # output channels are dim 0 of a conv's weight and dim 1 of a transposed conv's
        shape = (1, -1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else (-1, 1, 1, 1)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        return conv, conv.weight * scale.view(shape), (bias - bn.running_mean) * scale + bn.bias


def _ints(values: str | tuple[int, ...]) -> list[int]:
    """A conv's stride, padding or dilation as a list (never the string forms: the generator has none)."""
    assert not isinstance(values, str)
    return list(values)


class FusedConvUnit(nn.Module):
    """A ConvUnit for fp32 inference on the CPU: BatchNorm folded in, ReLU and residual add as
    oneDNN post-ops."""

    matrix: torch.Tensor
    matrix_bias: torch.Tensor

    def __init__(self, unit: ConvUnit):
        super().__init__()
        conv, weight, bias = _folded(unit)
        self.transpose = isinstance(conv, nn.ConvTranspose2d)
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", bias)
        self.padding, self.stride, self.dilation = _ints(conv.padding), _ints(conv.stride), _ints(conv.dilation)
        self.output_padding = _ints(conv.output_padding) if self.transpose else []
        self.residual = unit.residual
        # A transposed conv without padding on a 1x1 input (the decoder's 1x1 -> 3x3 unit) is a
        # matrix product: each output pixel is the input vector times one kernel tap. oneDNN's
        # transposed conv takes ~1.6 ms per frame for it, the product ~0.1 ms.
        self.as_matmul = (
            self.transpose and self.padding == [0, 0] and self.stride == [1, 1] and self.output_padding == [0, 0]
        )
        if self.as_matmul:
            cin, cout, kh, kw = weight.shape
            self.register_buffer("matrix", weight.reshape(cin, cout * kh * kw).contiguous())
            self.register_buffer("matrix_bias", bias.repeat_interleave(kh * kw))
            self.tap_shape = (cout, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mkldnn = torch.ops.mkldnn
        if self.as_matmul and x.shape[2:] == (1, 1):
            out = torch.addmm(self.matrix_bias, x.flatten(1), self.matrix).relu_()
            return out.view(-1, *self.tap_shape).contiguous(memory_format=torch.channels_last)
        if self.transpose:
            return mkldnn._convolution_transpose_pointwise(
                x,
                self.weight,
                self.bias,
                self.padding,
                self.output_padding,
                self.stride,
                self.dilation,
                1,
                "relu",
                [],
                "",
            )
        if self.residual:
            return mkldnn._convolution_pointwise.binary(
                x, x, self.weight, self.bias, self.padding, self.stride, self.dilation, 1, "add", 1.0, "relu", [], ""
            )
        return mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, 1, "relu", [], ""
        )


#: the taps of a transposed conv (kernel 3, stride 2, padding 1, output padding 1) that reach
#: each output pixel phase, along one axis: phase -> ((input offset, kernel tap), ...). An even
#: output pixel 2i takes input i through tap 1; an odd one 2i + 1 input i through tap 2 and
#: input i + 1 through tap 0.
_PHASE_TAPS = {0: ((0, 1),), 1: ((0, 2), (1, 0))}


def phase_weights(weight: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """The weight of a ConvTranspose2d(kernel 3, stride 2, padding 1, output_padding 1), (cin, cout,
    3, 3), as four ordinary convolutions' (cout, cin, kh, kw), one per output pixel phase (a, b):
    run over the input padded with one zero row below and one zero column right, phase (a, b)'s
    output at (i, j) is the transposed conv's at (2i + a, 2j + b). Each holds only the taps that
    reach its phase (1, 2, 2 and 4 of them): a single 2x2 convolution with all four phases as
    output channels multiplies 16 taps per pixel, 7 of them zero (~1.6x the time)."""
    phases = {}
    for a, rows in _PHASE_TAPS.items():
        for b, cols in _PHASE_TAPS.items():
            out = weight.new_empty(weight.shape[1], weight.shape[0], len(rows), len(cols))
            for di, kr in rows:
                for dj, kc in cols:
                    out[:, :, di, dj] = weight[:, :, kr, kc].t()
            phases[a, b] = out
    return phases


@dataclass(frozen=True)
class Int8Range:
    """The integers int8 convolutions quantize to: activations 0..activations (uint8), weights
    -weights..weights (int8)."""

    activations: int
    weights: int


#: the whole of uint8 and int8: exact where the CPU sums byte products in 32 bits (VNNI, AMX)
FULL_RANGE = Int8Range(255, 127)
#: ranges whose pairs of products fit a saturating int16 (2 * 180 * 91 = 32,760 <= 32,767), for
#: CPUs without VNNI. Splitting the lost bit between the two keeps the most: on the official test
#: vectors (face encoder still fp32 then) 37.8 dB from the reference, against 40.8 at the full
#: ranges, 37.4 with 6-bit weights and 36.6 with 7-bit activations; with the face encoder on int8
#: too, 37.3 against 40.4
NARROW_RANGE = Int8Range(180, 91)


@functools.lru_cache(maxsize=1)
def int8_range() -> Int8Range:
    """FULL_RANGE where this process's int8 convolutions sum byte products exactly, else
    NARROW_RANGE: asked of the kernels oneDNN really dispatches (`sums_exactly`), so an
    `ONEDNN_MAX_CPU_ISA` limit or a hypervisor's CPU flags count, not a guess from /proc/cpuinfo."""
    return FULL_RANGE if sums_exactly(FULL_RANGE) else NARROW_RANGE


#: (input channels, kernel size) of the convolutions `sums_exactly` runs: a decoder unit's 3x3 and
#: a transposed unit's largest phase
_PROBE_SHAPES = ((64, 3), (512, 2))


def sums_exactly(levels: Int8Range) -> bool:
    """Whether int8 convolutions shaped like the generator's (`_PROBE_SHAPES`) give the exact sum
    for the worst case at `levels`: every input and weight at its largest."""
    for channels, size in _PROBE_SHAPES:
        conv = _packed_int8(torch.ones(16, channels, size, size), [1, 1], [0, 0], [1, 1], levels)
        q = torch.full((1, channels, 4, 4), levels.activations, dtype=torch.uint8)
        out = _qconv_relu(q.contiguous(memory_format=torch.channels_last), 1.0, conv, torch.zeros(16))
        exact = levels.activations * channels * size * size
        if abs(float(out[0, 0, 0, 0]) - exact) >= 1e-4 * exact:
            return False
    return True


@dataclass(frozen=True)
class _Packed:
    """One int8 convolution's packed weights (an opaque oneDNN tensor), their per-channel scales
    and zero points, and its geometry."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    stride: list[int]
    padding: list[int]
    dilation: list[int]


def _packed_int8(
    weight: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int], levels: Int8Range
) -> _Packed:
    """`weight` (cout, cin, kh, kw) quantized per output channel (symmetric, to +-levels.weights)
    and packed in oneDNN's blocked layout, with its scales and zero points."""
    top = levels.weights
    with torch.no_grad():
        scale = (weight.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / top).float()
        q = torch.round(weight / scale.view(-1, 1, 1, 1)).clamp_(-top, top).to(torch.int8)
    packed = torch.ops.onednn.qconv_prepack(
        q.contiguous(memory_format=torch.channels_last), scale, 1.0, 0, stride, padding, dilation, 1, None
    )
    return _Packed(packed, scale, torch.zeros(len(scale), dtype=torch.long), stride, padding, dilation)


class Int8ConvUnit(nn.Module):
    """A ConvUnit (conv, or stride-2 transposed conv) run on int8 by oneDNN: weights per output
    channel, the input quantized per call from its own maximum (it must be >= 0), the output fp32
    with BatchNorm, bias, residual add and ReLU applied inside the convolution. A residual unit
    accumulates into its input, which must be a tensor nothing else reads (in the generator every
    residual unit's input is its predecessor's fresh output). A transposed unit runs as one
    convolution per output pixel phase (`phase_weights`). `levels`: the integer ranges it
    quantizes to (default `int8_range()`)."""

    bias: torch.Tensor

    def __init__(self, unit: ConvUnit, levels: Int8Range | None = None):
        super().__init__()
        conv, weight, bias = _folded(unit)
        self.levels = levels if levels is not None else int8_range()
        self.residual = unit.residual
        self.register_buffer("bias", bias.float().contiguous())
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        # oneDNN's packed weights are opaque tensors: attributes rather than buffers. A transposed
        # unit's by output pixel phase, a plain conv's as the one phase (0, 0).
        self.convs: dict[tuple[int, int], _Packed]
        if self.transposed:
            if (conv.kernel_size, conv.stride, conv.padding, conv.output_padding) != ((3, 3), (2, 2), (1, 1), (1, 1)):
                raise ValueError("only kernel 3, stride 2, padding 1, output padding 1 transposed units go int8")
            self.convs = {
                ab: _packed_int8(w, [1, 1], [0, 0], [1, 1], self.levels) for ab, w in phase_weights(weight).items()
            }
        else:
            geometry = (_ints(conv.stride), _ints(conv.padding), _ints(conv.dilation))
            self.convs = {(0, 0): _packed_int8(weight, *geometry, self.levels)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = float(x.amax())
        scale = peak / self.levels.activations if peak > 0 else 1.0
        q = _quantized_input(x, scale, pad=self.transposed)
        if self.transposed:
            return self._transposed(q, scale, x.shape)
        conv = self.convs[0, 0]
        if not self.residual:
            return _qconv_relu(q, scale, conv, self.bias)
        # the sum post-op adds the input back (accumulating into it) before the ReLU
        return torch.ops.onednn.qconv2d_pointwise.binary(
            *(q, scale, 0, conv.weight, conv.scale, conv.zero_point),  # input and weights, with their scales
            x.contiguous(memory_format=torch.channels_last),  # the accumulator
            self.bias,
            *(conv.stride, conv.padding, conv.dilation, 1),
            *(1.0, 0, torch.float32),  # output scale, zero point, dtype
            *(1.0, 0, "sum", 1.0, "relu", [], ""),
        )

    def _transposed(self, q: torch.Tensor, scale: float, shape: torch.Size) -> torch.Tensor:
        """The transposed conv of the padded uint8 input `q`, (N, C, 2H, 2W) channels-last: each
        phase's convolution, written into its pixels of the image."""
        n, _, h, w = shape
        c = len(self.bias)
        image = torch.empty((n, 2 * h, 2 * w, c))  # channels-last memory of (N, C, 2H, 2W)
        pixels = image.view(n, h, 2, w, 2, c)  # [:, i, a, j, b] is pixel (2i + a, 2j + b)
        for (a, b), conv in self.convs.items():
            y = _qconv_relu(q, scale, conv, self.bias)
            # a phase with a one-tap axis sees the padding row or column too: one output more there
            pixels[:, :, a, :, b].copy_(y.permute(0, 2, 3, 1)[:, :h, :w])
        return image.permute(0, 3, 1, 2)


def _qconv_relu(q: torch.Tensor, scale: float, conv: _Packed, bias: torch.Tensor) -> torch.Tensor:
    """relu(conv(q) + bias), fp32 out, for uint8 `q` at `scale` (zero point 0)."""
    return torch.ops.onednn.qconv2d_pointwise(
        *(q, scale, 0, conv.weight, conv.scale, conv.zero_point, bias),
        *(conv.stride, conv.padding, conv.dilation, 1),
        *(1.0, 0, torch.float32, "relu", [], ""),  # output scale, zero point and dtype; post-op
    )


def _quantized_input(x: torch.Tensor, scale: float, pad: bool) -> torch.Tensor:
    """x (>= 0, channels-last) as uint8 at `scale` (zero point 0), in one pass over x: torch's
    per-tensor quantizer (reading its quint8 result as uint8 costs nothing) is ~5x faster than
    scaling, rounding and casting with elementwise ops. With `pad`, one zero row below and one
    zero column right (zero is the zero point), as a transposed unit's phase convolutions need."""
    x = x.contiguous(memory_format=torch.channels_last)
    quint8 = torch.quantize_per_tensor(x, scale, 0, torch.quint8)
    # a plain uint8 tensor over the same bytes: oneDNN's ops take uint8, not quint8
    q = torch.empty(0, dtype=torch.uint8).set_(quint8.untyped_storage(), 0, quint8.shape, quint8.stride())
    if not pad:
        return q
    n, c, h, w = x.shape
    padded = torch.empty((n, c, h + 1, w + 1), dtype=torch.uint8, memory_format=torch.channels_last)
    padded[:, :, h].zero_()
    padded[:, :, :h, w].zero_()
    padded[:, :, :h, :w].copy_(q)
    return padded


def _swap_units(module: nn.Module, make: Callable[[ConvUnit], nn.Module], keep: set[int]) -> None:
    """Replace every ConvUnit under `module` (but those whose id is in `keep`) with make(unit)."""
    for name, child in module.named_children():
        if isinstance(child, ConvUnit):
            if id(child) not in keep:
                setattr(module, name, make(child))
        else:
            _swap_units(child, make, keep)


def _structure_copy(model: ModelT) -> ModelT:
    """A copy of `model`'s modules, in eval mode, sharing its parameters and buffers: the conv
    units are then swapped for new ones with weights of their own, so copying every weight first
    (36 M of them, ~0.15 s of each renderer's start) would be thrown away; what stays shared is
    only read (inference never writes weights). The Parameter objects themselves are shared: a
    later `.to()` or `.half()` of the source model would change the copy too."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo=shared).eval()


def fuse_for_cpu(model: ModelT) -> ModelT:
    """A copy of `model` with every ConvUnit replaced by a FusedConvUnit (the original is left as
    it is)."""
    fused = _structure_copy(model)
    _swap_units(fused, FusedConvUnit, set())
    return fused


def quantize_for_cpu(model: Wav2Lip, levels: Int8Range | None = None) -> Wav2Lip:
    """A copy of `model` with its encoders and decoder on int8 (Int8ConvUnit, quantized to
    `levels`, by default `int8_range()`) and the other conv units fused fp32 (see the module
    docstring for which stay fp32 and why)."""
    levels = levels if levels is not None else int8_range()
    quantized = _structure_copy(model)
    first_audio = quantized.audio_encoder[0]
    one_to_three = cast(nn.Sequential, quantized.face_decoder_blocks[1])[0]  # the 1x1 -> 3x3 transposed unit
    keep = {id(first_audio), id(one_to_three)}
    int8 = functools.partial(Int8ConvUnit, levels=levels)
    _swap_units(quantized.face_encoder_blocks, int8, keep)
    _swap_units(quantized.audio_encoder, int8, keep)
    _swap_units(quantized.face_decoder_blocks, int8, keep)
    _swap_units(quantized.output_block, int8, keep)
    _swap_units(quantized, FusedConvUnit, set())  # what is left: the kept units
    return quantized
