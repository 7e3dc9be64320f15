import contextlib
import errno
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from heygem_ray import storage
from heygem_ray.errors import InputError, reading, writing
from heygem_ray.prepare import content_fingerprint


def test_fingerprint_is_content_only_across_storages(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"hello" * 1000)
    storage.write_bytes("memory://fp/b.bin", b"hello" * 1000)
    assert storage.fingerprint(str(tmp_path / "a.bin")) == storage.fingerprint("memory://fp/b.bin")
    storage.write_bytes("memory://fp/c.bin", b"hello" * 999 + b"hellp")
    assert storage.fingerprint("memory://fp/c.bin") != storage.fingerprint("memory://fp/b.bin")


def test_fingerprint_memo_follows_changes(tmp_path):
    path = tmp_path / "in.wav"
    path.write_bytes(b"one")
    cache = str(tmp_path / "cache")
    first = content_fingerprint(str(path), cache)
    assert len(os.listdir(tmp_path / "cache" / "fingerprints")) == 1
    assert content_fingerprint(str(path), cache) == first
    path.write_bytes(b"two!")  # new size and mtime: a new memo entry, a new fingerprint
    assert content_fingerprint(str(path), cache) != first
    path.write_bytes(b"")
    with pytest.raises(InputError, match="is empty"):
        content_fingerprint(str(path), cache, "audio")


def test_a_local_input_replaced_at_its_size_and_mtime_has_a_new_fingerprint(tmp_path):
    """`cp -p`, `rsync -a` or an archive unpacked puts other bytes of the same size under the old
    mtime: the memo, kept by URI, size and mtime, gave the old fingerprint, and finished rows of
    the old bytes were skipped. The inode or change time tells the files apart."""
    path = tmp_path / "in.wav"
    path.write_bytes(b"one")
    cache = str(tmp_path / "cache")
    first = content_fingerprint(str(path), cache)
    stamp = os.stat(path)
    replacement = tmp_path / "new.wav"
    replacement.write_bytes(b"two")  # the same size
    os.utime(replacement, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    os.replace(replacement, path)
    assert os.stat(path).st_mtime_ns == stamp.st_mtime_ns and os.path.getsize(path) == stamp.st_size
    assert content_fingerprint(str(path), cache) != first


def test_an_object_replaced_while_it_is_downloaded_is_not_kept_under_the_old_version(tmp_path, monkeypatch):
    """A download asks for no version (a large one is many ranged reads): an object replaced between
    the store's answer and the read came down as the new bytes, kept on the node, and hashed into
    the fingerprint memo, under the old version's key, for every later use of the old bytes."""
    from heygem_ray import prepare

    uri = "memory://replaced-while-read/presenter.mp4"
    storage.write_bytes(uri, b"A" * 4096)
    taken = storage.info(uri)  # the version the campaign took
    storage.write_bytes(uri, b"B" * 4096)  # replaced before the bytes are read: the same size
    assert storage.version_key(uri, storage.fresh_info(uri)) != storage.version_key(uri, taken)
    node = str(tmp_path / "node")
    with pytest.raises(storage.ContentChanged, match="changed while it was being read"):
        storage.local_copy(uri, node, info=taken)
    assert [name for name in os.listdir(node) if name.endswith(".mp4")] == []  # nothing kept
    # a local file (hashed where it is: no download to check) replaced while it is hashed
    path = tmp_path / "narration.wav"
    path.write_bytes(b"A" * 4096)
    taken, real = storage.info(str(path)), storage.fingerprint

    def hashed_then_replaced(local: str) -> str:
        fp = real(local)
        (tmp_path / "new.wav").write_bytes(b"B" * 4096)
        os.replace(tmp_path / "new.wav", path)
        return fp

    monkeypatch.setattr(storage, "fingerprint", hashed_then_replaced)
    key = storage.change_key(str(path), taken) or ""
    with pytest.raises(storage.ContentChanged, match="changed while it was being read"):
        prepare._memoised_fingerprint(str(path), taken, str(tmp_path / "cache"), key)
    assert not os.path.exists(tmp_path / "cache" / "fingerprints")


def test_rows_of_one_narration_look_up_its_fingerprint_once_per_process(tmp_path, media_dir, monkeypatch):
    """One narration over thousands of presenters: each row's preparation read the narration's
    fingerprint memo (a GET on an object store) and asked for the file's version twice (once for
    the row, once more to decode it); now the memo once per process, the version once per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpers import compose_config
    from heygem_ray import prepare
    from heygem_ray.manifest import read_manifest

    audio, avatar = str(media_dir / "speech3.wav"), str(media_dir / "still.png")
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"id": ["a", "b", "c"], "audio": [audio] * 3, "avatar": [avatar] * 3}), manifest)
    cfg = compose_config(f"manifest={manifest}", f"output={tmp_path / 'out'}")
    rows = read_manifest(cfg.manifest, cfg.output)
    prepare.prepare_row(rows[0], cfg)  # the memo is written
    monkeypatch.setattr(prepare, "_fingerprints_seen", type(prepare._fingerprints_seen)())  # a new process
    memo_reads, infos = [], []
    read_bytes, info = storage.read_bytes, storage.info
    monkeypatch.setattr(storage, "read_bytes", lambda uri, *a: memo_reads.append(uri) or read_bytes(uri, *a))
    monkeypatch.setattr(storage, "info", lambda uri, *a: infos.append(uri) or info(uri, *a))
    preps = [prepare.prepare_row(row, cfg) for row in rows]
    assert len({p.audio.fingerprint for p in preps}) == 1 and all(p.audio.samples for p in preps)
    assert len([uri for uri in memo_reads if "/fingerprints/" in uri]) == 2  # the narration's, the still's
    assert infos.count(audio) == len(rows)


def test_a_narration_replaced_after_its_row_took_its_fingerprint_is_not_decoded_under_it(tmp_path, media_dir):
    """The decode goes into the cache shared by campaigns, named by the fingerprint: the new bytes
    under the old name would give a later row of the old narration another narration's lips."""
    import shutil

    from heygem_ray import prepare

    audio, cache = tmp_path / "n.wav", str(tmp_path / "cache")
    shutil.copy(media_dir / "speech3.wav", audio)
    taken = content_fingerprint(str(audio), cache, "audio")
    shutil.copy(media_dir / "speech4.wav", audio)  # replaced before the row decodes it
    with pytest.raises(InputError, match="was replaced while the campaign ran"):
        prepare.prepare_audio(str(audio), cache, fingerprint=taken)
    assert not os.path.exists(os.path.join(cache, "audio", f"{taken}{prepare.PCM_VERSION}.f32"))
    assert prepare.prepare_audio(str(audio), cache).samples == 4 * prepare.SAMPLE_RATE  # its own row, anew


def test_publish_is_atomic_and_leaves_no_temp_files(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100)
    dest = tmp_path / "deep" / "dir" / "out.mp4"
    storage.publish_file(str(src), str(dest))
    assert dest.read_bytes() == b"x" * 100
    assert os.listdir(dest.parent) == ["out.mp4"]


def test_a_publish_to_a_store_that_writes_as_bytes_arrive_shows_no_partial_file(tmp_path, monkeypatch):
    """SFTP, WebDAV, FTP or HDFS write a file where they are told as its bytes arrive (fsspec's
    memory store does the same, in this process): an upload cut off midway left a truncated video
    at the output path. It goes under a hidden temporary name and is renamed when whole,
    replacing the video there; a failed one leaves neither."""
    import fsspec
    from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024))
    monkeypatch.setattr(MemoryFileSystem, "blocksize", 1024)  # three writes
    storage.write_bytes("memory://pub/out/old.mp4", b"the earlier video")
    storage.publish_file(str(src), "memory://pub/out/old.mp4")
    assert storage.read_bytes("memory://pub/out/old.mp4") == src.read_bytes()
    assert sorted(fsspec.filesystem("memory").ls("/pub/out", detail=False)) == ["/pub/out/old.mp4"]

    writes = []
    write = MemoryFile.write

    def cut_off(self, data):
        writes.append(len(data))
        if len(writes) == 2:
            raise PermissionError("connection closed by the server")
        return write(self, data)

    monkeypatch.setattr(MemoryFile, "write", cut_off)
    with pytest.raises(PermissionError):
        storage.publish_file(str(src), "memory://pub/out/new.mp4")
    assert writes and not storage.exists("memory://pub/out/new.mp4")
    assert sorted(fsspec.filesystem("memory").ls("/pub/out", detail=False)) == ["/pub/out/old.mp4"]
    monkeypatch.setattr(MemoryFile, "write", write)

    rename = storage._rename

    def will_not_replace(fs, a, b):  # SFTP's plain rename: refused where the name is taken
        if fs.exists(b):
            raise OSError("rename: file exists")
        rename(fs, a, b)

    monkeypatch.setattr(storage, "_rename", will_not_replace)
    storage.write_bytes("memory://pub/out/old.mp4", b"the earlier video")
    storage.publish_file(str(src), "memory://pub/out/old.mp4")
    assert storage.read_bytes("memory://pub/out/old.mp4") == src.read_bytes()
    assert sorted(fsspec.filesystem("memory").ls("/pub/out", detail=False)) == ["/pub/out/old.mp4"]

    def renames_nothing(*args):  # an SFTP server without posix-rename
        raise OSError("rename: operation unsupported")

    storage.write_bytes("memory://pub/out/old.mp4", b"the earlier video")
    monkeypatch.setattr(storage, "_rename", renames_nothing)
    refused = pytest.raises(InputError, match="cannot be published whole .*operation unsupported")
    with refused, writing("memory://pub/out/fresh.mp4"):  # a row's output: failed, not retried
        storage.publish_file(str(src), "memory://pub/out/fresh.mp4")
    with pytest.raises(storage.NotPublished):  # never written in place, where a crash leaves half
        storage.publish_file(str(src), "memory://pub/out/old.mp4")
    # nor the video there before removed for a new one that cannot follow it
    assert storage.read_bytes("memory://pub/out/old.mp4") == b"the earlier video"
    assert sorted(fsspec.filesystem("memory").ls("/pub/out", detail=False)) == ["/pub/out/old.mp4"]

    def quietly_will_not_replace(fs, a, b):  # WebHDFS: "false" onto a taken name, and no error
        if not fs.exists(b):
            rename(fs, a, b)

    monkeypatch.setattr(storage, "_rename", quietly_will_not_replace)
    storage.publish_file(str(src), "memory://pub/out/old.mp4")  # the earlier video stayed, said published
    assert storage.read_bytes("memory://pub/out/old.mp4") == src.read_bytes()
    assert sorted(fsspec.filesystem("memory").ls("/pub/out", detail=False)) == ["/pub/out/old.mp4"]

    storage.write_bytes("memory://pub/out/old.mp4", b"the earlier video")
    renames = []

    def fails_at_the_last(fs, a, b):  # the old video moved aside, then the new one refused
        renames.append(b)
        if len(renames) == 3:
            raise PermissionError("quota exceeded")
        will_not_replace(fs, a, b)

    monkeypatch.setattr(storage, "_rename", fails_at_the_last)
    with pytest.raises(PermissionError):
        storage.publish_file(str(src), "memory://pub/out/old.mp4")
    assert storage.read_bytes("memory://pub/out/old.mp4") == b"the earlier video"  # both were lost

    monkeypatch.setattr(storage, "_rename", rename)
    long = "x" * 246 + ".mp4"  # 250 bytes: a name the store takes; its hidden part's took 265
    storage.publish_file(str(src), str(tmp_path / "pub" / long))
    assert (tmp_path / "pub" / long).read_bytes() == src.read_bytes()


def test_a_local_publish_reaches_the_disk_before_its_name_does(tmp_path, monkeypatch):
    """Renamed before its data was flushed, a file can come back empty after a power loss (delayed
    allocation): the data is synced before the rename, the folder's entry after it."""
    events = []
    sync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))), sync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(b))), replace(a, b)))
    src, dest = tmp_path / "src.bin", tmp_path / "out" / "video.mp4"
    src.write_bytes(b"x" * 100)
    storage.publish_file(str(src), str(dest))
    assert [kind for kind, _ in events] == ["sync", "rename", "sync"]
    assert os.path.basename(events[0][1]).startswith(".video.mp4.part-")
    assert events[1][1] == str(dest) and events[2][1] == str(dest.parent)


def test_a_moved_publish_takes_the_file_itself_and_gives_it_back_when_it_fails(tmp_path, monkeypatch):
    """A finished output is renamed into place, not copied (~0.5 GB for 3 minutes of 1080p); a
    publish that fails gives the caller its file back, so a retry finds it."""
    src, dest = tmp_path / "work" / "out.mp4", tmp_path / "final" / "video.mp4"
    src.parent.mkdir()
    src.write_bytes(b"v" * 1000)
    inode = src.stat().st_ino
    storage.publish_file(str(src), str(dest), move=True)
    assert not src.exists() and dest.stat().st_ino == inode and dest.read_bytes() == b"v" * 1000
    assert os.listdir(dest.parent) == ["video.mp4"]

    src.write_bytes(b"w" * 10)
    monkeypatch.setattr(storage, "RETRIES", 1)

    def refused(a: str, b: str) -> None:
        raise PermissionError(errno.EACCES, "refused", b)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(PermissionError):
        storage.publish_file(str(src), str(dest), move=True)
    assert src.read_bytes() == b"w" * 10 and dest.read_bytes() == b"v" * 1000
    assert sorted(os.listdir(dest.parent)) == ["video.mp4"]


def test_a_linked_publish_shares_the_file_and_leaves_the_callers(tmp_path, monkeypatch):
    """An upload the studio keeps in its cache goes into the store as a hard link, not a copy; where
    the file systems differ it is copied."""
    src, dest = tmp_path / "uploads" / "a.wav", tmp_path / "store" / "a.wav"
    src.parent.mkdir()
    src.write_bytes(b"a" * 1000)
    os.chmod(src, 0o600)  # as Gradio keeps an upload
    storage.publish_file(str(src), str(dest), link=True)
    assert src.exists() and dest.stat().st_ino == src.stat().st_ino and dest.read_bytes() == b"a" * 1000
    mask = os.umask(0o022)
    os.umask(mask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~mask  # a new file's mode: the store's readers read it
    assert os.listdir(dest.parent) == ["a.wav"]
    src.unlink()  # the cache emptied: the store's file stays
    assert dest.read_bytes() == b"a" * 1000

    src.write_bytes(b"b" * 10)

    def other_file_system(a: str, b: str) -> None:
        raise OSError(errno.EXDEV, "cross-device link", b)

    monkeypatch.setattr(os, "link", other_file_system)
    storage.publish_file(str(src), str(dest), link=True)
    assert dest.read_bytes() == b"b" * 10 and dest.stat().st_ino != src.stat().st_ino


def test_the_node_cache_keeps_to_its_size_dropping_the_copies_used_longest_ago(tmp_path, monkeypatch):
    """Every remote avatar, narration and checkpoint a node fetched used to stay on its disk for
    good: a long-lived cluster filled it. Past `HEYGEM_CACHE_GB` the copies used longest ago go,
    but never one used in the last minutes (a caller may be about to open it)."""
    monkeypatch.setenv("HEYGEM_CACHE_GB", str(2.5 * 1000 / 2**30))  # room for two 1000-byte copies
    monkeypatch.setattr(storage, "CACHE_GRACE_SECONDS", 0.0)
    for name in "abc":
        storage.write_bytes(f"memory://nc/{name}.wav", name.encode() * 1000)
    paths = {}
    for age, name in enumerate("abc"):
        paths[name] = storage.local_copy(f"memory://nc/{name}.wav", cache_dir=str(tmp_path))
        os.utime(paths[name], (1000.0 + age, 1000.0 + age))  # a used first, c last
        if name == "b":
            storage.local_copy("memory://nc/a.wav", cache_dir=str(tmp_path))  # a used again: now the newest
    assert os.path.exists(paths["a"]) and os.path.exists(paths["c"]) and not os.path.exists(paths["b"])
    assert sum(f.stat().st_size for f in tmp_path.iterdir() if f.suffix == ".wav") <= 2500
    os.utime(paths["c"])  # used now
    storage.trim_node_cache(str(tmp_path), 0, grace=3600)  # both used within the grace: kept
    assert os.path.exists(paths["a"]) and os.path.exists(paths["c"])
    storage.trim_node_cache(str(tmp_path), 0, grace=0)
    assert not [f for f in tmp_path.iterdir() if f.suffix == ".wav"]
    # partial files: one being written stays, one a killed writer left hours ago goes
    writing, left = tmp_path / "x.wav.part-1234abcd", tmp_path / "weights-y.pt.part-5678abcd"
    writing.write_bytes(b"x"), left.write_bytes(b"y")
    os.utime(left, (1000.0, 1000.0))
    storage.trim_node_cache(str(tmp_path), 10**9)
    assert writing.exists() and not left.exists()


def test_a_folder_in_the_node_cache_stops_no_trim_and_fingerprint_memos_are_trimmed(tmp_path, monkeypatch):
    """A folder in the node cache (a memo folder, an operator's) was taken for a copy: unlinking it
    raised, and every trim after stopped there, so the cache grew until the disk was full. Local
    model files' fingerprint memos sit in it as small files, trimmed as copies are."""
    monkeypatch.setenv("HEYGEM_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"w" * 1000)
    fp = storage.local_fingerprint(str(weights))
    (memo,) = (tmp_path / "cache").iterdir()
    assert memo.read_text() == fp and oct(os.stat(tmp_path / "cache").st_mode & 0o777) == "0o700"
    folder = tmp_path / "cache" / "kept"
    folder.mkdir()
    copy = tmp_path / "cache" / "old.mp4"
    copy.write_bytes(b"v" * 1000)
    for path in (folder, copy, memo):
        os.utime(path, (1000.0, 1000.0))
    storage.trim_node_cache(str(tmp_path / "cache"), 0, grace=0)
    assert not copy.exists() and not memo.exists() and folder.is_dir()


def test_local_copy_caches_remote_files(tmp_path):
    storage.write_bytes("memory://lc/model.pth", b"weights")
    first = storage.local_copy("memory://lc/model.pth", cache_dir=str(tmp_path))
    assert Path(first).read_bytes() == b"weights"
    assert storage.local_copy("memory://lc/model.pth", cache_dir=str(tmp_path)) == first
    assert storage.local_copy(str(tmp_path / "x"), cache_dir=str(tmp_path)) == str(tmp_path / "x")


def test_display_hides_credentials():
    assert storage.display("s3://AKIA:secret@bucket/k.mp4") == "s3://bucket/k.mp4"
    assert "abc" not in storage.display("https://h/x.mp4?X-Amz-Signature=abc&v=1")


def test_join_and_normalize():
    assert storage.join("s3://b/camp/", "x", "/y.mp4") == "s3://b/camp/x/y.mp4"
    assert storage.normalize("s3://b//camp/x") == "s3://b/camp/x"
    assert storage.normalize("rel/x.mp4") == os.path.abspath("rel/x.mp4")


def test_a_node_cache_that_cannot_be_used_is_blamed_not_the_input(tmp_path, monkeypatch):
    """Every remote row on a node whose download cache cannot be made failed with "audio ...: does
    not exist" (or "permission denied"), as if its own file were at fault."""
    from heygem_ray.prepare import prepare_audio

    storage.write_bytes("memory://nodecache/n.wav", b"RIFF....")
    (tmp_path / "file").write_text("a file where the cache's folder would go")
    monkeypatch.setenv("HEYGEM_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with pytest.raises(storage.NodeCacheError, match="node cache .*/file/cache cannot be used .* HEYGEM_CACHE_DIR"):
        prepare_audio("memory://nodecache/n.wav", str(tmp_path / "campaign-cache"))


def test_the_node_cache_is_readable_by_its_account_only(tmp_path):
    """Copies of remote inputs (every user's narrations and presenters whose rows ran on the node)
    were kept in a folder and files any account on the node could read (umask 022)."""
    import stat

    old = os.umask(0o022)
    try:
        storage.write_bytes("memory://nodecache/private.wav", b"RIFF private narration")
        copy = storage.local_copy("memory://nodecache/private.wav", cache_dir=str(tmp_path / "cache"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(copy).st_mode) == 0o600
    assert Path(copy).read_bytes() == b"RIFF private narration"


def test_an_input_under_a_file_does_not_exist(tmp_path):
    from heygem_ray.errors import reading

    (tmp_path / "a.wav").write_bytes(b"x")
    with (
        pytest.raises(InputError, match="a.wav/b.wav: does not exist"),
        reading("audio", str(tmp_path / "a.wav" / "b.wav")),
    ):
        (tmp_path / "a.wav" / "b.wav").read_bytes()


def test_an_http_input_whose_server_sends_no_length_is_not_empty(tmp_path, media_dir):
    """A server that streams without Content-Length (a TTS endpoint) gives fsspec no size: the row
    was failed as "is empty (0 bytes)"."""
    import http.server
    import threading

    from heygem_ray.prepare import prepare_audio

    body = (media_dir / "speech3.wav").read_bytes()

    class NoLength(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes

        def do_HEAD(self) -> None:
            self.send_response(200)
            self.end_headers()

        def do_GET(self) -> None:
            self.do_HEAD()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoLength)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/speech.wav"
        audio = prepare_audio(url, str(tmp_path / "cache"))
    finally:
        server.shutdown()
    assert abs(audio.seconds - 3.0) < 0.01


@contextlib.contextmanager
def served(files: dict[str, bytes], headers: dict[str, str]) -> Iterator[str]:
    """An HTTP server on loopback serving `files` (changed in place by the caller) with `headers`
    beside Content-Length: a TTS endpoint sends neither ETag nor Last-Modified."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()

        def do_GET(self) -> None:
            self.do_HEAD()
            self.wfile.write(files.get(self.path) or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_http_input_replaced_by_one_of_its_size_is_read_anew(tmp_path, monkeypatch):
    """A narration regenerated at the same URL with the same length (a WAV of the same duration has
    the same size) kept its old fingerprint and copy: keyed by URI and size alone (HTTP's validator
    is Last-Modified, which was not looked at), a rerun skipped the row and kept the stale video.
    Now Last-Modified keys them, and a server that sends no validator is read anew: a copy of the
    bytes a campaign fingerprinted is used as it is, other bytes are refused, not mixed in."""
    from heygem_ray import prepare

    monkeypatch.setattr(prepare, "UNVERSIONED_SECONDS", 0.0)
    cache, nodes = str(tmp_path / "cache"), str(tmp_path / "node")
    for headers in ({"Last-Modified": "Tue, 01 Dec 2026 10:00:00 GMT"}, {}):
        files = {"/narration.wav": b"first take " * 100}
        with served(files, headers) as root:
            uri = f"{root}/narration.wav"
            before = content_fingerprint(uri, cache, "audio"), storage.local_copy(uri, cache_dir=nodes)
            assert Path(before[1]).read_bytes() == files["/narration.wav"]
            assert (content_fingerprint(uri, cache, "audio"), storage.local_copy(uri, cache_dir=nodes)) == before
            files["/narration.wav"] = b"second try " * 100  # same size
            if headers:
                headers["Last-Modified"] = "Tue, 01 Dec 2026 11:00:00 GMT"
            fingerprint, copy = content_fingerprint(uri, cache, "audio"), storage.local_copy(uri, cache_dir=nodes)
            assert fingerprint != before[0] and fingerprint == storage.fingerprint(uri), headers
            assert Path(copy).read_bytes() == files["/narration.wav"], headers
            if not headers:
                assert storage.local_copy(uri, cache_dir=nodes, content=before[0]) == before[1]  # on this node
                with pytest.raises(InputError, match="changed while the campaign read it"), reading("audio", uri):
                    storage.local_copy(uri, cache_dir=str(tmp_path / "another-node"), content=before[0])


def test_a_storage_error_after_every_try_says_so(monkeypatch):
    """What the storage layer retried already is not tried again on top (segments fail at once)."""
    monkeypatch.setattr(storage, "RETRIES", 2)
    monkeypatch.setattr(storage, "_BACKOFF", 0.0)

    @storage.retrying
    def flaky() -> None:
        raise TimeoutError("store did not answer")

    @storage.retrying
    def missing() -> None:
        raise FileNotFoundError("s3://b/x")

    with pytest.raises(TimeoutError) as retried:
        flaky()
    with pytest.raises(FileNotFoundError) as once:
        missing()
    assert storage.retried(retried.value) and not storage.retried(once.value)
    assert not storage.retried(OSError("a node's disk is full"))


def test_user_client_options_keep_one_try_per_call_and_s3a_is_s3(tmp_path):
    """A user's `config_kwargs` (MinIO's path-style addressing) replaced the client's one try per
    call, and s3a:// URIs got none of the S3 defaults: each of our tries made several."""
    storage.configure({"s3": {"config_kwargs": {"s3": {"addressing_style": "path"}}, "anon": True}})
    try:
        for uri in ("s3://bucket/key", "s3a://bucket/key"):
            fs, _ = storage.url_to_fs(uri)
            assert fs.retries == 1 and fs.config_kwargs["retries"]["total_max_attempts"] == 1, uri
            assert fs.config_kwargs["s3"] == {"addressing_style": "path"} and fs.anon, uri
    finally:
        storage.configure(None)


def test_names_with_glob_characters_are_taken_as_they_are():
    """An output root named "promo[1]" beside "promo1": removing its files, or reading its results
    parts, must not reach the other (object stores expand glob characters in fsspec's rm)."""
    from heygem_ray.results import RowResult, read_parts, write_results

    for name in ("promo[1]", "promo1"):
        write_results(
            f"memory://globs/{name}/_results/part-0001.parquet",
            [RowResult(name, "ok", "o", None, 1.0, 25, 1, 1.0, 1, 0.0)],
        )
        storage.write_bytes(f"memory://globs/{name}/_lock.json", b"{}")
    assert [r["id"] for r in read_parts("memory://globs/promo[1]/_results")] == ["promo[1]"]
    storage.remove("memory://globs/promo[1]/_lock.json")
    storage.remove("memory://globs/promo[1]/_results", recursive=True)
    assert not storage.exists("memory://globs/promo[1]/_lock.json")
    assert not storage.exists("memory://globs/promo[1]/_results/part-0001.parquet")
    assert storage.exists("memory://globs/promo1/_lock.json")
    assert [r["id"] for r in read_parts("memory://globs/promo1/_results")] == ["promo1"]


def test_names_with_double_colons_are_paths_not_chains_of_file_systems(tmp_path):
    """fsspec reads "a::b" as file system a over b: an input "take::2.wav" was read as its neighbour
    "take", and removing an output root's "promo::v2/_results" removed the folder "promo"."""
    (tmp_path / "take").write_bytes(b"the neighbour")
    (tmp_path / "take::2.wav").write_bytes(b"mine")
    assert storage.read_bytes(str(tmp_path / "take::2.wav")) == b"mine"
    assert storage.size(str(tmp_path / "take::2.wav")) == 4
    (tmp_path / "promo").mkdir()
    (tmp_path / "promo" / "keep.mp4").write_bytes(b"a video")
    parts = f"{tmp_path}/promo::v2/_results"
    storage.write_bytes(f"{parts}/part-1.parquet", b"x")
    assert storage.exists(f"{parts}/part-1.parquet")
    storage.remove(parts, recursive=True)
    assert not storage.exists(f"{parts}/part-1.parquet")
    assert (tmp_path / "promo" / "keep.mp4").read_bytes() == b"a video"
    # a scheme in capitals is that scheme (its file system strips it only as it writes it)
    storage.write_bytes("memory://caps/k", b"k")
    assert storage.read_bytes("MEMORY://caps/k") == b"k"


def test_a_signed_urls_secrets_stay_out_of_row_errors():
    """A 403 on an expired presigned input names the whole URL: the row's error (results table,
    report, logs) keeps the URL but not its signature."""
    from benchmarks.driver import SimulatedExecutor
    from heygem_ray.executors import failure_reason

    url = "https://bucket.s3.amazonaws.com/in/a.wav?X-Amz-Credential=AKIAX%2F1&X-Amz-Signature=deadbeef"
    reason = failure_reason(SimulatedExecutor(), OSError(f"403, message='Forbidden', url='{url}'"))
    assert "bucket.s3.amazonaws.com/in/a.wav" in reason and "deadbeef" not in reason and "AKIAX" not in reason


def test_a_full_node_disk_makes_room_from_the_cache_and_a_trimmed_copy_is_fetched_again(tmp_path, monkeypatch):
    """A download that meets a full disk trimmed nothing (trimming came after a download that
    worked), so every remote input on that node failed until someone cleared it: the copies used
    longest ago now make room and the download goes again. A copy another process trimmed between
    being found and being marked used is fetched again, not handed out gone."""
    monkeypatch.setattr(storage, "CACHE_GRACE_SECONDS", 0.0)
    storage.write_bytes("memory://full/old.wav", b"o" * 1000)
    storage.write_bytes("memory://full/new.wav", b"n" * 1000)
    old = storage.local_copy("memory://full/old.wav", cache_dir=str(tmp_path))
    os.utime(old, (1000.0, 1000.0))
    memory = type(storage.url_to_fs("memory://full/new.wav")[0])
    real_get, fills = memory.get_file, []

    def disk_full_once(self, rpath, lpath, **kwargs):
        if not fills:
            fills.append(lpath)
            raise OSError(errno.ENOSPC, "No space left on device", lpath)
        return real_get(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(memory, "get_file", disk_full_once)
    monkeypatch.setenv("HEYGEM_CACHE_GB", str(1500 / 2**30))  # room for one copy once the other goes
    new = storage.local_copy("memory://full/new.wav", cache_dir=str(tmp_path))
    assert Path(new).read_bytes() == b"n" * 1000 and fills and not os.path.exists(old)
    os.unlink(new)  # trimmed by another process after the cache was found to hold it
    assert not storage._used(new)
    assert Path(storage.local_copy("memory://full/new.wav", cache_dir=str(tmp_path))).read_bytes() == b"n" * 1000


def test_a_range_of_an_http_file_whose_server_ignores_range_is_that_range():
    """A server that ignores Range answers with the whole file: a photo's 32-byte header read that
    way was the whole file (a video of hundreds of MB), and a range further in the wrong bytes."""
    body = bytes(range(256)) * 4096
    with served({"/avatar.mp4": body}, {"ETag": '"v1"'}) as root:
        assert storage.read_range(f"{root}/avatar.mp4", 0, 32) == body[:32]
        assert storage.read_range(f"{root}/avatar.mp4", 100, 132) == body[100:132]
        assert storage.read_range(f"{root}/avatar.mp4", 5, 5) == b""


def test_a_local_folders_bytes_are_counted_around_the_subfolder_left_out(tmp_path, monkeypatch):
    """A user's store counted at each upload: their cache (decoded narrations, face tracks: more
    files than their campaigns) is left out without a stat of each of its files."""
    for name, size in (("c1/output/a.mp4", 100), ("c1/inputs/a.wav", 20), ("c2/output/b.mp4", 3), ("top.json", 1)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    for i in range(50):
        (tmp_path / "_cache" / "audio").mkdir(parents=True, exist_ok=True)
        (tmp_path / "_cache" / "audio" / f"{i}.f32").write_bytes(b"x" * 1000)
    statted = []
    lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda path, *a, **k: statted.append(str(path)) or lstat(path, *a, **k))
    assert storage.usage(str(tmp_path), leaving_out=str(tmp_path / "_cache")) == 124
    assert statted and not [path for path in statted if "/_cache/" in path]  # none of its files
    assert storage.usage(str(tmp_path)) == 124 + 50_000
    assert storage.usage(str(tmp_path / "none")) == 0
