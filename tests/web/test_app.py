"""cax web's application through Flask's test client: every page as HTML and JSON, the same
values as ``cax status --json``, escaping, nothing written, clean 4xx, no secrets, auth."""

from __future__ import annotations

import base64
import json
import shlex
from html.parser import HTMLParser
from typing import Any

import pytest
from click.testing import CliRunner

from cax.cli import cli
from cax.errors import RunsDBError
from cax.runsdb.store import EmbeddedClient
from cax.web.auth import Credentials
from tests.web.conftest import (
    HOSTILE_ERROR,
    HOSTILE_LOCATION,
    HOSTILE_NAME,
    HOSTILE_NUMBER,
    make_client,
)

PAGES = ["/", "/?per_page=3", "/run/8", f"/run/{HOSTILE_NUMBER}", "/daemons", "/stuck",
         "/stuck?site=lab", "/tape", "/throughput", "/?status=none&site=lab", "/?tag=x"]
BAD = [("/?number=abc", 400), ("/?per_page=0", 400), ("/?per_page=many", 400),
       ("/?older=yesterday", 400), ("/?status=lost", 400), ("/?status=none", 400),
       ("/?number=<b>1</b>", 400), ("/?format=xml", 400), ("/run/99999", 404),
       ("/run/abc", 404), ("/nowhere", 404), ("/stuck?site=<b>x</b>", 400),
       (f"/?name={'x' * 300}", 400)]


class Texts(HTMLParser):
    """The text of every element with a given class, as a browser would show it."""

    def __init__(self, wanted: str):
        super().__init__()
        self.wanted, self.depth, self.found, self.tags = wanted, 0, [], []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        classes = (dict(attrs).get("class") or "").split()
        if self.depth:
            self.depth += 1
        elif self.wanted in classes:
            self.depth = 1
            self.found.append("")

    def handle_endtag(self, tag: str) -> None:
        if self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.found[-1] += data


def texts(body: str, css_class: str) -> list[str]:
    parser = Texts(css_class)
    parser.feed(body)
    return [t.strip() for t in parser.found]


def status_json(config: Any, *args: str) -> Any:
    result = CliRunner().invoke(cli, ["--config", str(config), "--host", "daq", "status",
                                      *args, "--json"])
    assert result.exit_code in ((0, 1) if "--stuck" in args else (0,)), result.output  # 1: stuck
    return json.loads(result.stdout)


def drop(value: Any, *keys: str) -> Any:
    """``value`` without ``keys`` anywhere (the ages, which move between two calls)."""
    if isinstance(value, dict):
        return {k: drop(v, *keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [drop(v, *keys) for v in value]
    return value


@pytest.mark.parametrize("path", PAGES)
def test_every_page_is_html_and_json(client, path):
    page = client.get(path)
    assert page.status_code == 200, page.text
    assert page.mimetype == "text/html" and "<h1>" in page.text
    data = client.get(path + ("&" if "?" in path else "?") + "format=json")
    assert data.status_code == 200 and data.mimetype == "application/json"
    json.loads(data.text)


def test_pages_carry_what_cax_status_json_says(client, world):
    assert drop(client.get("/daemons?format=json").json, "now", "age_s", "stuck") == \
        drop(status_json(world), "now", "age_s", "stuck")
    assert drop(client.get("/run/8?format=json").json, "age_s", "fields", "tape") == \
        drop(status_json(world, "--run", "8"), "age_s")
    tape = client.get("/tape?format=json").json
    assert tape.pop("as_of").startswith("20") and tape == status_json(world, "--tape")
    stuck = client.get("/stuck?format=json").json
    expected = status_json(world, "--stuck", "--all-sites")
    assert drop(stuck, "command") == drop(expected, "command")
    assert [s["command"].split(" retry ")[1] for s in stuck] == \
        [s["command"].split(" retry ")[1] for s in expected]
    summary = status_json(world, "--summary", "--newest", "50")
    matrix = client.get("/?format=json").json
    assert matrix["sites"] == summary["sites"] and matrix["types"] == summary["types"]
    assert [(r["number"], r["name"], r["cells"]) for r in matrix["runs"]] == \
        [(r["number"], r["name"], r["cells"]) for r in summary["runs"]]


def test_the_daemons_page_counts_stuck_entries_of_every_site(client, world):
    everywhere = status_json(world, "--stuck", "--all-sites")
    assert client.get("/daemons?format=json").json["stuck"] == len(everywhere)


def test_a_stuck_entry_shows_its_reason_and_the_retry_command_that_works(client, world):
    body = client.get("/stuck").text
    commands = texts(body, "command")
    hostile = [c for c in commands if f"--run {HOSTILE_NUMBER} " in c]
    assert len(hostile) == 1
    assert hostile[0].endswith(f"--config {world} --host daq retry --run {HOSTILE_NUMBER} "
                               "--site lab --type raw")
    assert any(HOSTILE_ERROR in reason for reason in texts(body, "reason"))
    # pasted as printed (without the cax program, which the test calls in process)
    argv = shlex.split(hostile[0].split(" --config ", 1)[1])
    result = CliRunner().invoke(cli, ["--config", *argv, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("would retry ") and "at lab" in result.output


def test_hostile_names_locations_and_errors_are_escaped(client):
    pages = {path: client.get(path).text for path in
             ("/", f"/run/{HOSTILE_NUMBER}", "/stuck", "/daemons")}
    for path, body in pages.items():
        assert "<script" not in body.lower(), path
        assert "<img" not in body.lower() and "<i>evil" not in body, path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages["/"]
    assert HOSTILE_NAME in texts(pages["/"], "name")  # shown as text, exactly
    assert HOSTILE_NAME in texts(pages["/stuck"], "name")
    assert texts(pages[f"/run/{HOSTILE_NUMBER}"], "location")[-1] == HOSTILE_LOCATION
    assert any(HOSTILE_ERROR in t for t in texts(pages[f"/run/{HOSTILE_NUMBER}"], "error"))
    assert any(HOSTILE_ERROR in t for t in texts(pages["/daemons"], "error"))
    # and in the JSON: the same values, nothing to interpret as markup
    data = client.get(f"/run/{HOSTILE_NUMBER}?format=json")
    assert "<" not in data.text and data.json[0]["name"] == HOSTILE_NAME
    assert data.json[0]["data"][1]["location"] == HOSTILE_LOCATION


def test_no_script_may_run_even_if_escaping_failed(client):
    policy = client.get("/").headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src" not in policy
    assert client.get("/").headers["X-Content-Type-Options"] == "nosniff"


def snapshot(db: Any) -> Any:
    """Everything the runs DB holds, and the embedded store's change counter."""
    embedded = isinstance(db.client, EmbeddedClient)
    generation = db.client.generation() if embedded else None
    return (generation, sorted((str(d["_id"]), repr(d)) for d in db.runs.find({})),
            sorted(repr(d) for d in db.daemons.find({})))


def test_loading_every_page_writes_nothing(client, runsdb):
    before = snapshot(runsdb)
    for path in PAGES + [p for p, _ in BAD]:
        for suffix in ("", "&format=json" if "?" in path else "?format=json"):
            client.get(path + suffix)
            for method in (client.post, client.put, client.delete):
                assert method(path + suffix).status_code in (404, 405)
    assert snapshot(runsdb) == before
    if before[0] is not None:
        assert before[0] == runsdb.client.generation()


@pytest.mark.parametrize("path,status", BAD)
def test_bad_input_is_a_clean_4xx_page_and_json(client, path, status):
    page = client.get(path)
    assert page.status_code == status
    assert "Traceback" not in page.text and "<b>" not in page.text
    assert texts(page.text, "error")
    if "format=" in path:
        return
    data = client.get(path + ("&" if "?" in path else "?") + "format=json")
    assert data.status_code == status and data.json["status"] == status
    assert data.json["error"]


def test_a_method_that_would_write_is_refused(client):
    response = client.post("/")
    assert response.status_code == 405 and "GET" in response.headers["Allow"]


def test_runs_db_failure_is_a_503_without_the_password(world, monkeypatch):
    client = make_client(world)

    def down(*args: Any, **kwargs: Any) -> Any:
        raise RunsDBError("runs DB mongodb://cax:s3cret-pw@db.example:27017/ is unreachable")

    monkeypatch.setattr(client.db, "find_heartbeats", down)
    for path in ("/daemons", "/daemons?format=json"):
        page = client.get(path)
        assert page.status_code == 503
        assert "s3cret-pw" not in page.text and "unreachable" in page.text
    client.db.close()


def test_an_internal_error_is_a_500_without_a_traceback(world, monkeypatch):
    client = make_client(world)
    monkeypatch.setattr(client.db, "find_heartbeats", lambda *a, **k: 1 / 0)
    page = client.get("/daemons")
    assert page.status_code == 500
    assert "Traceback" not in page.text and "ZeroDivision" not in page.text
    client.db.close()


def test_no_secret_on_any_page(world, monkeypatch):
    monkeypatch.setenv("MONGODB_PASSWORD", "env-s3cret")
    client = make_client(world, Credentials(token="t0ken-s3cret"),
                         runs_db="mongodb://cax:uri-s3cret@db.example:27017/run")
    auth = {"Authorization": "Bearer t0ken-s3cret"}
    seen = []
    for path in PAGES + [p for p, _ in BAD]:
        for suffix in ("", "&format=json" if "?" in path else "?format=json"):
            seen.append(client.get(path + suffix, headers=auth).text)
    seen.append(client.get("/static/cax.css", headers=auth).text)
    assert "mongodb://cax:***@db.example" in seen[0]  # the runs DB is named, redacted
    for secret in ("uri-s3cret", "env-s3cret", "t0ken-s3cret"):
        assert not [text for text in seen if secret in text], secret
    client.db.close()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_credentials_are_required_when_set(world):
    client = make_client(world, Credentials(token="tok", user="shift", password="pw"))
    assert client.get("/").status_code == 401
    assert "Basic" in client.get("/").headers["WWW-Authenticate"]
    assert client.get("/static/cax.css").status_code == 401
    assert client.post("/").status_code == 401
    for headers in ({"Authorization": "Bearer nope"}, basic("shift", "nope"),
                    basic("other", "pw"), {"Authorization": "Basic !!!"},
                    {"Authorization": "Digest tok"}):
        assert client.get("/", headers=headers).status_code == 401, headers
    for headers in ({"Authorization": "Bearer tok"}, basic("anyone", "tok"),
                    basic("shift", "pw")):
        assert client.get("/", headers=headers).status_code == 200, headers
    client.db.close()


def test_on_loopback_only_a_loopback_name_is_answered(world):
    """A page elsewhere whose name resolves to 127.0.0.1 (DNS rebinding) reads nothing."""
    client = make_client(world, loopback_only=True)
    for host in ("evil.example", "evil.example:8080", "10.0.0.1:8080", "[::1", ""):
        assert client.get("/", headers={"Host": host}).status_code == 400, host
    for host in ("localhost", "localhost:9000", "127.0.0.1:8080", "[::1]:8080", "127.0.1.1"):
        assert client.get("/", headers={"Host": host}).status_code == 200, host
    client.db.close()


def test_a_run_shows_every_field_its_whole_history_processing_and_tape(tmp_path, runsdb_uri):
    """The run page: all fields of each copy, every history event kept (``cax status --run``
    shows the last five), processed data with its version, tape copies marked."""
    import datetime as dt

    from cax.runsdb import open_runsdb
    from tests.admin_seed import copy
    from tests.conftest import make_run, write_config

    for d in ("daq/raw", "lab/raw", "lab/processed"):
        (tmp_path / d).mkdir(parents=True)
    config = write_config(tmp_path / "cax.json", [
        {"name": "daq", "method": "local", "dir_raw": str(tmp_path / "daq/raw"),
         "data_type": ["raw"], "upload_options": ["tape"]},
        {"name": "lab", "method": "local", "dir_raw": str(tmp_path / "lab/raw"),
         "dir_processed": str(tmp_path / "lab/processed"), "data_type": ["raw", "processed"]},
        {"name": "tape", "method": "tsm", "data_type": None}],
        runs_db=runsdb_uri[0], runs_db_name=runsdb_uri[1])
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    history = [{"time": t0 + dt.timedelta(minutes=i), "event": f"event-{i}", "by": "lab@vm:1",
                "detail": f"detail {i}"} for i in range(7)]
    writer = open_runsdb(*runsdb_uri)
    writer.insert_runs([make_run(3, data=[
        copy("daq", "transferred", job_id="odd-field-42"),
        copy("lab", "error", attempts=1, history=history),
        copy("lab", "transferred", type="processed", pax_version="v1.0.0"),
        copy("tape", "transferred")])])
    writer.close()
    client = make_client(config)
    body = client.get("/run/3").text
    assert "odd-field-42" in body and "job_id" in body
    assert [f"event-{i}" in body for i in range(7)] == [True] * 7
    assert "processing v1.0.0" in body
    rows = {(r.split('data-site="')[1].split('"')[0], r.split('data-type="')[1].split('"')[0]): r
            for r in body.split('<tr class="copy"')[1:]}
    assert '<small class="badge">tape</small>' in rows["tape", "raw"]
    assert "tape</small>" not in rows["daq", "raw"]
    data = client.get("/run/3?format=json").json[0]["data"]
    assert [e["tape"] for e in data] == [False, False, False, True]
    assert len(data[1]["fields"]["history"]) == 7 and len(data[1]["history"]) == 5
    client.db.close()
