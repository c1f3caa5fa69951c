"""Every command with generated bad values for its options (issue 18): the outcome is an exit
status of 0, 1, 2, 3 or 5 and never 4 (an internal error), no traceback is printed, and a
command that exits 2 (usage or configuration invalid) has written nothing: not to the runs DB
(the embedded store's change counter) and not to the sites' data directories.

The bad values are derived from each option's click type (numbers out of range or not
numbers, choices that are not offered, paths that do not exist or are of the wrong kind,
empty, huge, unicode, ``..``), so an option added later is fuzzed too.  Commands run in this
process (click's runner), in a world of two local sites; the looping ones are held to one
pass (``--once``), and ``cax web`` to addresses it refuses to serve on.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cax import cli as cli_module
from tests.cli_world import World, make_world

#: Exit statuses a person may see: ok, failed, usage/config, runs DB away, already running.
ALLOWED = {0, 1, 2, 3, 5}


def commands() -> dict[str, tuple[click.Command, list[str]]]:
    """Every command: (the click command, the arguments that lead to it)."""
    root = cli_module.cli
    found: dict[str, tuple[click.Command, list[str]]] = {"cax": (root, [])}
    for name, sub in root.commands.items():
        if isinstance(sub, click.Group):
            for inner_name, inner in sub.commands.items():
                found[f"{name} {inner_name}"] = (inner, [name, inner_name])
        else:
            found[name] = (sub, [name])
    for name in ("cax-mv", "cax-rm", "cax-stray", "massive-cax", "massive-tsm", "cax-status"):
        found[name] = (getattr(cli_module, name.replace("-", "_")), [])
    return found


ALL = commands()


def test_every_command_is_fuzzed():
    assert set(ALL) == {"cax", "run add", "run remove", "status", "retry", "config check",
                        "demo", "web", "cax-mv", "cax-rm", "cax-stray", "massive-cax",
                        "massive-tsm", "cax-status"}


TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               max_size=30)


def odd_paths(world_root: str) -> list[str]:
    """Paths a person may mistype: a directory for a file, inside a file, odd.  Every one is
    inside the test's directories or cannot be created: nothing is written anywhere else."""
    return ["", ".", "..", "/", "~", "-", f"{world_root}/daq/raw", f"{world_root}/cax.json",
            f"{world_root}/cax.json/inside", f"{world_root}/daq/raw/170101_0000",
            f"{world_root}/daq/raw/170101_0000/f.dat", "x" * 5000]


def bad_paths(world_root: str) -> st.SearchStrategy[str]:
    """``odd_paths``, and missing ones (inside the test's directory)."""
    return st.one_of(st.sampled_from(odd_paths(world_root)),
                     TEXT.map(lambda t: f"{world_root}/nowhere/{t}"))


def bad_int(kind: click.ParamType) -> st.SearchStrategy[str]:
    """Not integers, and for a range integers outside it."""
    low = getattr(kind, "min", None)
    high = getattr(kind, "max", None)
    numbers = []
    if low is not None:
        numbers.append(st.integers(max_value=low - 1).map(str))
    if high is not None:
        numbers.append(st.integers(min_value=high + 1).map(str))
    if low is None and high is None:  # negative, or past any 64-bit integer (never a count
        # that a command would loop over: a demo of 50,000 runs filled a disk)
        numbers += [st.integers(max_value=-1).map(str),
                    st.integers(min_value=2 ** 64, max_value=10 ** 30).map(str)]
    return st.one_of(*numbers, st.sampled_from(["", "x", "1.5", "1e3", "-", "0x10", "7 7"]))


def bad_float() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(["", "x", "nan", "inf", "-inf", "1e400", "-1e400",
                                      "-1", "0", "1e-320", "1" * 400]),
                     st.floats(allow_nan=True, allow_infinity=True).map(repr))


def bad_values(command: str, param: click.Option, world_root: str) -> st.SearchStrategy:
    """Bad values for one option (a flag: given, perhaps where it makes no sense)."""
    kind = param.type
    if param.is_flag:
        return st.just(True)
    if command == "web" and param.name == "bind":
        # only addresses it refuses to serve on (a server would run until interrupted)
        return st.sampled_from(["0.0.0.0", "::", "10.1.2.3", "example.invalid", "", "x" * 300,
                                "256.1.1.1", "not an address"])
    if command == "demo" and param.name == "directory":
        # not a new name: that runs the whole demo (slow, and 12 MB a time)
        return st.sampled_from([p for p in odd_paths(world_root) if p not in ("-", "~")])
    if isinstance(kind, click.types.IntParamType):
        return bad_int(kind)
    if isinstance(kind, click.types.FloatParamType):
        return bad_float()
    if isinstance(kind, click.Choice):
        return TEXT.filter(lambda t: t.lower() not in [c.lower() for c in kind.choices])
    if isinstance(kind, click.Path) or (param.metavar or "") in ("FILE", "PATH", "DIR"):
        return bad_paths(world_root)
    return st.one_of(TEXT, bad_paths(world_root),
                     st.sampled_from(["../..", "a/b", "*", "170101_0000", "daq", "-1", "x" * 3000,
                                      "embedded:" + world_root + "/nowhere",
                                      "mongodb://127.0.0.1:1/x?serverSelectionTimeoutMS=200"]))


#: What every invocation of a command starts with: a valid command line, so that the one bad
#: value is what the command meets.  Looping commands are held to one pass; ``cax web`` to an
#: address it refuses to serve on without a secret.  ``{root}`` is the world's directory.
VALID = {
    "cax": ["--config", "{root}/cax.json", "--host", "daq", "--once"],
    "run add": ["--number", "9", "--location", "{root}/daq/raw/170109_0000"],
    "run remove": ["--run", "2"],
    "status": [],
    "retry": ["--all-stuck"],
    "config check": [],
    "demo": [],
    "web": ["--bind", "10.1.2.3"],
    "cax-mv": ["--input", "{root}/daq/raw/170102_0000", "--output",
               "{root}/daq/raw/moved/170102_0000"],
    "cax-rm": ["--location", "{root}/daq/raw/170102_0000", "--run", "2"],
    "cax-stray": [],
    "massive-cax": ["--host", "lab", "--once", "--dry-run"],  # lab processes; submit nothing
    "massive-tsm": ["--once"],
    "cax-status": ["--host", "daq", "--status", "error"],
}
#: Options of the entry points that choose the world (the subcommands get them before their
#: name; ``cax`` fuzzes them).
WORLD = ["--config", "{root}/cax.json", "--host", "daq"]


def fuzzed_options(command: str) -> list[click.Option]:
    """The options of ``command`` given bad values (not --help/--version; of the subcommands
    and tools, not --config/--host, which keep to the world under test)."""
    cmd = ALL[command][0]
    return [p for p in cmd.params if isinstance(p, click.Option)
            and p.name not in ("help", "version")
            and not (command != "cax" and p.name in ("config_path", "host"))]


CASES = [(command, param.name) for command in sorted(ALL)
         for param in fuzzed_options(command)]


def invocation(command: str, option: str, world_root: str) -> st.SearchStrategy[list[str]]:
    """A valid command line with one bad value for ``option`` (a flag: given)."""
    param = next(p for p in fuzzed_options(command) if p.name == option)
    path = ALL[command][1]
    head = {"cax": [], "demo": [],  # the demo makes its own world
            "cax-status": ["--config", "{root}/cax.json"]}.get(command, WORLD)
    valid = [*head, *path, *VALID[command]]

    def build(value: Any) -> list[str]:
        added = [param.opts[0]] if value is True else [param.opts[0], value]
        return [*valid, *added]

    return bad_values(command, param, world_root).map(build)


@pytest.fixture
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("fuzz") / "w")


@pytest.fixture(autouse=True)
def quiet_environment(monkeypatch):
    for name in ("CAX_HOST", "CAX_CONFIG", "CAX_RUNS_DB", "CAX_WEB_TOKEN", "CAX_WEB_USER",
                 "CAX_WEB_PASSWORD", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
        monkeypatch.delenv(name, raising=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def run(world: World, command: str, argv: list[str], tmp_path: Path) -> None:
    """Run one invocation and check the promises of the module docstring."""
    cmd = ALL[command][0] if command in ALL and not ALL[command][1] else cli_module.cli
    argv = [a.replace("{root}", str(world.root)) for a in argv]
    before, data = world.generation(), world.data()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        result = CliRunner().invoke(cmd, argv, catch_exceptions=True, input="")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    shown = f"{command}: {argv}\n{result.output}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(shown) from result.exception
    assert result.exit_code in ALLOWED, shown
    assert "Traceback" not in result.output, shown
    if result.exit_code == 2:
        assert world.generation() == before, f"exit 2 but the runs DB changed\n{shown}"
        assert world.data() == data, f"exit 2 but the data directories changed\n{shown}"


# No shrinking: the failing command line is printed as it is, and shrinking one that ran a
# daemon pass can take minutes.
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.mark.parametrize(("command", "option"), CASES)
def test_bad_value_never_crashes_nor_writes_on_exit_2(command, option, world, tmp_path,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)

    @SETTINGS
    @given(argv=invocation(command, option, str(world.root)))
    def check(argv: list[str]) -> None:
        run(world, command, argv, tmp_path)

    check()
