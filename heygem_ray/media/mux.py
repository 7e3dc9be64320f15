"""Encodes a row's audio to an audio-only mp4 once, then joins the row's H.264 segments and that
track into one mp4 with the moov atom at the front, copying packets: nothing is re-encoded at the
join, so the last step of a row is I/O. Packets are interleaved as they stream, so memory is flat
in the video's length."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import IO

import av

from heygem_ray.errors import InputError
from heygem_ray.media.audio import finite_samples


@dataclass(frozen=True)
class StitchStats:
    frames: int
    video_seconds: float


def encode_audio(
    audio_path: str,
    out_path: str,
    codec: str = "aac",
    bitrate: int = 128_000,
    sample_rate: int = 48_000,
    audio_display: str | None = None,
) -> int:
    """Write the first audio stream of `audio_path` to `out_path` (an audio-only mp4) with the
    output's codec settings; return the samples encoded, at `sample_rate`."""
    with av.open(audio_path) as audio_in, av.open(out_path, "w", format="mp4") as out:
        if not audio_in.streams.audio:
            raise InputError("audio", audio_display or audio_path, "has no audio stream")
        src = audio_in.streams.audio[0]
        layout = "stereo" if src.channels >= 2 else "mono"
        dst = out.add_stream(codec, rate=sample_rate, layout=layout)
        if not isinstance(dst, av.AudioStream):
            raise ValueError(f"{codec!r} is not an audio encoder")  # noqa: TRY004 - a bad name, not a bad type
        dst.bit_rate = bitrate
        encoder = _AudioEncoder(audio_in, src, dst, sample_rate, layout)
        for packet in encoder.packets():
            out.mux(packet)
    return encoder.samples


def stitch(
    open_segment: Callable[[int], IO[bytes]],
    segment_count: int,
    audio_track_path: str,
    out_path: str,
    fps_fraction: str,
) -> StitchStats:
    """Write `out_path` from segments 0..segment_count-1 (opened in order by `open_segment`) and the
    audio of `audio_track_path` (made by `encode_audio`), both copied packet by packet."""
    frame_seconds = 1 / Fraction(fps_fraction)
    with (
        av.open(out_path, "w", format="mp4", options={"movflags": "+faststart"}) as out,
        av.open(audio_track_path) as audio_in,
    ):
        audio_src = audio_in.streams.audio[0]
        video_packets = _segment_packets(open_segment, segment_count, frame_seconds)
        first_packet, template = next(video_packets)
        assert template is not None  # the first item carries the first segment's stream
        video_out = out.add_stream_from_template(template)
        audio_out = out.add_stream_from_template(audio_src)
        audio_packets = (p for p in audio_in.demux(audio_src) if p.size)
        frames = 0
        video_next: av.Packet | None = first_packet
        audio_next = next(audio_packets, None)
        while video_next is not None or audio_next is not None:
            if video_next is not None and (audio_next is None or _time(video_next) <= _time(audio_next)):
                video_next.stream = video_out
                out.mux(video_next)
                frames += 1
                video_next = next(video_packets, (None, None))[0]
            elif audio_next is not None:  # always, as the loop runs while either is left
                audio_next.stream = audio_out
                out.mux(audio_next)
                audio_next = next(audio_packets, None)
    return StitchStats(frames, float(frames * frame_seconds))


def _time(packet: av.Packet) -> Fraction:
    ts = packet.dts if packet.dts is not None else packet.pts
    return Fraction(ts or 0) * packet.time_base


def _segment_packets(
    open_segment: Callable[[int], IO[bytes]], count: int, frame_seconds: Fraction
) -> Iterator[tuple[av.Packet, av.video.stream.VideoStream | None]]:
    """Every video packet of every segment, timestamps shifted by the frames before it.
    The first item also carries the first segment's stream, the template for the output stream."""
    offset = Fraction(0)
    extradata = None
    for index in range(count):
        with open_segment(index) as fh, av.open(fh, "r") as seg:
            stream = seg.streams.video[0]
            if stream.time_base is None:
                raise RuntimeError(f"segment {index} has no video time base; cannot join")
            if extradata is None:
                extradata = stream.codec_context.extradata
            elif stream.codec_context.extradata != extradata:
                raise RuntimeError(f"segment {index} was encoded with different settings; cannot join")
            shift = round(offset / stream.time_base)
            seen = 0
            for packet in seg.demux(stream):
                if packet.size == 0:
                    continue
                packet.pts = None if packet.pts is None else packet.pts + shift
                packet.dts = None if packet.dts is None else packet.dts + shift
                seen += 1
                yield packet, (stream if index == 0 and seen == 1 else None)
            offset += seen * frame_seconds


class _AudioEncoder:
    """Decodes the source audio, resamples it for the encoder and yields encoded packets."""

    def __init__(
        self,
        container: av.container.InputContainer,
        src: av.audio.stream.AudioStream,
        dst: av.audio.stream.AudioStream,
        rate: int,
        layout: str,
    ):
        self._container, self._src, self._dst = container, src, dst
        self._resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        self.samples = 0

    def packets(self) -> Iterator[av.Packet]:
        for frame in self._frames():
            self.samples += frame.samples
            frame.pts = None  # the encoder numbers samples itself; source gaps are not reproduced
            yield from self._dst.encode(frame)
        yield from self._dst.encode(None)

    def _frames(self) -> Iterator[av.AudioFrame]:
        for frame in self._container.decode(self._src):
            yield from self._resampler.resample(finite_samples(frame))
        yield from self._resampler.resample(None)
