import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from heygem_ray.errors import ManifestError
from heygem_ray.manifest import build_manifest, default_id, read_manifest, rows_from_table


def table(**cols):
    return pa.table(cols)


def test_defaults_id_and_output_under_root():
    rows = rows_from_table(table(audio=["a.wav"], avatar=["v.mp4"]), "/out")
    assert rows[0].id == default_id("a.wav", "v.mp4") and len(rows[0].id) == 12
    assert rows[0].output == f"/out/{rows[0].id}.mp4"
    assert default_id("a.wav", "v.mp4") == rows_from_table(table(audio=["a.wav"], avatar=["v.mp4"]), "/x")[0].id


def test_explicit_and_relative_outputs():
    rows = rows_from_table(table(audio=["a", "b", "c"], avatar=["v", "v", "v"], id=["r1", "r2", "r3"],
                                 output=["s3://bucket/x.mp4", "sub/y.mp4", None]), "s3://camp")
    assert [r.output for r in rows] == ["s3://bucket/x.mp4", "s3://camp/sub/y.mp4", "s3://camp/r3.mp4"]


@pytest.mark.parametrize("cols, message", [
    ({"audio": ["a"]}, "lacks required column(s) avatar"),
    ({"audio": ["a", "b"], "avatar": ["v", "v"], "id": ["x", "x"]}, "duplicate ids: x"),
    ({"audio": ["a", "b"], "avatar": ["v", "w"], "output": ["o.mp4", "o.mp4"]}, "duplicate outputs"),
    ({"audio": ["a", None], "avatar": ["v", "w"]}, "row 1: empty audio"),
    ({"audio": [1, 2], "avatar": ["v", "w"]}, "column 'audio' must hold strings"),
    ({"audio": ["a"], "avatar": ["v"], "id": ["../etc"]}, "must be 1-200 letters"),
    ({"audio": ["a"], "avatar": ["v"], "box": [[1, 2, 3]]}, "must be x1, y1, x2, y2"),
])
def test_invalid_manifests_are_rejected_with_the_reason(cols, message):
    with pytest.raises(ManifestError, match=None) as err:
        rows_from_table(pa.table(cols), "/out")
    assert message in str(err.value)


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
    assert build_manifest([str(tmp_path / "*.wav")], [str(tmp_path / "p*.mp4"), str(tmp_path / "my.photo.v2.png")], out) == 6
    got = pq.read_table(out).to_pylist()
    assert [r["id"] for r in got][:3] == ["n1__p1", "n1__p2", "n1__my.photo.v2"]
    assert len(read_manifest(out, str(tmp_path))) == 6
    with pytest.raises(ManifestError, match="matches no files"):
        build_manifest([str(tmp_path / "*.mp3")], [str(tmp_path / "p1.mp4")], out)


def test_manifest_through_fsspec_memory():
    import fsspec

    with fsspec.open("memory://campaign/m.parquet", "wb") as fh:
        pq.write_table(table(audio=["memory://a.wav"], avatar=["memory://v.mp4"], id=["one"]), fh)
    rows = read_manifest("memory://campaign/m.parquet", "memory://campaign/out")
    assert rows[0].output == "memory://campaign/out/one.mp4"
