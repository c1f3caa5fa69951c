"""The documentation in docs/ builds without a warning and says what the code does.

Its configuration reference is the schema's (``python tests/unit/test_docs.py`` rewrites it),
its sample start-up errors are what cax prints, and it names every task.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cax.schema import reference_rst

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.rst"
BEGIN, END = ".. BEGIN CONFIG REFERENCE\n\n", "\n.. END CONFIG REFERENCE"
#: Every file the documentation is made of, the README included (docs/index.rst includes it).
SOURCES = [ROOT / "README.rst", *sorted(DOCS.glob("*.rst")), DOCS / "conf.py",
           ROOT / ".readthedocs.yaml"]


def update_reference() -> None:
    """Rewrite the configuration reference from the schema (run this module as a script)."""
    text = CONFIGURATION.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    CONFIGURATION.write_text(text[:start] + reference_rst() + text[end:])


def test_config_reference_matches_schema():
    text = CONFIGURATION.read_text()
    section = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    assert section == reference_rst(), "run: python tests/unit/test_docs.py"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_docs_lines_are_at_most_100_characters(path):
    wide = [f"{path.name}:{number}: {len(line)}"
            for number, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 100]
    assert not wide, wide


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CAX_TEST_WIRE") == "1",
                    reason="the documentation does not depend on the runs DB (embedded tier)")
def test_docs_build_without_warnings(tmp_path):
    """The command CI's docs build is: any Sphinx warning (a broken reference, bad markup, a page
    outside the table of contents) fails it."""
    from tests.conftest import skip_or_fail

    try:
        import sphinx  # noqa: F401
    except ImportError:
        skip_or_fail("Sphinx is not installed (pip install -e '.[docs]')")
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert build.returncode == 0, build.stderr
    assert not build.stderr.strip(), build.stderr
    index = (tmp_path / "html" / "index.html").read_text()
    assert "Two commands" in index  # the README is the front page
    for page in DOCS.glob("*.rst"):
        assert (tmp_path / "html" / f"{page.stem}.html").exists(), page.name


#: How overview.rst spells the number of work tasks.
NUMBERS = {12: "twelve", 13: "thirteen", 14: "fourteen", 15: "fifteen", 16: "sixteen"}


def test_docs_name_every_task():
    from cax.tasks import TASKS, Report

    text = (DOCS / "overview.rst").read_text()
    for task in [*TASKS, Report]:
        assert re.search(rf"^``{task.name}``", text, re.MULTILINE), task.name
    count = re.search(r"There are\s+(\w+)\s+work tasks", text)
    assert count is not None and count.group(1) == NUMBERS[len(TASKS)], count


def test_no_task_of_this_release_is_listed_as_the_originals_alone():
    """docs/migration.rst: task names of the original that cax lacks are ignored with one line;
    a task it has (ProcessBatchQueue) must not be among them."""
    from cax.schema import ORIGINAL_TASKS
    from cax.tasks import TASKS

    assert not {t.name for t in TASKS} & set(ORIGINAL_TASKS)

#: The configuration behind the sample start-up errors of docs/configuration.rst.
SAMPLE_CONFIG = {"runs_db": "embedded:runsdb", "sites": [
    {"name": "midway", "method": "local", "dir_raw": "/data/m", "data_type": ["raw"],
     "uplaod_options": 1, "port": "22"},
    {"name": "lngs", "method": "local", "dir_raw": "/data/l", "data_type": ["raw"],
     "upload_options": ["nowhere"]}]}


def test_sample_config_errors_are_what_cax_prints(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cax.cli import cli

    (tmp_path / "cax.json").write_text(json.dumps(SAMPLE_CONFIG))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["--once", "--dry-run", "--config", "cax.json",
                                      "--host", "midway"])
    printed = [line for line in result.stderr.splitlines() if line.strip()]
    shown = [line.strip() for line in CONFIGURATION.read_text().splitlines()
             if line.startswith("    cax: cax.json: site ")]
    assert result.exit_code == 2
    assert shown == printed


def test_readthedocs_builds_this_configuration():
    text = (ROOT / ".readthedocs.yaml").read_text()
    assert "configuration: docs/conf.py" in text and "fail_on_warning: true" in text
    assert re.search(r"extra_requirements:\s*\n\s*- docs", text)


if __name__ == "__main__":
    update_reference()
