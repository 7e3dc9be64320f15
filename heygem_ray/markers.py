"""Done-markers: what a finished row leaves beside the campaign (`{output}/_markers/{row}.json`),
enough for a rerun to decide "already done". The stitch writes one after publishing the video;
`prepare_row` reads it and skips the row when its fingerprint matches what it would render now."""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass

from heygem_ray import storage


@dataclass(frozen=True)
class Marker:
    """What a finished row leaves beside the campaign: enough to decide 'already done' on a rerun."""

    id: str
    fingerprint: str
    output: str
    frames: int
    audio_seconds: float
    finished_at: float
    #: the output's lip-sync score (heygem_ray.qa); None for outputs made before scoring
    sync_score: float | None = None
    sync_offset_frames: int | None = None
    sync_method: str | None = None
    sync_distance: float | None = None
    frames_without_face: int | None = None
    #: the published file's size: a rerun skips the row only while the file there has it (another
    #: row, a later manifest's, or a hand may have put another file there); None for older markers
    bytes: int | None = None
    #: the run that published it (`StitchJob.run`), which knows its own by it rather than by a
    #: time from another host's clock; None for older markers
    run: str | None = None

    def still_published(self, output: str) -> bool:
        """Whether `output`, the row's output now (the same as the marker's when the fingerprints
        match, but the marker may hold it relative to a folder this process is not in), holds the
        video this marker is of (of its size; exists, for markers from before sizes were kept)."""
        try:
            return storage.size(output) == self.bytes if self.bytes is not None else storage.exists(output)
        except FileNotFoundError:
            return False


def read_marker(uri: str) -> Marker | None:
    """The marker at `uri`; None when there is none or it cannot be read. Fields it does not know
    (a later version's) are left: a marker a newer run wrote still skips its row here."""
    try:
        data = json.loads(storage.read_bytes(uri))
        known = {k: v for k, v in data.items() if k in _TYPES}
    except (FileNotFoundError, ValueError, AttributeError):  # AttributeError: not an object
        return None
    # a value of another type (a hand's "0.81" for a score) skipped its row, and then failed the
    # whole results table, which is typed
    if any(not isinstance(v, _TYPES[k]) or isinstance(v, bool) for k, v in known.items()):
        return None
    try:
        return Marker(**known)
    except TypeError:  # a field missing
        return None


def _accepted(hint: object) -> tuple[type, ...]:
    """The JSON values a field of type `hint` takes (a whole number for a float)."""
    types = set(typing.get_args(hint) or (hint,))
    return tuple(types | {int}) if float in types else tuple(types)


_TYPES = {name: _accepted(hint) for name, hint in typing.get_type_hints(Marker).items()}


def write_marker(uri: str, marker: Marker) -> None:
    storage.write_bytes(uri, json.dumps(asdict(marker)).encode())
