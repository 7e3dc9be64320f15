"""The generator re-implementation against the official one (reference outputs of the official code)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from heygem_ray.models.wav2lip import Wav2Lip
from heygem_ray.models.wav2lip_cpu import FULL_RANGE, NARROW_RANGE
from recipe_weights import read_keys, recipe_state_dict

DATA = Path(__file__).parent / "data"
KEYS = read_keys(DATA / "wav2lip_state_dict.tsv")
REF = np.load(DATA / "wav2lip_reference.npz")


@pytest.fixture(scope="module")
def model() -> Wav2Lip:
    net = Wav2Lip()
    net.load_state_dict(recipe_state_dict(KEYS, seed=0), strict=True)
    return net.eval()


def test_state_dict_layout_is_the_official_one():
    state = Wav2Lip().state_dict()
    assert [(name, tuple(t.shape)) for name, t in state.items()] == KEYS
    assert len(state) == 352
    assert sum(p.numel() for p in Wav2Lip().parameters()) == 36_298_035


def test_4d_output_matches_official(model):
    with torch.inference_mode():
        out = model(torch.from_numpy(REF["mel"]), torch.from_numpy(REF["faces"]))
    assert out.shape == (4, 3, 96, 96)
    np.testing.assert_allclose(out.numpy(), REF["output"], rtol=0, atol=1e-4)


def test_5d_output_matches_official(model):
    with torch.inference_mode():
        out = model(torch.from_numpy(REF["mel5"]), torch.from_numpy(REF["faces5"]))
    assert out.shape == (1, 3, 5, 96, 96)
    np.testing.assert_allclose(out.numpy(), REF["output5"], rtol=0, atol=1e-4)


def test_audio_path_matters(model):
    """Guards the comparison itself: with these weights the mel visibly moves the output."""
    with torch.inference_mode():
        silent = model(torch.zeros_like(torch.from_numpy(REF["mel"])), torch.from_numpy(REF["faces"]))
    assert np.abs(silent.numpy() - REF["output"]).max() > 0.05


def test_channels_last_gives_the_same_numbers(model):
    net = Wav2Lip()
    net.load_state_dict(model.state_dict())
    net = net.eval().to(memory_format=torch.channels_last)
    faces = torch.from_numpy(REF["faces"]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = net(torch.from_numpy(REF["mel"]), faces)
    np.testing.assert_allclose(out.numpy(), REF["output"], rtol=0, atol=1e-4)


def test_encoder_and_decoder_halves_are_the_forward(model):
    faces, mel = torch.from_numpy(REF["faces"]), torch.from_numpy(REF["mel"])
    with torch.inference_mode():
        skips = model.encode_face(faces)
        shapes = [tuple(s.shape) for s in skips]
        out = model.decode(mel, skips)
        assert torch.equal(out, model(mel, faces))
        assert torch.equal(model.decode(mel, skips), out)  # decode leaves the skips as they were
    assert shapes == [
        (4, 16, 96, 96),
        (4, 32, 48, 48),
        (4, 64, 24, 24),
        (4, 128, 12, 12),
        (4, 256, 6, 6),
        (4, 512, 3, 3),
        (4, 512, 1, 1),
    ]
    assert len(skips) == 7


def test_fused_cpu_generator_matches_the_official_reference(model):
    """Conv units fused for the CPU (BatchNorm folded, ReLU and residual add as oneDNN post-ops)
    give the official outputs to the same tolerance as the plain modules, and leave the model alone."""
    from heygem_ray.models.wav2lip import ConvUnit
    from heygem_ray.models.wav2lip_cpu import FusedConvUnit, fuse_for_cpu

    fused = fuse_for_cpu(model.to(memory_format=torch.channels_last))
    assert not any(isinstance(m, ConvUnit) for m in fused.modules())
    assert (
        sum(isinstance(m, FusedConvUnit) for m in fused.modules())
        == sum(isinstance(m, ConvUnit) for m in model.modules())
        > 0
    )
    faces = torch.from_numpy(REF["faces"]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = fused(torch.from_numpy(REF["mel"]), faces)
        plain = model(torch.from_numpy(REF["mel"]), faces)
    np.testing.assert_allclose(out.numpy(), REF["output"], rtol=0, atol=1e-4)
    assert float((out - plain).abs().max()) < 1e-5  # float rounding, not a different network


@pytest.mark.parametrize("fused", [False, True])
def test_decoding_only_the_lower_rows_gives_those_rows_exactly(model, fused):
    """decode(rows_from=r) skips the decoder's work above row r: the rows a feather paste shows come
    out as the full decoder computes them, and the rows above as zeros."""
    from heygem_ray.models.wav2lip_cpu import fuse_for_cpu

    net = fuse_for_cpu(model.to(memory_format=torch.channels_last)) if fused else model
    faces = torch.from_numpy(REF["faces"]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        skips = net.encode_face(faces)
        full = net.decode(torch.from_numpy(REF["mel"]), skips)
        lower = net.decode(torch.from_numpy(REF["mel"]), skips, rows_from=40)
    assert lower.shape == full.shape == (4, 3, 96, 96)
    # the same numbers but for float rounding (other shapes may pick other conv algorithms)
    np.testing.assert_allclose(lower[:, :, 40:].numpy(), full[:, :, 40:].numpy(), rtol=0, atol=1e-5)
    assert float(lower[:, :, :28].abs().max()) == 0.0  # 24x24 rows 0..6 dropped: output rows 0..27
    assert not torch.equal(lower[:, :, 28:37], full[:, :, 28:37])  # the margin rows are not the full ones


def test_a_stride_2_transposed_conv_is_four_convs_one_per_pixel_phase():
    """phase_weights give ConvTranspose2d(3, stride 2, padding 1, output padding 1) exactly (float
    rounding), on odd and even sizes, as the int8 decoder runs it: each phase a 1x1, 1x2, 2x1 or
    2x2 conv over the input padded below and right, interleaved into the image."""
    import torch.nn.functional as F

    from heygem_ray.models.wav2lip_cpu import phase_weights

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 8, 3, 3, generator=generator)
    x = torch.randn(2, 24, 7, 6, generator=generator)
    want = F.conv_transpose2d(x, weight, stride=2, padding=1, output_padding=1)
    phases = phase_weights(weight)
    assert {ab: tuple(w.shape) for ab, w in phases.items()} == {
        (0, 0): (8, 24, 1, 1),
        (0, 1): (8, 24, 1, 2),
        (1, 0): (8, 24, 2, 1),
        (1, 1): (8, 24, 2, 2),
    }
    got = torch.empty_like(want)
    for (a, b), w in phases.items():
        got[:, :, a::2, b::2] = F.conv2d(F.pad(x, (0, 1, 0, 1)), w)[:, :, :7, :6]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("height", "width"), [(9, 7), (1, 1), (1, 4), (6, 6)])
def test_an_int8_transposed_unit_is_its_float_form_within_quantization(model, height, width):
    """An int8 stride-2 transposed unit (phase convolutions interleaved in place) gives the fp32
    unit's image, channels-last, within the int8 error, on the generator's own weights, at odd,
    even and one-pixel sizes: at this CPU's ranges, whose steps are coarser where they are
    narrowed (no VNNI: 180 activation levels, not 255)."""
    from heygem_ray.models.wav2lip_cpu import FULL_RANGE, Int8ConvUnit, int8_range

    unit = model.face_decoder_blocks[6][0]  # 160 -> 64 channels, 48x48 -> 96x96
    x = torch.rand(2, 160, height, width, generator=torch.Generator().manual_seed(2))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = unit(x)
        got = Int8ConvUnit(unit)(x)
    assert got.shape == want.shape == (2, 64, 2 * height, 2 * width)
    assert got.is_contiguous(memory_format=torch.channels_last)
    err = (got - want).abs()
    coarser = FULL_RANGE.activations / int8_range().activations
    assert float(err.max()) < 0.05 * float(want.abs().max())
    assert float(err.mean()) < 0.01 * coarser * float(want.abs().mean())


@pytest.mark.parametrize(("levels", "min_db", "max_error"), [(FULL_RANGE, 38.0, 0.12), (NARROW_RANGE, 36.0, 0.16)])
def test_int8_generator_stays_near_the_official_reference(model, levels, min_db, max_error):
    """The int8 form: face and audio encoders and decoder on int8 (but the signed mel's unit, the
    1x1 -> 3x3 unit and the final 1x1 conv), the rest fused fp32, the model left alone;
    within the quantization error of the official outputs (measured: 40.4 dB, max 0.078 of 1.0 at
    the full ranges; 37.3 dB, max 0.115 at the narrowed ones; bf16 on a GPU is off by up to ~0.18)."""
    from heygem_ray.models.wav2lip import ConvUnit
    from heygem_ray.models.wav2lip_cpu import FusedConvUnit, Int8ConvUnit, int8_range, quantize_for_cpu

    if levels == FULL_RANGE and int8_range() != FULL_RANGE:
        pytest.skip("this CPU adds int8 products in saturating 16-bit pairs (no VNNI): only narrowed ranges are exact")
    net = model.to(memory_format=torch.channels_last)
    int8 = quantize_for_cpu(net, levels)
    units = [m for m in int8.modules() if isinstance(m, (Int8ConvUnit, FusedConvUnit, ConvUnit))]
    assert not any(isinstance(m, ConvUnit) for m in units)
    assert len(units) == sum(isinstance(m, ConvUnit) for m in net.modules())
    assert sum(isinstance(m, Int8ConvUnit) for m in int8.face_encoder_blocks.modules()) == 18  # every unit
    assert sum(isinstance(m, Int8ConvUnit) for m in int8.face_decoder_blocks.modules()) == 17  # all but 1x1->3x3
    assert sum(isinstance(m, Int8ConvUnit) for m in int8.audio_encoder.modules()) == 12  # all but the signed mel's
    # what is not swapped (the final 1x1 conv) is the model's own tensor, not a copy made to be dropped
    assert int8.output_block[1].weight.data_ptr() == net.output_block[1].weight.data_ptr()
    faces = torch.from_numpy(REF["faces"]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = int8(torch.from_numpy(REF["mel"]), faces)
        np.testing.assert_allclose(model(torch.from_numpy(REF["mel"]), faces).numpy(), REF["output"], atol=1e-4)
    err = out.numpy() - REF["output"]
    assert 10 * np.log10(1.0 / np.mean(err**2)) >= min_db
    assert np.abs(err).max() < max_error


_WITHOUT_VNNI = """
import json
from heygem_ray.models.wav2lip_cpu import FULL_RANGE, NARROW_RANGE, int8_range, sums_exactly
print(json.dumps({"range": list(vars(int8_range()).values()), "full": sums_exactly(FULL_RANGE),
                  "narrow": sums_exactly(NARROW_RANGE)}))
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN's x86 ISA limit")
def test_without_vnni_the_int8_ranges_narrow_so_no_sum_saturates():
    """With oneDNN limited to AVX2 (as on Haswell to Zen 3 CPUs: no VNNI), bytes are multiplied with
    vpmaddubsw, which adds each pair of products into a saturating int16: at the full ranges the
    worst case clips (this is why they narrow), at the narrowed ones it is exact, and int8_range()
    sees that from the kernels themselves."""
    assert 2 * NARROW_RANGE.activations * NARROW_RANGE.weights <= 2**15 - 1  # a pair fits a saturating int16
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_VNNI], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"range": [NARROW_RANGE.activations, NARROW_RANGE.weights], "full": False, "narrow": True}
