"""cax web in a real browser: headless Chromium loads every page of the demo world.

``cax demo`` builds the world and prints the ``cax web`` command, which is started exactly as
printed (plus ``--port 0``).  A stuck run with a script for a name, a quoted location and a
hostile error is added first.  Chromium loads each page; the tests read the DOM it built
(``--dump-dom``: what a person would see, after parsing) and save a screenshot of each page
(``CAX_WEB_SCREENSHOTS=DIR`` keeps them, e.g. for docs/web.png).

Chromium is Debian's ``chromium`` (``tests/run`` installs it); without it these tests are
skipped, or fail under ``CAX_REQUIRE_FIXTURES=1`` as in CI.
"""

from __future__ import annotations

import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from cax.clock import utcnow
from cax.runsdb import open_runsdb
from tests.conftest import skip_or_fail
from tests.web.conftest import HOSTILE_LOCATION, HOSTILE_NAME, hostile_run

pytestmark = pytest.mark.slow

HOSTILE = 50
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
PAGES = {"/": "Runs", "/run/1": "Run 1", f"/run/{HOSTILE}": f"Run {HOSTILE}",
         "/daemons": "Daemons", "/stuck": "Stuck", "/tape": "Tape",
         "/throughput": "Throughput"}


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    skip_or_fail("no chromium (Debian package chromium; tests/run installs it)")
    raise AssertionError("unreachable")


def browse(url: str, *args: str) -> str:
    """Run headless Chromium on ``url`` with ``args``; return what it printed."""
    with tempfile.TemporaryDirectory(prefix="cax-chromium-") as profile:
        done = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               *args, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Element:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Element | None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Element | str] = []

    @property
    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self) -> Any:
        for child in self.children:
            if isinstance(child, Element):
                yield child
                yield from child.iter()

    def find(self, tag: str | None = None, cls: str | None = None, **attrs: str
             ) -> list[Element]:
        return [e for e in self.iter() if (tag is None or e.tag == tag)
                and (cls is None or cls in e.classes)
                and all(e.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]


VOID = {"meta", "link", "input", "br", "img", "hr", "source", "wbr", "area", "base", "col"}


class DOM(HTMLParser):
    """The DOM Chromium dumped, as a tree of Elements."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.root = self.at = Element("#document", {}, None)
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        element = Element(tag, dict(attrs), self.at)
        self.at.children.append(element)
        if tag not in VOID:
            self.at = element

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.at.children.append(Element(tag, dict(attrs), self.at))

    def handle_endtag(self, tag: str) -> None:
        at = self.at
        while at.parent is not None and at.tag != tag:
            at = at.parent
        if at.parent is not None:
            self.at = at.parent

    def handle_data(self, data: str) -> None:
        self.at.children.append(data)


@pytest.fixture(scope="module")
def site(tmp_path_factory: Any) -> Any:
    """The demo world with a hostile stuck run, served by ``cax web`` as the demo prints it."""
    chromium()
    root = tmp_path_factory.mktemp("web")
    demo = subprocess.run([sys.executable, "-m", "cax", "demo", "--dir", str(root / "demo"),
                           "--runs", "2"], capture_output=True, text=True, timeout=300,
                          cwd=root)
    assert demo.returncode == 0, demo.stderr
    lines = demo.stdout.splitlines()
    command = next(line.strip() for line in lines if line.strip().endswith(" web"))
    db = open_runsdb(f"file:{root / 'demo' / 'runsdb'}")
    run = hostile_run(utcnow())
    run["number"] = HOSTILE
    db.insert_runs([run])
    db.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAX_WEB_")}
    server = subprocess.Popen(shlex.split(command) + ["--port", "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=root, env=env)
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(server.stderr), daemon=True).start()
    first = server.stdout.readline()
    assert "serving the runs DB" in first, (first, errors)
    url = first.split(" on ", 1)[1].strip().rstrip("/")
    yield {"url": url, "command": command, "root": root}
    server.terminate()
    server.wait(timeout=30)


def dom(site: Any, path: str) -> Element:
    return DOM(browse(site["url"] + path, "--dump-dom")).root


def test_the_demo_prints_the_web_command_for_its_world(site):
    argv = shlex.split(site["command"])
    assert argv[-1] == "web" and argv[argv.index("--config") + 1] == \
        str(site["root"] / "demo" / "cax.json")


@pytest.mark.parametrize("path", PAGES)
def test_every_page_loads_in_chromium_and_is_pictured(site, path, tmp_path):
    page = dom(site, path)
    assert [h.text() for h in page.find("h1")] == [PAGES[path]]
    assert not page.find("script") and not page.find("iframe")
    picture = tmp_path / "page.png"
    browse(site["url"] + path, f"--screenshot={picture}", "--window-size=1400,1000")
    data = picture.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1400, 1000)
    assert len(data) > 10_000  # a page, not a blank
    keep = os.environ.get("CAX_WEB_SCREENSHOTS")
    if keep:
        name = path.strip("/").replace("/", "-") or "runs"
        shutil.copy(picture, Path(keep) / f"web-{name}.png")


def test_matrix_cells_in_chromium(site):
    page = dom(site, "/")
    rows = {r.attrs["data-run"]: r for r in page.find("tr") if "data-run" in r.attrs}
    assert set(rows) == {"1", "2", str(HOSTILE)}
    for number in ("1", "2"):
        cells = {c.attrs["data-site"]: c for c in rows[number].find("span", "state")}
        assert {s: c.attrs["data-status"] for s, c in cells.items()} == \
            {"daq": "transferred", "lab": "transferred"}
        assert {c.attrs["data-checksum"] for c in cells.values()} == {"recorded"}
        assert "st-transferred" in cells["lab"].classes
    hostile = {c.attrs["data-site"]: c for c in rows[str(HOSTILE)].find("span", "state")}
    assert hostile["lab"].attrs["data-status"] == "stuck" and "st-stuck" in hostile["lab"].classes
    assert [n.text() for n in rows[str(HOSTILE)].find("td", "name")] == [HOSTILE_NAME]


def test_the_script_named_run_is_shown_as_text_in_chromium(site):
    raw = browse(site["url"] + f"/run/{HOSTILE}", "--dump-dom")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    page = DOM(raw).root
    assert not page.find("script") and not page.find("img")
    assert [n.text() for n in page.find("span", "name")] == [HOSTILE_NAME]
    locations = [td.text() for td in page.find("td", "location")]
    assert HOSTILE_LOCATION in locations


def test_a_stuck_entry_and_its_command_in_chromium(site):
    page = dom(site, "/stuck")
    entries = page.find("li", "stuck-entry")
    assert [(e.attrs["data-run"], e.attrs["data-site"]) for e in entries] == \
        [(str(HOSTILE), "lab")]
    cax = site["command"].rsplit(" web", 1)[0]
    command = entries[0].find("pre", "command")[0].text()
    assert command == f"{cax} retry --run {HOSTILE} --site lab --type raw"
    assert "5 attempt(s), none left" in entries[0].find("div", "reason")[0].text()
    # the command works as printed
    done = subprocess.run(shlex.split(command) + ["--dry-run"], capture_output=True, text=True,
                          timeout=120, cwd=site["root"])
    assert done.returncode == 0 and done.stdout.startswith("would retry"), done.stderr


def test_the_daemon_list_in_chromium(site):
    page = dom(site, "/daemons")
    daemons = {d.attrs["data-id"].split("@")[0]: d.attrs["data-state"]
               for d in page.find("tr", "daemon")}
    assert daemons == {"demo-daq": "alive", "demo-lab": "alive"}
    assert page.find("table", id="copies")


def test_the_throughput_chart_in_chromium(site):
    page = dom(site, "/throughput")
    chart = page.find("svg", id="throughput-chart")
    assert len(chart) == 1
    bars = {b.attrs["data-site"] for b in chart[0].find("rect", "bar")}
    assert bars == {"daq", "lab"}  # the demo's data, registered today at both sites
