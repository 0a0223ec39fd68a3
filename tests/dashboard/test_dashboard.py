"""The dashboard in headless Chromium after two real rounds (one promoted, one rejected)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from live_server import (
    BETTER,
    REJECTED,
    LiveServer,
    live_fixture,  # noqa: F401  (the `live` fixture)
)
from PIL import Image

pytestmark = pytest.mark.slow

STATIC = Path(__file__).resolve().parents[2] / "app" / "static"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1500",
    "--virtual-time-budget=8000",
]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail("chromium is missing on CI (scripts/ci-chromium.sh installs it)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return path


def run_chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run(
        [chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


class Dom(HTMLParser):
    """The elements (tag, attributes) and the text of a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [
            a
            for t, a in self.elements
            if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


@pytest.fixture(scope="module")
def two_rounds(live: LiveServer) -> list[dict[str, Any]]:
    out = []
    for params in (BETTER, REJECTED):
        r = httpx.post(f"{live.url}/update-rounds", json=params)
        assert r.status_code == 202, r.text
        out.append(live.wait_round(int(r.json()["id"])))
    assert [r["decision"] for r in out] == ["promoted", "rejected"], out
    return out


def test_dashboard_shows_chart_points_per_version_and_both_rounds(
    live: LiveServer, two_rounds: list[dict[str, Any]], tmp_path: Path
) -> None:
    versions = [c["version"] for c in httpx.get(f"{live.url}/checkpoints").json()["items"]]
    assert versions == [1, 2]
    done = run_chromium(tmp_path, "--dump-dom", f"{live.url}/dashboard")
    assert done.returncode == 0, done.stderr[-3000:]
    dom = Dom()
    dom.feed(done.stdout)
    for series in ("dev_ppl", "test_ppl", "distinct_2", "repetition_rate"):
        points = dom.find("circle", data_series=series)
        assert sorted(int(p["data-version"]) for p in points) == versions, series
    rejected = two_rounds[1]
    marks = dom.find("g", data_round=str(rejected["id"]))
    assert {m["data-series"] for m in marks} >= {"dev_ppl", "test_ppl"}
    rows = {int(a["data-round-id"]) for a in dom.find("tr") if "data-round-id" in a}
    assert rows == {r["id"] for r in two_rounds}
    text = " ".join(dom.text)
    assert "champion v2" in re.sub(r"\s+", " ", text)
    assert "promoted" in text and "rejected" in text
    assert rejected["reason"][:30] in text


def test_screenshot_is_not_blank_and_shows_the_chart(
    live: LiveServer, two_rounds: list[dict[str, Any]], tmp_path: Path
) -> None:
    shot = tmp_path / "dashboard.png"
    done = run_chromium(tmp_path, f"--screenshot={shot}", f"{live.url}/dashboard")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-3000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 1500)
    colors = image.getcolors(maxcolors=1 << 20) or []
    assert len(colors) > 200  # text, bars, lines: not a blank or single-colour page
    # The dev-perplexity series colour (#2f6fde) is on screen: the chart was drawn.
    assert any(rgb == (0x2F, 0x6F, 0xDE) and n > 20 for n, rgb in colors)


def test_dashboard_is_self_contained(live: LiveServer) -> None:
    page = httpx.get(f"{live.url}/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and all(r.startswith("/dashboard/static/") for r in refs), refs
    for ref in refs:
        assert httpx.get(live.url + ref).status_code == 200, ref
    for f in STATIC.iterdir():  # nothing fetched from elsewhere (the SVG namespace is a name)
        urls = set(re.findall(r"https?://[^\s\"'`)]+", f.read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (f.name, urls)
    for bad in ("../routes/dashboard.py", "..%2Fmain.py", ".hidden.js", "nope.js"):
        assert httpx.get(f"{live.url}/dashboard/static/{bad}").status_code == 404, bad
