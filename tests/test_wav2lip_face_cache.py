"""Face-encoder reuse in Wav2LipRenderer: with `sources`, the output is bitwise the output without
reuse (still image, looped clip, mixed boxes; both image paths, fp32, int8 and bf16 autocast, compiled),
the encoder really runs less (counted with a forward hook on the real model), and a different box
or source id is never served from the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heygem_ray import demo
from heygem_ray.devices import cpu_flags
from heygem_ray.media.audio import AudioWindow
from heygem_ray.render.wav2lip import Wav2LipRenderer

# bf16 is emulated without AVX512-BF16 or AMX (~3 s a frame): its cases run with the slow tests there
# (the same autocast path as where bf16 is native; test_wav2lip_precision runs bf16 on every CPU)
NATIVE_BF16 = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
BF16_SLOW = () if NATIVE_BF16 else pytest.mark.slow

# a face box (already padded) on the demo portrait at width 256, and a second one beside it
BOX = np.array([76, 56, 190, 172])
OTHER_BOX = np.array([72, 60, 188, 170])


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return demo.portrait(256)


@pytest.fixture(scope="module")
def clip(portrait) -> list[np.ndarray]:
    """Six frames of the portrait with head motion: the loop a looped clip repeats."""
    return [demo.head_motion_frame(portrait, i / 25, seed=3) for i in range(6)]


@pytest.fixture(scope="module")
def mels(recipe_checkpoints) -> np.ndarray:
    """40 mel windows of speech-like audio, one per output frame."""
    wav = demo.speech_like(2.0, seed=4)
    renderer = Wav2LipRenderer(recipe_checkpoints["wav2lip"], device="cpu", face_cache_mb=0)
    return renderer.features(AudioWindow(wav, 0, len(wav), 0.1), np.arange(40), 25.0)


class EncoderCount:
    """Counts face-encoder passes and the crops in them (rows that are not zero padding), with a
    forward hook on the first encoder block of the real model."""

    def __init__(self, renderer: Wav2LipRenderer):
        self.calls = self.crops = 0
        self.handle = renderer.model.face_encoder_blocks[0].register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        self.calls += 1
        self.crops += int((args[0].flatten(1).abs().amax(dim=1) > 0).sum())


def _pair(checkpoint: str, face_cache_mb: float = 256, **kw) -> tuple[Wav2LipRenderer, Wav2LipRenderer]:
    """(with reuse, without reuse): the same renderer settings, face cache on and off."""
    return (
        Wav2LipRenderer(checkpoint, device="cpu", face_cache_mb=face_cache_mb, **kw),
        Wav2LipRenderer(checkpoint, device="cpu", face_cache_mb=0, **kw),
    )


def _assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(g, w), (k, np.abs(g.astype(int) - w).max())


@pytest.mark.parametrize(
    ("image_ops", "precision"),
    [
        # the defaults: int8 on a CPU, fp32 through the device path; plain fp32 on the CPU is slow-marked
        pytest.param("cpu", "fp32", marks=pytest.mark.slow),
        ("device", "fp32"),
        pytest.param("cpu", "bf16", marks=BF16_SLOW),
        pytest.param("device", "bf16", marks=BF16_SLOW),
        ("cpu", "int8"),
    ],
)
def test_still_image_encodes_its_face_once(recipe_checkpoints, portrait, mels, image_ops, precision):
    # three batches either way; emulated bf16 takes ~3 s a frame
    frames, batch = ((5, 2) if NATIVE_BF16 else (3, 1)) if precision == "bf16" else (10, 4)
    reuse, plain = _pair(recipe_checkpoints["wav2lip"], batch_size=batch, precision=precision, image_ops=image_ops)
    count, baseline = EncoderCount(reuse), EncoderCount(plain)
    boxes, mels = np.tile(BOX, (frames, 1)), mels[:frames]
    # a still: every frame is a copy of the one image, so every frame has the same source id
    got = reuse.render([portrait.copy() for _ in range(frames)], boxes, mels, sources=[("still.png", 0)] * frames)
    want = plain.render([portrait.copy() for _ in range(frames)], boxes, mels, sources=[("still.png", 0)] * frames)
    _assert_same(got, want)
    assert not np.array_equal(got[0], got[1])  # the audio still drives each frame
    # batches of 4 + 4 + 2 (bf16: 2 + 2 + 1, or 1 + 1 + 1), no reuse; int8 encodes each face alone (its scales are per call)
    assert (baseline.calls, baseline.crops) == ((frames, frames) if precision == "int8" else (3, frames))
    # one pass, one crop. Every face here is the same
    # image: only the looped clip's test can tell an int8 face encoded beside others
    assert (count.calls, count.crops) == (1, 1)
    # a later call finds it too
    reuse.render([portrait.copy() for _ in range(3)], boxes[:3], mels[:3], sources=[("still.png", 0)] * 3)
    assert (count.calls, count.crops) == (1, 1)


@pytest.mark.parametrize(
    ("image_ops", "precision"),
    [
        pytest.param("cpu", "fp32", marks=pytest.mark.slow),
        ("device", "fp32"),
        ("cpu", "int8"),
        pytest.param("device", "int8", marks=pytest.mark.slow),  # a pairing no default makes
    ],
)
def test_looped_clip_encodes_each_frame_once(recipe_checkpoints, clip, mels, image_ops, precision):
    reuse, plain = _pair(recipe_checkpoints["wav2lip"], batch_size=8, precision=precision, image_ops=image_ops)
    assert reuse.precision == plain.precision == precision
    count = EncoderCount(reuse)
    index = [i % len(clip) for i in range(14)]  # the loop turns round more than twice
    sources = [("clip.mp4", i) for i in index]
    boxes = np.array([BOX + [i % 3, i // 2, i % 3, i // 2] for i in index])  # a moving face, per clip frame
    got = reuse.render([clip[i].copy() for i in index], boxes, mels[: len(index)], sources=sources)
    want = plain.render([clip[i].copy() for i in index], boxes, mels[: len(index)])
    _assert_same(got, want)
    # batch 1 (frames 0-7) encodes the 6 clip frames (at int8 one at a time); batch 2 is all hits
    assert (count.calls, count.crops) == ((len(clip) if precision == "int8" else 1), len(clip))


@pytest.mark.parametrize("image_ops", ["cpu", "device"])
def test_mixed_boxes_and_sources(recipe_checkpoints, clip, mels, image_ops):
    """Repeats mixed with new crops in one batch, boxes at and beyond the frame border, an empty box,
    the same source under another box and the same box on another source."""
    reuse, plain = _pair(recipe_checkpoints["wav2lip"], batch_size=6, precision="fp32", image_ops=image_ops)
    count = EncoderCount(reuse)
    h, w = clip[0].shape[:2]
    rows = [  # (clip frame, box)
        (0, BOX),
        (1, BOX),
        (0, BOX),
        (0, OTHER_BOX),
        (2, [-20, 150, 90, h + 30]),
        (1, BOX),
        (2, [w - 60, -10, w + 40, 90]),
        (0, OTHER_BOX),
        (3, [10, 10, 10, 60]),
        (2, [-20, 150, 90, h + 30]),
        (1, [0, 0, w, h]),
        (3, BOX),
        (0, BOX),
        (1, [0, 0, w, h]),
    ]
    boxes = np.array([box for _, box in rows])
    sources = [("clip.mp4", i) for i, _ in rows]
    got = reuse.render([clip[i].copy() for i, _ in rows], boxes, mels[: len(rows)], sources=sources)
    want = plain.render([clip[i].copy() for i, _ in rows], boxes, mels[: len(rows)])
    _assert_same(got, want)
    # batch 1 (rows 0-5) encodes 4 distinct (frame, box) crops, batch 2 (rows 6-11) 3 new ones (two
    # rows are hits, one box is empty), batch 3 only hits
    assert (count.calls, count.crops) == (2, 7)


@pytest.fixture
def eager_backend(monkeypatch):
    """torch.compile with dynamo's "eager" backend: traces as a real compile does, skips inductor's
    C++ code generation (about a minute on 2 CPU cores)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", **kw))


@pytest.mark.slow  # two generators traced by dynamo: ~15 s on 2 cores (compile itself: test_wav2lip_renderer)
def test_compiled_reuse_is_bitwise_the_compiled_output(recipe_checkpoints, eager_backend, clip, mels):
    reuse, plain = _pair(
        recipe_checkpoints["wav2lip"], batch_size=8, precision="fp32", image_ops="device", compile=True
    )
    index = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1]  # 8 + a padded tail of 3
    sources = [("clip.mp4", i) for i in index]
    boxes = np.tile(BOX, (len(index), 1))
    got = reuse.render([clip[i].copy() for i in index], boxes, mels[: len(index)], sources=sources)
    want = plain.render([clip[i].copy() for i in index], boxes, mels[: len(index)], sources=sources)
    assert reuse.compiled and plain.compiled
    _assert_same(got, want)


@pytest.mark.slow  # ~8 s of dynamo tracing on 2 cores
def test_compiled_halves_compile_once(recipe_checkpoints, monkeypatch, clip, mels):
    """Encoder and decoder each compile once across calls with and without sources, cache hits and
    misses and padded tail batches: the skips reach the decoder in one layout either way."""
    graphs: list[torch.fx.GraphModule] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=counting, **kw))
    torch._dynamo.reset()
    renderer = Wav2LipRenderer(
        recipe_checkpoints["wav2lip"], batch_size=4, precision="fp32", device="cpu", image_ops="device", compile=True
    )
    boxes = np.tile(BOX, (6, 1))
    renderer.render(
        [clip[i].copy() for i in (0, 1, 0, 2, 1, 2)],
        boxes,
        mels[:6],
        sources=[("clip.mp4", i) for i in (0, 1, 0, 2, 1, 2)],
    )
    renderer.render([clip[i].copy() for i in (0, 1, 3)], boxes[:3], mels[:3])
    renderer.render(
        [clip[i].copy() for i in (2, 0, 1, 3, 3)],
        boxes[:5],
        mels[:5],
        sources=[("clip.mp4", i) for i in (2, 0, 1, 3, 3)],
    )
    assert renderer.compiled and len(graphs) == 2


def test_another_box_or_source_is_not_served_from_the_cache(recipe_checkpoints, clip, mels):
    reuse, plain = _pair(recipe_checkpoints["wav2lip"], batch_size=4, precision="fp32")
    count = EncoderCount(reuse)
    frame = clip[0]
    reuse.render([frame.copy()], BOX[None], mels[:1], sources=["a"])
    assert count.crops == 1

    # same source, another box: encoded, and the output is that box's own
    got = reuse.render([frame.copy()], OTHER_BOX[None], mels[:1], sources=["a"])
    _assert_same(got, plain.render([frame.copy()], OTHER_BOX[None], mels[:1]))
    assert count.crops == 2

    # same box, another source with other pixels: encoded, and the output is its own
    got = reuse.render([clip[3].copy()], BOX[None], mels[:1], sources=["b"])
    _assert_same(got, plain.render([clip[3].copy()], BOX[None], mels[:1]))
    assert count.crops == 3

    # the guard on the test itself: the cache trusts the ids, so other pixels under a known id
    # come out with the known crop's face, which differs from their own
    lied = reuse.render([clip[3].copy()], BOX[None], mels[:1], sources=["a"])
    assert count.crops == 3
    assert not np.array_equal(lied[0], got[0])


def test_cache_stays_within_its_bytes(recipe_checkpoints, clip, mels):
    # fp32 features of one crop take 290_816 floats = 1.11 MiB: room for two
    reuse, plain = _pair(recipe_checkpoints["wav2lip"], face_cache_mb=2.5, batch_size=4, precision="fp32")
    count = EncoderCount(reuse)
    index = [0, 1, 2, 3, 0, 1, 2, 3]
    sources = [("clip.mp4", i) for i in index]
    boxes = np.tile(BOX, (len(index), 1))
    got = reuse.render([clip[i].copy() for i in index], boxes, mels[:8], sources=sources)
    _assert_same(got, plain.render([clip[i].copy() for i in index], boxes, mels[:8]))
    assert len(reuse._face_cache) == 2 and reuse._face_cache_bytes <= 2.5 * 2**20
    # batch 1 encodes 4 and keeps the last two (2, 3); batch 2 finds those and encodes 0 and 1,
    # which push 2 and 3 out
    assert count.crops == 6
    reuse.render([clip[1].copy()], BOX[None], mels[:1], sources=[("clip.mp4", 1)])
    assert count.crops == 6
    reuse.render([clip[2].copy()], BOX[None], mels[:1], sources=[("clip.mp4", 2)])
    assert count.crops == 7


def test_sources_must_match_the_frames(recipe_checkpoints, clip, mels):
    renderer = Wav2LipRenderer(recipe_checkpoints["wav2lip"], batch_size=4, precision="fp32", device="cpu")
    with pytest.raises(ValueError, match="2 frames and 1 sources"):
        renderer.render([clip[0].copy(), clip[1].copy()], np.tile(BOX, (2, 1)), mels[:2], sources=["a"])
    with pytest.raises(ValueError, match="face_cache_mb"):
        Wav2LipRenderer(recipe_checkpoints["wav2lip"], device="cpu", face_cache_mb=-1)


@pytest.mark.parametrize("shape", [(16, 96, 96), (512, 1, 1), (3, 5, 7)])
def test_cached_skips_are_stacked_straight_into_channels_last(shape):
    """The skips the cache serves are stacked in the decoder's layout (torch's exact channels-last
    strides), so the decoder takes them without another, transposing, copy; values as stacked."""
    from heygem_ray.render.wav2lip import _channels_last, _stack_channels_last

    generator = torch.Generator().manual_seed(3)
    batch = torch.rand(4, *shape, generator=generator).contiguous(memory_format=torch.channels_last)
    rows = [batch[i].clone() for i in (2, 0, 2, 3)]  # as the cache keeps them: one face may repeat
    got = _stack_channels_last(rows)
    c, h, w = shape
    assert got.stride() == (h * w * c, 1, w * c, c)
    assert _channels_last(got) is got
    assert torch.equal(got, torch.stack(rows))
