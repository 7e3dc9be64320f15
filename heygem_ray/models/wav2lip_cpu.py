"""CPU inference forms of the Wav2Lip generator: conv units fused for fp32, and an int8 form.

Both are copies of a loaded `Wav2Lip` whose conv units are swapped; the network, its skips and
`decode(rows_from=...)` are unchanged. Their ops are oneDNN's, as torch.compile and the x86
quantization flow emit them on CPU, so a torch build may lack them: callers check a copy against
the original once before using it.

fp32, fused (`fuse_for_cpu`): BatchNorm folded into the conv weights, the ReLU (after a residual
unit's add) applied inside the same oneDNN convolution, so each big activation is written once
instead of four times (conv, BN, add, ReLU): ~1.25x on one core, outputs moved by float rounding.

int8 (`quantize_for_cpu`): the audio encoder and the decoder run their convolutions on 8-bit
integers (VNNI's vpdpbusd does 4x the multiply-adds of fp32 FMA per instruction). Weights are
quantized per output channel (symmetric int8); each activation per tensor and per call (uint8:
every quantized unit's input is a ReLU output, or a concatenation of them, so it is >= 0), from
the batch's own maximum: no calibration data, nothing to go stale when the checkpoint changes.
The stride-2 transposed convolutions become ordinary 2x2 convolutions with four outputs per
channel (one per output pixel phase) and a pixel shuffle, so they run int8 too. Kept fp32: the
face encoder (its skips are what the face cache keeps, and a still encodes its face once), the
first audio unit (the mel is signed), the 1x1 -> 3x3 transposed unit and the final 1x1 conv.
Since each activation's scale comes from the whole batch, a frame's output moves (within the
quantization error) with the other frames in its batch: the same segment rendered twice gives
the same bytes, a segment cut differently may not.
"""

from __future__ import annotations

import copy
import warnings
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


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight of a ConvTranspose2d(kernel 3, stride 2, padding 1, output_padding 1), (cin, cout,
    3, 3), as an ordinary 2x2 convolution's, (4 * cout, cin, 2, 2), over the input padded with one
    zero row below and one zero column right: output channel 4c + 2a + b is output channel c at the
    pixels (2i + a, 2j + b). Along each axis an even output pixel 2i takes input i through kernel
    tap 1; an odd one 2i + 1 takes input i through tap 2 and input i + 1 through tap 0."""
    cin, cout = weight.shape[:2]
    taps = {0: ((0, 1),), 1: ((0, 2), (1, 0))}  # phase -> ((input offset, kernel tap), ...)
    out = weight.new_zeros(cout, 2, 2, cin, 2, 2)
    for a in (0, 1):
        for b in (0, 1):
            for di, kr in taps[a]:
                for dj, kc in taps[b]:
                    out[:, a, b, :, di, dj] = weight[:, :, kr, kc].t()
    return out.reshape(4 * cout, cin, 2, 2)


def pixel_phases_to_image(y: torch.Tensor) -> torch.Tensor:
    """(N, 4C, H, W) with channel 4c + 2a + b holding pixel (2i + a, 2j + b) -> (N, C, 2H, 2W),
    channels-last: `F.pixel_shuffle(y, 2)` in one copy for a channels-last input."""
    n, c4, h, w = y.shape
    c = c4 // 4
    # channels-last memory is (N, H, W, C, a, b); the image's is (N, H, a, W, b, C)
    phases = y.permute(0, 2, 3, 1).reshape(n, h, w, c, 2, 2)
    image = phases.permute(0, 1, 4, 2, 5, 3).reshape(n, 2 * h, 2 * w, c)
    return image.permute(0, 3, 1, 2)


class Int8ConvUnit(nn.Module):
    """A ConvUnit (conv, or stride-2 transposed conv) run on int8 by oneDNN: weights per output
    channel, the input quantized per call from its own maximum (it must be >= 0), the output fp32
    with BatchNorm, bias, residual add and ReLU applied inside the convolution. A residual unit
    accumulates into its input, which must be a tensor nothing else reads (in the generator every
    residual unit's input is its predecessor's fresh output)."""

    def __init__(self, unit: ConvUnit):
        super().__init__()
        conv, weight, bias = _folded(unit)
        self.subpixel = isinstance(conv, nn.ConvTranspose2d)
        if self.subpixel:
            if (conv.kernel_size, conv.stride, conv.padding, conv.output_padding) != ((3, 3), (2, 2), (1, 1), (1, 1)):
                raise ValueError("only kernel 3, stride 2, padding 1, output padding 1 transposed units go int8")
            weight, bias = subpixel_weight(weight), bias.repeat_interleave(4)
            self.stride, self.padding, self.dilation = [1, 1], [0, 0], [1, 1]
        else:
            self.stride, self.padding, self.dilation = _ints(conv.stride), _ints(conv.padding), _ints(conv.dilation)
        self.residual = unit.residual
        with torch.no_grad():
            w_scale = (weight.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / 127).float()
            q = torch.round(weight / w_scale.view(-1, 1, 1, 1)).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("w_zero_point", torch.zeros(len(w_scale), dtype=torch.long))
        self.register_buffer("bias", bias.float().contiguous())
        # oneDNN's blocked layout: an opaque tensor, so an attribute rather than a buffer
        self.packed = torch.ops.onednn.qconv_prepack(
            q.contiguous(memory_format=torch.channels_last),
            w_scale,
            1.0,
            0,
            self.stride,
            self.padding,
            self.dilation,
            1,
            None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = float(x.amax())
        scale = peak / 255 if peak > 0 else 1.0
        q = _quantized_input(x, scale, pad=self.subpixel)
        onednn = torch.ops.onednn
        source = (q, scale, 0, self.packed, self.w_scale, self.w_zero_point)  # input and weights with their scales
        geometry = (self.stride, self.padding, self.dilation, 1)
        dequantized = (1.0, 0, torch.float32)  # output scale, zero point, dtype
        if self.residual:  # the sum post-op adds the input back (accumulating into it) before the ReLU
            accum = x.contiguous(memory_format=torch.channels_last)
            sum_relu: tuple[object, ...] = (1.0, 0, "sum", 1.0, "relu", [], "")
            return onednn.qconv2d_pointwise.binary(*source, accum, self.bias, *geometry, *dequantized, *sum_relu)
        y = onednn.qconv2d_pointwise(*source, self.bias, *geometry, *dequantized, "relu", [], "")
        return pixel_phases_to_image(y) if self.subpixel else y


def _quantized_input(x: torch.Tensor, scale: float, pad: bool) -> torch.Tensor:
    """x (>= 0, channels-last) as uint8 at `scale` (zero point 0), in one pass over x: torch's
    per-tensor quantizer (reading its quint8 result as uint8 costs nothing) is ~5x faster than
    scaling, rounding and casting with elementwise ops. With `pad`, one zero row below and one
    zero column right (zero is the zero point), as the subpixel form of a transposed unit needs."""
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


def _swap_units(module: nn.Module, make: type[nn.Module], keep: set[int]) -> None:
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
    only read (inference never writes weights)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo=shared).eval()


def fuse_for_cpu(model: ModelT) -> ModelT:
    """A copy of `model` with every ConvUnit replaced by a FusedConvUnit (the original is left as
    it is)."""
    fused = _structure_copy(model)
    _swap_units(fused, FusedConvUnit, set())
    return fused


def quantize_for_cpu(model: Wav2Lip) -> Wav2Lip:
    """A copy of `model` with its audio encoder and decoder on int8 (Int8ConvUnit) and the other
    conv units fused fp32 (see the module docstring for which stay fp32 and why)."""
    quantized = _structure_copy(model)
    first_audio = quantized.audio_encoder[0]
    one_to_three = cast(nn.Sequential, quantized.face_decoder_blocks[1])[0]  # the 1x1 -> 3x3 transposed unit
    keep = {id(first_audio), id(one_to_three)}
    _swap_units(quantized.audio_encoder, Int8ConvUnit, keep)
    _swap_units(quantized.face_decoder_blocks, Int8ConvUnit, keep)
    _swap_units(quantized.output_block, Int8ConvUnit, keep)
    _swap_units(quantized, FusedConvUnit, set())  # what is left: face encoder, the kept units
    return quantized
