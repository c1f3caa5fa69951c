"""setup.py beside pyproject.toml: the classic command works, the metadata stays in one place
(issue 18 item 11)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cax

ROOT = Path(__file__).resolve().parents[2]


def test_setup_py_version_is_the_package_version():
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == cax.__version__


def test_setup_py_declares_nothing_of_its_own():
    """Every piece of metadata comes from pyproject.toml: setup() gets no arguments."""
    text = (ROOT / "setup.py").read_text()
    assert "setuptools.setup()" in text and "setup(" not in text.replace("setuptools.setup()", "")


def test_every_console_script_names_a_command():
    """The entry points of pyproject.toml survive the cli package's split."""
    import importlib
    import re

    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', section, re.MULTILINE))
    assert set(scripts) == {"cax", "massive-cax", "massive-tsm", "cax-mv", "cax-rm",
                            "cax-stray", "cax-status"}
    for name, target in scripts.items():
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
