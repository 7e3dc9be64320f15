"""Headless Chromium for tests that check pages as a browser shows them: a dumped DOM of a static
page, or a live page driven through Playwright."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser

import pytest

#: Debian's package (.ci/run installs it): Playwright drives it, and never downloads browsers of its own
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Cards(HTMLParser):
    """Each card's attributes and whether it holds an <img>, plus every link."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "article" and "card" in (attrs.get("class") or ""):
            self.cards.append({**attrs, "img": False})
        elif tag == "img" and self.cards:
            self.cards[-1]["img"] = True
            self.cards[-1]["src"] = attrs.get("src")
        elif tag == "a":
            self.links.append(attrs.get("href"))


def parse_cards(page: str) -> Cards:
    parser = Cards()
    parser.feed(page)
    return parser


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium not installed (.ci/run installs it)")


def dump_dom(browser: str, page_path: str, tmp_path) -> str:
    profile = tmp_path / "chromium-profile"
    cmd = [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        f"file://{page_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "<article" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def playwright_missing() -> str | None:
    """Why a test cannot drive Chromium through Playwright here (for skipif), or None."""
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} not installed (.ci/run installs Debian's chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright not installed (pip install -e '.[test]')"
    return None


@contextmanager
def playwright_page(downloads: os.PathLike) -> Iterator:
    """A page in a fresh context of headless Chromium (a fresh profile: no cookies, no cache),
    driven by Playwright's sync API; the browser and Playwright's driver end with the block."""
    missing = playwright_missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, downloads_path=downloads
        )
        try:
            context = browser.new_context(accept_downloads=True)
            yield context.new_page()
        finally:
            browser.close()
