"""Headless Chromium for tests that check pages as a browser shows them."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import pytest


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
