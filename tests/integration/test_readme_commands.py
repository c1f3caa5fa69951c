"""Every command of the README runs, as printed, and does what the README says.

The README's commands are the ``$ `` lines of its ``.. code-block:: console`` blocks, in order:
the quick start makes a demo world (``.venv/bin/cax demo``) in a temporary directory, and the
daily operations and the migration section work in it. Each command runs in bash, in that
directory, with the environment the commands before it left (``source``, ``export``); it must
exit with the status its ``# exits N`` comment gives (0 without one), and print the lines shown
under it, in order, where ``...`` stands for anything and runs of spaces count as one.

A block preceded by ``.. not run: REASON`` is shown, not run. Such blocks are few and named
here (NOT_RUN): a new one fails this test until it is added, with its reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.rst"

#: The README's commands that are shown and not run, with the reason.
NOT_RUN = {
    "python3 -m venv .venv && .venv/bin/pip install -q .":
        "installs cax: the tests run in the virtualenv that bash tests/run made",
    "bash tests/run": "the test suite itself",
    "python3 -m venv /opt/cax && /opt/cax/bin/pip install /path/to/cax-checkout":
        "installs into a site's /opt",
    "cax --config /etc/cax/cax.json --host daq config check --network":
        "reads a site's /etc/cax; config check runs below, in the demo world",
    "cp contrib/cax.service /etc/systemd/system/cax.service": "systemd at a site",
    "systemctl daemon-reload && systemctl enable --now cax": "systemd at a site",
    "journalctl -u cax -f": "systemd at a site",
    "cax web": "a server that runs until stopped (tests/web/test_cli.py runs it)",
}
#: Fewer run commands than this means the parser lost some.
FEWEST_RUN = 20
EXIT_COMMENT = re.compile(r"#\s*exits\s+(\d+)")


@dataclass
class Command:
    """One ``$ `` line and what the README shows it does."""

    line: str
    output: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        found = EXIT_COMMENT.search(self.line)
        return int(found.group(1)) if found else 0


@dataclass
class Block:
    """A console block, and why it is not run (None: it is)."""

    not_run: str | None
    commands: list[Command] = field(default_factory=list)


def console_blocks(text: str) -> list[Block]:
    """Return the README's console blocks in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    reason = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(".. not run:"):
            reason = line.split(":", 1)[1].strip()
        elif line.startswith(".. code-block::"):
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("   ")):
                body.append(lines[i][3:])
                i += 1
            if line.split("::", 1)[1].strip() == "console":
                blocks.append(_block(body, reason))
            reason = None
            continue
        elif line.strip() and not line.startswith(".."):
            reason = None  # a marker belongs to the block right after it
        i += 1
    return blocks


def _block(body: list[str], reason: str | None) -> Block:
    block = Block(reason)
    for line in body:
        if line.startswith("$ "):
            block.commands.append(Command(line[2:]))
        elif line.strip():
            assert block.commands, f"output before any command: {line!r}"
            block.commands[-1].output.append(line)
    return block


def _normal(line: str) -> str:
    return " ".join(line.split())


def _pattern(shown: str) -> re.Pattern[str]:
    parts = [re.escape(part.strip()) for part in _normal(shown).split("...")]
    return re.compile(".*".join(parts))


def shown_lines_appear(shown: list[str], printed: str) -> list[str]:
    """Return the shown lines missing from ``printed`` (in order; ``...`` is anything)."""
    lines = [_normal(line) for line in printed.splitlines()]
    missing, at = [], 0
    for want in shown:
        if _normal(want) == "...":
            continue
        pattern = _pattern(want)
        for k in range(at, len(lines)):
            if pattern.fullmatch(lines[k]):
                at = k + 1
                break
        else:
            missing.append(want)
    return missing


def test_readme_blocks_are_parsed_and_exceptions_named():
    blocks = console_blocks(README.read_text())
    shown_only = {c.line: b.not_run for b in blocks if b.not_run for c in b.commands}
    assert set(shown_only) == set(NOT_RUN), "name each README command that is not run, and why"
    assert sum(len(b.commands) for b in blocks if not b.not_run) >= FEWEST_RUN


def _environment(venv_bin: Path) -> dict[str, str]:
    """The environment of a new shell: no cax settings, the virtualenv not active, and no
    SLURM_CONF of the test cluster (tests/batch), whose queue would change massive-cax's plan."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CAX_", "VIRTUAL_ENV", "PYTEST_", "SLURM_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != venv_bin.resolve())
    env["TERM"] = "dumb"
    return env


def _run(command: str, cwd: Path, env: dict[str, str], keep: Path) -> tuple[int, str, dict]:
    """Run one README line in bash; return its status, output and the environment it left."""
    script = f"{command}\n__status=$?\nenv -0 > {keep}\nexit $__status\n"
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    left = dict(item.split("=", 1) for item in keep.read_text().split("\0") if "=" in item)
    left = {k: v for k, v in left.items() if k not in ("__status", "_", "SHLVL", "PWD", "OLDPWD")}
    return done.returncode, done.stdout, left


@pytest.mark.slow
def test_every_readme_command_runs_as_printed(tmp_path):
    venv = Path(sys.prefix)
    if not (venv / "bin" / "cax").exists():
        pytest.skip(f"cax is not installed in {venv} (pip install -e .)")
    world = tmp_path / "world"
    world.mkdir()
    (world / ".venv").symlink_to(venv)  # the quick start's .venv: the one running the tests
    env = _environment(venv / "bin")
    keep = tmp_path / "env"
    ran = 0
    for block in console_blocks(README.read_text()):
        if block.not_run:
            continue
        for command in block.commands:
            status, printed, env = _run(command.line, world, env, keep)
            assert status == command.exit_status, (command.line, printed[-3000:])
            missing = shown_lines_appear(command.output, printed)
            assert not missing, (command.line, missing, printed[-3000:])
            ran += 1
    assert ran >= FEWEST_RUN


def test_shown_lines_match_with_ellipses_and_spacing():
    printed = "a 1\nrun 5 (261207_2144) raw at   lab: transferred\nz\n"
    assert shown_lines_appear(["run 5 (...) raw at lab: ...", "z"], printed) == []
    assert shown_lines_appear(["z", "a 1"], printed) == ["a 1"]  # in order
    assert shown_lines_appear(["5 ..."], "15 x") == ["5 ..."]  # a whole line
