"""The values behind cax web's pages: matrix paging and filters, throughput, the chart, auth."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from cax.cli import cli
from cax.config import load_config
from cax.errors import ConfigError
from cax.web import views
from cax.web.auth import Credentials, check_bind, is_loopback
from cax.web.svg import nice_top, throughput_chart
from tests.admin_seed import copy
from tests.conftest import make_run

T0 = dt.datetime(2017, 1, 1, tzinfo=dt.timezone.utc)


def pages(db, config, flt=views.MatrixFilter(), per_page=7):
    """Every page of the matrix, following the older links as a browser would."""
    found, older = [], None
    while True:
        page = views.matrix(db, config, flt, views.parse_cursor(older), per_page)
        assert len(page["runs"]) <= per_page
        found.append([r["number"] for r in page["runs"]])
        older = page["older"]
        if older is None:
            return found


def test_paging_walks_every_run_once_newest_first(two_sites, runsdb):
    runs = [make_run(n, start=T0 + dt.timedelta(hours=n)) for n in range(30)]
    # ties on start (broken by number) across a page boundary, and runs without a start
    runs += [make_run(n, start=T0 + dt.timedelta(hours=20)) for n in (100, 101, 102)]
    runs += [make_run(n, start=None) for n in (200, 201)]
    for run in runs[-2:]:
        run["start"] = None
    runsdb.insert_runs(runs)
    config = load_config(two_sites, "daq")
    expected = [r["number"] for r in runsdb.find_runs({})]
    assert expected[9:13] == [102, 101, 100, 20] and expected[-2:] == [201, 200]
    got = pages(runsdb, config, per_page=11)  # the first page ends between 101 and 100
    assert [n for page in got for n in page] == expected
    assert [len(p) for p in got] == [11, 11, 11, 2]


def test_paging_a_filtered_matrix(two_sites, runsdb):
    runsdb.insert_runs([make_run(n, data=[copy("daq", "transferred")] + (
        [copy("lab", "error", attempts=1)] if n % 3 == 0 else [])) for n in range(40)])
    config = load_config(two_sites, "daq")
    errors = pages(runsdb, config, views.MatrixFilter(status="error", site="lab"), 4)
    assert [n for p in errors for n in p] == list(range(39, -1, -3))
    missing = pages(runsdb, config, views.MatrixFilter(status="none", site="lab"), 10)
    assert [n for p in missing for n in p] == [n for n in range(39, -1, -1) if n % 3]


@pytest.mark.parametrize("args,numbers", [
    ({"number": "3"}, [3]), ({"name": "170101_0500"}, [5]), ({"tag": "calib"}, [4, 2]),
    ({"status": "verifying"}, [2]), ({"site": "lab"}, [4, 3, 1]),
    ({"status": "transferring", "site": "lab"}, [3]), ({"status": "none", "site": "lab"}, [5, 2]),
    ({"status": "error"}, [4]), ({"number": "4", "status": "error"}, [4]),
    ({"number": "1", "status": "error"}, []),
])
def test_matrix_filters(two_sites, runsdb, args, numbers):
    runsdb.insert_runs([
        make_run(1, data=[copy("daq", "transferred"), copy("lab", "transferred")]),
        make_run(2, data=[copy("daq", "verifying")], tags=[{"name": "calib"}]),
        make_run(3, data=[copy("daq", "transferred"), copy("lab", "transferring")]),
        make_run(4, data=[copy("daq", "transferred"), copy("lab", "error", attempts=1)],
                 tags=[{"name": "calib"}, {"name": "blind"}]),
        make_run(5, data=[copy("daq", "transferred")])])
    config = load_config(two_sites, "daq")
    page = views.matrix(runsdb, config, views.MatrixFilter.parse(args))
    assert [r["number"] for r in page["runs"]] == numbers
    assert page["filter"] == args


def test_matrix_cells_carry_state_and_checksum_state(two_sites, runsdb):
    runsdb.insert_runs([make_run(1, data=[
        copy("daq", "transferred"),
        copy("lab", "error", attempts=5, next_attempt=None, checksum_problem="daq",
             checksum="adler32:00")])])
    page = views.matrix(runsdb, load_config(two_sites, "daq"), views.MatrixFilter())
    row = page["runs"][0]
    assert row["cells"] == {"daq": {"raw": "transferred"}, "lab": {"raw": "stuck"}}
    assert row["checks"] == {"daq": {"raw": "recorded"}, "lab": {"raw": "differs"}}


@pytest.mark.parametrize("raw", ["x", "12", "abc_1", "1_x", "99999999999999999999_1"])
def test_a_cursor_not_made_here_is_a_400(raw):
    with pytest.raises(views.PageError) as caught:
        views.parse_cursor(raw)
    assert caught.value.status == 400


def test_throughput_counts_bytes_registered_per_site_and_day(two_sites, runsdb):
    now = dt.datetime(2026, 3, 31, 15, 0, tzinfo=dt.timezone.utc)
    day = dt.timedelta(days=1)
    runsdb.insert_runs([
        make_run(1, data=[copy("daq", "transferred", size=100, creation_time=now - 2 * day),
                          copy("lab", "transferred", size=100, transfer_end=now - day,
                               creation_time=now - 40 * day)]),
        make_run(2, data=[copy("daq", "transferred", size=7, creation_time=now - 40 * day),
                          copy("lab", "transferred", size=50,
                               transfer_end=dt.datetime(2026, 3, 30, 23, 59, 59))]),
        make_run(3, data=[copy("lab", "error", size=999, transfer_end=now),
                          copy("daq", "transferred", size=5, transfer_end=now - 30 * day)]),
    ])
    view = views.throughput(runsdb, now)
    assert view["since"] == dt.datetime(2026, 3, 2, tzinfo=dt.timezone.utc)
    assert len(view["days"]) == 30 and view["days"][-1] == "2026-03-31"
    assert view["sites"] == ["daq", "lab"]
    assert view["bytes"]["lab"][-2] == 150 and view["copies"]["lab"][-2] == 2
    assert view["bytes"]["daq"][-3] == 100 and sum(view["bytes"]["daq"]) == 100
    assert sum(view["bytes"]["lab"]) == 150  # the error copy is not counted


def test_the_chart_is_svg_with_bars_in_proportion_and_escaped_labels():
    view = {"days": ["2026-03-01", "2026-03-02"], "sites": ["a<b>", "lab"],
            "bytes": {"a<b>": [1_000_000, 0], "lab": [3_000_000, 4_000_000]},
            "copies": {"a<b>": [1, 0], "lab": [1, 2]}}
    svg = str(throughput_chart(view))
    root = ET.fromstring(svg)  # well-formed XML: nothing unescaped inside
    ns = "{http://www.w3.org/2000/svg}"
    bars = {(b.get("data-site"), b.get("data-day")): float(b.get("height"))
            for b in root.iter(f"{ns}rect") if b.get("class") == "bar"}
    assert set(bars) == {("a<b>", "2026-03-01"), ("lab", "2026-03-01"), ("lab", "2026-03-02")}
    assert bars["lab", "2026-03-02"] == pytest.approx(4 / 3 * bars["lab", "2026-03-01"])
    assert bars["lab", "2026-03-01"] == pytest.approx(3 * bars["a<b>", "2026-03-01"])
    assert "<b>" not in svg and "a&lt;b&gt;" in svg
    assert nice_top(4_000_000) == 5_000_000 and nice_top(0) == 1
    empty = throughput_chart({"days": ["2026-03-01"], "sites": [], "bytes": {}, "copies": {}})
    assert "no copies registered" in str(empty)


@pytest.mark.parametrize("bind,loopback", [("127.0.0.1", True), ("127.1.2.3", True),
                                           ("::1", True), ("[::1]", True),
                                           ("localhost", True), ("0.0.0.0", False),
                                           ("::", False), ("10.1.2.3", False),
                                           ("example.org", False)])
def test_only_loopback_is_served_without_a_secret(bind, loopback):
    assert is_loopback(bind) == loopback
    if loopback:
        check_bind(bind, Credentials())
    else:
        with pytest.raises(ConfigError, match="CAX_WEB_TOKEN"):
            check_bind(bind, Credentials())
    check_bind(bind, Credentials(token="t"))
    check_bind(bind, Credentials(user="u", password="p"))


def test_credentials_come_from_the_environment():
    assert Credentials.from_env({}) == Credentials()
    assert Credentials.from_env({"CAX_WEB_TOKEN": ""}) == Credentials()
    assert Credentials.from_env({"CAX_WEB_TOKEN": "t"}).required
    with pytest.raises(ConfigError, match="both"):
        Credentials.from_env({"CAX_WEB_USER": "u"})
    described = Credentials(token="secret-t", user="u", password="secret-p").describe()
    assert "secret" not in described and "CAX_WEB_TOKEN" in described


def test_cax_web_refuses_a_network_address_without_a_secret(two_sites, monkeypatch):
    for name in ("CAX_WEB_TOKEN", "CAX_WEB_USER", "CAX_WEB_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli, ["--config", str(two_sites), "--host", "daq", "web",
                                      "--bind", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2
    assert "not a loopback address" in result.output and "CAX_WEB_TOKEN" in result.output


def test_run_page_pairs_each_copy_with_its_own_fields_though_the_run_changed_between_reads(
        two_sites, runsdb, monkeypatch):
    """The page reads the run twice (the status view, then every field): a copy purged in
    between must not shift the fields of the copies after it onto the wrong site."""
    runsdb.insert_runs([make_run(1, data=[copy("daq", "transferred"),
                                          copy("lab", "error", attempts=2)])])
    real_find_runs, reads = runsdb.find_runs, []

    def find_runs(query, *args, **kwargs):
        found = real_find_runs(query, *args, **kwargs)
        reads.append(query)
        if len(reads) > 1:  # daq's copy was purged after the first read
            for run in found:
                run["data"] = [e for e in run["data"] if e["host"] != "daq"]
        return found

    monkeypatch.setattr(runsdb, "find_runs", find_runs)
    (run,) = views.run_page(runsdb, load_config(two_sites, "daq"), 1)
    fields = {view["site"]: view["fields"] for view in run["data"]}
    assert fields["lab"]["host"] == "lab" and fields["lab"]["attempts"] == 2
    assert fields["daq"] == {}
