"""The campaign report: thumbnails from real mp4s, the page's numbers, escaping and links, and the
page as a real browser sees it (headless Chromium: thumbnails load, corrupt ones show as broken)."""

from __future__ import annotations

import html
import os
import re
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from browser import chromium, dump_dom, parse_cards, playwright_page

from heygem_ray import demo
from heygem_ray import report as report_module
from heygem_ray.media.thumbnail import thumbnail_jpeg
from heygem_ray.report import PagedReport, render_report, video_href, write_report
from heygem_ray.results import RowResult

XSS = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_clips")
    paths = {}
    for name, seconds, seed in (("short", 0.2, 1), ("two", 2.0, 2), ("three", 3.0, 3)):
        path = str(root / f"{name}.mp4")
        demo.write_avatar_clip(path, seconds, width=128, seed=seed)
        paths[name] = path
    return paths


def _decode_all(path: str) -> list[tuple[float, np.ndarray]]:
    with av.open(path) as container:
        return [(f.time, f.to_ndarray(format="bgr24")) for f in container.decode(video=0)]


def _jpeg(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a decodable JPEG"
    return image


def _row(
    rid: str, status: str = "ok", output: str | None = None, error: str | None = None, audio: float | None = 10.0, **kw
) -> RowResult:
    ok = status == "ok"
    return RowResult(
        id=rid,
        status=status,
        output=output if output is not None else f"/out/{rid}.mp4",
        error=error,
        audio_seconds=audio,
        frames=kw.get("frames", 250 if ok else None),
        segments=kw.get("segments", 1),
        render_seconds=kw.get("render_seconds", 12.5 if ok else None),
        attempts=kw.get("attempts", 1),
        finished_at=time.time(),
        sync_score=kw.get("sync_score"),
        sync_offset_frames=kw.get("sync_offset_frames"),
        sync_method="motion-energy" if "sync_score" in kw else None,
        qa_flag=kw.get("qa_flag", ""),
    )


# --------------------------------------------------------------------------- thumbnails


@pytest.mark.parametrize("name", ["short", "two", "three"])
def test_thumbnail_is_small_jpeg_of_middle_frame(clips, name):
    data = thumbnail_jpeg(clips[name], width=96)
    assert data[:3] == b"\xff\xd8\xff" and len(data) < 20_000
    thumb = _jpeg(data)
    frames = _decode_all(clips[name])
    h, w = frames[0][1].shape[:2]
    assert thumb.shape[1] == 96 and abs(thumb.shape[0] - h * 96 / w) <= 1

    def diff(frame: np.ndarray) -> float:
        resized = cv2.resize(frame, (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_AREA)
        return float(np.abs(resized.astype(np.float32) - thumb.astype(np.float32)).mean())

    duration = frames[-1][0] + 1 / 25
    middle = next(f for t, f in frames if t >= duration / 2 - 1e-6)
    assert diff(middle) < 6.0
    assert diff(middle) <= min(diff(f) for _, f in frames) + 1.0  # the closest frame, up to JPEG noise


def test_thumbnail_default_width_and_size(clips):
    data = thumbnail_jpeg(clips["three"])
    assert _jpeg(data).shape[1] == 240
    assert len(data) < 30_000


def test_thumbnail_picks_the_middle_frame_exactly(tmp_path):
    """Frame i is flat gray 4*i: the thumbnail's level says which frame was taken."""
    path = str(tmp_path / "ramp.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "0", "preset": "veryfast", "g": "12"}
        for i in range(50):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 * i, np.uint8), format="bgr24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    level = float(_jpeg(thumbnail_jpeg(path, width=32)).mean())
    levels = [float(f.mean()) for _, f in _decode_all(path)]  # what the decoder gives, about 4*i
    assert int(np.argmin([abs(level - x) for x in levels])) == 25, (level, levels)  # t = 1.0 s of 2.0 s
    assert abs(level - levels[25]) < 1.5
    with open(
        path, "rb"
    ) as fh:  # an open file works too; at=0 takes the first frame, at=0.75 the first frame from 1.5 s: 38
        first = float(_jpeg(thumbnail_jpeg(fh, width=32, at=0)).mean())
    assert int(np.argmin([abs(first - x) for x in levels])) == 0, (first, levels)
    later = float(_jpeg(thumbnail_jpeg(path, width=32, at=0.75)).mean())
    assert int(np.argmin([abs(later - x) for x in levels])) == 38, (later, levels)


def test_thumbnail_is_upright_for_rotated_clips(tmp_path, clips):
    """A phone-style clip stored turned with rotation metadata gives the same upright thumbnail."""
    path = str(tmp_path / "rotated.mp4")
    demo.write_avatar_clip(path, 2.0, width=128, seed=2, rotation=90)
    upright = _jpeg(thumbnail_jpeg(clips["two"], width=96)).astype(np.float32)
    rotated = _jpeg(thumbnail_jpeg(path, width=96)).astype(np.float32)
    assert rotated.shape == upright.shape and rotated.shape[0] > rotated.shape[1]
    assert float(np.abs(rotated - upright).mean()) < 8.0


@pytest.mark.parametrize("at", [0.0, 0.5])
def test_thumbnail_of_an_anamorphic_video_is_as_wide_as_it_is_shown(tmp_path, at):
    """HDV or DV stores 4:3 pixels: 96x72 stored is shown 128x72. Its card showed it squeezed."""
    from helpers import write_anamorphic_clip

    path = str(tmp_path / "hdv.mp4")
    write_anamorphic_clip(path, 10)
    assert _jpeg(thumbnail_jpeg(path, width=128, at=at)).shape[:2] == (72, 128)


def test_thumbnail_of_garbage_raises(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(ValueError):
        thumbnail_jpeg(str(bad))


# --------------------------------------------------------------------------- page


def test_summary_numbers():
    rows = [
        _row("a", audio=1800.0),
        _row("b", audio=1800.0),
        _row("c", "failed", error="boom", audio=999.0),
        _row("d", "skipped", audio=50.0),
    ]
    page = render_report(rows, {}, wall_seconds=1800.0, title="Campaign 42")
    summary = dict(re.findall(r"<div><dt>([^<]+)</dt><dd>([^<]+)</dd></div>", page.split("<main>")[0]))
    assert summary["Rows"] == "4"
    assert (summary["OK"], summary["Failed"], summary["Skipped"]) == ("2", "1", "1")
    assert summary["Audio rendered"] == "1.00 h"  # ok rows only
    assert summary["Wall time"] == "0:30:00"
    assert summary["Videos per hour"] == "4.0"  # 2 ok videos in half an hour
    assert summary["Realtime factor"] == "2.00x"
    assert "Finished: 4 rows" in page
    assert 'http-equiv="refresh"' not in page


def test_in_progress_campaign_says_n_of_m_and_refreshes():
    page = render_report([_row("a"), _row("b", "failed", error="x")], {}, 60.0, "c", total_rows=10)
    assert "2 of 10 rows done" in page
    assert '<meta http-equiv="refresh" content="30">' in page
    assert 'data-finished="false"' in page
    done = render_report([_row("a")], {}, 60.0, "c", total_rows=1)
    assert 'data-finished="true"' in done and 'http-equiv="refresh"' not in done


def test_cards_in_order_with_status_and_details(clips):
    rows = [_row("zeta"), _row("alpha", "failed", error="bad avatar"), _row("mid", "skipped", render_seconds=None)]
    thumbs = {"zeta": thumbnail_jpeg(clips["two"]), "mid": thumbnail_jpeg(clips["three"])}
    page = render_report(rows, thumbs, 10.0, "t", report_uri="/out/_report.html")
    cards = parse_cards(page).cards
    assert [c["data-status"] for c in cards] == ["ok", "failed", "skipped"]
    assert [c["id"] for c in cards] == ["row-zeta", "row-alpha", "row-mid"]
    assert cards[0]["img"] and cards[0]["src"].startswith("data:image/jpeg;base64,")
    assert not cards[1]["img"] and cards[1]["data-thumb"] == "none"
    assert "no video" in page
    assert cards[2]["img"]
    zeta = page.split('id="row-zeta"')[1].split("</article>")[0]
    assert "250" in zeta and "12.5 s" in zeta and "10.0 s" in zeta and "badge ok" in zeta
    assert 'alt="Middle frame of zeta"' in zeta
    alpha = page.split('id="row-alpha"')[1].split("</article>")[0]
    assert '<pre class="error">bad avatar</pre>' in alpha and "badge failed" in alpha and "<a " not in alpha
    assert "#row-alpha" in parse_cards(page).links  # the summary links to failed rows


def test_user_data_is_escaped():
    rows = [
        _row(XSS, "failed", error=f"decode failed: {XSS} & <b>more</b>", output=f"/out/{XSS}.mp4"),
        _row("ok1"),
    ]
    page = render_report(rows, {}, 10.0, title=f"Campaign {XSS}")
    assert XSS not in page
    assert "<b>more</b>" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    assert page.count("<script") == 1  # only the page's own script
    assert XSS in html.unescape(page)  # shown as text
    cards = parse_cards(page).cards
    assert cards[0]["data-status"] == "failed" and not cards[0]["img"]


def test_links_relative_for_local_outputs(tmp_path):
    out = tmp_path / "campaign"
    rows = [
        _row("a", output=str(out / "a.mp4")),
        _row("b", output=str(out / "sub" / "b c.mp4")),
        _row("c", output=str(tmp_path / "elsewhere" / "c.mp4")),
    ]
    page = render_report(rows, {}, 10.0, "t", report_uri=str(out / "_report.html"))
    assert parse_cards(page).links == ["a.mp4", "sub/b%20c.mp4", "../elsewhere/c.mp4"]
    assert str(tmp_path) not in "".join(parse_cards(page).links)


def test_link_rules():
    assert video_href("s3://bkt/camp/a.mp4", "s3://bkt/camp/_report.html") == "a.mp4"
    assert video_href("s3://bkt/other/a.mp4", "s3://bkt/camp/_report.html") == "../other/a.mp4"
    assert video_href("s3://bkt2/camp/a.mp4", "s3://bkt/camp/_report.html") == "s3://bkt2/camp/a.mp4"
    assert video_href("gs://bkt/camp/a.mp4", "s3://bkt/camp/_report.html") == "gs://bkt/camp/a.mp4"
    assert video_href("s3://bkt/a.mp4", "/local/_report.html") == "s3://bkt/a.mp4"
    assert video_href("/data/c/a.mp4", "s3://bkt/_report.html") == "file:///data/c/a.mp4"
    assert video_href("file:///data/c/a.mp4", "/data/c/_report.html") == "a.mp4"
    assert video_href("s3://user:pw@bkt/a.mp4", None) == "s3://bkt/a.mp4"  # never credentials
    assert video_href("javascript://%0aalert(1)", None) is None
    assert video_href("/data/c/javascript:alert(1)", "/data/c/_report.html") == "javascript%3Aalert%281%29"
    assert video_href("", "/x/_report.html") is None
    # a '?' in an object store's key is a character of the name (it was linked as `o/a`); an
    # HTTP(S) URL's query string is not part of the path
    assert video_href("s3://bkt/qq/o/a?b.mp4", "s3://bkt/qq/_report.html") == "o/a%3Fb.mp4"
    assert video_href("https://h/c/a.mp4?sig=1", "https://h/c/_report.html?x") == "a.mp4"


def test_thousands_of_rows_each_get_one_card():
    rows = [_row(f"row-{i:05d}", "ok" if i % 10 else "failed", error=None if i % 10 else "e") for i in range(5000)]
    thumbs = {r.id: b"\xff\xd8\xff" + bytes(3000) for r in rows if r.status == "ok"}
    cards = parse_cards(render_report(rows, thumbs, 3600.0, "big")).cards
    assert [c["id"] for c in cards] == [f"row-{r.id}" for r in rows]
    assert sum(c["img"] for c in cards) == len(thumbs)


def test_write_report_publishes_atomically(tmp_path):
    uri = str(tmp_path / "out" / "_report.html")
    write_report(uri, "<p>é</p>")
    assert Path(uri).read_text(encoding="utf-8") == "<p>é</p>"
    assert os.listdir(tmp_path / "out") == ["_report.html"]


# --------------------------------------------------------------------------- browser


@pytest.mark.integration
def test_report_in_chromium(clips, tmp_path):
    browser = chromium()
    out = tmp_path / "campaign"
    rows = [
        _row("two", output=str(out / "two.mp4")),
        _row(XSS, "failed", error=f"oops {XSS}", output=str(out / "x.mp4")),
        _row("three", output=str(out / "three.mp4")),
        _row("short", output=str(out / "short.mp4")),
        _row("old", "skipped", output=str(out / "old.mp4")),
    ]
    thumbs = {name: thumbnail_jpeg(clips[name]) for name in ("two", "three", "short")}
    uri = str(out / "_report.html")
    write_report(uri, render_report(rows, thumbs, 120.0, "Browser check", report_uri=uri))

    cards = {c["data-status"] + ":" + c["id"]: c for c in parse_cards(dump_dom(browser, uri, tmp_path)).cards}
    ok_cards = [c for key, c in cards.items() if key.startswith("ok:")]
    assert len(ok_cards) == 3
    assert all(c["data-thumb"] == "loaded" for c in ok_cards), cards
    assert not any(c["data-thumb"] == "broken" for c in cards.values())
    assert cards["failed:row-" + XSS]["data-thumb"] == "none"  # the id came through as text, not markup


@pytest.mark.integration
def test_corrupt_thumbnail_shows_broken_in_chromium(clips, tmp_path):
    browser = chromium()
    rows = [_row("good"), _row("bad")]
    thumbs = {"good": thumbnail_jpeg(clips["two"]), "bad": b"\x00garbage, not a jpeg\xff" * 20}
    uri = str(tmp_path / "_report.html")
    write_report(uri, render_report(rows, thumbs, 10.0, "t", report_uri=uri))
    cards = {c["id"]: c for c in parse_cards(dump_dom(browser, uri, tmp_path)).cards}
    assert cards["row-good"]["data-thumb"] == "loaded"
    assert cards["row-bad"]["data-thumb"] == "broken"


# --------------------------------------------------------------------------- pages


@pytest.mark.integration
def test_a_large_campaign_gets_pages_rewritten_only_while_they_change(clips, tmp_path):
    """8 rows, 3 per page: the report (the summary alone) and three pages; a page whose rows are all
    done is written once and its thumbnails are let go; the summary counts every row, and links a
    failed row on its page. The summary, rewritten every 10 s of a day-long campaign, holds no
    thumbnails (with the first page's it was megabytes each time)."""
    browser = chromium()
    out = tmp_path / "out"
    ids = [f"r{i}" for i in range(8)]
    thumb = thumbnail_jpeg(clips["two"], width=48)
    report = PagedReport(str(out / "_report.html"), str(out / "_report"), "Paged", ids, page_rows=3)
    for rid in ids[3:6]:  # page 2 completes first
        report.add(_row(rid, "failed" if rid == "r4" else "ok", error="boom" if rid == "r4" else None), thumb)
    report.add(_row("r0"), thumb)
    report.write(60.0, final=False)
    page2 = out / "_report" / "page-0002.html"
    written = page2.stat().st_mtime_ns
    assert report.held_thumbnails == 1  # r0's: page 2 is complete and written for good
    waiting = (out / "_report" / "page-0003.html").read_text()  # nothing done there yet: written all the same,
    assert "No rows yet" in waiting and 'http-equiv="refresh"' in waiting  # not an earlier run's page left as final
    for rid in (*ids[1:3], *ids[6:]):
        report.add(_row(rid), thumb)
    report.write(120.0, final=True)
    assert page2.stat().st_mtime_ns == written
    assert report.held_thumbnails == 0  # every page complete and written for good

    main = (out / "_report.html").read_text()
    summary = dict(re.findall(r"<div><dt>([^<]+)</dt><dd>([^<]+)</dd></div>", main))
    assert (summary["Rows"], summary["OK"], summary["Failed"]) == ("8", "7", "1")
    assert 'href="_report/page-0002.html#row-r4"' in main
    assert parse_cards(main).cards == [] and "data:image" not in main and "<main>" not in main
    assert 'href="_report/page-0001.html">1\u20133</a>' in main and 'href="_report/page-0003.html">7\u20138</a>' in main
    first = (out / "_report" / "page-0001.html").read_text()
    assert [c["id"] for c in parse_cards(first).cards] == ["row-r0", "row-r1", "row-r2"]
    last = (out / "_report" / "page-0003.html").read_text()
    assert 'href="../_report.html">summary</a>' in last and 'href="page-0001.html">1\u20133</a>' in last
    assert 'http-equiv="refresh"' not in last
    cards = parse_cards(dump_dom(browser, str(page2), tmp_path)).cards
    assert [c["id"] for c in cards] == ["row-r3", "row-r4", "row-r5"]
    assert [c["data-thumb"] for c in cards] == ["loaded"] * 3


def test_a_page_that_fails_to_write_leaves_the_pages_written_before_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    ids = [f"r{i}" for i in range(6)]
    report = PagedReport(str(out / "_report.html"), str(out / "_report"), "Paged", ids, page_rows=2)
    for rid in ids:
        report.add(_row(rid), None)
    written, failures = report_module.write_report, [OSError("throttled")]

    def third_page_fails_once(uri: str, text: str) -> None:
        if uri.endswith("page-0003.html") and failures:
            raise failures.pop()
        written(uri, text)

    monkeypatch.setattr(report_module, "write_report", third_page_fails_once)
    with pytest.raises(OSError):
        report.write(10.0, final=True)
    report.write(10.0, final=True)  # the next rewrite: page 3 this time, page 2 left as it was
    for page, rows in (("page-0002.html", ["row-r2", "row-r3"]), ("page-0003.html", ["row-r4", "row-r5"])):
        text = (out / "_report" / page).read_text()
        assert [c["id"] for c in parse_cards(text).cards] == rows and 'http-equiv="refresh"' not in text


def test_a_campaign_of_one_page_keeps_its_cards_in_the_report_and_makes_no_pages(tmp_path):
    """At PAGE_ROWS rows the report is one page with every card; one row more and it is the summary
    alone, every row on pages. A page that fails to write leaves the summary written all the same."""
    out = tmp_path / "out"
    one = PagedReport(str(out / "one.html"), str(out / "one"), "One", ["a", "b", "c"], page_rows=3)
    for rid in "abc":
        one.add(_row(rid, "failed" if rid == "b" else "ok"), None)
    one.write(1.0, final=True)
    text = (out / "one.html").read_text()
    assert [c["id"] for c in parse_cards(text).cards] == ["row-a", "row-b", "row-c"] and 'href="#row-b"' in text
    assert not (out / "one").exists()
    two = PagedReport(str(out / "two.html"), str(out / "two"), "Two", ["a", "b", "c", "d"], page_rows=3)
    for rid in "abcd":
        two.add(_row(rid), None)
    written = report_module.write_report

    def pages_fail(uri: str, text: str) -> None:
        if "/two/" in uri:
            raise OSError("throttled")
        written(uri, text)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report_module, "write_report", pages_fail)
        with pytest.raises(OSError):
            two.write(1.0, final=True)
    summary = (out / "two.html").read_text()
    assert "Finished: 4 rows" in summary and parse_cards(summary).cards == []
    two.write(1.0, final=True)  # the pages, the next time
    assert sorted(os.listdir(out / "two")) == ["page-0001.html", "page-0002.html"]


@pytest.mark.integration
def test_lip_sync_scores_and_flags_in_chromium(tmp_path):
    """Each card shows its lip-sync score (and an offset that is not 0); flagged rows stand out with
    their reason; the cards sort by score, lowest first, and back to manifest order."""
    out = tmp_path / "campaign"
    rows = [
        _row("good", output=str(out / "good.mp4"), sync_score=0.91, sync_offset_frames=0),
        _row(
            "late",
            output=str(out / "late.mp4"),
            sync_score=0.55,
            sync_offset_frames=3,
            qa_flag="mouth and speech offset by +3 frame(s)",
        ),
        _row(
            "bad",
            output=str(out / "bad.mp4"),
            sync_score=0.12,
            sync_offset_frames=0,
            qa_flag="lip-sync score 0.12 below qa.min_sync=0.3",
        ),
        _row("unscored", output=str(out / "unscored.mp4")),
    ]
    uri = out / "_report.html"
    write_report(str(uri), render_report(rows, {}, 60.0, "QA check", report_uri=str(uri)))
    with playwright_page(tmp_path / "downloads") as page:
        page.goto(uri.as_uri())
        assert page.locator(".flagged-count").inner_text() == "2 flagged for a look"
        late = page.locator("#row-late")
        assert "0.55 (+3 fr)" in late.inner_text() and "offset by +3 frame(s)" in late.locator(".qa-flag").inner_text()
        assert page.locator(".card.flagged").count() == 2 and "0.91" in page.locator("#row-good").inner_text()

        def order() -> list[str]:
            return [c.get_attribute("id") for c in page.locator("main .card").all()]

        assert order() == ["row-good", "row-late", "row-bad", "row-unscored"]
        page.get_by_role("button", name="lip-sync score, lowest first").click()
        assert order() == ["row-bad", "row-late", "row-good", "row-unscored"]
        page.get_by_role("button", name="manifest order").click()
        assert order() == ["row-good", "row-late", "row-bad", "row-unscored"]


def test_rows_flagged_at_the_end_are_linked_from_the_summary_and_shown_where_their_page_is_held(tmp_path):
    """A score far below the campaign's median is known only once every row is done: a page
    written for good keeps its cards, the summary counts and links the row all the same."""
    out = tmp_path / "out"
    ids = [f"r{i:02d}" for i in range(60)]
    report = PagedReport(str(out / "_report.html"), str(out / "_report"), "Paged", ids, page_rows=2)
    for rid in ids[:-1]:  # all but the last page complete: written for good, their rows let go
        report.add(_row(rid, qa_flag="mouth and speech offset by +3 frame(s)" if rid >= "r05" else ""), None)
    report.write(1.0, final=False)
    report.add(_row("r59"), None)
    late = "lip-sync score far below the campaign's median (0.99)"
    report.flagged_late(replace(_row("r00"), qa_flag=late), newly=True)
    report.flagged_late(replace(_row("r59"), qa_flag=late), newly=True)
    report.write(2.0, final=True)
    summary = (out / "_report.html").read_text()
    assert "56 flagged for a look" in summary
    # r00's card, on a page written before, shows no flag: its link comes first, though 50 are listed
    links = re.findall(r'<a href="([^"]+)">(r\d\d)</a>', summary.split('class="flagged-list"')[1].split("</p>")[0])
    assert links[0] == ("_report/page-0001.html#row-r00", "r00") and len(links) == 50
    assert ("_report/page-0030.html#row-r59", "r59") not in links[:1] and "and 6 more" in summary
    assert "far below the campaign" in (out / "_report" / "page-0030.html").read_text()  # r59's page is held


def test_a_rerun_writes_its_report_at_once_and_leaves_none_of_an_earlier_runs_extra_pages(tmp_path):
    """A rerun's report was the last run's final page ("Finished", not refreshing) until its first
    row finished, minutes on a cluster starting; and the pages of an earlier run of more rows stayed
    beside it for good, final and linked from nowhere."""
    from helpers import compose_config
    from heygem_ray.manifest import Row
    from heygem_ray.observers import CampaignObservers

    out = tmp_path / "out"
    earlier = PagedReport(str(out / "_report.html"), str(out / "_report"), "Earlier", list("abcdefg"), page_rows=2)
    for rid in "abcdefg":
        earlier.add(_row(rid), None)
    earlier.write(1.0, final=True)
    assert max(p.name for p in (out / "_report").iterdir()) == "page-0004.html"
    cfg = compose_config(f"manifest={tmp_path}/m.parquet", f"output={out}", "render.progress=false")
    rows = [Row(rid, "/in/a.wav", "/in/v.mp4", str(out / f"{rid}.mp4")) for rid in "abc"]
    observers = CampaignObservers(cfg, rows)
    observers.report = PagedReport(cfg.layout.report, cfg.layout.report_pages, "Now", list("abc"), page_rows=2)
    observers.open()
    assert "In progress: 0 of 3 rows done" in (out / "_report.html").read_text()
    assert sorted(p.name for p in (out / "_report").iterdir()) == ["page-0001.html", "page-0002.html"]
