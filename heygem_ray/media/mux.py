"""Encodes a row's audio to an audio-only mp4 once, then joins the row's H.264 segments and that
track into one mp4 with the moov atom at the front, copying packets: nothing is re-encoded at the
join, so the last step of a row is I/O. Packets are interleaved as they stream, so memory is flat
in the video's length."""

from __future__ import annotations

import heapq
import itertools
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import IO, Any

import av

from heygem_ray.errors import InputError
from heygem_ray.media.audio import Resampler, decoded


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
        encoder = _AudioEncoder(audio_in, src, dst, sample_rate, layout, audio_display or audio_path)
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
        sar = template.codec_context.sample_aspect_ratio
        audio_out = out.add_stream_from_template(audio_src)
        video = ((_time(p), p, video_out) for p in itertools.chain([first_packet], (p for p, _ in video_packets)))
        audio = ((_time(p), p, audio_out) for p in audio_in.demux(audio_src) if p.size)
        frames = 0
        # interleaved by time (a video packet first on a tie): both streams are read as they are written
        for _, packet, stream in heapq.merge(video, audio, key=lambda item: item[0]):
            packet.stream = stream
            out.mux(packet)
            frames += stream is video_out
    if sar and sar != 1:
        show_at_display_width(out_path, Fraction(sar))
    return StitchStats(frames, float(frames * frame_seconds))


def show_at_display_width(path: str, sar: Fraction) -> None:
    """Write the video track header's width as the picture is shown (its stored width times the
    pixel aspect `sar`), in place. FFmpeg's mp4 writer takes it from the stream's aspect, which
    PyAV cannot set, and wrote the stored width: players that size the picture by the track
    header (QuickTime) showed an anamorphic clip squeezed, though its `pasp` box is right."""
    with open(path, "r+b") as fh:
        moov = _child_boxes(fh, 0, os.fstat(fh.fileno()).st_size).get(b"moov")
        if moov is None:
            return
        for trak_start, trak_end in _child_boxes(fh, moov[0], moov[1], every=True).get(b"trak", []):
            children = _child_boxes(fh, trak_start, trak_end)
            mdia = children.get(b"mdia")
            hdlr = _child_boxes(fh, mdia[0], mdia[1]).get(b"hdlr") if mdia else None
            tkhd = children.get(b"tkhd")
            if hdlr is None or tkhd is None:
                continue
            fh.seek(hdlr[0])  # version and flags, pre_defined, then the handler type
            if fh.read(12)[8:] != b"vide":
                continue
            fh.seek(tkhd[1] - 8)  # width and height, 16.16 fixed point, end the box
            width, _ = struct.unpack(">II", fh.read(8))
            fh.seek(tkhd[1] - 8)
            fh.write(struct.pack(">I", round(width * sar)))
            return


def _child_boxes(fh: IO[bytes], start: int, end: int, every: bool = False) -> dict:
    """The boxes between `start` and `end` of an mp4 file, by type: (payload start, end), or with
    `every` a list of those per type."""
    found: dict = {}
    at = start
    while at + 8 <= end:
        fh.seek(at)
        size, kind = struct.unpack(">I4s", fh.read(8))
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", fh.read(8))[0], 16
        elif size == 0:
            size = end - at
        if size < header:
            break
        box = (at + header, at + size)
        if every:
            found.setdefault(kind, []).append(box)
        else:
            found.setdefault(kind, box)
        at += size
    return found


def _time(packet: av.Packet) -> Fraction:
    ts = packet.dts if packet.dts is not None else packet.pts
    return Fraction(ts or 0) * packet.time_base


def _segment_packets(
    open_segment: Callable[[int], IO[bytes]], count: int, frame_seconds: Fraction
) -> Iterator[tuple[av.Packet, av.video.stream.VideoStream | None]]:
    """Every video packet of every segment, timestamps shifted by the frames before it.
    The first item also carries the first segment's stream, the template for the output stream."""
    offset = last_dts = Fraction(0)
    extradata = None
    for index in range(count):
        # Opening an mp4 decodes its first frame to learn the stream's parameters (~30 ms at 1080p,
        # a second over a 3-minute row); the first segment's, the output's template, are needed,
        # the others' packets only (their settings are checked equal by the extradata).
        skip: Any = [] if index == 0 else [{"skip_frame": "all"}]  # a dict per stream (PyAV's stub: str)
        with open_segment(index) as fh, av.open(fh, "r", stream_options=skip) as seg:
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
                if seen == 0 and index and packet.dts is not None and packet.dts * stream.time_base <= last_dts:
                    raise RuntimeError(
                        f"segment {index} starts before segment {index - 1} ends (its encoder delayed it "
                        "differently: a segment of 1-2 frames?); cannot join"
                    )
                if packet.dts is not None:
                    last_dts = packet.dts * stream.time_base
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
        uri: str,
    ):
        self._container, self._src, self._dst, self._uri = container, src, dst, uri
        self._resampler = Resampler("fltp", layout, rate)
        self.samples = 0

    def packets(self) -> Iterator[av.Packet]:
        for frame in self._frames():
            # Numbered from 0, whatever the source's timestamps (its gaps are not reproduced): a
            # first frame with a timestamp is what makes the encoder date its priming samples
            # before 0, so the mp4's edit list hides them. Frames without one would start the
            # narration 1024 samples (21 ms at 48 kHz) late in every output.
            frame.pts, frame.time_base = self.samples, Fraction(1, self._dst.rate)
            self.samples += frame.samples
            yield from self._dst.encode(frame)
        yield from self._dst.encode(None)

    def _frames(self) -> Iterator[av.AudioFrame]:
        for frame in decoded(self._container, self._src, self._uri):
            yield from self._resampler.resample(frame)
        yield from self._resampler.resample(None)
