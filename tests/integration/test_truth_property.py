"""Nothing lied about, whatever the writers do, in any order (issue 17): a stateful property test.

Hypothesis drives random sequences of what people and daemons do to a small world -- ``run
add`` with random (and wrong) names and locations, ``cax retry``, ``cax-mv``, ``cax-rm``,
``cax run remove``, processing that succeeds, fails, exits 0 with nothing or writes garbage,
bytes flipped on disk, daemon passes that copy, scrub, repair and purge -- and then lets the
daemons run until nothing moves.  Afterwards:

* every ``transferred`` entry's bytes on disk are its dataset's origin (its judgement), and
  every processed output the processor's validator accepts;
* no run that ever had a verified copy has lost all of them, unless a person deleted the last
  one on purpose (``cax-rm --force``);
* no place is named by two entries, and every entry's location names its own run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from click.testing import CliRunner
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cax.checksum import dataset_checksum, scan_dataset
from cax.cli import cax_mv, cax_rm, cli
from cax.daemon import Daemon
from cax.processors.reference import validate
from cax.runsdb import TRANSFERRED, EntryKey, open_runsdb
from cax.runsdb.origins import differs, judge
from cax.tasks import select_tasks
from tests.conftest import REAL_MONGODB, advance_clock, make_context, write_config

EXAMPLES = int(os.environ.get("CAX_HYPOTHESIS_EXAMPLES", "25"))
NAMES = ["170101_0000", "170101_0100", "170101_0200", "170101_0300"]
#: What the processor does for a run, chosen per run by the test: its control file.
PROCESSOR = """
import json, os, sys
modes = json.loads(open(os.environ["CAX_TEST_MODES"]).read() or "{}")
mode = modes.get(os.path.basename(sys.argv[1]), 0)
if mode == 1:
    raise SystemExit(3)  # fails
if mode == 2:
    open(sys.argv[2], "w").close()  # exits 0 with nothing
    raise SystemExit(0)
if mode == 3:
    open(sys.argv[2], "w").write("garbage")  # exits 0 with garbage
    raise SystemExit(0)
sys.argv = ["reference", sys.argv[1], sys.argv[2]]
import runpy
runpy.run_module("cax.processors.reference", run_name="__main__")
"""


class World(RuleBasedStateMachine):
    """Sites ``daq`` (the DAQ's buffer: pushes raw, purges) and ``lab`` (pulls, processes)."""

    @initialize()
    def build(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cax-world-"))
        for sub in ("daq/raw", "lab/raw", "lab/processed", "jobs"):
            (self.root / sub).mkdir(parents=True)
        self.modes = self.root / "modes"
        self.modes.write_text("")
        os.environ["CAX_TEST_MODES"] = str(self.modes)
        code = PROCESSOR.replace("{", "{{").replace("}", "}}")  # not placeholders
        processing = {"command": [sys.executable, "-c", code, "{input}", "{output}"],
                      "version": "v1", "jobs_dir": str(self.root / "jobs"), "timeout": 60,
                      "validate": ["{python}", "-m", "cax.processors.reference", "--validate",
                                   "{output}"]}
        sites = [
            {"name": "daq", "method": "local", "dir_raw": str(self.root / "daq/raw"),
             "data_type": ["raw"], "upload_options": ["lab"], "purge": 0, "min_copies": 1,
             "retry_backoff": 0, "max_attempts": 3, "scrub_after_days": 0},
            {"name": "lab", "method": "local", "dir_raw": str(self.root / "lab/raw"),
             "dir_processed": str(self.root / "lab/processed"), "data_type": ["raw"],
             "download_options": ["daq"], "retry_backoff": 0, "max_attempts": 3,
             "scrub_after_days": 0, "processing": processing},
        ]
        uri = f"file:{self.root / 'runsdb'}"
        self.db = open_runsdb(uri, create=True)
        self.config = write_config(self.root / "cax.json", sites, runs_db=uri,
                                   lease_seconds=30)
        self.verified: set[str] = set()  # runs that had a verified copy
        self.forced: set[str] = set()  # runs a person deleted or unregistered on purpose
        self.next = 1

    def teardown(self) -> None:
        if hasattr(self, "db"):
            self.settle()
            self.check_truth()
            self.db.close()
            shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------------

    def cax(self, *args: str, host: str = "daq") -> int:
        return CliRunner().invoke(cli, ["--config", str(self.config), "--host", host,
                                        *args]).exit_code

    def daemon_pass(self, site: str) -> None:
        ctx = make_context(self.config, site, self.db, once=True)
        try:
            Daemon(ctx, select_tasks(None)).run(once=True)
        finally:
            if ctx.transports:
                ctx.transports.close_all()
        self.note_verified()

    def note_verified(self) -> None:
        for run in self.db.find_runs({}):
            if any(e.get("status") == TRANSFERRED and e.get("type") == "raw"
                   for e in run.get("data") or ()):
                self.verified.add(run["name"])

    def files(self, site: str) -> list[Path]:
        return sorted(p for p in (self.root / site / "raw").rglob("*") if p.is_file())

    # -- what people and daemons do -----------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), files=st.integers(0, 2), other=st.booleans(),
          wrong_name=st.booleans(), mode=st.integers(0, 3))
    def run_add(self, name: str, files: int, other: bool, wrong_name: bool, mode: int) -> None:
        """The DAQ writes a run directory; a person registers it (or another run's, or under
        a name that is not its own).  ``mode``: what its processing will do."""
        self.set_mode(name, mode)
        path = self.root / "daq/raw" / name
        if not path.exists():
            path.mkdir()
            for i in range(files):
                (path / f"f{i}.zip").write_bytes(os.urandom(300 + i))
        target = path
        if other:
            existing = sorted(p for p in (self.root / "daq/raw").iterdir() if p.is_dir())
            target = existing[0]
        given_name = NAMES[(NAMES.index(name) + 1) % len(NAMES)] if wrong_name else name
        self.cax("run", "add", "--number", str(self.next), "--name", given_name,
                 "--location", str(target))
        self.next += 1

    @rule(site=st.sampled_from(["daq", "lab"]))
    def daemon(self, site: str) -> None:
        self.daemon_pass(site)

    @rule(name=st.sampled_from(NAMES), mode=st.integers(0, 3))
    def processor_behaviour(self, name: str, mode: int) -> None:
        """How the processor will treat this run next: well, fail, nothing, garbage."""
        self.set_mode(name, mode)

    def set_mode(self, name: str, mode: int) -> None:
        modes = json.loads(self.modes.read_text() or "{}")
        modes[name] = mode
        self.modes.write_text(json.dumps(modes))

    @rule(site=st.sampled_from(["daq", "lab"]), index=st.integers(0, 20))
    def flip_a_byte(self, site: str, index: int) -> None:
        files = self.files(site)
        if files:
            victim = files[index % len(files)]
            data = bytearray(victim.read_bytes())
            if data:
                data[len(data) // 2] ^= 0xFF
                victim.write_bytes(bytes(data))

    @rule(name=st.sampled_from(NAMES), site=st.sampled_from(["daq", "lab"]))
    def retry(self, name: str, site: str) -> None:
        self.cax("retry", "--name", name, "--site", site)

    @rule(name=st.sampled_from(NAMES), site=st.sampled_from(["daq", "lab"]))
    def unregister(self, name: str, site: str) -> None:
        if self.cax("run", "remove", "--name", name, "--site", site) == 0:
            self.forced.add(name)

    @rule(name=st.sampled_from(NAMES), force=st.booleans())
    def rm(self, name: str, force: bool) -> None:
        runs = self.db.find_runs({"name": name})
        if not runs:
            return
        path = self.root / "daq/raw" / name
        last = sum(1 for e in runs[0].get("data") or () if e.get("status") == TRANSFERRED
                   and e.get("type") == "raw") <= 1
        code = CliRunner().invoke(cax_rm, [
            "--location", str(path), "--run", str(runs[0]["number"]),
            *(["--force"] if force else []), "--config", str(self.config),
            "--host", "daq"]).exit_code
        if code == 0 and last:
            self.forced.add(name)

    @rule(name=st.sampled_from(NAMES), into=st.sampled_from(["moved", "again"]))
    def mv(self, name: str, into: str) -> None:
        source = self.root / "lab/raw" / name
        CliRunner().invoke(cax_mv, ["--input", str(source), "--output",
                                    str(self.root / "lab/raw" / into / name), "--config",
                                    str(self.config), "--host", "lab"])

    @rule()
    def time_passes(self) -> None:
        advance_clock(self.db, 3600)

    # -- what must hold ----------------------------------------------------------------------

    @invariant()
    def one_place_one_entry(self) -> None:
        if not hasattr(self, "db"):
            return
        places: dict[tuple[str, str], str] = {}
        for run in self.db.find_runs({}):
            for entry in run.get("data") or ():
                location = entry.get("location")
                if not isinstance(location, str) or entry.get("host") == "tsm-server":
                    continue
                place = (entry["host"], location.rstrip("/"))
                assert place not in places, f"{place} named by {places[place]} and {run['name']}"
                places[place] = run["name"]
                assert Path(location).name.split(".")[0] == run["name"], \
                    f"{run['name']} names {location}"

    def settle(self) -> None:
        """Let the daemons run until nothing moves: scrub finds what was flipped, repair and
        copies heal what can be healed."""
        for _ in range(4):
            advance_clock(self.db, 3600)
            for site in ("daq", "lab"):
                self.daemon_pass(site)

    def check_truth(self) -> None:
        for run in self.db.find_runs({}):
            for entry in run.get("data") or ():
                if entry.get("status") != TRANSFERRED or entry.get("host") not in ("daq", "lab"):
                    continue
                key = EntryKey.of(entry)
                judgement = judge(run, key.type, key.version)
                path = Path(entry["location"])
                assert path.exists(), f"{run['name']} {key}: registered, but no data at {path}"
                if judgement.disputed:
                    continue  # vouched-for copies that disagree: a person decides
                assert judgement.settled, f"{run['name']} {key}: transferred, no origin"
                found = {"checksum": dataset_checksum(scan_dataset(path))}
                assert not differs(found, judgement.origin), \
                    f"{run['name']} {key}: its bytes on disk are not its dataset's origin"
                if key.type == "processed":  # an output nobody validated is no origin
                    validate(str(path))
        for name in sorted(self.verified - self.forced):
            runs = self.db.find_runs({"name": name})
            kept = [e for run in runs for e in run.get("data") or () if e.get("type") == "raw"
                    and isinstance(e.get("location"), str) and Path(e["location"]).exists()]
            assert kept, f"{name}: had a verified copy, and no copy of its data is left"


World.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=14,
                                   deadline=None,
                                   suppress_health_check=list(HealthCheck))
TestWorld = World.TestCase
if REAL_MONGODB:  # the world is an embedded store of its own
    TestWorld = None  # noqa: F811
