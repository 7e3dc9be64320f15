import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from heygem_ray.errors import ManifestError
from heygem_ray.manifest import build_manifest, default_id, read_manifest, refusals, rows_from_table


def table(**cols):
    return pa.table(cols)


def test_defaults_id_and_output_under_root():
    rows = rows_from_table(table(audio=["a.wav"], avatar=["v.mp4"]), "/out")
    assert rows[0].id == default_id("a.wav", "v.mp4") and len(rows[0].id) == 12
    assert rows[0].output == f"/out/{rows[0].id}.mp4"
    assert default_id("a.wav", "v.mp4") == rows_from_table(table(audio=["a.wav"], avatar=["v.mp4"]), "/x")[0].id


def test_a_derived_id_outlives_its_inputs_signatures():
    """Presigned URLs expire, so a rerun signs them again: every id-less row got a new id (a new
    output name, no marker), and the rerun rendered every row again beside the old videos."""
    s3 = (
        "https://b.s3.amazonaws.com/a.wav?versionId=7&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date={}&X-Amz-Signature={}"
    )
    gcs = "https://storage.googleapis.com/b/v.mp4?X-Goog-Expires=900&X-Goog-Signature={}"
    azure = "https://acct.blob.core.windows.net/c/v.mp4?sv=2022-11-02&se={}&sp=r&sig={}"
    first = rows_from_table(table(audio=[s3.format(1, "aa")], avatar=[gcs.format("bb")]), "/out")[0]
    again = rows_from_table(table(audio=[s3.format(2, "cc")], avatar=[gcs.format("dd")]), "/out")[0]
    assert first.id == again.id and first.output == again.output
    assert default_id(s3.format(1, "a"), azure.format(1, "a")) == default_id(s3.format(2, "b"), azure.format(2, "b"))
    # what is not a signature still names another input; ids of URIs without one are as before
    assert default_id(s3.format(1, "a"), "v") != default_id(s3.format(1, "a").replace("=7", "=8"), "v")
    # parameters that sign one provider's URLs ask for something in others': kept where nothing signs
    processed = "https://b.oss-cn-hangzhou.aliyuncs.com/v.mp4?x-oss-process=video/snapshot,t_{}"
    assert default_id("a.wav", processed.format(1)) != default_id("a.wav", processed.format(2))
    assert default_id("https://h/a.wav?sp=1", "v") != default_id("https://h/a.wav?sp=2", "v")
    signed_oss = processed.format(1) + "&OSSAccessKeyId=k&Expires={}&Signature={}"
    assert default_id("a.wav", signed_oss.format(1, "x")) == default_id("a.wav", signed_oss.format(2, "y"))
    assert default_id("a.wav", "v.mp4") == "f6f36ba7de5d"
    assert default_id("https://h/a.wav?versionId=2", "s3://b/v.mp4") == "54125bf3e086"


def test_explicit_and_relative_outputs():
    rows = rows_from_table(
        table(
            audio=["a", "b", "c"],
            avatar=["v", "v", "v"],
            id=["r1", "r2", "r3"],
            output=["s3://bucket/x.mp4", "sub/y.mp4", None],
        ),
        "s3://camp",
        allow_outside_output=True,
    )
    assert [r.output for r in rows] == ["s3://bucket/x.mp4", "s3://camp/sub/y.mp4", "s3://camp/r3.mp4"]


@pytest.mark.parametrize(
    "output", ["s3://bucket/x.mp4", "s3://camp-other/x.mp4", "../escape.mp4", "/etc/x.mp4", "s3://camp/a/../../x.mp4"]
)
def test_outputs_outside_the_root_are_refused_by_default(output):
    root = "s3://camp" if "s3" in output else "/camp"
    rows = rows_from_table(table(audio=["a", "b"], avatar=["v", "v"], id=["bad", "good"], output=[output, None]), root)
    assert "outside the output root" in rows[0].refused and rows[1].refused is None
    with pytest.raises(ManifestError, match="no row that can run"):
        rows_from_table(table(audio=["a"], avatar=["v"], output=[output]), root)


@pytest.mark.parametrize(
    "cols, message",
    [
        ({"audio": ["a"]}, "lacks required column(s) avatar"),
        ({"audio": [1, 2], "avatar": ["v", "w"]}, "column 'audio' must hold strings"),
        ({"audio": pa.array([], pa.string()), "avatar": pa.array([], pa.string())}, "has no rows"),
        ({"audio": ["a", None], "avatar": [None, "w"]}, "has no row that can run"),
    ],
)
def test_manifests_no_row_of_which_can_run_are_rejected_with_the_reason(cols, message):
    with pytest.raises(ManifestError) as err:
        rows_from_table(pa.table(cols), "/out")
    assert message in str(err.value)


def test_whole_number_ids_are_taken_as_their_text():
    """pandas writes a DataFrame's default ids as int64: the CLI refused the whole manifest, which
    the studio took (as text)."""
    rows = rows_from_table(pa.table({"id": [0, 17], "audio": ["a.wav", "b.wav"], "avatar": ["v.mp4", "v.mp4"]}), "/out")
    assert [(r.id, r.output, r.refused) for r in rows] == [("0", "/out/0.mp4", None), ("17", "/out/17.mp4", None)]
    with pytest.raises(ManifestError, match="column 'id' must hold strings, not double"):
        rows_from_table(pa.table({"id": [0.5], "audio": ["a.wav"], "avatar": ["v.mp4"]}), "/out")


GOOD = {"audio": "good.wav", "avatar": "good.mp4", "id": "good", "output": None, "box": None}


@pytest.mark.parametrize(
    "bad, refused_id, message",
    [
        ({"audio": None}, "#1", "manifest row 1: empty audio"),
        ({"avatar": " "}, "#1", "manifest row 1: empty avatar"),
        ({"audio": None, "id": "mine"}, "mine", "manifest row 1: empty audio"),
        ({"id": "../etc"}, "#1", "must be letters (of any script), digits"),
        ({"id": "x", "box": [1, 2, 3]}, "x", "must be x1, y1, x2, y2"),
        ({"id": "x", "box": "0,0,inf,10"}, "x", "must be four numbers"),
        ({"audio": "a\tb.wav"}, "#1", "manifest row 1: audio 'a\\tb.wav' holds a control character"),
        ({"id": "x", "output": "o\n.mp4"}, "x", "output 'o\\n.mp4' holds a control character"),
        ({"id": "x", "audio": "a\x85b.wav"}, "x", "audio 'a\\x85b.wav' holds a control character"),  # C1: NEL
        ({"id": "x", "avatar": "clip\u2028.mp4"}, "x", "avatar 'clip\\u2028.mp4' holds a control character"),
        ({"id": "x", "output": "cv\u202egpj.mp4"}, "x", "output 'cv\\u202egpj.mp4' holds a control character"),
        ({"id": "x", "output": "_results.parquet"}, "x", "is where the campaign keeps _results"),
        ({"id": "x", "output": "_markers/x.json"}, "x", "is where the campaign keeps _markers"),
        ({"id": "x", "output": "b/_results.parquet"}, "x", "is where a campaign keeps _results.parquet"),
        ({"id": "x", "audio": "/out/v.mp4", "avatar": "/out/v.mp4", "output": "v.mp4"}, "x", "campaign's inputs"),
        # an MP4 under another name (players go by it), none at all, or a name no file system takes:
        # refused after the row had rendered, or published as given
        ({"id": "x", "output": "clip.webm"}, "x", "output /out/clip.webm is not named as the MP4 video it will be"),
        ({"id": "x", "output": "newdir"}, "x", "output /out/newdir is not named as the MP4 video it will be"),
        ({"id": "x", "output": "b" * 296 + ".mp4"}, "x", "has a name of 300 bytes in its path: at most 255"),
        # an object store keeps `//` (a key outside the root, as every check reads it inside)
        ({"id": "x", "output": "s3://out//a.mp4"}, "x", "output s3://out//a.mp4 holds an empty name (//)"),
    ],
)
def test_a_row_that_cannot_run_is_refused_with_the_reason_and_the_others_go_on(bad, refused_id, message):
    cells = [GOOD, {**GOOD, "id": None, "audio": "b.wav", **bad}, {**GOOD, "id": "last", "audio": "c.wav"}]
    rows = rows_from_table(pa.Table.from_pylist(cells), "/out")
    assert [r.id for r in rows] == ["good", refused_id, "last"]
    assert message in rows[1].refused
    assert rows[0].refused is None and rows[2].refused is None
    with pytest.raises(ManifestError, match="is invalid") as err:  # the studio's check before a launch
        refusals(rows, "m.parquet")
    assert message in str(err.value)
    refusals([rows[0], rows[2]])


def test_rows_sharing_an_id_or_an_output_are_all_refused():
    rows = rows_from_table(
        pa.table(
            {
                "audio": ["a", "b", "c", "d", "e", "f", "f"],
                "avatar": ["v"] * 7,
                "id": ["x", "x", "y", "z", "ok", None, None],
                "output": [None, None, "o.mp4", "o.mp4", None, None, None],
            }
        ),
        "/out",
    )
    assert [r.id for r in rows] == ["#0", "#1", "y", "z", "ok", "#5", "#6"]
    assert "id 'x' is also that of row(s) 1" in rows[0].refused and "row(s) 0" in rows[1].refused
    assert "output /out/o.mp4 is also that of row(s) 3" in rows[2].refused
    assert "the same audio and avatar as row(s) 6 (give them ids)" in rows[5].refused
    assert [r.refused is None for r in rows] == [False, False, False, False, True, False, False]
    # 20,000 rows of one id (a column of one value, say): each says so briefly, in linear time (each
    # row listed the others: 8,000 such rows took a minute)
    n = 20_000
    many = rows_from_table(
        table(audio=[f"a{i}" for i in range(n + 1)], avatar=["v"] * (n + 1), id=["x"] * n + ["y"]), "/o"
    )
    assert f"id 'x' is also that of row(s) 1, 2, 3, 4, 5 and {n - 6} more" in many[0].refused
    assert "is also that of row(s) 0, 1, 2, 4, 5 and" in many[3].refused
    assert "is also that of row(s) 0, 1, 2, 3, 4 and" in many[n - 1].refused
    assert many[n].refused is None and max(len(r.refused or "") for r in many) < 200
    long_box = rows_from_table(table(audio=["a", "b"], avatar=["v", "v"], box=["9" * 5000, None]), "/o")[0]
    assert len(long_box.refused) < 200 and "...'" in long_box.refused


def test_cells_are_read_as_people_write_them():
    """Blanks around a pasted URI, pandas' categoricals, an optional column left all null, a
    leading underscore in an output's name: all fine."""
    rows = rows_from_table(
        pa.table(
            {
                "audio": pa.array([" a.wav\n", "b.wav"]).dictionary_encode(),
                "avatar": ["v.mp4", "v.mp4"],
                "id": pa.array([None, None], pa.null()),
                "output": ["_intro.mp4", None],
            }
        ),
        "/out",
    )
    # relative paths are made absolute against the folder the campaign runs in (workers may run elsewhere)
    assert [r.audio for r in rows] == [os.path.abspath("a.wav"), os.path.abspath("b.wav")]
    assert rows[0].output == "/out/_intro.mp4" and rows[1].id == default_id("b.wav", "v.mp4")


def test_ids_and_outputs_differing_in_case_are_one_on_a_case_blind_file_system(tmp_path, monkeypatch):
    """On macOS, Windows or an SMB share rows "Intro" and "intro" shared `Intro.mp4`, its marker and
    its thumbnail: both reported ok, one video there, and every rerun rendered one of them again.
    Refused there, as rows of one id are; elsewhere (Linux, S3) they are two rows."""
    from heygem_ray import storage

    table = pa.table({"id": ["Intro", "intro", "Outro"], "audio": ["/a.wav"] * 3, "avatar": ["/v.mp4"] * 3})
    assert not [r.refused for r in rows_from_table(table, "/out") if r.refused]
    blind = rows_from_table(table, "/out", case_blind=True)
    assert [bool(r.refused) for r in blind] == [True, True, False]
    assert "share files on the output's file system" in (blind[0].refused or "")
    outputs = pa.table(
        {"audio": ["/a.wav", "/b.wav", "/c.wav"], "avatar": ["/v.mp4"] * 3, "output": ["A.mp4", "a.mp4", "b.mp4"]}
    )
    refused = [r.refused or "" for r in rows_from_table(outputs, "/out", case_blind=True)]
    assert "output /out/A.mp4 is also that of row(s) 1" in refused[0] and refused[2] == ""
    # the output root's file system is asked (this one tells case apart), and leaves nothing there
    assert storage.case_blind(str(tmp_path / "out")) is False and os.listdir(tmp_path / "out") == []
    assert storage.case_blind("s3://bucket/out") is False
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(table, manifest)
    monkeypatch.setattr(storage, "case_blind", lambda uri: True)  # as on an SMB share
    assert [bool(r.refused) for r in read_manifest(manifest, str(tmp_path / "out"))] == [True, True, False]


def test_a_row_whose_output_is_the_manifest_itself_is_refused(tmp_path):
    """A manifest kept in its output root, a row given `output = campaign.parquet`: the run
    replaced its own manifest with a video, said ok, and no rerun could read it again. On a
    case-blind file system an input named in another case is the same file."""
    out = tmp_path / "out"
    out.mkdir()
    manifest = str(out / "campaign.parquet")
    cells = {"id": ["a", "b"], "audio": ["/a.wav", "/b.wav"], "avatar": ["/v.mp4"] * 2}
    pq.write_table(pa.table({**cells, "output": ["a.mp4", "campaign.parquet"]}), manifest)
    rows = read_manifest(manifest, str(out))
    assert rows[0].refused is None
    assert f"output {manifest} is the campaign's manifest" in (rows[1].refused or "")
    blind = rows_from_table(pa.table({**cells, "output": ["a.mp4", "/V.mp4"]}), "/", case_blind=True)
    assert "is one of the campaign's inputs" in (blind[1].refused or "")


def test_box_column_accepts_lists_and_strings():
    rows = rows_from_table(table(audio=["a", "b"], avatar=["v", "v"], box=["10,20,110,140", None]), "/o")
    assert rows[0].box == (10, 20, 110, 140) and rows[1].box is None


def test_missing_and_unreadable_manifest(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(str(tmp_path / "nope.parquet"), "/o")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        read_manifest(str(tmp_path / "bad.parquet"), "/o")


def test_build_manifest_cross_product_from_globs(tmp_path):
    for name in ("n1.wav", "n2.wav", "p1.mp4", "p2.mp4", "my.photo.v2.png"):
        (tmp_path / name).write_bytes(b"x")
    out = str(tmp_path / "m.parquet")
    assert (
        build_manifest([str(tmp_path / "*.wav")], [str(tmp_path / "p*.mp4"), str(tmp_path / "my.photo.v2.png")], out)
        == 6
    )
    got = pq.read_table(out).to_pylist()
    assert [r["id"] for r in got][:3] == ["n1__p1", "n1__p2", "n1__my.photo.v2"]
    assert len(read_manifest(out, str(tmp_path))) == 6
    with pytest.raises(ManifestError, match="matches no files"):
        build_manifest([str(tmp_path / "*.mp3")], [str(tmp_path / "p1.mp4")], out)
    # the ids it makes are ids read_manifest takes: no leading "_", never over 200 characters
    long = "n" * 190
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "_intro.wav").write_bytes(b"x")
        (tmp_path / folder / f"{long}.png").write_bytes(b"x")
    assert build_manifest([str(tmp_path / "*" / "_intro.wav")], [str(tmp_path / "*" / "*.png")], out) == 4
    ids = [r.id for r in read_manifest(out, str(tmp_path))]
    assert all(i.startswith("intro__nnn") and len(i) <= 200 for i in ids) and len(set(ids)) == 4


def test_ids_and_derived_names_keep_any_script(tmp_path):
    """Names were kept to ASCII: narrations "张三.wav" and "Привет.wav" over "王五.mp4" made rows
    `x__x` and `x__x-<hash>`, and nothing told which video was which. Any script's letters, digits
    and marks are kept (Devanagari's vowel signs are marks); an id is one Unicode form (a Mac's
    decomposed "é" is the same id), at most 200 bytes (files are named by it); emoji, blanks and
    direction overrides are not id characters."""
    import unicodedata

    names = ["张三.wav", "Привет.wav", "नमस्ते.wav", "王五.mp4"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    out = str(tmp_path / "m.parquet")
    build_manifest([str(tmp_path / "*.wav")], [str(tmp_path / "*.mp4")], out)
    assert sorted(r.id for r in read_manifest(out, str(tmp_path))) == sorted(
        ["张三__王五", "Привет__王五", "नमस्ते__王五"]
    )
    cells = {
        "id": [unicodedata.normalize("NFD", "café"), "Ünïcode-1", "é" * 101, "🎬clip", "a\u202eb", "日本語" * 22],
        "audio": [f"/a{i}.wav" for i in range(6)],
        "avatar": ["/v.mp4"] * 6,
    }
    rows = rows_from_table(pa.table(cells), "/out")
    assert rows[0].id == "café" and rows[0].output == "/out/café.mp4" and not rows[0].refused
    assert rows[1].id == "Ünïcode-1" and not rows[1].refused
    assert [bool(r.refused) for r in rows[2:]] == [True, True, True, False]  # 202 bytes; emoji; override; 198
    long = "长" * 70  # 210 bytes: a derived id is cut to whole characters within 200
    (tmp_path / f"{long}.wav").write_bytes(b"x")
    build_manifest([str(tmp_path / f"{long}.wav")], [str(tmp_path / "*.mp4")], out)
    (derived,) = read_manifest(out, str(tmp_path))
    assert derived.refused is None and derived.id == "长" * 66 and len(derived.id.encode()) == 198


def test_a_file_whose_name_holds_glob_characters_is_that_file(tmp_path):
    """yt-dlp names a download "title [id].mp4": taken for a pattern, "[abc]" matched "clip a.mp4"
    beside it, and the manifest silently named the wrong presenter (or none, and the command
    failed saying the file it was given matches nothing)."""
    for name in ("clip [abc].mp4", "clip a.mp4", "n1.wav"):
        (tmp_path / name).write_bytes(b"x")
    out = str(tmp_path / "m.parquet")
    assert build_manifest([str(tmp_path / "n1.wav")], [str(tmp_path / "clip [abc].mp4")], out) == 1
    assert pq.read_table(out).to_pylist()[0]["avatar"] == str(tmp_path / "clip [abc].mp4")
    assert build_manifest([str(tmp_path / "n1.wav")], [str(tmp_path / "clip [ab].mp4")], out) == 1  # a pattern
    assert pq.read_table(out).to_pylist()[0]["avatar"] == str(tmp_path / "clip a.mp4")


def test_manifest_through_fsspec_memory():
    import fsspec

    with fsspec.open("memory://campaign/m.parquet", "wb") as fh:
        pq.write_table(table(audio=["memory://a.wav"], avatar=["memory://v.mp4"], id=["one"]), fh)
    rows = read_manifest("memory://campaign/m.parquet", "memory://campaign/out")
    assert rows[0].output == "memory://campaign/out/one.mp4"


# ------------------------------------------------------------------ properties (hypothesis)
from hypothesis import given, settings
from hypothesis import strategies as st

uri = st.from_regex(r"(s3://b/|/data/)[a-z0-9_]{1,12}\.(wav|mp4|png)", fullmatch=True)
safe_id = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(uri, uri, safe_id), min_size=1, max_size=30, unique_by=lambda t: t[2]))
def test_any_valid_manifest_reads_to_one_row_each(entries):
    rows = rows_from_table(
        table(audio=[a for a, _, _ in entries], avatar=[v for _, v, _ in entries], id=[i for _, _, i in entries]),
        "s3://out/c",
    )
    assert [r.id for r in rows] == [i for _, _, i in entries]
    assert len({r.output for r in rows}) == len(rows)
    assert all(r.output.startswith("s3://out/c/") for r in rows)


cell = st.one_of(st.none(), st.just(""), uri, st.text(max_size=8))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(cell, cell, st.one_of(st.none(), st.text(max_size=8), safe_id)), min_size=1, max_size=12),
    st.sampled_from(["audio", "avatar", None]),
)
def test_any_manifest_either_reads_or_says_why(entries, drop):
    cols = {"audio": [a for a, _, _ in entries], "avatar": [v for _, v, _ in entries], "id": [i for _, _, i in entries]}
    if drop:
        del cols[drop]
    words = ("lacks", "empty", "also that of", "must", "outside", "no row", "control", "same audio", "inputs")
    try:
        rows = rows_from_table(pa.table(cols), "/out")
    except ManifestError as exc:
        assert str(exc).strip()  # a message a person can act on
        assert any(word in str(exc) for word in words)
    else:
        assert drop is None and len(rows) == len(entries)
        assert any(not r.refused for r in rows)
        assert all(r.audio and r.avatar for r in rows if not r.refused)
        assert all(any(word in r.refused for word in words) for r in rows if r.refused)
        assert len({r.id for r in rows}) == len(rows)  # each result names one row


def test_a_column_given_twice_is_a_manifest_error():
    """pyarrow writes a table with two `id` columns (pandas does not): it is the manifest's fault,
    said as such (exit 2), not a traceback."""
    twice = pa.Table.from_arrays(
        [pa.array(["a.wav"]), pa.array(["v.mp4"]), pa.array(["x"])], names=["audio", "avatar", "audio"]
    )
    with pytest.raises(ManifestError, match="has the column.s. audio more than once"):
        rows_from_table(twice, "/o")


def test_relative_inputs_are_refused_in_a_ray_job_and_the_manifest_command_writes_absolute_paths(tmp_path, monkeypatch):
    """A `ray job submit` entrypoint and its workers run in Ray's copy of the working directory,
    which holds no media: a relative input there names nothing (or another file), so its row is
    refused saying why. `heygem-ray manifest` writes local paths absolute, as its globs give them,
    so a file named both ways is one file, one row."""
    rows = rows_from_table(table(audio=["narr/a.wav", "/abs/b.wav"], avatar=["v.mp4", "/abs/v.mp4"]), "/o")
    assert all(r.refused is None for r in rows)  # outside a job: relative to where the campaign starts
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    rows = rows_from_table(table(audio=["narr/a.wav", "/abs/b.wav"], avatar=["v.mp4", "/abs/v.mp4"]), "/o")
    assert "audio 'narr/a.wav' is a relative path: a Ray job runs in Ray's copy" in rows[0].refused
    assert rows[1].refused is None
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "narr").mkdir()
    (tmp_path / "narr" / "a.wav").write_bytes(b"x")
    (tmp_path / "p1.mp4").write_bytes(b"x")
    out = str(tmp_path / "m.parquet")
    assert build_manifest(["narr/a.wav"], ["p1.mp4", str(tmp_path / "p*.mp4")], out) == 1
    (row,) = pq.read_table(out).to_pylist()
    assert (row["audio"], row["avatar"]) == (str(tmp_path / "narr" / "a.wav"), str(tmp_path / "p1.mp4"))


def test_the_manifest_command_takes_media_files_only_and_renames_no_row_it_had(tmp_path):
    """`--audio 'aud/*'` took .DS_Store, notes and sub-folders as narrations (rows failing one by
    one once the cluster was up); a folder or a missing file was written as it was; and one new
    file whose stem repeated another's renamed every row of a rebuilt manifest (its videos too),
    then the row whose stem it repeated (rendered again, its old video left behind)."""
    aud = tmp_path / "aud"
    (aud / "sub").mkdir(parents=True)
    for name in ("a.wav", "b.wav", ".DS_Store", "sub/c.wav"):
        (aud / name).write_bytes(b"x")
    (tmp_path / "p.mp4").write_bytes(b"x")
    out = str(tmp_path / "m.parquet")
    assert build_manifest([str(aud / "*")], [str(tmp_path / "p.mp4")], out) == 2
    assert [r["id"] for r in pq.read_table(out).to_pylist()] == ["a__p", "b__p"]
    (aud / "a.mp3").write_bytes(b"x")  # the same stem as a.wav
    assert build_manifest([str(aud / "*")], [str(tmp_path / "p.mp4")], out) == 3
    rows = pq.read_table(out).to_pylist()
    ids = {os.path.basename(r["audio"]): r["id"] for r in rows}
    # a.wav keeps the id the manifest gave it (its video is not rendered again under another)
    assert ids["a.wav"] == "a__p" and ids["b.wav"] == "b__p" and ids["a.mp3"].startswith("a__p-")
    edited = pq.read_table(out).to_pydict()  # an id edited by hand into one no run takes is not kept
    edited["id"][0] = "intro en/v2"
    pq.write_table(pa.table(edited), out)
    assert build_manifest([str(aud / "*")], [str(tmp_path / "p.mp4")], out) == 3
    assert "intro en/v2" not in pq.read_table(out).column("id").to_pylist()
    # what is no Parquet manifest is not written over; once removed, built anew: both get a hash
    (tmp_path / "m.parquet").write_text("id,audio,avatar\n")
    with pytest.raises(ManifestError, match="exists and is no manifest"):
        build_manifest([str(aud / "*")], [str(tmp_path / "p.mp4")], out)
    (tmp_path / "m.parquet").unlink()
    assert build_manifest([str(aud / "*")], [str(tmp_path / "p.mp4")], out) == 3
    ids = [r["id"] for r in pq.read_table(out).to_pylist()]
    assert ids[2] == "b__p" and ids[0].startswith("a__p-") and ids[1].startswith("a__p-") and ids[0] != ids[1]
    with pytest.raises(ManifestError, match="is a folder: give its files"):
        build_manifest([str(aud)], [str(tmp_path / "p.mp4")], out)
    # nor in a hidden folder a pattern reaches (a .Trash), though one named in its fixed part is taken
    (aud / ".Trash").mkdir()
    (aud / ".Trash" / "old.wav").write_bytes(b"x")
    (aud / "sub" / ".cache").mkdir()
    (aud / "sub" / ".cache" / "d.wav").write_bytes(b"x")
    for pattern in (aud / "*" / "*.wav", aud / "**" / "*.wav"):
        assert build_manifest([str(pattern)], [str(tmp_path / "p.mp4")], out) == (1 if "**" not in str(pattern) else 3)
    assert build_manifest([str(aud / ".Trash" / "*.wav")], [str(tmp_path / "p.mp4")], out) == 1
    # and a hidden name the pattern gives with its dot, as a shell's glob takes it (it matched nothing)
    (aud / ".intro.wav").write_bytes(b"x")
    assert build_manifest([str(aud / ".intro.w[a]v")], [str(tmp_path / "p.mp4")], out) == 1
    assert build_manifest([str(aud / ".*" / "*.wav")], [str(tmp_path / "p.mp4")], out) == 1  # .Trash's, not .intro
    assert build_manifest([str(aud / "*.wav")], [str(tmp_path / "p.mp4")], out) == 2  # a.wav, b.wav: no .intro
    # a hidden folder named with its dot between two `**`: taken there, and only there
    (aud / "sub" / ".cache" / "deep").mkdir()
    (aud / "sub" / ".cache" / "deep" / "e.wav").write_bytes(b"x")
    assert build_manifest([str(aud / "**" / ".cache" / "**" / "*.wav")], [str(tmp_path / "p.mp4")], out) == 2
    with pytest.raises(ManifestError, match="nosuch.wav does not exist"):
        build_manifest([str(tmp_path / "nosuch.wav")], [str(tmp_path / "p.mp4")], out)


def test_column_names_are_read_without_a_byte_order_mark_spaces_or_case():
    """A spreadsheet's UTF-8 CSV keeps a byte-order mark in its first header: the manifest "lacked
    the column audio" while listing audio among those it had."""
    rows = rows_from_table(
        pa.table({"\ufeffaudio": ["/data/a.wav"], " Avatar ": ["/data/v.mp4"], "ID": ["one"]}), "/out"
    )
    assert [(r.id, r.audio, r.avatar) for r in rows] == [("one", "/data/a.wav", "/data/v.mp4")]


def test_a_spreadsheets_blank_cells_and_columns_mean_the_defaults():
    """A CSV made into Parquet by pandas: a blank `output` column arrives as numbers (NaN), and the
    whole campaign stopped ("must hold strings, not double"); a blank `box` cell refused its row;
    an id typed with a space before it was refused."""
    nan = float("nan")
    table = pa.Table.from_pydict(
        {
            "id": [" one", "two ", None],
            "audio": ["/d/a.wav", "/d/b.wav", "/d/c.wav"],
            "avatar": ["/d/v.mp4"] * 3,
            "output": pa.array([nan, nan, nan], pa.float64(), from_pandas=True),
            "box": ["", " ", "1,2,30,40"],
        }
    )
    rows = rows_from_table(table, "/out")
    assert [(r.id, r.output, r.box, r.refused) for r in rows] == [
        ("one", "/out/one.mp4", None, None),
        ("two", "/out/two.mp4", None, None),
        (default_id("/d/c.wav", "/d/v.mp4"), f"/out/{default_id('/d/c.wav', '/d/v.mp4')}.mp4", (1, 2, 30, 40), None),
    ]
    with pytest.raises(ManifestError, match="must hold strings, not double"):  # a numbers column is still refused
        rows_from_table(table.set_column(3, "output", pa.array([1.0, nan, nan], from_pandas=True)), "/out")


def test_a_misspelled_column_is_refused_not_left_aside():
    """`outptu` and `boxes` were left aside: every video went to the default path, every face to the
    detector, and the run said nothing. A column of the campaign's own (notes) stays aside."""
    table = {"audio": ["/d/a.wav"], "avatar": ["/d/v.mp4"], "outptu": ["x.mp4"], "boxes": ["1,2,30,40"]}
    with pytest.raises(ManifestError) as refused:
        rows_from_table(pa.table(table), "/out")
    assert "'outptu' is not one heygem_ray reads: did you mean 'output'?" in str(refused.value)
    assert "'boxes' is not one heygem_ray reads: did you mean 'box'?" in str(refused.value)
    (row,) = rows_from_table(pa.table({"audio": ["/d/a.wav"], "avatar": ["/d/v.mp4"], "notes": ["take 2"]}), "/out")
    assert row.refused is None
    # a campaign's own ids (a customer's `uid`, an `idx`) are one letter from `id`, but no slip of it:
    # refusing them stopped the whole campaign
    own = {"audio": ["/d/a.wav"], "avatar": ["/d/v.mp4"], "uid": ["c-1"], "idx": [3], "inbox": ["x"], "ad": ["y"]}
    (row,) = rows_from_table(pa.table(own), "/out")
    assert row.refused is None
    with pytest.raises(ManifestError, match="'ouptut' is not one heygem_ray reads: did you mean 'output'"):
        rows_from_table(pa.table({"audio": ["/d/a.wav"], "avatar": ["/d/v.mp4"], "ouptut": ["x.mp4"]}), "/out")


def test_an_output_named_as_the_campaigns_own_files_in_another_case_is_refused():
    """On a case-blind disk (macOS, Windows, SMB) `_Results.parquet` is the campaign's results table."""
    table = {"audio": ["/d/a.wav", "/d/b.wav"], "avatar": ["/d/v.mp4"] * 2, "output": ["_Results.parquet", "ok.mp4"]}
    rows = rows_from_table(pa.table(table), "/out")
    assert "is where the campaign keeps _Results.parquet" in (rows[0].refused or "") and rows[1].refused is None


def test_a_rows_video_goes_under_the_output_root_as_given_as_the_campaigns_own_files_do():
    """The root is compared normalized, but a row's video is joined onto it as given: on S3
    `bucket//x/` and `bucket/x/` are other keys, and the videos went beside, not into, the root."""
    from heygem_ray import storage

    (row,) = rows_from_table(pa.table({"id": ["r1"], "audio": ["/d/a.wav"], "avatar": ["/d/v.mp4"]}), "s3://b//x/")
    assert row.refused is None and row.output == storage.join("s3://b//x/", "r1.mp4")
    # a row's own `//` (relative, or below the root written out) is refused: its key is not the one
    # every check reads
    cells = {"id": ["r1", "r2", "r3"], "audio": ["/d/a.wav"] * 3, "avatar": ["/d/v.mp4"] * 3}
    rows = rows_from_table(pa.table({**cells, "output": ["c//a.mp4", "s3://b/x//b.mp4", "c/c.mp4"]}), "s3://b/x")
    assert [r.refused for r in rows] == [
        "manifest row 0: output s3://b/x/c//a.mp4 holds an empty name (//)",
        "manifest row 1: output s3://b/x//b.mp4 holds an empty name (//)",
        None,
    ]


def test_a_scheme_nothing_here_reads_is_said_plainly(tmp_path, capsys):
    """`gs://` without gcsfs, or a scheme fsspec does not know: a traceback ending in ImportError or
    "Protocol not known", exit 1; now the row, or the command, says which scheme and why."""
    from heygem_ray.cli import manifest_main, render_main

    rows = rows_from_table(pa.table({"audio": ["foo://b/a.wav", "/d/b.wav"], "avatar": ["/d/v.mp4"] * 2}), "/out")
    assert "foo:// is no storage scheme fsspec knows" in (rows[0].refused or "") and rows[1].refused is None
    assert render_main(["manifest=/data/m.parquet", "output=foo://bucket/run", "cluster=inline"]) == 2
    assert "output foo://bucket/run: foo:// is no storage scheme fsspec knows" in capsys.readouterr().err
    assert manifest_main(["--audio", "foo://b/*.wav", "--avatar", "/v.png", "--out", str(tmp_path / "m.parquet")]) == 2
    assert "foo:// is no storage scheme" in capsys.readouterr().err


def test_the_manifest_command_takes_every_flag_and_writes_over_nothing_but_a_manifest(tmp_path, capsys):
    """`--audio a --audio b` kept b alone; `--out` wrote over whatever was there (a presenter, the
    user's notes); a rebuild's glob took the manifest it had written for a presenter; a link to
    nothing became a row that failed; a Latin-1 name from a Windows zip ended in a traceback."""
    import os

    from heygem_ray.cli import manifest_main

    for name in ("n1.wav", "n2.wav", "p/p1.mp4", "p/p2.mp4"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    n1, n2, p1, p2 = (str(tmp_path / n) for n in ("n1.wav", "n2.wav", "p/p1.mp4", "p/p2.mp4"))
    out = str(tmp_path / "p" / "campaign.parquet")
    assert manifest_main(["--audio", n1, "--audio", n2, "--avatar", p1, "--avatar", p2, "--out", out]) == 0
    assert len(pq.read_table(out)) == 4
    glob = str(tmp_path / "p" / "*")
    assert manifest_main(["--audio", n1, "--avatar", glob, "--out", out]) == 0  # over its own: itself no presenter
    assert [r["avatar"] for r in pq.read_table(out).to_pylist()] == [p1, p2]
    capsys.readouterr()
    for wrong in (p1, str(tmp_path / "notes.parquet")):
        if wrong.endswith(".parquet"):
            (tmp_path / "notes.parquet").write_text("my notes")
        assert manifest_main(["--audio", n1, "--avatar", p1, p2, "--out", wrong]) == 2
        said = capsys.readouterr().err
        assert "is one of the inputs" in said if wrong == p1 else "is no manifest" in said, said
    assert (tmp_path / "p" / "p1.mp4").read_bytes() == b"x" and (tmp_path / "notes.parquet").read_text() == "my notes"
    os.symlink(str(tmp_path / "moved.mp4"), str(tmp_path / "p" / "gone.mp4"))
    assert manifest_main(["--audio", n1, "--avatar", glob, "--out", out]) == 2
    assert "matches link(s) to nothing" in capsys.readouterr().err
    os.remove(tmp_path / "p" / "gone.mp4")
    latin1 = os.fsdecode(str(tmp_path / "p").encode() + b"/caf\xe9.mp4")
    with open(latin1, "wb") as fh:
        fh.write(b"x")
    assert manifest_main(["--audio", n1, "--avatar", glob, "--out", out]) == 2
    assert r"not UTF-8: 'caf\udce9.mp4' (rename them)" in capsys.readouterr().err
    assert manifest_main(["--audio", n1, "--avatar", latin1, "--out", out]) == 2  # as a shell's glob gives it
    assert r"not UTF-8: 'caf\udce9.mp4'" in capsys.readouterr().err
    os.remove(latin1)
    # the folder reached through a link (a shell's $PWD, macOS's /tmp): its own --out is still itself
    os.symlink(str(tmp_path / "p"), str(tmp_path / "linked"))
    assert manifest_main(["--audio", n1, "--avatar", str(tmp_path / "linked" / "*"), "--out", out]) == 0
    assert len(pq.read_table(out)) == 2


def test_a_manifest_made_by_hand_is_not_written_over(tmp_path):
    """`heygem-ray manifest --out` took any Parquet file with id, audio and avatar columns for one
    it wrote: a campaign's own manifest (8 rows, their boxes and notes) came out as the one new
    row, the rest lost. It writes over its own manifests alone (and those of its three columns,
    written before it marked them)."""
    (tmp_path / "a.wav").write_bytes(b"x")
    (tmp_path / "p.mp4").write_bytes(b"x")
    curated = tmp_path / "curated.parquet"
    rows = {"id": ["intro", "outro"], "audio": ["s3://b/1.wav", "s3://b/2.wav"], "avatar": ["s3://b/p.mp4"] * 2}
    pq.write_table(pa.table({**rows, "box": [[0, 0, 9, 9], None], "notes": ["customer 42", ""]}), curated)
    before = curated.read_bytes()
    with pytest.raises(ManifestError, match="exists and is no manifest"):
        build_manifest([str(tmp_path / "a.wav")], [str(tmp_path / "p.mp4")], str(curated))
    assert curated.read_bytes() == before
    pandas_written = pa.table(rows).replace_schema_metadata({b"pandas": b"{}"})  # another writer's, its columns alone
    pq.write_table(pandas_written, curated)
    with pytest.raises(ManifestError, match="exists and is no manifest"):
        build_manifest([str(tmp_path / "a.wav")], [str(tmp_path / "p.mp4")], str(curated))
    out = str(tmp_path / "m.parquet")
    assert build_manifest([str(tmp_path / "a.wav")], [str(tmp_path / "p.mp4")], out) == 1
    assert build_manifest([str(tmp_path / "*.wav")], [str(tmp_path / "p.mp4")], out) == 1  # its own: rebuilt
    ours = pq.read_table(out)  # given a column of the user's since (its mark kept by pyarrow): theirs now
    pq.write_table(ours.append_column("notes", pa.array(["keep me"])), out)
    with pytest.raises(ManifestError, match="exists and is no manifest"):
        build_manifest([str(tmp_path / "a.wav")], [str(tmp_path / "p.mp4")], out)
    assert pq.read_table(out).column("notes").to_pylist() == ["keep me"]
    with pytest.raises(ManifestError, match="the manifest is a Parquet file: end its name in .parquet"):
        build_manifest([str(tmp_path / "a.wav")], [str(tmp_path / "p.mp4")], str(tmp_path / "m.csv"))
    assert not (tmp_path / "m.csv").exists()


def test_an_output_ending_in_a_slash_is_a_folder_for_the_rows_video_and_a_folder_of_another_is_refused():
    """An output cell `newdir/` wrote the video as a file named `newdir`; one row's output in a
    folder another row's output names (`a.mp4/x.mp4` beside `a.mp4`) rendered whole before one of
    them failed, its segments left behind."""
    cells = [
        {**GOOD, "id": "a", "output": "newdir/"},
        {**GOOD, "id": "b", "audio": "b.wav", "output": "a.mp4"},
        {**GOOD, "id": "c", "audio": "c.wav", "output": "a.mp4/c.mp4"},
    ]
    rows = rows_from_table(pa.Table.from_pylist(cells), "/out")
    assert rows[0].output == "/out/newdir/a.mp4" and rows[0].refused is None
    assert rows[1].refused is None
    assert "output /out/a.mp4/c.mp4 is in a folder that is row 1's output" in (rows[2].refused or "")
