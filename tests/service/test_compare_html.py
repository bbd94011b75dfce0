"""The static HTML report, opened in headless Chromium: what the page shows
once the browser has run it (the page draws its tables from embedded data).

Needs Debian's ``chromium`` package, which ``make test`` installs (as root,
or through sudo); skipped with a message where it is absent, except under CI,
where a missing browser fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from extproc.compare.config import CompareConfig, RuleCompare
from extproc.compare.judge import Comparison
from extproc.compare.noise import Result
from extproc.compare.report import render_html, report_data
from extproc.compare.summary import summarize

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true", reason="chromium not installed (Debian: apt-get install -y chromium)"
)
RULE = "shop/web/0"


class Rows(HTMLParser):
    """Table rows of the drawn page: (section target, row class, cell texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, str, list[str]]] = []
        self.target = ""
        self.summaries: list[str] = []
        self._cells: list[str] | None = None
        self._class = ""
        self._text: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.target = a.get("data-target") or ""
        elif tag == "tr":
            self._cells, self._class = [], a.get("class") or ""
        elif tag in ("td", "th") or (tag == "p" and a.get("class") == "summary"):
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cells is not None and self._text is not None:
            self._cells.append("".join(self._text))
            self._text = None
        elif tag == "p" and self._text is not None:
            self.summaries.append("".join(self._text))
            self._text = None
        elif tag == "tr" and self._cells is not None:
            self.rows.append((self.target, self._class, self._cells))
            self._cells = None


def comparisons() -> list[Comparison]:
    out = []
    for i in range(10):
        noise = ({"path": "body.ts"},)
        out.append(Comparison(RULE, "secondary", f"r{i}", Result.NOISE_ONLY, "GET", "/", 200, 200, 2.0, 3.0, noise, 0.0))
        fields = noise + (({"path": "body.v"},) if i < 4 else ()) + (({"path": "status"},) if i == 9 else ())
        result = Result.DIFFERS if i < 4 or i == 9 else Result.NOISE_ONLY
        status = 502 if i == 9 else 200
        out.append(Comparison(RULE, "candidate", f"r{i}", result, "GET", "/", 200, status, 2.0, 100.0 + i, fields, 0.0))
    return out


def drawn(tmp_path: Path, page: str) -> str:
    """The DOM after Chromium loaded the file and ran its script."""
    assert CHROMIUM is not None
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    assert CHROMIUM is not None, "chromium must run under CI: make test installs it (apt-get install -y chromium)"
    done = subprocess.run([CHROMIUM, *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_chromium
def test_the_browser_shows_each_target_its_real_fields_noise_status_pairs_and_latency(tmp_path: Path) -> None:
    config = CompareConfig(rules={RULE: RuleCompare(targets=("candidate", "secondary"), secondary="secondary")})
    page = render_html(report_data(summarize(comparisons(), config), "2026-12-02T08:00:00+00:00"))
    parser = Rows()
    parser.feed(drawn(tmp_path, page))
    fields = {(t, cells[0]): (cls, cells[1:4]) for t, cls, cells in parser.rows if cls in ("real", "noise")}
    assert fields == {
        ("candidate", "body.ts"): ("noise", ["100.0%", "100.0%", "noise"]),
        ("candidate", "body.v"): ("real", ["40.0%", "0.0%", "real"]),
        ("candidate", "status"): ("real", ["10.0%", "0.0%", "real"]),
        ("secondary", "body.ts"): ("noise", ["100.0%", "-", "noise"]),
    }
    assert ("candidate", "", ["200", "502", "1"]) in parser.rows
    assert ("candidate", "", ["shadow", "104", "108", "109"]) in parser.rows
    assert parser.summaries[0].startswith("compared 10, matched 50.0% (identical 0.0%)")


@needs_chromium
def test_an_empty_report_says_so_and_hostile_text_stays_text(tmp_path: Path) -> None:
    assert "Nothing compared yet." in drawn(tmp_path, render_html(report_data([], "now")))
    hostile = [Comparison("</script><b>x", "t", "r", Result.SAME, "GET", "/", 200, 200, 1.0, 1.0, (), 0.0)]
    page = render_html(report_data(summarize(hostile, CompareConfig()), "now"))
    assert "</script><b>" not in page
    titles = Titles()
    titles.feed(drawn(tmp_path, page))
    assert titles.texts == ["</script><b>x \u2192 t"], "drawn as text, not as markup"


class Titles(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self._in = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in = tag == "h2"
        if self._in:
            self.texts.append("")

    def handle_data(self, data: str) -> None:
        if self._in:
            self.texts[-1] += data

    def handle_endtag(self, tag: str) -> None:
        self._in = False
