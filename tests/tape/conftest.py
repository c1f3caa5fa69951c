"""Fixtures of the tape tests: the dsmc emulator installed as ``dsmc`` on PATH."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

FAKE = Path(__file__).with_name("fake_dsmc.py")


@dataclass
class FakeTape:
    """The emulated tape: its folder, the installed ``dsmc``, and its switches."""

    root: Path
    dsmc: Path

    def set(self, modes: dict[str, list[str]] | None = None, sep: str = ",") -> None:
        """Switch failure modes per command ("*" for all) and the thousands separator."""
        (self.root / "control.json").write_text(json.dumps({"modes": modes or {}, "sep": sep}))

    def calls(self) -> list[list[str]]:
        log = self.root / "calls.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def stored(self, path: str) -> Path:
        return self.root / "store" / path.strip("/")

    def reads(self) -> int:
        f = self.root / "reads"
        return int(f.read_text()) if f.exists() else 0


@pytest.fixture
def fake_tape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Put the emulator on PATH as ``dsmc``, keeping its tape in ``tmp_path/tape``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    dsmc = bindir / "dsmc"
    dsmc.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    dsmc.chmod(0o755)
    root = tmp_path / "tape"
    root.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DSMC_TAPE", str(root))
    tape = FakeTape(root, dsmc)
    tape.set()
    return tape
